"""What a send does to keep its memory down beyond importing less (tests/test_import_diet.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from digest import pipeline
from digest.delivery import sender
from digest.store import db
from tests.conftest import FrozenClock, make_settings


def _app_with_one_reader(tmp_path: Path, clock: FrozenClock, concurrency: int) -> pipeline.App:
    settings = make_settings(tmp_path, delivery={"concurrency": concurrency},
                             digest={"approval": {"required": False}})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([("ann@example.com", "Ann")], "cli", clock())
    pipeline.collect(app)
    pipeline.make_draft(app)
    return app


@pytest.mark.parametrize("concurrency", [1, 3])
def test_threads_of_a_send_share_one_malloc_arena(
    tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    calls: list[int] = []
    real = sender.share_malloc_arena
    monkeypatch.setattr(sender, "share_malloc_arena", lambda: calls.append(1))
    app = _app_with_one_reader(tmp_path, clock, concurrency)
    try:
        (summary,) = pipeline.send(app)
    finally:
        app.close()
    assert summary.sent == 1
    assert len(calls) == (1 if concurrency > 1 else 0)  # one worker: one arena anyway
    real()
    real()  # once is enough; again changes nothing and never fails


def test_a_helper_process_shares_one_malloc_arena_too(
    tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delivery.processes: each helper runs its own workers, and asks for the one arena
    where they start, as the parent does (run here in-process, to watch the call)."""
    calls: list[int] = []
    monkeypatch.setattr(sender, "share_malloc_arena", lambda: calls.append(1))
    app = _app_with_one_reader(tmp_path, clock, 3)
    try:
        (draft_id,) = app.store.due_drafts(app.now())
        app.store.start_send(draft_id, app.now())
        go, stop = threading.Event(), threading.Event()
        go.set()
        reports: list[dict[str, Any]] = []

        class Conn:
            def send(self, report: dict[str, Any]) -> None:
                reports.append(report)

        sender._helper_main(app.settings, draft_id, os.getppid(), stop, go, Conn())
        ledger = {email: status for _id, email, status in app.store.ledger_rows(draft_id)}
    finally:
        app.close()
    assert reports[-1]["final"] and "error" not in reports[-1], reports[-1]
    assert reports[-1]["sent"] == 1 and ledger == {"ann@example.com": "sent"}
    assert calls == [1]


def test_sqlite_connections_keep_a_small_page_cache(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -512
    engine.dispose()
