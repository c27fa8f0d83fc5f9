"""Use cases end to end on the bundled sample, through the outbox provider."""

from __future__ import annotations

import email
import email.policy
import logging
from pathlib import Path

import pytest

from digest import approval, pipeline
from digest.errors import DraftError, TokenError
from digest.types import CollectResult, Comment
from tests.conftest import FrozenClock, make_settings


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> pipeline.App:
    settings = make_settings(tmp_path, db_url, digest={"approval": {"approvers": ["author@example.org"]}})
    a = pipeline.App.open(settings, clock)
    yield a
    a.close()


def test_collect_then_draft_asks_the_approvers(app: pipeline.App, tmp_path: Path) -> None:
    (outcome,) = pipeline.collect(app)
    assert outcome.error is None and outcome.stats.new_essays == 4
    drafted = pipeline.make_draft(app)
    assert drafted.created and drafted.draft is not None
    d = drafted.draft
    assert d.status == "pending_review"
    assert [i.essay.title for i in d.items][0] == "The Quiet Pager"  # oldest first, in reading order
    assert sum(len(i.comments) for i in d.items) == 12  # ranking.max_comments
    assert all(c.comment.author != "Mara Ellison" for i in d.items for c in i.comments)
    assert drafted.notified == ("author@example.org",)
    (eml,) = (tmp_path / "outbox").rglob("*.eml")
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert msg["To"] == "author@example.org"
    assert f"digest approve {d.id}" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_drafting_twice_in_a_period_gives_the_same_draft(app: pipeline.App) -> None:
    pipeline.collect(app)
    first = pipeline.make_draft(app)
    second = pipeline.make_draft(app)
    assert not second.created and second.draft is not None and first.draft is not None
    assert second.draft.id == first.draft.id and "already covers" in second.message


def test_an_empty_period_makes_no_draft(app: pipeline.App, clock: FrozenClock) -> None:
    outcome = pipeline.make_draft(app)
    assert outcome.draft is None and "nothing new" in outcome.message
    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None and d.id is not None
    pipeline.approve(app, d.id)
    pipeline.send(app)
    clock.advance(days=7)
    pipeline.collect(app)  # nothing new in the sample
    assert pipeline.make_draft(app).draft is None


def test_approved_content_is_frozen(app: pipeline.App) -> None:
    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None and d.id is not None
    pipeline.approve(app, d.id)
    essay = d.items[0].essay
    hostile = Comment(source="sample", essay_key=essay.key, key=f"{essay.key}#999", author="Late",
                      html="<p>a late comment with a huge score</p>", score=10_000)
    app.store.record_collect(CollectResult("sample", comments=(hostile,)), app.now())
    html, _ = pipeline.preview(app, d.id, Path(app.settings.resolve("pv")))
    assert "a late comment" not in html.read_text()
    assert app.store.get_draft(d.id).content_hash == d.content_hash


def test_reject_returns_the_essays_for_a_redraft(app: pipeline.App) -> None:
    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None and d.id is not None
    pipeline.reject(app, d.id, reason="too long")
    with pytest.raises(DraftError, match="is rejected"):
        pipeline.approve(app, d.id)
    redo = pipeline.make_draft(app)
    assert redo.created and redo.draft is not None and len(redo.draft.items) == 4


def test_auto_approve(tmp_path: Path, clock: FrozenClock) -> None:
    a = pipeline.App.open(make_settings(tmp_path, digest={"approval": {"required": False}}), clock)
    pipeline.collect(a)
    outcome = pipeline.make_draft(a)
    assert outcome.draft is not None and outcome.draft.status == "approved"
    a.close()


def test_scheduled_approval_waits_for_its_time(app: pipeline.App, clock: FrozenClock) -> None:
    from datetime import timedelta

    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None and d.id is not None
    app.store.upsert_subscribers([("r@example.com", "R")], "cli", clock())
    pipeline.approve(app, d.id, at=clock() + timedelta(hours=2))
    assert pipeline.send(app) == []
    clock.advance(hours=2)
    (summary,) = pipeline.send(app)
    assert summary.sent == 1 and summary.finished


