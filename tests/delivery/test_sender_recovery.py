"""What a send does after things went wrong: uncertain batches resent through an idempotent
provider only while the provider still knows them and only to readers who may still get
them; errors about the account pause the send with nobody lost; per-recipient refusals that
may pass later are tried again."""

from __future__ import annotations

from datetime import timedelta

import pytest

from digest import pipeline
from digest.delivery.providers.base import UncertainDeliveryError
from digest.delivery.sender import sent_via
from digest.errors import AuthError, BlockedError, DeliveryError
from digest.store import Store
from digest.types import SendResult
from tests.conftest import NOW
from tests.delivery.test_sender import EMAILS, IdempotentProvider, app, received, sender  # noqa: F401

DEAD = "otherhost:1:dead"  # a sender on another host whose lease ran out
VIA = "resend:0123456789abcdef"  # what a batch went out through (send_batches.sent_via)


def _crash_mid_batch(a: pipeline.App, size: int = 2) -> list[str]:
    """A sender that claimed a batch of ``size`` and died before recording the answer."""
    (draft_id,) = a.store.due_drafts(a.now())
    a.store.start_send(draft_id, a.now())
    a.store.acquire_lease(f"send:{draft_id}", DEAD, a.now(), a.now() + timedelta(seconds=300))
    claimed = a.store.claim_batch(draft_id, size, DEAD, a.now(), via=sent_via(IdempotentProvider()))
    return [c.email for c in claimed]


def test_a_crashed_batch_is_resent_automatically_within_the_key_window(app: pipeline.App, clock) -> None:  # noqa: F811
    in_flight = _crash_mid_batch(app)
    clock.advance(hours=22)  # the provider still knows the key (24 h) with an hour to spare
    provider = IdempotentProvider(lose_answers=0)
    summary = sender(app, provider).run()
    assert summary.finished and summary.uncertain == 0
    assert [m.to_email for m in provider.calls[0]] == in_flight  # the same batch, first
    assert received(provider) == sorted(EMAILS)


def test_a_batch_older_than_the_key_window_is_left_for_the_operator(app: pipeline.App, clock) -> None:  # noqa: F811
    in_flight = _crash_mid_batch(app)
    clock.advance(hours=23, minutes=30)  # inside 24 h, but not by the margin the sender keeps
    provider = IdempotentProvider(lose_answers=0)
    summary = sender(app, provider).run()
    # The key may be gone by the time the batch arrives: resending could deliver it twice.
    assert received(provider) == sorted(set(EMAILS) - set(in_flight))
    assert summary.stale == 2 and summary.uncertain_total == 2 and summary.resendable == 0
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 3, "uncertain": 2}
    # The operator decides; asking to resend puts them through like any other message.
    assert app.store.resolve_uncertain(summary.draft_id, "resend", app.now()) == 2
    later = IdempotentProvider(lose_answers=0)
    assert sender(app, later).run().finished
    assert received(later) == sorted(in_flight)


def test_a_batch_with_a_reader_who_unsubscribed_since_is_not_resent(app: pipeline.App, clock) -> None:  # noqa: F811
    in_flight = _crash_mid_batch(app)
    gone = app.store.subscriber_by_email(in_flight[0])
    assert gone is not None
    app.store.set_subscriber_status(gone.id, "unsubscribed", app.now())
    clock.advance(seconds=301)
    provider = IdempotentProvider(lose_answers=0)
    summary = sender(app, provider).run()
    # Without that reader the batch is another request, which the provider would not know:
    # it stays uncertain, and the reader who left gets nothing new.
    assert in_flight[0] not in received(provider) and in_flight[1] not in received(provider)
    assert summary.stale == 2 and summary.uncertain_total == 2 and summary.resendable == 0
    assert app.store.resolve_uncertain(summary.draft_id, "resend", app.now()) == 2
    later = IdempotentProvider(lose_answers=0)
    sender(app, later).run()
    assert received(later) == [in_flight[1]]  # rule 2 at the claim: the unsubscribed is skipped


def _sending(store: Store, emails: list[str]) -> int:
    from tests.store.test_store import _sending as make

    return make(store, emails)


def test_rows_uncertain_on_their_own_keep_the_time_their_batch_first_went(store: Store) -> None:
    draft_id = _sending(store, [f"r{i}@x.org" for i in range(3)])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 3, "me", NOW, via=VIA)
    # Part of the batch is uncertain, the rest was sent (a batch sent in several calls).
    store.mark_uncertain([batch[0].ledger_id], "reset", NOW, batch)
    store.settle([SendResult(x.ledger_id, "sent", None) for x in batch[1:]], "resend", NOW, batch)
    later = NOW + timedelta(hours=30)
    assert store.uncertain_batches(draft_id, "again", later, since=later - timedelta(hours=23), via=VIA) == []
    assert store.ledger_counts(draft_id) == {"sent": 2, "uncertain": 1}
    (again,) = store.uncertain_batches(draft_id, "again", later, since=NOW, via=VIA)
    assert [x.ledger_id for x in again] == [batch[0].ledger_id]
    # Claimed again, the group still carries its first time: after another crash it is no
    # fresher than it was.
    store.mark_stale_claims_uncertain(draft_id, later)
    assert store.uncertain_batches(draft_id, "third", later, since=NOW + timedelta(minutes=1), via=VIA) == []
    assert [x.ledger_id for x in store.uncertain_batches(draft_id, "third", later, since=NOW, via=VIA)[0]] == [
        batch[0].ledger_id]


