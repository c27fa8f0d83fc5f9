"""The send loop against a scripted provider: exactly-once under every failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from digest import pipeline
from digest.delivery.providers.base import UncertainDeliveryError
from digest.delivery.sender import Sender, SendSummary, TokenBucket, sent_via
from digest.errors import AuthError, BlockedError, DeliveryError, DraftError, StoreError, TakenOverError
from digest.store import Store
from digest.types import SLOT_NAMES, Draft, OutgoingMessage, SendResult
from tests.conftest import FrozenClock, make_settings
from tests.fakes.scripted_provider import ScriptedProvider

EMAILS = [f"r{i}@example.com" for i in range(5)]


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> pipeline.App:
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 2, "rate_per_second": 1000, "concurrency": 1})
    a = pipeline.App.open(settings, clock)
    a.store.upsert_subscribers([(e, f"Name {i}") for i, e in enumerate(EMAILS)], "cli", clock())
    pipeline.collect(a)
    outcome = pipeline.make_draft(a)
    assert outcome.draft is not None and outcome.draft.status == "approved"
    yield a
    a.close()


def sender(app: pipeline.App, provider: ScriptedProvider, sleeps: list[float] | None = None) -> Sender:
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    return Sender(app.store, provider, app.settings, draft, pipeline.compile_for(app, draft), app.link_pair,
                  now=app.now, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def received(provider: ScriptedProvider) -> list[str]:
    return sorted(m.to_email for m in provider.delivered)


def test_sends_everyone_once_in_provider_sized_batches(app: pipeline.App) -> None:
    provider = ScriptedProvider()
    summary = sender(app, provider).run()
    assert summary.sent == 5 and summary.finished
    assert [len(c) for c in provider.calls] == [2, 2, 1]
    assert received(provider) == sorted(EMAILS)
    msg = provider.delivered[0]
    headers = dict(msg.headers)
    assert headers["List-Unsubscribe"].startswith("<https://news.example.org/u/")
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Name 0" in msg.html and "/u/" in msg.html and "/preferences/" in msg.text
    # Running again sends nothing: the draft is sent and the ledger remembers.
    assert app.store.due_drafts(app.now()) == []
    again = ScriptedProvider()
    rerun = Sender(app.store, again, app.settings, app.store.get_draft(summary.draft_id),
                   pipeline.compile_for(app, app.store.get_draft(summary.draft_id)), app.link_pair, now=app.now).run()
    assert rerun.sent == 0 and again.calls == []
    assert rerun.stopped == f"draft {summary.draft_id} is sent; nothing to send"


def test_retryable_errors_are_retried_with_backoff(app: pipeline.App) -> None:
    sleeps: list[float] = []
    provider = ScriptedProvider([DeliveryError("HTTP 503", retryable=True, status=503),
                                 DeliveryError("HTTP 429", retryable=True, status=429, retry_after=7)])
    summary = sender(app, provider, sleeps).run()
    assert summary.sent == 5 and summary.finished
    assert received(provider) == sorted(EMAILS)
    assert 0.5 <= sleeps[0] <= 0.5 * 1.25 and 7 <= sleeps[1] <= 7 * 1.25


def test_exhausted_retries_pause_and_resume_without_duplicates(app: pipeline.App) -> None:
    outage = [DeliveryError("HTTP 500", retryable=True, status=500) for _ in range(3)]
    first = ScriptedProvider(outage)
    summary = sender(app, first).run()
    assert summary.sent == 0 and not summary.finished and summary.stopped and "resume" in summary.stopped
    assert app.store.ledger_counts(summary.draft_id) == {"pending": 5}
    second = ScriptedProvider()
    resumed = sender(app, second).run()
    assert resumed.sent == 5 and resumed.finished
    assert received(first) == [] and received(second) == sorted(EMAILS)


def test_auth_error_stops_with_a_clear_message(app: pipeline.App) -> None:
    provider = ScriptedProvider([AuthError("HTTP 401: bad token", status=401)])
    summary = sender(app, provider).run()
    assert summary.stopped and "refused the credentials" in summary.stopped
    assert "back in the queue" in summary.stopped and summary.pending == 5
    assert len(provider.calls) == 1
    assert app.store.ledger_counts(summary.draft_id) == {"pending": 5}


def test_an_auth_error_names_the_settings_its_provider_needs(app: pipeline.App) -> None:
    """SES signs with AWS keys and SMTP logs in: the stop names what the error's hint names,
    never an API key those providers do not have."""
    hint = "check delivery.aws_access_key_id, delivery.aws_secret_access_key and delivery.region"
    provider = ScriptedProvider([AuthError("ses: HTTP 403 SignatureDoesNotMatch", status=403, hint=hint)])
    summary = sender(app, provider).run()
    assert summary.stopped and hint in summary.stopped and "api_key" not in summary.stopped


@pytest.mark.parametrize("error", ["HTTP 400: bad request", "sendgrid: HTTP 400: bad request"])
def test_permanent_error_fails_the_batch_and_moves_on(app: pipeline.App, error: str) -> None:
    """Counted by what went wrong, with or without the provider's name in front."""
    provider = ScriptedProvider([DeliveryError(error, retryable=False, status=400)])
    summary = sender(app, provider).run()
    assert summary.failed == {"HTTP 400": 2} and summary.sent == 3 and summary.finished
    assert len(provider.calls) == 3


def test_uncertain_batch_is_never_resent_silently(app: pipeline.App) -> None:
    provider = ScriptedProvider([UncertainDeliveryError("read timeout after sending", retryable=True)])
    summary = sender(app, provider).run()
    assert summary.uncertain == 2 and summary.sent == 3 and summary.finished
    counts = app.store.ledger_counts(summary.draft_id)
    assert counts == {"sent": 3, "uncertain": 2}
    # An operator decides: resend puts them back, and only they are sent.
    assert pipeline.resolve_uncertain(app, summary.draft_id, "resend") == pipeline.Resolution(2)
    again = ScriptedProvider()
    resent = sender(app, again).run()
    assert resent.sent == 2 and len(again.delivered) == 2


def test_resolving_waits_for_a_sender_at_work_on_the_draft(app: pipeline.App) -> None:
    """Resolution takes the send's lease: while another live sender holds it, it refuses and
    changes nothing; afterwards it resolves and lets the lease go for the next send."""
    provider = ScriptedProvider([UncertainDeliveryError("read timeout after sending", retryable=True)])
    summary = sender(app, provider).run()
    lease = f"send:{summary.draft_id}"
    assert app.store.acquire_lease(lease, "elsewhere:1:abc", app.now(), app.now() + timedelta(minutes=5))
    with pytest.raises(DraftError, match="being sent by another process"):
        pipeline.resolve_uncertain(app, summary.draft_id, "resend")
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 3, "uncertain": 2}
    app.store.release_lease(lease, "elsewhere:1:abc")
    assert pipeline.resolve_uncertain(app, summary.draft_id, "resend") == pipeline.Resolution(2)
    assert sender(app, ScriptedProvider()).run().sent == 2  # the lease is free again


