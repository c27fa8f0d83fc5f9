"""The compiled digest as stored with its draft (JSON), and the key it is stored under."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from digest.config import Newsletter
from digest.render import compile_draft, personalize
from digest.render.cache import bundled_templates_dir, render_key
from digest.render.fill import JSON_FORMAT, CompiledEmail
from digest.types import Draft

DraftFactory = Callable[..., Draft]
URLS = {"unsubscribe_url": "https://x.org/u/t", "preferences_url": "https://x.org/p/t"}


def test_json_round_trip_fills_in_exactly_as_the_original(make_draft: DraftFactory, newsletter: Newsletter) -> None:
    draft = make_draft(intro="“Curly” quotes, a dash — and 李.")
    compiled = compile_draft(draft, newsletter)
    again = CompiledEmail.from_json(compiled.to_json())
    assert again == compiled
    for name in ("Ann", "Zoë <b>", "李", ""):
        assert personalize(again, name=name, **URLS) == personalize(compiled, name=name, **URLS)
    # Stored as ASCII JSON, so any database text column takes it as it is.
    assert compiled.to_json().isascii()
    # The HTML stays one byte per character after the round trip (see compose._narrow_html).
    assert all(part.isascii() or max(part) <= "\xff" for part in again.html_parts)


def _valid() -> dict[str, object]:
    return {"format": JSON_FORMAT, "subject": "S", "preheader": "P", "html_parts": ["<p>", "</p>"],
            "html_slots": ["name"], "text_parts": ["Hi ", "\n"], "text_slots": ["name"]}


@pytest.mark.parametrize("text", [
    "",
    "{not json",
    "[]",
    json.dumps({**_valid(), "format": JSON_FORMAT + 1}),
    json.dumps({k: v for k, v in _valid().items() if k != "format"}),
    json.dumps({**_valid(), "subject": None}),
    json.dumps({**_valid(), "html_parts": ["only one part"]}),
    json.dumps({**_valid(), "html_slots": ["shoe_size"]}),
    json.dumps({**_valid(), "text_parts": "Hi \n"}),
    json.dumps({**_valid(), "text_parts": ["Hi ", 3]}),
])
def test_anything_but_a_compiled_digest_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        CompiledEmail.from_json(text)


def test_a_valid_document_loads() -> None:
    compiled = CompiledEmail.from_json(json.dumps(_valid()))
    assert personalize(compiled, name="Ann", **URLS) == ("<p>Ann</p>", "Hi Ann\n")


def test_the_key_follows_what_the_compile_reads(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    draft = replace(make_draft(), id=7)
    key = render_key(draft, newsletter, None)
    assert key is not None and len(key) == 64
    assert render_key(draft, newsletter, None) == key  # the same inputs, the same key
    # Approval and sending change a draft's status and times, not what it renders to.
    assert render_key(replace(draft, status="sending", content_hash="x"), newsletter, None) == key
    # Content, the draft's id, the newsletter settings: each changes the key.
    changed = {
        render_key(replace(draft, subject="Another subject"), newsletter, None),
        render_key(replace(draft, intro="A new intro."), newsletter, None),
        render_key(replace(draft, items=draft.items[:1]), newsletter, None),
        render_key(replace(draft, id=8), newsletter, None),
        render_key(draft, newsletter.model_copy(update={"postal_address": "Elsewhere 1"}), None),
        render_key(draft, newsletter.model_copy(update={"timezone": "UTC"}), None),
    }
    assert key not in changed and len(changed) == 6
    # An override folder: its files count, file by file, before the bundled ones.
    folder = tmp_path / "templates"
    folder.mkdir()
    empty = render_key(draft, newsletter, str(folder))
    (folder / "digest.txt.j2").write_text("{{ slots.unsubscribe_url }}\n")
    one = render_key(draft, newsletter, str(folder))
    (folder / "digest.txt.j2").write_text("{{ slots.unsubscribe_url }} \n")
    edited = render_key(draft, newsletter, str(folder))
    (folder / "partials").mkdir()
    (folder / "partials" / "footer.j2").write_text("x")
    nested = render_key(draft, newsletter, str(folder))
    assert len({key, empty, one, edited, nested}) == 5
    # A folder that is not there gives no key: the compile reports it.
    assert render_key(draft, newsletter, str(tmp_path / "missing")) is None


def test_the_bundled_templates_count_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    from digest.render import cache

    draft = replace(make_draft(), id=1)
    key = render_key(draft, newsletter, None)
    copy = tmp_path / "bundled"
    copy.mkdir()
    for path in bundled_templates_dir().iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(cache, "bundled_templates_dir", lambda: copy)
    assert render_key(draft, newsletter, None) == key  # the same files, wherever they are
    (copy / "digest.mjml.j2").write_text((copy / "digest.mjml.j2").read_text() + "\n")
    assert render_key(draft, newsletter, None) != key