# -- errors about the account or the configuration: the send stops, nobody is lost ---------


def _fake_send_app(tmp_path, clock, srv, provider: str, **delivery):  # type: ignore[no-untyped-def]
    from tests.conftest import make_settings, past_validation

    sender_from = delivery.pop("from_", None)
    settings = make_settings(tmp_path, digest={"approval": {"required": False}}, delivery={
        "provider": provider, "api_key": "t0k", "base_url": srv.url, "batch_size": 2,
        "concurrency": 1, "max_retries": 2, "timeout": 2.0, **delivery})
    if sender_from:  # one the config refuses at load: the send still stops on it
        settings = past_validation(settings, from_=sender_from)
    a = pipeline.App.open(settings, clock)
    a.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
    pipeline.collect(a)
    pipeline.make_draft(a)
    return a


def test_a_used_up_quota_stops_the_send_and_resumes_with_everyone(tmp_path, clock) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes.provider_server import FakeProviderServer, install_resend

    with FakeProviderServer(token="t0k") as srv:
        install_resend(srv)
        a = _fake_send_app(tmp_path, clock, srv, "resend")
        srv.faults.append(("status", 429, {}, {"statusCode": 429, "name": "daily_quota_exceeded",
                                              "message": "You have reached your daily email sending quota."}))
        (first,) = pipeline.send(a)
        assert first.blocked and first.sent == 0 and not first.failed
        assert "daily quota" in (first.stopped or "") and "back in the queue" in (first.stopped or "")
        assert first.pending == 5
        assert len(srv.requests) == 1  # not retried: a quota does not pass in seconds
        counts = a.store.ledger_counts(first.draft_id)
        assert counts == {"pending": 5}, counts  # back in the queue, not failed
        clock.advance(hours=24)  # the quota resets
        (second,) = pipeline.send(a)
        assert second.finished and second.sent == 5
        assert sorted(srv.ledger_ids) == sorted(set(srv.ledger_ids)) and len(srv.ledger_ids) == 5
        a.close()


def test_a_from_address_the_providers_cannot_use_stops_the_send_with_nobody_failed(tmp_path, clock) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes.provider_server import FakeProviderServer

    with FakeProviderServer(token="t0k") as srv:
        a = _fake_send_app(tmp_path, clock, srv, "postmark", from_="Field Notes <digest@>")
        (summary,) = pipeline.send(a)
        assert summary.blocked and summary.sent == 0 and not summary.failed
        assert "newsletter.from" in (summary.stopped or "")
        assert srv.requests == [] and a.store.ledger_counts(summary.draft_id) == {"pending": 5}
        a.close()


def test_an_account_pending_approval_stops_the_send_with_nobody_failed(tmp_path, clock) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes.provider_server import FakeProviderServer

    with FakeProviderServer(token="t0k") as srv:
        a = _fake_send_app(tmp_path, clock, srv, "postmark")
        srv.faults.append(("status", 422, {}, {"ErrorCode": 412, "Message": "Your account is pending approval."}))
        (summary,) = pipeline.send(a)
        assert summary.blocked and "pending approval" in (summary.stopped or "")
        assert a.store.ledger_counts(summary.draft_id) == {"pending": 5}
        (again,) = pipeline.send(a)  # approved since
        assert again.finished and sorted(m["To"] for m in srv.messages) == sorted(EMAILS)
        a.close()


# -- messages the provider will take only later: back in the queue, sent in the same run ----


def test_messages_deferred_by_the_provider_are_sent_later_in_the_same_run(tmp_path, clock) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes.provider_server import FakeProviderServer

    with FakeProviderServer(token="t0k") as srv:
        a = _fake_send_app(tmp_path, clock, srv, "postmark", batch_size=4)
        # The first batch: its second message rate limited, its third under maintenance.
        srv.faults.append(("partial", {1: (429, "Rate limit exceeded"), 2: (100, "Maintenance")}))
        (summary,) = pipeline.send(a)
        assert summary.finished and summary.sent == 5 and not summary.failed
        assert sorted(m["To"] for m in srv.messages) == sorted(EMAILS)  # each exactly once
        assert a.store.ledger_counts(summary.draft_id) == {"sent": 5}
        a.close()


