"""POST /webhooks/resend: Svix signatures (``v1,<base64>`` list), freshness, svix-id replays."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from digest import config, pipeline, subscribers
from digest.errors import ConfigError
from digest.web.app import create_app
from digest.web.webhooks import resend
from tests.conftest import FrozenClock, make_settings, reactivate, writes_refused

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks" / "resend"
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[pipeline.App]:
    a = pipeline.App.open(make_settings(tmp_path, db_url, webhooks={"resend_secret": SECRET}), clock)
    for email, name in pipeline.DEMO_SUBSCRIBERS:
        subscribers.add(a.store, email, name, clock())
    yield a
    a.close()


@pytest.fixture
def client(app: pipeline.App) -> FlaskClient:
    return create_app(app).test_client()


def svix_signature(key: bytes, msg_id: str, timestamp: str, raw: bytes) -> str:
    """Written out from Svix's docs, independently of the module under test."""
    digest = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + raw, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers_for(raw: bytes, clock: FrozenClock, *, msg_id: str = "msg_2ZbLk1Zx", age: int = 5,
                key: bytes = KEY) -> dict[str, str]:
    timestamp = str(int(clock().timestamp()) - age)
    return {"svix-id": msg_id, "svix-timestamp": timestamp,
            "svix-signature": svix_signature(key, msg_id, timestamp, raw)}


def post(client: FlaskClient, raw: bytes, headers: dict[str, str]) -> TestResponse:
    return client.post("/webhooks/resend", data=raw, content_type="application/json", headers=headers)


def send(client: FlaskClient, clock: FrozenClock, name: str, **kwargs: Any) -> TestResponse:
    raw = (DATA / name).read_bytes()
    return post(client, raw, headers_for(raw, clock, msg_id=f"msg_{name}", **kwargs))


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


