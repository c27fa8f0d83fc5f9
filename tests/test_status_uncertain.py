"""``digest status`` lists the messages whose fate is unknown (rule 1), not only their count:
the store reads them as the ledger records them (ranged batches and rows of their own) on
every backend, and the CLI shows the first twenty after a sender died mid-batch."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from digest import pipeline
from digest.cli import cli
from digest.config import load
from digest.delivery.sender import Sender
from digest.store import Store
from digest.store.store import ReasonCount, UncertainMessage
from digest.types import Draft, SendResult
from tests.conftest import NOW
from tests.fakes.scripted_provider import ScriptedProvider

STOPPED = "the sender stopped while this message was in flight"


def _sending(store: Store, emails: list[str]) -> int:
    d, _ = store.create_draft(Draft("P1", "Subject", "", ()), [], NOW)
    assert d.id is not None
    store.upsert_subscribers([(e, "") for e in emails], "cli", NOW)
    store.transition(d.id, ("pending_review",), "approved", NOW)
    store.start_send(d.id, NOW)
    return int(d.id)


def test_uncertain_messages_reads_ranged_batches_and_rows_of_their_own(store: Store) -> None:
    emails = [f"{c}@x.org" for c in "abcdef"]
    draft_id = _sending(store, emails)
    later = NOW + timedelta(hours=1)
    # a, b: a whole ranged batch timed out after sending (one write, on the batch).
    first = store.claim_batch(draft_id, 2, "me", NOW)
    store.mark_uncertain([x.ledger_id for x in first], "timed out", NOW, first)
    # c: uncertain on its own; d sent; e put back in the queue, then claimed alone.
    c, d, e = store.claim_batch(draft_id, 3, "me", NOW)
    store.mark_uncertain([c.ledger_id], "reset mid-batch", NOW, None)
    store.release([e.ledger_id], "not sent: 429", NOW)
    store.settle([SendResult(d.ledger_id, "sent", "m-d")], "outbox", NOW)
    assert [x.email for x in store.claim_batch(draft_id, 5, "me", NOW)] == ["f@x.org"]  # a ranged one
    assert [x.email for x in store.claim_batch(draft_id, 5, "me", NOW)] == ["e@x.org"]  # a batch without range
    # The sender dies with e and f in flight; the next one finds them so.
    assert store.mark_stale_claims_uncertain(draft_id, later) == 2
    assert store.ledger_counts(draft_id) == {"uncertain": 5, "sent": 1}

    ids = {email: ledger_id for ledger_id, email, _status in store.ledger_rows(draft_id)}
    listed = store.uncertain_messages(draft_id)
    assert listed == [
        UncertainMessage(ids["a@x.org"], "a@x.org", "timed out", NOW),
        UncertainMessage(ids["b@x.org"], "b@x.org", "timed out", NOW),
        UncertainMessage(ids["c@x.org"], "c@x.org", "reset mid-batch", NOW),
        UncertainMessage(ids["e@x.org"], "e@x.org", STOPPED, later),
        UncertainMessage(ids["f@x.org"], "f@x.org", STOPPED, later),
    ]
    # How many for each reason, most first, each with its first time.
    assert store.reasons(draft_id, ("uncertain",)) == [
        ReasonCount("uncertain", STOPPED, 2, later), ReasonCount("uncertain", "timed out", 2, NOW),
        ReasonCount("uncertain", "reset mid-batch", 1, NOW)]
    # A limit keeps the first in ledger order, wherever it cuts.
    assert [m.email for m in store.uncertain_messages(draft_id, limit=1)] == ["a@x.org"]
    assert [m.email for m in store.uncertain_messages(draft_id, limit=3)] == ["a@x.org", "b@x.org", "c@x.org"]
    assert store.uncertain_messages(draft_id, limit=0) == []
    # Nothing uncertain once the operator decided, nor for another draft.
    assert store.resolve_uncertain(draft_id, "mark-sent", later) == 5
    assert store.uncertain_messages(draft_id) == []
    assert store.uncertain_messages(draft_id + 1) == []


def test_failed_messages_and_their_reasons_read_batches_and_rows(store: Store) -> None:
    """A batch refused whole (its verdict written once, on the batch) and rows refused one by
    one: listed in ledger order and counted by status and error, as `digest status` shows."""
    draft_id = _sending(store, [f"{c}@x.org" for c in "abcdef"])
    whole = store.claim_batch(draft_id, 3, "me", NOW)
    store.settle([SendResult(x.ledger_id, "failed", None, "HTTP 422: bad template") for x in whole],
                 "postmark", NOW, whole)
    d, e, f = store.claim_batch(draft_id, 3, "me", NOW)
    later = NOW + timedelta(minutes=1)
    store.settle([SendResult(d.ledger_id, "sent", "m-d"), SendResult(e.ledger_id, "suppressed", None, "inactive"),
                  SendResult(f.ledger_id, "rejected", None, "no such user")], "postmark", later)
    statuses = ("failed", "rejected", "invalid", "suppressed")
    assert store.reasons(draft_id, statuses) == [
        ReasonCount("failed", "HTTP 422: bad template", 3, NOW), ReasonCount("rejected", "no such user", 1, later),
        ReasonCount("suppressed", "inactive", 1, later)]
    listed = store.messages_in(draft_id, statuses)
    assert [(m.email, m.status, m.error) for m in listed] == [
        ("a@x.org", "failed", "HTTP 422: bad template"), ("b@x.org", "failed", "HTTP 422: bad template"),
        ("c@x.org", "failed", "HTTP 422: bad template"), ("e@x.org", "suppressed", "inactive"),
        ("f@x.org", "rejected", "no such user")]
    assert [m.email for m in store.messages_in(draft_id, statuses, limit=4)] == ["a@x.org", "b@x.org", "c@x.org",
                                                                                 "e@x.org"]
    assert store.reasons(draft_id, ("uncertain",)) == []


class Killed(BaseException):
    """The sender's process dying where it stands (kill -9 spares no ``except``)."""


