"""Uncertain batches are resent under their idempotency keys only where the provider saw them
under those keys (rule 1): through the same provider, the same account and this installation's
keys. End to end against the fake provider server (which keeps Resend's keys per server, as
Resend keeps them per team), on SQLite and PostgreSQL: each test asserts what every reader
received, counted from the fake's record of accepted messages.

* A Postmark outage leaves a batch uncertain; the operator switches to Resend: the next send
  leaves that batch to the operator (Resend never saw it) and sends the rest once.
* The same with another Resend account (another team's keys).
* Two installations on one Resend team (staging beside production) both start at draft 1 with
  ledger ids 1..N: their keys differ, so both deliver everyone once.
* `digest send --resolve-uncertain resend` through Resend leaves the batches that can keep
  their keys to the send, which resends them as they went; only the others go back in the
  queue, with the warning that those may arrive twice (and `digest status` says which is which).
* A database upgraded to 0011 with uncertain batches: nothing says what they went through, so
  they wait for the operator.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from digest import clock as wall_clock
from digest import pipeline
from digest.cli import cli
from digest.config import load
from digest.delivery.sender import SendSummary
from digest.store import db
from tests.conftest import PG_URL, FrozenClock, make_settings
from tests.delivery.test_faults_e2e import BATCH, EMAILS, TOKEN, copies, once, send, with_status
from tests.fakes.provider_server import FakeProviderServer, install_resend

RETRIES = 1
# The warning for a message resent without the key it went out with.
MAY_ARRIVE_TWICE = "with resend, any of them that did arrive arrive twice"
# The first batch is taken, but a gateway answers 504 to it and to every retry: uncertain.
LOST = [("gateway", 504)] + [("status", 504)] * RETRIES


def _delivery(provider: str, srv: FakeProviderServer) -> dict[str, Any]:
    return {"provider": provider, "api_key": TOKEN, "base_url": srv.url, "batch_size": BATCH, "concurrency": 1,
            "max_retries": RETRIES, "timeout": 2.0, "rate_per_second": 1000}


Clock = Callable[[], datetime]


def _app(root: Path, db_url: str, clock: Clock, delivery: dict[str, Any], emails: list[str] | None = None,
         **overrides: Any) -> pipeline.App:
    """The app on ``db_url``; with ``emails``, those subscribed and an approved draft."""
    root.mkdir(parents=True, exist_ok=True)
    settings = make_settings(root, db_url, digest={"approval": {"required": False}}, delivery=delivery, **overrides)
    app = pipeline.App.open(settings, clock)
    if emails is not None:
        app.store.upsert_subscribers([(e, "") for e in emails], "cli", clock())
        pipeline.collect(app)
        assert pipeline.make_draft(app).draft is not None
    return app


def _ledger(app: pipeline.App, draft_id: int = 1) -> dict[str, str]:
    return {email: status for _id, email, status in app.store.ledger_rows(draft_id)}


def _sent_via(app: pipeline.App) -> list[str | None]:
    with app.store.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT sent_via FROM send_batches ORDER BY id"))]


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def other_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A second empty database on the same backend: another installation's."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    assert PG_URL
    name = f"digest_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{PG_URL.rpartition('/')[0]}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _postmark_outage(tmp_path: Path, db_url: str, clock: Clock, srv: FakeProviderServer) -> pipeline.App:
    """Postmark takes the first batch but a gateway answers 504 (uncertain: Postmark has no
    key), then answers 503 until the send pauses."""
    app = _app(tmp_path, db_url, clock, _delivery("postmark", srv), EMAILS)
    srv.faults.extend([("gateway", 504)] + [("status", 503)] * (RETRIES + 1))
    first = send(app, [])
    assert first.uncertain == BATCH and first.for_operator == BATCH and not first.finished
    assert with_status(_ledger(app), "uncertain") == EMAILS[:BATCH]
    assert copies(srv) == once(EMAILS[:BATCH])  # they did arrive: the gateway lost the answer
    return app


def test_switching_from_postmark_to_resend_leaves_postmarks_uncertain_batch_to_the_operator(
        tmp_path: Path, db_url: str, clock: FrozenClock, srv: FakeProviderServer) -> None:
    _postmark_outage(tmp_path, db_url, clock, srv).close()
    # The operator switches delivery.provider to Resend (the same database) and sends.
    install_resend(srv)
    app = _app(tmp_path, db_url, clock, _delivery("resend", srv))
    second = send(app, [])
    # Resend never saw the Postmark batch: sent again under a Resend key it would arrive twice.
    assert copies(srv) == once(EMAILS)
    assert second.sent == len(EMAILS) - BATCH and second.resendable == 0 and second.for_operator == BATCH
    assert with_status(_ledger(app), "uncertain") == EMAILS[:BATCH]
    assert MAY_ARRIVE_TWICE in second.uncertain_hint()
    # What each batch went out through, recorded by its claim.
    via = _sent_via(app)
    assert via[0] == "postmark" and via[-1] == f"resend:{app.provider.key_space()}"
    # `digest status`: they need the operator (nothing resends them by itself).
    assert pipeline.status(app).resendable.get(1, 0) == 0
    app.close()


def test_another_resend_account_does_not_resend_the_first_accounts_batch(
        tmp_path: Path, db_url: str, clock: FrozenClock, srv: FakeProviderServer) -> None:
    install_resend(srv)
    app = _app(tmp_path, db_url, clock, _delivery("resend", srv), EMAILS)
    srv.faults.extend(LOST)
    first = send(app, [])
    assert first.uncertain == BATCH and first.resendable == BATCH and not first.finished
    app.close()
    # Another account (another team's keys): another fake server, which never saw the batch.
    with FakeProviderServer(token=TOKEN) as other:
        install_resend(other)
        app = _app(tmp_path, db_url, clock, _delivery("resend", other))
        second = send(app, [])
        assert not other.messages and second.resendable == 0 and second.for_operator == BATCH
        app.close()
    # Back on the first account within the key window, the operator asks for the resend: the
    # batch goes again under its key, which the first account recognises.
    app = _app(tmp_path, db_url, clock, _delivery("resend", srv))
    assert pipeline.resolve_uncertain(app, 1, "resend") == pipeline.Resolution(settled=0, kept=BATCH)
    third = send(app, [])
    assert third.finished and third.sent == BATCH
    assert copies(srv) == once(EMAILS) and with_status(_ledger(app), "sent") == EMAILS
    app.close()


def test_two_installations_on_one_resend_team_each_deliver_everyone_once(
        tmp_path: Path, db_url: str, other_db_url: str, clock: FrozenClock, srv: FakeProviderServer) -> None:
    install_resend(srv)
    others = [f"o{i:02d}@other.example" for i in range(len(EMAILS))]
    production = _app(tmp_path / "production", db_url, clock, _delivery("resend", srv), EMAILS)
    staging = _app(tmp_path / "staging", other_db_url, clock, _delivery("resend", srv), others,
                   newsletter={"public_url": "https://staging.example.org"})
    first, second = send(production, []), send(staging, [])
    # Both started at draft 1 with the same ledger ids; their keys differ all the same.
    assert [r[0] for r in production.store.ledger_rows(1)] == [r[0] for r in staging.store.ledger_rows(1)]
    for summary in (first, second):
        assert summary.finished and summary.sent == len(EMAILS) and summary.uncertain_total == 0
    assert copies(srv) == once(EMAILS + others)
    keys = [r.headers["idempotency-key"] for r in srv.requests]
    assert len(set(keys)) == len(keys) == 2 * len(EMAILS) // BATCH
    assert production.provider.key_space() != staging.provider.key_space()
    production.close()
    staging.close()


def test_resolving_resend_through_resend_keeps_the_batches_under_their_keys(
        tmp_path: Path, db_url: str, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """The reviewer's case: `digest status` said to resolve with resend; doing so put the
    batches back in the queue one by one, claimed in new groups under new keys: delivered twice."""
    install_resend(srv)
    app = _app(tmp_path, db_url, clock, _delivery("resend", srv), EMAILS)
    app.store.start_send(1, app.now())
    # f00 unsubscribes once the send has started: skipped at the claim (rule 2), so the first
    # batch is three readers and the batches no longer line up with the queue's grouping.
    gone = app.store.subscriber_by_email(EMAILS[0])
    assert gone is not None
    app.store.set_subscriber_status(gone.id, "unsubscribed", app.now())
    srv.faults.extend(LOST * 2)  # the first two batches: taken, answers lost
    first = send(app, [])
    assert first.uncertain == 7 and first.resendable == 7 and first.for_operator == 0
    resolved = pipeline.resolve_uncertain(app, 1, "resend")
    second = send(app, [])
    assert copies(srv) == once(EMAILS[1:])  # each batch again under its key: nobody twice
    assert second.finished and second.sent == 7
    assert with_status(_ledger(app), "sent") == EMAILS[1:] and _ledger(app)[EMAILS[0]] == "skipped"
    # Nothing went back in the queue: all seven were left to the send, under their keys.
    assert resolved == pipeline.Resolution(settled=0, kept=7)
    app.close()


def _config(root: Path, db_url: str, provider: str, srv: FakeProviderServer) -> str:
    from digest.sources.folder import SAMPLE_DIR

    cfg = root / "config.yaml"
    cfg.write_text(f"""
