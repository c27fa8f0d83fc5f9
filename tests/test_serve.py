"""`digest serve` as a process: the web app with the jobs, or alone (``--web-only``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(tmp_path: Path, schedules: str, *args: str) -> tuple[str, Path]:
    """An approved, due draft and one subscriber; `digest serve ARGS` until it answers, then
    SIGTERM. Returns its log and the outbox folder."""
    from digest.sources.folder import SAMPLE_DIR

    port = _free_port()
    (tmp_path / "config.yaml").write_text(f"""
newsletter: {{public_url: "http://127.0.0.1:{port}"}}
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
delivery: {{provider: outbox, outbox_dir: "{tmp_path / 'out'}"}}
digest: {{approval: {{required: false}}, {schedules}}}
web: {{listen: "127.0.0.1:{port}"}}
""")
    env = {**os.environ, "DIGEST_CONFIG": str(tmp_path / "config.yaml")}
    run = [sys.executable, "-m", "digest"]
    for step in (["subscribers", "add", "ann@example.com"], ["collect"], ["draft"]):
        subprocess.run([*run, *step], env=env, check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([*run, "serve", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        time.sleep(1.0)  # time for a job started at once to send
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, log = proc.communicate(timeout=60)
    assert proc.returncode == 0, log
    return log, tmp_path / "out"


def test_web_only_serves_the_links_and_runs_no_job(tmp_path: Path) -> None:
    log, outbox = _serve(tmp_path, 'send_schedule: "*/5 * * * *"', "--web-only")
    assert "jobs: none (--web-only)" in log
    assert not outbox.exists() or not list(outbox.iterdir())  # the due draft was not sent


@pytest.mark.parametrize("never", ["0 0 31 2 *"])
def test_schedules_that_never_fire_start_without_a_traceback(tmp_path: Path, never: str) -> None:
    log, _outbox = _serve(tmp_path, f'schedule: "{never}", collect_schedule: "{never}", send_schedule: "{never}"')
    assert "Traceback" not in log
    assert "draft next at never" in log


def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "config.yaml").write_text(f"""
newsletter: {{public_url: "http://127.0.0.1:{port}"}}
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
sources: []
web: {{listen: "127.0.0.1:{port}"}}
""")
        env = {**os.environ, "DIGEST_CONFIG": str(tmp_path / "config.yaml")}
        out = subprocess.run([sys.executable, "-m", "digest", "serve", "--web-only"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"web.listen: cannot listen on 127.0.0.1:{port}" in out.stderr


def test_stopping_while_the_web_thread_polls_raises_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop arrives while the web thread is between listing its sockets and select():
    the sockets must not be closed under it (it failed with EBADF and a traceback in the log)."""
    import select
    import threading

    from digest import scheduler
    from digest.pipeline import App
    from tests.conftest import make_settings

    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    polling = threading.Event()
    real_select = select.select

    def held_select(r: list[object], w: list[object], e: list[object], timeout: float | None = None) -> object:
        if threading.current_thread().name == "web" and not polling.is_set():
            polling.set()
            time.sleep(0.3)  # the stop arrives now, with these sockets already listed
        return real_select(r, w, e, timeout)

    monkeypatch.setattr(select, "select", held_select)

    def stop_when_polling(_port: int) -> None:
        def stop() -> None:
            assert polling.wait(10)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=stop, daemon=True).start()

    app = App.open(make_settings(tmp_path))
    scheduler.serve(app, host="127.0.0.1", port=0, ready=stop_when_polling, web_only=True)
    assert polling.is_set()
    for thread in threading.enumerate():
        if thread.name == "web":
            thread.join(5)  # what it did after the stop
    assert failures == []


@pytest.mark.parametrize("down_on_monday", [True, False])
def test_a_draft_run_missed_while_the_service_was_down_is_caught_up_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        down_on_monday: bool) -> None:
    """The draft is scheduled for Mondays 07:00; the service starts on Monday at 09:00. If it
    last drafted a week ago, it drafts at start, after the start-up collect (so the draft has
    what it found) and before the start-up send; if it drafted at 07:00, it waits for the next
    Monday."""
    import logging
    import threading
    from datetime import UTC, datetime, timedelta

    from digest import jobs, scheduler
    from digest.pipeline import App
    from tests.conftest import FrozenClock, make_settings

    clock = FrozenClock(datetime(2026, 11, 30, 9, 0, tzinfo=UTC))
    app = App.open(make_settings(tmp_path), clock)
    app.store.record_run("draft", clock.value - (timedelta(days=7) if down_on_monday else timedelta(hours=2)))
    ran: list[str] = []
    sent = threading.Event()
    for name in ("collect", "draft", "send"):
        def job(*args: object, _name: str = name, _real: object = getattr(jobs, f"{name}_job")) -> None:
            ran.append(_name)
            _real(*args)  # type: ignore[operator]
            if _name == "send":
                sent.set()
        monkeypatch.setattr(jobs, f"{name}_job", job)

    def stop_after_the_first_send(_port: int) -> None:
        def stop() -> None:
            sent.wait(30)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=stop, daemon=True).start()

    caplog.set_level(logging.INFO, logger="digest")
    try:
        scheduler.serve(app, host="127.0.0.1", port=0, ready=stop_after_the_first_send)
        drafts = app.store.list_drafts()
    finally:
        app.close()
    assert sent.is_set()
    if down_on_monday:
        assert ran == ["collect", "draft", "send"]
        assert "the draft run due at 2026-11-30 07:00 UTC was missed: catching it up now" in caplog.text
        (draft,) = drafts
        assert draft.period_key == "2026-11-30T07:00" and draft.essays == 4  # what the collect found
    else:
        assert ran == ["collect", "send"] and drafts == []
        assert "catching it up" not in caplog.text


def test_a_tick_a_long_run_spans_is_one_info_line_not_apschedulers_chatter(caplog: pytest.LogCaptureFixture) -> None:
    """A send that outlasts its tick is how a large list goes: the service says so once, at
    INFO, and APScheduler's warning and its two lines per run stay out of the log."""
    import logging
    import threading

    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    from digest import scheduler

    caplog.set_level(logging.INFO)
    sched = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)},
                                job_defaults={"coalesce": True, "max_instances": 1})
    scheduler._quiet(sched, logging.getLogger("digest.serve"))
    released = threading.Event()
    sched.add_job(released.wait, "interval", seconds=0.2, args=[5], id="send")
    sched.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "skipped" not in caplog.text:
            time.sleep(0.05)
    finally:
        released.set()
        sched.shutdown(wait=True)
    from_apscheduler = [r for r in caplog.records if r.name.startswith("apscheduler")]
    assert from_apscheduler == []
    skipped = [r for r in caplog.records if r.name == "digest.serve" and "skipped" in r.getMessage()]
    assert skipped and skipped[0].levelno == logging.INFO
    assert skipped[0].getMessage().startswith("send: the run due at ")