def test_per_message_results_are_applied_one_by_one(app: pipeline.App) -> None:
    def mixed(messages):  # type: ignore[no-untyped-def]
        return [SendResult(messages[0].ledger_id, "sent", "ok"),
                SendResult(messages[1].ledger_id, "suppressed", None, "inactive recipient")]

    provider = ScriptedProvider([mixed])
    summary = sender(app, provider).run()
    assert summary.sent == 4 and summary.failed == {"suppressed": 1}
    suppressed_email = provider.calls[0][1].to_email
    sub = app.store.subscriber_by_email(suppressed_email)
    assert sub is not None and sub.status == "bounced"  # the provider's list, not the reader's choice


def test_unsubscribe_during_send_is_honoured_at_claim(app: pipeline.App) -> None:
    def unsubscribe_later(messages):  # type: ignore[no-untyped-def]
        sub = app.store.subscriber_by_email(EMAILS[4])
        assert sub is not None
        app.store.set_subscriber_status(sub.id, "unsubscribed", app.now())

    provider = ScriptedProvider([unsubscribe_later])
    summary = sender(app, provider).run()
    assert EMAILS[4] not in received(provider)
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 4, "skipped": 1}
    # The run's summary (and its progress) counts the reader skipped: the numbers add up.
    assert summary.skipped == 1 and summary.done == summary.total == 5


def test_a_helper_process_reports_the_readers_it_skipped(app: pipeline.App) -> None:
    s = sender(app, ScriptedProvider())
    summary = SendSummary(1, total=10)
    before = SendSummary(1).tally()
    helper = SendSummary(1, sent=3, skipped=2, batches=1)
    s._add(summary, before, helper.tally())
    assert summary.skipped == 2 and summary.done == 5


