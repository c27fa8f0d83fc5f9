"""``digest send --dry-run``: the audience a send would freeze, each batch built as a send
would build it, nothing sent and nothing written. Every provider: the HTTP ones against the
fake server, SMTP against a real SMTP server (aiosmtpd), the outbox into a folder."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner

from digest import pipeline
from digest.cli import cli
from digest.delivery.sender import Sender, SendSummary
from digest.errors import BlockedError
from digest.store import Store
from digest.store.schema import metadata
from tests.conftest import FrozenClock, make_settings, past_validation
from tests.delivery.test_smtp import Handler, Server, start
from tests.fakes.provider_server import (
    FakeProviderServer,
    install_mailgun,
    install_resend,
    install_sendgrid,
    install_ses,
)

TOKEN = "dry-run-token"
DOMAIN = "mg.example.org"
ACTIVE = [f"r{i}@example.com" for i in range(5)]
UNSUBSCRIBED = "gone@example.com"
SUPPRESSED = "bounced@example.com"  # active, but bounced on an earlier list: suppressed
INVALID = "two words@example.com"  # no header can carry it

# delivery settings (Outlet.delivery adds where to) and the fake server's routes, per provider
# and path.
PROVIDERS: dict[str, tuple[dict[str, Any], Callable[[FakeProviderServer], None]]] = {
    "outbox": ({"provider": "outbox"}, lambda srv: None),
    "smtp": ({"provider": "smtp", "smtp_host": "127.0.0.1", "smtp_security": "none"}, lambda srv: None),
    "postmark": ({"provider": "postmark", "api_key": TOKEN}, lambda srv: None),
    # A dry run creates no server template either (it would be an object in the account).
    "postmark-templates": ({"provider": "postmark", "api_key": TOKEN, "postmark_templates": True},
                           lambda srv: None),
    "resend": ({"provider": "resend", "api_key": TOKEN}, install_resend),
    "sendgrid": ({"provider": "sendgrid", "api_key": TOKEN}, install_sendgrid),
    "sendgrid-full-bodies": ({"provider": "sendgrid", "api_key": TOKEN, "server_side_personalization": False},
                             install_sendgrid),
    "mailgun": ({"provider": "mailgun", "api_key": TOKEN, "domain": DOMAIN},
                lambda srv: install_mailgun(srv, DOMAIN)),
    "mailgun-full-bodies": ({"provider": "mailgun", "api_key": TOKEN, "domain": DOMAIN,
                             "server_side_personalization": False}, lambda srv: install_mailgun(srv, DOMAIN)),
    "ses": ({"provider": "ses", "region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE",
             "aws_secret_access_key": TOKEN}, lambda srv: install_ses(srv, secret_key=TOKEN)),
}


@pytest.fixture(params=sorted(PROVIDERS))
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def srv(provider: str) -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=TOKEN) as server:
        PROVIDERS[provider][1](server)
        yield server


@dataclass
class Outlet:
    """Where a send through the provider goes: the fake HTTP server, the outbox folder, or for
    SMTP a real server (aiosmtpd) on 127.0.0.1."""

    srv: FakeProviderServer
    outbox: Path
    smtp: Server | None

    def delivery(self, provider: str) -> dict[str, Any]:
        port = {"smtp_port": self.smtp.port} if self.smtp is not None else {}
        return {**PROVIDERS[provider][0], "base_url": self.srv.url, "outbox_dir": str(self.outbox), **port}

    def received(self) -> list[object]:
        """Everything that arrived: HTTP requests, SMTP messages, .eml files."""
        mails = self.smtp.handler.received if self.smtp is not None else []
        return [*self.srv.requests, *mails, *sorted(self.outbox.glob("**/*.eml"))]


@pytest.fixture
def outlet(provider: str, srv: FakeProviderServer, tmp_path: Path) -> Iterator[Outlet]:
    smtp = None
    if provider == "smtp":
        handler = Handler()
        smtp = Server(handler, start(handler))
    try:
        yield Outlet(srv, tmp_path / "outbox", smtp)
    finally:
        if smtp is not None:
            smtp.controller.stop()


def open_app(tmp_path: Path, clock: FrozenClock, provider: str, outlet: Outlet, db_url: str | None = None,
             extra: Sequence[str] = (), **newsletter: str) -> pipeline.App:
    """An app sending to ``outlet`` with an approved draft; its subscribers: ACTIVE and
    ``extra``, one who unsubscribed and one whose address is suppressed."""
    delivery = {**outlet.delivery(provider), "batch_size": 2, "timeout": 5, "rate_per_second": 1000,
                "max_retries": 0}
    settings = make_settings(tmp_path, db_url, delivery=delivery, digest={"approval": {"required": False}})
    # A From the config refuses at load (newsletter.from): the send still stops on it.
    settings = past_validation(settings, **{"from_" if k == "from" else k: v for k, v in newsletter.items()})
    app = pipeline.App.open(settings, clock)
    store = app.store
    store.suppress(SUPPRESSED, "hard_bounce", "postmark", clock())  # before the address came back
    store.upsert_subscribers([(e, f"Reader {i}") for i, e in enumerate([*ACTIVE, *extra, UNSUBSCRIBED,
                                                                        SUPPRESSED])], "cli", clock())
    gone = store.subscriber_by_email(UNSUBSCRIBED)
    assert gone is not None
    store.set_subscriber_status(gone.id, "unsubscribed", clock())
    pipeline.collect(app)
    outcome = pipeline.make_draft(app)
    assert outcome.draft is not None and outcome.draft.status == "approved"
    return app


def _no_connection(*args: object, **kwargs: object) -> None:
    raise AssertionError("a dry run connected to the SMTP server")


def dry_run(app: pipeline.App) -> SendSummary:
    """``digest send --dry-run``, with any SMTP connection an error: a dry run needs no server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smtplib.SMTP, "connect", _no_connection)  # SMTP_SSL's too
        (summary,) = pipeline.send(app, dry_run=True)
    return summary


