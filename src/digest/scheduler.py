"""The scheduled service: APScheduler 3.11 jobs for collect, draft and send.

This is the only module that imports APScheduler. Jobs are thin calls into ``digest.jobs``;
they only trigger idempotent use cases, so a late or repeated run is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from digest.pipeline import App


def parse_cron(expr: str, timezone: str) -> CronTrigger:
    """A five-field crontab expression in ``timezone``; ``ValueError`` if it is malformed.

    Weekday numbers are cron's (0 and 7 Sunday, 1 Monday), which APScheduler counts from
    Monday: they are given to it as names, so `0 7 * * 1` fires on Mondays, as in crontab.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
    fields[4] = _cron_weekdays(fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone=ZoneInfo(timezone))


_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """cron's weekday field with its numbers (``1-5``, ``0,6``, ``*/2``, ``7``) as day names."""
    out = []
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        if not any(c.isdigit() for c in span) and not step_text:
            out.append(part)  # names, or "*": the same for both
            continue
        if not span.replace("-", "").isdigit() and span != "*":
            out.append(part)  # names with a step ("mon-fri/2"): APScheduler reads them right
            continue
        if not step_text.isdigit() and step_text:
            raise ValueError(f"weekday step {step_text!r} is not a number")
        step = int(step_text or 1)
        if span == "*":
            first, last = 0, 6
        else:
            low, _, high = span.partition("-")
            first = int(low)
            # "5/2" is 5 to the end of the week in steps of 2; "5" alone is 5.
            last = int(high) if high else (7 if step_text else first)
        if not (0 <= first <= 7 and 0 <= last <= 7) or first > last or step < 1:
            raise ValueError(f"weekday {part!r}: cron counts 0-7 (0 and 7 are Sunday)")
        out.append(",".join(dict.fromkeys(_DAYS[d % 7] for d in range(first, last + 1, step))))
    return ",".join(out)


def next_run(expr: str, timezone: str, now: datetime) -> datetime | None:
    """The next time ``expr`` fires after ``now``."""
    trigger = parse_cron(expr, timezone)
    result: datetime | None = trigger.get_next_fire_time(None, now)
    return result


def previous_run(expr: str, timezone: str, now: datetime) -> datetime | None:
    """The latest time ``expr`` fired at or before ``now`` (within a year), else ``None``.

    Searches growing windows so that an hourly schedule costs a few steps, not thousands.
    """
    trigger = parse_cron(expr, timezone)
    for window in (timedelta(hours=2), timedelta(days=2), timedelta(days=9), timedelta(days=33),
                   timedelta(days=367)):
        start = now - window
        last: datetime | None = None
        fire: datetime | None = trigger.get_next_fire_time(None, start)
        steps = 0
        while fire is not None and fire <= now and steps < 10000:
            last = fire
            fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
            steps += 1
        if last is not None:
            return last
    return None


def _when(moment: datetime | None) -> str:
    """A job's next run for the log; a schedule that never fires (31 February) has none."""
    return f"{moment:%Y-%m-%d %H:%M %Z}" if moment is not None else "never"


class _NoSkipWarning:
    """Drops APScheduler's warning for a run skipped because the job's last run still goes:
    the service logs that as information of its own (see :func:`_quiet`)."""

    @staticmethod
    def filter(record: object) -> bool:
        return "maximum number of running instances" not in str(getattr(record, "msg", ""))


