"""Migration 0006 (compiled_drafts) and the partial indexes' per-dialect conditions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from digest.store import Store, db, open_store, schema
from tests.conftest import NOW, _reset_pg


def _draft_row(engine: Engine) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text(
            "INSERT INTO drafts (period_key, status, subject, intro, snapshot, content_hash, created_at, "
            "updated_at) VALUES ('P1', 'approved', 'Subject', '', '[]', 'h', :now, :now) RETURNING id"),
            {"now": NOW}).scalar_one())


def test_upgrade_from_0005_adds_compiled_drafts_and_downgrade_removes_it(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, "0005")
    draft_id = _draft_row(engine)
    assert db.upgrade(engine, "0006") == ("0005", "0006")
    assert "compiled_drafts" in inspect(engine).get_table_names()
    store = Store(engine)
    store.save_compiled_draft(draft_id, "k" * 64, '{"format": 1}', NOW)
    assert store.compiled_draft(draft_id, "k" * 64) == '{"format": 1}'
    # A stored copy goes with its draft.
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.execute(text("DELETE FROM drafts WHERE id = :id"), {"id": draft_id})
    assert store.compiled_draft(draft_id, "k" * 64) is None

    from alembic import command

    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    assert "compiled_drafts" not in inspect(engine).get_table_names()
    assert db.upgrade(engine) == ("0005", db.HEAD)
    engine.dispose()


def test_opening_the_store_on_sqlite_loads_no_postgresql_dialect(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    open_store(url).close()  # created (and migrated) here; the process below only opens it
    code = (f"import sys\nfrom digest.store import open_store\nopen_store({url!r}).get_draft\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy.dialects.postgresql', 'alembic'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_partial_indexes_keep_their_condition_on_both_databases() -> None:
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.schema import CreateIndex

    schema.postgresql_options()
    schema.postgresql_options()  # again: no harm
    for table, name in ((schema.send_ledger, "ix_send_ledger_queued"), (schema.send_ledger, "ix_send_ledger_batch"),
                        (schema.drafts, "uq_drafts_live_period")):
        (index,) = [i for i in table.indexes if i.name == name]
        where = schema.PARTIAL_INDEXES[name]
        for dialect in (sqlite.dialect(), postgresql.dialect()):
            assert str(CreateIndex(index).compile(dialect=dialect)).endswith(f"WHERE {where}")


@pytest.mark.postgres
def test_create_all_on_postgresql_makes_partial_indexes(pg_database: str) -> None:
    _reset_pg(pg_database)
    engine = create_engine(pg_database)
    schema.metadata.create_all(engine)
    indexes = {i["name"]: i for i in inspect(engine).get_indexes("send_ledger")}
    assert "queued" in indexes["ix_send_ledger_queued"]["dialect_options"]["postgresql_where"]
    engine.dispose()
    _reset_pg(pg_database)