def test_store_failure_stops_at_once_and_leaves_rows_uncertain(app: pipeline.App,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    provider = ScriptedProvider()
    s = sender(app, provider)
    original = Store.settle

    def broken(self, results, provider_name, now, batch=None):  # type: ignore[no-untyped-def]
        raise StoreError("disk full")

    monkeypatch.setattr(Store, "settle", broken)
    with pytest.raises(StoreError):
        s.run()
    assert len(provider.calls) == 1  # stopped after the first batch (rule 9)
    monkeypatch.setattr(Store, "settle", original)
    later = ScriptedProvider()
    summary = sender(app, later).run()
    counts = app.store.ledger_counts(summary.draft_id)
    assert counts == {"uncertain": 2, "sent": 3}
    assert not {m.to_email for m in later.delivered} & {m.to_email for m in provider.delivered}


def test_dry_run_sends_and_writes_nothing(app: pipeline.App) -> None:
    provider = ScriptedProvider()
    summary = sender(app, provider).dry_run()
    assert summary.dry_run and summary.sent == 5 and summary.batches == 3
    assert provider.calls == []
    (draft_id,) = app.store.due_drafts(app.now())
    assert app.store.get_draft(draft_id).status == "approved"
    assert app.store.ledger_counts(draft_id) == {}


def test_a_second_sender_waits_for_the_lease(app: pipeline.App) -> None:
    first = sender(app, ScriptedProvider())
    (draft_id,) = app.store.due_drafts(app.now())
    assert app.store.acquire_lease(f"send:{draft_id}", "someone-else", app.now(),
                                   app.now().replace(year=2100))
    summary = first.run()
    assert summary.stopped == "another sender is working on this draft" and summary.sent == 0


@pytest.mark.parametrize(("seconds_per_batch", "renewals"), [(40, 3), (10, 1)])
def test_a_long_send_renews_its_lease_but_not_after_every_batch(
        app: pipeline.App, clock: FrozenClock, seconds_per_batch: int, renewals: int) -> None:
    """Three batches; the lease is renewed once at least 30 s passed since the last renewal."""
    def slow(messages: object) -> None:
        clock.advance(seconds=seconds_per_batch)

    taken: list[object] = []
    acquire = app.store.acquire_lease

    def spy(name: str, holder: str, now: object, until: object, *rest: object) -> bool:
        taken.append(until)
        return acquire(name, holder, now, until, *rest)  # type: ignore[arg-type]

    app.store.acquire_lease = spy  # type: ignore[method-assign]
    summary = sender(app, ScriptedProvider([slow, slow, slow])).run()
    assert summary.sent == 5
    assert len(taken) == 1 + renewals  # the first take, then the renewals
    assert taken[-1] == clock() + timedelta(seconds=300)  # renewed at the last batch


def test_token_bucket_limits_rate() -> None:
    t = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        t[0] += s

    bucket = TokenBucket(10, burst=1, clock=lambda: t[0], sleep=sleep)
    for _ in range(11):
        bucket.acquire()
    assert t[0] == pytest.approx(1.0)


@pytest.mark.parametrize("rate", [2.0, 14.0, 50.0])
def test_token_bucket_never_lets_more_than_the_rate_through_in_any_second(rate: float) -> None:
    """From the first call, and again after a quiet spell: a bucket that started full let
    twice the rate through in the first second (Resend's 2 calls a second were 3, in every
    sending process, and Resend answers a third with 429)."""
    t = [0.0]

    def sleep(s: float) -> None:
        t[0] += s

    bucket = TokenBucket(rate, clock=lambda: t[0], sleep=sleep)
    starts: list[float] = []
    for _ in range(int(rate) * 3):
        bucket.acquire()
        starts.append(t[0])
    t[0] += 10.0  # nothing to send for a while
    for _ in range(int(rate) * 3):
        bucket.acquire()
        starts.append(t[0])
    busiest = max(sum(1 for s in starts if begin <= s < begin + 1.0 - 1e-9) for begin in starts)
    assert busiest == int(rate)
    assert starts[0] == 0.0  # the first call waits for nothing


def test_waits_for_the_rate_limit_before_claiming(app: pipeline.App) -> None:
    """Rows are claimed after the rate limit's wait, not held through it: a kill -9 during the
    wait would leave them uncertain though they never left."""
    provider = ScriptedProvider()
    s = sender(app, provider)
    assert s.draft.id is not None
    t = [0.0]
    claimed_while_waiting: list[int] = []

    def sleep(seconds: float) -> None:
        claimed_while_waiting.append(app.store.ledger_counts(s.draft.id or 0).get("claimed", 0))
        t[0] += seconds

    s.bucket = TokenBucket(1, burst=1, clock=lambda: t[0], sleep=sleep)
    summary = s.run()
    assert summary.sent == 5 and summary.finished
    assert len(claimed_while_waiting) >= 2  # three batches, the first without a wait
    assert set(claimed_while_waiting) == {0}


class OneCallPerMessage(ScriptedProvider):
    """Plays SES (or SendGrid and Mailgun with full bodies): one call per message, the calls
    of a batch run delivery.concurrency at a time."""

    max_batch = 50
    parallel_calls = True


@pytest.mark.parametrize(("delivery", "size"), [
    ({"rate_per_second": 14, "concurrency": 4}, 14),  # SES's default rate: a second of calls
    ({"rate_per_second": 2, "concurrency": 4}, 4),  # never fewer than the calls in flight at once
    ({"rate_per_second": 14, "concurrency": 4, "processes": 2}, 7),  # each process's share
    ({"rate_per_second": 1000, "concurrency": 4}, 50),  # at most the provider's limit
    ({"rate_per_second": 14, "concurrency": 4, "batch_size": 50}, 50),  # as the config says
])
def test_a_batch_of_one_call_per_message_is_about_a_second_of_calls(
        app: pipeline.App, delivery: dict[str, float], size: int) -> None:
    """A stop waits for the batch in flight, and a batch of the provider's limit is long (50
    SES calls take 3.5 s at 14 a second): by default a batch is what the rate lets go out in
    about a second."""
    settings = app.settings.model_copy(update={"delivery": app.settings.delivery.model_copy(update=delivery)})
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    s = Sender(app.store, OneCallPerMessage(), settings, draft, pipeline.compile_for(app, draft), app.link_pair,
               now=app.now)
    assert s.batch_size == size
    assert Sender(app.store, ScriptedProvider(), settings, draft, pipeline.compile_for(app, draft), app.link_pair,
                  now=app.now).batch_size == 2  # one call per batch: the provider's limit


class CallByCall(ScriptedProvider):
    """Sends a batch as one call per message through send_in_calls, as SES and SMTP do: each
    call pops the script in turn."""

    max_batch = 5
    parallel_calls = True

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        from digest.delivery.providers.base import send_in_calls

        return send_in_calls(self.name, [[m] for m in messages], super().send_batch)


def _own(app: pipeline.App) -> dict[int, str]:
    with app.store.engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT id, status FROM send_ledger").all())  # type: ignore[arg-type]


def test_a_batch_of_several_calls_is_recorded_call_by_call(app: pipeline.App) -> None:
    """Before each call its rows are marked as going out, after it they have its verdict; a
    call refused for now is not left marked while the batch waits to be tried again (a kill
    during the wait leaves nothing uncertain); the batch then ends sent and closed."""
    seen: list[dict[int, str]] = []

    def third_call_sees(messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        seen.append(_own(app))
        return [SendResult(messages[0].ledger_id, "sent", "id-3")]

    waiting: list[dict[int, str]] = []
    # The first call meets a 429: nothing taken, the whole batch is tried again after a wait.
    provider = CallByCall([DeliveryError("HTTP 429", retryable=True, status=429),
                           lambda ms: None, lambda ms: None, third_call_sees])
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    s = Sender(app.store, provider, app.settings, draft, pipeline.compile_for(app, draft), app.link_pair,
               now=app.now, sleep=lambda seconds: waiting.append(_own(app)))
    summary = s.run()
    ids = sorted(_own(app))
    # While the batch waited, none of its rows was marked as going out.
    assert [[w[i] for i in ids] for w in waiting] == [["claimed"] * 5]
    # At the third call: the first two recorded sent, the third going out, the rest not yet.
    assert [seen[0][i] for i in ids] == ["sent", "sent", "sending", "claimed", "claimed"]
    assert summary.sent == 5 and summary.finished and summary.retries == 1
    assert set(_own(app).values()) == {"sent"}
    with app.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT status FROM send_batches").scalars().all() == ["settled"]
    assert received(provider) == sorted(EMAILS)


def test_a_batch_of_several_calls_given_up_keeps_the_verdicts_its_calls_got(app: pipeline.App) -> None:
    """The provider refused the first call's reader as suppressed on its side, then refused the
    credentials: the batch goes back to the queue but for that reader, who keeps the verdict,
    counts in the summary and is suppressed here too (never asked again)."""
    def suppressed(messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        return [SendResult(messages[0].ledger_id, "suppressed", None, "inactive recipient")]

    provider = CallByCall([suppressed, AuthError("HTTP 401: bad token", status=401)])
    summary = sender(app, provider).run()
    first = provider.calls[0][0].to_email
    assert summary.failed == {"suppressed": 1} and summary.stopped and "refused the credentials" in summary.stopped
    rows = {email: status for _i, email, status in app.store.ledger_rows(summary.draft_id)}
    assert rows == {e: ("suppressed" if e == first else "pending") for e in EMAILS}
    sub = app.store.subscriber_by_email(first)
    assert sub is not None and sub.status != "active"
    # The next send (credentials fixed) sends the four others and not the suppressed reader.
    again = CallByCall()
    resumed = sender(app, again).run()
    assert resumed.sent == 4 and resumed.finished and received(again) == sorted(set(EMAILS) - {first})


def test_a_call_refused_for_good_fails_its_reader_alone_and_a_kill_after_it_keeps_every_fate(
        app: pipeline.App) -> None:
    """The batch's first call is refused for good (SES's 400 for that message): that reader
    fails, the other calls still go out. A kill -9 during a later call (played by a restart
    marking the claims of a dead sender) leaves the refused reader failed, the accepted one
    sent, the one in flight uncertain and the rest in the queue; the next send sends those
    once and nobody else."""
    (draft_id,) = app.store.due_drafts(app.now())
    seen: list[dict[str, str]] = []

    def killed_here(messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        app.store.mark_stale_claims_uncertain(draft_id, app.now())  # the restart after the kill
        seen.append({email: status for _i, email, status in app.store.ledger_rows(draft_id)})
        return [SendResult(messages[0].ledger_id, "sent", "id-3")]

    refused = DeliveryError("ses: HTTP 400 BadRequestException: bad message", retryable=False, status=400)
    provider = CallByCall([refused, lambda ms: None, killed_here])
    with pytest.raises(TakenOverError):  # the killed sender's next record comes too late
        sender(app, provider).run()
    assert seen == [{EMAILS[0]: "failed", EMAILS[1]: "sent", EMAILS[2]: "uncertain",
                     EMAILS[3]: "pending", EMAILS[4]: "pending"}]
    again = CallByCall()
    summary = sender(app, again).run()
    assert received(again) == EMAILS[3:] and summary.sent == 2
    assert app.store.ledger_counts(draft_id) == {"failed": 1, "sent": 3, "uncertain": 1}


def test_a_call_refused_for_good_does_not_stop_the_batch(app: pipeline.App) -> None:
    """Nothing accepted yet when the first call is refused for good: that reader alone fails,
    with the error's text, counted as the sender counts a failed batch; the batch is not a
    failure toward the pause."""
    refused = DeliveryError("ses: HTTP 400 BadRequestException: bad message", retryable=False, status=400)
    provider = CallByCall([refused])
    summary = sender(app, provider).run()
    assert summary.finished and summary.sent == 4 and summary.failed == {"HTTP 400 BadRequestException": 1}
    assert received(provider) == EMAILS[1:] and len(provider.calls) == 5
    with app.store.engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT status, error FROM send_ledger WHERE status = 'failed'").all())
    assert rows == {"failed": str(refused)}


def test_a_retry_of_the_batch_does_not_ask_again_about_a_call_refused_for_good(app: pipeline.App) -> None:
    """The first call is refused for good, the second meets a 429 with nothing accepted: the
    sender tries the batch again after a wait, and that attempt starts from the second call.
    The refused reader stays failed, whether or not the process dies during the wait."""
    refused = DeliveryError("ses: HTTP 400 BadRequestException: bad message", retryable=False, status=400)
    provider = CallByCall([refused, DeliveryError("HTTP 429", retryable=True, status=429)])
    waiting: list[dict[int, str]] = []
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    s = Sender(app.store, provider, app.settings, draft, pipeline.compile_for(app, draft), app.link_pair,
               now=app.now, sleep=lambda seconds: waiting.append(_own(app)))
    summary = s.run()
    asked = [m.to_email for call in provider.calls for m in call]
    assert asked == [EMAILS[0], EMAILS[1], *EMAILS[1:]]  # the refused reader was asked once
    ids = sorted(_own(app))
    assert [waiting[0][i] for i in ids] == ["failed", "claimed", "claimed", "claimed", "claimed"]
    assert summary.finished and summary.sent == 4 and summary.failed == {"HTTP 400 BadRequestException": 1}
    assert sorted(_own(app).values()) == ["failed"] + ["sent"] * 4
    assert received(provider) == EMAILS[1:]


def test_every_call_refused_for_good_fails_the_batch_and_pauses_the_send(app: pipeline.App) -> None:
    """A refusal of every call (a setting the provider rejects, whoever the reader): each
    call is tried, the batch fails, and batches failing in a row pause the send as before,
    instead of failing the whole audience."""
    class TwoAtATime(CallByCall):
        max_batch = 2

    bad = DeliveryError("ses: HTTP 400 BadRequestException: Invalid configuration set", retryable=False, status=400)
    provider = TwoAtATime([bad] * 4)
    s = sender(app, provider)
    s.max_consecutive_failures = 2
    summary = s.run()
    assert len(provider.calls) == 4 and received(provider) == []  # both batches, every call
    assert summary.failed == {"HTTP 400 BadRequestException": 4} and not summary.finished
    assert summary.stopped and summary.stopped.startswith("paused after 2 failed batches in a row")
    assert app.store.ledger_counts(summary.draft_id) == {"failed": 4, "pending": 1}


REFUSED = DeliveryError("scripted: HTTP 400: the body is too large", retryable=False, status=400)


def test_a_send_paused_after_batches_refused_for_good_waits_for_the_operator(app: pipeline.App) -> None:
    """Batches refused for good in a row pause the send until the operator acts: the pause is
    recorded in the store, a run that does not resume it (the scheduled send's) sends nothing
    and says why, however often it comes; the operator's run lifts it and sends the rest once."""
    provider = ScriptedProvider([REFUSED, REFUSED])
    s = sender(app, provider)
    s.max_consecutive_failures = 2
    first = s.run()
    assert first.held and not first.finished and first.stopped == (
        "paused after 2 failed batches in a row, 4 messages in them refused for good (the last: scripted: "
        "HTTP 400: the body is too large): no scheduled send resumes it; fix the cause, then `digest send "
        "--retry-failed --draft 1` puts the failed messages back in the queue and resumes the send "
        "(`digest send --draft 1` resumes it without them)")
    hold = app.store.send_hold(first.draft_id)
    assert hold is not None and (hold.batches, hold.messages) == (2, 4) and hold.at == app.now()
    for _ in range(3):  # the scheduled send, every few minutes: nothing fixed, nothing sent
        later = ScriptedProvider([REFUSED] * 3)
        passed_by = sender(app, later).run()
        assert passed_by.held and passed_by.stopped == first.stopped and passed_by.pending == 1
        assert later.calls == [] and passed_by.batches == 0 and not passed_by.idle
    assert app.store.ledger_counts(first.draft_id) == {"failed": 4, "pending": 1}
    rest = ScriptedProvider()
    s = sender(app, rest)
    s.resume = True  # `digest send --draft 1`
    resumed = s.run()
    assert resumed.finished and not resumed.held and received(rest) == [EMAILS[4]]
    assert app.store.send_hold(first.draft_id) is None


def test_batches_put_back_or_uncertain_pause_until_the_next_send_as_before(app: pipeline.App) -> None:
    """Failed batches in a row that lost nobody for good (uncertain here: the operator settles
    them either way) pause the send as they always have: the next send resumes it."""
    lost = UncertainDeliveryError("scripted: connection reset after sending", retryable=True)
    s = sender(app, ScriptedProvider([lost, lost]))
    s.max_consecutive_failures = 2
    first = s.run()
    assert first.stopped and first.stopped.startswith("paused after 2 failed batches in a row; the next")
    assert not first.held and app.store.send_hold(first.draft_id) is None
    assert sender(app, ScriptedProvider()).run().sent == 1


def test_failed_batches_in_a_row_are_counted_for_the_whole_send_not_per_worker(
        tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    """With eight workers the streak is the send's: the pause comes after exactly three
    batches refused in a row, whichever workers sent them, not after three per worker. The
    batches in flight when it comes settle (here the provider takes them); none starts after."""
    emails = [f"c{i:03d}@example.com" for i in range(200)]
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 0, "rate_per_second": 100000, "concurrency": 8})
    a = pipeline.App.open(settings, clock)
    a.store.upsert_subscribers([(e, "") for e in emails], "cli", clock())
    pipeline.collect(a)
    pipeline.make_draft(a)
    first_three = threading.Barrier(3)
    lock = threading.Lock()
    arrived: list[bool] = []

    class Gated(ScriptedProvider):
        """The first three calls meet (three workers, not one thrice) and are refused; the
        others, in flight meanwhile, wait for the pause, then are taken."""

        def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
            with lock:
                n = len(arrived)
                arrived.append(s._stop is not None)
            if n < 3:
                first_three.wait(timeout=10)
                self.calls.append(list(messages))
                raise REFUSED
            deadline = time.monotonic() + 2
            while s._stop is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if s._stop is None:  # no pause came (a streak per worker): refused too
                self.calls.append(list(messages))
                raise REFUSED
            return super().send_batch(messages)

    provider = Gated()
    s = sender(a, provider)
    summary = s.run()
    assert summary.failed == {"HTTP 400": 6}, summary  # three batches of two, no more
    assert summary.held and summary.stopped and summary.stopped.startswith(
        "paused after 3 failed batches in a row, 6 messages in them refused for good")
    # Only batches claimed before the pause went out: at most one per other worker.
    assert summary.batches == len(provider.calls) <= 3 + 7
    counts = a.store.ledger_counts(summary.draft_id)
    assert counts == {k: n for k, n in (("failed", 6), ("sent", summary.sent), ("pending", 194 - summary.sent)) if n}
    assert sorted(m.to_email for m in provider.delivered) == sorted(set(received(provider)))
    a.close()


def test_retry_failed_puts_each_failed_message_back_once(app: pipeline.App) -> None:
    """`digest send --retry-failed`: the messages refused for good, whether a ranged batch's
    verdict speaks for them or they carry their own, go back in the queue once each (or only
    those whose error matches); the next send delivers each exactly once, skipping a reader who
    unsubscribed meanwhile (rule 2), and the provider's verdict on a reader (invalid) stands."""
    def one_invalid_one_failed(messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        return [SendResult(messages[0].ledger_id, "invalid", None, "scripted: not an address"),
                SendResult(messages[1].ledger_id, "failed", None, "scripted: HTTP 422: unprocessable")]

    first = sender(app, ScriptedProvider([REFUSED, one_invalid_one_failed, REFUSED])).run()
    draft_id = first.draft_id
    assert first.finished and app.store.ledger_counts(draft_id) == {"failed": 4, "invalid": 1}
    unsubscribed = app.store.subscriber_by_email(EMAILS[1])
    assert unsubscribed is not None
    app.store.set_subscriber_status(unsubscribed.id, "unsubscribed", app.now())

    assert pipeline.retry_failed(app, draft_id, "http 422") == 1  # the reason matched, in any case
    assert pipeline.retry_failed(app, draft_id) == 3
    assert pipeline.retry_failed(app, draft_id) == 0  # once each
    assert app.store.get_draft(draft_id).status == "sending"
    assert app.store.ledger_counts(draft_id) == {"pending": 4, "invalid": 1}
    later = ScriptedProvider()
    resumed = sender(app, later).run()
    assert resumed.finished and resumed.sent == 3
    assert received(later) == sorted([EMAILS[0], EMAILS[3], EMAILS[4]])
    assert app.store.ledger_counts(draft_id) == {"sent": 3, "invalid": 1, "skipped": 1}
    assert app.store.due_drafts(app.now()) == []  # nothing left to send again


def test_stop_request_finishes_the_batch_in_flight_then_stops(app: pipeline.App) -> None:
    provider = ScriptedProvider()
    s = sender(app, provider)
    s.should_stop = lambda: len(provider.calls) >= 1
    summary = s.run()
    assert summary.sent == 2 and not summary.finished
    # What `digest send` prints, `digest serve` logs and `digest status` shows: true for both.
    assert summary.stopped == ("stopped on request after the batch in flight; "
                               "the next `digest send` (or the service's next send) resumes it")
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 2, "pending": 3}
    rest = ScriptedProvider()
    assert sender(app, rest).run().sent == 3
    assert sorted(received(provider) + received(rest)) == sorted(EMAILS)


class IdempotentProvider(ScriptedProvider):
    """Plays a provider with idempotency keys: a repeated key returns the first answer and
    delivers nothing again. ``lose_answers`` calls are accepted but their answer is lost."""

    idempotent = True

    def __init__(self, lose_answers: int = 1) -> None:
        super().__init__()
        self.lose_answers = lose_answers
        self.answers: dict[tuple[int, ...], list[SendResult]] = {}

    def send_batch(self, messages):  # type: ignore[no-untyped-def]
        self.calls.append(list(messages))
        key = tuple(sorted(m.ledger_id for m in messages))
        if key not in self.answers:
            self.delivered.extend(messages)
            self.answers[key] = [SendResult(m.ledger_id, "sent", f"id-{m.ledger_id}") for m in messages]
        if self.lose_answers:
            self.lose_answers -= 1
            raise UncertainDeliveryError("connection reset after sending", retryable=True)
        return self.answers[key]


def test_idempotent_provider_resends_uncertain_batches_safely(app: pipeline.App) -> None:
    provider = IdempotentProvider(lose_answers=1)
    summary = sender(app, provider).run()
    assert summary.sent == 5 and summary.uncertain == 0 and summary.finished
    assert received(provider) == sorted(EMAILS)  # each exactly once
    assert len(provider.calls) == 4  # the first batch went twice, with the same composition
    assert [m.ledger_id for m in provider.calls[0]] == [m.ledger_id for m in provider.calls[1]]
    assert provider.calls[0][0].html == provider.calls[1][0].html  # byte-identical resend


def test_idempotent_provider_settles_uncertain_rows_left_by_a_crash(app: pipeline.App) -> None:
    first = IdempotentProvider(lose_answers=100)  # every answer lost, retries exhausted
    summary = sender(app, first).run()
    assert summary.uncertain == 5 and summary.sent == 0
    later = IdempotentProvider(lose_answers=0)
    later.answers = first.answers  # the provider remembers the keys it has seen
    later.delivered = first.delivered
    resumed = sender(app, later).run()
    assert resumed.finished and app.store.ledger_counts(resumed.draft_id) == {"sent": 5}
    assert received(later) == sorted(EMAILS)


def test_an_idempotent_batch_left_uncertain_keeps_the_draft_sending_for_the_next_run(app: pipeline.App) -> None:
    """A batch whose every attempt lost its answer, while the others went out: the send does
    not finish, since the next run resends that batch under its key by itself."""
    first = IdempotentProvider(lose_answers=app.settings.delivery.max_retries + 1)
    summary = sender(app, first).run()
    assert summary.sent == 3 and summary.uncertain == 2 and summary.resendable == 2
    assert not summary.finished
    assert "the next `digest send` (or the service's next send) does it" in (summary.stopped or "")
    assert app.store.get_draft(summary.draft_id).status == "sending"
    later = IdempotentProvider(lose_answers=0)
    later.answers, later.delivered = first.answers, first.delivered  # the provider keeps its keys
    resumed = sender(app, later).run()
    assert resumed.finished and resumed.uncertain_total == 0
    assert app.store.ledger_counts(resumed.draft_id) == {"sent": 5}
    assert received(later) == sorted(EMAILS)  # each exactly once


def test_concurrent_workers_send_everyone_exactly_once(tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"rate_per_second": 1000})
    settings = settings.model_copy(update={"delivery": settings.delivery.model_copy(update={"concurrency": 4})})
    a = pipeline.App.open(settings, clock)
    emails = [f"c{i}@example.com" for i in range(201)]
    a.store.upsert_subscribers([(e, "") for e in emails], "cli", clock())
    pipeline.collect(a)
    pipeline.make_draft(a)
    provider = ScriptedProvider()
    summary = sender(a, provider).run()
    assert summary.sent == 201 and summary.finished and summary.batches == 101
    assert received(provider) == sorted(emails)
    a.close()


class TemplateProvider(ScriptedProvider):
    """Personalizes server-side: receives one template and per-recipient values."""

    personalizes = True

    def send_template_batch(self, template, recipients):  # type: ignore[no-untyped-def]
        self.templates = getattr(self, "templates", []) + [template]
        self.recipients = getattr(self, "recipients", []) + list(recipients)
        return [SendResult(r.ledger_id, "sent", "tpl") for r in recipients]


def test_server_side_personalization_gets_one_template_and_escaped_values(app: pipeline.App) -> None:
    from digest.render import personalize

    provider = TemplateProvider()
    s = sender(app, provider)
    summary = s.run()
    assert summary.sent == 5 and provider.calls == []
    assert len({id(t) for t in provider.templates}) == 1  # built once per draft
    t = provider.templates[0]
    r = provider.recipients[0]
    values = dict(zip(SLOT_NAMES, r.html_values, strict=True))
    html = t.html_parts[0] + "".join(values[s] + p for s, p in zip(t.html_slots, t.html_parts[1:]))
    unsub = dict(r.headers)["List-Unsubscribe"].strip("<>")
    expected, _ = personalize(s.compiled, name=r.to_name, unsubscribe_url=unsub,
                              preferences_url=r.text_values[SLOT_NAMES.index("preferences_url")])
    assert html == expected


def test_partial_batch_settles_the_known_and_marks_only_the_in_flight_uncertain(app: pipeline.App) -> None:
    from digest.delivery.providers.base import PartialBatchError

    def partial(messages):  # type: ignore[no-untyped-def]
        first, second = messages
        raise PartialBatchError("connection lost during DATA",
                                results=[SendResult(first.ledger_id, "sent", "ok")], uncertain=[second.ledger_id])

    provider = ScriptedProvider([partial])
    summary = sender(app, provider).run()
    counts = app.store.ledger_counts(summary.draft_id)
    assert counts == {"sent": 4, "uncertain": 1}
    assert summary.finished


def test_unsent_part_of_a_batch_goes_back_to_the_queue(app: pipeline.App) -> None:
    def half(messages):  # type: ignore[no-untyped-def]
        return [SendResult(messages[0].ledger_id, "sent", "ok"),
                SendResult(messages[1].ledger_id, "deferred", None, "not sent: HTTP 429 after the first call")]

    provider = ScriptedProvider([half])
    summary = sender(app, provider).run()
    assert summary.finished and app.store.ledger_counts(summary.draft_id) == {"sent": 5}
    assert received(provider) == sorted(EMAILS)
    assert sorted(m.to_email for c in provider.calls for m in c).count(provider.calls[0][1].to_email) == 2


class BuildingProvider(ScriptedProvider):
    """Builds each template batch ahead (:meth:`template_sender`) and sends the built batch;
    the first send fails with ``first_error``. Records builds, sends and overlapping builds."""

    personalizes = True

    def __init__(self, first_error: BaseException | None = None) -> None:
        super().__init__()
        self.first_error = first_error
        self.built: list[list[int]] = []
        self.sent: list[list[int]] = []
        self.building = 0
        self.most_at_once = 0
        self._count_lock = threading.Lock()

    def template_sender(self, template, recipients):  # type: ignore[no-untyped-def]
        with self._count_lock:
            self.building += 1
            self.most_at_once = max(self.most_at_once, self.building)
        time.sleep(0.01)  # long enough for another worker to start building, were it allowed
        batch = [r.ledger_id for r in recipients]
        self.built.append(batch)
        with self._count_lock:
            self.building -= 1

        def send() -> list[SendResult]:
            self.sent.append(batch)
            if self.first_error is not None:
                error, self.first_error = self.first_error, None
                raise error
            return [SendResult(i, "sent", "tpl") for i in batch]

        return send


def test_a_retry_sends_the_built_batch_again_without_building_it_again(app: pipeline.App) -> None:
    provider = BuildingProvider(DeliveryError("HTTP 503", retryable=True, status=503))
    summary = sender(app, provider).run()
    assert summary.sent == 5 and summary.finished
    assert len(provider.built) == summary.batches == 3  # built once per batch
    assert provider.sent[0] == provider.sent[1] == provider.built[0]  # the same recipients again
    assert sorted(i for batch in provider.built for i in batch) == sorted(
        r[0] for r in app.store.ledger_rows(summary.draft_id))
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 5}


def test_a_failed_build_is_a_failed_attempt(app: pipeline.App) -> None:
    class Refusing(BuildingProvider):
        def template_sender(self, template, recipients):  # type: ignore[no-untyped-def]
            raise DeliveryError("bad From address")

    provider = Refusing()
    summary = sender(app, provider).run()
    assert summary.sent == 0 and sum(summary.failed.values()) == 5
    assert app.store.ledger_counts(summary.draft_id) == {"failed": 5}


def test_workers_build_one_batch_at_a_time(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, delivery={"concurrency": 3}, digest={"approval": {"required": False}})
    a = pipeline.App.open(settings, clock)
    try:
        a.store.upsert_subscribers([(f"r{i}@example.com", f"R {i}") for i in range(12)], "cli", clock())
        pipeline.collect(a)
        pipeline.make_draft(a)
        provider = BuildingProvider()
        summary = sender(a, provider).run()
    finally:
        a.close()
    assert summary.sent == 12 and len(provider.built) == 6
    assert provider.most_at_once == 1


def test_a_providers_retry_after_is_capped(app: pipeline.App) -> None:
    """An hour's Retry-After (a provider's daily quota, a misread header) waits five minutes
    (RETRY_AFTER_CAP) at most, with its jitter, and then the batch goes out. A wait shorter
    than asked would only meet another 429."""
    from digest.http import RETRY_AFTER_CAP

    sleeps: list[float] = []
    provider = ScriptedProvider([DeliveryError("HTTP 429", retryable=True, status=429, retry_after=3600)])
    summary = sender(app, provider, sleeps).run()
    assert summary.sent == 5 and summary.finished
    assert received(provider) == sorted(EMAILS)
    (waited,) = [s for s in sleeps if s >= 1]  # the backoff; the rate limit's waits are short
    assert RETRY_AFTER_CAP <= waited <= RETRY_AFTER_CAP * 1.25


def _second_due_draft(app: pipeline.App) -> int:
    """Another approved, due draft beside the fixture's (the same items, another period)."""
    (first_id,) = app.store.due_drafts(app.now())
    first = app.store.get_draft(first_id)
    second, _ = app.store.create_draft(Draft("next-period", first.subject, "", first.items), [], app.now(),
                                       status="approved")
    assert second.id is not None and set(app.store.due_drafts(app.now())) == {first_id, second.id}
    return second.id


def test_a_stop_request_during_a_drafts_last_batch_starts_no_other_draft(app: pipeline.App) -> None:
    second = _second_due_draft(app)
    provider = ScriptedProvider()
    app._provider = provider
    stop = [False]

    def on_batch(summary: SendSummary, size: int) -> None:
        if summary.done == summary.total:  # the first draft's last batch: Ctrl-C now
            stop[0] = True

    summaries = pipeline.send(app, on_batch=on_batch, should_stop=lambda: stop[0])
    assert [(s.draft_id, s.sent, s.finished) for s in summaries] == [(summaries[0].draft_id, 5, True)]
    assert app.store.get_draft(second).status == "approved"  # not started: no audience frozen
    assert app.store.ledger_counts(second) == {}


def test_a_refusal_stops_the_other_workers_before_the_batch_goes_back(tmp_path: Path, db_url: str,
                                                                    clock: FrozenClock) -> None:
    """The batch a refusal puts back in the queue is not taken by another worker of the same
    send: it waits, with every other, for the next `digest send`."""
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 0, "rate_per_second": 1000, "concurrency": 4, "batch_size": 2})
    a = pipeline.App.open(settings, clock)
    try:
        a.store.upsert_subscribers([(f"w{i}@example.com", "") for i in range(40)], "cli", clock())
        pipeline.collect(a)
        assert pipeline.make_draft(a).draft is not None
        refused: list[str] = []
        lock = threading.Lock()

        def first_refused(messages):  # type: ignore[no-untyped-def]
            with lock:
                first = not refused
                if first:
                    refused.extend(m.to_email for m in messages)
            if first:
                raise BlockedError("quota used up", hint="wait for tomorrow")
            time.sleep(0.01)  # the others are in flight meanwhile
            return [SendResult(m.ledger_id, "sent", "ok") for m in messages]

        provider = ScriptedProvider([first_refused] * 100)
        summary = sender(a, provider).run()
        assert summary.blocked and not summary.finished
        # The refused batch went back to the queue and stayed there: none of its readers got
        # the digest in this run, and what was sent is what the ledger says.
        assert len(refused) == 2 and not set(refused) & set(received(provider))
        assert a.store.ledger_counts(summary.draft_id).get("sent", 0) == summary.sent == len(provider.delivered)
    finally:
        a.close()


