"""A sender on a host with a long name (EC2's ``ip-172-31-122-133.ap-southeast-2.compute.internal``):
its lease holder, ``host:pid:random``, runs past the 64 characters of ``send_batches.claim_token``,
which PostgreSQL enforces. Run on SQLite and, with DIGEST_TEST_POSTGRES_URL, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from digest import pipeline
from digest.delivery import sender as sender_module
from digest.delivery.sender import holder_is_dead, lease_holder
from digest.types import SendResult
from tests.conftest import FrozenClock, make_settings
from tests.delivery.test_takeover import _sender
from tests.fakes.scripted_provider import ScriptedProvider

LONG_HOST = "ip-172-31-122-133.ap-southeast-2.compute.internal"
EMAILS = [f"h{i}@example.com" for i in range(5)]


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[pipeline.App]:
    monkeypatch.setattr(sender_module, "HOST", LONG_HOST)
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}},
                             delivery={"max_retries": 0, "rate_per_second": 1000, "concurrency": 1})
    a = pipeline.App.open(settings, clock)
    a.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
    pipeline.collect(a)
    assert pipeline.make_draft(a).draft is not None
    yield a
    a.close()




class _LosesFirstAnswers(ScriptedProvider):
    """A provider with idempotency keys whose first ``lose`` answers are lost (uncertain)."""

    idempotent = True

    def __init__(self, lose: int) -> None:
        super().__init__()
        self.lose = lose
        self.answers: dict[tuple[int, ...], list[SendResult]] = {}

    def send_batch(self, messages):  # type: ignore[no-untyped-def]
        from digest.delivery.providers.base import UncertainDeliveryError

        self.calls.append(list(messages))
        key = tuple(m.ledger_id for m in messages)
        if key not in self.answers:
            self.delivered.extend(messages)
            self.answers[key] = [SendResult(m.ledger_id, "sent", f"id-{m.ledger_id}") for m in messages]
        if self.lose:
            self.lose -= 1
            raise UncertainDeliveryError("connection reset after sending", retryable=True)
        return self.answers[key]


def test_a_sender_on_a_host_with_a_long_name_sends_everyone_once(app: pipeline.App) -> None:
    holder = lease_holder()
    assert len(holder) > 64 and holder.startswith(LONG_HOST + ":")
    provider = ScriptedProvider()
    summary = _sender(app, provider).run()
    assert summary.sent == 5 and summary.finished
    assert sorted(m.to_email for m in provider.delivered) == EMAILS
    assert app.store.ledger_counts(summary.draft_id) == {"sent": 5}


def test_a_sender_on_a_host_with_a_long_name_resends_its_uncertain_batches_under_their_keys(
        app: pipeline.App) -> None:
    """The other place a claim writes its token: uncertain batches claimed again."""
    first = _LosesFirstAnswers(lose=100)
    summary = _sender(app, first).run()
    assert summary.uncertain == 5 and summary.sent == 0
    later = _LosesFirstAnswers(lose=0)
    later.answers, later.delivered = first.answers, first.delivered  # the provider keeps its keys
    resumed = _sender(app, later).run()
    assert resumed.finished and app.store.ledger_counts(resumed.draft_id) == {"sent": 5}
    assert sorted(m.to_email for m in later.delivered) == EMAILS  # each exactly once


def test_a_dead_sender_of_this_host_is_still_known_by_its_lease(app: pipeline.App) -> None:
    """The lease keeps the holder itself (``leases.holder`` is 200 characters): a holder of this
    long-named host whose process is gone is dead; one of another host is trusted."""
    assert not holder_is_dead(lease_holder())  # ourselves
    assert holder_is_dead(f"{LONG_HOST}:{2 ** 22 + 1}:0123456789ab")  # past Linux's largest pid
    assert not holder_is_dead(f"{LONG_HOST}x:{2 ** 22 + 1}:0123456789ab")


def test_a_claim_token_fits_its_column_and_stays_one_per_holder() -> None:
    from digest.store.store import claim_token

    long_a, long_b = f"{LONG_HOST}:4194304:0123456789ab", f"{LONG_HOST}:4194304:0123456789ac"
    assert len(claim_token(long_a)) <= 64 and claim_token(long_a) == claim_token(long_a)
    assert claim_token(long_a) != claim_token(long_b)
    assert claim_token("host:12:0123456789ab") == "host:12:0123456789ab"  # a holder that fits is itself
    assert claim_token(claim_token(long_a)) == claim_token(long_a)
