"""POST /webhooks/mailgun: HMAC-SHA256 over timestamp + token, freshness, token replays."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from digest import pipeline, subscribers
from digest.web.app import create_app
from digest.web.webhooks import mailgun
from tests.conftest import FrozenClock, make_settings, reactivate, writes_refused

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks" / "mailgun"
SIGNING_KEY = "whk-0123456789abcdef0123456789abcdef"


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[pipeline.App]:
    a = pipeline.App.open(make_settings(tmp_path, db_url, webhooks={"mailgun_signing_key": SIGNING_KEY}), clock)
    for email, name in pipeline.DEMO_SUBSCRIBERS:
        subscribers.add(a.store, email, name, clock())
    yield a
    a.close()


@pytest.fixture
def client(app: pipeline.App) -> FlaskClient:
    return create_app(app).test_client()


def signed(name: str, clock: FrozenClock, *, age: int = 5, token: str | None = None,
           key: str = SIGNING_KEY) -> dict[str, Any]:
    """A saved payload with a fresh signature block, the way Mailgun signs it."""
    body: dict[str, Any] = json.loads((DATA / name).read_text())
    timestamp = str(int(clock().timestamp()) - age)
    token = token or secrets.token_hex(25)  # Mailgun's tokens are 50 random characters
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    body["signature"] = {"timestamp": timestamp, "token": token, "signature": signature}
    return body


def post(client: FlaskClient, body: dict[str, Any] | bytes) -> TestResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/webhooks/mailgun", data=raw, content_type="application/json")


def status_of(app: pipeline.App, email: str) -> str:
    sub = app.store.subscriber_by_email(email)
    assert sub is not None
    return sub.status


def sending_draft(app: pipeline.App) -> int:
    pipeline.collect(app)
    draft = pipeline.make_draft(app).draft
    assert draft is not None and draft.id is not None
    pipeline.approve(app, draft.id)
    app.store.start_send(draft.id, app.now())
    return draft.id


def assert_next_claim_skips(app: pipeline.App, draft_id: int, email: str) -> None:
    """Rule 2: the very next claim of the send in progress skips ``email`` (as for a hard bounce)."""
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    others = sorted(e for e, _ in pipeline.DEMO_SUBSCRIBERS if e != email)
    assert sorted(c.recipient.email for c in claimed) == others
    assert (email, "skipped") in [(e, s) for _, e, s in app.store.ledger_rows(draft_id)]


def test_a_signed_permanent_failure_suppresses_at_once(app: pipeline.App, client: FlaskClient,
                                                       clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    r = post(client, signed("failed_permanent.json", clock))
    assert r.status_code == 200 and r.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == ["ben@example.org", "chloe@example.net"]


def test_a_wrong_signature_is_refused(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    wrong_key = signed("failed_permanent.json", clock, key="the-api-key-not-the-signing-key")
    tampered = signed("failed_permanent.json", clock)
    tampered["signature"]["token"] = tampered["signature"]["token"][::-1]
    unsigned = json.loads((DATA / "failed_permanent.json").read_text())
    unsigned.pop("signature")
    for body in (wrong_key, tampered, unsigned):
        assert post(client, body).status_code == 401
    assert status_of(app, "ada@example.com") == "active" and app.store.event_counts() == {}


HOUR = 3600


@pytest.mark.parametrize(("age", "expected"), [(HOUR - 1, 200), (HOUR + 1, 403), (-HOUR - 1, 403)])
def test_a_stale_timestamp_is_refused(client: FlaskClient, clock: FrozenClock, age: int, expected: int) -> None:
    """An hour (webhooks.mailgun_max_age), not five minutes: Mailgun's retries keep the first
    attempt's signature and timestamp."""
    r = post(client, signed("failed_permanent.json", clock, age=age))
    assert r.status_code == expected


def test_a_retry_after_a_failed_answer_is_applied(app: pipeline.App, client: FlaskClient,
                                                        clock: FrozenClock) -> None:
    """This endpoint answered 503 (a restart): Mailgun's third retry, half an hour later under
    the first signature, still suppresses the reader; and the token it used is still
    remembered, so the signature cannot be stapled to another event."""
    body = signed("failed_permanent.json", clock)
    clock.advance(minutes=30)
    assert post(client, body).status_code == 200
    assert status_of(app, "ada@example.com") == "bounced"
    other = json.loads(json.dumps(body))
    other["event-data"]["recipient"] = "ben@example.org"
    clock.advance(minutes=25)
    assert post(client, other).status_code == 406
    assert status_of(app, "ben@example.org") == "active"


