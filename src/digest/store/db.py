"""Engines and migrations.

SQLite gets WAL mode, foreign keys and a busy timeout on every connection; PostgreSQL goes
through psycopg 3. A fresh database is migrated to the newest schema on first use; an older
one is left alone until the operator runs ``digest db upgrade``.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from digest.errors import StoreError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest revision in migrations/versions. Kept here so that opening a database needs no
# Alembic import (it costs ~10 MB and 100 ms at every start); a test checks it matches.
HEAD = "0011"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the per-dialect settings we rely on."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                folder = Path(path).expanduser().parent
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"database.url: cannot create the folder {folder}: {exc.strerror or exc}",
                                     hint="check database.url, and that the folder can be made") from exc
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError) as exc:
        raise StoreError(f"database.url: cannot open {_masked(url)!r}: {_first_line(exc)}") from exc


def _masked(url: str) -> str:
    """``url`` with its password as ``***``, as SQLAlchemy shows one."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def _first_line(exc: BaseException) -> str:
    """What the driver said, on one line: its first. psycopg adds lines of advice ("Is the
    server running on that host ...?") and SQLAlchemy a link to its documentation; an error
    of digest's is one line (the hint says what to check)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0].strip() if lines else type(cause).__name__


def open_error(engine: Engine, exc: SQLAlchemyError) -> StoreError:
    """The database cannot be reached (or read): one line naming it (password masked), what
    the driver said, and what to check."""
    message = _first_line(exc)
    if engine.url.password:
        message = message.replace(str(engine.url.password), "***")
    hint = ("check database.url, and that its folder is writable" if engine.dialect.name == "sqlite"
            else "check database.url, and that the server is running")
    return StoreError(f"database {engine.url.render_as_string()}: {message}", hint=hint)


def _wal(cursor: Any) -> None:
    """Switch a SQLite file to WAL. On a new file, two processes opening it at once both make
    the switch, which needs the file to themselves: SQLite then answers "locked" at once,
    without waiting out the busy timeout, so this waits and tries again (a few seconds at
    most; an already-WAL file is not switched, so this costs nothing after the first time)."""
    import sqlite3
    import time

    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")  # first: the next statement may wait for a lock
    _wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # FULL, not WAL's usual NORMAL: a claim must survive a power cut as well as a killed
    # process, or the rows it sent could be pending again after a reboot and go out twice
    # (rule 1). It costs one WAL fsync per commit, a fraction of a millisecond per batch.
    cursor.execute("PRAGMA synchronous=FULL")
    # SQLite's own page cache, per connection (2 MB by default). A send touches a few pages per
    # batch, in id order, and the operating system caches the file as well: 512 KiB measured
    # no slower for claims, settles or freezing a million-row audience, and keeps a sending
    # process within its memory budget.
    cursor.execute("PRAGMA cache_size=-512")
    cursor.close()


class WriterTurn:
    """Writers of one SQLite file take turns here before they ask SQLite for its write lock.

    SQLite has one writer at a time, and a connection that finds the file locked sleeps
    (1, 2, 5, 10 ms and more) before it tries again, however soon the lock is free: with
    several sender processes (``delivery.processes``) every such meeting left the cores
    idle for milliseconds. Here a thread waits on an in-process lock, then on an exclusive
    ``flock`` of a side file (``<database>-turn``) shared by every process of the database,
    and wakes as soon as the holder is done. It only orders writers that come through here:
    SQLite's own lock still decides, so a writer that does not take its turn (another
    program) is as safe as before, and without the side file (a folder digest cannot write
    to) the processes wait the way SQLite makes them.
    """

    def __init__(self, path: str | None) -> None:
        self._threads = threading.Lock()
        self._path = path
        self._fd: int | None = None
        self._pid = 0  # the process that opened _fd (a forked child opens its own)
        self._held = False

    def _file(self) -> int | None:
        if self._path is None:
            return None
        if self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._path = self._fd = None
        return self._fd

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._held = True
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._held:
                self._held = False
                assert self._fd is not None
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


def writer_turn(engine: Engine) -> WriterTurn | None:
    """The :class:`WriterTurn` of a SQLite file (an in-memory database gets the in-process
    lock only); ``None`` for a server database, whose writers do not take turns."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    path = None if not database or database == ":memory:" or database.startswith("file:") else database
    return WriterTurn(str(Path(path).expanduser()) + "-turn" if path else None)


def _alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def head_revision(engine: Engine) -> str:
    """The newest migration this version of digest knows (read from the migration scripts)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for a database digest never touched."""
    with engine.connect() as conn:
        return _version(conn)


def _version(conn: Connection) -> str | None:
    if "alembic_version" not in inspect(conn).get_table_names():
        return None
    value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(value) if value is not None else None


def upgrade(engine: Engine, revision: str = "head", *, new: bool = False) -> tuple[str | None, str]:
    """Migrate to ``revision``; returns (before, after). ``new``: the caller found no schema
    version, and wants the schema created; checked again under the lock (another process may
    have created it meanwhile, which is fine; tables without a version are not)."""
    from alembic import command
    from alembic.util import CommandError

    try:
        before = current_revision(engine)
    except SQLAlchemyError as exc:
        raise open_error(engine, exc) from exc
    _refuse_newer(before)
    cfg = _alembic_config(engine)
    try:
        with engine.begin() as conn:
            _migration_lock(conn)
            if new and _version(conn) is None and "essays" in inspect(conn).get_table_names():
                raise StoreError("the database has digest tables but no schema version",
                                 hint="point database.url at a digest database")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)  # reads the revision again, under the lock
        after = current_revision(engine) or ""
    except (SQLAlchemyError, CommandError) as exc:  # CommandError: a revision no script names
        raise StoreError(f"migration failed: {_first_line(exc)}") from exc
    return before, after


def _refuse_newer(current: str | None) -> None:
    """A database a newer digest migrated: this one cannot use it, and no migration of its
    own goes back (revisions are numbered in order, so a higher one is newer)."""
    if current is not None and current.isdigit() and int(current) > int(HEAD):
        raise StoreError(f"the database was written by a newer digest (schema {current}; this digest "
                         f"knows up to {HEAD}): upgrade digest")


def _migration_lock(conn: Connection) -> None:
    """One migration at a time, in one transaction: two commands started together on a new
    database (`digest serve` and a cron job, two hosts) would otherwise both create the
    tables, and one fail on "already exists".

    SQLite: the write lock from the start (BEGIN IMMEDIATE; the other waits out its busy
    timeout), which also makes the migration one transaction: the driver does not begin one
    before DDL on its own, so a migration that failed halfway left what it had done.
    PostgreSQL: a transaction-scoped advisory lock (its DDL is transactional already).
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('digest: migrations'))")


def ensure_schema(engine: Engine) -> None:
    """Create a fresh database; refuse to run on an outdated one."""
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise open_error(engine, exc) from exc
    if current is None:
        upgrade(engine, new=True)
        return
    _refuse_newer(current)
    head = HEAD
    if current != head:
        raise StoreError(f"the database schema is at {current}, this digest needs {head}",
                         hint="run `digest db upgrade`")
