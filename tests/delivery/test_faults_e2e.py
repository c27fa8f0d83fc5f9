"""Every fault the issue lists, through the real sender against the fake provider server, for
every HTTP provider (Postmark; SendGrid and Mailgun with server-side personalization, one call
for the batch, and with full bodies, a call per reader; SES; Resend with its idempotency key),
and an SMTP server that answers after the client gave up.
Each asserts exactly what every subscriber received (copies per address, from the fake's
record) and each ledger row's status.

The sender runs with a ``sleep`` that records its waits instead of sleeping them: the retry
tests assert the waits the sender chose (Retry-After honoured, backoff doubling) and take no
time. Only the client timeouts are real.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parseaddr
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from digest import clock as wall_clock
from digest import pipeline
from digest.delivery.sender import Sender, SendSummary
from tests.conftest import FrozenClock, make_settings
from tests.delivery.test_smtp import EphemeralController, Handler, plain
from tests.fakes.provider_server import (
    FakeProviderServer,
    Fault,
    Reply,
    Request,
    install_mailgun,
    install_resend,
    install_sendgrid,
    install_ses,
)

TOKEN = "fault-token"
DOMAIN = "mg.example.org"
EMAILS = [f"f{i:02d}@example.com" for i in range(12)]
BATCH = 4
TIMEOUT = 2.0  # the client's (a busy machine never takes this long to answer); a ("delay", DELAY) outlives it
DELAY = 5.0  # (the server thread is woken when the test closes the fake)


@dataclass(frozen=True)
class Via:
    """A provider as these tests drive it: its delivery settings and the fake's routes."""

    delivery: dict[str, Any]
    install: Callable[[FakeProviderServer], None]
    # Readers one provider call carries: the whole batch, or one (SES: a call per message).
    per_call: int = BATCH


PROVIDERS: dict[str, Via] = {
    "postmark": Via({"provider": "postmark", "api_key": TOKEN}, lambda srv: None),
    # Server-side personalization (the default): one call carries the whole batch.
    "sendgrid": Via({"provider": "sendgrid", "api_key": TOKEN}, install_sendgrid),
    "mailgun": Via({"provider": "mailgun", "api_key": TOKEN, "domain": DOMAIN},
                   lambda srv: install_mailgun(srv, DOMAIN)),
    "ses": Via({"provider": "ses", "region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE",
                "aws_secret_access_key": TOKEN}, lambda srv: install_ses(srv, secret_key=TOKEN), per_call=1),
    "resend": Via({"provider": "resend", "api_key": TOKEN}, install_resend),
    # Full bodies: a call per reader (every body holds its reader's own links).
    "sendgrid-full-bodies": Via({"provider": "sendgrid", "api_key": TOKEN, "server_side_personalization": False},
                                install_sendgrid, per_call=1),
    "mailgun-full-bodies": Via({"provider": "mailgun", "api_key": TOKEN, "domain": DOMAIN,
                                "server_side_personalization": False}, lambda srv: install_mailgun(srv, DOMAIN),
                               per_call=1),
}
# Without an idempotency key: an unanswered call's readers are uncertain, never resent.
PLAIN = [p for p in PROVIDERS if p != "resend"]


def open_app(tmp_path: Path, clock: FrozenClock, delivery: dict[str, Any]) -> pipeline.App:
    """The app with EMAILS subscribed and an approved draft; batches of BATCH, one at a time
    (SES: one call at a time), a rate that never makes the sender wait."""
    settings = make_settings(tmp_path, digest={"approval": {"required": False}}, delivery={
        **delivery, "batch_size": BATCH, "concurrency": 1, "max_retries": 4, "timeout": TIMEOUT,
        "rate_per_second": 1000})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
    pipeline.collect(app)
    pipeline.make_draft(app)
    return app


def send(app: pipeline.App, pauses: list[float], **options: Any) -> SendSummary:
    """One run of the real sender on the draft, as ``digest send`` runs it, except that its
    waits (retry backoff, Retry-After) are appended to ``pauses`` instead of slept."""
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    sender = Sender(app.store, app.provider, app.settings, draft, pipeline.compile_for(app, draft),
                    app.link_pair, now=app.now, sleep=pauses.append, **options)
    return sender.run()


