"""A sender taken for stopped while it still works: its late verdicts change nothing.

A restart after ``kill -9`` of a send's parent process takes the lease at once (its holder
is gone) and marks the batches in flight uncertain. A helper process of the killed parent
may still be in the middle of its batch; whatever it learns afterwards (the provider said
503, or accepted) must not put the batch back in the queue of a draft already finished,
nor overwrite what the new sender recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from digest import pipeline
from digest.delivery.sender import Sender
from digest.errors import DeliveryError, TakenOverError
from digest.store import Store
from digest.types import SendResult
from tests.conftest import NOW, FrozenClock, make_settings
from tests.fakes.scripted_provider import ScriptedProvider

EMAILS = [f"r{i}@example.com" for i in range(5)]


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> pipeline.App:
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 0, "rate_per_second": 1000, "concurrency": 1})
    a = pipeline.App.open(settings, clock)
    a.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
    pipeline.collect(a)
    assert pipeline.make_draft(a).draft is not None
    yield a
    a.close()


def _sender(app: pipeline.App, provider: ScriptedProvider) -> Sender:
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    return Sender(app.store, provider, app.settings, draft, pipeline.compile_for(app, draft), app.link_pair,
                  now=app.now, sleep=lambda s: None)


def _started(store: Store, draft_id: int) -> None:
    assert store.start_send(draft_id, NOW) == len(EMAILS)


@pytest.mark.parametrize("late", ["settle", "release", "mark_uncertain", "settle_rows"])
def test_a_late_verdict_on_a_batch_marked_uncertain_by_another_sender_changes_nothing(
        app: pipeline.App, late: str) -> None:
    (draft_id,) = app.store.due_drafts(app.now())
    _started(app.store, draft_id)
    batch = app.store.claim_batch(draft_id, 2, "old-helper", NOW)
    assert batch.token == "old-helper"
    # The restart: the batch was in flight when its sender's parent died.
    assert app.store.mark_stale_claims_uncertain(draft_id, NOW) == 2
    counts = app.store.ledger_counts(draft_id)
    ids = [c.ledger_id for c in batch]
    with pytest.raises(TakenOverError, match="taken over by another sender"):
        if late == "settle":
            app.store.settle([SendResult(i, "sent", "m") for i in ids], "scripted", NOW, batch)
        elif late == "settle_rows":
            app.store.settle([SendResult(i, "sent", f"m{i}") for i in ids], "scripted", NOW, batch)
        elif late == "release":
            app.store.release(ids, "HTTP 503", NOW, batch)
        else:
            app.store.mark_uncertain(ids, "timed out", NOW, batch)
    assert app.store.ledger_counts(draft_id) == counts == {"uncertain": 2, "pending": 3}


def test_a_late_verdict_after_another_sender_claimed_the_batch_again_changes_nothing(app: pipeline.App) -> None:
    (draft_id,) = app.store.due_drafts(app.now())
    _started(app.store, draft_id)
    batch = app.store.claim_batch(draft_id, 2, "old", NOW, via="resend:k")
    app.store.mark_stale_claims_uncertain(draft_id, NOW)
    (again,) = app.store.uncertain_batches(draft_id, "new", NOW, via="resend:k")  # an idempotent provider's resend
    with pytest.raises(TakenOverError):
        app.store.release([c.ledger_id for c in batch], "HTTP 503", NOW, batch)
    app.store.settle([SendResult(c.ledger_id, "sent", "m") for c in again], "scripted", NOW, again)
    assert app.store.ledger_counts(draft_id) == {"sent": 2, "pending": 3}


def test_a_sender_whose_batch_is_taken_over_mid_call_stops_and_the_finished_draft_stays_finished(
        app: pipeline.App) -> None:
    """The case found on PostgreSQL: the parent killed, the restart finishing the draft while
    a helper's call was out; the helper's 503 then put its batch back in a `sent` draft's
    queue, where nothing would ever send it."""
    (draft_id,) = app.store.due_drafts(app.now())
    other = ScriptedProvider()

    def restart_meanwhile(messages):  # type: ignore[no-untyped-def]
        # Another sender (the restart) takes over while this call is out: it marks this batch
        # uncertain and sends the rest.
        restart = _sender(app, other)
        restart.store.mark_stale_claims_uncertain(draft_id, app.now())
        restart.work()
        raise DeliveryError("HTTP 503", retryable=True, status=503)

    first = _sender(app, ScriptedProvider([restart_meanwhile]))
    with pytest.raises(TakenOverError):
        first.run()
    assert len(other.delivered) == 3
    counts = app.store.ledger_counts(draft_id)
    assert counts == {"uncertain": 2, "sent": 3}  # not put back in the queue
    # Nobody is left behind unseen: the operator's resolution reaches the two.
    assert app.store.resolve_uncertain(draft_id, "resend", app.now()) == 2
    assert app.store.pending_count(draft_id) == 2


def test_a_sender_that_finds_the_draft_finished_once_it_holds_the_lease_has_nothing_to_send(
        app: pipeline.App) -> None:
    """Two senders meet at the end of a send: the second read the draft as `sending`, the
    first finished it and let go of the lease, the second took it."""
    (draft_id,) = app.store.due_drafts(app.now())
    late = _sender(app, ScriptedProvider())
    take = app.store.acquire_lease

    def finish_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        app.store.acquire_lease = take  # type: ignore[method-assign]
        done = _sender(app, ScriptedProvider()).run()
        assert done.finished and done.sent == 5
        return take(*args, **kwargs)

    app.store.acquire_lease = finish_first  # type: ignore[method-assign]
    summary = late.run()
    assert summary.stopped == f"draft {draft_id} is sent; nothing to send" and summary.sent == 0
    assert app.store.get_draft(draft_id).status == "sent"


def test_a_sender_that_lost_its_lease_stops(app: pipeline.App, clock: FrozenClock) -> None:
    """A retry long enough for the lease to run out, and another sender took it."""
    from digest.delivery.sender import LEASE_SECONDS

    (draft_id,) = app.store.due_drafts(app.now())

    def lease_taken(messages):  # type: ignore[no-untyped-def]
        clock.advance(seconds=LEASE_SECONDS + 1)
        assert app.store.acquire_lease(f"send:{draft_id}", "elsewhere:1:x", clock(),
                                       clock() + (clock() - NOW))
        return None  # accepted

    provider = ScriptedProvider([lease_taken])
    with pytest.raises(TakenOverError, match="lease"):
        _sender(app, provider).run()
    assert len(provider.calls) == 1  # no batch after the lease was gone
    assert app.store.ledger_counts(draft_id) == {"sent": 2, "pending": 3}


def test_a_long_retry_wait_renews_the_lease(tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    """Five Retry-After minutes outlast the lease; another `digest serve` must not find it run
    out and take the draft over while this sender waits to retry (rule 3)."""
    from digest.delivery.sender import LEASE_SECONDS

    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 5, "rate_per_second": 1000, "concurrency": 1})
    app = pipeline.App.open(settings, clock)
    try:
        app.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
        pipeline.collect(app)
        assert pipeline.make_draft(app).draft is not None
        (draft_id,) = app.store.due_drafts(app.now())
        started = clock()
        seen: list[bool] = []

        def lease_still_held(messages):  # type: ignore[no-untyped-def]
            lease = app.store.lease(f"send:{draft_id}")
            assert lease is not None and lease[1] is not None
            seen.append(lease[1] > clock())
            return None

        busy = [DeliveryError("HTTP 429", retryable=True, status=429, retry_after=60) for _ in range(5)]
        provider = ScriptedProvider([*busy, lease_still_held])
        draft = app.store.get_draft(draft_id)
        sender = Sender(app.store, provider, app.settings, draft, pipeline.compile_for(app, draft), app.link_pair,
                        now=app.now, sleep=lambda s: clock.advance(seconds=s))
        summary = sender.run()
        assert summary.finished and summary.sent == 5
        assert (clock() - started).total_seconds() > LEASE_SECONDS  # the waits outlasted a lease
        assert seen == [True]
    finally:
        app.close()


def test_a_send_time_given_in_another_timezone_is_kept_as_that_instant(app: pipeline.App) -> None:
    """`digest approve --at` in New York: stored as the instant it names, so the draft is not
    due a minute before it (SQLite dropped the offset and read local time as UTC)."""
    from datetime import UTC, timedelta
    from zoneinfo import ZoneInfo

    from digest.approval import approve
    from digest.types import Draft

    (draft_id,) = app.store.due_drafts(app.now())
    first = app.store.get_draft(draft_id)
    other, _ = app.store.create_draft(Draft("later-period", first.subject, "", first.items), [], app.now(),
                                      status="pending_review")
    assert other.id is not None
    at = (app.now() + timedelta(hours=2)).astimezone(ZoneInfo("America/New_York"))
    approve(app.store, other.id, app.now(), at=at)
    utc = at.astimezone(UTC)  # the service's clock is UTC
    assert other.id not in app.store.due_drafts(utc - timedelta(minutes=1))
    assert other.id in app.store.due_drafts(utc)
