"""`digest subscribers reactivate` through click's runner, on SQLite and (with
DIGEST_TEST_POSTGRES_URL) PostgreSQL: a reader taken back after a bounce, and the readers who
cannot be."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from digest import pipeline
from digest.types import DeliveryEvent
from tests.conftest import NOW, FrozenClock, make_settings
from tests.test_cli import invoke


@pytest.fixture
def cfg(tmp_path: Path, db_url: str) -> str:
    from digest.sources.folder import SAMPLE_DIR

    path = tmp_path / "config.yaml"
    path.write_text(f"""
database: {{url: "{db_url}"}}
newsletter: {{public_url: https://news.example.org}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
delivery: {{provider: outbox, outbox_dir: "{tmp_path / 'out'}"}}
""", encoding="utf-8")
    for email, name in (("ann@example.com", "Ann"), ("bo@example.org", "Bo")):
        assert invoke("--config", str(path), "subscribers", "add", email, "--name", name)[0] == 0
    return str(path)


@pytest.fixture
def app(tmp_path: Path, db_url: str, cfg: str) -> Iterator[pipeline.App]:
    """The same database as the commands', as the service that takes the webhooks sees it; its
    clock an hour behind the real one, which `digest subscribers reactivate` reads."""
    a = pipeline.App.open(make_settings(tmp_path, db_url), FrozenClock(datetime.now(UTC) - timedelta(hours=1)))
    yield a
    a.close()


def webhook(app: pipeline.App, event_id: str, event_type: str, email: str = "ann@example.com") -> tuple[str, ...]:
    """A provider's webhook bringing one event, at the app's time."""
    event = DeliveryEvent("sendgrid", event_id, event_type, email, app.now())
    return pipeline.apply_events(app, "sendgrid", [event]).suppressed


def status(app: pipeline.App, email: str = "ann@example.com") -> str:
    sub = app.store.subscriber_by_email(email)
    assert sub is not None
    return sub.status


def test_a_hard_bounced_reader_taken_back_gets_the_next_send(cfg: str, tmp_path: Path, app: pipeline.App) -> None:
    app.store.suppress("ann@example.com", "hard_bounce", "postmark", NOW)
    code, out = invoke("--config", cfg, "subscribers", "list", "--status", "bounced")
    assert code == 0 and out == "ann@example.com\tAnn\tbounced\n1 subscribers\n"
    for step in (["collect"], ["draft"], ["approve", "1"]):
        assert invoke("--config", cfg, *step)[0] == 0
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "Ann@Example.com")
    assert (code, out) == (0, "reactivated ann@example.com (was bounced: hard bounce on 2026-11-26)\n")
    code, out = invoke("--config", cfg, "send")
    assert code == 0 and "sent 2 in 1 batch," in out
    sent = sorted(p.read_text() for p in (tmp_path / "out" / "1").glob("*.eml"))
    assert len(sent) == 2 and any("To: Ann <ann@example.com>" in eml for eml in sent)
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "ann@example.com")
    assert (code, out) == (1, "error: ann@example.com is active and not suppressed (there is nothing to reactivate)\n")


@pytest.mark.parametrize(("event_type", "said_no"), [("complaint", "complained"), ("unsubscribe", "unsubscribed")])
def test_a_reader_who_complained_or_unsubscribed_is_refused(cfg: str, app: pipeline.App, event_type: str,
                                                            said_no: str) -> None:
    assert webhook(app, "sg-1", event_type) == ("ann@example.com",)
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "ann@example.com")
    assert (code, out) == (1, f"error: ann@example.com is {said_no} and will not be reactivated "
                              "(only the reader can subscribe again)\n")
    assert status(app) == said_no


def test_unknown_and_removed_addresses_are_refused(cfg: str) -> None:
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "nobody@example.com")
    assert (code, out) == (1, "error: nobody@example.com is neither a subscriber nor suppressed "
                              "(check the address: `digest subscribers list` lists them)\n")
    assert invoke("--config", cfg, "subscribers", "remove", "bo@example.org")[0] == 0
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "bo@example.org")
    assert (code, out) == (1, "error: bo@example.org was removed and will not be reactivated "
                              "(`digest subscribers add` takes it back)\n")


def test_soft_bounces_count_again_from_zero_and_a_bounce_suppresses_again(cfg: str, app: pipeline.App) -> None:
    assert [webhook(app, f"soft-{i}", "soft_bounce") for i in range(3)] == [(), (), ("ann@example.com",)]
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "ann@example.com")
    assert code == 0 and out.startswith("reactivated ann@example.com (was bounced: too many soft bounces on ")
    app.now.advance(hours=2)  # type: ignore[attr-defined]  # after the reactivation
    assert [webhook(app, f"soft-{i}", "soft_bounce") for i in range(3, 5)] == [(), ()]
    assert status(app) == "active"
    assert webhook(app, "sg-1", "hard_bounce") == ("ann@example.com",)
    assert status(app) == "bounced"
    code, out = invoke("--config", cfg, "subscribers", "list", "--status", "bounced")
    assert out.startswith("ann@example.com\tAnn\tbounced\n")
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "ann@example.com")
    assert code == 0 and out.startswith("reactivated ann@example.com (was bounced: hard bounce on ")


def test_what_a_provider_refused_or_an_address_not_subscribed_says(cfg: str, app: pipeline.App) -> None:
    app.store.suppress("bo@example.org", "provider_suppressed", "postmark", NOW)
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "bo@example.org")
    assert code == 1 and out.count("\n") == 1 and "--provider-cleared" in out and "complaint" in out
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "--provider-cleared", "bo@example.org")
    assert (code, out) == (0, "reactivated bo@example.org (was bounced: refused by postmark on 2026-11-26)\n")
    app.store.suppress("new@example.com", "hard_bounce", "sendgrid", NOW)
    code, out = invoke("--config", cfg, "subscribers", "reactivate", "new@example.com")
    assert (code, out) == (0, "reactivated new@example.com (was suppressed: hard bounce on 2026-11-26); "
                              "not a subscriber: `digest subscribers add` subscribes it\n")
