"""Thin job functions the scheduler calls. Each triggers one idempotent use case and logs;
an exception is logged and never escapes, so one failed run leaves the service up."""

from __future__ import annotations

import logging
from collections.abc import Callable

from digest import pipeline
from digest.delivery.sender import SendSummary

log = logging.getLogger("digest.jobs")


def collect_job(app: pipeline.App) -> None:
    try:
        for outcome in pipeline.collect(app):
            if outcome.error:
                log.warning("collect %s: %s", outcome.source, outcome.error)
            else:
                s = outcome.stats
                log.info("collect %s: %d new essays, %d new comments%s", outcome.source, s.new_essays,
                         s.new_comments, " (not modified)" if outcome.not_modified else "")
    except Exception:
        log.exception("collect job failed")


def draft_job(app: pipeline.App) -> None:
    try:
        outcome = pipeline.make_draft(app)
        log.info("draft: %s", outcome.message)
        if outcome.notify_error:
            log.warning("draft: %s", outcome.notify_error)
    except Exception:
        log.exception("draft job failed")


def _log_batch(summary: SendSummary, size: int) -> None:
    of = f"/{summary.total}" if summary.total else ""
    log.info("send draft %s: batch %d (%d): %d%s done, %d sent, %d failed, %d uncertain", summary.draft_id,
             summary.batches, size, summary.done, of, summary.sent, sum(summary.failed.values()),
             summary.uncertain)


def send_job(app: pipeline.App, should_stop: Callable[[], bool] = lambda: False) -> None:
    try:
        for summary in pipeline.send(app, should_stop=should_stop, on_batch=_log_batch):
            if summary.held and not summary.batches:
                # Paused until the operator acts, by an earlier run: passed by, one line a run.
                log.error("send draft %s waits for the operator: %s", summary.draft_id, summary.stopped)
                continue
            # A send the provider blocks (credentials, quota, account), or paused after batches
            # it refused, waits for the operator: an error in the log, not a line among the others.
            # Uncertain messages wait for the operator too, and a paused send for the next run.
            # Another process sending the draft is the lease at work, not a problem.
            level = (logging.ERROR if summary.blocked or summary.held else logging.WARNING
                     if summary.for_operator or (summary.stopped and not summary.idle) else logging.INFO)
            log.log(level, "send draft %s: %d sent, %d failed, %d uncertain in %.1fs%s%s", summary.draft_id,
                     summary.sent, sum(summary.failed.values()), summary.uncertain, summary.seconds,
                     f" ({summary.stopped})" if summary.stopped else "",
                     f"; {summary.uncertain_hint()}" if summary.for_operator else "")
    except Exception:
        log.exception("send job failed")