def test_a_batch_that_keeps_coming_back_uncertain_is_left_to_the_operator(app: pipeline.App) -> None:
    """The draft stays in sending while the next run may resend under the keys by itself, but
    only AUTO_RESENDS times: then it finishes, and the uncertain messages wait for the operator."""
    from digest.delivery.sender import AUTO_RESENDS

    provider = IdempotentProvider(lose_answers=10_000)  # every answer lost, every time
    runs = [sender(app, provider).run()]
    while not runs[-1].finished and len(runs) < 10:
        runs.append(sender(app, provider).run())
    assert len(runs) == 1 + AUTO_RESENDS
    assert [r.resendable for r in runs] == [5] * AUTO_RESENDS + [0]
    last = runs[-1]
    assert last.finished and last.uncertain_total == 5 and last.stopped is None
    assert received(provider) == sorted(EMAILS)  # the provider kept each once, whatever we sent


def test_a_stop_during_the_resends_leaves_the_rest_uncertain_not_claimed(app: pipeline.App) -> None:
    first = IdempotentProvider(lose_answers=10_000)
    assert sender(app, first).run().resendable == 5  # three batches, all uncertain
    later = IdempotentProvider(lose_answers=0)
    later.answers, later.delivered = first.answers, first.delivered
    calls = []
    s = sender(app, later)
    s.should_stop = lambda: bool(calls)  # Ctrl-C as the first resend goes out
    s.on_batch = lambda summary, size: calls.append(size)
    summary = s.run()
    counts = app.store.ledger_counts(summary.draft_id)
    assert len(calls) == 1 and "claimed" not in counts and counts.get("uncertain") == 5 - calls[0]
    assert not summary.finished and summary.stopped and "stopped on request" in summary.stopped
    # Those not resent keep their reason, and the resend they did not get is not counted.
    assert {m.error for m in app.store.uncertain_messages(summary.draft_id)} == {"connection reset after sending"}
    again = app.store.uncertain_batches(summary.draft_id, "peek", app.now(), via=sent_via(later), peek=True,
                                        max_attempts=2)
    assert sum(map(len, again)) == 5 - calls[0]  # claimed once only: one automatic resend left each


