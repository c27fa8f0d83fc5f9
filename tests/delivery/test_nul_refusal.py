"""A provider's answer holding a NUL (which PostgreSQL text cannot hold) is still recorded: the
verdict is written, not left claimed to turn uncertain. Run on SQLite and, with
DIGEST_TEST_POSTGRES_URL, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from digest import pipeline
from digest.store import Store
from digest.types import SendResult
from tests.conftest import NOW, FrozenClock, make_settings
from tests.fakes.provider_server import FakeProviderServer

TOKEN = "nul-token"
EMAILS = [f"n{i}@example.com" for i in range(4)]
REFUSAL = "Invalid\x00 x"


@contextmanager
def postmark_app(tmp_path: Path, db_url: str, clock: FrozenClock, srv: FakeProviderServer,
                 emails: list[str]) -> Iterator[pipeline.App]:
    """An app sending through ``srv``'s Postmark in batches of 2, without retries, with
    ``emails`` subscribed and a draft approved, ready to send."""
    settings = make_settings(tmp_path, db_url, digest={"approval": {"required": False}}, delivery={
        "provider": "postmark", "api_key": srv.token, "base_url": srv.url, "batch_size": 2, "concurrency": 1,
        "max_retries": 0, "rate_per_second": 1000})
    app = pipeline.App.open(settings, clock)
    try:
        app.store.upsert_subscribers([(e, "") for e in emails], "cli", clock())
        pipeline.collect(app)
        assert pipeline.make_draft(app).draft is not None
        yield app
    finally:
        app.close()


def test_a_refusal_with_a_nul_fails_its_batch_and_the_send_goes_on(tmp_path: Path, db_url: str,
                                                                    clock: FrozenClock) -> None:
    with FakeProviderServer(token=TOKEN) as srv, postmark_app(tmp_path, db_url, clock, srv, EMAILS) as app:
        srv.faults.append(("status", 422, {}, {"ErrorCode": 300, "Message": REFUSAL}))
        (summary,) = pipeline.send(app)
        assert summary.finished and summary.sent == 2 and summary.uncertain == 0
        assert app.store.ledger_counts(summary.draft_id) == {"failed": 2, "sent": 2}
        failed = app.store.messages_in(summary.draft_id, ("failed",))
        assert [m.email for m in failed] == EMAILS[:2]
        assert all("Invalid\ufffd x" in m.error for m in failed), failed
        assert app.store.uncertain_messages(summary.draft_id) == []


@pytest.fixture
def draft_id(store: Store) -> Iterator[int]:
    from tests.store.test_store import _sending

    yield _sending(store, [f"s{i}@x.org" for i in range(6)])


def _errors(store: Store, draft_id: int) -> dict[str, str]:
    return {m.email: m.error for m in store.messages_in(draft_id, ("failed", "uncertain", "rejected", "sent"))}


@pytest.mark.parametrize("how", ["settle", "settle_ranged", "settle_rows", "mark_uncertain", "record_calls"])
def test_every_verdict_keeps_a_provider_error_with_a_nul(store: Store, draft_id: int, how: str) -> None:
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 3, "me", NOW)
    ids = [c.ledger_id for c in batch]
    if how == "settle":  # one verdict for the batch
        store.settle([SendResult(i, "failed", None, REFUSAL) for i in ids], "postmark", NOW, batch)
    elif how == "settle_ranged":  # most alike, one apart
        store.settle([SendResult(ids[0], "rejected", "m0", REFUSAL)]
                     + [SendResult(i, "sent", f"m{i}") for i in ids[1:]], "postmark", NOW, batch)
    elif how == "settle_rows":  # row by row, with message ids of their own
        store.settle([SendResult(i, "failed", f"m{i}", f"{REFUSAL} {i}") for i in ids], "postmark", NOW)
    elif how == "mark_uncertain":
        store.mark_uncertain(ids, REFUSAL, NOW, batch)
    else:
        store.record_calls(batch, draft_id, ids[1:], [SendResult(ids[0], "failed", None, REFUSAL)], "postmark", NOW)
    errors = [e for e in _errors(store, draft_id).values() if e]
    assert errors and all("\x00" not in e and e.startswith("Invalid\ufffd x") for e in errors), errors


def test_a_release_keeps_a_reason_with_a_nul(store: Store, draft_id: int) -> None:
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 3, "me", NOW)
    store.release([c.ledger_id for c in batch], REFUSAL, NOW, batch)
    assert store.ledger_counts(draft_id) == {"pending": 6}
    with store.engine.connect() as conn:
        reasons = {r for (r,) in conn.exec_driver_sql("SELECT error FROM send_ledger WHERE status = 'queued'")}
    assert reasons == {"Invalid\ufffd x"}
