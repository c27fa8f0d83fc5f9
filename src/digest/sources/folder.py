"""A folder of Markdown essays, each with an optional comments file beside it.

Layout::

    essays/2026-11-02-slow-build.md             front matter between --- lines, then Markdown
    essays/2026-11-02-slow-build.comments.yaml  a list of comments with scores

Front matter keys: ``title`` (required), ``date`` (required, ISO 8601), ``author``, ``url``,
``summary``. Comment keys: ``id`` (required, unique within the file), ``author``, ``date``,
``score``, ``body`` (Markdown, required), ``parent`` (the id it answers).

The essay's key is its file name without ``.md``; its URL is ``url`` from the front matter,
else ``base_url`` + the key. Used for local writing and for the bundled sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from digest.errors import SourceError
from digest.sources.base import Source, SourceConfig
from digest.types import CollectResult, Comment, Essay, SourceCursor

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample" / "essays"
MAX_FILE_BYTES = 2 * 1024 * 1024


class FolderConfig(SourceConfig):
    path: str
    base_url: str = "https://fieldnotes.example.org/essays/"


@dataclass(frozen=True)
class _RawFile:
    key: str
    essay_text: str
    comments_text: str | None
    essay_path: str


def _to_datetime(value: Any, where: str) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise SourceError(f"{where}: date {value!r} is not ISO 8601") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _markdown(text: str) -> str:
    # Imported on use: loading a config imports this module for FolderConfig (and the demo's
    # defaults for SAMPLE_DIR), which needs no Markdown.
    import markdown

    return str(markdown.markdown(text, extensions=["extra", "smarty"], output_format="html"))


def split_front_matter(text: str, where: str) -> tuple[dict[str, Any], str]:
    """``---\\nyaml\\n---\\nbody`` → (mapping, body)."""
    if not text.startswith("---"):
        raise SourceError(f"{where}: missing front matter (start the file with a --- line)")
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        raise SourceError(f"{where}: front matter is not closed by a --- line")
    head = parts[0][3:]
    body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    try:
        meta = yaml.safe_load(head) or {}
    except yaml.YAMLError as exc:
        raise SourceError(f"{where}: front matter is not valid YAML: {exc}") from exc
    if not isinstance(meta, dict):
        raise SourceError(f"{where}: front matter must be a mapping")
    return meta, body


class FolderSource(Source):
    """Markdown essays and YAML comments from a local folder."""

    type_name = "folder"
    config_model = FolderConfig
    config: FolderConfig

    def fetch(self, cursor: SourceCursor, now: datetime) -> list[_RawFile]:
        root = Path(self.config.path).expanduser()
        if not root.is_dir():
            raise SourceError(f"folder {root} does not exist")
        files: list[_RawFile] = []
        for path in sorted(root.glob("*.md")):
            if path.stat().st_size > MAX_FILE_BYTES:
                raise SourceError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            key = path.stem
            comments_path = path.with_name(f"{key}.comments.yaml")
            files.append(
                _RawFile(
                    key=key,
                    essay_text=path.read_text(encoding="utf-8", errors="replace"),
                    comments_text=comments_path.read_text(encoding="utf-8", errors="replace")
                    if comments_path.exists()
                    else None,
                    essay_path=str(path),
                )
            )
        return files

    def parse(self, raw: list[_RawFile], now: datetime) -> CollectResult:
        essays: list[Essay] = []
        comments: list[Comment] = []
        base = self.config.base_url.rstrip("/") + "/"
        for item in raw:
            meta, body = split_front_matter(item.essay_text, item.essay_path)
            for required in ("title", "date"):
                if not meta.get(required):
                    raise SourceError(f"{item.essay_path}: front matter needs {required!r}")
            url = str(meta.get("url") or f"{base}{item.key}")
            essays.append(
                Essay(
                    source=self.name,
                    key=item.key,
                    url=url,
                    title=str(meta["title"]),
                    html=_markdown(body),
                    summary=str(meta.get("summary") or ""),
                    author=str(meta.get("author") or ""),
                    published=_to_datetime(meta["date"], item.essay_path),
                )
            )
            if item.comments_text is None:
                continue
            where = item.essay_path.removesuffix(".md") + ".comments.yaml"
            try:
                rows = yaml.safe_load(item.comments_text) or []
            except yaml.YAMLError as exc:
                raise SourceError(f"{where}: not valid YAML: {exc}") from exc
            if not isinstance(rows, list):
                raise SourceError(f"{where}: must be a list of comments")
            for position, row in enumerate(rows):
                if not isinstance(row, dict) or "id" not in row or "body" not in row:
                    raise SourceError(f"{where}: comment {position + 1} needs id and body")
                cid = str(row["id"])
                score = row.get("score")
                comments.append(
                    Comment(
                        source=self.name,
                        essay_key=item.key,
                        key=f"{item.key}#{cid}",
                        author=str(row.get("author") or ""),
                        html=_markdown(str(row["body"])),
                        url=f"{url}#comment-{cid}",
                        score=float(score) if score is not None else None,
                        published=_to_datetime(row.get("date"), where),
                        parent_key=f"{item.key}#{row['parent']}" if row.get("parent") is not None else None,
                        position=position,
                    )
                )
        return CollectResult(source=self.name, essays=tuple(essays), comments=tuple(comments))
