"""The store on every backend: upserts, drafts, the send ledger, leases, migrations."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import inspect, update
from sqlalchemy.exc import OperationalError

from digest.errors import DraftError, FreezeStopped, StoreError, TakenOverError
from digest.store import Store, db, open_store
from digest.store.schema import drafts
from digest.store.store import SuppressionRules, WebhookApplied
from digest.types import (
    CollectResult,
    Comment,
    DeliveryEvent,
    Draft,
    DraftItem,
    Essay,
    RankedComment,
    SendResult,
    SourceCursor,
)
from tests.conftest import NOW, reactivate, writes_refused


def essay(key: str, title: str = "T", published=NOW) -> Essay:  # type: ignore[no-untyped-def]
    return Essay(source="s", key=key, url=f"https://x.org/{key}", title=title, html="<p>x</p>",
                 published=published)


def comment(essay_key: str, key: str, score: float | None = 1, html: str = "<p>some words here</p>") -> Comment:
    return Comment(source="s", essay_key=essay_key, key=key, author=f"a{key}", html=html, score=score)


def test_fresh_database_is_created_at_head(store: Store) -> None:
    assert db.current_revision(store.engine) == db.head_revision(store.engine)
    tables = set(inspect(store.engine).get_table_names())
    assert {"essays", "comments", "drafts", "send_ledger", "subscribers", "suppressions",
            "delivery_events", "source_state", "draft_items", "leases", "meta"} <= tables


def test_sqlite_runs_in_wal_mode(sqlite_store: Store) -> None:
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        # Every commit reaches the disk (a claim must outlive a power cut, not only a crash).
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_outdated_schema_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'old.db'}"
    s = open_store(url)
    with s.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'older'")
    s.close()
    with pytest.raises(StoreError, match="digest db upgrade"):
        open_store(url)


def test_upsert_counts_new_updated_and_deleted(store: Store) -> None:
    first = CollectResult("s", essays=(essay("e1"),), comments=(comment("e1", "c1", 3), comment("e1", "c2", 5)),
                          cursor=SourceCursor(etag='"v1"'))
    stats = store.record_collect(first, NOW)
    assert (stats.new_essays, stats.new_comments) == (1, 2)
    assert store.cursor("s") == SourceCursor(etag='"v1"')
    # Same data again: nothing changes.
    again = store.record_collect(first, NOW)
    assert (again.new_essays, again.updated_essays, again.new_comments, again.updated_comments) == (0, 0, 0, 0)
    # A score changes and c2 disappears from the source.
    second = CollectResult("s", essays=(essay("e1"),), comments=(comment("e1", "c1", 9),))
    stats = store.record_collect(second, NOW + timedelta(hours=1))
    assert (stats.updated_comments, stats.deleted_comments) == (1, 1)
    (eid, _), = store.candidate_essays(None, 10)
    live = store.comments_for([eid])[eid]
    assert [(c.key, c.score) for _, c in live] == [("c1", 9.0)]


def test_collect_error_is_recorded_and_keeps_cursor(store: Store) -> None:
    store.record_collect(CollectResult("s", cursor=SourceCursor(etag="e")), NOW)
    store.record_collect(CollectResult("s", error="boom: HTTP 500"), NOW + timedelta(minutes=5))
    (status,) = store.source_statuses()
    assert status.last_error == "boom: HTTP 500"
    assert status.last_success_at == NOW
    assert store.cursor("s").etag == "e"


def test_comment_on_unknown_essay_is_ignored(store: Store) -> None:
    stats = store.record_collect(CollectResult("s", comments=(comment("nope", "c1"),)), NOW)
    assert stats.new_comments == 0


def _source_result(source: str, essays: int = 5, per_essay: int = 8) -> CollectResult:
    """A source's first collect: ``essays`` essays with ``per_essay`` comments each."""
    from dataclasses import replace

    es = tuple(replace(essay(f"e{i}", f"Essay {i}"), source=source) for i in range(essays))
    cs = tuple(replace(comment(f"e{i}", f"c{i}-{j}", j), source=source) for i in range(essays)
               for j in range(per_essay))
    return CollectResult(source, essays=es, comments=cs, cursor=SourceCursor(etag=f'"{source}"'))


def _rows(store: Store, source: str) -> tuple[int, int, int]:
    """How many essay, comment and source state rows ``source`` has."""
    from sqlalchemy import func, select

    from digest.store.schema import comments, essays, source_state

    with store.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t).where(t.c.source == source)).scalar_one()
                     for t in (essays, comments, source_state))  # type: ignore[return-value]


