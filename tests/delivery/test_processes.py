"""delivery.processes: helper processes claim from the same ledger as the sender that holds
the lease; every subscriber still gets exactly one copy, and a stop in one stops them all."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from digest import pipeline
from tests.conftest import FrozenClock, make_settings
from tests.fakes.provider_server import FakeProviderServer

TOKEN = "processes-token"
EMAILS = [f"p{i:02d}@example.com" for i in range(60)]


def _app(tmp_path: Path, db_url: str, clock: FrozenClock, url: str, token: str,
         concurrency: int = 1) -> pipeline.App:
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}}, delivery={
        "provider": "postmark", "api_key": token, "base_url": url, "batch_size": 2,
        "concurrency": concurrency, "processes": 2, "rate_per_second": 1000, "timeout": 10})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
    pipeline.collect(app)
    pipeline.make_draft(app)
    return app


def test_two_processes_send_everyone_exactly_once(tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    with FakeProviderServer(token=TOKEN) as srv:
        # Each answer takes a moment, so the helper process is up before the parent is done.
        srv.faults.extend([("delay", 0.25)] * 30)
        app = _app(tmp_path, db_url, clock, srv.url, TOKEN)
        progress: list[tuple[int, int, int]] = []
        (summary,) = pipeline.send(app, on_batch=lambda s, size: progress.append((size, s.done, s.total)))
        with app.store.engine.connect() as conn:
            holders = conn.exec_driver_sql("SELECT DISTINCT claim_token FROM send_batches").all()
        ledger = {email: status for _id, email, status in app.store.ledger_rows(1)}
        app.close()
        received = collections.Counter(m["To"] for m in srv.messages)
    assert summary.finished and summary.stopped is None
    assert summary.sent == len(EMAILS) and summary.batches == len(EMAILS) // 2
    assert set(received) == set(EMAILS) and set(received.values()) == {1}
    assert set(ledger.values()) == {"sent"}
    assert len(holders) == 2  # both processes claimed batches
    # Progress counts every process's batches, as they go.
    assert summary.total == len(EMAILS)
    assert len(progress) == summary.batches and sum(size for size, _, _ in progress) == len(EMAILS)
    assert [done for _, done, _ in progress] == sorted(done for _, done, _ in progress)
    assert progress[-1][1:] == (len(EMAILS), len(EMAILS))


def test_refused_credentials_stop_every_process(tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    with FakeProviderServer(token=TOKEN) as srv:
        app = _app(tmp_path, db_url, clock, srv.url, "wrong-token")
        (summary,) = pipeline.send(app)
        ledger = {email: status for _id, email, status in app.store.ledger_rows(1)}
        app.close()
        assert srv.messages == []
    assert not summary.finished and "refused the credentials" in (summary.stopped or "")
    assert summary.sent == 0
    assert set(ledger.values()) == {"pending"}  # nothing in flight is left claimed


def test_a_failure_before_the_audience_is_frozen_stops_the_waiting_helpers(
        tmp_path: Path, db_url: str, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Helpers start while the parent freezes the audience and claim only once it is frozen:
    when freezing fails, they stop without a claim and the send reports the failure."""
    import multiprocessing

    from digest.delivery.sender import Sender, SendSummary
    from digest.errors import StoreError
    from digest.store import Store

    with FakeProviderServer(token=TOKEN) as srv:
        app = _app(tmp_path, db_url, clock, srv.url, TOKEN)

        def broken(self: Store, draft_id: int, now: object, should_stop: object = None) -> int:
            raise StoreError("database error: the disk is full")

        started: list[multiprocessing.process.BaseProcess] = []
        start_helpers = Sender._start_helpers

        def spy(self: Sender, summary: SendSummary) -> list[Any]:
            helpers = start_helpers(self, summary)
            started.extend(helpers[1:])  # after the thread that listens to them
            return helpers

        monkeypatch.setattr(Store, "start_send", broken)
        monkeypatch.setattr(Sender, "_start_helpers", spy)
        with pytest.raises(StoreError, match="disk is full"):
            pipeline.send(app)
        ledger = app.store.ledger_rows(1)
        app.close()
        assert srv.messages == []
    assert ledger == []
    assert len(started) == 1  # the helper was started before the audience was frozen ...
    assert [proc.exitcode for proc in started] == [0]  # ... and stopped cleanly, without a claim
    assert multiprocessing.active_children() == []


