"""The ``digest`` command: a thin click shell over ``digest.pipeline``.

A user's mistake (bad config, unknown draft, invalid address ...) prints one line starting
with ``error:`` and exits 1; a bug still shows its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import click

from digest import __version__, clock, pipeline, resources
from digest.config import Settings, load
from digest.delivery.sender import MAY_ARRIVE_TWICE, NEXT_SEND, SendSummary, held_message
from digest.errors import DigestError, DraftBusyError, DraftError
from digest.store import db
from digest.store.store import ReasonCount, UncertainMessage


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DigestError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


class _Context:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._app: pipeline.App | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load(self.config_path)
        return self._settings

    @property
    def app(self) -> pipeline.App:
        if self._app is None:
            self._app = pipeline.App.open(self.settings)
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


pass_ctx = click.make_pass_decorator(_Context)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DIGEST_CONFIG",
              help="Config file. Default: ./config.yaml, else the embedded defaults.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
@click.version_option(__version__, prog_name="digest")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Turn an author's new essays and the best reader comments into an approved email digest."""
    # Without -v only errors are logged: each command prints its own outcome, and warnings
    # (a failing source) would repeat it.
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    obj = _Context(config_path)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


def _when(value: datetime | None, tz: Any = None) -> str:
    if value is None:
        return "-"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z") if tz else value.strftime("%Y-%m-%d %H:%M")


# -- demo and setup ----------------------------------------------------------------------------


@cli.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the database, preview and .eml files (default: a new temporary folder).")
def demo(workdir: str | None) -> None:
    """Run collect → draft → approve → send once on the bundled sample."""
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="digest-demo-"))
    result = pipeline.demo(folder.resolve())
    collected = sum(o.stats.new_essays for o in result.collected)
    comments = sum(len(i.comments) for i in result.draft.items)
    click.echo(f"Collected {collected} essays from the bundled sample.")
    click.echo(f"Drafted #{result.draft.id}: {result.draft.subject!r} "
               f"({len(result.draft.items)} essays, {comments} reader comments), approved.")
    click.echo(f"Sent to {result.summary.sent} demo subscribers through the outbox provider.")
    click.echo("")
    click.echo(f"  HTML preview:  {result.preview_html}")
    click.echo(f"  Text preview:  {result.preview_text}")
    click.echo(f"  Sent emails:   {result.eml_files[0].parent if result.eml_files else '-'}/ "
               f"({len(result.eml_files)} .eml files)")
    click.echo("")
    click.echo("Open the HTML preview in a browser, or an .eml file in your mail program.")


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.argument("path", default="config.yaml", type=click.Path(dir_okay=False))
def init(path: str, force: bool) -> None:
    """Write a starter config.yaml (every key, commented)."""
    target = Path(path)
    if target.exists() and not force:
        raise DigestError(f"{target} already exists", hint="use --force to overwrite it")
    try:
        target.write_text(resources.read_text("config.example.yaml"), encoding="utf-8")
    except OSError as exc:  # no such folder, a read-only one, a full disk
        raise DigestError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    click.echo(f"Wrote {target}. Edit it, then run `digest check`.")


@cli.command()
@pass_ctx
def check(obj: _Context) -> None:
    """Validate the config and reach each source and the provider (sends nothing).

    A provider that answers it is rate limited or failing (429, 5xx) is asked again, up to
    three calls in all, waiting a few seconds at most between them.
    """
    settings = obj.settings
    click.echo(f"config: ok ({settings.path or 'embedded defaults'})")
    failed = False
    for what, ok, detail in pipeline.check(obj.app):
        click.echo(f"{what}: {'ok' if ok else 'FAILED'} ({detail})")
        failed |= not ok
    if failed:
        sys.exit(1)


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@pass_ctx
def db_upgrade(obj: _Context) -> None:
    """Create or migrate the database to this version's schema."""
    engine = db.make_engine(obj.settings.database.url)
    try:
        before, after = db.upgrade(engine)
    finally:
        engine.dispose()
    click.echo(f"database at {after}" + (f" (was {before})" if before != after else " (already current)"))


# -- the flow ----------------------------------------------------------------------------------


@cli.command()
@pass_ctx
def collect(obj: _Context) -> None:
    """Fetch new essays and comments from every source."""
    failed = 0
    for o in pipeline.collect(obj.app):
        if o.error:
            failed += 1
            click.echo(f"{o.source}: FAILED: {o.error}")
        elif o.not_modified:
            click.echo(f"{o.source}: not modified")
            continue
        else:
            s = o.stats
            click.echo(f"{o.source}: {s.new_essays} new essays, {s.updated_essays} updated; "
                       f"{s.new_comments} new comments, {s.updated_comments} updated, {s.deleted_comments} gone")
        for warning in o.warnings:
            click.echo(f"{o.source}: warning: {warning}")
    if failed:
        sys.exit(1)