def database(store: Store) -> dict[str, list[str]]:
    """Every row of every table, to tell whether anything was written."""
    with store.engine.connect() as conn:
        return {t.name: sorted(repr(tuple(r)) for r in conn.execute(t.select())) for t in metadata.sorted_tables}


def test_a_dry_run_counts_the_audience_a_send_freezes_and_sends_it_nothing(
        tmp_path: Path, clock: FrozenClock, db_url: str, provider: str, outlet: Outlet) -> None:
    app = open_app(tmp_path, clock, provider, outlet, db_url)
    try:
        before = database(app.store)
        with responses.RequestsMock() as mocked:  # any HTTP request would fail the run
            summary = dry_run(app)
            assert len(mocked.calls) == 0
        assert summary.dry_run and summary.sent == 5 and not summary.failed and summary.batches == 3
        # The calls the send makes, paced by delivery.rate_per_second: one a batch, or one a
        # message where a batch is several calls (SES, and full bodies to SendGrid and Mailgun).
        per_message = provider in ("ses", "sendgrid-full-bodies", "mailgun-full-bodies")
        assert summary.calls == (5 if per_message else 3)
        assert outlet.received() == []
        assert database(app.store) == before  # no ledger, no batch, no status change, nothing
        (draft_id,) = app.store.due_drafts(app.now())
        assert app.store.get_draft(draft_id).status == "approved" and app.store.ledger_counts(draft_id) == {}
        # The send it rehearsed: the same readers, the same count.
        (real,) = pipeline.send(app)
        assert real.finished and (real.sent, real.failed) == (summary.sent, summary.failed)
        assert {email for _id, email, _status in app.store.ledger_rows(draft_id)} == set(ACTIVE)
        assert outlet.received()  # and it did go there
    finally:
        app.close()


def test_a_dry_run_reports_an_address_the_provider_would_refuse(
        tmp_path: Path, clock: FrozenClock, provider: str, outlet: Outlet) -> None:
    app = open_app(tmp_path, clock, provider, outlet, extra=[INVALID])
    try:
        summary = dry_run(app)
        assert summary.sent == 5 and summary.failed == {"invalid": 1}
        assert outlet.received() == []
        (real,) = pipeline.send(app)
        assert (real.sent, real.failed) == (summary.sent, summary.failed)
        assert {email: status for _id, email, status in app.store.ledger_rows(real.draft_id)}[INVALID] == "invalid"
    finally:
        app.close()


