"""The "draft ready for review" email sent to approvers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from digest.config import Newsletter
from digest.errors import RenderError
from digest.render import compile_draft_ready
from digest.types import Draft, DraftItem, Essay

DraftFactory = Callable[..., Draft]
REVIEW = "https://fieldnotes.example.org/drafts/7?token=abc&x=1"


def test_draft_ready_lists_essays_counts_and_how_to_approve(
    make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    subject, html, text = compile_draft_ready(
        make_draft(comment_counts=(2, 1, 0)), newsletter, REVIEW
    )
    assert subject == "Draft ready for review: Field Notes: the slow build"
    assert 'href="https://fieldnotes.example.org/drafts/7?token=abc&amp;x=1"' in html
    assert "digest approve 7" in html and "digest approve 7" in text
    assert f"Review the draft: {REVIEW}" in text
    for needle in (
        "Essay e1",
        "(2 comments)",
        "Essay e2",
        "(1 comment)",
        "Essay e3",
        "(0 comments)",
    ):
        assert needle in html and needle in text
    assert "3 essays, 3 comments" in text
    assert "Field Notes: the slow build" in html
    assert "<mj-" not in html and "fonts.googleapis" not in html
    assert "\n\n\n" not in text


def test_preview_text_is_shown(make_draft: DraftFactory, newsletter: Newsletter) -> None:
    _, html, text = compile_draft_ready(
        make_draft(), newsletter, REVIEW, preview_text="Custom\npreview"
    )
    assert "Preview: Custom preview" in text
    assert "Custom preview" in html


def test_hostile_titles_are_escaped_and_missing_id_is_handled(
    make_draft: DraftFactory, essay_factory: Callable[..., Essay], newsletter: Newsletter
) -> None:
    essay = essay_factory("x", title="</mj-text><script>alert(1)</script>{{ 1 + 1 }}")
    draft = make_draft(items=(DraftItem(essay=essay),), id=None, subject="S\r\nBcc: a@b.c")
    subject, html, text = compile_draft_ready(draft, newsletter, REVIEW)
    assert subject == "Draft ready for review: S Bcc: a@b.c"
    assert (
        "<script" not in html and "&lt;/mj-text&gt;&lt;script&gt;" in html and "{{ 1 + 1 }}" in html
    )
    assert "digest approve &lt;id&gt;" in html and "digest approve <id>" in text
    assert "</mj-text><script>alert(1)</script>{{ 1 + 1 }}" in text


@pytest.mark.parametrize("bad", ["javascript:alert(1)", "/drafts/7", "", "mailto:a@b.c"])
def test_review_url_must_be_http(
    make_draft: DraftFactory, newsletter: Newsletter, bad: str
) -> None:
    with pytest.raises(RenderError, match="review URL"):
        compile_draft_ready(make_draft(), newsletter, bad)


def test_draft_ready_override_errors_name_the_template(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    (tmp_path / "draft_ready.mjml.j2").write_text("<mjml><mj-body>")
    with pytest.raises(RenderError, match=r"MJML compile of draft_ready\.mjml\.j2"):
        compile_draft_ready(make_draft(), newsletter, REVIEW, templates_dir=str(tmp_path))