@cli.command()
@pass_ctx
def draft(obj: _Context) -> None:
    """Compose the next draft and ask the approvers to review it."""
    outcome = pipeline.make_draft(obj.app)
    click.echo(outcome.message)
    if outcome.draft is not None and outcome.created:
        d = outcome.draft
        click.echo(f"  subject: {d.subject}")
        for item in d.items:
            click.echo(f"  - {item.essay.title} ({len(item.comments)} comments)")
        if outcome.notified:
            click.echo(f"  asked {', '.join(outcome.notified)} to review it")
        if outcome.notify_error:
            click.echo(f"  warning: {outcome.notify_error}")
        if d.status == "pending_review":
            click.echo(f"  preview: digest preview {d.id}   approve: digest approve {d.id}")


@cli.command()
@pass_ctx
def drafts(obj: _Context) -> None:
    """List drafts and their state."""
    rows = obj.app.store.list_drafts()
    if not rows:
        click.echo("no drafts yet: run `digest collect` then `digest draft`")
        return
    tz = obj.settings.newsletter.tz
    for d in rows:
        # An approved draft with a time (`digest approve --at`) waits for the first send from then on.
        when = f"  sends from {_when(d.send_at, tz)}" if d.status == "approved" and d.send_at else ""
        click.echo(f"#{d.id:<4} {d.status:<15} {d.period_key}  {d.essays} essays, {d.comments} comments  "
                   f"{d.subject}{when}" + (f"  [{d.note}]" if d.note else ""))


@cli.command()
@click.argument("draft_id", type=int)
@click.option("--out", type=click.Path(file_okay=False), default="preview", show_default=True,
              help="Folder to write draft-ID.html and draft-ID.txt into.")
@pass_ctx
def preview(obj: _Context, draft_id: int, out: str) -> None:
    """Write the rendered HTML and text of a draft."""
    html_path, text_path = pipeline.preview(obj.app, draft_id, Path(out))
    click.echo(f"{html_path}\n{text_path}")


def _parse_at(value: str | None, settings: Settings) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise DigestError(f"--at {value!r} is not a time", hint="use e.g. 2026-12-01T07:00") from None
    return at if at.tzinfo else at.replace(tzinfo=settings.newsletter.tz)


@cli.command()
@click.argument("draft_id", type=int)
@click.option("--at", "at", default=None, help="Send at this time (ISO 8601; newsletter timezone if none given).")
@pass_ctx
def approve(obj: _Context, draft_id: int, at: str | None) -> None:
    """Approve a draft (optionally for a later time)."""
    when = _parse_at(at, obj.settings)
    d = pipeline.approve(obj.app, draft_id, at=when)
    click.echo(f"draft {d.id} approved; " + (f"the first `digest send` from {_when(when, obj.settings.newsletter.tz)} "
                                             "on sends it (digest.send_schedule, under `digest serve`)"
                                             if when else f"{NEXT_SEND} sends it"))


@cli.command()
@click.argument("draft_id", type=int)
@click.option("--reason", default="", help="Why (kept with the draft).")
@pass_ctx
def reject(obj: _Context, draft_id: int, reason: str) -> None:
    """Reject a draft; its essays return for the next one."""
    d = pipeline.reject(obj.app, draft_id, reason=reason)
    click.echo(f"draft {d.id} rejected")


