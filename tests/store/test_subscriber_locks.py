"""Writers of many subscriber rows at once lock them in one order, by address, so that on
PostgreSQL one waits for the other instead of both waiting for each other (a deadlock, which
aborts one of them: an import failing, or a webhook answered 500). Needs DIGEST_TEST_POSTGRES_URL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from digest.store import Store, open_store
from digest.store.store import SuppressionRules
from digest.types import DeliveryEvent
from tests.conftest import NOW

RULES = SuppressionRules(reasons={"hard_bounce": "hard_bounce"}, soft_bounce_limit=3,
                         soft_bounce_window=timedelta(days=5))
READERS = 8
ROUNDS = 5


def _readers(store: Store, round_: int) -> list[str]:
    """New subscribers whose ids run the other way from their addresses."""
    emails = [f"r{round_:02d}-{i:03d}@x.org" for i in range(READERS)]
    for email in reversed(emails):
        store.upsert_subscribers([(email, "")], "cli", NOW)
    ids = [s.id for s in (store.subscriber_by_email(e) for e in emails) if s is not None]
    assert ids == sorted(ids, reverse=True)
    return emails


def _blocked(store: Store) -> bool:
    """Whether a session of this database waits for a lock."""
    with store.engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'")).scalar())


@pytest.mark.postgres
def test_an_import_and_a_webhook_on_the_same_readers_never_deadlock(pg_database: str) -> None:
    """An import renames the readers while a webhook's hard bounces suppress them, in the
    interleaving that deadlocked, made to happen each round: the webhook has suppressed its
    first address (the last reader by id), the import then goes for the rows it changes (by
    id, it took the other readers' rows first, then waited for that one), and only once the
    import waits does the webhook go on to its second address."""
    from tests.conftest import _reset_pg

    _reset_pg(pg_database)
    store = open_store(pg_database)
    webhook_holds, import_goes = threading.Event(), threading.Event()
    webhook_updates = [0]
    import_waited = [False]  # the webhook saw the import wait for a row it holds

    def pace(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        name = threading.current_thread().name
        locks = statement.startswith("UPDATE subscribers") or "FOR UPDATE" in statement
        if name == "import" and locks and not import_goes.is_set():
            webhook_holds.wait(5)
            import_goes.set()
        elif name == "webhook" and statement.startswith("UPDATE subscribers"):
            webhook_updates[0] += 1
            if webhook_updates[0] == 2:  # its first reader's row is held
                webhook_holds.set()
                import_goes.wait(5)
                deadline = time.monotonic() + 5
                while not _blocked(store) and time.monotonic() < deadline:
                    time.sleep(0.01)
                import_waited[0] = time.monotonic() < deadline

    event.listen(store.engine, "before_cursor_execute", pace)
    started = time.monotonic()
    try:
        for round_ in range(ROUNDS):
            webhook_holds.clear()
            import_goes.clear()
            webhook_updates[0] = 0
            import_waited[0] = False
            emails = _readers(store, round_)
            events = [DeliveryEvent("postmark", f"b{round_}-{e}", "hard_bounce", e) for e in emails]
            renames = [(e, f"Reader {i}") for i, e in enumerate(emails)]
            errors: list[BaseException] = []
            go = threading.Barrier(2)

            def run(work: Callable[[], object], errors: list[BaseException] = errors,
                    go: threading.Barrier = go) -> None:
                go.wait()
                try:
                    work()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [
                threading.Thread(target=run, name="import",
                                 args=(lambda r=renames: store.upsert_subscribers(r, "import", NOW),)),
                threading.Thread(target=run, name="webhook",
                                 args=(lambda ev=events: store.apply_webhook("postmark", ev, NOW, RULES),)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert errors == [], f"round {round_}: {errors}"
            # Whichever went first, every reader is bounced in the end.
            assert {getattr(store.subscriber_by_email(e), "status", None) for e in emails} == {"bounced"}
            assert import_waited[0], "the import never waited for the webhook: the test no longer tests"
    finally:
        event.remove(store.engine, "before_cursor_execute", pace)
        store.close()
    assert time.monotonic() - started < 10
