"""The scheduled jobs: each runs its use case, logs, and never lets an exception out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from digest import jobs, pipeline
from tests.conftest import FrozenClock, make_settings


@pytest.fixture
def app(tmp_path: Path, clock: FrozenClock) -> pipeline.App:
    a = pipeline.App.open(make_settings(tmp_path, digest={"approval": {"required": False}}), clock)
    a.store.upsert_subscribers([("ann@example.com", "Ann")], "cli", clock())
    yield a
    a.close()


def test_jobs_run_the_flow(app: pipeline.App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="digest.jobs")
    jobs.collect_job(app)
    jobs.draft_job(app)
    jobs.send_job(app)
    assert "collect sample: 4 new essays" in caplog.text
    assert "created and approved automatically" in caplog.text
    assert "send draft 1: batch 1 (1): 1/1 done, 1 sent, 0 failed, 0 uncertain" in caplog.text  # per batch
    assert "send draft 1: 1 sent, 0 failed, 0 uncertain" in caplog.text
    assert app.store.get_draft(1).status == "sent"


def test_a_failing_job_logs_and_keeps_the_service_up(app: pipeline.App, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_app: pipeline.App) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(pipeline, "collect", boom)
    monkeypatch.setattr(pipeline, "make_draft", boom)
    jobs.collect_job(app)
    jobs.draft_job(app)
    assert len([r for r in caplog.records if r.exc_info and "database went away" in str(r.exc_info[1])]) == 2
    assert "collect job failed" in caplog.text and "draft job failed" in caplog.text


def test_the_send_job_logs_another_senders_draft_at_info_and_uncertain_ones_with_the_hint(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from digest import jobs, pipeline
    from digest.delivery.sender import SendSummary

    busy = SendSummary(1, stopped="another sender is working on this draft", idle=True)
    left = SendSummary(2, sent=3, uncertain_total=4, finished=True)
    monkeypatch.setattr(pipeline, "send", lambda app, **kw: [busy, left])
    with caplog.at_level(logging.INFO, logger="digest"):
        jobs.send_job(None)  # type: ignore[arg-type]
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records if r.name == "digest.jobs"}
    assert levels == {"send draft 1": logging.INFO, "send draft 2": logging.WARNING}
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("send draft 2")]
    assert "4 messages may or may not have gone out" in line and "--draft 2" in line


@pytest.mark.parametrize(("weekday", "fires_on"), [
    ("1", {"Mon"}), ("0", {"Sun"}), ("7", {"Sun"}), ("1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
    ("0,6", {"Sun", "Sat"}), ("*/2", {"Sun", "Tue", "Thu", "Sat"}), ("mon", {"Mon"}), ("sat,0", {"Sat", "Sun"}),
])
def test_weekday_numbers_count_as_in_crontab(weekday: str, fires_on: set[str]) -> None:
    """0 and 7 are Sunday and 1 is Monday, as in crontab (APScheduler alone counts from Monday:
    `0 7 * * 1` fired on Tuesdays)."""
    from datetime import UTC, datetime, timedelta

    from digest.scheduler import next_run

    now, days = datetime(2026, 12, 7, 8, 0, tzinfo=UTC), set()
    for _ in range(7):
        when = next_run(f"0 7 * * {weekday}", "UTC", now)
        assert when is not None
        days.add(when.strftime("%a"))
        now = when + timedelta(minutes=1)
    assert days == fires_on


@pytest.mark.parametrize("weekday", ["8", "5-1"])
def test_weekday_numbers_outside_crontabs_are_refused(weekday: str) -> None:
    from digest.scheduler import parse_cron

    with pytest.raises(ValueError, match="0 and 7 are Sunday"):
        parse_cron(f"0 7 * * {weekday}", "UTC")


def test_a_draft_run_counts_as_missed_when_the_schedule_fired_since_the_last_one(
        tmp_path: Path, clock: FrozenClock) -> None:
    """Like anacron: every draft run is recorded, and `digest serve` drafts at start when the
    schedule (Mondays 07:00) fired since the last one, but not twice for a period, and not on
    a new install whose service has never drafted."""
    from datetime import UTC, datetime

    from sqlalchemy import delete

    from digest.store.schema import meta

    a = pipeline.App.open(make_settings(tmp_path), clock)  # Thursday 2026-11-26 09:00 UTC
    try:
        assert pipeline.missed_draft_run(a) is None  # a new install: the schedule makes the first draft
        pipeline.collect(a)
        first = pipeline.make_draft(a).draft  # `digest draft` by hand
        assert first is not None and first.id is not None
        assert a.store.last_run("draft") == clock()
        assert pipeline.missed_draft_run(a) is None
        clock.advance(days=4)  # Monday 09:00, and nothing ran at 07:00
        monday = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
        assert pipeline.missed_draft_run(a) == monday
        with a.store.engine.begin() as conn:  # a database from before runs were recorded
            conn.execute(delete(meta))
        assert pipeline.missed_draft_run(a) == monday  # its newest draft is older than Monday 07:00
        pipeline.reject(a, first.id)
        caught_up = pipeline.make_draft(a)  # what the service runs at start
        assert caught_up.created and caught_up.draft is not None and caught_up.draft.id is not None
        assert caught_up.draft.period_key == "2026-11-30T07:00"
        assert pipeline.missed_draft_run(a) is None
        pipeline.reject(a, caught_up.draft.id)
        clock.advance(hours=2)
        assert pipeline.missed_draft_run(a) is None  # a restart does not draft the period again
    finally:
        a.close()


def test_the_send_job_passes_by_a_send_paused_for_the_operator(tmp_path: Path, clock: FrozenClock,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A provider refusing every batch for good: the send pauses after three, and the service's
    later runs (every five minutes) fail nobody else, each logging one line that the draft waits
    for the operator, until the operator resumes it."""
    from tests.delivery.test_faults_e2e import PROVIDERS, TOKEN
    from tests.fakes.provider_server import FakeProviderServer

    readers = [f"p{i:02d}@example.com" for i in range(40)]
    with FakeProviderServer(token=TOKEN) as srv:
        settings = make_settings(tmp_path, digest={"approval": {"required": False}}, delivery={
            **PROVIDERS["postmark"].delivery, "base_url": srv.url, "batch_size": 4, "concurrency": 1,
            "max_retries": 4, "timeout": 2.0, "rate_per_second": 1000})
        app = pipeline.App.open(settings, clock)
        app.store.upsert_subscribers([(e, "") for e in readers], "cli", clock())
        pipeline.collect(app)
        pipeline.make_draft(app)
        srv.faults.extend([("status", 400)] * 100)  # a setting Postmark rejects, whoever the reader
        caplog.set_level(logging.INFO, logger="digest.jobs")
        history = []
        for _ in range(4):  # `digest serve`'s send job, every 5 minutes
            caplog.clear()
            jobs.send_job(app)
            history.append((app.store.ledger_counts(1), len(srv.requests)))
            lines = [r for r in caplog.records if r.name == "digest.jobs"]
            assert all(r.exc_info is None for r in lines)
            if len(history) > 1:  # passed by: one line, nothing sent
                (line,) = lines
                assert line.levelno == logging.ERROR and line.getMessage().startswith(
                    "send draft 1 waits for the operator: paused after 3 failed batches in a row, 12 messages in "
                    "them refused for good (the last: postmark: HTTP 400")
                assert "`digest send --retry-failed --draft 1`" in line.getMessage()
        assert history == [({"failed": 12, "pending": 28}, 3)] * 4
        assert app.store.get_draft(1).status == "sending"
        srv.faults.clear()  # fixed: the operator resumes it (`digest send --draft 1`)
        (resumed,) = pipeline.send(app, draft_id=1)
        assert resumed.finished and resumed.sent == 28 and len(srv.messages) == 28
        app.close()