class SendProgress:
    """``digest send``'s progress: a bar redrawn in place on a terminal (at most ten times a
    second), otherwise one log line per batch."""

    WIDTH = 24

    def __init__(self, interactive: bool, timer: Callable[[], float] = time.monotonic) -> None:
        self.interactive = interactive
        self.clock = timer
        self.draft_id: int | None = None
        # The rate counts from the start of the send (made just before it), and for each
        # further draft from the previous draft's last batch.
        self.started = self.last = timer()
        self.drawn = 0.0
        self.pending_newline = False

    def __call__(self, summary: SendSummary, size: int) -> None:
        now = self.clock()
        if summary.draft_id != self.draft_id:
            self.close()
            if self.draft_id is not None:
                self.started = self.last
            self.draft_id, self.drawn = summary.draft_id, 0.0
        self.last = now
        done, total = summary.done, summary.total
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        failed = sum(summary.failed.values())
        counts = f"{summary.sent:,} sent, {failed:,} failed, {summary.uncertain:,} uncertain"
        if not self.interactive:
            of = f"/{total:,}" if total else ""
            click.echo(f"draft {summary.draft_id}: batch {summary.batches} ({size}): {done:,}{of} done — "
                       f"{counts}, {_rate(rate)}/s", err=True)
            return
        if now - self.drawn < 0.1 and done < total:
            return
        self.drawn = now
        click.echo(f"\r\x1b[2K{self._fit(summary, rate)}", err=True, nl=False)
        self.pending_newline = True

    def _fit(self, summary: SendSummary, rate: float) -> str:
        """The bar's line, shortened to fit one row of the terminal: a line that wraps is not
        redrawn in place (``\\x1b[2K`` clears the last row only), and every redraw left a
        row behind. The least useful parts go first: the bar's width, the bar, the count
        sent, the count done, the rate, the time left; what failed and the share done stay."""
        width = max(8, shutil.get_terminal_size().columns - 1)
        done, total = summary.done, summary.total
        draft = f"draft {summary.draft_id}"
        trouble = f"{sum(summary.failed.values()):,} failed, {summary.uncertain:,} uncertain"
        counts = f"{summary.sent:,} sent, {trouble}"
        at = f"at {_rate(rate)}/s"
        if not total:
            candidates = [f"{draft} {done:,} {at} — {counts}", f"{draft} {done:,} {at} — {trouble}",
                          f"{draft} {done:,} — {trouble}", f"{draft} {done:,}", f"{done:,}"]
        else:
            share = min(1.0, done / total)
            pct = f"{share:4.0%}"
            left = f", {(total - done) / rate:,.0f}s left" if rate and done < total else ""

            def bar(cells: int) -> str:
                filled = round(share * cells)
                return f"[{'#' * filled}{'-' * (cells - filled)}] "

            candidates = [
                f"{draft} {bar(self.WIDTH)}{pct} {done:,}/{total:,} {at}{left} — {counts}",
                f"{draft} {bar(10)}{pct} {done:,}/{total:,} {at}{left} — {counts}",
                f"{draft} {pct} {done:,}/{total:,} {at}{left} — {counts}",
                f"{draft} {pct} {done:,}/{total:,} {at}{left} — {trouble}",
                f"{draft} {pct} {at}{left} — {trouble}",
                f"{draft} {pct}{left} — {trouble}",
                f"{draft} {pct} — {trouble}",
                f"{draft} {share:.0%}",
                f"{share:.0%}",
            ]
        return next((line for line in candidates if len(line) <= width), candidates[-1][:width])

    def close(self) -> None:
        """End the bar's line (before other output, or the next draft's bar)."""
        if self.pending_newline:
            click.echo("", err=True)
            self.pending_newline = False


@contextlib.contextmanager
def _stop_on_signals(progress: SendProgress) -> Iterator[Callable[[], bool]]:
    """While sending: the first Ctrl-C or SIGTERM asks the send to stop after the batches in
    flight (it then settles them and reports); a second quits at once, as a crash would (rule
    1: the next send marks what was in flight uncertain). Outside the main thread, nothing."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        again = requested.is_set()
        requested.set()
        # The signal may land in the middle of a write to stderr (the progress bar): a second
        # write there fails, and the request stands all the same.
        with contextlib.suppress(RuntimeError):
            progress.close()
            click.echo(f"quitting now: {NEXT_SEND} marks what was in flight uncertain" if again
                       else "stopping after the batches in flight (again to quit at once)", err=True)
        if again:
            os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_T = TypeVar("_T")


def _each_draft(named: int | None, call: Callable[[], _T]) -> _T | None:
    """``call()`` for one draft of an operator's command. With no draft named, the command goes
    over every draft: one another process is sending now is passed over (None: the caller says
    what is left undone in it, see :func:`_echo_passed_over`), and the rest go on. A draft
    named by the operator fails the command instead."""
    if named is not None:
        return call()
    try:
        return call()
    except DraftBusyError:
        return None


def _echo_passed_over(undone: str) -> None:
    """What a draft passed over by :func:`_each_draft` still has (the command then exits
    EXIT_PAUSED: its work is not done, and a later run does it)."""
    click.echo(f"{undone}: another process is sending it; run again once it has finished")


def _failed_count(app: pipeline.App, draft_id: int, matching: str | None) -> int:
    """How many of a draft's messages ``--retry-failed`` (``--reason matching``) puts back."""
    if matching is None:
        return app.store.ledger_counts(draft_id).get("failed", 0)
    return sum(r.count for r in app.store.reasons(draft_id, ("failed",)) if matching.lower() in r.error.lower())


@cli.command()
@click.option("--dry-run", is_flag=True, help="Render and batch everything, send nothing.")
@click.option("--resolve-uncertain", type=click.Choice(["resend", "mark-sent"]), default=None,
              help="Settle messages whose fate is unknown: resend puts them back in the queue and "
                   "sends; mark-sent records them as sent and sends nothing.")
@click.option("--retry-failed", is_flag=True,
              help="Put the messages that failed (refused by the provider, not a verdict on the reader) "
                   "back in the queue, then send: once the cause is fixed.")
@click.option("--reason", "matching", default=None, metavar="TEXT",
              help="With --retry-failed: only the failed messages whose error contains TEXT.")
@click.option("--draft", "draft_id", type=int, default=None,
              help="This draft only, resumed if its send waits for the operator; with --resolve-uncertain "
                   "or --retry-failed, which draft.")