def test_a_stop_during_the_freeze_leaves_the_draft_approved(app: pipeline.App,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The store cut the freeze short (Store.start_send, tested there): the send says so,
    sends nothing, lets go of the draft, and the next send starts it whole."""
    from digest.errors import FreezeStopped

    real = app.store.start_send
    asked: list[object] = []

    def stopped(draft_id: int, now: object, should_stop: object = None) -> int:
        asked.append(should_stop)
        raise FreezeStopped("stopped on request while the audience was being frozen")

    monkeypatch.setattr(app.store, "start_send", stopped)
    provider = ScriptedProvider()
    s = sender(app, provider)
    summary = s.run()
    assert asked == [s.should_stop]  # the sender's own stop, asked during the freeze
    assert summary.stopped and "while the audience was being frozen" in summary.stopped
    assert summary.batches == 0 and not summary.finished and provider.delivered == []
    assert app.store.get_draft(summary.draft_id).status == "approved"
    assert app.store.lease(f"send:{summary.draft_id}") is None  # let go
    monkeypatch.setattr(app.store, "start_send", real)
    again = sender(app, provider).run()
    assert again.finished and again.sent == again.total > 0 and len(provider.delivered) == again.sent


def test_a_stop_asked_before_a_send_starts_freezes_nothing(app: pipeline.App) -> None:
    s = sender(app, ScriptedProvider())
    s.should_stop = lambda: True
    summary = s.run()
    assert summary.stopped and "before the send started" in summary.stopped and summary.batches == 0
    assert app.store.get_draft(summary.draft_id).status == "approved"
    assert app.store.ledger_counts(summary.draft_id) == {}


def test_a_batch_resent_as_often_as_allowed_is_not_resent_by_a_run_that_has_other_work(app: pipeline.App) -> None:
    """The cap holds for the resend a run makes at its start too, not only for the count that
    keeps a draft in sending: a draft kept there by messages still to send resends nothing more."""
    from digest.delivery.sender import AUTO_RESENDS

    provider = IdempotentProvider(lose_answers=10_000)
    def one_batch_a_run() -> None:  # the run stops after one batch: the rest stays pending
        s = sender(app, provider)
        batches: list[int] = []
        s.on_batch = lambda summary, size: batches.append(size)
        s.should_stop = lambda: len(batches) >= 1
        s.run()

    for _ in range(1 + AUTO_RESENDS):
        one_batch_a_run()
    calls_before = len(provider.calls)
    s = sender(app, provider)
    s.should_stop = lambda: False
    later = s.run()
    resent = [c for c in provider.calls[calls_before:] if c[0].ledger_id == provider.calls[0][0].ledger_id]
    assert resent == []  # the first batch went 1 + AUTO_RESENDS times, and no more
    assert later.uncertain_total >= 2


def test_a_pause_ends_when_the_parent_of_a_helper_says_stop() -> None:
    import multiprocessing

    s = Sender.__new__(Sender)  # only what _pause reads
    s.sleep, s.should_stop, s._stop, s._lock = time.sleep, (lambda: False), None, threading.Lock()
    s._peers = multiprocessing.get_context("spawn").Event()
    s._peers.set()
    started = time.monotonic()
    assert s._pause(30.0) is False and time.monotonic() - started < 1
    assert s._stop is None  # the parent gives the send's reason, not the helper


def test_progress_counts_the_whole_audience_at_first_and_only_whats_left_on_resuming(app: pipeline.App) -> None:
    app._provider = ScriptedProvider()  # batches of 2
    stop = [False]
    totals: list[int] = []

    def on_batch(summary: SendSummary, size: int) -> None:
        totals.append(summary.total)
        stop[0] = True  # Ctrl-C after the first batch

    (first,) = pipeline.send(app, on_batch=on_batch, should_stop=lambda: stop[0])
    assert (first.total, first.sent, first.finished) == (5, 2, False)
    stop[0] = False
    totals.clear()
    (second,) = pipeline.send(app, on_batch=lambda s, size: totals.append(s.total))
    assert second.total == 3 and second.finished and totals and set(totals) == {3}


class _SlowStore:
    """Records each call record; the first one waits until released."""

    def __init__(self, fail: bool = False) -> None:
        self.records: list[tuple[list[int], list[int]]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail = fail

    def record_calls(self, batch, draft_id, starting, done, provider, now):  # type: ignore[no-untyped-def]
        first = not self.records
        self.records.append((sorted(starting), sorted(r.ledger_id for r in done)))
        if first:
            self.entered.set()
            assert self.release.wait(5)
            if self.fail:
                raise StoreError("disk full")


@pytest.mark.parametrize("fail", [False, True])
def test_calls_starting_while_a_record_is_written_share_the_next_one(fail: bool) -> None:
    """Group commit: a call waits only until its own rows are recorded; the starts that came
    while one record was being written go into the next together. A record that fails fails
    its call and every call waiting behind it (none of them starts: the ledger is failing),
    and its answers are kept for the batch's verdict."""
    from datetime import UTC, datetime

    from digest.delivery.sender import BatchJournal
    from digest.store.store import ClaimedBatch

    store = _SlowStore(fail=fail)
    journal = BatchJournal(store, ClaimedBatch([], 1, ranged=False), 1, "ses",  # type: ignore[arg-type]
                           lambda: datetime(2026, 1, 1, tzinfo=UTC))
    journal.finished([SendResult(9, "sent", "m9")])
    errors: list[BaseException] = []

    def start(ids: list[int]) -> None:
        try:
            journal.starting(ids)
        except StoreError as exc:
            errors.append(exc)

    first = threading.Thread(target=start, args=([1],))
    first.start()
    assert store.entered.wait(5)
    others = [threading.Thread(target=start, args=([n],)) for n in (2, 3, 4)]
    for t in others:
        t.start()
    time.sleep(0.2)  # they gather behind the record being written
    store.release.set()
    for t in [first, *others]:
        t.join(5)
        assert not t.is_alive()
    if fail:
        # The first record failed: its call and the three waiting behind it fail with it, and
        # no other record is attempted; the answer it held stays for the batch's verdict.
        assert len(errors) == 4 and {str(e) for e in errors} == {"disk full"}
        assert store.records == [([1], [9])]
        assert journal.answered == {9: SendResult(9, "sent", "m9")}
    else:
        assert errors == [] and store.records == [([1], [9]), ([2, 3, 4], [])]


def test_links_are_plain_slots_unless_the_public_url_needs_escaping() -> None:
    from digest.delivery.sender import plain_link_slots

    assert plain_link_slots("https://news.example.org") == {"unsubscribe_url", "preferences_url"}
    assert plain_link_slots("https://news.example.org/a&b") == frozenset()
    assert plain_link_slots("https://news.example.org/日誌") == frozenset()  # character references in HTML


def test_a_pause_that_comes_while_a_stop_request_ends_the_send_is_what_the_operator_is_told(
        tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    """Two workers: the first batch is refused; Ctrl-C comes while the second is in flight, and
    its refusal pauses the send for the operator. The run says it waits for the operator (the
    next scheduled send passes it by), not that the next send resumes it."""
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 0, "rate_per_second": 1000, "concurrency": 2})
    a = pipeline.App.open(settings, clock)
    a.store.upsert_subscribers([(f"r{i}@example.com", "") for i in range(8)], "cli", clock())
    pipeline.collect(a)
    pipeline.make_draft(a)
    stop: list[bool] = []
    first_refused = threading.Event()
    lock = threading.Lock()
    calls = [0]

    class Refusing(ScriptedProvider):
        def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
            with lock:
                calls[0] += 1
                mine = calls[0]
            self.calls.append(list(messages))
            if mine == 1:
                first_refused.set()
                raise REFUSED
            first_refused.wait(2)
            stop.append(True)  # Ctrl-C while this batch is in flight
            deadline = time.monotonic() + 2
            while s._stop is None and time.monotonic() < deadline:  # the other worker halts
                time.sleep(0.005)
            raise REFUSED

    (draft_id,) = a.store.due_drafts(a.now())
    draft = a.store.get_draft(draft_id)
    s = Sender(a.store, Refusing(), a.settings, draft, pipeline.compile_for(a, draft), a.link_pair, now=a.now,
               sleep=lambda _s: None, should_stop=lambda: bool(stop))
    s.max_consecutive_failures = 2
    first = s.run()
    assert first.held and a.store.send_hold(draft_id) is not None
    assert first.stopped and first.stopped.startswith("paused after 2 failed batches")
    assert f"--retry-failed --draft {draft_id}" in first.stopped
    again = Sender(a.store, ScriptedProvider(), a.settings, draft, pipeline.compile_for(a, draft), a.link_pair,
                   now=a.now, sleep=lambda _s: None).run()
    assert again.held and again.batches == 0  # the next scheduled send passes it by
    a.close()