def copies(srv: FakeProviderServer) -> collections.Counter[str]:
    """How many copies each address got, from the fake's record of accepted messages."""
    counts: collections.Counter[str] = collections.Counter()
    for m in srv.messages:
        to = m["To"] if "To" in m else m["to"]  # Postmark's field, the others'
        for address in to if isinstance(to, list) else [to]:  # Resend's is a list
            counts[parseaddr(address)[1].lower()] += 1
    return counts


def once(emails: list[str]) -> collections.Counter[str]:
    return collections.Counter(emails)


def content(request: Request) -> bytes:
    """A request's body without its multipart boundary (drawn anew for each build)."""
    boundary = re.search(r'boundary="?([^";]+)', request.headers.get("content-type", ""))
    return request.body.replace(boundary.group(1).encode(), b"") if boundary else request.body


def ledger(app: pipeline.App) -> dict[str, str]:
    return {email: status for _id, email, status in app.store.ledger_rows(1)}


def ids_of(app: pipeline.App, emails: list[str]) -> list[int]:
    wanted = set(emails)
    return [i for i, email, _status in app.store.ledger_rows(1) if email in wanted]


def with_status(rows: dict[str, str], status: str) -> list[str]:
    return sorted(e for e, s in rows.items() if s == status)


@pytest.fixture
def srv() -> Any:
    with FakeProviderServer(token=TOKEN) as server:
        yield server


# -- retryable: the provider took nothing, the same batch goes again ----------------------------

RETRYABLE: dict[str, tuple[list[Fault], list[float]]] = {
    # the faults, and the waits the sender must choose before each retry (less its jitter)
    "429-retry-after": ([("status", 429, {"Retry-After": "3"})], [3.0]),
    "429-no-retry-after": ([("status", 429)], [0.5]),
    # Asked for longer than the sender's own backoff cap (60 s): waits what was asked ...
    "429-retry-after-two-minutes": ([("status", 429, {"Retry-After": "120"})], [120.0]),
    # ... up to the five minutes the header's parser allows.
    "429-retry-after-an-hour": ([("status", 429, {"Retry-After": "3600"})], [300.0]),
    # "Now", or a date already past (clocks that disagree): the sender's own backoff, not
    # every retry at once.
    "429-retry-after-zero": ([("status", 429, {"Retry-After": "0"})] * 2, [0.5, 1.0]),
    "429-retry-after-past-date": ([("status", 429, {"Retry-After": "Thu, 01 Jan 2015 00:00:00 GMT"})], [0.5]),
    # The server gave up waiting for the request before reading it all: nothing was processed.
    "408": ([("status", 408)], [0.5]),
    # 5xx the provider answered itself (not a gateway's 502/504: see below)
    "500-burst": ([("status", 500), ("status", 503), ("status", 500)], [0.5, 1.0, 2.0]),
    # Cloudflare in front of the provider, which never had the request: 521 (the origin refused
    # the connection), 523 (unreachable), 525 (no TLS handshake with it), 526 (its certificate)
    "origin-never-reached": ([("status", 521), ("status", 523), ("status", 525), ("status", 526)],
                             [0.5, 1.0, 2.0, 4.0]),
}


@pytest.mark.parametrize("fault", sorted(RETRYABLE))
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_retryable_faults_deliver_everyone_once(tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer,
                                                provider: str, fault: str) -> None:
    via = PROVIDERS[provider]
    via.install(srv)
    faults, waits = RETRYABLE[fault]
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.extend(faults)
    pauses: list[float] = []
    summary = send(app, pauses)

    assert copies(srv) == once(EMAILS)  # everyone exactly once
    assert with_status(ledger(app), "sent") == EMAILS
    assert summary.finished and summary.sent == 12 and summary.uncertain == 0
    assert summary.retries == len(faults)
    # Each retry waited what the provider asked (Retry-After), else the doubling backoff,
    # plus up to 25% of jitter.
    assert len(pauses) == len(waits)
    for paused, wait in zip(pauses, waits):
        assert wait <= paused <= wait * 1.25
    # The refused calls and their retry carried the same readers; the retry delivered them.
    refused = srv.requests[: len(faults) + 1]
    assert len({content(r) for r in refused}) == 1
    assert [r.ledger_ids for r in refused] == [[]] * len(faults) + [ids_of(app, EMAILS[: via.per_call])]
    app.close()