@pass_ctx
def send(obj: _Context, dry_run: bool, resolve_uncertain: str | None, retry_failed: bool, matching: str | None,
         draft_id: int | None) -> None:
    """Send approved, due drafts; resume unfinished sends.

    A send paused after failed batches in a row waits for the operator: `--draft N` resumes
    it, `--retry-failed` (with `--draft N` or for every draft) also puts its failed messages
    back in the queue. Ctrl-C (or SIGTERM) stops after the batches in flight, with a summary;
    a second one quits at once (the next `digest send` marks what was in flight uncertain).
    Exit codes: 0 done, 1 stopped by a refusal to fix (credentials, account, From, or a send
    paused for the operator), 3 uncertain messages wait for --resolve-uncertain, 75 paused or
    interrupted (the next `digest send` resumes; a dry run interrupted too), or a draft passed
    over by --resolve-uncertain or --retry-failed because another process sends it (run again
    once it has finished).
    """
    app = obj.app
    if matching is not None and not retry_failed:
        raise click.UsageError("--reason goes with --retry-failed")
    if retry_failed and resolve_uncertain:
        raise click.UsageError("use --retry-failed and --resolve-uncertain one at a time")
    passed_over = False  # a draft left as it was: another process is sending it
    if retry_failed:
        targets = [draft_id] if draft_id is not None else app.store.drafts_with_ledger()
        retried = 0
        for target in targets:
            if dry_run:  # what it would put back; nothing is written
                app.store.get_draft(target)
                n = _failed_count(app, target, matching)
            else:
                retried_here = _each_draft(draft_id, partial(pipeline.retry_failed, app, target, matching))
                if retried_here is None:
                    _echo_passed_over(f"{_failed_count(app, target, matching)} failed messages in draft {target} "
                                      "not retried")
                    passed_over = True
                    continue
                n = retried_here
            retried += n
            if n:
                click.echo(f"draft {target}: {n} failed messages back in the queue"
                           + (" (dry run: left as they are)" if dry_run else ""))
        if not retried and not passed_over:
            click.echo("no failed messages to retry" + (f" in draft {draft_id}" if draft_id is not None else "")
                       + (f" whose error contains {matching!r}" if matching is not None else ""))
            if draft_id is not None and not dry_run:
                return  # (a draft named for nothing: not resumed either; `digest send --draft N` does that)
    resent: dict[int, int] = {}  # a dry run's: the uncertain messages the send would put back and send
    if resolve_uncertain:
        targets = [draft_id] if draft_id is not None else app.store.drafts_with_ledger()
        resolved = 0
        for target in targets:
            if dry_run:  # what it would settle; nothing is written
                app.store.get_draft(target)
                uncertain = app.store.ledger_counts(target).get("uncertain", 0)
                kept = pipeline.resendable(app, target) if uncertain and resolve_uncertain == "resend" else 0
                done = pipeline.Resolution(uncertain - kept, kept)
            else:
                resolution = _each_draft(draft_id, partial(pipeline.resolve_uncertain, app, target, resolve_uncertain))
                if resolution is None:
                    _echo_passed_over(f"{app.store.ledger_counts(target).get('uncertain', 0)} uncertain messages in "
                                      f"draft {target} not resolved")
                    passed_over = True
                    continue
                done = resolution
            n = done.total
            resolved += n
            if n and dry_run and resolve_uncertain == "resend":
                resent[target] = n
            if n:
                click.echo(f"draft {target}: {n} uncertain messages → {resolve_uncertain}"
                           + (" (dry run: left as they are)" if dry_run else ""))
                if done.kept:
                    click.echo(f"draft {target}: {done.kept} of them go out again exactly as they went, under their "
                               f"idempotency keys ({app.provider.name} delivers each once)")
                if resolve_uncertain == "resend" and done.settled:
                    # A new batch, a new key (or none): the provider cannot tell them from new mail.
                    if app.provider.idempotent:
                        click.echo(f"note: {done.settled} of them cannot keep their idempotency keys (their batch "
                                   "went out through another provider or account, or before digest recorded that, "
                                   "or too long ago, was tried too often, or lost a reader since): they go out again "
                                   "in new batches, and those of them that did arrive arrive twice", err=True)
                    else:
                        click.echo(f"note: {app.provider.name} has no idempotency key: those of them that did "
                                   "arrive arrive again (its activity log tells which did)", err=True)
        if not resolved and not passed_over:
            click.echo("no uncertain messages to resolve" + (f" in draft {draft_id}" if draft_id is not None else ""))
        if resolve_uncertain == "mark-sent":
            sys.exit(EXIT_PAUSED if passed_over else 0)
    def deadline_applied(deadlined: int, what: str) -> None:
        click.echo(f"draft {deadlined} was not reviewed before its approval deadline: {what} "
                   "(digest.approval.on_deadline)")

    past_due: list[int] = []  # drafts past their approval deadline, which this dry run leaves as they are
    if dry_run:  # a dry run changes nothing: it says what the send would do first
        from digest.approval import past_deadline

        what = {"approve": "approves and sends", "skip": "skips"}[app.settings.digest.approval.on_deadline]
        past_due = past_deadline(app.store, app.settings, app.now())
        for deadlined in past_due:
            click.echo(f"draft {deadlined} was not reviewed before its approval deadline: the send {what} it "
                       "(digest.approval.on_deadline; this dry run leaves it as it is)")
    if draft_id is not None:
        app.store.get_draft(draft_id)  # one that does not exist is a mistake, not "nothing to send"
    progress = SendProgress(interactive=sys.stderr.isatty())
    with _stop_on_signals(progress) as should_stop:
        # Resolving uncertain messages fixes nothing a pause for the operator waits for: only
        # `--draft N` alone (or a --retry-failed that put messages back) resumes such a send.
        summaries = pipeline.send(app, dry_run=dry_run, on_batch=progress, should_stop=should_stop,
                                  on_deadline=deadline_applied, draft_id=draft_id,
                                  resume=False if resolve_uncertain else None)
        # Stopped before any draft was started: it was not that nothing was due.
        unstarted = not summaries and should_stop() and any(
            draft_id in (None, due) for due in app.store.due_drafts(app.now()))
    progress.close()
    # A dry run does not put uncertain messages back in the queue, so its send does not see
    # them, nor a finished draft they belong to, which the real one sends again: said here.
    def echo_resent(target: int, also: str = "") -> None:
        if target in resent:
            click.echo(f"draft {target}: the send would{also} send the {resent[target]} uncertain messages again "
                       "(not built in a dry run: they stay uncertain until the real one)")

    for target in sorted(set(resent) - {s.draft_id for s in summaries}):
        echo_resent(target)
    if unstarted:  # exits as a send interrupted does
        if dry_run:
            click.echo("dry run interrupted (stopped on request) before any draft was built")
        else:
            click.echo(f"interrupted (stopped on request) before any draft was started: {NEXT_SEND} sends "
                       "what is due")
        sys.exit(EXIT_PAUSED)
    if not summaries and not resent:
        if draft_id is not None and draft_id not in past_due:  # (what the send does to that one is said)
            _nothing_to_send(app, draft_id)
        elif draft_id is None:
            click.echo("nothing to send: no approved draft is due")
        sys.exit(EXIT_PAUSED if passed_over else 0)
    for s in summaries:
        if s.stale:
            click.echo(f"draft {s.draft_id}: {s.stale} messages were in flight when a sender stopped; "
                       "marked uncertain")
        if s.stopped and not s.batches and (not s.dry_run or s.held):
            _echo_stopped(s)  # nothing went out: no counts to show
            continue
        verb = "would send" if s.dry_run else "sent"
        failed = ", ".join(f"{n} {why}" for why, n in sorted(s.failed.items())) or "0"
        batches = f"{s.batches} batch" + ("" if s.batches == 1 else "es")
        click.echo(f"draft {s.draft_id}: {verb} {s.sent} in {batches}, failed {failed}, "
                   f"uncertain {s.uncertain}" + (f", skipped {s.skipped}" if s.skipped else "")
                   + (f", {s.retries} {'retry' if s.retries == 1 else 'retries'}" if s.retries else "")
                   + (f", built in {s.seconds:.2f}s" if s.dry_run else f", {s.seconds:.2f}s ({_rate(s.rate)}/s)")
                   + (" — finished" if s.finished else ""))
        echo_resent(s.draft_id, " also")
        if s.dry_run and s.calls:
            rate = obj.settings.delivery.rate_per_second
            click.echo(f"draft {s.draft_id}: {s.calls} provider calls at most {rate:g} a second "
                       f"(delivery.rate_per_second): the send takes at least {_duration(s.calls / rate)}")
        if s.stopped:
            _echo_stopped(s)
        if s.for_operator:
            click.echo(f"draft {s.draft_id}: {s.uncertain_hint()}")
    code = _send_exit_code(summaries)
    sys.exit(EXIT_PAUSED if passed_over and not code else code)