def test_deadline_skips_an_unreviewed_draft(app: pipeline.App, clock: FrozenClock) -> None:
    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None and d.id is not None
    clock.advance(hours=25)
    assert approval.apply_deadlines(app.store, app.settings, clock()) == [(d.id, "skipped")]
    assert app.store.get_draft(d.id).status == "skipped"


@pytest.mark.parametrize(("on_deadline", "outcome"), [("approve", "approved"), ("skip", "skipped")])
def test_the_first_send_after_the_deadline_applies_it(tmp_path: Path, db_url: str, clock: FrozenClock,
                                                      caplog: pytest.LogCaptureFixture, on_deadline: str,
                                                      outcome: str) -> None:
    """Under a weekly draft schedule, the send (every few minutes, or from cron) applies the
    approval deadline, not the next week's draft."""
    settings = make_settings(tmp_path, db_url, digest={"approval": {"deadline": "24h", "on_deadline": on_deadline}})
    a = pipeline.App.open(settings, clock)
    try:
        a.store.upsert_subscribers([("r@example.com", "R")], "cli", clock())
        pipeline.collect(a)
        d = pipeline.make_draft(a).draft
        assert d is not None and d.id is not None and d.status == "pending_review"
        clock.advance(hours=23)
        assert pipeline.send(a) == [] and a.store.get_draft(d.id).status == "pending_review"
        clock.advance(hours=2)
        caplog.set_level(logging.INFO, logger="digest")
        summaries = pipeline.send(a)
        after = a.store.get_draft(d.id)
        if outcome == "approved":
            (summary,) = summaries
            assert summary.sent == 1 and summary.finished and after.status == "sent"
        else:
            assert summaries == [] and after.status == "skipped"
        assert f"draft {d.id} was not reviewed before the approval deadline: {outcome}" in caplog.text
    finally:
        a.close()


def test_a_dry_run_leaves_the_deadline_to_the_send(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, digest={"approval": {"deadline": "24h", "on_deadline": "approve"}})
    a = pipeline.App.open(settings, clock)
    try:
        pipeline.collect(a)
        d = pipeline.make_draft(a).draft
        assert d is not None and d.id is not None
        clock.advance(hours=25)
        assert pipeline.send(a, dry_run=True) == []
        assert a.store.get_draft(d.id).status == "pending_review"
    finally:
        a.close()


def test_approval_tokens_bind_to_content(app: pipeline.App) -> None:
    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None
    token = approval.approval_token("k", d)
    approval.check_approval_token("k", token, d)
    changed = type(d)(**{**d.__dict__, "content_hash": "0" * 64})
    with pytest.raises(TokenError, match="different content"):
        approval.check_approval_token("k", token, changed)


def test_full_send_writes_correct_eml_files(app: pipeline.App, tmp_path: Path) -> None:
    app.store.upsert_subscribers([("ann@example.com", "Ann"), ("bo@example.org", "")], "cli", app.now())
    pipeline.collect(app)
    d = pipeline.make_draft(app).draft
    assert d is not None and d.id is not None
    pipeline.approve(app, d.id)
    (summary,) = pipeline.send(app)
    assert summary.sent == 2 and summary.finished
    assert app.store.get_draft(d.id).status == "sent"
    files = sorted((tmp_path / "outbox" / str(d.id)).glob("[1-9]*.eml"))  # 0-*: the draft-ready notice
    assert len(files) == 2
    msg = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["List-Unsubscribe"].startswith("<https://news.example.org/u/")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Message-ID"] and msg["Date"]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "12 Example Lane" in html and "/preferences/" in html and "Ann" in html
    # Nothing is sent twice.
    assert pipeline.send(app) == []
    assert len(list((tmp_path / "outbox").rglob("*.eml"))) == 3  # 2 digests + 1 draft-ready


def test_status_report(app: pipeline.App) -> None:
    pipeline.collect(app)
    report = pipeline.status(app)
    assert report.configured_sources == ["sample"]
    assert report.sources[0].essays == 4 and report.sources[0].last_error is None
    assert set(report.next_runs) == {"collect", "draft", "send"}