def test_a_helper_killed_mid_send_stops_the_send_and_its_batch_is_uncertain_next_time(
        tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    """kill -9 of a helper process alone: the parent stops the send and says what the helper
    had in flight, apart from what waits; the next send marks that uncertain and sends the rest,
    each reader once."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    with FakeProviderServer(token=TOKEN) as srv:
        srv.faults.extend([("delay", 0.3)] * 200)  # every answer slow: batches stay in flight
        app = _app(tmp_path, db_url, clock, srv.url, TOKEN)
        out: list[Any] = []
        sending = threading.Thread(target=lambda: out.extend(pipeline.send(app)))
        sending.start()
        deadline = time.monotonic() + 30
        killed = False
        while time.monotonic() < deadline and not killed:
            with app.store.engine.connect() as conn:
                holders = {t for (t,) in conn.exec_driver_sql(
                    "SELECT DISTINCT claim_token FROM send_batches WHERE status = 'claimed'").all()}
            helpers = multiprocessing.active_children()
            mine = [p for p in helpers if any(f":{p.pid}:" in h for h in holders)]
            if mine:
                os.kill(mine[0].pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        sending.join(60)
        assert killed, "no helper process held a batch"
        (first,) = out
        assert not first.finished and "a helper process died" in (first.stopped or "")
        assert first.in_flight == 2  # the helper's batch (batch_size 2)
        assert first.pending + first.in_flight + first.sent == len(EMAILS)
        srv.faults.clear()
        (second,) = pipeline.send(app)
        app.close()
        received = collections.Counter(m["To"] for m in srv.messages)
    assert second.stale == 2 and second.finished
    assert set(received.values()) == {1}  # nobody twice
    assert len(received) in (len(EMAILS) - 2, len(EMAILS))  # the two in flight: delivered or not, once at most


def test_failed_batches_in_a_row_are_counted_across_processes(tmp_path: Path, db_url: str,
                                                              clock: FrozenClock) -> None:
    """The streak of batches refused for good is the send's, whichever process sent them: the
    send pauses (for the operator) after three in all, the other process's batch in flight
    then settling, not after three in each process."""
    with FakeProviderServer(token=TOKEN) as srv:
        # Every batch is refused for good (a setting the provider rejects, whoever the reader).
        # The first two rounds are held until each process has its batch in flight (each sends
        # one at a time), so that both fail two batches: then three in all are in a row.
        rounds = [threading.Event(), threading.Event()]
        srv.faults.extend([("hold", rounds[0], 400)] * 2 + [("hold", rounds[1], 400)] * 2 + [("status", 400)] * 40)

        def release_each_round_once_both_are_in_flight() -> None:
            deadline = time.monotonic() + 30
            for n, released in enumerate(rounds, 1):
                while len(srv.held) < 2 * n and time.monotonic() < deadline:
                    time.sleep(0.01)
                released.set()

        threading.Thread(target=release_each_round_once_both_are_in_flight, daemon=True).start()
        app = _app(tmp_path, db_url, clock, srv.url, TOKEN)
        (summary,) = pipeline.send(app)
        counts = app.store.ledger_counts(1)
        with app.store.engine.connect() as conn:
            holders = conn.exec_driver_sql("SELECT claim_token FROM send_batches").all()
        # Two batches each; the third failed in a row paused the send, the fourth was in flight.
        assert len(set(holders)) == 2
        assert counts == {"failed": 4 * 2, "pending": len(EMAILS) - 4 * 2}, counts  # batches of two
        assert summary.held and (summary.stopped or "").startswith("paused after 3 failed batches in a row")
        hold = app.store.send_hold(1)
        assert hold is not None and hold.batches == 3
        app.close()


def test_a_helper_refused_credentials_while_the_parent_waits_to_retry_says_so(
        tmp_path: Path, db_url: str, clock: FrozenClock) -> None:
    """A parent's worker waits out a Retry-After when a helper's batch meets refused
    credentials: the wait ends, and the send says what the helper met, not "stopped on request"
    (which the waiting worker used to give as its own reason before the helper's report came,
    and which then stood)."""
    from tests.fakes.provider_server import Reply, postmark_batch

    bad = {"ErrorCode": 10, "Message": "The Server Token you provided was invalid."}
    lock = threading.Lock()
    calls = [0]

    def batch(srv: FakeProviderServer, request: Any) -> Reply:
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 1:  # the parent's first worker: come back in a minute
            return Reply.of_json(429, {"ErrorCode": 429, "Message": "Rate limit exceeded"}, {"Retry-After": "60"})
        if n == 2:  # the parent's other worker: a slow answer, so the next call is the helper's
            time.sleep(4)
            return postmark_batch(srv, request)
        if n == 3:  # the helper: the token was revoked meanwhile
            return Reply.of_json(401, bad)
        time.sleep(2)  # the helper's other batch in flight (its report comes after it)
        return Reply.of_json(401, bad)

    with FakeProviderServer(token=TOKEN) as srv:
        srv.route("POST", "/email/batch", batch)
        app = _app(tmp_path, db_url, clock, srv.url, TOKEN, concurrency=2)
        started = time.monotonic()
        (summary,) = pipeline.send(app)
        took = time.monotonic() - started
        ledger = collections.Counter(status for _id, _email, status in app.store.ledger_rows(1))
        app.close()
        received = len(srv.messages)
    assert summary.blocked and not summary.finished
    assert "refused the credentials" in (summary.stopped or ""), summary.stopped
    assert took < 30  # the minute's wait ended with the helper's stop
    assert received == 2 and ledger == {"sent": 2, "pending": len(EMAILS) - 2}  # the rest back in the queue
