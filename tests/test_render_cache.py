"""Drafts are compiled when made; previews, reviews and sends use that stored result while
the templates and settings it was made from are unchanged, and compile again otherwise."""

from __future__ import annotations

import email
import email.policy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from digest import pipeline
from digest.errors import RenderError
from digest.render import compose
from digest.render.cache import bundled_templates_dir
from digest.render.fill import CompiledEmail
from digest.store.schema import compiled_drafts
from digest.types import Draft
from tests.conftest import FrozenClock, make_settings


class CompileSpy:
    """Counts compile_draft calls (the real one still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = compose.compile_draft

        def spy(*args: Any, **kwargs: Any) -> CompiledEmail:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(compose, "compile_draft", spy)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> CompileSpy:
    return CompileSpy(monkeypatch)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """An override folder holding a copy of the bundled text template."""
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "digest.txt.j2").write_text((bundled_templates_dir() / "digest.txt.j2").read_text())
    return folder


@pytest.fixture
def open_app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[Callable[..., pipeline.App]]:
    apps: list[pipeline.App] = []

    def make(**overrides: Any) -> pipeline.App:
        app = pipeline.App.open(make_settings(tmp_path, db_url, **overrides), clock)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def _drafted(app: pipeline.App) -> Draft:
    app.store.upsert_subscribers([("ann@example.com", "Ann")], "cli", app.now())
    pipeline.collect(app)
    draft = pipeline.make_draft(app).draft
    assert draft is not None and draft.id is not None
    return draft


def _stored(app: pipeline.App, draft_id: int) -> list[tuple[str, str]]:
    with app.store.engine.connect() as conn:
        rows = conn.execute(select(compiled_drafts.c.render_key, compiled_drafts.c.compiled)
                            .where(compiled_drafts.c.draft_id == draft_id)).all()
    return [(r[0], r[1]) for r in rows]


def _sent_text(tmp_path: Path, draft_id: int) -> str:
    (eml,) = (tmp_path / "outbox" / str(draft_id)).glob("[1-9]*.eml")
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    return str(msg.get_body(("plain",)).get_content())  # type: ignore[union-attr]


def test_a_draft_is_compiled_once_when_made_and_sent_as_stored(
    open_app: Callable[..., pipeline.App], compiles: CompileSpy, tmp_path: Path
) -> None:
    app = open_app()
    draft = _drafted(app)
    assert draft.id is not None
    assert compiles.calls == 1
    ((key, text),) = _stored(app, draft.id)
    stored = CompiledEmail.from_json(text)
    # The review page, the preview and the send all use it: nothing compiles again.
    token = pipeline.approval.approval_token(app.secret, draft)
    review = pipeline.review_html(app, draft.id, token)
    html_path, _ = pipeline.preview(app, draft.id, tmp_path / "pv")
    pipeline.approve(app, draft.id)
    (summary,) = pipeline.send(app)
    assert summary.sent == 1
    assert compiles.calls == 1
    assert review == html_path.read_text()
    assert pipeline.compile_for(app, app.store.get_draft(draft.id)) == stored
    assert _stored(app, draft.id) == [(key, text)]


def test_a_changed_template_compiles_again_and_is_what_goes_out(
    open_app: Callable[..., pipeline.App], compiles: CompileSpy, templates: Path, tmp_path: Path
) -> None:
    app = open_app(templates=str(templates))
    draft = _drafted(app)
    assert draft.id is not None
    ((first_key, _),) = _stored(app, draft.id)
    pipeline.approve(app, draft.id)
    with (templates / "digest.txt.j2").open("a") as f:
        f.write("Edited after the draft was made.\n")
    (summary,) = pipeline.send(app)
    assert summary.sent == 1 and compiles.calls == 2
    assert "Edited after the draft was made." in _sent_text(tmp_path, draft.id)
    ((key, _),) = _stored(app, draft.id)  # the new result replaced the old one
    assert key != first_key


def test_changed_settings_compile_again(
    open_app: Callable[..., pipeline.App], compiles: CompileSpy, tmp_path: Path
) -> None:
    app = open_app()
    draft = _drafted(app)
    assert draft.id is not None and compiles.calls == 1
    moved = open_app(newsletter={"public_url": "https://news.example.org",
                                 "postal_address": "Field Notes, 99 New Street, Shelbyville"})
    html_path, _ = pipeline.preview(moved, draft.id, tmp_path / "pv")
    assert compiles.calls == 2 and "99 New Street" in html_path.read_text()
    pipeline.preview(moved, draft.id, tmp_path / "pv")
    assert compiles.calls == 2  # and that result is reused in turn


@pytest.mark.parametrize("damage", ["{not json", '{"format": 0, "subject": "old"}', ""])
def test_a_damaged_or_outdated_stored_copy_compiles_again(
    open_app: Callable[..., pipeline.App], compiles: CompileSpy, tmp_path: Path, damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = open_app()
    draft = _drafted(app)
    assert draft.id is not None
    ((key, good),) = _stored(app, draft.id)
    with app.store.engine.begin() as conn:
        conn.execute(update(compiled_drafts).values(compiled=damage))
    pipeline.approve(app, draft.id)
    with caplog.at_level(logging.WARNING, logger="digest.pipeline"):
        (summary,) = pipeline.send(app)
    assert summary.sent == 1 and compiles.calls == 2
    assert "compiling it again" in caplog.text
    assert "Ann" in _sent_text(tmp_path, draft.id)
    ((again_key, again),) = _stored(app, draft.id)
    assert again_key == key and CompiledEmail.from_json(again) == CompiledEmail.from_json(good)


def test_a_broken_template_does_not_stop_the_drafting(
    open_app: Callable[..., pipeline.App], templates: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (templates / "digest.txt.j2").write_text("{% if %}\n")
    app = open_app(templates=str(templates))
    with caplog.at_level(logging.WARNING, logger="digest.pipeline"):
        draft = _drafted(app)
    assert draft.id is not None and "could not compile it yet" in caplog.text
    assert _stored(app, draft.id) == []
    # Previewing (and sending) reports the template error, as it always did.
    with pytest.raises(RenderError, match="digest.txt.j2"):
        pipeline.preview(app, draft.id, tmp_path / "pv")
    (templates / "digest.txt.j2").write_text((bundled_templates_dir() / "digest.txt.j2").read_text())
    pipeline.preview(app, draft.id, tmp_path / "pv")
    assert len(_stored(app, draft.id)) == 1


def test_storing_is_idempotent_and_ignores_unknown_drafts(open_app: Callable[..., pipeline.App]) -> None:
    app = open_app()
    draft = _drafted(app)
    assert draft.id is not None
    ((key, text),) = _stored(app, draft.id)
    # Two processes storing the same result at once: the second finds it there.
    app.store.save_compiled_draft(draft.id, key, text, app.now())
    assert app.store.compiled_draft(draft.id, key) == text
    assert app.store.compiled_draft(draft.id, "0" * 64) is None
    app.store.save_compiled_draft(draft.id + 100, key, text, app.now())  # no such draft: not stored
    with app.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(compiled_drafts)).scalar_one() == 1