def _quiet(scheduler: BaseScheduler, log: logging.Logger) -> None:
    """The service's log without APScheduler's chatter: its two lines for every run of every
    job (a send tick every few minutes) and a warning for each tick a long send spans, which is
    how a send of a large list is meant to go. The jobs log what they did; a skipped tick is
    one line at INFO. APScheduler's other warnings (a run missed by more than the grace time,
    a failed job store) stay."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent

    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").addFilter(_NoSkipWarning)

    def skipped(event: JobSubmissionEvent) -> None:
        log.info("%s: the run due at %s is skipped: its last run has not finished (jobs run one at a time, "
                 "so it may be waiting for another job)", event.job_id, _when(event.scheduled_run_times[-1]))

    scheduler.add_listener(skipped, EVENT_JOB_MAX_INSTANCES)


def serve(app: App, *, host: str | None = None, port: int | None = None,
          ready: Callable[[int], None] | None = None, web_only: bool = False) -> None:
    """Run the jobs on their schedules and the web app until SIGTERM or SIGINT; with
    ``web_only``, the web app alone (the jobs run from cron, say).

    On a signal: no new job starts, a send in progress finishes its current batch and stops
    (the rest resumes at the next start), then the process exits.
    """
    import signal
    import threading

    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from waitress import create_server

    from digest import jobs, pipeline
    from digest.errors import ConfigError, DigestError
    from digest.web.app import create_app

    log = logging.getLogger("digest.serve")
    settings = app.settings
    tz = settings.newsletter.timezone
    stop = threading.Event()

    # One worker: jobs never overlap, so a collect never races a draft over the same rows.
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        timezone=ZoneInfo(tz),
    )
    _quiet(scheduler, log)
    d = settings.digest
    if not web_only:
        # Collect and send once at start (catching up), then on their schedules; the draft
        # too if its scheduled run was missed while the service was not running. Jobs due
        # together run one at a time in the order of their times: the collect first, so that
        # a draft drafts what it found, then the draft, then the send, which may send it.
        start = datetime.now(ZoneInfo(tz))
        scheduler.add_job(jobs.collect_job, parse_cron(d.collect_schedule, tz), args=[app], id="collect",
                          next_run_time=start)
        try:
            missed = pipeline.missed_draft_run(app)
        except DigestError as exc:  # the database is down: the jobs will say so as they run
            log.warning("cannot tell whether a draft run was missed: %s", exc)
            missed = None
        catch_up: dict[str, datetime] = {}
        if missed is not None:
            log.info("the draft run due at %s was missed: catching it up now", _when(missed))
            catch_up["next_run_time"] = start + timedelta(microseconds=1)
        scheduler.add_job(jobs.draft_job, parse_cron(d.schedule, tz), args=[app], id="draft", **catch_up)
        scheduler.add_job(jobs.send_job, parse_cron(d.send_schedule, tz), args=[app, stop.is_set], id="send",
                          next_run_time=start + timedelta(microseconds=2))

    listen_host, _, listen_port = settings.web.listen.rpartition(":")
    try:
        server = create_server(create_app(app), host=host or listen_host,
                               port=port if port is not None else int(listen_port), threads=4)
    except OSError as exc:  # the port is taken, the address is not this machine's
        raise ConfigError(f"web.listen: cannot listen on {host or listen_host}:"
                          f"{port if port is not None else listen_port}: {exc.strerror or exc}",
                          hint="stop what uses the port, or set web.listen (or --port)") from exc
    except ValueError as exc:  # waitress: the host is no address, and no name that resolves
        setting = "--host" if host else "web.listen"
        raise ConfigError(f"{setting}: cannot listen on {host or listen_host}: not an IP address or a host "
                          "name that resolves", hint="use an address of this machine, e.g. 127.0.0.1") from exc
    bound_port = int(server.effective_port)
    web_stop = threading.Event()

    def run_web() -> None:
        # waitress's own run() loops until its sockets are closed; closing them from this
        # thread while that loop waits in select() fails the loop with EBADF. So the loop
        # checks a flag between polls, and the sockets close only after it has ended.
        while not web_stop.is_set():
            server.asyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=server._map,
                                 use_poll=server.adj.asyncore_use_poll, count=1)

    web_thread = threading.Thread(target=run_web, name="web", daemon=True)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d: finishing the work in flight, then stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.start()
        web_thread.start()
        log.info("serving on http://%s:%d; jobs: %s", host or listen_host, bound_port,
                 ", ".join(f"{j.id} next at {_when(j.next_run_time)}" for j in scheduler.get_jobs())
                 or "none (--web-only)")
        if ready is not None:
            ready(bound_port)
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)  # waits for the running job, which stops after its batch
        web_stop.set()
        if web_thread.is_alive():
            server.pull_trigger()  # wakes the poll at once
            web_thread.join(timeout=10)
        server.task_dispatcher.shutdown()  # lets a request being answered finish
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("stopped")
