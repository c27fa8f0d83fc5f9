"""Every fault the issue lists, through the real sender against the fake Postmark server;
each asserts exactly what every subscriber received."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from digest import pipeline
from tests.conftest import FrozenClock, make_settings
from tests.fakes.provider_server import FakeProviderServer

TOKEN = "fault-token"
EMAILS = [f"f{i:02d}@example.com" for i in range(12)]


def run(tmp_path: Path, clock: FrozenClock, faults: list[tuple], inactive: set[str] = frozenset()
        ) -> tuple[dict[str, int], dict[str, str], pipeline.SendSummary]:  # type: ignore[type-arg]
    with FakeProviderServer(token=TOKEN) as srv:
        settings = make_settings(tmp_path, digest={"approval": {"required": False}}, delivery={
            "provider": "postmark", "api_key": TOKEN, "base_url": srv.url, "batch_size": 4,
            "concurrency": 1, "max_retries": 4, "timeout": 1.0})
        app = pipeline.App.open(settings, clock)
        app.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
        pipeline.collect(app)
        pipeline.make_draft(app)
        srv.faults.extend(faults)
        srv.inactive.update(inactive)
        (summary,) = pipeline.send(app)
        ledger = {email: status for _id, email, status in app.store.ledger_rows(1)}
        app.close()
        received = collections.Counter(m["To"] for m in srv.messages)
    return received, ledger, summary


def by_status(ledger: dict[str, str], status: str) -> set[str]:
    return {e for e, s in ledger.items() if s == status}


@pytest.mark.parametrize("faults", [
    [("status", 429, {"Retry-After": "0"})],
    [("status", 429)],
    [("status", 500), ("status", 502), ("status", 503)],
], ids=["429-retry-after", "429-no-retry-after", "500-burst"])
def test_retryable_faults_deliver_everyone_once(tmp_path: Path, clock: FrozenClock, faults: list[tuple]) -> None:  # type: ignore[type-arg]
    received, ledger, summary = run(tmp_path, clock, faults)
    assert summary.finished and summary.sent == 12
    assert set(received) == set(EMAILS) and set(received.values()) == {1}
    assert by_status(ledger, "sent") == set(EMAILS)


@pytest.mark.parametrize("fault", [("delay", 2.5), ("reset", "after"), ("garbage",)],
                         ids=["timeout-after-accept", "reset-after-accept", "garbage-body"])
def test_accepted_but_unanswered_batches_are_uncertain_never_resent(tmp_path: Path, clock: FrozenClock,
                                                                   fault: tuple) -> None:  # type: ignore[type-arg]
    received, ledger, summary = run(tmp_path, clock, [fault])
    uncertain = by_status(ledger, "uncertain")
    assert len(uncertain) == 4 and summary.uncertain == 4
    assert set(received.values()) == {1}  # nobody twice
    assert set(received) == set(EMAILS)  # the fake did take the first batch
    assert by_status(ledger, "sent") == set(EMAILS) - uncertain


def test_reset_before_the_request_arrives(tmp_path: Path, clock: FrozenClock) -> None:
    received, ledger, _summary = run(tmp_path, clock, [("reset", "before")])
    assert set(received.values()) == {1}
    # Whatever the client concluded, nobody got two copies and nobody is lost silently:
    assert set(received) | by_status(ledger, "uncertain") == set(EMAILS)
    assert by_status(ledger, "sent") <= set(received)


def test_partial_batch_failure_applies_each_result(tmp_path: Path, clock: FrozenClock) -> None:
    received, ledger, summary = run(tmp_path, clock, [("partial", {1: (300, "Invalid 'To' address: 'x'")})],
                                    inactive={EMAILS[7]})
    assert summary.finished
    invalid, suppressed = by_status(ledger, "invalid"), by_status(ledger, "suppressed")
    assert len(invalid) == 1 and suppressed == {EMAILS[7]}
    assert by_status(ledger, "sent") == set(EMAILS) - invalid - suppressed == set(received)
