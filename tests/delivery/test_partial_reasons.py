"""A batch sent as several calls that stops with some calls unanswered (PartialBatchError):
each uncertain message's reason is its own call's failure, not the batch's tally, even when
the calls in flight failed in different ways; the rest of the batch is known (sent) or
deferred, and through the sender goes back to the queue and out exactly once.

The SES tests run real calls through the fake provider server. Calls in flight together take
the fault queue in whatever order they arrive, so the fake here records which fault each
request took (by the ledger id it carried), and holds the first requests at a barrier until
all of them have arrived: a fast failure cannot stop the batch before the others are sent.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from digest import pipeline
from digest.config import Delivery
from digest.delivery.providers.base import PartialBatchError
from digest.delivery.providers.ses import SesProvider
from tests.conftest import FrozenClock, make_settings
from tests.delivery.conftest import MessageFactory
from tests.delivery.test_smtp import EphemeralController, Handler, plain
from tests.delivery.test_smtp import provider as smtp_provider
from tests.fakes.provider_server import FakeProviderServer, Fault, Request, install_ses, ses_send

KEY, SECRET, REGION = "AKIDTEST", "ses-test-secret", "eu-west-1"
SEND_PATH = "/v2/email/outbound-emails"
TIMEOUT = 0.5  # the client's; a ("delay", DELAY) outlives it
DELAY = 5.0


class Gate:
    """Installed on a fake SES: records the fault each send took by ledger id, and holds the
    first ``parties`` sends until all of them have arrived."""

    def __init__(self, srv: FakeProviderServer, parties: int) -> None:
        self.taken: dict[int, Fault | None] = {}
        self._parties = parties
        self._arrived = 0
        self._barrier = threading.Barrier(parties, timeout=5)
        self._local = threading.local()
        self._next_fault = srv._next_fault
        # A request's fault is taken in its handler's thread, just before its route runs.
        srv._next_fault = self._take  # type: ignore[method-assign]
        srv.route("POST", SEND_PATH, self._send)

    def _take(self) -> Fault | None:
        fault = self._next_fault()
        self._local.fault = fault
        return fault

    def _send(self, srv: FakeProviderServer, request: Request) -> Any:
        tags = {t["Name"]: t["Value"] for t in request.json()["EmailTags"]}
        with srv.lock:
            self.taken[int(tags["ledger_id"])] = self._local.fault
            self._arrived += 1
            held = self._arrived <= self._parties
        if held:
            try:
                self._barrier.wait()
            except threading.BrokenBarrierError:  # fewer calls came: answer anyway
                pass
        return ses_send(srv, request)

    def ids_with(self, kind: str) -> list[int]:
        return sorted(i for i, f in self.taken.items() if f and f[0] == kind)


def expected_reason(srv: FakeProviderServer, fault: Fault) -> str:
    """What the SES provider says, for one message, of a call that met ``fault``."""
    url = f"{srv.url}{SEND_PATH}"
    sent = "; the request was sent, so the provider may have accepted the messages"
    return {
        "reset": f"ses: calling {url}: the connection was closed before an answer{sent}",
        "delay": f"ses: calling {url}: timed out waiting for the answer{sent}",
        "garbage": "ses: HTTP 200 with a body that is not JSON; the provider may have accepted the messages",
    }[fault[0]]


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token="unused") as server:
        install_ses(server, access_key=KEY, secret_key=SECRET, region=REGION)
        yield server


def ses(srv: FakeProviderServer, concurrency: int) -> SesProvider:
    return SesProvider(Delivery(
        provider="ses", region=REGION, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
        base_url=srv.url, timeout=TIMEOUT, concurrency=concurrency,
    ))


def assert_no_tally(reason: str) -> None:
    assert "message(s)" not in reason and "accepted, " not in reason and "of the other" not in reason


def test_three_calls_failing_three_ways_each_keep_their_own_reason(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    faults: list[Fault] = [("reset", "after"), ("delay", DELAY), ("garbage",)]
    srv.faults.extend(faults)
    gate = Gate(srv, parties=3)
    with ses(srv, concurrency=3) as provider, pytest.raises(PartialBatchError) as info:
        provider.send_batch([make_message(i) for i in range(1, 7)])
    err = info.value

    # The three calls in flight reached the fake (which accepted all three); no other started.
    assert sorted(gate.taken) == sorted(srv.ledger_ids) == [1, 2, 3]
    assert sorted(f for f in gate.taken.values() if f) == sorted(faults)
    assert err.uncertain == (1, 2, 3)

    # Each uncertain message: its own call's failure, nothing about the batch.
    assert set(err.reasons) == {1, 2, 3}
    for ledger_id, fault in gate.taken.items():
        assert fault is not None
        assert err.reasons[ledger_id] == expected_reason(srv, fault), fault
        assert_no_tally(err.reasons[ledger_id])
    assert len(set(err.reasons.values())) == 3
    assert err.uncertain_by_reason() == [(err.reasons[i], [i]) for i in (1, 2, 3)]

    # The calls never made: deferred (not sent), saying why.
    assert [(r.ledger_id, r.status) for r in err.results] == [(4, "deferred"), (5, "deferred"), (6, "deferred")]
    assert all((r.error or "").startswith("not sent: the batch stopped when another call failed (ses: ")
               for r in err.results)

    # The summary, for logs: the tally and every distinct failure.
    summary = str(err)
    assert summary.startswith("ses: 3 message(s) may have been accepted although their call failed (")
    assert summary.endswith("; of the other 3: 0 accepted, 3 not sent")
    assert all(reason in summary for reason in err.reasons.values())


def test_accepted_calls_stay_sent_beside_the_uncertain_ones(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.extend([(), ("reset", "after"), ("garbage",)])
    gate = Gate(srv, parties=3)
    with ses(srv, concurrency=3) as provider, pytest.raises(PartialBatchError) as info:
        provider.send_batch([make_message(i) for i in range(1, 6)])
    err = info.value
    (answered,) = [i for i, f in gate.taken.items() if f == ()]
    (reset,), (garbage,) = gate.ids_with("reset"), gate.ids_with("garbage")
    assert sorted(err.uncertain) == sorted([reset, garbage])
    assert err.reasons == {reset: expected_reason(srv, ("reset",)), garbage: expected_reason(srv, ("garbage",))}
    by_id = {r.ledger_id: r.status for r in err.results}
    assert by_id == {answered: "sent", 4: "deferred", 5: "deferred"}
    assert str(err).endswith("; of the other 3: 1 accepted, 2 not sent")


def test_calls_failing_alike_share_one_reason(srv: FakeProviderServer, make_message: MessageFactory) -> None:
    srv.faults.extend([("reset", "after"), ("reset", "after")])
    Gate(srv, parties=2)
    with ses(srv, concurrency=2) as provider, pytest.raises(PartialBatchError) as info:
        provider.send_batch([make_message(i) for i in range(1, 4)])
    err = info.value
    reason = expected_reason(srv, ("reset",))
    assert err.uncertain == (1, 2) and err.reasons == {1: reason, 2: reason}
    assert err.uncertain_by_reason() == [(reason, [1, 2])]
    assert f"({reason} [2 messages])" in str(err)


def test_reasons_default_to_the_message_for_a_hand_made_error() -> None:
    err = PartialBatchError("connection lost during DATA", results=[], uncertain=[3, 4], reasons={4: "own"})
    assert err.reasons == {3: "connection lost during DATA", 4: "own"}
    assert err.uncertain_by_reason() == [("connection lost during DATA", [3]), ("own", [4])]


# -- SMTP: one transaction per message ---------------------------------------------------------


def test_smtp_connection_lost_during_data_is_that_messages_reason(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers, Handler(drop_after_data={"reader2@example.com"}))
    with pytest.raises(PartialBatchError) as info:
        smtp_provider(server).send_batch([make_message(i) for i in (1, 2, 3)])
    err = info.value
    assert err.uncertain == (2,) and set(err.reasons) == {2}
    reason = err.reasons[2]
    assert reason.startswith("smtp: connection lost while sending the message to reader2@example.com: ")
    assert reason.endswith("; the server may have accepted it")
    assert_no_tally(reason)
    assert [(r.ledger_id, r.status) for r in err.results] == [(1, "sent"), (3, "deferred")]
    assert str(err).startswith("smtp: 1 message(s) may have been accepted") and reason in str(err)


# -- through the sender: the rest of the batch goes back to the queue, out once ---------------

EMAILS = [f"p{i:02d}@example.com" for i in range(10)]


def test_through_the_sender_the_rest_of_the_batch_is_sent_once(
    tmp_path: Path, clock: FrozenClock, srv: FakeProviderServer
) -> None:
    settings = make_settings(tmp_path, digest={"approval": {"required": False}}, delivery={
        "provider": "ses", "region": REGION, "aws_access_key_id": KEY, "aws_secret_access_key": SECRET,
        "base_url": srv.url, "batch_size": 6, "concurrency": 3, "max_retries": 2, "timeout": TIMEOUT})
    app = pipeline.App.open(settings, clock)
    try:
        app.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
        pipeline.collect(app)
        pipeline.make_draft(app)
        faults: list[Fault] = [("reset", "after"), ("delay", DELAY), ("garbage",)]
        srv.faults.extend(faults)
        gate = Gate(srv, parties=3)
        (summary,) = pipeline.send(app)
        ledger = {email: status for _id, email, status in app.store.ledger_rows(summary.draft_id)}
        uncertain = app.store.uncertain_messages(summary.draft_id)
    finally:
        app.close()

    received = collections.Counter(m["to"] for m in srv.messages)
    # The three calls in flight are uncertain (the fake took them all); nobody got two copies,
    # nobody was left out: the three never-made calls of that batch went back to the queue
    # and out once, with the rest.
    assert summary.finished and summary.uncertain == 3 and summary.sent == len(EMAILS) - 3
    assert set(received) == set(EMAILS) and set(received.values()) == {1}
    assert {e for e, s in ledger.items() if s == "uncertain"} == {m.email for m in uncertain}
    assert {e for e, s in ledger.items() if s == "sent"} == set(EMAILS) - {m.email for m in uncertain}
    assert sorted(m.ledger_id for m in uncertain) == sorted(i for i, f in gate.taken.items() if f)
    # Each uncertain row names its own call's failure (alone once the sender records
    # PartialBatchError.reasons; within the batch's summary before that).
    for m in uncertain:
        fault = gate.taken[m.ledger_id]
        assert fault is not None and expected_reason(srv, fault) in m.error