database: {{url: "{db_url}"}}
newsletter: {{public_url: https://news.example.org}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
digest: {{approval: {{required: false}}}}
delivery: {{provider: {provider}, api_key: {TOKEN}, base_url: "{srv.url}", batch_size: {BATCH}, concurrency: 1,
           max_retries: {RETRIES}, timeout: 2.0, rate_per_second: 1000}}
""", encoding="utf-8")
    return str(cfg)


def _cli_send(cfg: str) -> SendSummary:
    app = pipeline.App.open(load(cfg))
    try:
        return send(app, [])
    finally:
        app.close()


def test_status_and_resolving_tell_what_keeps_its_key_from_what_may_arrive_twice(
        tmp_path: Path, db_url: str, srv: FakeProviderServer) -> None:
    """One draft with both kinds: a Postmark batch left uncertain by an outage, and after the
    switch to Resend a Resend batch whose answer was lost. `digest status` says the second
    waits for the next send and the first needs the operator; `--resolve-uncertain resend`
    keeps the second under its key and warns that the first may arrive twice. (The wall
    clock throughout, as the CLI reads it.)"""
    _postmark_outage(tmp_path, db_url, wall_clock.now, srv).close()
    install_resend(srv)
    cfg = _config(tmp_path, db_url, "resend", srv)
    srv.faults.extend(LOST)  # Resend's first batch (the second of the draft): answer lost
    second = _cli_send(cfg)
    assert second.uncertain == BATCH and second.resendable == BATCH and second.for_operator == BATCH
    assert not second.finished  # kept in sending for the resend under the keys
    status = CliRunner().invoke(cli, ["--config", cfg, "status"])
    assert status.exit_code == 0, status.output
    assert "    8 uncertain:\n" in status.output
    assert ("      4 need nothing from you: the next `digest send` (or the service's next send) resends them "
            "under their idempotency keys (the provider delivers each once)\n") in status.output
    assert ("      4 need you: resolve with `digest send --resolve-uncertain resend|mark-sent --draft 1` "
            f"({MAY_ARRIVE_TWICE})\n") in status.output

    dry = CliRunner().invoke(cli, ["--config", cfg, "send", "--dry-run", "--resolve-uncertain", "resend"])
    assert "draft 1: 8 uncertain messages → resend (dry run: left as they are)" in dry.output
    assert "draft 1: 4 of them go out again exactly as they went, under their idempotency keys" in dry.output
    result = CliRunner().invoke(cli, ["--config", cfg, "send", "--resolve-uncertain", "resend"])
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "draft 1: 8 uncertain messages → resend" in result.output
    assert "draft 1: 4 of them go out again exactly as they went, under their idempotency keys" in result.output
    assert "note: 4 of them cannot keep their idempotency keys" in result.stderr
    assert "those of them that did arrive arrive twice" in result.stderr
    # The Resend batch went again under its key (Resend dropped it: one copy); the Postmark
    # batch, as the operator chose, went out again (its readers had it: two copies, as warned).
    received = copies(srv)
    assert {e for e, n in received.items() if n > 1} == set(EMAILS[:BATCH])
    assert all(received[e] == 1 for e in EMAILS[BATCH:])
    app = pipeline.App.open(load(cfg))
    assert with_status(_ledger(app), "sent") == EMAILS
    app.close()


def test_batches_uncertain_before_0011_wait_for_the_operator(
        tmp_path: Path, db_url: str, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """A database upgraded with an uncertain Resend batch: its keys were of the format before
    (no installation in them), and nothing says what it went through, so no send resends it by
    itself: under a new key Resend would deliver it again. It waits for the operator."""
    from alembic import command

    install_resend(srv)
    app = _app(tmp_path, db_url, clock, _delivery("resend", srv), EMAILS)
    srv.faults.extend(LOST)
    first = send(app, [])
    assert first.uncertain == BATCH and first.resendable == BATCH
    engine = app.store.engine
    # The database as 0010 had it: no sent_via, no installation id.
    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0010")
        conn.execute(text("DELETE FROM meta WHERE key = 'installation_id'"))
    app.close()
    engine = db.make_engine(db_url)
    assert db.upgrade(engine) == ("0010", db.HEAD)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT DISTINCT sent_via FROM send_batches")).all() == [(None,)]
        assert conn.execute(text("SELECT value FROM meta WHERE key = 'installation_id'")).scalar()
    engine.dispose()

    app = _app(tmp_path, db_url, clock, _delivery("resend", srv))
    assert pipeline.status(app).resendable == {1: 0}  # `digest status`: it needs the operator
    second = send(app, [])
    assert second.resendable == 0 and second.for_operator == BATCH and second.sent == 0
    assert copies(srv) == once(EMAILS)
    assert with_status(_ledger(app), "uncertain") == EMAILS[:BATCH]
    # The operator resends: back in the queue (a new key: those that arrived arrive again).
    assert pipeline.resolve_uncertain(app, 1, "resend") == pipeline.Resolution(settled=BATCH, kept=0)
    app.close()


def test_a_send_that_waits_for_the_operator_still_resends_its_uncertain_batches_under_their_keys(
        tmp_path: Path, db_url: str, clock: FrozenClock, srv: FakeProviderServer) -> None:
    """A batch left uncertain, then batches refused for good: the send waits for the operator.
    The next scheduled send claims nothing new, but resends the uncertain batch under its key
    (it reaches nobody new); waiting for the operator instead would let the key expire, and the
    batch would then need resend (maybe twice) or mark-sent (maybe never)."""
    install_resend(srv)
    app = _app(tmp_path, db_url, clock, _delivery("resend", srv), EMAILS)
    srv.faults.extend(LOST + [("status", 400), ("status", 400)])
    first = send(app, [])
    assert first.held and first.uncertain == BATCH and first.resendable == BATCH, first
    calls = len(srv.requests)
    clock.advance(hours=1)
    second = send(app, [])  # the scheduled send
    rows = _ledger(app)
    assert with_status(rows, "sent") == EMAILS[:BATCH] and not with_status(rows, "uncertain")
    assert with_status(rows, "failed") == EMAILS[BATCH:]  # not retried: they wait for --retry-failed
    assert len(srv.requests) == calls + 1 and copies(srv) == {e: 1 for e in EMAILS[:BATCH]}
    assert second.sent == BATCH and second.finished  # nothing else to send: the draft is done
    app.close()