def _at_once(round_: int, store: Store, other: Store, work: Callable[[Store, bool], Any]) -> tuple[Any, Any]:
    """``work(store, True)`` and ``work(other, False)`` in two threads, started together at a
    barrier; their results, after asserting that neither raised."""
    import threading

    barrier = threading.Barrier(2, timeout=30)
    out: dict[bool, Any] = {}

    def run(s: Store, first: bool) -> None:
        barrier.wait()
        try:
            out[first] = work(s, first)
        except Exception as exc:  # noqa: BLE001 - reported below
            out[first] = exc

    threads = [threading.Thread(target=run, args=(s, first)) for s, first in ((store, True), (other, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [v for v in out.values() if isinstance(v, Exception)]
    assert errors == [], f"round {round_}: {errors!r}"
    return out[True], out[False]


def test_two_collects_of_one_source_at_once_store_each_item_once_and_count_it_new_once(store: Store) -> None:
    """Two `digest serve` processes starting together, or a cron `digest collect` overlapping
    the service's: each with its own connection, the same source's items at the same moment.
    Neither fails on a unique key, every item is stored once, and between them the two
    collects report each item new exactly once."""
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        for round_ in range(5):  # a new source each round: each round races for the first rows
            source = f"src{round_}"
            result = _source_result(source)
            a, b = _at_once(round_, store, other, lambda s, _first, result=result: s.record_collect(result, NOW))
            assert (a.new_essays + b.new_essays, a.new_comments + b.new_comments) == (5, 40)
            assert (a.updated_essays, b.updated_essays, a.updated_comments, b.updated_comments) == (0, 0, 0, 0)
            assert (a.deleted_comments, b.deleted_comments) == (0, 0)
            assert _rows(store, source) == (5, 40, 1)
            assert store.cursor(source) == SourceCursor(etag=f'"{source}"')
            (status,) = [s for s in store.source_statuses() if s.source == source]
            assert (status.essays, status.comments, status.last_error) == (5, 40, None)
    finally:
        other.close()


@pytest.mark.postgres
def test_an_item_another_collect_stored_after_this_one_looked_is_neither_new_nor_lost(pg_database: str) -> None:
    """Another collect stores an essay and a comment (and commits) between this collect's
    look for them and its insert: this one neither fails on the unique key nor counts them
    new, and what it fetched is what stays stored."""
    from sqlalchemy import event, insert, select

    from digest.store.schema import comments, essays
    from tests.conftest import _reset_pg

    _reset_pg(pg_database)
    store = open_store(pg_database)
    other = db.make_engine(pg_database)
    try:
        store.record_collect(CollectResult("s", essays=(essay("e1"),)), NOW)
        with other.connect() as conn:
            e1 = conn.execute(select(essays.c.id).where(essays.c.key == "e1")).scalar_one()
        # (SQLite has one writer at a time: there, the other collect waits for this one.)
        injected: list[str] = []

        def meanwhile(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            """Just before this collect's first insert into a table, the other one stores an
            item of that table this collect has not found (and commits)."""
            table = statement.removeprefix("INSERT INTO ").split(" ", 1)[0]
            if not statement.startswith("INSERT INTO ") or table not in ("essays", "comments") or table in injected:
                return
            injected.append(table)
            with other.begin() as conn:
                if table == "essays":
                    conn.execute(insert(essays).values(source="s", key="e2", url="https://x.org/e2", title="T",
                                                       html="<p>x</p>", published_at=NOW, first_seen_at=NOW,
                                                       updated_at=NOW))
                else:  # fetched a moment earlier, with a lower score
                    conn.execute(insert(comments).values(source="s", key="c1", essay_id=e1, author="ac1",
                                                         html="<p>some words here</p>", score=1,
                                                         first_seen_at=NOW, updated_at=NOW))

        event.listen(store.engine, "before_cursor_execute", meanwhile)
        later = NOW + timedelta(minutes=1)
        stats = store.record_collect(CollectResult("s", essays=(essay("e1"), essay("e2")), comments=(
            comment("e1", "c1", 7), comment("e1", "c2"), comment("e2", "c3"))), later)
        event.remove(store.engine, "before_cursor_execute", meanwhile)
        assert injected == ["essays", "comments"]
        assert (stats.new_essays, stats.updated_essays) == (0, 0)  # e1 was there; the other stored e2
        assert (stats.new_comments, stats.updated_comments, stats.deleted_comments) == (2, 1, 0)
        assert _rows(store, "s") == (2, 3, 1)
        ids = [i for i, _ in store.candidate_essays(None, 10)]
        scores = {c.key: c.score for cs in store.comments_for(ids).values() for _, c in cs}
        assert scores == {"c1": 7.0, "c2": 1.0, "c3": 1.0}
    finally:
        other.dispose()
        store.close()


def _draft(store: Store, period: str = "P1") -> Draft:
    store.record_collect(CollectResult("s", essays=(essay("e1", "One"),), comments=(comment("e1", "c1"),)), NOW)
    (eid, e), = store.candidate_essays(None, 10)
    (cid, c), = store.comments_for([eid])[eid]
    d = Draft(period, "Subject", "", (DraftItem(e, (RankedComment(c, 1, 3),)),))
    created, was_new = store.create_draft(d, [(eid, None)], NOW)
    assert was_new
    return created


def test_draft_round_trips_and_freezes_content(store: Store) -> None:
    d = _draft(store)
    assert d.id is not None and d.status == "pending_review" and len(d.content_hash) == 64
    # A later change to the comment never alters the stored draft.
    store.record_collect(CollectResult("s", essays=(essay("e1", "One (edited)"),),
                                       comments=(comment("e1", "c1", 99, "<p>changed text now</p>"),)), NOW)
    again = store.get_draft(d.id)
    assert again.items[0].essay.title == "One"
    assert again.items[0].comments[0].comment.html == "<p>some words here</p>"
    assert again.content_hash == d.content_hash


def test_one_live_draft_per_period(store: Store) -> None:
    d = _draft(store)
    dup, created = store.create_draft(Draft("P1", "Other", "", ()), [], NOW)
    assert not created and dup.id == d.id
    store.transition(d.id or 0, ("pending_review",), "rejected", NOW)
    redo, created = store.create_draft(Draft("P1", "Redo", "", ()), [], NOW)
    assert created and redo.id != d.id


def test_featured_essays_are_not_candidates_again(store: Store) -> None:
    _draft(store)
    assert store.candidate_essays(None, 10) == []


def test_transition_guards_state(store: Store) -> None:
    d = _draft(store)
    with pytest.raises(DraftError, match="is pending_review; it must be approved"):
        store.transition(d.id or 0, ("approved",), "sending", NOW)
    with pytest.raises(DraftError, match="no draft with id 999"):
        store.get_draft(999)


def _sending(store: Store, emails: list[str]) -> int:
    d = _draft(store)
    store.upsert_subscribers([(e, e.split("@")[0]) for e in emails], "cli", NOW)
    store.transition(d.id or 0, ("pending_review",), "approved", NOW)
    assert d.id is not None
    return d.id


def test_ledger_freezes_audience_and_claims_once(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    assert store.start_send(draft_id, NOW) == 3
    store.upsert_subscribers([("late@x.org", "")], "cli", NOW)
    assert store.start_send(draft_id, NOW) == 3  # the audience was frozen at send start
    first = store.claim_batch(draft_id, 2, "t1", NOW)
    second = store.claim_batch(draft_id, 2, "t1", NOW)
    assert len(first) == 2 and len(second) == 1
    assert not {c.ledger_id for c in first} & {c.ledger_id for c in second}
    assert store.claim_batch(draft_id, 2, "t1", NOW) == []


def _many_subscribers(store: Store, n: int) -> None:
    """``n`` active subscribers, written by the database itself (a recursive count)."""
    from sqlalchemy import Integer, String, cast, insert, literal, select

    from digest.store.schema import subscribers

    count = select(literal(1, Integer).label("i")).cte("count", recursive=True)
    count = count.union_all(select(count.c.i + 1).where(count.c.i < n))
    rows = select(literal("reader") + cast(count.c.i, String) + literal("@x.org"), literal("", String),
                  literal("active", String), literal("cli", String), literal(NOW), literal(NOW))
    with store.engine.begin() as conn:
        conn.execute(insert(subscribers).from_select(
            ["email", "name", "status", "origin", "created_at", "updated_at"], rows))


def test_a_stop_during_the_freeze_rolls_it_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop asked while a long freeze runs cuts the statement short: the draft is still
    approved, with no ledger row and no cursor, and the next start freezes it whole."""
    draft_id = _sending(store, [])
    _many_subscribers(store, 300_000)  # a freeze of a tenth of a second at the very least
    monkeypatch.setattr(Store, "STOP_POLL", 0.005)  # asked well within it, however fast the machine
    asked: list[float] = []

    def should_stop() -> bool:
        asked.append(time.perf_counter())
        return True

    started = time.perf_counter()
    with pytest.raises(FreezeStopped, match="while the audience was being frozen"):
        store.start_send(draft_id, NOW, should_stop)
    cut_after = time.perf_counter() - started
    assert asked
    assert store.get_draft(draft_id).status == "approved"
    assert store.ledger_counts(draft_id) == {} and store.pending_count(draft_id) == 0
    started = time.perf_counter()
    assert store.start_send(draft_id, NOW, lambda: False) == 300_000  # asked, never told to stop
    assert cut_after < (time.perf_counter() - started) / 2  # the statement was cut short, not waited for
    assert store.get_draft(draft_id).status == "sending"


def test_a_stop_that_comes_as_the_freeze_ends_undoes_it_all_the_same(store: Store) -> None:
    """Told to stop once the statement had already ended (nothing left to interrupt): the
    freeze is undone as well, and the database is left usable."""
    draft_id = _sending(store, ["a@x.org"])
    with pytest.raises(FreezeStopped), store._tx() as conn, store._stoppable(conn, lambda: True):
        conn.execute(update(drafts).where(drafts.c.id == draft_id).values(status="sending"))
        time.sleep(0.15)  # the watcher asks at 50 ms, and its cut finds no statement running
    assert store.get_draft(draft_id).status == "approved"
    assert store.start_send(draft_id, NOW, lambda: False) == 1


def test_claim_skips_addresses_that_became_ineligible(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    sub = store.subscriber_by_email("a@x.org")
    assert sub is not None
    store.set_subscriber_status(sub.id, "unsubscribed", NOW)
    store.suppress("b@x.org", "hard_bounce", "postmark", NOW)
    claimed = store.claim_batch(draft_id, 10, "t", NOW)
    assert [c.recipient.email for c in claimed] == ["c@x.org"]
    assert store.ledger_counts(draft_id) == {"skipped": 2, "claimed": 1}


def test_suppressing_an_address_another_transaction_is_suppressing_waits_and_keeps_one_row(store: Store) -> None:
    """Two events for one address at the same moment (a bounce and the provider's own notice):
    the second suppression waits for the first and adds nothing (no unique-key error)."""
    import threading

    from sqlalchemy import func, insert, select

    from digest.store.schema import suppressions

    store.upsert_subscribers([("a@x.org", "")], "cli", NOW)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            store.suppress("a@x.org", "hard_bounce", "sendgrid", NOW)
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    with store.engine.connect() as conn:
        tx = conn.begin()
        conn.execute(insert(suppressions).values(email="a@x.org", reason="complaint", origin="postmark",
                                                 created_at=NOW))
        other = threading.Thread(target=second)
        other.start()
        other.join(0.5)  # it waits on the uncommitted row (PostgreSQL) or the write lock (SQLite)
        tx.commit()
    other.join(30)
    assert not other.is_alive() and errors == []
    with store.engine.connect() as conn:
        rows = conn.execute(select(suppressions.c.reason, func.count()).group_by(suppressions.c.reason)).all()
    assert rows == [("complaint", 1)]  # the first reason stands
    sub = store.subscriber_by_email("a@x.org")
    assert sub is not None and sub.status == "bounced"


def test_settle_release_uncertain_and_resolve(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    a, b, c = store.claim_batch(draft_id, 3, "t", NOW)
    store.settle([SendResult(a.ledger_id, "sent", "m1")], "outbox", NOW)
    store.release([b.ledger_id], "429", NOW)
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 1  # c was in flight
    assert store.ledger_counts(draft_id) == {"sent": 1, "pending": 1, "uncertain": 1}
    assert store.resolve_uncertain(draft_id, "resend", NOW) == 1
    assert store.ledger_counts(draft_id) == {"sent": 1, "pending": 2}


def test_leases_exclude_a_second_holder_until_expiry(store: Store) -> None:
    until = NOW + timedelta(minutes=10)
    assert store.acquire_lease("send:1", "A", NOW, until)
    assert not store.acquire_lease("send:1", "B", NOW, until)
    assert store.acquire_lease("send:1", "A", NOW, until)  # renewal
    assert store.acquire_lease("send:1", "B", until + timedelta(seconds=1), until + timedelta(minutes=10))
    store.release_lease("send:1", "B")
    assert store.acquire_lease("send:1", "C", NOW, until)


def test_events_are_stored_once(store: Store) -> None:
    ev = DeliveryEvent("postmark", "ev-1", "bounce", "A@x.org", NOW)
    assert store.record_event(ev, NOW)
    assert not store.record_event(ev, NOW)
    assert store.event_counts() == {"bounce": 1}


def test_secret_is_generated_once(store: Store) -> None:
    assert store.secret() == store.secret()
    assert len(store.secret()) >= 40


def test_a_recorded_run_only_moves_forward(store: Store) -> None:
    from zoneinfo import ZoneInfo

    assert store.last_run("draft") is None
    store.record_run("draft", NOW)
    assert store.last_run("draft") == NOW
    later = (NOW + timedelta(hours=1, microseconds=5)).astimezone(ZoneInfo("America/New_York"))
    store.record_run("draft", later)
    store.record_run("draft", NOW)  # an earlier run (another process's, finishing late)
    assert store.last_run("draft") == later
    assert store.last_run("collect") is None


def test_upgrade_from_the_first_schema_keeps_data(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO essays (source, key, url, title, author, html, summary, first_seen_at, updated_at) "
            "VALUES ('s', 'k', 'https://x.org/k', 'Old', '', '', '', '2026-11-01', '2026-11-01')")
    with pytest.raises(StoreError, match="digest db upgrade"):
        db.ensure_schema(engine)
    before, after = db.upgrade(engine)
    assert (before, after) == ("0001", db.head_revision(engine))
    s = Store(engine)
    (_, e), = s.candidate_essays(None, 10)
    assert e.title == "Old" and e.comments_url == ""
    s.close()


def test_head_constant_matches_the_migration_scripts(sqlite_store: Store) -> None:
    assert db.HEAD == db.head_revision(sqlite_store.engine)


def test_votes_round_trip_and_partial_comment_lists_delete_nothing(store: Store) -> None:
    voted = Comment(source="s", essay_key="e1", key="v", author="a", html="<p>x y z</p>", score=5,
                    upvotes=9, downvotes=4)
    store.record_collect(CollectResult("s", essays=(essay("e1"),), comments=(voted, comment("e1", "c2"))), NOW)
    # A comment source that lists only the newest comments, claiming no essay complete:
    window = CollectResult("s:comments", comments=(Comment(source="s:comments", essay_key="e1", key="n",
                                                           author="b", html="<p>new one</p>", essay_source="s"),))
    assert store.record_collect(window, NOW).deleted_comments == 0
    (eid, _), = store.candidate_essays(None, 10)
    got = {c.key: c for _, c in store.comments_for([eid])[eid]}
    assert set(got) == {"v", "c2", "n"}
    assert (got["v"].upvotes, got["v"].downvotes) == (9, 4)


def test_the_claim_reads_a_range_of_the_primary_key_above_the_cursor(sqlite_store: Store) -> None:
    """Migration 0007: the next rows of a draft are a range of the table's own key, so a claim
    costs the same with a million rows left or ten, and needs no index of pending rows."""
    sql = sqlite_store._sql(sqlite_store._CLAIM_SQL)
    with sqlite_store.engine.connect() as conn:
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", (0, 10, 1, 10)))
    assert "INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan
    with sqlite_store.engine.connect() as conn:
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {sqlite_store._sql(sqlite_store._QUEUED_SQL)}", (1, 10)))
    assert "ix_send_ledger_queued" in plan  # rows back in the queue: their own small index


def _own_statuses(store: Store, draft_id: int) -> dict[int, str]:
    with store.engine.connect() as conn:
        return dict(conn.exec_driver_sql(  # type: ignore[arg-type]
            f"SELECT id, status FROM send_ledger WHERE draft_id = {int(draft_id)}").all())


def _batches(store: Store) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT first_id, last_id, status, claim_token, provider_message_id, message_ids FROM send_batches "
            "ORDER BY id").all()]


def test_a_claim_writes_one_batch_row_and_no_ledger_row(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org", "d@x.org"])
    store.start_send(draft_id, NOW)
    ids = sorted(_own_statuses(store, draft_id))
    batch = store.claim_batch(draft_id, 3, "me", NOW)
    assert [c.ledger_id for c in batch] == ids[:3] and batch.ranged
    assert set(_own_statuses(store, draft_id).values()) == {"pending"}
    assert _batches(store) == [(ids[0], ids[2], "claimed", "me", None, None)]
    assert store.ledger_counts(draft_id) == {"claimed": 3, "pending": 1}
    assert store.pending_count(draft_id) == 1
    assert [status for _, _, status in store.ledger_rows(draft_id)] == ["claimed"] * 3 + ["pending"]


def test_settle_writes_the_verdict_once_and_only_the_rows_that_differ(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org", "d@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 4, "me", NOW)
    a, b, c, d = (x.ledger_id for x in batch)
    store.settle([SendResult(a, "sent", "m"), SendResult(b, "invalid", None, "bad address"),
                  SendResult(c, "sent", "m"), SendResult(d, "sent", "m")], "sendgrid", NOW, batch)
    assert _own_statuses(store, draft_id) == {a: "pending", b: "invalid", c: "pending", d: "pending"}
    assert _batches(store) == [(a, d, "sent", "me", "m", None)]
    assert store.ledger_counts(draft_id) == {"sent": 3, "invalid": 1}
    assert [status for _, _, status in store.ledger_rows(draft_id)] == ["sent", "invalid", "sent", "sent"]


def test_per_message_ids_are_kept_on_the_batch(store: Store) -> None:
    import json

    draft_id = _sending(store, ["a@x.org", "b@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    a, b = (x.ledger_id for x in batch)
    store.settle([SendResult(a, "sent", "id-a"), SendResult(b, "sent", "id-b")], "postmark", NOW, batch)
    (row,) = _batches(store)
    assert row[2] == "sent" and json.loads(row[5]) == {str(a): "id-a", str(b): "id-b"}
    assert set(_own_statuses(store, draft_id).values()) == {"pending"}


def test_claims_from_two_senders_never_overlap(store: Store) -> None:
    """Two senders with their own connections (as two processes or hosts have) claim until no
    row is left: every row is claimed exactly once."""
    import threading

    emails = [f"r{i:03d}@x.org" for i in range(90)]
    draft_id = _sending(store, emails)
    store.start_send(draft_id, NOW)
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    taken: dict[str, list[int]] = {"a": [], "b": []}

    def claim(s: Store, name: str) -> None:
        while batch := s.claim_batch(draft_id, 7, name, NOW):
            taken[name] += [c.ledger_id for c in batch]
            s.settle([SendResult(c.ledger_id, "sent", None) for c in batch], "outbox", NOW, batch)

    threads = [threading.Thread(target=claim, args=(s, n)) for s, n in ((store, "a"), (other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    everyone = taken["a"] + taken["b"]
    assert sorted(everyone) == sorted(_own_statuses(store, draft_id)) and len(set(everyone)) == 90
    assert store.ledger_counts(draft_id) == {"sent": 90}


def test_released_rows_are_claimed_again_once_the_cursor_is_through(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org", "d@x.org"])
    store.start_send(draft_id, NOW)
    first = store.claim_batch(draft_id, 3, "me", NOW)
    a, b, c = (x.ledger_id for x in first)
    store.release([b], "not sent: the batch stopped first", NOW, first)
    store.settle([SendResult(a, "sent", None), SendResult(c, "sent", None)], "outbox", NOW, first)
    assert store.ledger_counts(draft_id) == {"sent": 2, "pending": 2}
    assert store.pending_count(draft_id) == 2
    # The rest of the range first: a message put back (deferred, say) holds up nobody.
    rest = store.claim_batch(draft_id, 3, "me", NOW)
    assert [x.recipient.email for x in rest] == ["d@x.org"] and rest.ranged
    store.settle([SendResult(rest[0].ledger_id, "sent", None)], "outbox", NOW, rest)
    again = store.claim_batch(draft_id, 3, "me", NOW)
    assert [x.ledger_id for x in again] == [b] and not again.ranged
    assert store.ledger_counts(draft_id) == {"sent": 3, "claimed": 1}
    store.settle([SendResult(b, "sent", None)], "outbox", NOW, again)
    assert store.ledger_counts(draft_id) == {"sent": 4}
    assert store.claim_batch(draft_id, 3, "me", NOW) == []


def test_a_whole_batch_released_goes_back_to_the_queue(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    store.release([x.ledger_id for x in batch], "401", NOW, batch)
    assert _batches(store)[0][2] == "released"
    assert store.ledger_counts(draft_id) == {"pending": 3}
    rest = store.claim_batch(draft_id, 5, "me", NOW)
    assert [x.recipient.email for x in rest] == ["c@x.org"]
    again = store.claim_batch(draft_id, 5, "me", NOW)
    assert [x.ledger_id for x in again] == [x.ledger_id for x in batch]


def test_a_claim_past_rows_no_longer_eligible_moves_the_cursor_before_the_queue(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    first = store.claim_batch(draft_id, 1, "me", NOW)
    store.release([first[0].ledger_id], "not sent", NOW, first)
    for email in ("b@x.org", "c@x.org"):
        sub = store.subscriber_by_email(email)
        assert sub is not None
        store.set_subscriber_status(sub.id, "unsubscribed", NOW)
    # b and c are skipped on the way (rule 2), then the queued a is claimed.
    again = store.claim_batch(draft_id, 5, "me", NOW)
    assert [x.ledger_id for x in again] == [first[0].ledger_id]
    assert store.ledger_counts(draft_id) == {"claimed": 1, "skipped": 2}
    store.settle([SendResult(first[0].ledger_id, "sent", None)], "outbox", NOW, again)
    assert store.claim_batch(draft_id, 5, "me", NOW) == []


def test_an_uncertain_batch_is_one_write_and_resolves_either_way(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    store.mark_uncertain([x.ledger_id for x in batch], "timed out", NOW, batch)
    assert set(_own_statuses(store, draft_id).values()) == {"pending"}
    assert store.ledger_counts(draft_id) == {"uncertain": 2, "pending": 1}
    assert store.resolve_uncertain(draft_id, "mark-sent", NOW) == 2
    assert store.ledger_counts(draft_id) == {"sent": 2, "pending": 1}
    rest = store.claim_batch(draft_id, 2, "me", NOW)
    assert len(rest) == 1
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 1  # its sender died
    assert store.resolve_uncertain(draft_id, "resend", NOW) == 1
    assert store.ledger_counts(draft_id) == {"sent": 2, "pending": 1}
    again = store.claim_batch(draft_id, 2, "me", NOW)
    assert [x.ledger_id for x in again] == [rest[0].ledger_id]


def test_uncertain_batches_come_back_as_they_went_out(store: Store) -> None:
    draft_id = _sending(store, [f"r{i}@x.org" for i in range(5)])
    store.start_send(draft_id, NOW)
    one = store.claim_batch(draft_id, 2, "me", NOW, via="resend:a")
    two = store.claim_batch(draft_id, 3, "me", NOW, via="resend:a")
    store.mark_uncertain([x.ledger_id for x in one], "reset", NOW, one)
    # Part of the second batch is uncertain, the rest was sent.
    store.mark_uncertain([two[0].ledger_id], "reset", NOW, two)
    store.settle([SendResult(x.ledger_id, "sent", None) for x in two[1:]], "resend", NOW, two)
    # Only through what they went out through (another account's keys, another provider: never).
    assert store.uncertain_batches(draft_id, "again", NOW, via="resend:b") == []
    assert store.uncertain_batches(draft_id, "again", NOW, via="postmark") == []
    groups = store.uncertain_batches(draft_id, "again", NOW, via="resend:a")
    assert [[x.ledger_id for x in g] for g in groups] == [[x.ledger_id for x in one], [two[0].ledger_id]]
    assert store.ledger_counts(draft_id) == {"claimed": 3, "sent": 2}
    for g in groups:
        store.settle([SendResult(x.ledger_id, "sent", None) for x in g], "resend", NOW, g)
    assert store.ledger_counts(draft_id) == {"sent": 5}


def test_upgrade_keeps_rows_in_flight_uncertain_and_downgrade_gives_rows_their_status(db_url: str) -> None:
    """A send interrupted under schema 0006 (rows marked claimed one by one) is upgraded: the
    next sender still finds those rows in flight. Going back to 0006 writes each row's
    status as the batches gave it."""
    from alembic import command

    engine = db.make_engine(db_url)
    db.upgrade(engine, "0006")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO drafts (id, period_key, status, subject, snapshot, content_hash, "
                             "created_at, updated_at) VALUES (1, 'p', 'sending', 's', '[]', 'h', "
                             "'2026-11-01', '2026-11-01')")
        for i, status in enumerate(("sent", "claimed", "pending"), start=1):
            conn.exec_driver_sql("INSERT INTO subscribers (id, email, name, status, origin, created_at, updated_at) "
                                 f"VALUES ({i}, 'r{i}@x.org', '', 'active', 'cli', '2026-11-01', '2026-11-01')")
            conn.exec_driver_sql("INSERT INTO send_ledger (id, draft_id, subscriber_id, email, status, attempts) "
                                 f"VALUES ({i}, 1, {i}, 'r{i}@x.org', '{status}', 0)")
    db.upgrade(engine)
    store = Store(engine)
    store.start_send(1, NOW)
    assert store.mark_stale_claims_uncertain(1, NOW) == 1
    batch = store.claim_batch(1, 10, "me", NOW)
    assert [x.ledger_id for x in batch] == [3]
    assert store.ledger_counts(1) == {"sent": 1, "uncertain": 1, "claimed": 1}
    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, status FROM send_ledger ORDER BY id").all()
    assert [tuple(r) for r in rows] == [(1, "sent"), (2, "uncertain"), (3, "claimed")]
    names = {ix["name"] for ix in inspect(engine).get_indexes("send_ledger")}
    assert "ix_send_ledger_pending" in names and "ix_send_ledger_queued" not in names
    assert db.upgrade(engine) == ("0006", db.HEAD)
    engine.dispose()


def test_downgrade_to_before_the_pending_index_restores_the_status_index(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    from alembic import command

    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    names = {ix["name"] for ix in inspect(engine).get_indexes("send_ledger")}
    assert "ix_send_ledger_draft_status" in names and "ix_send_ledger_pending" not in names
    assert db.upgrade(engine) == ("0004", db.HEAD)
    names = {ix["name"] for ix in inspect(engine).get_indexes("send_ledger")}
    assert "ix_send_ledger_queued" in names and "ix_send_ledger_draft_status" not in names
    engine.dispose()


def test_a_sender_dying_between_a_partial_verdict_and_the_batch_verdict_leaves_all_uncertain(store: Store) -> None:
    """Part of a batch is recorded uncertain, then the sender dies before the batch's own
    verdict: the next sender finds every row of the batch uncertain, none sent or pending."""
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 3, "me", NOW)
    store.mark_uncertain([batch[0].ledger_id], "reset mid-batch", NOW, batch)
    assert store.ledger_counts(draft_id) == {"uncertain": 1, "claimed": 2}
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 2
    assert store.ledger_counts(draft_id) == {"uncertain": 3}
    assert store.claim_batch(draft_id, 3, "next", NOW) == []


def test_a_batch_recorded_call_by_call_leaves_only_its_calls_in_flight_uncertain(store: Store) -> None:
    """A batch sent as several calls (SES, SMTP): each call's rows are marked before it starts
    and the answered ones recorded with the next mark. When its sender dies, only the rows of
    the call in flight are uncertain; those never started go back to the queue, the answered
    ones keep their verdicts."""
    emails = [f"{c}@x.org" for c in "abcdef"]
    draft_id = _sending(store, emails)
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 5, "me", NOW)
    a, b, c, d, e = (x.ledger_id for x in batch)
    assert batch.ranged
    store.record_calls(batch, draft_id, [a], [], "ses", NOW)
    assert not batch.ranged  # its rows now have statuses of their own
    assert {i: s for i, s in _own_statuses(store, draft_id).items() if i in (a, b, c, d, e)} == {
        a: "sending", b: "claimed", c: "claimed", d: "claimed", e: "claimed"}
    assert store.ledger_counts(draft_id) == {"claimed": 5, "pending": 1}  # sending is in flight
    store.record_calls(batch, draft_id, [b], [SendResult(a, "sent", "m-a")], "ses", NOW)
    # c: refused for now (certainly not sent), so not in flight any more; d's call starts.
    store.record_calls(batch, draft_id, [c], [SendResult(b, "rejected", None, "MessageRejected")], "ses", NOW)
    store.record_calls(batch, draft_id, [d], [SendResult(c, "deferred", None, "not sent: 429")], "ses", NOW)
    rows = {i: s for i, _e, s in store.ledger_rows(draft_id)}
    assert [rows[i] for i in (a, b, c, d, e)] == ["sent", "rejected", "claimed", "claimed", "claimed"]
    assert _own_statuses(store, draft_id)[d] == "sending"
    # The sender dies here, with d's call in flight.
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 1
    rows = {i: s for i, _e, s in store.ledger_rows(draft_id)}
    assert [rows[i] for i in (a, b, c, d, e)] == ["sent", "rejected", "pending", "uncertain", "pending"]
    assert [m.ledger_id for m in store.uncertain_messages(draft_id)] == [d]
    assert store.ledger_counts(draft_id) == {"sent": 1, "rejected": 1, "uncertain": 1, "pending": 3}
    # The next claims take the rest of the range, then c and e from the queue: a never again.
    taken = [x.ledger_id for x in store.claim_batch(draft_id, 5, "next", NOW)]
    taken += [x.ledger_id for x in store.claim_batch(draft_id, 5, "next", NOW)]
    assert sorted(taken) == sorted([c, e, max(_own_statuses(store, draft_id))])


def test_a_batch_recorded_call_by_call_whose_calls_never_started_goes_back_whole(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    a, b = (x.ledger_id for x in batch)
    store.record_calls(batch, draft_id, [a], [], "smtp", NOW)
    store.record_calls(batch, draft_id, [], [SendResult(a, "deferred", None, "not sent: refused")], "smtp", NOW)
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 0
    assert store.ledger_counts(draft_id) == {"pending": 2}
    assert _batches(store)[0][2] == "released"


def test_the_verdict_of_a_batch_recorded_call_by_call_covers_every_row(store: Store) -> None:
    """After its last call the sender gives the batch's verdict as for any batch: every row,
    the uncertain one and the one put back included; the batch is closed."""
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 3, "me", NOW)
    a, b, c = (x.ledger_id for x in batch)
    store.record_calls(batch, draft_id, [a], [], "ses", NOW)
    store.record_calls(batch, draft_id, [b], [SendResult(a, "sent", "m-a")], "ses", NOW)
    store.record_calls(batch, draft_id, [c], [], "ses", NOW)
    store.mark_uncertain([b], "read timeout", NOW, batch)
    store.release([c], "not sent: reset before the request", NOW, batch)  # c was 'sending'
    store.settle([SendResult(a, "sent", "m-a")], "ses", NOW, batch)
    assert {i: s for i, _e, s in store.ledger_rows(draft_id)} == {a: "sent", b: "uncertain", c: "pending"}
    assert _batches(store)[0][2] == "settled"
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 0


def test_a_late_call_record_from_a_sender_taken_over_is_refused(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    a, b = (x.ledger_id for x in batch)
    store.record_calls(batch, draft_id, [a], [], "ses", NOW)
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 1  # another sender took it for dead
    with pytest.raises(TakenOverError):
        store.record_calls(batch, draft_id, [b], [SendResult(a, "sent", "m-a")], "ses", NOW)
    rows = {i: s for i, _e, s in store.ledger_rows(draft_id)}
    assert rows == {a: "uncertain", b: "pending"}  # as the other sender recorded it


def test_a_claim_reads_at_most_its_size_in_ids_past_the_cursor(store: Store) -> None:
    """However the database plans the query, a claim reads a window of ``size`` ids, never the
    rest of the audience (PostgreSQL without fresh statistics once sorted all of it per claim).
    A window whose rows are all skipped (rule 2) moves on to the next one."""
    emails = [f"r{i}@x.org" for i in range(7)]
    draft_id = _sending(store, emails)
    store.start_send(draft_id, NOW)
    for email in emails[:2]:
        store.suppress(email, "hard_bounce", "postmark", NOW)
    windows: list[int] = []
    raw = store._raw

    def spy(conn: Any, sql: str, params: Any = (), many: bool = False) -> Any:
        if sql.startswith("SELECT l.id") and "l.id > " in sql:
            windows.append(params[1] - params[0])
        return raw(conn, sql, params, many)

    store._raw = spy  # type: ignore[method-assign]
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    assert [c.recipient.email for c in batch] == ["r2@x.org", "r3@x.org"]
    assert windows == [2, 2]
    assert store.ledger_counts(draft_id) == {"skipped": 2, "claimed": 2, "pending": 3}


def test_a_second_drafts_freeze_gives_its_cursor_exactly_its_rows(store: Store) -> None:
    """The freeze sets the draft's cursor from the rows it wrote (on SQLite without counting
    them again): a second draft's range starts after the first draft's rows, and its claims
    and counts see its own audience only."""
    first = _sending(store, ["a@x.org", "b@x.org"])
    assert store.start_send(first, NOW) == 2
    store.upsert_subscribers([("c@x.org", "c")], "cli", NOW)
    gone = store.subscriber_by_email("a@x.org")
    assert gone is not None
    store.set_subscriber_status(gone.id, "unsubscribed", NOW)  # not in the second audience
    store.record_collect(CollectResult("s", essays=(essay("e2", "Two"),), comments=()), NOW)
    (eid, e), = [(i, x) for i, x in store.candidate_essays(None, 10) if x.key == "e2"]
    d, _new = store.create_draft(Draft("P2", "Subject", "", (DraftItem(e, ()),)), [(eid, None)], NOW)
    assert d.id is not None
    store.transition(d.id, ("pending_review",), "approved", NOW)
    assert store.start_send(d.id, NOW) == 2
    with store.engine.connect() as conn:
        cursor = tuple(conn.exec_driver_sql(
            f"SELECT claimed_through, first_id, last_id, total FROM send_cursors WHERE draft_id = {d.id}").one())
        ids = [r[0] for r in conn.exec_driver_sql(
            f"SELECT id FROM send_ledger WHERE draft_id = {d.id} ORDER BY id").fetchall()]
    assert cursor == (ids[0] - 1, ids[0], ids[-1], 2)
    assert store.ledger_counts(d.id) == {"pending": 2}
    batch = store.claim_batch(d.id, 10, "me", NOW)
    assert [c.email for c in batch] == ["b@x.org", "c@x.org"]
    assert store.ledger_counts(first) == {"pending": 2}
    assert store.start_send(d.id, NOW) == 2  # started already: left alone


def test_a_claim_reads_its_rows_outside_the_write_lock(store: Store) -> None:
    """The claim's write (cursor and batch record) commits first; its rows and their
    eligibility are read after, while another writer may write: here a verdict of another
    batch commits while the claim is reading, which would wait for the claim if the read held
    the writers' turn (or, on SQLite, the database's one write lock)."""
    draft_id = _sending(store, [f"r{i}@x.org" for i in range(4)])
    store.start_send(draft_id, NOW)
    first = store.claim_batch(draft_id, 2, "me", NOW)
    raw = store._raw
    written: list[bool] = []

    def spy(conn: Any, sql: str, params: Any = (), many: bool = False) -> Any:
        if sql.startswith("SELECT l.id") and not written:
            done = threading.Event()

            def verdict() -> None:
                store.settle([SendResult(c.ledger_id, "sent", "m") for c in first], "sendgrid", NOW, first)
                done.set()

            other = threading.Thread(target=verdict)
            other.start()
            written.append(done.wait(10))
            other.join(10)
        return raw(conn, sql, params, many)

    store._raw = spy  # type: ignore[method-assign]
    second = store.claim_batch(draft_id, 2, "me", NOW)
    store._raw = raw  # type: ignore[method-assign]
    assert written == [True]
    assert [c.email for c in second] == ["r2@x.org", "r3@x.org"]
    assert store.ledger_counts(draft_id) == {"sent": 2, "claimed": 2}


def test_a_sender_killed_between_the_claim_and_its_read_leaves_the_range_uncertain(store: Store) -> None:
    """Killed after the claim's write and before its rows were read (nothing sent): the range
    is claimed, so the next start makes all of it uncertain, a reader who unsubscribed since
    the start too; the operator resolves it like any batch in flight, and the resend's claim
    skips that reader (rule 2)."""
    draft_id = _sending(store, [f"r{i}@x.org" for i in range(5)])
    store.start_send(draft_id, NOW)
    gone = store.subscriber_by_email("r1@x.org")
    assert gone is not None
    store.set_subscriber_status(gone.id, "unsubscribed", NOW)
    with store.engine.connect() as conn:
        claimed = store._claim_range(conn, draft_id, 3, "dead", store._when(NOW), "sendgrid")
    assert claimed is not None  # (here the process dies)
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 3
    assert store.ledger_counts(draft_id) == {"uncertain": 3, "pending": 2}
    assert store.resolve_uncertain(draft_id, "resend", NOW) == 3
    again = store.claim_batch(draft_id, 10, "me", NOW)
    assert [c.email for c in again] == ["r3@x.org", "r4@x.org"]  # the range after, first
    rest = store.claim_batch(draft_id, 10, "me", NOW)
    assert [c.email for c in rest] == ["r0@x.org", "r2@x.org"] and rest.skipped == 1


def test_a_range_whose_readers_all_left_is_no_batch(store: Store) -> None:
    """Every reader of a claimed range unsubscribed since the start: they are skipped, the
    batch record goes, and the claim goes on to the next range."""
    draft_id = _sending(store, [f"r{i}@x.org" for i in range(4)])
    store.start_send(draft_id, NOW)
    for email in ("r0@x.org", "r1@x.org"):
        store.suppress(email, "complaint", "sendgrid", NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    assert [c.email for c in batch] == ["r2@x.org", "r3@x.org"] and batch.skipped == 2
    with store.engine.connect() as conn:
        batches = conn.exec_driver_sql(
            f"SELECT first_id, last_id, status FROM send_batches WHERE draft_id = {draft_id}").fetchall()
    assert [tuple(b)[2] for b in batches] == ["claimed"]
    assert store.ledger_counts(draft_id) == {"skipped": 2, "claimed": 2}


def test_remaining_is_what_a_claim_would_find_without_claiming_it(store: Store) -> None:
    draft_id = _sending(store, [f"{c}@x.org" for c in "abcde"])
    assert store.remaining(draft_id) is None  # not frozen yet: the audience is the answer
    store.start_send(draft_id, NOW)
    first = store.claim_batch(draft_id, 2, "me", NOW)
    store.settle([SendResult(x.ledger_id, "sent", None) for x in first], "outbox", NOW, first)
    back = store.claim_batch(draft_id, 1, "me", NOW)
    store.release([back[0].ledger_id], "not sent: 429", NOW, back)
    gone = store.subscriber_by_email("e@x.org")
    assert gone is not None
    store.set_subscriber_status(gone.id, "unsubscribed", NOW)
    rows = store.remaining(draft_id, page=2)  # pages smaller than the rest: read in several
    assert rows is not None
    assert [(c.email, ok) for c, ok in rows] == [("c@x.org", True), ("d@x.org", True), ("e@x.org", False)]
    # Nothing was claimed or skipped by looking.
    assert store.ledger_counts(draft_id) == {"sent": 2, "pending": 3}
    assert [x.email for x in store.claim_batch(draft_id, 5, "me", NOW)] == ["d@x.org"]


def test_a_batch_whose_rows_all_have_their_own_verdict_is_closed_not_left_in_flight(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    a, b = (x.ledger_id for x in batch)
    # A batch sent in several calls: one message may have gone out, the other is deferred.
    store.mark_uncertain([a], "reset", NOW, batch)
    store.release([b], "not sent: 429", NOW, batch)
    store.settle([], "ses", NOW, batch)
    assert _batches(store)[0][2] == "settled"
    # The next sender finds nothing in flight: no batch turned uncertain, a still uncertain.
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 0
    assert store.ledger_counts(draft_id) == {"uncertain": 1, "pending": 2}
    # A batch the sender did not get to settle at all stays in flight, as before.
    other = store.claim_batch(draft_id, 1, "me", NOW)
    store.settle([], "ses", NOW, None)
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == len(other)


def _ledger_keys(engine: Any) -> set[str]:
    return {fk["name"] for fk in inspect(engine).get_foreign_keys("send_ledger")}


def test_0009_drops_the_ledgers_foreign_keys_and_keeps_its_rows_and_rule_1(db_url: str) -> None:
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    store = open_store(db_url)
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    assert store.start_send(draft_id, NOW) == 3
    claimed = store.claim_batch(draft_id, 2, "me", NOW)
    before = store.ledger_rows(draft_id)
    engine = store.engine
    assert _ledger_keys(engine) == set()
    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008")
    assert _ledger_keys(engine) == {"fk_send_ledger_draft_id_drafts", "fk_send_ledger_subscriber_id_subscribers"}
    assert db.upgrade(engine) == ("0008", db.HEAD)
    assert _ledger_keys(engine) == set()
    # The rows, their ids and the send's progress are as they were; the send goes on.
    assert store.ledger_rows(draft_id) == before
    assert {ix["name"] for ix in inspect(engine).get_indexes("send_ledger")} >= {
        "ix_send_ledger_queued", "ix_send_ledger_batch"}
    store.settle([SendResult(c.ledger_id, "sent", f"m{c.ledger_id}") for c in claimed], "postmark", NOW, claimed)
    assert [c.email for c in store.claim_batch(draft_id, 2, "me", NOW)] == ["c@x.org"]
    # Rule 1's key stays: a reader cannot get a second row in the same send.
    with engine.connect() as conn:
        subscriber_id = conn.exec_driver_sql(
            "SELECT subscriber_id FROM send_ledger ORDER BY id LIMIT 1").scalar_one()
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO send_ledger (draft_id, subscriber_id, email, status) "
            f"VALUES ({draft_id}, {subscriber_id}, 'a@x.org', 'pending')")
    store.close()


def test_upgrade_to_0008_indexes_events_by_ledger_row_and_downgrade_drops_it(db_url: str) -> None:
    from alembic import command

    engine = db.make_engine(db_url)
    db.upgrade(engine, "0007")
    assert "ix_delivery_events_ledger" not in {ix["name"] for ix in inspect(engine).get_indexes("delivery_events")}
    assert db.upgrade(engine, "0008") == ("0007", "0008")
    assert "ix_delivery_events_ledger" in {ix["name"] for ix in inspect(engine).get_indexes("delivery_events")}
    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
    assert "ix_delivery_events_ledger" not in {ix["name"] for ix in inspect(engine).get_indexes("delivery_events")}
    engine.dispose()


def test_commands_started_together_on_a_new_database_all_find_it_ready(db_url: str, tmp_path: Any) -> None:
    """`digest serve` and a cron job (or two hosts) opening a database nobody has used yet:
    one creates the schema, the others wait for it, and nobody fails on "already exists" or
    "locked"."""
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from digest.store import db\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        "db.ensure_schema(db.make_engine(sys.argv[1]))\n"
        "print('ready')\n"
    )
    for _round in range(3):
        if db_url.startswith("sqlite"):
            for leftover in tmp_path.glob("digest.db*"):
                leftover.unlink()
        else:
            from tests.conftest import _reset_pg

            _reset_pg(db_url)
        go.unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        time.sleep(1.0)  # all three started and waiting
        go.touch()
        outcomes = [p.communicate(timeout=120) for p in procs]
        assert [(p.returncode, out.strip()) for p, (out, _err) in zip(procs, outcomes, strict=True)] == \
            [(0, "ready")] * 3, [err for _out, err in outcomes]
        engine = db.make_engine(db_url)
        assert db.current_revision(engine) == db.HEAD
        engine.dispose()


def test_a_holder_renewing_its_lease_from_two_threads_keeps_it(store: Store) -> None:
    """Two workers of one sender renewing at the same moment: both renewals are the holder's
    own, and neither may read as "taken by another" (which stops the send)."""
    import threading

    assert store.acquire_lease("send:1", "me", NOW, NOW + timedelta(minutes=5))
    results: list[bool] = []
    lock = threading.Lock()

    def renew(offset: int) -> None:
        for i in range(100):
            now = NOW + timedelta(seconds=i * 2 + offset)
            ok = store.acquire_lease("send:1", "me", now, now + timedelta(minutes=5))
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=renew, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 200
    assert not store.acquire_lease("send:1", "other", NOW, NOW + timedelta(minutes=5))


@pytest.mark.postgres
def test_a_restart_and_a_late_verdict_on_one_batch_take_their_locks_in_one_order(pg_database: str) -> None:
    """The restart marks a batch uncertain while the sender it took for dead settles it: on
    PostgreSQL each locks the batch's record before its rows, so one waits for the other
    instead of both waiting for each other (a deadlock, which aborts one of them)."""
    import threading

    from tests.conftest import _reset_pg

    _reset_pg(pg_database)
    store = open_store(pg_database)
    try:
        draft_id = _sending(store, [f"r{i}@x.org" for i in range(4)])
        store.start_send(draft_id, NOW)
        first = store.claim_batch(draft_id, 4, "old", NOW)
        store.release([c.ledger_id for c in first], "HTTP 503", NOW, first)  # back in the queue
        batch = store.claim_batch(draft_id, 4, "old", NOW)  # claimed row by row: no range
        assert not batch.ranged and len(batch) == 4
        held = threading.Event()
        raw = Store._raw

        def paced(conn: Any, sql: str, params: Any = (), many: bool = False) -> Any:
            # The restart's batch statement waits until the late verdict holds the batch.
            if threading.current_thread().name == "restart" and sql.startswith("UPDATE send_batches"):
                held.wait(5)
            cursor = raw(conn, sql, params, many)
            if threading.current_thread().name == "late" and "claim_token = claim_token" in sql:
                held.set()
            return cursor

        out: dict[str, object] = {}

        def restart() -> None:
            try:
                out["restart"] = store.mark_stale_claims_uncertain(draft_id, NOW)
            except Exception as exc:  # noqa: BLE001 - reported below
                out["restart"] = exc

        def late() -> None:
            try:
                store.settle([SendResult(c.ledger_id, "sent", "m") for c in batch], "sendgrid", NOW, batch)
                out["late"] = "settled"
            except Exception as exc:  # noqa: BLE001 - reported below
                out["late"] = exc

        Store._raw = staticmethod(paced)  # type: ignore[method-assign]
        try:
            threads = [threading.Thread(target=restart, name="restart"), threading.Thread(target=late, name="late")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            Store._raw = staticmethod(raw)  # type: ignore[method-assign]
        # The late verdict came first here (it held the batch): it stands, and the restart
        # finds nothing in flight.
        assert out == {"late": "settled", "restart": 0}
        assert store.ledger_counts(draft_id) == {"sent": 4}
    finally:
        store.close()


RULES = SuppressionRules({"hard_bounce": "hard_bounce", "complaint": "complaint", "unsubscribe": "unsubscribed"},
                         3, timedelta(days=30))


def remember(store: Store, provider: str, key: str, now: datetime, until: datetime, content_hash: str = "") -> str:
    """A request without events: only its replay key is recorded."""
    return store.apply_webhook(provider, [], now, RULES, replay_key=key, keep_until=until,
                               content_hash=content_hash).seen


def bounce(event_id: str, email: str = "ada@x.org") -> DeliveryEvent:
    return DeliveryEvent("sendgrid", event_id, "hard_bounce", email, NOW)


def test_webhook_replay_memory_tells_a_copy_from_the_same_key_on_other_content(store: Store) -> None:
    until = NOW + timedelta(seconds=600)
    assert remember(store, "svix", "msg_1", NOW, until) == "new"
    assert remember(store, "svix", "msg_1", NOW, until) == "duplicate"
    assert remember(store, "other", "msg_1", NOW, until) == "new"  # per provider
    # A content hash (Mailgun's body): the first one stays, a copy must match it.
    assert remember(store, "mailgun", "token:t", NOW, until, "sha256:aa") == "new"
    assert remember(store, "mailgun", "token:t", NOW, until, "sha256:aa") == "duplicate"
    assert remember(store, "mailgun", "token:t", NOW, until, "sha256:bb") == "conflict"
    assert remember(store, "mailgun", "token:t", NOW, until) == "conflict"
    assert remember(store, "mailgun", "token:t", NOW, until, "sha256:aa") == "duplicate"
    # Expired keys, with or without a hash, are purged by the next insert and are new again.
    later = until + timedelta(seconds=1)
    assert remember(store, "svix", "msg_2", later, later + timedelta(seconds=600)) == "new"
    assert remember(store, "svix", "msg_1", later, later + timedelta(seconds=600)) == "new"
    assert remember(store, "mailgun", "token:t", later, later, "sha256:cc") == "new"
    # A key that expires exactly now is still held (as before the hash was stored with it).
    assert remember(store, "mailgun", "token:t", later, later, "sha256:cc") == "duplicate"


def test_a_webhook_copy_applies_nothing_so_a_reactivated_reader_stays_active(store: Store) -> None:
    """The key and the events are recorded together: a copy of the request that bounced a
    reader, arriving after the reader was taken back, changes nothing; nor does the same event
    under a new key (SendGrid signs each retry anew, SES may publish one event twice)."""
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    until = NOW + timedelta(seconds=600)
    first = store.apply_webhook("sendgrid", [bounce("sg-1")], NOW, RULES, replay_key="k1", keep_until=until)
    assert first == WebhookApplied("new", stored=1, suppressed=("ada@x.org",))
    assert store.subscriber_by_email("ada@x.org").status == "bounced"  # type: ignore[union-attr]
    reactivate(store, "ada@x.org", NOW)
    copy = store.apply_webhook("sendgrid", [bounce("sg-1")], NOW, RULES, replay_key="k1", keep_until=until)
    assert copy == WebhookApplied("duplicate", duplicates=1)
    resigned = store.apply_webhook("sendgrid", [bounce("sg-1")], NOW, RULES, replay_key="k2", keep_until=until)
    assert resigned == WebhookApplied("new", duplicates=1)
    assert store.subscriber_by_email("ada@x.org").status == "active"  # type: ignore[union-attr]
    assert [s.email for s in store.audience()] == ["ada@x.org"]  # the next send includes her
    assert store.event_counts() == {"hard_bounce": 1}


def test_a_webhook_that_fails_halfway_leaves_nothing_and_its_retry_applies(store: Store) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    until = NOW + timedelta(seconds=600)
    with writes_refused(store), pytest.raises(StoreError):
        store.apply_webhook("sendgrid", [bounce("sg-1")], NOW, RULES, replay_key="k1", keep_until=until)
    # Neither the key, nor the event, nor anything it did.
    assert store.event_counts() == {}
    assert store.subscriber_by_email("ada@x.org").status == "active"  # type: ignore[union-attr]
    retry = store.apply_webhook("sendgrid", [bounce("sg-1")], NOW, RULES, replay_key="k1", keep_until=until)
    assert retry == WebhookApplied("new", stored=1, suppressed=("ada@x.org",))
    assert store.subscriber_by_email("ada@x.org").status == "bounced"  # type: ignore[union-attr]


def test_two_copies_of_a_webhook_at_once_apply_it_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes take the same request at the same moment (the provider retried while the
    first was still applying): the second waits for the first's transaction and is a duplicate."""
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        store.upsert_subscribers([("ada@x.org", "Ada"), ("ben@x.org", "Ben")], "cli", NOW)
        real = store._apply_events

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)  # the key is taken; the copy arrives now
            return real(*args, **kwargs)

        monkeypatch.setattr(store, "_apply_events", slow)
        until = NOW + timedelta(seconds=600)
        events = [bounce("sg-1"), bounce("sg-2", "ben@x.org")]

        def work(s: Store, first: bool) -> WebhookApplied:
            if not first:
                time.sleep(0.1)  # after the first has taken the key
            return s.apply_webhook("sendgrid", events, NOW, RULES, replay_key="k1", keep_until=until)

        a, b = _at_once(0, store, other, work)
        assert (a.seen, b.seen) == ("new", "duplicate")
        assert (a.stored, b.stored) == (2, 0)
        assert store.event_counts() == {"hard_bounce": 2}
    finally:
        other.close()


def test_a_copy_waiting_for_a_first_attempt_that_fails_applies_it(store: Store,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt holds the key, then fails: the copy waiting for it takes the key and
    applies the events (never both, never neither)."""
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)

        def refused(*args: Any, **kwargs: Any) -> None:
            time.sleep(0.5)  # the key and the event are written; the copy arrives now
            raise OperationalError("INSERT INTO suppressions ...", {}, Exception("the database refused the write"))

        monkeypatch.setattr(store, "_suppress", refused)  # this process only
        until = NOW + timedelta(seconds=600)

        def work(s: Store, first: bool) -> Any:
            if not first:
                time.sleep(0.1)  # after the first has taken the key
            try:
                return s.apply_webhook("sendgrid", [bounce("sg-1")], NOW, RULES, replay_key="k1", keep_until=until)
            except StoreError as exc:
                return str(exc)

        a, b = _at_once(0, store, other, work)
        assert "the database refused the write" in a
        assert b == WebhookApplied("new", stored=1, suppressed=("ada@x.org",))
        assert store.subscriber_by_email("ada@x.org").status == "bounced"  # type: ignore[union-attr]
    finally:
        other.close()


def test_an_address_given_twice_counts_once_with_its_last_name(store: Store) -> None:
    store.upsert_subscribers([("ann@example.com", "Ann"), ("bo@example.com", "Bo")], "cli", NOW)
    added, updated, skipped = store.upsert_subscribers(
        [("Cy@Example.com", "Cy"), ("cy@example.com", "Cyrus"), ("ann@example.com", "Ann B."),
         ("bo@example.com", ""), ("ann@example.com", "")], "import", NOW)
    assert (added, updated, skipped) == (1, 1, [])
    names = {s.email: s.name for s in store.list_subscribers()}
    assert names == {"ann@example.com": "Ann B.", "bo@example.com": "Bo", "cy@example.com": "Cyrus"}


def test_two_imports_of_one_list_at_once_add_each_address_once(store: Store) -> None:
    """An import from the CLI while another runs (or the subscribe form takes one of its
    addresses): neither fails on the unique address or deadlocks (the other file lists the
    addresses in another order), and between them each is added once."""
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        for round_ in range(3):
            rows = [(f"r{round_}-{i}@example.com", f"R {i}") for i in range(1000)]
            a, b = _at_once(round_, store, other, lambda s, first, rows=rows: s.upsert_subscribers(
                rows if first else rows[::-1], "import", NOW))
            assert a[0] + b[0] == 1000
            assert sum(1 for s in store.list_subscribers() if s.email.startswith(f"r{round_}-")) == 1000
    finally:
        other.close()


def test_webhook_replay_memory_purges_expired_keys_at_most_once_a_minute(store: Store) -> None:
    """The purge reads every remembered key: it runs once a minute per process, not for every
    webhook. An expired key not yet purged is forgotten all the same."""
    from digest.store.schema import meta

    def remembered() -> int:
        with store.engine.connect() as conn:
            return len(conn.execute(meta.select().where(meta.c.key.startswith("webhook-replay:"))).all())

    until = NOW + timedelta(seconds=60)
    for i in range(5):
        assert remember(store, "svix", f"msg_{i}", NOW, until) == "new"
    assert remembered() == 5
    later = until + timedelta(seconds=1)
    assert remember(store, "svix", "msg_5", later, later + timedelta(seconds=60)) == "new"
    assert remembered() == 6  # purged a moment ago, by the first key: not again yet
    assert remember(store, "svix", "msg_0", later, later + timedelta(seconds=60)) == "new"  # expired
    assert remember(store, "svix", "msg_0", later, later + timedelta(seconds=60)) == "duplicate"
    store._next_replay_purge = 0.0  # a minute on
    assert remember(store, "svix", "msg_6", later, later + timedelta(seconds=60)) == "new"
    assert remembered() == 3  # msg_0 (again), msg_5 and msg_6; the four expired are gone


def test_a_driver_error_on_the_send_path_is_a_store_error(store: Store) -> None:
    """The send path's raw statements meet the driver's own errors ("database is locked", a
    full disk, a lost server): they are a StoreError like any database error, which stops the
    send in one line (rule 9) instead of a traceback."""
    draft_id = _sending(store, ["a@x.org"])
    store.start_send(draft_id, NOW)
    dbapi = store.engine.dialect.loaded_dbapi
    raw = store._raw

    def failing(conn: Any, sql: str, params: Any = (), many: bool = False) -> Any:
        if sql.startswith("SELECT l.id"):
            raise dbapi.OperationalError("database is locked")
        return raw(conn, sql, params, many)

    store._raw = failing  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="^database error: OperationalError: database is locked$"):
        store.claim_batch(draft_id, 1, "me", NOW)
    store._raw = raw  # type: ignore[method-assign]
    # Nothing was sent, and the range went back to the queue: the next claim takes it.
    assert store.ledger_counts(draft_id) == {"pending": 1}
    assert [c.email for c in store.claim_batch(draft_id, 1, "me", NOW)] == ["a@x.org"]


def test_two_requests_bringing_the_soft_bounces_that_reach_the_limit_at_once_suppress(store: Store) -> None:
    """Each request stores its soft bounce and counts in one transaction: two at once must not
    each count only their own uncommitted event and both stay under the limit. Each holds its
    transaction open a moment after counting, so the two overlap whatever the timing."""
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)

        def soft(i: str) -> DeliveryEvent:
            return DeliveryEvent("sendgrid", f"soft-{i}", "soft_bounce", "ada@x.org", NOW)

        store.apply_webhook("sendgrid", [soft("1")], NOW, RULES, replay_key="k0", keep_until=NOW + timedelta(hours=1))
        for s in (store, other):
            real = s._apply_events

            def slow(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                out = _real(*args, **kwargs)
                time.sleep(0.3)  # counted, not committed yet
                return out

            s._apply_events = slow  # type: ignore[method-assign]

        def work(s: Store, first: bool) -> WebhookApplied:
            return s.apply_webhook("sendgrid", [soft("2" if first else "3")], NOW, RULES,
                                   replay_key="k1" if first else "k2", keep_until=NOW + timedelta(hours=1))

        a, b = _at_once(0, store, other, work)
        assert store.event_counts() == {"soft_bounce": 3}
        assert sorted(a.suppressed + b.suppressed) == ["ada@x.org"]  # the one counting last
        sub = store.subscriber_by_email("ada@x.org")
        assert sub is not None and sub.status == "bounced"
    finally:
        other.close()



def _durability(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """From now on, each write statement of the send path (``Store._raw``) as it runs, with
    whether its transaction's commit will wait for the disk, read from the database itself
    (SQLite: ``PRAGMA synchronous``, FULL = 2; PostgreSQL: ``synchronous_commit``)."""
    seen: list[tuple[str, bool]] = []
    original = Store._raw
    ask = "PRAGMA synchronous" if store.dialect == "sqlite" else "SELECT current_setting('synchronous_commit')"

    def raw(conn: Any, sql: str, params: Any = (), many: bool = False) -> Any:
        if sql.lstrip().startswith(("UPDATE", "INSERT", "DELETE")):
            level = conn.connection.cursor().execute(ask).fetchone()[0]
            seen.append((sql.split(" SET ")[0].strip(), level in (2, 3, "on", "remote_apply", "remote_write")))
        return original(conn, sql, params, many)

    monkeypatch.setattr(Store, "_raw", staticmethod(raw))
    return seen


def _pool_waits_for_disk(store: Store) -> bool:
    """Whether a connection from the pool commits waiting for the disk (every one tried)."""
    waits = []
    for _ in range(3):
        with store.engine.connect() as conn:
            if store.dialect == "sqlite":
                waits.append(conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2)
            else:
                waits.append(conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on")
    return all(waits)


def test_a_verdict_commits_without_waiting_for_the_disk_and_a_claim_waits(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 1 needs a claim on disk before its call. A verdict, after the call, may wait for
    the next claim's flush: a power cut loses it only as a row still claimed (uncertain)."""
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org", "d@x.org"])
    store.start_send(draft_id, NOW)
    seen = _durability(store, monkeypatch)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    assert seen and all(waits for _, waits in seen)
    assert any(sql.startswith("INSERT INTO send_batches") for sql, _ in seen)
    seen.clear()
    store.settle([SendResult(c.ledger_id, "sent", "m") for c in batch], "sendgrid", NOW, batch)
    assert ("UPDATE send_batches", False) in seen and not any(waits for _, waits in seen)
    seen.clear()
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    assert seen and all(waits for _, waits in seen)
    seen.clear()
    c, d = (x.ledger_id for x in batch)
    store.mark_uncertain([c], "timed out", NOW, batch)
    store.release([d], "not sent: 503", NOW, batch)
    assert ("UPDATE send_ledger", False) in seen and not any(waits for _, waits in seen)
    # Every other write, and every connection the pool hands out, waits for the disk again.
    assert _pool_waits_for_disk(store)
    first, second = sorted(_own_statuses(store, draft_id))[:2]
    assert {i: s for i, _e, s in store.ledger_rows(draft_id)} == {
        first: "sent", second: "sent", c: "uncertain", d: "pending"}  # d: back in the queue


def test_a_verdict_that_fails_leaves_its_connection_waiting_for_the_disk(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org"])
    store.start_send(draft_id, NOW)
    batch = store.claim_batch(draft_id, 2, "me", NOW)
    assert store.mark_stale_claims_uncertain(draft_id, NOW) == 2  # another sender took it over
    with pytest.raises(TakenOverError):
        store.settle([SendResult(c.ledger_id, "sent", "m") for c in batch], "sendgrid", NOW, batch)
    assert _pool_waits_for_disk(store)