def test_a_signed_bounce_suppresses_at_once(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    r = send(client, clock, "bounced.json")
    assert r.status_code == 200 and r.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == ["ben@example.org", "chloe@example.net"]


def test_a_bounce_echoing_the_named_to_suppresses_the_address(app: pipeline.App, client: FlaskClient,
                                                               clock: FrozenClock) -> None:
    """Our messages go to "Name <address>", and Resend reports the To as it was given."""
    draft_id = sending_draft(app)
    raw = (DATA / "bounced.json").read_bytes().replace(b'"ada@example.com"', b'"Ada Quill <ada@example.com>"')
    r = post(client, raw, headers_for(raw, clock))
    assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 1
    assert status_of(app, "ada@example.com") == "bounced"
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == ["ben@example.org", "chloe@example.net"]


def test_any_v1_entry_of_the_list_may_match(client: FlaskClient, clock: FrozenClock) -> None:
    raw = (DATA / "delivered.json").read_bytes()
    headers = headers_for(raw, clock)
    stale_secret = svix_signature(b"old-secret-during-rotation", headers["svix-id"], headers["svix-timestamp"], raw)
    headers["svix-signature"] = f"{stale_secret} {headers['svix-signature']}"
    assert post(client, raw, headers).status_code == 200


def test_a_wrong_signature_is_refused(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    raw = (DATA / "bounced.json").read_bytes()
    good = headers_for(raw, clock)
    attempts = [
        headers_for(raw, clock, key=b"another-secret-entirely"),
        headers_for(raw.replace(b"ada@", b"ben@"), clock),                      # signed another body
        good | {"svix-id": "msg_other"},                                        # id is signed too
        good | {"svix-signature": good["svix-signature"].replace("v1,", "v2,")},  # only v1 counts
        {k: v for k, v in good.items() if k != "svix-signature"},
        {k: v for k, v in good.items() if k != "svix-id"},
    ]
    for headers in attempts:
        assert post(client, raw, headers).status_code == 401, headers
    assert status_of(app, "ada@example.com") == "active" and app.store.event_counts() == {}


@pytest.mark.parametrize(("age", "expected"), [(300, 200), (301, 403), (-301, 403)])
def test_a_stale_timestamp_is_refused(client: FlaskClient, clock: FrozenClock, age: int, expected: int) -> None:
    assert send(client, clock, "bounced.json", age=age).status_code == expected


def test_a_retried_svix_id_is_a_duplicate(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Svix retries a message whose 2xx it did not get under the same svix-id, re-signed with a
    new timestamp, and disables an endpoint that keeps failing: the copy answers 200."""
    raw = (DATA / "bounced.json").read_bytes()
    headers = headers_for(raw, clock, msg_id="msg_replayed")
    assert post(client, raw, headers).status_code == 200
    duplicate = {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    with caplog.at_level(logging.INFO, logger="digest.web.app"):
        again = post(client, raw, headers)
    assert again.status_code == 200 and again.json == duplicate
    assert [r.levelno for r in caplog.records if "copy of a request" in r.getMessage()] == [logging.INFO]
    clock.advance(seconds=5)  # Svix's first retry, re-signed
    again = post(client, raw, headers_for(raw, clock, msg_id="msg_replayed"))
    assert again.status_code == 200 and again.json == duplicate
    assert app.store.event_counts() == {"hard_bounce": 1}


def test_a_retried_soft_bounce_counts_once(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    raw = (DATA / "bounced_transient.json").read_bytes()
    for _ in range(3):
        r = post(client, raw, headers_for(raw, clock, msg_id="msg_soft"))
        assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 0
        clock.advance(seconds=5)
    assert app.store.event_counts() == {"soft_bounce": 1}
    assert status_of(app, "ada@example.com") == "active"


def test_a_copy_of_a_bounce_after_the_reader_came_back_changes_nothing(app: pipeline.App, client: FlaskClient,
                                                                      clock: FrozenClock) -> None:
    """Svix retries under the same svix-id, re-signed: a copy of the bounce arriving after Ada
    was taken back is a duplicate and leaves her active."""
    raw = (DATA / "bounced.json").read_bytes()
    assert post(client, raw, headers_for(raw, clock, msg_id="msg_bounce")).json == {
        "received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    reactivate(app.store, "ada@example.com", clock())
    clock.advance(seconds=300)  # a later retry, re-signed under the same svix-id
    again = post(client, raw, headers_for(raw, clock, msg_id="msg_bounce"))
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert status_of(app, "ada@example.com") == "active"


def test_a_request_that_fails_halfway_is_applied_by_its_retry(app: pipeline.App, client: FlaskClient,
                                                              clock: FrozenClock) -> None:
    """Neither the svix-id nor the event is kept when applying fails, so Svix's retry applies it."""
    raw = (DATA / "bounced.json").read_bytes()
    with writes_refused(app.store):
        r = post(client, raw, headers_for(raw, clock, msg_id="msg_unfinished"))
    assert r.status_code == 503
    assert app.store.event_counts() == {} and status_of(app, "ada@example.com") == "active"
    clock.advance(seconds=5)
    retry = post(client, raw, headers_for(raw, clock, msg_id="msg_unfinished"))
    assert retry.status_code == 200
    assert retry.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"


def test_a_complaint_suppresses(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    assert send(client, clock, "complained.json").status_code == 200
    assert status_of(app, "ben@example.org") == "complained"
    assert_next_claim_skips(app, draft_id, "ben@example.org")


def test_an_audience_unsubscribe_is_honoured(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    draft_id = sending_draft(app)
    assert send(client, clock, "contact_unsubscribed.json").status_code == 200
    assert status_of(app, "chloe@example.net") == "unsubscribed"
    assert_next_claim_skips(app, draft_id, "chloe@example.net")


def test_a_transient_bounce_is_only_counted(app: pipeline.App, client: FlaskClient, clock: FrozenClock) -> None:
    assert send(client, clock, "bounced_transient.json").status_code == 200
    assert send(client, clock, "delivery_delayed.json").status_code == 200
    assert status_of(app, "ada@example.com") == "active"
    assert app.store.event_counts() == {"soft_bounce": 1, "deferred": 1}


def test_an_event_in_a_new_svix_message_is_applied_once(app: pipeline.App, client: FlaskClient,
                                                        clock: FrozenClock) -> None:
    raw = (DATA / "bounced.json").read_bytes()
    assert post(client, raw, headers_for(raw, clock, msg_id="msg_first")).status_code == 200
    clock.advance(seconds=60)
    again = post(client, raw, headers_for(raw, clock, msg_id="msg_second"))
    assert again.status_code == 200
    assert again.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    complaint = (DATA / "complained.json").read_bytes()
    assert post(client, complaint, headers_for(complaint, clock, msg_id="msg_c1")).status_code == 200
    again = post(client, complaint, headers_for(complaint, clock, msg_id="msg_c2"))
    assert again.status_code == 200 and again.json is not None and again.json["stored"] == 0
    assert app.store.event_counts() == {"hard_bounce": 1, "complaint": 1}


def test_a_soft_bounce_delivered_again_counts_once_toward_the_limit(app: pipeline.App, client: FlaskClient,
                                                                    clock: FrozenClock) -> None:
    raw = (DATA / "bounced_transient.json").read_bytes()
    for n in range(3):
        clock.advance(seconds=30)
        r = post(client, raw, headers_for(raw, clock, msg_id=f"msg_soft_{n}"))
        assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 0
    assert app.store.event_counts() == {"soft_bounce": 1}
    assert status_of(app, "ada@example.com") == "active"
    # Two bounces of her own (other emails of ours) make three: now she is suppressed.
    for n, suppressed in ((2, 0), (3, 1)):
        other = raw.replace(b"ff6fc54ce619", f"ff6fc54ce6{n:02d}".encode())
        r = post(client, other, headers_for(other, clock, msg_id=f"msg_other_{n}"))
        assert r.json is not None and r.json["suppressed"] == suppressed
    assert status_of(app, "ada@example.com") == "bounced"


def test_unparseable_but_signed_body_is_400(client: FlaskClient, clock: FrozenClock) -> None:
    for raw in (b"nope", b'{"type": "email.bounced"}'):
        assert post(client, raw, headers_for(raw, clock)).status_code == 400


def test_unconfigured_resend_refuses_everything(tmp_path: Path, clock: FrozenClock) -> None:
    a = pipeline.App.open(make_settings(tmp_path), clock)
    try:
        raw = (DATA / "bounced.json").read_bytes()
        r = post(create_app(a).test_client(), raw, headers_for(raw, clock))
        assert r.status_code == 403 and r.json == {"error": "resend webhooks are not configured"}
    finally:
        a.close()


def test_config_needs_a_whsec_secret() -> None:
    with pytest.raises(ConfigError, match=r"webhooks.resend_secret: must be the webhook signing secret"):
        config.from_dict({"webhooks": {"resend_secret": base64.b64encode(KEY).decode()}}, file="c.yaml")
    with pytest.raises(ConfigError, match=r"webhooks.resend_secret: the part after whsec_ is not base64"):
        config.from_dict({"webhooks": {"resend_secret": "whsec_%%%"}}, file="c.yaml")


def test_parse_normalizes_through_the_tables() -> None:
    def one(name: str) -> Any:
        (event,) = resend.parse((DATA / name).read_bytes())
        return event

    bounce = one("bounced.json")
    assert (bounce.event_type, bounce.email, bounce.ledger_id) == ("hard_bounce", "ada@example.com", 1)
    assert bounce.event_id == one("bounced.json").event_id  # stable across retries
    assert one("bounced_transient.json").event_type == "soft_bounce"
    assert one("complained.json").event_type == "complaint"
    assert one("delivered.json").event_type == "delivered"
    assert one("delivery_delayed.json").event_type == "deferred"
    assert one("contact_unsubscribed.json").event_type == "unsubscribe"
    assert resend.sign(SECRET, "m", "1", b"x") == svix_signature(KEY, "m", "1", b"x").removeprefix("v1,")
