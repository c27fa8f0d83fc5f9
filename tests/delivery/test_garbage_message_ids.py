"""A provider's answer whose message id holds a NUL (which PostgreSQL text cannot hold), other
control characters, or thousands of characters, is still recorded: the messages settle as
sent, with the id cleaned, and the send goes on (a verdict that could not be written would stop
it, rule 9, for what is only a garbage id). Run on SQLite and, with DIGEST_TEST_POSTGRES_URL,
on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from digest import pipeline
from digest.store import Store
from digest.store.store import storable_message_id
from digest.types import SendResult
from tests.conftest import NOW, FrozenClock
from tests.delivery.test_nul_refusal import postmark_app
from tests.fakes.provider_server import FakeProviderServer, Reply, Request, postmark_batch

TOKEN = "garbage-id-token"
NUL_ID = "pm-\x00-1"
BELL_ID = "pm-\x07\r\n-2\u2028"
LONG_ID = "pm-" + "x" * 5000


def _ids(store: Store) -> tuple[dict[str, str | None], list[tuple[str | None, str | None]]]:
    """Every ledger row's own message id by address, and every batch's (id, message_ids)."""
    with store.engine.connect() as conn:
        rows = {email: mid for email, mid in conn.exec_driver_sql(
            "SELECT email, provider_message_id FROM send_ledger ORDER BY id")}
        batches = [(mid, ids) for mid, ids in conn.exec_driver_sql(
            "SELECT provider_message_id, message_ids FROM send_batches ORDER BY id")]
    return rows, batches


def test_storable_message_id() -> None:
    assert storable_message_id(None) is None
    plain = "7f0c2a9e-1111-4c3b-8d2e-000000000001"
    assert storable_message_id(plain) is plain
    assert storable_message_id("<a.b@host.example>") == "<a.b@host.example>"
    assert storable_message_id(NUL_ID) == "pm--1"
    assert storable_message_id(BELL_ID) == "pm--2"
    assert storable_message_id("\x00\x01") is None  # nothing left: no id
    assert storable_message_id(LONG_ID) == LONG_ID[:1000]
    assert storable_message_id("caf\u00e9\ud800") == "caf\u00e9\ufffd"  # a lone surrogate, as storable()
    assert storable_message_id("Zoë 日本") == "Zoë 日本"


def test_clean_ids_leave_the_results_as_they_are() -> None:
    from digest.store.store import _storable_ids

    clean = [SendResult(1, "sent", "7f0c2a9e-1111-4c3b-8d2e-000000000001"), SendResult(2, "failed", None, "x"),
             SendResult(3, "sent", "Zoë 日本"), SendResult(4, "sent", "x" * 1000)]
    assert _storable_ids(clean) is clean
    assert _storable_ids([]) == []
    for garbage, kept in ((NUL_ID, "pm--1"), ("pm-\x7f-3", "pm--3"), ("pm-\x85-4", "pm--4"), (BELL_ID, "pm--2"),
                          ("x" * 1001, "x" * 1000)):
        cleaned = _storable_ids([*clean, SendResult(5, "sent", garbage)])
        assert cleaned == [*clean, SendResult(5, "sent", kept)]


@pytest.fixture
def draft_id(store: Store) -> Iterator[int]:
    from tests.store.test_store import _sending

    yield _sending(store, [f"s{i}@x.org" for i in range(6)])


@pytest.mark.parametrize("how", ["rows", "batch_rows", "ranged_one_id", "ranged_own_ids", "ranged_apart",
                                 "record_calls"])
def test_every_verdict_settles_with_a_garbage_message_id(store: Store, draft_id: int, how: str) -> None:
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 3, "me", NOW)
    ids = [c.ledger_id for c in batch]
    garbage = [NUL_ID, BELL_ID, LONG_ID]
    if how == "rows":  # row by row, each with its own id, no batch
        store.settle([SendResult(i, "sent", g) for i, g in zip(ids, garbage)], "postmark", NOW)
    elif how == "batch_rows":  # row by row, one id shared (SendGrid's X-Message-Id)
        store.settle([SendResult(i, "sent", NUL_ID) for i in ids], "sendgrid", NOW)
    elif how == "ranged_one_id":  # the ranged batch's one id, on the batch
        store.settle([SendResult(i, "sent", NUL_ID) for i in ids], "sendgrid", NOW, batch)
    elif how == "ranged_own_ids":  # one id per message, kept together on the batch (message_ids)
        store.settle([SendResult(i, "sent", g) for i, g in zip(ids, garbage)], "postmark", NOW, batch)
    elif how == "ranged_apart":  # most alike on the batch, one apart on its row
        store.settle([SendResult(ids[0], "suppressed", NUL_ID, "inactive")]
                     + [SendResult(i, "sent", LONG_ID) for i in ids[1:]], "postmark", NOW, batch)
    else:  # a batch sent call by call: the calls answered so far, then its verdict
        store.record_calls(batch, draft_id, ids[1:], [SendResult(ids[0], "sent", NUL_ID)], "postmark", NOW)
        store.record_calls(batch, draft_id, [], [SendResult(i, "sent", g) for i, g in zip(ids[1:], garbage[1:])],
                           "postmark", NOW)
        store.settle([], "postmark", NOW, batch)
    counts = store.ledger_counts(draft_id)
    assert counts == ({"sent": 2, "suppressed": 1, "pending": 3} if how == "ranged_apart"
                      else {"sent": 3, "pending": 3}), counts
    rows, batches = _ids(store)
    own = [mid for mid in rows.values() if mid is not None]
    ((batch_id, batch_ids),) = batches
    kept = [*own, *([batch_id] if batch_id else []), *(json.loads(batch_ids).values() if batch_ids else [])]
    expected = {
        "rows": ["pm--1", "pm--2", LONG_ID[:1000]],
        "batch_rows": ["pm--1"] * 3,
        "ranged_one_id": ["pm--1"],
        "ranged_own_ids": ["pm--1", "pm--2", LONG_ID[:1000]],
        "ranged_apart": ["pm--1", LONG_ID[:1000]],
        "record_calls": ["pm--1", "pm--2", LONG_ID[:1000]],
    }[how]
    assert sorted(kept) == sorted(expected)


def test_a_send_whose_provider_answers_garbage_message_ids_goes_on(tmp_path: Path, db_url: str,
                                                                   clock: FrozenClock) -> None:
    """Through Postmark's batch endpoint: a batch whose answer gives ids with a NUL, other
    control characters and 5000 characters is recorded as sent, and the next batch goes out."""
    emails = [f"g{i}@example.com" for i in range(4)]
    garbage = iter([NUL_ID, BELL_ID, LONG_ID])

    def answer(srv: FakeProviderServer, request: Request) -> Reply:
        reply = postmark_batch(srv, request)
        results: list[dict[str, Any]] = json.loads(reply.body)
        for item in results:
            item["MessageID"] = next(garbage, item["MessageID"])
        return Reply.of_json(reply.status, results)

    with FakeProviderServer(token=TOKEN) as srv, postmark_app(tmp_path, db_url, clock, srv, emails) as app:
        srv.route("POST", "/email/batch", answer)
        (summary,) = pipeline.send(app)
        assert summary.finished and summary.sent == 4 and summary.uncertain == 0, summary
        assert app.store.ledger_counts(summary.draft_id) == {"sent": 4}
        assert sorted(m["To"] for m in srv.messages) == emails
        _rows, batches = _ids(app.store)
        kept = [i for _one, ids in batches for i in json.loads(ids or "{}").values()]
        assert "pm--1" in kept and "pm--2" in kept and LONG_ID[:1000] in kept
        assert not any("\x00" in i or len(i) > 1000 for i in kept)