def test_mailgun_max_age_sets_its_window(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, webhooks={"mailgun_signing_key": SIGNING_KEY, "max_age": 7200,
                                                 "mailgun_max_age": 300})
    a = pipeline.App.open(settings, clock)
    try:
        c = create_app(a).test_client()
        assert post(c, signed("failed_permanent.json", clock, age=301)).status_code == 403
        assert post(c, signed("failed_permanent.json", clock, age=299)).status_code == 200
    finally:
        a.close()


def test_a_replayed_token_is_a_duplicate_only_on_the_same_body(app: pipeline.App, client: FlaskClient,
                                                               clock: FrozenClock,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    body = signed("failed_permanent.json", clock)
    assert post(client, body).status_code == 200
    # Mailgun retrying after our answer was lost: the same token on the same body.
    with caplog.at_level(logging.INFO, logger="digest.web.app"):
        again = post(client, body)
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert [r.levelno for r in caplog.records if "copy of a request" in r.getMessage()] == [logging.INFO]
    # Re-serialized (other spacing and key order) it is still the same body.
    respaced = json.dumps(body, indent=2, sort_keys=True).encode()
    assert post(client, respaced).json == again.json
    # The signature covers only timestamp + token, so a captured one stapled onto a forged
    # event is stopped by the token memory: 406, which tells Mailgun not to retry.
    forged = signed("unsubscribed.json", clock)
    forged["signature"] = body["signature"]
    r = post(client, forged)
    assert r.status_code == 406 and r.json == {"error": "replayed signature on a different body"}
    tweaked = json.loads(json.dumps(body))
    tweaked["event-data"]["recipient"] = "chloe@example.net"
    assert post(client, tweaked).status_code == 406
    assert status_of(app, "chloe@example.net") == "active"
    assert app.store.event_counts() == {"hard_bounce": 1}
    # The first body stays the one remembered: its copies are still duplicates.
    assert post(client, body).status_code == 200


def test_a_copy_applies_nothing_and_keeps_the_first_body_remembered(app: pipeline.App, client: FlaskClient,
                                                                     clock: FrozenClock) -> None:
    """A copy of a request already applied touches nothing (even with the database refusing
    writes it is answered 200), and the token stays taken: a captured signature on a forged
    body is still refused."""
    body = signed("failed_permanent.json", clock)
    assert post(client, body).status_code == 200
    with writes_refused(app.store):
        again = post(client, body)
    assert again.status_code == 200 and again.json is not None and again.json["duplicate"] is True
    forged = signed("unsubscribed.json", clock)
    forged["signature"] = body["signature"]
    assert post(client, forged).status_code == 406
    assert status_of(app, "chloe@example.net") == "active"


def test_a_copy_of_a_bounce_after_the_reader_came_back_changes_nothing(app: pipeline.App, client: FlaskClient,
                                                                      clock: FrozenClock) -> None:
    """Mailgun retries with the first attempt's token and signature, for an hour: a copy of the
    bounce arriving after Ada was taken back is a duplicate and leaves her active."""
    body = signed("failed_permanent.json", clock)
    assert post(client, body).json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    reactivate(app.store, "ada@example.com", clock())
    clock.advance(minutes=15)  # a later retry, with the first attempt's token and signature
    again = post(client, body)
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert status_of(app, "ada@example.com") == "active"
    assert [s.email for s in app.store.audience()].count("ada@example.com") == 1


def test_an_event_not_applied_lets_the_retry_in(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    """The database fails halfway: neither the token nor the event is kept, so Mailgun's retry
    (the same token and body) is applied, not answered as a duplicate."""
    body = signed("failed_permanent.json", clock)
    with writes_refused(app.store):
        r = post(client, body)
    assert r.status_code == 503
    assert app.store.event_counts() == {} and status_of(app, "ada@example.com") == "active"
    clock.advance(minutes=5)  # Mailgun retries with the same token and signature
    retry = post(client, body)
    assert retry.status_code == 200
    assert retry.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"


def test_a_complaint_suppresses(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    assert post(client, signed("complained.json", clock)).status_code == 200
    assert status_of(app, "ben@example.org") == "complained"
    assert_next_claim_skips(app, draft_id, "ben@example.org")


def test_an_unsubscribe_is_honoured(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    assert post(client, signed("unsubscribed.json", clock)).status_code == 200
    assert status_of(app, "chloe@example.net") == "unsubscribed"
    assert_next_claim_skips(app, draft_id, "chloe@example.net")


def test_temporary_failures_are_delays_and_giving_up_is_a_counted_soft_bounce(
        app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    assert post(client, signed("failed_temporary.json", clock)).status_code == 200
    assert post(client, signed("failed_old.json", clock)).status_code == 200
    assert status_of(app, "ada@example.com") == "active"
    assert app.store.event_counts() == {"deferred": 1, "soft_bounce": 1}


def test_an_event_in_a_new_signed_request_is_applied_once(app: pipeline.App, client: FlaskClient,
                                                          clock: FrozenClock) -> None:
    assert post(client, signed("failed_permanent.json", clock)).status_code == 200
    clock.advance(seconds=60)
    again = post(client, signed("failed_permanent.json", clock))  # a new token and timestamp
    assert again.status_code == 200
    assert again.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert post(client, signed("complained.json", clock)).status_code == 200
    again = post(client, signed("complained.json", clock))
    assert again.status_code == 200 and again.json is not None and again.json["stored"] == 0
    assert app.store.event_counts() == {"hard_bounce": 1, "complaint": 1}


def test_a_soft_bounce_delivered_again_counts_once_toward_the_limit(app: pipeline.App, client: FlaskClient,
                                                                    clock: FrozenClock) -> None:
    for _ in range(3):
        clock.advance(seconds=30)
        r = post(client, signed("failed_old.json", clock))
        assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 0
    assert app.store.event_counts() == {"soft_bounce": 1}
    assert status_of(app, "ada@example.com") == "active"
    # Two soft bounces of her own (new Mailgun event ids) make three: now she is suppressed.
    for n, suppressed in ((2, 0), (3, 1)):
        body = signed("failed_old.json", clock)
        body["event-data"]["id"] = f"Ht8-6u92T3nt-6Jh5I2Ks{n}"
        r = post(client, body)
        assert r.json is not None and r.json["suppressed"] == suppressed
    assert status_of(app, "ada@example.com") == "bounced"


def test_legacy_form_posts_and_garbage_are_400(client: FlaskClient) -> None:
    r = client.post("/webhooks/mailgun", data={"timestamp": "1", "token": "t", "signature": "s", "event": "bounced"})
    assert r.status_code == 400
    assert post(client, b"\xff\xfe").status_code == 400
    assert post(client, b"[" * 100_000).status_code == 400  # nested too deep to parse: no 500


def test_unconfigured_mailgun_refuses_everything(tmp_path: Path, clock: FrozenClock) -> None:
    a = pipeline.App.open(make_settings(tmp_path), clock)
    try:
        r = post(create_app(a).test_client(), signed("failed_permanent.json", clock))
        assert r.status_code == 403 and r.json == {"error": "mailgun webhooks are not configured"}
    finally:
        a.close()


def test_parse_normalizes_through_the_tables() -> None:
    def one(name: str) -> Any:
        (event,) = mailgun.parse((DATA / name).read_bytes())
        return event

    bounce = one("failed_permanent.json")
    assert (bounce.event_type, bounce.email, bounce.event_id, bounce.ledger_id) == (
        "hard_bounce", "ada@example.com", "G9Bn5sl1TC6nu79C8C0bwg@1795683570.25", 1)
    # Mailgun's ids are unique within a day: the same id a day later is another event.
    later = json.loads((DATA / "failed_permanent.json").read_bytes())
    later["event-data"]["timestamp"] += 86_400
    (next_day,) = mailgun.parse(json.dumps(later).encode())
    assert next_day.event_id != bounce.event_id
    assert bounce.detail["code"] == "550" and bounce.occurred_at is not None
    assert one("failed_temporary.json").event_type == "deferred"
    assert one("failed_old.json").event_type == "soft_bounce"
    assert one("complained.json").event_type == "complaint"
    assert one("unsubscribed.json").event_type == "unsubscribe"
    assert one("delivered.json").event_type == "delivered"
