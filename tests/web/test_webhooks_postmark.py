"""POST /webhooks/postmark: Basic auth, idempotent apply; plus the route's generic answers.

Postmark signs nothing and sends no timestamp, so there is no freshness check and no replay
key: a replayed event answers 200 and is applied once (its ``ID`` is unique in the store).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from digest import pipeline, subscribers
from digest.web.app import MAX_WEBHOOK_BYTES, create_app
from digest.web.webhooks import postmark
from tests.conftest import FrozenClock, make_settings

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks" / "postmark"
USER, PASSWORD = "postmark-hooks", "correct horse battery staple"
WEBHOOKS = {"postmark_username": USER, "postmark_password": PASSWORD}


def load(name: str, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((DATA / name).read_text())
    event.update(changes)
    return event


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[pipeline.App]:
    a = pipeline.App.open(make_settings(tmp_path, db_url, webhooks=WEBHOOKS), clock)
    for email, name in pipeline.DEMO_SUBSCRIBERS:
        subscribers.add(a.store, email, name, clock())
    yield a
    a.close()


@pytest.fixture
def client(app: pipeline.App) -> FlaskClient:
    return create_app(app).test_client()


def post(client: FlaskClient, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> TestResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/webhooks/postmark", data=raw, content_type="application/json",
                       headers=basic(USER, PASSWORD) if headers is None else headers)


def status_of(app: pipeline.App, email: str) -> str:
    sub = app.store.subscriber_by_email(email)
    assert sub is not None
    return sub.status


def sending_draft(app: pipeline.App) -> int:
    """A draft of the bundled sample, approved and sending: its ledger rows are pending."""
    pipeline.collect(app)
    draft = pipeline.make_draft(app).draft
    assert draft is not None and draft.id is not None
    pipeline.approve(app, draft.id)
    assert app.store.start_send(draft.id, app.now()) == 3
    return draft.id


def assert_next_claim_skips(app: pipeline.App, draft_id: int, email: str) -> None:
    """Rule 2: the very next claim of the send in progress skips ``email`` (as for a hard bounce)."""
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    others = sorted(e for e, _ in pipeline.DEMO_SUBSCRIBERS if e != email)
    assert sorted(c.recipient.email for c in claimed) == others
    assert (email, "skipped") in [(e, s) for _, e, s in app.store.ledger_rows(draft_id)]


def test_right_credentials_and_a_hard_bounce_suppresses_at_once(app: pipeline.App, client: FlaskClient) -> None:
    draft_id = sending_draft(app)
    r = post(client, load("hard_bounce.json"))
    assert r.status_code == 200
    assert r.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    # Rule 2: the very next claim of the send in progress skips her.
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == ["ben@example.org", "chloe@example.net"]
    assert ("ada@example.com", "skipped") in [(e, s) for _, e, s in app.store.ledger_rows(draft_id)]


@pytest.mark.parametrize("headers", [
    basic(USER, "wrong"),
    basic("someone", PASSWORD),
    basic(USER, PASSWORD + "x"),
    {},
    {"Authorization": "Bearer " + PASSWORD},
    {"Authorization": "Basic not-base64!"},
    {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},  # no colon
])
def test_wrong_or_missing_credentials_are_refused(app: pipeline.App, client: FlaskClient,
                                                  headers: dict[str, str]) -> None:
    r = post(client, load("hard_bounce.json"), headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert PASSWORD not in r.get_data(as_text=True)
    assert status_of(app, "ada@example.com") == "active"
    assert app.store.event_counts() == {}


def test_unconfigured_postmark_refuses_everything(tmp_path: Path, clock: FrozenClock,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    a = pipeline.App.open(make_settings(tmp_path), clock)
    subscribers.add(a.store, "ada@example.com", "Ada", clock())
    try:
        with caplog.at_level(logging.ERROR):
            r = post(create_app(a).test_client(), load("hard_bounce.json"), basic("", ""))
        assert r.status_code == 403 and r.json == {"error": "postmark webhooks are not configured"}
        assert "webhooks.postmark_username" in caplog.text and "refused" in caplog.text
        assert a.store.subscriber_by_email("ada@example.com").status == "active"  # type: ignore[union-attr]
    finally:
        a.close()


def test_a_replay_answers_200_and_is_applied_once(app: pipeline.App, client: FlaskClient) -> None:
    first = post(client, load("hard_bounce.json"))
    again = post(client, load("hard_bounce.json"))
    assert first.status_code == again.status_code == 200
    assert again.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert app.store.event_counts() == {"hard_bounce": 1}


def test_nothing_signed_means_no_staleness_check_an_old_event_is_applied_once(
        app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    # Postmark has no signed time: refusing by the event's own (unsigned) date would only lose
    # real bounces that Postmark retried after an outage, so old events are applied, once.
    clock.advance(days=400)
    assert post(client, load("hard_bounce.json")).status_code == 200
    assert post(client, load("hard_bounce.json")).json["duplicates"] == 1  # type: ignore[index]
    assert status_of(app, "ada@example.com") == "bounced"


def test_a_spam_complaint_suppresses(app: pipeline.App, client: FlaskClient) -> None:
    draft_id = sending_draft(app)
    assert post(client, load("spam_complaint.json")).status_code == 200
    assert status_of(app, "ben@example.org") == "complained"
    assert status_of(app, "ada@example.com") == "active"
    assert_next_claim_skips(app, draft_id, "ben@example.org")


def test_a_subscription_change_unsubscribes_and_a_reactivation_does_not_resubscribe(
        app: pipeline.App, client: FlaskClient) -> None:
    draft_id = sending_draft(app)
    assert post(client, load("subscription_change.json")).status_code == 200
    assert status_of(app, "chloe@example.net") == "unsubscribed"
    assert_next_claim_skips(app, draft_id, "chloe@example.net")
    assert post(client, load("reactivation.json")).status_code == 200
    assert status_of(app, "chloe@example.net") == "unsubscribed"


def test_soft_bounces_are_only_counted(app: pipeline.App, client: FlaskClient) -> None:
    for event_id in (1, 2):
        assert post(client, load("soft_bounce.json", ID=event_id)).status_code == 200
    assert status_of(app, "ada@example.com") == "active"
    assert app.store.event_counts() == {"soft_bounce": 2}
    assert app.store.subscriber_by_email("ada@example.com") is not None
    assert post(client, load("transient.json")).status_code == 200  # a delay is not a bounce at all
    assert status_of(app, "ada@example.com") == "active"


def test_the_third_soft_bounce_in_30_days_suppresses(app: pipeline.App, client: FlaskClient,
                                                    clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    post(client, load("soft_bounce.json", ID=1))
    post(client, load("soft_bounce.json", ID=2))
    clock.advance(days=31)  # those two fall out of the window
    post(client, load("soft_bounce.json", ID=3))
    post(client, load("soft_bounce.json", ID=4))
    assert status_of(app, "ada@example.com") == "active"
    r = post(client, load("soft_bounce.json", ID=5))
    assert r.json["suppressed"] == 1  # type: ignore[index]
    assert status_of(app, "ada@example.com") == "bounced"
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert "ada@example.com" not in [c.recipient.email for c in claimed]


def test_parse_normalizes_through_the_tables() -> None:
    def one(name: str) -> Any:
        (event,) = postmark.parse((DATA / name).read_bytes())
        return event

    bounce = one("hard_bounce.json")
    assert (bounce.event_type, bounce.email, bounce.ledger_id) == ("hard_bounce", "ada@example.com", 1)
    assert bounce.event_id == "Bounce:4323372036854775807"
    assert bounce.occurred_at is not None and bounce.occurred_at.isoformat().startswith("2026-11-26T08:59:30")
    assert one("soft_bounce.json").event_type == "soft_bounce"
    assert one("transient.json").event_type == "deferred"
    assert one("spam_complaint.json").event_type == "complaint"
    assert one("subscription_change.json").event_type == "unsubscribe"
    assert one("reactivation.json").event_type == "other"
    delivery = one("delivery.json")
    assert (delivery.event_type, delivery.email) == ("delivered", "ada@example.com")
    assert delivery.event_id.startswith("sha256:")  # Delivery records carry no ID of their own
    assert one("delivery.json").event_id == delivery.event_id


def test_unparseable_body_is_400(client: FlaskClient) -> None:
    assert post(client, b"{not json").status_code == 400
    assert post(client, b"[1, 2]").status_code == 400


def test_a_lone_surrogate_in_an_address_is_400_and_applies_nothing(app: pipeline.App, client: FlaskClient) -> None:
    # JSON can escape half a surrogate pair; the result is no text, and the database driver
    # refused it with a UnicodeEncodeError (a 500).
    raw = json.dumps(load("hard_bounce.json")).encode().replace(b'"Ada@Example.com"', b'"\\ud800ada@example.com"')
    assert b"\\ud800" in raw
    r = post(client, raw)
    assert r.status_code == 400 and r.json == {"error": "unparseable body"}
    assert app.store.event_counts() == {}
    assert status_of(app, "ada@example.com") == "active"


def test_unknown_provider_is_404_and_get_is_405(client: FlaskClient) -> None:
    assert client.post("/webhooks/pigeon", data=b"{}").status_code == 404
    assert client.get("/webhooks/postmark").status_code == 405
    assert client.get("/webhooks/pigeon").status_code == 405


def test_oversized_body_is_413(client: FlaskClient) -> None:
    r = client.post("/webhooks/postmark", data=b" " * (MAX_WEBHOOK_BYTES + 1), headers=basic(USER, PASSWORD))
    assert r.status_code == 413