def test_a_wait_ended_by_another_process_of_the_send_leaves_the_reason_to_it(app: pipeline.App) -> None:
    """A helper process that stops the send (refused credentials) ends this process's retry
    wait; the reason is the helper's to give (it reports it), so the wait gives none of its
    own: the first reason given is the one the send reports."""
    s = sender(app, ScriptedProvider())
    peers = threading.Event()
    s._peers = peers
    s.sleep = lambda _seconds: peers.set()  # the helper stops the send during the wait
    assert s._pause(30.0) is False
    assert s._stop is None
    # Asked to stop here (Ctrl-C): that reason is this process's own.
    s.should_stop = lambda: True
    assert s._pause(30.0) is False
    assert s._stop is not None and s._stop.startswith("stopped on request")


def test_a_stop_during_the_rate_limits_wait_ends_the_wait(app: pipeline.App) -> None:
    """At a slow rate the wait for the next call's turn is long: a Ctrl-C ends it at once
    (it used to wait it out, with nothing in flight)."""
    provider = ScriptedProvider()
    s = sender(app, provider)
    s.bucket = TokenBucket(0.01)  # the next call in 100 s (the real clock and sleep)
    started = time.monotonic()
    s.should_stop = lambda: bool(provider.calls) and time.monotonic() - started > 0.5
    summary = s.run()
    assert time.monotonic() - started < 10
    assert len(provider.calls) == 1 and summary.stopped is not None and summary.stopped.startswith("stopped on request")
    assert app.store.ledger_counts(summary.draft_id).get("claimed", 0) == 0  # nothing left in flight