def test_a_provider_that_keeps_deferring_the_same_messages_pauses_the_send(app: pipeline.App) -> None:  # noqa: F811
    from tests.fakes.scripted_provider import ScriptedProvider

    stubborn = EMAILS[1]

    def defer_one(messages):  # type: ignore[no-untyped-def]
        return [SendResult(m.ledger_id, "deferred", None, "not sent: try later") if m.to_email == stubborn
                else SendResult(m.ledger_id, "sent", "ok") for m in messages]

    sleeps: list[float] = []
    provider = ScriptedProvider([defer_one] * 20)
    summary = sender(app, provider, sleeps).run()
    assert summary.stopped == ("paused after 3 failed batches in a row; "
                               "the next `digest send` (or the service's next send) resumes it")
    assert received(provider) == sorted(set(EMAILS) - {stubborn})
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 4, "pending": 1}
    # Asked again only after a pause that grows: the provider said "later".
    assert len(sleeps) >= 3 and sleeps == sorted(sleeps)


def test_a_dry_run_of_a_stopped_send_rehearses_what_it_has_left(app: pipeline.App) -> None:  # noqa: F811
    from tests.fakes.scripted_provider import ScriptedProvider

    quota = BlockedError("scripted: daily quota used up", hint="the send can resume once it resets")
    first = sender(app, ScriptedProvider([lambda m: None, quota])).run()  # one batch of 2, then blocked
    assert first.blocked and first.sent == 2
    left = sorted(set(EMAILS) - {m for m in EMAILS[:2]})
    gone = app.store.subscriber_by_email(left[-1])
    assert gone is not None
    app.store.set_subscriber_status(gone.id, "unsubscribed", app.now())
    counts = app.store.ledger_counts(first.draft_id)
    rehearsal = sender(app, ScriptedProvider()).dry_run()
    # The two sent are not counted again; the one who left is skipped, as a claim would.
    assert (rehearsal.sent, rehearsal.skipped, rehearsal.batches) == (2, 1, 1)
    assert app.store.ledger_counts(first.draft_id) == counts  # it looked, and wrote nothing
    resumed = ScriptedProvider()
    assert sender(app, resumed).run().sent == rehearsal.sent
    assert received(resumed) == left[:-1]


# -- a batch that may have gone out never goes back to the queue ------------------------------


class LostAnswerThen(IdempotentProvider):
    """The first call is delivered and its answer lost; the retry (same key) meets ``then``."""

    def __init__(self, then: Exception) -> None:
        super().__init__(lose_answers=0)
        self.then = then

    def send_batch(self, messages):  # type: ignore[no-untyped-def]
        self.calls.append(list(messages))
        if len(self.calls) == 1:
            self.delivered.extend(messages)
            raise UncertainDeliveryError("read timeout after sending", retryable=True)
        raise self.then


@pytest.mark.parametrize("then", [
    BlockedError("resend: HTTP 429 monthly_quota_exceeded", hint="the quota is used up"),
    AuthError("resend: HTTP 403 validation_error"),
    DeliveryError("resend: HTTP 503", retryable=True),
    DeliveryError("resend: HTTP 422 validation_error", retryable=False),
], ids=["quota", "auth", "5xx-to-the-end", "permanent"])
def test_a_refused_retry_of_a_batch_that_may_have_gone_out_leaves_it_uncertain(
        app: pipeline.App, clock, then: Exception) -> None:  # noqa: F811
    first = LostAnswerThen(then)
    summary = sender(app, first).run()
    in_flight = [m.to_email for m in first.calls[0]]
    # Not back in the queue as never sent, not failed: nobody knows, so uncertain.
    assert summary.uncertain == 2 and app.store.ledger_counts(summary.draft_id).get("uncertain") == 2
    assert sorted(m.email for m in app.store.uncertain_messages(summary.draft_id)) == sorted(in_flight)
    clock.advance(days=3)  # the provider has long forgotten the key
    later = IdempotentProvider(lose_answers=0)
    sender(app, later).run()
    assert not set(received(later)) & set(in_flight)  # no second copy without the operator


def test_an_automatic_resend_that_meets_a_quota_stays_uncertain(app: pipeline.App, clock) -> None:  # noqa: F811
    in_flight = _crash_mid_batch(app)  # the dead sender may have delivered it
    clock.advance(hours=1)

    class Quota(IdempotentProvider):
        def send_batch(self, messages):  # type: ignore[no-untyped-def]
            self.calls.append(list(messages))
            raise BlockedError("resend: HTTP 429 daily_quota_exceeded")

    first = sender(app, Quota(lose_answers=0)).run()
    assert first.blocked and "uncertain" in (first.stopped or "")
    assert first.uncertain == 2 and app.store.ledger_counts(first.draft_id) == {"uncertain": 2, "pending": 3}
    clock.advance(hours=30)  # past the key's lifetime: the batch is now the operator's to decide
    later = IdempotentProvider(lose_answers=0)
    sender(app, later).run()
    assert not set(received(later)) & set(in_flight)