def _nothing_to_send(app: pipeline.App, draft_id: int) -> None:
    """Why `digest send --draft N` sent nothing, by the draft's state: a draft that waits for
    review, or was rejected or skipped, is a mistake to fix (exit 1); one approved for later,
    or already sent, is not."""
    draft = app.store.get_draft(draft_id)
    if draft.status == "pending_review":
        raise DraftError(f"draft {draft_id} is pending review: approve it first (`digest approve {draft_id}`)")
    if draft.status == "rejected":
        raise DraftError(f"draft {draft_id} was rejected: it is not sent (`digest draft` makes the next one)")
    if draft.status == "skipped":
        raise DraftError(f"draft {draft_id} was skipped: nobody approved it before its approval deadline "
                         "(digest.approval.deadline); `digest draft` makes the next one")
    if draft.status == "approved" and draft.send_at is not None:
        click.echo(f"nothing to send yet: draft {draft_id} is approved for "
                   f"{_when(draft.send_at, app.settings.newsletter.tz)}; the first `digest send` from then sends it")
    elif draft.status == "sent":
        click.echo(f"nothing to send: draft {draft_id} is sent")
    else:
        click.echo(f"nothing to send: draft {draft_id} is not an approved, due draft or a send to resume")


# Exit codes of the commands that send (README "Exit codes"): 0 all done (or nothing due);
# 1 a send was stopped by a refusal only the operator can fix (or paused after batches the
# provider refused, until the operator acts); 3 messages whose fate is
# unknown wait for the operator (`digest send --resolve-uncertain`); 75 (EX_TEMPFAIL) a send
# paused or was interrupted and the next `digest send` resumes it (or a dry run was
# interrupted: its counts are partial), or --resolve-uncertain or
# --retry-failed passed over a draft another process is sending (run it again once that send
# has finished). Click uses 2 for usage errors.
EXIT_BLOCKED = 1
EXIT_UNCERTAIN = 3
EXIT_PAUSED = 75


