"""Shared fixtures. Database tests run on SQLite and, when DIGEST_TEST_POSTGRES_URL is set
(as .ci/run does), on PostgreSQL too."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

# In CI, property tests draw the same examples every run: a red build then always means a
# change broke something, never that a new random example turned up (run locally to explore).
from hypothesis import settings as _hypothesis_settings
from sqlalchemy import create_engine, text

from digest import config
from digest.store import Store, open_store

_hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")

PG_URL = os.environ.get("DIGEST_TEST_POSTGRES_URL")
PG_SKIP = ("PostgreSQL tests need DIGEST_TEST_POSTGRES_URL, e.g. "
           "postgresql+psycopg://postgres@127.0.0.1:5432/test (.ci/run sets it)")

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


class FrozenClock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime = NOW) -> None:
        self.value = start

    def __call__(self) -> datetime:
        return self.value

    def advance(self, **kwargs: Any) -> None:
        from datetime import timedelta

        self.value += timedelta(**kwargs)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    if not PG_URL:
        pytest.skip(PG_SKIP)
    name = f"digest_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = PG_URL.rpartition("/")
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _reset_pg(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for an empty database, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'digest.db'}"
    url: str = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'digest.db'}")
    yield s
    s.close()


def make_settings(tmp_path: Path, db_url: str | None = None, **overrides: Any) -> config.Settings:
    """Settings like the embedded defaults, rooted in ``tmp_path``, with overrides merged in."""
    from digest.sources.folder import SAMPLE_DIR

    raw: dict[str, Any] = {
        "database": {"url": db_url or f"sqlite:///{tmp_path / 'digest.db'}"},
        "sources": [{"name": "sample", "type": "folder", "path": str(SAMPLE_DIR)}],
        "delivery": {"provider": "outbox", "outbox_dir": str(tmp_path / "outbox")},
        "newsletter": {"public_url": "https://news.example.org"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config.from_dict(raw, file="test.yaml", path=str(tmp_path / "config.yaml"))


def past_validation(settings: config.Settings, **newsletter: str) -> config.Settings:
    """``settings`` with newsletter fields (``from_``, ``reply_to``) set as the config would
    refuse them at load: for tests of what a send still does with such a value."""
    return settings.model_copy(update={"newsletter": settings.newsletter.model_copy(update=newsletter)})


def reactivate(store: Store, email: str, now: datetime) -> None:
    """Take a reader back after a bounce, as an operator does (`digest subscribers reactivate`):
    the address off the suppression list and the subscriber active again."""
    done = store.reactivate(email, now)
    assert done.status == "bounced"


@contextmanager
def writes_refused(store: Store, table: str = "suppressions") -> Iterator[None]:
    """While inside, the database refuses every insert into ``table`` (a trigger that fails): a
    write failing halfway through a transaction, whichever code makes it."""
    postgres = store.dialect == "postgresql"
    with store.engine.begin() as conn:
        if postgres:
            conn.exec_driver_sql("CREATE FUNCTION digest_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                                 "$$ BEGIN RAISE EXCEPTION 'the database refused the write'; END $$")
            conn.exec_driver_sql(f"CREATE TRIGGER digest_test_refuse BEFORE INSERT ON {table} "
                                 "FOR EACH ROW EXECUTE FUNCTION digest_test_refuse()")
        else:  # a function SQLite does not have: the insert fails when the trigger runs
            conn.exec_driver_sql(f"CREATE TRIGGER digest_test_refuse BEFORE INSERT ON {table} "
                                 "BEGIN SELECT digest_test_refuses_the_write(); END")
    try:
        yield
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TRIGGER digest_test_refuse ON {table}" if postgres
                                 else "DROP TRIGGER digest_test_refuse")
            if postgres:
                conn.exec_driver_sql("DROP FUNCTION digest_test_refuse()")