class DiesOnSecondBatch(ScriptedProvider):
    """Takes the first batch; the process dies while the second one is in flight."""

    max_batch: ClassVar[int] = 25

    def __init__(self) -> None:
        super().__init__([lambda messages: None, Killed()])


def _config(tmp_path: Path) -> Path:
    """A config file: the outbox, the bundled sample, drafts approved as they are made."""
    from digest.sources.folder import SAMPLE_DIR

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
newsletter: {{public_url: https://news.example.org}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
digest: {{approval: {{required: false}}}}
delivery: {{provider: outbox, outbox_dir: out, concurrency: 1}}
""", encoding="utf-8")
    return cfg


def _died_mid_batch(tmp_path: Path, emails: list[str], resume: bool = True) -> tuple[str, set[str]]:
    """A config (outbox), an approved draft, and a sender that died with its second batch in
    flight; then (``resume``) `digest send` finished the rest. Returns the config and that
    batch's readers."""
    cfg = _config(tmp_path)
    app = pipeline.App.open(load(str(cfg)))
    try:
        app.store.upsert_subscribers([(e, "") for e in emails], "cli", app.now())
        pipeline.collect(app)
        draft = pipeline.make_draft(app).draft
        assert draft is not None and draft.status == "approved"
        provider = DiesOnSecondBatch()
        with pytest.raises(Killed):
            Sender(app.store, provider, app.settings, draft, pipeline.compile_for(app, draft), app.link_pair,
                   now=app.now).run()
    finally:
        app.close()
    in_flight = {m.to_email for m in provider.calls[1]}
    if not resume:
        return str(cfg), in_flight
    result = CliRunner().invoke(cli, ["--config", str(cfg), "send"])
    # Finished, and exit 3: messages whose fate is unknown wait for the operator.
    assert result.exit_code == 3 and "finished" in result.output
    assert (f"draft 1: {len(in_flight)} messages may or may not have gone out: `digest status` lists them; "
            "settle them with `digest send --resolve-uncertain resend|mark-sent --draft 1`") in result.output
    return str(cfg), in_flight


def _listed(output: str) -> list[str]:
    """The addresses `digest status` lists as uncertain."""
    return [line.split()[0] for line in output.splitlines() if "(ledger " in line]


def test_status_lists_the_messages_a_dead_sender_left_uncertain(tmp_path: Path) -> None:
    emails = [f"r{i:02d}@example.com" for i in range(30)]
    cfg, in_flight = _died_mid_batch(tmp_path, emails)
    assert len(in_flight) == 5  # the 30 went as 25, then 5, and the 5 were in flight
    result = CliRunner().invoke(cli, ["--config", cfg, "status"])
    assert result.exit_code == 0
    listed = _listed(result.output)
    assert sorted(listed) == sorted(in_flight) and listed == sorted(listed)  # in ledger order
    lines = result.output.splitlines()
    hint = lines.index("    5 uncertain; resolve with `digest send --resolve-uncertain resend|mark-sent --draft 1` "
                       "(with resend, any of them that did arrive arrive twice):")
    # How many for each reason (the batch's, once, with its time), then the readers.
    assert lines[hint + 1].startswith("      5 since 2") and lines[hint + 1].endswith(f" UTC: {STOPPED}")
    assert lines[hint + 2] == "      they are:"
    assert lines[hint + 3:hint + 8] == [f"        r{25 + i}@example.com (ledger {26 + i})" for i in range(5)]
    assert "... and" not in result.output and result.output.count(STOPPED) == 1


def test_status_says_when_messages_in_flight_have_lost_their_sender(tmp_path: Path) -> None:
    cfg, in_flight = _died_mid_batch(tmp_path, [f"r{i:02d}@example.com" for i in range(30)], resume=False)
    output = CliRunner().invoke(cli, ["--config", cfg, "status"]).output
    assert "sent 25, failed 0, uncertain 0, pending 0, in flight 5, skipped 0" in output
    assert ("    5 in flight when their sender stopped: the next `digest send` (or the service's next send) "
            "marks uncertain those that may have gone out, and sends the others\n") in output


def test_status_lists_twenty_and_says_how_many_more(tmp_path: Path) -> None:
    emails = [f"r{i:02d}@example.com" for i in range(50)]
    cfg, in_flight = _died_mid_batch(tmp_path, emails)
    assert len(in_flight) == 25
    result = CliRunner().invoke(cli, ["--config", cfg, "status"])
    listed = _listed(result.output)
    assert len(listed) == 20 and set(listed) < in_flight and listed == sorted(in_flight)[:20]
    lines = result.output.splitlines()
    hint = next(i for i, line in enumerate(lines) if "25 uncertain; resolve with" in line)
    assert lines[hint + 1].startswith("      25 since ") and lines[hint + 2] == "      the first 20:"
    assert lines[hint + 23] == "      ... and 5 more"


def test_stopped_on_names_the_refusal_that_put_the_last_batch_back(store: Store) -> None:
    draft_id = _sending(store, ["a@x.org", "b@x.org", "c@x.org"])
    assert store.stopped_on(draft_id) is None  # nothing claimed yet
    first = store.claim_batch(draft_id, 1, "me", NOW)
    store.settle([SendResult(first[0].ledger_id, "sent", "m")], "resend", NOW, first)
    assert store.stopped_on(draft_id) is None  # the last batch went out
    later = NOW + timedelta(minutes=5)
    second = store.claim_batch(draft_id, 1, "me", later)
    store.release([second[0].ledger_id], "resend: HTTP 429 daily_quota_exceeded", later, second)
    assert store.stopped_on(draft_id) == ("resend: HTTP 429 daily_quota_exceeded", later)
    # Resumed, and a batch went out since: the old reason no longer holds.
    third = store.claim_batch(draft_id, 2, "me", later)
    store.settle([SendResult(x.ledger_id, "sent", "m") for x in third], "resend", later, third)
    assert store.stopped_on(draft_id) is None


def test_status_says_why_a_send_waits(tmp_path: Path) -> None:
    from digest.errors import BlockedError

    cfg = _config(tmp_path)
    app = pipeline.App.open(load(str(cfg)))
    try:
        app.store.upsert_subscribers([(f"r{i}@example.com", "") for i in range(4)], "cli", app.now())
        pipeline.collect(app)
        draft = pipeline.make_draft(app).draft
        assert draft is not None
        quota = BlockedError("outbox: the disk quota is used up", hint="free some space")
        summary = Sender(app.store, ScriptedProvider([quota]), app.settings, draft, pipeline.compile_for(app, draft),
                         app.link_pair, now=app.now).run()
        assert summary.blocked
    finally:
        app.close()
    result = CliRunner().invoke(cli, ["--config", str(cfg), "status"])
    assert result.exit_code == 0
    assert "    stopped " in result.output
    assert ": outbox: the disk quota is used up (free some space)\n" in result.output


def test_status_summarizes_the_delivery_events_providers_reported(tmp_path: Path) -> None:
    from digest.types import DeliveryEvent

    cfg = _config(tmp_path)
    app = pipeline.App.open(load(str(cfg)))
    try:
        app.store.upsert_subscribers([(f"r{i}@example.com", "") for i in range(4)], "cli", app.now())
        pipeline.collect(app)
        assert pipeline.make_draft(app).draft is not None
        (sent,) = pipeline.send(app)
        assert sent.finished and sent.sent == 4
        ledger = {email: ledger_id for ledger_id, email, _status in app.store.ledger_rows(sent.draft_id)}
        events = [DeliveryEvent("postmark", f"e{i}", kind, f"r{i}@example.com", ledger_id=ledger[f"r{i}@example.com"])
                  for i, kind in enumerate(["delivered", "delivered", "hard_bounce", "complaint"])]
        pipeline.apply_events(app, "postmark", [*events, events[0]])  # a retry of the first: stored once
    finally:
        app.close()
    output = CliRunner().invoke(cli, ["--config", str(cfg), "status"]).output
    assert "Delivery events: 1 complaint, 2 delivered, 1 hard_bounce\n" in output  # all drafts, ever
    assert "\n    provider events: 1 complaint, 2 delivered, 1 hard_bounce\n" in output  # under draft 1


def test_each_drafts_provider_events_are_counted_through_its_ledger_rows(store: Store) -> None:
    from digest.types import DeliveryEvent

    first = _sending(store, ["a@x.org", "b@x.org"])
    d, _ = store.create_draft(Draft("P2", "Next", "", ()), [], NOW)
    assert d.id is not None
    store.transition(d.id, ("pending_review",), "approved", NOW)
    store.start_send(d.id, NOW)
    ids = {(draft, email): ledger_id for draft in (first, d.id)
           for ledger_id, email, _status in store.ledger_rows(draft)}
    events = [("delivered", first, "a@x.org"), ("delivered", first, "b@x.org"), ("hard_bounce", first, "b@x.org"),
              ("complaint", d.id, "a@x.org")]
    for n, (kind, draft, email) in enumerate(events):
        assert store.record_event(DeliveryEvent("postmark", f"e{n}", kind, email, ledger_id=ids[(draft, email)]), NOW)
    store.record_event(DeliveryEvent("postmark", "no-ledger", "delivered", "a@x.org"), NOW)  # names no message
    assert store.draft_event_counts([first, d.id]) == {
        first: {"delivered": 2, "hard_bounce": 1}, d.id: {"complaint": 1}}
    assert store.draft_event_counts([first]) == {first: {"delivered": 2, "hard_bounce": 1}}
    assert store.draft_event_counts([]) == {}


def test_messages_in_flight_are_orphaned_only_once_their_sender_is_gone(tmp_path: Path) -> None:
    from datetime import timedelta as td

    from digest.delivery.sender import lease_holder

    app = pipeline.App.open(load(str(_config(tmp_path))))
    try:
        app.store.upsert_subscribers([(f"r{i}@example.com", "") for i in range(3)], "cli", app.now())
        pipeline.collect(app)
        draft = pipeline.make_draft(app).draft
        assert draft is not None and draft.id is not None
        app.store.start_send(draft.id, app.now())
        me = lease_holder()  # a sender alive in this very process
        assert app.store.acquire_lease(f"send:{draft.id}", me, app.now(), app.now() + td(minutes=5))
        assert len(app.store.claim_batch(draft.id, 2, me, app.now())) == 2
        assert pipeline.status(app).orphaned == set()
        app.store.release_lease(f"send:{draft.id}", me)  # gone without settling its batch
        assert pipeline.status(app).orphaned == {draft.id}
    finally:
        app.close()


@pytest.mark.parametrize("how", ["resend", "mark-sent"])
def test_a_dry_run_of_resolving_says_what_it_would_settle_and_writes_nothing(tmp_path: Path, how: str) -> None:
    emails = [f"r{i:02d}@example.com" for i in range(30)]
    cfg, in_flight = _died_mid_batch(tmp_path, emails)
    before = CliRunner().invoke(cli, ["--config", cfg, "status"]).output
    result = CliRunner().invoke(cli, ["--config", cfg, "send", "--dry-run", "--resolve-uncertain", how])
    assert result.exit_code == 0, result.output
    assert f"draft 1: 5 uncertain messages → {how} (dry run: left as they are)" in result.output
    assert CliRunner().invoke(cli, ["--config", cfg, "status"]).output == before
    assert sorted(_listed(before)) == sorted(in_flight)


def test_resolving_with_nothing_uncertain_says_so(tmp_path: Path) -> None:
    emails = [f"r{i:02d}@example.com" for i in range(30)]
    cfg, _in_flight = _died_mid_batch(tmp_path, emails)
    assert CliRunner().invoke(cli, ["--config", cfg, "send", "--resolve-uncertain", "mark-sent"]).exit_code == 0
    again = CliRunner().invoke(cli, ["--config", cfg, "send", "--resolve-uncertain", "mark-sent", "--draft", "1"])
    assert again.exit_code == 0 and again.output.strip() == "no uncertain messages to resolve in draft 1"


def test_a_send_that_finds_another_sender_on_the_draft_exits_0(tmp_path: Path) -> None:
    """Overlapping cron runs are normal: the one that finds the draft taken has nothing to do,
    which is not "paused, resume later" (75)."""
    from digest.delivery.sender import LEASE_SECONDS, lease_holder

    cfg = _config(tmp_path)
    app = pipeline.App.open(load(str(cfg)))
    try:
        app.store.upsert_subscribers([("a@example.com", "")], "cli", app.now())
        pipeline.collect(app)
        draft = pipeline.make_draft(app).draft
        assert draft is not None and draft.status == "approved"
        assert app.store.acquire_lease(f"send:{draft.id}", lease_holder(), app.now(),
                                       app.now() + timedelta(seconds=LEASE_SECONDS))
    finally:
        app.close()
    result = CliRunner().invoke(cli, ["--config", str(cfg), "send"])
    assert result.exit_code == 0, result.output
    assert f"draft {draft.id}: another sender is working on this draft" in result.output