def _echo_stopped(s: SendSummary) -> None:
    """Why a send stopped, and what waits for the next one."""
    click.echo(f"draft {s.draft_id}: {s.stopped}")
    if s.pending and not s.dry_run:
        click.echo(f"draft {s.draft_id}: {s.pending} messages wait to be sent")
    if s.in_flight and not s.dry_run:
        click.echo(f"draft {s.draft_id}: {s.in_flight} messages were in flight in a process that stopped: "
                   f"{NEXT_SEND} marks uncertain those that may have gone out, and sends the others")


def _rate(per_second: float) -> str:
    """A rate for people: one decimal below 10 a second (a slow provider's 2.4/s read as 2,
    and anything under 0.5 as 0), none above."""
    return f"{per_second:,.1f}" if 0 < per_second < 10 else f"{per_second:,.0f}"


def _duration(seconds: float) -> str:
    """``2h05m``, ``3m34s``, ``12s``: a time for people."""
    whole = max(1, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _send_exit_code(summaries: Sequence[SendSummary]) -> int:
    if any(s.stopped and (s.blocked or (s.held and not s.dry_run)) for s in summaries):
        return EXIT_BLOCKED
    if any(s.for_operator for s in summaries):
        return EXIT_UNCERTAIN
    if any((s.stopped and not s.dry_run and not s.idle) or s.interrupted for s in summaries):
        return EXIT_PAUSED
    return 0


@cli.command()
@pass_ctx
def run(obj: _Context) -> None:
    """One full cycle: collect, draft, send what is due (Ctrl-C stops as in `digest send`)."""
    with _stop_on_signals(SendProgress(interactive=False)) as should_stop:
        outcome = pipeline.run_cycle(obj.app, should_stop)
    for o in outcome.collected:
        click.echo(f"collect {o.source}: " + (f"FAILED: {o.error}" if o.error else
                                              f"{o.stats.new_essays} new essays, {o.stats.new_comments} new comments"))
    click.echo(f"draft: {outcome.draft.message}")
    for s in outcome.sends:
        click.echo(f"send draft {s.draft_id}: {s.sent} sent, {sum(s.failed.values())} failed, "
                   f"{s.uncertain} uncertain" + (f" ({s.stopped})" if s.stopped else ""))
    sys.exit(_send_exit_code(outcome.sends))


@cli.command()
@click.option("--host", default=None, help="Override web.listen's host.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Override web.listen's port (0: any free port).")
@click.option("--web-only", is_flag=True,
              help="The web app alone (links, review, webhooks), no jobs: for jobs run from cron.")
@pass_ctx
def serve(obj: _Context, host: str | None, port: int | None, web_only: bool) -> None:
    """Run the scheduled jobs and the web app until SIGTERM."""
    from digest.scheduler import serve as run_service

    logging.getLogger().setLevel(logging.INFO)

    def ready(bound: int) -> None:
        click.echo(f"digest serving on port {bound}", err=True)

    run_service(obj.app, host=host, port=port, ready=ready, web_only=web_only)


# How many distinct reasons `digest status` shows per draft and kind (uncertain, failed).
REASONS_LISTED = 5


def _echo_reasons(reasons: Sequence[ReasonCount], tz: Any, *, show_status: bool) -> None:
    """How many messages for each reason (most first), then how many more reasons."""
    for r in reasons[:REASONS_LISTED]:
        kind = f"{r.status}: " if show_status else ""
        click.echo(f"      {r.count:,} since {_when(r.at, tz)}: {kind}{r.error or 'no reason recorded'}")
    if len(reasons) > REASONS_LISTED:
        more = sum(r.count for r in reasons[REASONS_LISTED:])
        click.echo(f"      {more:,} more with {len(reasons) - REASONS_LISTED} other reasons")


def _echo_messages(total: int, listed: Sequence[UncertainMessage]) -> None:
    """The first messages of a kind, one a line, then how many more."""
    click.echo(f"      the first {len(listed)}:" if total > len(listed) else "      they are:")
    for m in listed:
        click.echo(f"        {m.email} (ledger {m.ledger_id})")
    if total > len(listed):
        click.echo(f"      ... and {total - len(listed):,} more")


def _echo_uncertain(draft_id: int, total: int, resendable: int, reasons: Sequence[ReasonCount],
                    listed: Sequence[UncertainMessage], tz: Any) -> None:
    """A draft's uncertain messages: those the next send resends under their idempotency keys
    by itself, and those that need the operator and how to settle them; how many for each
    reason (a batch that went uncertain is hundreds of messages with one), and the first of
    them."""
    resolve = (f"resolve with `digest send --resolve-uncertain resend|mark-sent --draft {draft_id}` "
               f"({MAY_ARRIVE_TWICE})")
    by_itself = f"{NEXT_SEND} resends them under their idempotency keys (the provider delivers each once)"
    if not resendable:
        click.echo(f"    {total:,} uncertain; {resolve}:")
    elif resendable >= total:
        click.echo(f"    {total:,} uncertain; {by_itself}:")
    else:
        click.echo(f"    {total:,} uncertain:")
        click.echo(f"      {resendable:,} need nothing from you: {by_itself}")
        click.echo(f"      {total - resendable:,} need you: {resolve}")
    _echo_reasons([r for r in reasons if r.status == "uncertain"], tz, show_status=False)
    _echo_messages(total, listed)


@cli.command()
@click.option("--draft", "draft_id", type=int, default=None,
              help="One draft, with its failed messages listed too.")
@pass_ctx
def status(obj: _Context, draft_id: int | None) -> None:
    """Sources, drafts, sends in progress, next runs, recent errors."""
    report = pipeline.status(obj.app, draft_id)
    tz = obj.settings.newsletter.tz
    click.echo("Sources:")
    known = {s.source: s for s in report.sources}
    for name in report.configured_sources:
        s = known.get(name)
        if s is None:
            click.echo(f"  {name}: never fetched")
            continue
        state = f"ERROR since {_when(s.last_error_at, tz)}: {s.last_error}" if s.last_error else "ok"
        click.echo(f"  {name}: last fetch {_when(s.last_fetch_at, tz)}, {s.essays} essays, "
                   f"{s.comments} comments — {state}")
    click.echo("Drafts:")
    for d in report.drafts or []:
        line = f"  #{d.id} {d.status:<15} {d.subject}"
        counts = report.ledgers.get(d.id)
        failed = sum(counts.get(k, 0) for k in pipeline.FAILED_STATUSES) if counts else 0
        if counts:
            kinds = ", ".join(f"{counts[k]} {k}" for k in pipeline.FAILED_STATUSES if counts.get(k))
            line += (f"  — sent {counts.get('sent', 0)}, failed {failed}" + (f" ({kinds})" if kinds else "")
                     + f", uncertain {counts.get('uncertain', 0)}, pending {counts.get('pending', 0)}, "
                     + (f"in flight {counts['claimed']}, " if counts.get("claimed") else "")
                     + f"skipped {counts.get('skipped', 0)}")
        click.echo(line)
        if counts and d.id in report.orphaned:
            click.echo(f"    {counts['claimed']} in flight when their sender stopped: {NEXT_SEND} "
                       "marks uncertain those that may have gone out, and sends the others")
        hold = report.held.get(d.id) if d.status == "sending" else None
        if hold is not None:
            click.echo(f"    waits for you since {_when(hold.at, tz)}: {held_message(d.id, hold)}")
        elif d.id in report.stopped:
            error, at = report.stopped[d.id]
            click.echo(f"    stopped {_when(at, tz)}: {error}")
        events = report.draft_events.get(d.id)
        if events:
            click.echo("    provider events: " + ", ".join(f"{n} {k}" for k, n in sorted(events.items())))
        reasons = report.reasons.get(d.id, [])
        if counts and counts.get("uncertain"):
            _echo_uncertain(d.id, counts["uncertain"], report.resendable.get(d.id, 0), reasons,
                            report.uncertain.get(d.id, []), tz)
        if failed:
            click.echo(f"    {failed:,} failed" + (":" if draft_id is not None else
                                                   f" (`digest status --draft {d.id}` lists them):"))
            _echo_reasons([r for r in reasons if r.status in pipeline.FAILED_STATUSES], tz, show_status=True)
            if d.id in report.failed:
                _echo_messages(failed, report.failed[d.id])
    if not report.drafts:
        click.echo("  none")
    subs = report.subscribers
    click.echo("Subscribers: " + (", ".join(f"{n} {k}" for k, n in sorted(subs.items())) or "none"))
    if report.events:
        click.echo("Delivery events: " + ", ".join(f"{n} {k}" for k, n in sorted(report.events.items())))
    click.echo("Next runs:")
    for job, when in report.next_runs.items():
        line = f"  {job}: {_when(when, tz)}"
        if job == "draft" and report.last_draft_run is not None:
            line += f" (last run {_when(report.last_draft_run, tz)})"
        if job == "draft" and report.missed_draft_run is not None:
            line += (f"; the run due {_when(report.missed_draft_run, tz)} was missed: `digest serve` "
                     "catches it up at start, or run `digest draft`")
        click.echo(line)


# -- subscribers -------------------------------------------------------------------------------


@cli.group("subscribers")
def subscribers_group() -> None:
    """Add, import, export, list, remove and reactivate subscribers."""


# The subscriber commands import digest.subscribers themselves: it loads email-validator, which
# no other command needs (`digest send` in particular starts faster and smaller without it).
@subscribers_group.command("add")
@click.argument("email")
@click.option("--name", default="", help="The subscriber's name, used in the greeting.")
@pass_ctx
def subscribers_add(obj: _Context, email: str, name: str) -> None:
    """Add one subscriber."""
    from digest import subscribers

    sub = subscribers.add(obj.app.store, email, name, clock.now())
    click.echo(f"added {sub.email}")


@subscribers_group.command("import")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@pass_ctx
def subscribers_import(obj: _Context, csv_file: Any) -> None:
    """Import a CSV of email,name (a header row is optional)."""
    from digest import subscribers

    report = subscribers.import_csv(obj.app.store, csv_file, clock.now())
    click.echo(f"imported: {report.added} added, {report.updated} updated, {report.duplicates} duplicates merged, "
               f"{len(report.kept_unsubscribed)} left unsubscribed, {len(report.invalid)} invalid")
    for line, reason in report.invalid:
        click.echo(f"  line {line}: {reason}")
    for email in report.kept_unsubscribed:
        click.echo(f"  {email}: unsubscribed earlier, not re-added")


@subscribers_group.command("export")
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-", help="File (default: stdout).")
@pass_ctx
def subscribers_export(obj: _Context, out: Any) -> None:
    """Write every subscriber as CSV."""
    from digest import subscribers

    for line in subscribers.export_csv(obj.app.store.list_subscribers()):
        out.write(line)


@subscribers_group.command("list")
@click.option("--status", type=click.Choice(["active", "unsubscribed", "bounced", "complained", "removed"]),
              default=None)
@pass_ctx
def subscribers_list(obj: _Context, status: str | None) -> None:
    """List subscribers."""
    count = 0
    for s in obj.app.store.list_subscribers(status=status):
        click.echo(f"{s.email}\t{s.name}\t{s.status}")
        count += 1
    click.echo(f"{count} subscribers", err=True)


@subscribers_group.command("remove")
@click.argument("email")
@pass_ctx
def subscribers_remove(obj: _Context, email: str) -> None:
    """Stop all mail to an address and forget its name."""
    from digest import subscribers

    changed = subscribers.remove(obj.app.store, email, clock.now())
    click.echo(f"removed {email.strip().lower()}" if changed else f"{email.strip().lower()} was already removed")


# How `subscribers reactivate` names the suppression it lifted.
_LIFTED = {"hard_bounce": "hard bounce", "soft_bounce_limit": "too many soft bounces",
           "provider_suppressed": "refused by {origin}"}


@subscribers_group.command("reactivate")
@click.argument("email")
@click.option("--provider-cleared", is_flag=True,
              help="The provider had refused the address itself; you checked its suppression list (not a "
                   "complaint) and took the address off it.")
@pass_ctx
def subscribers_reactivate(obj: _Context, email: str, provider_cleared: bool) -> None:
    """Take back a reader whose address bounced (the mailbox was full, the domain is fixed).

    Never one who unsubscribed or complained: only the reader can subscribe again.
    """
    from digest import subscribers

    done = subscribers.reactivate(obj.app.store, email, clock.now(), provider_cleared=provider_cleared)
    was = done.status if done.status not in (None, "active") else "suppressed"
    provider = done.origin or "the provider"
    if done.reason is not None:
        was += ": " + _LIFTED.get(done.reason, done.reason).format(origin=provider)
        if done.suppressed_at is not None:
            was += f" on {done.suppressed_at.astimezone(obj.settings.newsletter.tz):%Y-%m-%d}"
    line = f"reactivated {done.email} (was {was})"
    if done.status is None:
        line += "; not a subscriber: `digest subscribers add` subscribes it"
    click.echo(line)


def main() -> None:
    cli(prog_name="digest")