def test_the_rate_limits_wait_ends_taking_nothing_when_stopping() -> None:
    t = [0.0]

    def sleep(s: float) -> None:
        t[0] += s

    bucket = TokenBucket(1.0, clock=lambda: t[0], sleep=sleep)
    assert bucket.acquire(lambda: False)  # the first at once
    assert not bucket.acquire(lambda: t[0] >= 0.4)  # stopped 0.4 s into a 1 s wait
    assert t[0] == pytest.approx(0.4)
    assert bucket.acquire(lambda: False) and t[0] == pytest.approx(1.0)  # the token was not taken


def test_a_refusal_of_several_lines_is_recorded_and_told_as_one(app: pipeline.App) -> None:
    """An SMTP server's reply of several lines, a provider's message with newlines: the ledger
    keeps one line (which `digest status` shows), and so does the reason a send stops."""
    def refuse(messages):  # type: ignore[no-untyped-def]
        return [SendResult(m.ledger_id, "rejected", None, "550-5.1.1 mailbox unavailable\r\n550 5.1.1 see\nthe FAQ")
                for m in messages]

    provider = ScriptedProvider([refuse])
    s = sender(app, provider)
    summary = s.run()
    errors = {r.error for r in app.store.reasons(summary.draft_id, ["rejected"])}
    assert errors == {"550-5.1.1 mailbox unavailable 550 5.1.1 see the FAQ"}
    assert summary.failed

    s._stop = None
    s._halt("postmark: HTTP 422: line one\nline two")
    assert s._stop == "postmark: HTTP 422: line one line two"
