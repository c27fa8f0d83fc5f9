"""What a send does to keep its memory down beyond importing less (tests/test_import_diet.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from digest import pipeline
from digest.delivery import sender
from digest.store import db
from tests.conftest import FrozenClock, make_settings
from tests.fakes.provider_server import FakeProviderServer, install_sendgrid

TOKEN = "memory-token"


@pytest.fixture
def sendgrid_url() -> Iterator[str]:
    with FakeProviderServer(token=TOKEN) as srv:
        install_sendgrid(srv)
        yield srv.url


def _app_with_one_reader(tmp_path: Path, clock: FrozenClock, concurrency: int,
                         url: str | None = None) -> pipeline.App:
    """One reader and an approved draft; sent through a SendGrid fake at ``url`` (server-side
    personalization), else through the outbox (full bodies)."""
    delivery: dict[str, Any] = {"concurrency": concurrency}
    if url:
        delivery.update(provider="sendgrid", api_key=TOKEN, base_url=url)
    settings = make_settings(tmp_path, delivery=delivery, digest={"approval": {"required": False}})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([("ann@example.com", "Ann")], "cli", clock())
    pipeline.collect(app)
    pipeline.make_draft(app)
    return app


@pytest.mark.parametrize(("concurrency", "server_side", "shared"),
                         [(1, True, False), (3, True, True), (3, False, False)],
                         ids=["one worker", "server-side, three workers", "full bodies, three workers"])
def test_threads_of_a_server_side_send_share_one_malloc_arena(
    tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, sendgrid_url: str,
    concurrency: int, server_side: bool, shared: bool,
) -> None:
    calls: list[int] = []
    real = sender.share_malloc_arena
    monkeypatch.setattr(sender, "share_malloc_arena", lambda: calls.append(1))
    app = _app_with_one_reader(tmp_path, clock, concurrency, sendgrid_url if server_side else None)
    try:
        (summary,) = pipeline.send(app)
    finally:
        app.close()
    assert summary.sent == 1
    # One worker: one arena anyway. Full bodies: megabytes per batch, better kept per thread.
    assert len(calls) == (1 if shared else 0)
    real()
    real()  # once is enough; again changes nothing and never fails


def test_a_helper_process_shares_one_malloc_arena_too(
    tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, sendgrid_url: str
) -> None:
    """delivery.processes: each helper runs its own workers, and asks for the one arena
    where they start, as the parent does (run here in-process, to watch the call)."""
    calls: list[int] = []
    monkeypatch.setattr(sender, "share_malloc_arena", lambda: calls.append(1))
    app = _app_with_one_reader(tmp_path, clock, 3, sendgrid_url)
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
