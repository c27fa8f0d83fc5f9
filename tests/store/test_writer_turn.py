"""SQLite's writers take turns (db.WriterTurn): threads through a lock, processes through an
flock of ``<database>-turn``; SQLite's own lock still decides."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from digest.store import db
from digest.store.store import open_store


def _hold_turn(path: str, held: object, release: object) -> None:
    turn = db.WriterTurn(path)
    with turn:
        held.set()  # type: ignore[attr-defined]
        release.wait(10)  # type: ignore[attr-defined]


def test_a_process_waits_for_the_turn_another_holds_and_takes_it_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "digest.db-turn")
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_turn, args=(path, held, release))
    other.start()
    try:
        assert held.wait(30)
        turn = db.WriterTurn(path)
        got = threading.Event()

        def take() -> None:
            with turn:
                got.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not got.wait(0.3)  # the other process holds the turn
        released = time.monotonic()
        release.set()
        assert got.wait(10)
        # Woken when the holder lets go (or dies), not after a sleep of its own.
        assert time.monotonic() - released < 2
        taker.join()
    finally:
        release.set()
        other.join(10)


def test_threads_take_turns_and_an_error_inside_gives_the_turn_back(tmp_path: Path) -> None:
    turn = db.WriterTurn(str(tmp_path / "x-turn"))
    inside = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(200):
            with turn:
                with lock:
                    inside += 1
                    most = max(most, inside)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    with pytest.raises(RuntimeError), turn:
        raise RuntimeError("boom")
    with turn:  # not left held
        pass


def test_without_the_side_file_writers_still_take_turns_in_process(tmp_path: Path) -> None:
    # A side file that cannot be made (here: its folder is gone; also a read-only folder).
    turn = db.WriterTurn(str(tmp_path / "gone" / "digest.db-turn"))
    with turn:
        assert turn._threads.locked()
    assert not turn._threads.locked()
    assert turn._fd is None and not (tmp_path / "gone").exists()


def test_a_forked_child_opens_its_own_side_file(tmp_path: Path) -> None:
    path = str(tmp_path / "f-turn")
    turn = db.WriterTurn(path)
    with turn:
        pass
    parent_fd = turn._fd
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's description would be the parent's lock too
        try:
            with turn:
                os.write(write, b"1" if turn._fd != parent_fd else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_a_sqlite_store_makes_the_side_file_and_a_server_database_takes_no_turn(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'digest.db'}")
    try:
        store.record_run("collect", datetime(2026, 1, 1))
        assert (tmp_path / "digest.db-turn").exists()
    finally:
        store.close()
    assert db.writer_turn(db.make_engine("postgresql+psycopg://u@127.0.0.1:1/x")) is None
    in_memory = db.writer_turn(db.make_engine("sqlite://"))
    assert in_memory is not None and in_memory._path is None
