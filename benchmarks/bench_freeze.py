"""Where freezing a send's audience spends its time, on SQLite.

Usage::

    .venv/bin/python benchmarks/bench_freeze.py [--recipients 1000000] [--runs 3]

Freezing is the one statement ``Store.start_send`` runs before any batch can be claimed: an
``INSERT ... SELECT`` of one ledger row per active, unsuppressed subscriber. This script makes a
database with the real schema (``open_store``), fills it with N subscribers, and runs that very
statement (compiled from the same SQLAlchemy expression) on a fresh copy each time, timing the
statement and its commit apart, side by side:

* as a send runs it (foreign keys enforced, the WAL checkpointed when the commit passes 1,000
  pages, as every connection of digest is set up);
* without foreign-key enforcement (each row's two parent lookups: the draft and the
  subscriber it was just read from);
* without the automatic checkpoint at commit (the write of the WAL into the database).

The last two are not what digest does; they show what each costs.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def build(folder: Path, recipients: int) -> tuple[Path, str, tuple[object, ...]]:
    """A database with ``recipients`` subscribers and one approved draft; the freeze statement."""
    from sqlalchemy import Integer, String, insert, literal, select

    from digest.store import open_store
    from digest.store.schema import drafts, send_ledger, subscribers
    from digest.store.store import _sendable

    path = folder / "freeze.db"
    store = open_store(f"sqlite:///{path}")
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(insert(drafts).values(id=1, period_key="p", status="sending", subject="s", snapshot="[]",
                                           content_hash="h", created_at=now, updated_at=now))
        for start in range(0, recipients, 50_000):
            conn.execute(insert(subscribers), [
                {"email": f"reader{i:07d}@example.com", "name": f"Reader {i}", "status": "active",
                 "origin": "bench", "created_at": now, "updated_at": now}
                for i in range(start, min(recipients, start + 50_000))])
    audience = select(literal(1, Integer), subscribers.c.id, subscribers.c.email,
                      literal("pending", String)).where(_sendable())
    stmt = insert(send_ledger).from_select(["draft_id", "subscriber_id", "email", "status"], audience)
    compiled = stmt.compile(store.engine)
    params = tuple(compiled.params[k] for k in compiled.positiontup or ())
    store.close()
    return path, str(compiled), params


def freeze(path: Path, sql: str, params: tuple[object, ...], *, foreign_keys: bool, checkpoint: bool
           ) -> tuple[float, float, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "cache_size=-512",
                       f"foreign_keys={'ON' if foreign_keys else 'OFF'}",
                       f"wal_autocheckpoint={1000 if checkpoint else 0}"):
            conn.execute(f"PRAGMA {pragma}")
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(sql, params).rowcount
        t1 = time.perf_counter()
        conn.execute("COMMIT")
        t2 = time.perf_counter()
    finally:
        conn.close()
    return t1 - t0, t2 - t1, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="digest-freeze-"))
    try:
        pristine, sql, params = build(base, args.recipients)
        ways = {"as a send runs it": (True, True), "without foreign-key checks": (False, True),
                "without the checkpoint at commit": (True, False)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(args.runs):
            for name, (fks, checkpoint) in ways.items():  # interleaved, so drift hits each alike
                copy = base / "run.db"
                shutil.copy(pristine, copy)
                statement, commit, rows = freeze(copy, sql, params, foreign_keys=fks, checkpoint=checkpoint)
                assert rows == args.recipients, rows
                times[name].append((statement, commit))
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{copy}{suffix}").unlink(missing_ok=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = args.recipients
    print(f"freezing {n:,} subscribers, median of {args.runs} runs")
    for name, runs in times.items():
        statement = statistics.median(s for s, _ in runs)
        commit = statistics.median(c for _, c in runs)
        print(f"  {name:34s} statement {statement:5.2f} s  commit {commit:5.2f} s  "
              f"= {(statement + commit) / n * 1e6:.2f} µs/row")


if __name__ == "__main__":
    main()
