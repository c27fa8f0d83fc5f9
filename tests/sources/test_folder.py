from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from digest.sources.folder import SAMPLE_DIR, FolderConfig, FolderSource
from digest.types import SourceCursor

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def source(path: Path) -> FolderSource:
    return FolderSource(FolderConfig(name="notes", type="folder", path=str(path)))


def test_bundled_sample_parses_into_essays_and_scored_comments() -> None:
    result = source(SAMPLE_DIR).collect(SourceCursor(), NOW)
    assert result.error is None
    assert len(result.essays) == 4
    assert all(e.title and e.published and e.author == "Mara Ellison" for e in result.essays)
    assert all(e.url.startswith("https://fieldnotes.example.org/essays/") for e in result.essays)
    assert len(result.comments) >= 24
    assert any(c.score is not None and c.score < 0 for c in result.comments)
    replies = [c for c in result.comments if c.parent_key]
    keys = {c.key for c in result.comments}
    assert replies and all(r.parent_key in keys for r in replies)


def test_essay_and_comments(tmp_path: Path) -> None:
    (tmp_path / "first.md").write_text(
        "---\ntitle: First <thoughts>\ndate: 2026-11-01\nauthor: Ann\nsummary: Short.\n---\n\nHello *world*.\n")
    (tmp_path / "first.comments.yaml").write_text(
        "- {id: 1, author: Bo, score: 4, body: 'Nice **point**', date: '2026-11-02T10:00:00'}\n"
        "- {id: 2, author: Cy, body: 'Reply', parent: 1}\n")
    result = source(tmp_path).collect(SourceCursor(), NOW)
    assert result.error is None
    (essay,) = result.essays
    assert essay.key == "first" and essay.title == "First <thoughts>"
    assert essay.url == "https://fieldnotes.example.org/essays/first"
    assert "<em>world</em>" in essay.html
    assert essay.published == datetime(2026, 11, 1, tzinfo=UTC)
    c1, c2 = result.comments
    assert (c1.key, c1.score, c1.position) == ("first#1", 4.0, 0)
    assert "<strong>point</strong>" in c1.html
    assert c1.url == "https://fieldnotes.example.org/essays/first#comment-1"
    assert c2.parent_key == "first#1" and c2.score is None


def test_missing_folder_is_an_error_value(tmp_path: Path) -> None:
    result = source(tmp_path / "nope").collect(SourceCursor(), NOW)
    assert result.error is not None and "does not exist" in result.error


def test_bad_front_matter_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.md").write_text("no front matter here")
    result = source(tmp_path).collect(SourceCursor(), NOW)
    assert result.error is not None and "bad.md: missing front matter" in result.error


def test_missing_title_and_bad_comment_rows(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("---\ndate: 2026-11-01\n---\nbody")
    assert "needs 'title'" in (source(tmp_path).collect(SourceCursor(), NOW).error or "")
    (tmp_path / "a.md").write_text("---\ntitle: A\ndate: 2026-11-01\n---\nbody")
    (tmp_path / "a.comments.yaml").write_text("- {author: x}\n")
    assert "comment 1 needs id and body" in (source(tmp_path).collect(SourceCursor(), NOW).error or "")