@pytest.mark.parametrize("provider", ["sendgrid", "sendgrid-full-bodies"])
def test_sendgrid_rate_limit_waits_until_x_ratelimit_reset(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SendGrid's 429 without Retry-After, with X-RateLimit-Reset (Unix seconds): the sender
    waits until the reset (plus jitter), not its own half-second backoff, then sends once."""
    monkeypatch.setattr(wall_clock, "now", clock)  # what the provider reads the reset against
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    reset = int(clock().timestamp()) + 6
    srv.faults.append(("status", 429, {"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                                       "X-RateLimit-Reset": str(reset)}))
    pauses: list[float] = []
    summary = send(app, pauses)

    assert copies(srv) == once(EMAILS)
    assert summary.finished and summary.sent == 12 and summary.retries == 1
    assert len(pauses) == 1 and 6.0 <= pauses[0] <= 7.5
    app.close()


# -- accepted but unanswered: uncertain, never resent (no idempotency key) ----------------------

UNANSWERED: dict[str, Fault] = {
    "timeout-after-accept": ("delay", DELAY),
    "reset-after-accept": ("reset", "after"),
    "garbage-body": ("garbage",),
}


@pytest.mark.parametrize("fault", sorted(UNANSWERED))
@pytest.mark.parametrize("provider", PLAIN)
def test_accepted_but_unanswered_batches_are_uncertain_never_resent(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str, fault: str) -> None:
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.append(UNANSWERED[fault])
    summary = send(app, [])

    in_call = EMAILS[: via.per_call]  # the readers of the call that got no usable answer
    assert srv.requests[0].ledger_ids == ids_of(app, in_call)  # the fake did take them
    assert copies(srv) == once(EMAILS)  # ... and nobody got a second copy
    rows = ledger(app)
    assert with_status(rows, "uncertain") == in_call
    assert with_status(rows, "sent") == EMAILS[via.per_call:]
    assert summary.uncertain == via.per_call and summary.retries == 0
    assert summary.finished and summary.for_operator == via.per_call
    app.close()


# What a gateway in front of the provider answers, perhaps after passing the request on
# (base.GATEWAY_STATUSES): 502, 504; Cloudflare's 520 (the origin's answer was empty or
# unreadable), 522 (also: the origin did not acknowledge a request sent on an open connection),
# 524 (the origin took the request and did not answer in time), 527; some proxies' 598, 599.
GATEWAY = [502, 504, 520, 522, 524, 527, 598, 599]


@pytest.mark.parametrize("status", GATEWAY)
@pytest.mark.parametrize("provider", PLAIN)
def test_a_gateway_5xx_after_the_provider_took_the_batch_leaves_it_uncertain(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str, status: int) -> None:
    """The provider took the call's readers, and the load balancer or CDN in front of it
    answered 502/504/524 ... (its answer lost or late). Resending, as for a 500, would give each
    of them a second copy: they are uncertain, nobody gets two copies, and the other batches go
    out."""
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.append(("gateway", status, {"Retry-After": "1"}))
    summary = send(app, [])

    in_call = EMAILS[: via.per_call]
    assert srv.requests[0].ledger_ids == ids_of(app, in_call)  # the provider did take them
    assert copies(srv) == once(EMAILS)  # ... and nobody got a second copy
    rows = ledger(app)
    assert with_status(rows, "uncertain") == in_call
    assert with_status(rows, "sent") == EMAILS[via.per_call:]
    assert summary.uncertain == via.per_call and summary.retries == 0
    assert summary.finished and summary.for_operator == via.per_call
    # What `digest status` shows the operator for each of them: a gateway answered.
    recorded = app.store.uncertain_messages(1)
    assert sorted(m.email for m in recorded) == in_call
    assert all(f"HTTP {status}" in m.error and "gateway" in m.error for m in recorded)
    app.close()


@pytest.mark.parametrize("provider", PLAIN)
def test_reset_before_the_request_arrives(tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer,
                                          provider: str) -> None:
    """The connection drops after the request was written, before the provider handled it.
    The client cannot tell this from a reset after acceptance (HttpProvider.transport_error:
    only a failure to connect proves nothing went out), so the call's readers are uncertain
    and not resent, although the provider never had them: exactly that, nothing else."""
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.append(("reset", "before"))
    summary = send(app, [])

    in_call = EMAILS[: via.per_call]
    assert srv.requests[0].ledger_ids == []  # the fake never handled it
    assert copies(srv) == once(EMAILS[via.per_call:])  # ... so they got nothing, the rest one each
    rows = ledger(app)
    assert with_status(rows, "uncertain") == in_call
    assert with_status(rows, "sent") == EMAILS[via.per_call:]
    assert summary.uncertain == via.per_call and summary.retries == 0 and summary.finished
    app.close()


# -- Resend: an unanswered batch is sent again under its key, and the provider drops it --------


@pytest.mark.parametrize("fault", [("delay", DELAY), ("reset", "after"), ("reset", "before")],
                         ids=["timeout-after-accept", "reset-after-accept", "reset-before"])
def test_resend_retries_an_unanswered_batch_under_its_key_and_everyone_gets_one(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, fault: Fault) -> None:
    install_resend(srv)
    app = open_app(tmp_path, clock, {**PROVIDERS["resend"].delivery, "base_url": srv.url})
    srv.faults.append(fault)
    summary = send(app, [])

    assert copies(srv) == once(EMAILS)
    assert with_status(ledger(app), "sent") == EMAILS
    assert summary.finished and summary.sent == 12 and summary.uncertain == 0 and summary.retries == 1
    first, again = srv.requests[:2]
    assert again.headers["idempotency-key"] == first.headers["idempotency-key"] and again.body == first.body
    batch = ids_of(app, EMAILS[:BATCH])
    if fault[0] == "reset" and fault[1] == "before":  # the first never arrived: the retry sent it
        assert (first.ledger_ids, again.ledger_ids) == ([], batch)
    else:  # the first was accepted: the retry got its answer again, and sent nothing
        assert (first.ledger_ids, again.ledger_ids) == (batch, [])
    app.close()


@pytest.mark.parametrize("status", [502, 504, 524])
def test_resend_sends_a_batch_a_gateway_answered_again_under_its_key_and_everyone_gets_one(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, status: int) -> None:
    """Resend took the batch and its load balancer answered 502/504: the sender sends the same
    batch again under the same Idempotency-Key, after the wait the gateway asked for, and Resend
    answers as the first time without sending anything."""
    install_resend(srv)
    app = open_app(tmp_path, clock, {**PROVIDERS["resend"].delivery, "base_url": srv.url})
    srv.faults.append(("gateway", status, {"Retry-After": "3"}))
    pauses: list[float] = []
    summary = send(app, pauses)

    assert copies(srv) == once(EMAILS)
    assert with_status(ledger(app), "sent") == EMAILS
    assert summary.finished and summary.sent == 12 and summary.uncertain == 0 and summary.retries == 1
    assert len(pauses) == 1 and 3.0 <= pauses[0] <= 3.75
    first, again = srv.requests[:2]
    assert again.headers["idempotency-key"] == first.headers["idempotency-key"] and again.body == first.body
    assert (first.ledger_ids, again.ledger_ids) == (ids_of(app, EMAILS[:BATCH]), [])
    app.close()


def test_resend_keeps_a_batch_behind_a_failing_gateway_uncertain_and_the_next_run_sends_it_once(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """Resend took the batch, and its gateway answers 504 to the first call and every retry.
    The batch may have gone out, so it is not put back in the queue (where a later batch could
    carry its readers under another key): it stays uncertain, under its key, and the next run
    sends it again under that key. Everyone gets exactly one copy."""
    install_resend(srv)
    app = open_app(tmp_path, clock, {**PROVIDERS["resend"].delivery, "base_url": srv.url})
    retries = app.settings.delivery.max_retries
    srv.faults.extend([("gateway", 504)] + [("status", 504)] * retries)
    first = send(app, [])

    batch = EMAILS[:BATCH]
    rows = ledger(app)
    assert with_status(rows, "uncertain") == batch
    assert with_status(rows, "sent") == EMAILS[BATCH:]
    assert first.uncertain == BATCH and first.retries == retries and first.resendable == BATCH
    assert not first.finished and first.for_operator == 0
    assert copies(srv) == once(EMAILS)

    second = send(app, [])
    assert copies(srv) == once(EMAILS)  # Resend knew the key: nothing sent twice
    assert with_status(ledger(app), "sent") == EMAILS
    assert second.finished and second.uncertain_total == 0
    keys = {r.headers["idempotency-key"] for r in srv.requests if r.ledger_ids == ids_of(app, batch)}
    assert len(keys) == 1 and srv.requests[-1].headers["idempotency-key"] in keys
    app.close()


def test_resend_retry_that_finds_the_first_attempt_in_progress_waits_and_gets_its_answer(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """The first call times out after Resend accepted it; the retry under the same key comes
    while Resend is still on the first (409 concurrent_idempotent_requests): the sender waits
    as asked and asks again, and gets the first call's answer. Nobody gets two copies."""
    install_resend(srv)
    app = open_app(tmp_path, clock, {**PROVIDERS["resend"].delivery, "base_url": srv.url})
    srv.faults.extend([("delay", DELAY), ("status", 409, {"Retry-After": "2"}, {
        "statusCode": 409, "name": "concurrent_idempotent_requests",
        "message": "Same idempotency key used while original request is still in progress."})])
    pauses: list[float] = []
    summary = send(app, pauses)

    assert copies(srv) == once(EMAILS)
    assert with_status(ledger(app), "sent") == EMAILS
    assert summary.finished and summary.uncertain == 0 and summary.retries == 2
    # the backoff after the timeout, then the wait Resend asked for
    assert len(pauses) == 2 and 0.5 <= pauses[0] <= 0.625 and 2.0 <= pauses[1] <= 2.5
    calls = srv.requests[:3]
    assert len({r.headers["idempotency-key"] for r in calls}) == 1 and len({r.body for r in calls}) == 1
    assert [r.ledger_ids for r in calls] == [ids_of(app, EMAILS[:BATCH]), [], []]
    app.close()


def test_resend_leaves_a_garbled_answer_uncertain_and_the_next_run_settles_it_under_its_key(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """A 200 whose body is not JSON is not retried in the run (the provider answered), so the
    batch is uncertain and the draft stays in sending; the next run resends it under the same
    key, the provider answers as the first time, and nobody gets a second copy."""
    install_resend(srv)
    app = open_app(tmp_path, clock, {**PROVIDERS["resend"].delivery, "base_url": srv.url})
    srv.faults.append(("garbage",))
    first = send(app, [])

    assert copies(srv) == once(EMAILS)
    rows = ledger(app)
    assert with_status(rows, "uncertain") == EMAILS[:BATCH]
    assert with_status(rows, "sent") == EMAILS[BATCH:]
    assert first.uncertain == BATCH and first.retries == 0 and first.resendable == BATCH
    assert not first.finished and first.for_operator == 0

    second = send(app, [])
    assert copies(srv) == once(EMAILS)  # the resend delivered nothing new
    assert with_status(ledger(app), "sent") == EMAILS
    assert second.finished and second.sent == BATCH and second.uncertain_total == 0
    garbled, resent = srv.requests[0], srv.requests[-1]
    assert resent.headers["idempotency-key"] == garbled.headers["idempotency-key"]
    assert (garbled.ledger_ids, resent.ledger_ids) == (ids_of(app, EMAILS[:BATCH]), [])
    app.close()


# -- a call refused for good: its reader fails, the batch goes on --------------------------------

# Providers that send a call per reader, and what refuses one reader's call for good.
PER_READER = ["ses", "sendgrid-full-bodies", "mailgun-full-bodies"]
REFUSALS: dict[str, Fault] = {
    "bad-request": ("status", 400),
    "limit-exceeded": ("status", 400, {"x-amzn-ErrorType": "LimitExceededException"}),
}


def errors(app: pipeline.App) -> dict[str, str]:
    with app.store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT s.email, l.error FROM send_ledger l JOIN subscribers s "
                                    "ON s.id = l.subscriber_id WHERE l.status = 'failed'").all()
    return {email: error for email, error in rows}


@pytest.mark.parametrize("bad", [0, BATCH], ids=["first-batch", "second-batch"])
@pytest.mark.parametrize("provider", PER_READER)
def test_a_call_refused_for_good_fails_its_reader_alone(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str, bad: int) -> None:
    """The provider refuses the first call of a batch for good (a 400 about that message):
    that reader's message fails, with the provider's error, and every other reader of the
    batch, never asked about when the refusal came, still gets exactly one copy."""
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.extend([("pass",)] * bad + [REFUSALS["bad-request"]])
    summary = send(app, [])

    assert copies(srv) == once([e for e in EMAILS if e != EMAILS[bad]])
    rows = ledger(app)
    assert with_status(rows, "failed") == [EMAILS[bad]]
    assert with_status(rows, "sent") == sorted(set(EMAILS) - {EMAILS[bad]})
    assert summary.finished and summary.sent == 11 and sum(summary.failed.values()) == 1
    assert summary.uncertain == 0 and summary.retries == 0 and summary.stopped is None
    (error,) = errors(app).values()
    assert "HTTP 400" in error
    app.close()


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_ses_refusing_one_message_for_good_fails_it_alone(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, refusal: str) -> None:
    """SES's answers for one message that no retry fixes (a 400, LimitExceededException) in
    the middle of a batch whose first call it refused too: both readers fail, each with its
    own error; the other two readers of the batch and the other batches get one copy each."""
    install_ses(srv, secret_key=TOKEN)
    app = open_app(tmp_path, clock, {**PROVIDERS["ses"].delivery, "base_url": srv.url})
    srv.faults.extend([REFUSALS[refusal], ("pass",), REFUSALS[refusal]])
    summary = send(app, [])

    refused = [EMAILS[0], EMAILS[2]]
    assert copies(srv) == once([e for e in EMAILS if e not in refused])
    rows = ledger(app)
    assert with_status(rows, "failed") == refused
    assert with_status(rows, "sent") == sorted(set(EMAILS) - set(refused))
    assert summary.finished and summary.sent == 10 and summary.retries == 0
    kind = "LimitExceededException" if refusal == "limit-exceeded" else "BadRequestException"
    assert summary.failed == {"HTTP 400 LimitExceededException" if refusal == "limit-exceeded" else "HTTP 400": 2}
    assert sorted(errors(app)) == refused and all(kind in e for e in errors(app).values())
    app.close()


@pytest.mark.parametrize("provider", PER_READER)
def test_every_call_refused_for_good_fails_the_batches_and_pauses_the_send(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str) -> None:
    """Every call refused for good (a setting the provider rejects, whoever the reader): each
    call of a batch is tried, the batch fails as a whole, and after the configured number of
    failed batches in a row the send pauses with the rest still in the queue, until the
    operator acts: a run that does not resume it sends nothing; the run that does (the
    setting fixed) sends them once."""
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.extend([REFUSALS["bad-request"]] * (2 * BATCH))
    summary = send(app, [], max_consecutive_failures=2)

    assert [r.ledger_ids for r in srv.requests] == [[]] * (2 * BATCH)  # every call tried, none taken
    assert copies(srv) == collections.Counter()
    rows = ledger(app)
    assert with_status(rows, "failed") == EMAILS[: 2 * BATCH]
    assert with_status(rows, "pending") == EMAILS[2 * BATCH:]
    assert not summary.finished and summary.sent == 0 and sum(summary.failed.values()) == 2 * BATCH
    assert summary.stopped and summary.stopped.startswith("paused after 2 failed batches in a row")
    assert summary.held

    passed_by = send(app, [])
    assert passed_by.held and passed_by.batches == 0 and len(srv.requests) == 2 * BATCH
    again = send(app, [], resume=True)
    assert again.finished and again.sent == len(EMAILS) - 2 * BATCH
    assert copies(srv) == once(EMAILS[2 * BATCH:])
    app.close()


# -- Postmark's per-message results ---------------------------------------------------------------


def test_partial_batch_failure_applies_each_result(tmp_path: Path, clock: FrozenClock,
                                                   srv: FakeProviderServer) -> None:
    app = open_app(tmp_path, clock, {**PROVIDERS["postmark"].delivery, "base_url": srv.url})
    srv.faults.append(("partial", {1: (300, "Invalid 'To' address: 'x'")}))
    srv.inactive.add(EMAILS[7])
    summary = send(app, [])
    rows = ledger(app)
    assert summary.finished
    assert with_status(rows, "invalid") == [EMAILS[1]] and with_status(rows, "suppressed") == [EMAILS[7]]
    assert copies(srv) == once([e for e in EMAILS if e not in (EMAILS[1], EMAILS[7])])
    assert with_status(rows, "sent") == sorted(copies(srv))
    app.close()


# -- a refusal of the sender or the account: no reader's fault -----------------------------------

SIGNATURE = ("The 'From' address you supplied (digest@example.org) is not a Sender Signature on your account. "
             "Please add and confirm this address in order to be able to use it in the 'From' field.")
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"


def _refusing_every_reader(provider: str, srv: FakeProviderServer, handler: Handler) -> None:
    """Make the provider refuse every message for the sender, as it does until the operator
    fixes the setup: SES without the From's identity verified in its region, Postmark without
    a confirmed sender signature (ErrorCode 400 in each item of a 200), an SMTP relay that
    will not relay for us (554 to every RCPT)."""
    if provider == "ses":
        srv.ses_identities = {"example.com": True}  # the readers' domain, not the From's (example.org)
    elif provider == "postmark":
        srv.faults.extend([("partial", {i: (400, SIGNATURE) for i in range(BATCH)})] * 3)
    else:
        handler.refuse_rcpt.update({e: RELAY_DENIED.format(e) for e in EMAILS})


def _fixed(provider: str, srv: FakeProviderServer, handler: Handler) -> None:
    if provider == "ses":
        srv.ses_identities = {"example.org": True}  # the From's domain, verified
    elif provider == "postmark":
        srv.faults.clear()
    else:
        handler.refuse_rcpt.clear()


@pytest.mark.parametrize(("provider", "why"), [("ses", "not verified"), ("postmark", "ErrorCode 400"),
                                               ("smtp", "Relay access denied")])
def test_a_refusal_of_the_sender_stops_the_send_and_the_fixed_send_delivers_everyone_once(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, servers: list[EphemeralController],
        provider: str, why: str) -> None:
    """The provider refuses every message for a reason of the sender's (an unverified From, a
    sender signature, a relay that refuses us): the send stops at the first batch, which goes
    back to the queue; nobody is marked rejected, `digest status` says why; once fixed, the
    next send delivers everyone exactly once."""
    handler = Handler()
    if provider == "smtp":
        delivery: dict[str, Any] = {"provider": "smtp", "smtp_host": "127.0.0.1",
                                    "smtp_port": plain(servers, handler).port, "smtp_security": "none"}
    else:
        PROVIDERS[provider].install(srv)
        delivery = {**PROVIDERS[provider].delivery, "base_url": srv.url}
    _refusing_every_reader(provider, srv, handler)
    app = open_app(tmp_path, clock, delivery)
    summary = send(app, [])

    assert summary.blocked and not summary.finished and summary.sent == 0 and not summary.failed
    assert summary.stopped and why in summary.stopped
    assert with_status(ledger(app), "pending") == EMAILS  # nobody rejected: all back in the queue
    assert copies(srv) == collections.Counter() and handler.received == []
    (reason, _when) = pipeline.status(app).stopped[1]
    assert why in reason
    if provider == "ses":  # the first message's refusal stopped the batch: no call after it
        assert len([r for r in srv.requests if r.path == "/v2/email/outbound-emails"]) == 1

    _fixed(provider, srv, handler)
    again = send(app, [])
    assert again.finished and again.sent == len(EMAILS) and not again.failed
    received = (collections.Counter(r.rcpt_tos[0] for r in handler.received) if provider == "smtp"
                else copies(srv))
    assert received == once(EMAILS)
    assert with_status(ledger(app), "sent") == EMAILS
    app.close()


def test_a_postmark_sender_refusal_beside_accepted_messages_sends_nobody_twice(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """One answer mixes accepted messages and a refusal of the sender (unlikely): the accepted
    ones stay sent, the refused ones go back to the queue, and the next batch, refused whole,
    stops the send; once fixed, the rest go out, nobody twice."""
    app = open_app(tmp_path, clock, {**PROVIDERS["postmark"].delivery, "base_url": srv.url})
    srv.faults.append(("partial", {2: (401, "Sender signature not confirmed."),
                                   3: (401, "Sender signature not confirmed.")}))
    srv.faults.extend([("partial", {i: (401, "Sender signature not confirmed.") for i in range(BATCH)})] * 5)
    summary = send(app, [])
    assert summary.blocked and summary.sent == 2 and not summary.failed
    rows = ledger(app)
    assert with_status(rows, "sent") == EMAILS[:2]
    assert with_status(rows, "pending") == EMAILS[2:]
    srv.faults.clear()
    again = send(app, [])
    assert again.finished and again.sent == len(EMAILS) - 2
    assert copies(srv) == once(EMAILS)
    app.close()


# -- SMTP: the server queued the message but answers after the client gave up ------------------


def test_smtp_timeout_after_data_leaves_that_message_uncertain_and_sends_nobody_twice(
        tmp_path: Path, clock: FrozenClock, servers: list[EphemeralController]) -> None:
    """The second message's DATA is accepted and queued, and the 250 comes only after the
    client's timeout (the handler waits for the test to let it answer): that message is
    uncertain and never resent; the first is sent; the two never handed over go back to the
    queue and out once, in a new session."""
    handler = Handler(hold_after_data={EMAILS[1]})
    server = plain(servers, handler)
    app = open_app(tmp_path, clock, {"provider": "smtp", "smtp_host": "127.0.0.1", "smtp_port": server.port,
                                     "smtp_security": "none"})
    try:
        summary = send(app, [])
        assert handler.held == [EMAILS[1]]  # still unanswered when the send ended
    finally:
        handler.released.set()
    received = collections.Counter(r.rcpt_tos[0] for r in handler.received)
    assert received == once(EMAILS)  # the server holds the uncertain one; nobody twice
    rows = ledger(app)
    assert with_status(rows, "uncertain") == [EMAILS[1]]
    assert with_status(rows, "sent") == [e for e in EMAILS if e != EMAILS[1]]
    assert summary.uncertain == 1 and summary.retries == 0 and summary.finished
    app.close()


# -- an error page from a proxy in front of the provider ------------------------------------------

# Where each provider's send goes (with its default settings): the route a proxy answers instead.
SEND_PATHS = {"postmark": "/email/batch", "sendgrid": "/v3/mail/send", "mailgun": f"/v3/{DOMAIN}/messages",
              "ses": "/v2/email/outbound-emails", "resend": "/emails/batch"}


def proxy_page(status: int) -> bytes:
    """nginx's error page for ``status``, as it comes: CRLF lines, markup, a title."""
    title = f"{status} {HTTPStatus(status).phrase}"
    return (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>"
            "\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n").encode()


def texts_for_the_operator(app: pipeline.App, summary: SendSummary) -> list[str]:
    """Everything that tells the operator why: the run's message, each ledger row's error, the
    reason of the send's hold."""
    with app.store.engine.connect() as conn:
        rows = [e for (e,) in conn.exec_driver_sql("SELECT error FROM send_ledger WHERE error IS NOT NULL").all()]
    hold = app.store.send_hold(1)
    return [t for t in (summary.stopped, *rows, hold.reason if hold else None) if t]


@pytest.mark.parametrize("status", [413, 429, 500])
@pytest.mark.parametrize("provider", sorted(SEND_PATHS))
def test_a_proxys_html_error_page_reaches_the_operator_as_one_line(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str, status: int) -> None:
    """A proxy in front of the provider answers every send with its HTML page (413 too large,
    429, 500): whatever the provider makes of it (retried, failed, the send stopped or held),
    what the operator reads (the run's message, the ledger's errors, the hold's reason) is one
    line each, naming the status, with no markup; the page's title may be quoted."""
    via = PROVIDERS[provider]
    via.install(srv)
    page = proxy_page(status)
    srv.route("POST", SEND_PATHS[provider], lambda s, r: Reply(status, page, content_type="text/html"))
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    summary = send(app, [], max_consecutive_failures=2)

    texts = texts_for_the_operator(app, summary)
    assert summary.stopped and f"HTTP {status}" in summary.stopped  # the operator is told
    for text in texts:
        assert "\n" not in text and "\r" not in text and "<" not in text, text
    assert copies(srv) == collections.Counter()
    app.close()



@pytest.mark.parametrize(("status", "fix"), [(413, "delivery.batch_size"), (407, "HTTPS_PROXY")])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_a_request_too_large_or_a_proxy_wanting_credentials_stops_the_send_with_nobody_failed(
        tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer, provider: str, status: int, fix: str) -> None:
    """A 413 (too large for the provider, or a proxy in front of it) or a proxy's 407 would
    meet every batch alike: the send stops at once naming what to change, the batch back in the
    queue. Before, Postmark, SES and Resend failed the batch's readers for good."""
    via = PROVIDERS[provider]
    via.install(srv)
    app = open_app(tmp_path, clock, {**via.delivery, "base_url": srv.url})
    srv.faults.extend([("status", status)] * 4)
    summary = send(app, [])
    assert summary.blocked and not summary.finished
    assert summary.sent == 0 and not summary.failed and summary.uncertain == 0
    assert f"HTTP {status}" in (summary.stopped or "") and fix in (summary.stopped or "")
    assert set(ledger(app).values()) == {"pending"}
    assert copies(srv) == collections.Counter()
    app.close()