def test_a_bad_from_address_fails_the_dry_run_and_stops_the_send_with_nobody_failed(
        tmp_path: Path, clock: FrozenClock, provider: str, outlet: Outlet) -> None:
    app = open_app(tmp_path, clock, provider, outlet, **{"from": "not an address"})
    try:
        before = database(app.store)
        with pytest.raises(BlockedError, match="(?i)bad (from|address)") as info:
            dry_run(app)
        assert "'not'" in str(info.value) and "newsletter.from" in str(info.value)  # what, and what to fix
        assert outlet.received() == [] and database(app.store) == before
        # The send it rehearsed stops with the same error before anything goes out, its batch
        # back in the queue: no reader failed for a mistake in the configuration.
        (real,) = pipeline.send(app)
        assert real.blocked and real.sent == 0 and not real.failed
        assert str(info.value) in (real.stopped or "")
        assert outlet.received() == [] and app.store.ledger_counts(real.draft_id) == {"pending": 5}
    finally:
        app.close()


def test_the_cli_prints_a_bad_from_address_as_one_line(tmp_path: Path, clock: FrozenClock) -> None:
    """Refused as the config loads, before any command reaches the send."""
    from digest.sources.folder import SAMPLE_DIR

    with FakeProviderServer(token=TOKEN) as srv:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"""
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
newsletter: {{public_url: "https://news.example.org", from: "Field Notes <digest@>"}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
digest: {{approval: {{required: false}}}}
delivery: {{provider: postmark, api_key: "{TOKEN}", base_url: "{srv.url}"}}
""", encoding="utf-8")
        result = CliRunner().invoke(cli, ["--config", str(cfg), "send", "--dry-run"])
        assert srv.requests == []
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"error: {cfg}: newsletter.from: 'Field Notes <digest@>' is not an address a send can use (not an email "
        "address: 'Field Notes <digest@>'): write one such as \"Field Notes <digest@example.org>\""]


def _outbox_app(tmp_path: Path, clock: FrozenClock) -> pipeline.App:
    """The embedded defaults (the outbox) in batches of 2, with ACTIVE and an approved draft."""
    settings = make_settings(tmp_path, delivery={"batch_size": 2}, digest={"approval": {"required": False}})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([(e, "") for e in ACTIVE], "cli", clock())
    pipeline.collect(app)
    pipeline.make_draft(app)
    return app


def test_a_dry_run_reads_the_audience_as_it_goes(tmp_path: Path, clock: FrozenClock,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch in memory at a time: the next readers are read only once a batch is built."""
    app = _outbox_app(tmp_path, clock)
    try:
        read: list[str] = []
        audience = app.store.audience

        def counted() -> Iterator[Any]:
            for sub in audience():
                read.append(sub.email)
                yield sub

        seen: list[int] = []
        build = Sender._dry_batch

        def spy(self: Sender, summary: SendSummary, batch: Any) -> None:
            seen.append(len(read))
            build(self, summary, batch)

        monkeypatch.setattr(app.store, "audience", counted)
        monkeypatch.setattr(Sender, "_dry_batch", spy)
        summary = dry_run(app)
        assert summary.sent == 5 and seen == [2, 4, 5]
        assert not list((tmp_path / "outbox").glob("**/*.eml"))  # the outbox wrote nothing
    finally:
        app.close()


def test_a_dry_run_asked_to_stop_ends_after_the_batch_it_builds(tmp_path: Path, clock: FrozenClock) -> None:
    """Ctrl-C during a long dry run ends it after the batch being built, with the counts so
    far said to be partial (it went on to the end, saying it would stop)."""
    app = _outbox_app(tmp_path, clock)
    try:
        built: list[int] = []
        (summary,) = pipeline.send(app, dry_run=True, should_stop=lambda: bool(built),
                                   on_batch=lambda s, size: built.append(size))
        assert summary.sent == 2 and summary.batches == 1
        assert summary.stopped is not None and "so far" in summary.stopped
    finally:
        app.close()
