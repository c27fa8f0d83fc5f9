"""POST /webhooks/sendgrid: ECDSA P-256 over timestamp + raw body, freshness, replays.

A key pair is generated here and the payloads are signed the way SendGrid documents it.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from digest import config, pipeline, subscribers
from digest.errors import ConfigError
from digest.store.schema import delivery_events
from digest.web.app import create_app
from digest.web.webhooks import sendgrid
from tests.conftest import FrozenClock, make_settings, reactivate, writes_refused

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks" / "sendgrid"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def public_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock, key: ec.EllipticCurvePrivateKey) -> Iterator[pipeline.App]:
    settings = make_settings(tmp_path, db_url, webhooks={"sendgrid_public_key": public_b64(key)})
    a = pipeline.App.open(settings, clock)
    for email, name in pipeline.DEMO_SUBSCRIBERS:
        subscribers.add(a.store, email, name, clock())
    yield a
    a.close()


@pytest.fixture
def client(app: pipeline.App) -> FlaskClient:
    return create_app(app).test_client()


def signed_headers(key: ec.EllipticCurvePrivateKey, timestamp: str, raw: bytes) -> dict[str, str]:
    signature = key.sign(timestamp.encode() + raw, ec.ECDSA(hashes.SHA256()))
    return {sendgrid.SIGNATURE_HEADER: base64.b64encode(signature).decode(), sendgrid.TIMESTAMP_HEADER: timestamp}


def post(client: FlaskClient, raw: bytes, headers: dict[str, str]) -> TestResponse:
    return client.post("/webhooks/sendgrid", data=raw, content_type="application/json", headers=headers)


def send(client: FlaskClient, key: ec.EllipticCurvePrivateKey, clock: FrozenClock, name: str,
         *, age: int = 5) -> TestResponse:
    """Post a saved payload signed ``age`` seconds ago."""
    raw = (DATA / name).read_bytes()
    timestamp = str(int(clock().timestamp()) - age)
    return post(client, raw, signed_headers(key, timestamp, raw))


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


def test_a_signed_hard_bounce_suppresses_at_once(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                                 key: ec.EllipticCurvePrivateKey) -> None:
    draft_id = sending_draft(app)
    r = send(client, key, clock, "hard_bounce.json")
    assert r.status_code == 200 and r.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == ["ben@example.org", "chloe@example.net"]


def test_a_wrong_signature_is_refused(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                      key: ec.EllipticCurvePrivateKey) -> None:
    raw = (DATA / "hard_bounce.json").read_bytes()
    ts = str(int(clock().timestamp()))
    other = ec.generate_private_key(ec.SECP256R1())
    attempts = [
        signed_headers(other, ts, raw),                                         # someone else's key
        signed_headers(key, ts, raw.replace(b"ada@", b"ben@")),                  # signed another body
        signed_headers(key, str(int(ts) - 1), raw) | {sendgrid.TIMESTAMP_HEADER: ts},  # another time
        {sendgrid.TIMESTAMP_HEADER: ts},                                        # no signature
        {sendgrid.SIGNATURE_HEADER: signed_headers(key, ts, raw)[sendgrid.SIGNATURE_HEADER]},  # no time
        {sendgrid.SIGNATURE_HEADER: "%%%", sendgrid.TIMESTAMP_HEADER: ts},
    ]
    for headers in attempts:
        r = post(client, raw, headers)
        assert r.status_code == 401, headers
    assert status_of(app, "ada@example.com") == "active" and app.store.event_counts() == {}


@pytest.mark.parametrize(("age", "expected"), [(300, 200), (301, 403), (-301, 403), (3600, 403)])
def test_stale_and_future_timestamps_are_refused(client: FlaskClient, clock: FrozenClock,
                                                 key: ec.EllipticCurvePrivateKey, age: int, expected: int) -> None:
    r = send(client, key, clock, "hard_bounce.json", age=age)
    assert r.status_code == expected
    if expected == 403:
        assert r.json == {"error": "stale timestamp"}


def test_a_replay_is_a_duplicate_even_with_a_rewritten_signature(app: pipeline.App, client: FlaskClient,
                                                                  clock: FrozenClock,
                                                                  key: ec.EllipticCurvePrivateKey,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """SendGrid retries a POST whose 2xx it did not get: the copy is the same signed bytes,
    so it answers 200 (a 403 would only make SendGrid retry again) and applies nothing twice."""
    raw = (DATA / "hard_bounce.json").read_bytes()
    headers = signed_headers(key, str(int(clock().timestamp())), raw)
    assert post(client, raw, headers).status_code == 200
    with caplog.at_level(logging.INFO, logger="digest.web.app"):
        again = post(client, raw, headers)
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert [r.levelno for r in caplog.records if "copy of a request" in r.getMessage()] == [logging.INFO]
    # ECDSA is malleable: (r, n - s) verifies too, so the replay key is the signed bytes.
    r_value, s_value = decode_dss_signature(base64.b64decode(headers[sendgrid.SIGNATURE_HEADER]))
    malleated = encode_dss_signature(r_value, P256_ORDER - s_value)
    twin = headers | {sendgrid.SIGNATURE_HEADER: base64.b64encode(malleated).decode()}
    r = post(client, raw, twin)
    assert r.status_code == 200 and r.json is not None and r.json["duplicate"] is True
    assert app.store.event_counts() == {"hard_bounce": 1}
    # Once the memory lapses the copy is stale anyway.
    clock.advance(seconds=601)
    assert post(client, raw, headers).json == {"error": "stale timestamp"}


def test_a_spam_report_suppresses(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                  key: ec.EllipticCurvePrivateKey) -> None:
    draft_id = sending_draft(app)
    assert send(client, key, clock, "spamreport.json").status_code == 200
    assert status_of(app, "ben@example.org") == "complained"
    assert_next_claim_skips(app, draft_id, "ben@example.org")


def test_an_unsubscribe_is_honoured(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                    key: ec.EllipticCurvePrivateKey) -> None:
    draft_id = sending_draft(app)
    assert send(client, key, clock, "unsubscribe.json").status_code == 200
    assert status_of(app, "chloe@example.net") == "unsubscribed"
    assert_next_claim_skips(app, draft_id, "chloe@example.net")


def test_a_block_is_a_soft_bounce_only_counted(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                               key: ec.EllipticCurvePrivateKey) -> None:
    assert send(client, key, clock, "soft_bounce.json").status_code == 200
    assert status_of(app, "ada@example.com") == "active"
    assert app.store.event_counts() == {"soft_bounce": 1}


def send_raw(client: FlaskClient, key: ec.EllipticCurvePrivateKey, clock: FrozenClock, raw: bytes) -> TestResponse:
    """Post ``raw`` in a request of its own, signed now."""
    return post(client, raw, signed_headers(key, str(int(clock().timestamp())), raw))


def events_of(*names: str, **changes: Any) -> list[dict[str, Any]]:
    """The events of saved payloads, each edited by ``changes``."""
    return [event | changes for name in names for event in json.loads((DATA / name).read_bytes())]


def test_an_event_in_a_new_signed_request_is_applied_once(app: pipeline.App, client: FlaskClient,
                                                          clock: FrozenClock,
                                                          key: ec.EllipticCurvePrivateKey) -> None:
    assert send(client, key, clock, "hard_bounce.json").status_code == 200
    clock.advance(seconds=45)  # SendGrid's retry: signed again, with a new timestamp
    again = send(client, key, clock, "hard_bounce.json")
    assert again.status_code == 200
    assert again.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    # ... or the same event batched with others.
    batch = json.dumps(events_of("hard_bounce.json", "spamreport.json")).encode()
    r = send_raw(client, key, clock, batch)
    assert r.status_code == 200 and r.json == {"received": 2, "stored": 1, "duplicates": 1, "suppressed": 1}
    assert app.store.event_counts() == {"hard_bounce": 1, "complaint": 1}


def test_a_soft_bounce_delivered_again_counts_once_toward_the_limit(app: pipeline.App, client: FlaskClient,
                                                                    clock: FrozenClock,
                                                                    key: ec.EllipticCurvePrivateKey) -> None:
    for _ in range(3):
        clock.advance(seconds=30)
        r = send(client, key, clock, "soft_bounce.json")
        assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 0
    assert app.store.event_counts() == {"soft_bounce": 1}
    assert status_of(app, "ada@example.com") == "active"
    # Two blocks of her own (new sg_event_ids) make three: now she is suppressed.
    r = send_raw(client, key, clock, json.dumps(events_of("soft_bounce.json", sg_event_id="sg-blocked-2")).encode())
    assert r.json is not None and r.json["suppressed"] == 0
    r = send_raw(client, key, clock, json.dumps(events_of("soft_bounce.json", sg_event_id="sg-blocked-3")).encode())
    assert r.json is not None and r.json["suppressed"] == 1
    assert status_of(app, "ada@example.com") == "bounced"


def test_a_copy_of_a_bounce_after_the_reader_came_back_changes_nothing(app: pipeline.App, client: FlaskClient,
                                                                      clock: FrozenClock,
                                                                      key: ec.EllipticCurvePrivateKey) -> None:
    """Ada bounced, then was taken back. A copy of the bounce's request arriving later (SendGrid
    retrying after our answer was lost) is answered as a duplicate and suppresses nobody; nor
    does the same event signed anew (SendGrid's own retry, with a new timestamp)."""
    raw = (DATA / "hard_bounce.json").read_bytes()
    headers = signed_headers(key, str(int(clock().timestamp())), raw)
    assert post(client, raw, headers).json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    reactivate(app.store, "ada@example.com", clock())
    clock.advance(seconds=60)
    again = post(client, raw, headers)
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    resigned = send(client, key, clock, "hard_bounce.json")
    assert resigned.status_code == 200
    assert resigned.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert status_of(app, "ada@example.com") == "active"
    draft_id = sending_draft(app)
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert "ada@example.com" in [c.recipient.email for c in claimed]


def test_a_request_that_fails_halfway_is_applied_by_its_retry(app: pipeline.App, client: FlaskClient,
                                                              clock: FrozenClock,
                                                              key: ec.EllipticCurvePrivateKey) -> None:
    """The database fails while a batch is applied: nothing of it stays (not its events, not its
    key), the answer asks SendGrid to retry, and the retry, the same signed copy, applies it."""
    raw = json.dumps(events_of("hard_bounce.json", "spamreport.json")).encode()
    headers = signed_headers(key, str(int(clock().timestamp())), raw)
    with writes_refused(app.store):
        r = post(client, raw, headers)
    assert r.status_code == 503 and r.json == {"error": "temporarily unavailable, retry later"}
    assert app.store.event_counts() == {}
    assert status_of(app, "ada@example.com") == status_of(app, "ben@example.org") == "active"
    clock.advance(seconds=30)
    retry = post(client, raw, headers)
    assert retry.status_code == 200
    assert retry.json == {"received": 2, "stored": 2, "duplicates": 0, "suppressed": 2}
    assert status_of(app, "ada@example.com") == "bounced"
    assert status_of(app, "ben@example.org") == "complained"


def test_two_copies_at_the_same_moment_apply_once(app: pipeline.App, clock: FrozenClock,
                                                  key: ec.EllipticCurvePrivateKey,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (each with its own database connection) get the same request at once: one
    applies it, the other waits for it and answers 200 as a duplicate."""
    other = pipeline.App.open(app.settings, clock)
    try:
        raw = (DATA / "hard_bounce.json").read_bytes()
        headers = signed_headers(key, str(int(clock().timestamp())), raw)
        real = app.store._apply_events

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)  # the first holds the key while the copy arrives
            return real(*args, **kwargs)

        monkeypatch.setattr(app.store, "_apply_events", slow)
        clients = [create_app(app).test_client(), create_app(other).test_client()]
        answers: list[Any] = [None, None]
        barrier = threading.Barrier(2, timeout=30)

        def run(i: int) -> None:
            barrier.wait()
            time.sleep(0.1 * i)  # the copy comes second
            answers[i] = post(clients[i], raw, headers)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
        assert answers[1].json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
        assert app.store.event_counts() == {"hard_bounce": 1}
    finally:
        other.close()


def test_unparseable_but_signed_body_is_400(client: FlaskClient, clock: FrozenClock,
                                            key: ec.EllipticCurvePrivateKey) -> None:
    ts = str(int(clock().timestamp()))
    for raw in (b"not json", b'{"event": "bounce"}'):
        assert post(client, raw, signed_headers(key, ts, raw)).status_code == 400


def stored_events(app: pipeline.App) -> dict[str, tuple[str, int | None]]:
    """Each stored event's (address, ledger id), by its provider id."""
    with app.store.engine.connect() as conn:
        rows = conn.execute(select(delivery_events.c.event_id, delivery_events.c.email,
                                   delivery_events.c.ledger_id)).all()
    return {r.event_id: (r.email, r.ledger_id) for r in rows}


def test_values_the_store_cannot_hold_do_not_hold_up_the_batch(app: pipeline.App, client: FlaskClient,
                                                                clock: FrozenClock,
                                                                key: ec.EllipticCurvePrivateKey) -> None:
    # Ledger ids past the 32-bit column made PostgreSQL refuse the whole request (a 503 on
    # every retry) and SQLite overflow (a 500); an address past String(320) or holding a NUL
    # failed on PostgreSQL. Each is dropped from its event, which is stored, and the hard
    # bounce in the same batch is applied.
    draft_id = sending_draft(app)
    long_address = "x" * 320 + "@example.com"
    batch = [*events_of("hard_bounce.json"),
             {"email": "ben@example.org", "event": "delivered", "sg_event_id": "d-1", "timestamp": 1795683570,
              "ledger_id": "3000000000"},
             {"email": "ben@example.org", "event": "delivered", "sg_event_id": "d-2", "timestamp": 1795683570,
              "ledger_id": 10 ** 20},
             {"email": long_address, "event": "spamreport", "sg_event_id": "c-1", "timestamp": 1795683570,
              "ledger_id": "2"},
             {"email": "chloe\x00@example.net", "event": "bounce", "type": "bounce", "sg_event_id": "b-2",
              "timestamp": 1795683570}]
    raw = json.dumps(batch).encode()
    for attempt in range(2):  # and SendGrid's retry, signed anew, is a duplicate of each
        r = send_raw(client, key, clock, raw)
        assert r.status_code == 200
        assert r.json == ({"received": 5, "stored": 5, "duplicates": 0, "suppressed": 1} if attempt == 0
                          else {"received": 5, "stored": 0, "duplicates": 5, "suppressed": 0})
        clock.advance(seconds=45)
    assert status_of(app, "ada@example.com") == "bounced"
    assert status_of(app, "ben@example.org") == status_of(app, "chloe@example.net") == "active"
    assert stored_events(app) == {"sg-bounce-1": ("ada@example.com", 1), "d-1": ("ben@example.org", None),
                                  "d-2": ("ben@example.org", None), "c-1": ("", 2), "b-2": ("", None)}
    assert_next_claim_skips(app, draft_id, "ada@example.com")


@pytest.mark.parametrize("field", ["email", "sg_event_id"])
def test_a_lone_surrogate_refuses_the_batch_and_applies_none_of_it(app: pipeline.App, client: FlaskClient,
                                                                   clock: FrozenClock,
                                                                   key: ec.EllipticCurvePrivateKey,
                                                                   field: str) -> None:
    # Not text at all (no encoder writes one): the body is malformed, a 400 rather than the
    # driver's UnicodeEncodeError (a 500), and nothing of it is applied.
    odd = {"email": "ben@example.org", "event": "spamreport", "sg_event_id": "c-1", "timestamp": 1795683570}
    odd[field] = "\ud800" + odd[field]
    raw = json.dumps([*events_of("hard_bounce.json"), odd]).encode()
    assert b"\\ud800" in raw
    r = send_raw(client, key, clock, raw)
    assert r.status_code == 400 and r.json == {"error": "unparseable body"}
    assert status_of(app, "ada@example.com") == status_of(app, "ben@example.org") == "active"
    assert app.store.event_counts() == {}


def test_unconfigured_sendgrid_refuses_everything(tmp_path: Path, clock: FrozenClock,
                                                  key: ec.EllipticCurvePrivateKey) -> None:
    a = pipeline.App.open(make_settings(tmp_path), clock)
    try:
        raw = (DATA / "hard_bounce.json").read_bytes()
        r = post(create_app(a).test_client(), raw, signed_headers(key, str(int(clock().timestamp())), raw))
        assert r.status_code == 403 and r.json == {"error": "sendgrid webhooks are not configured"}
    finally:
        a.close()


def test_parse_normalizes_through_the_tables() -> None:
    events = sendgrid.parse((DATA / "mixed.json").read_bytes())
    assert [(e.event_type, e.email) for e in events] == [
        ("other", "ada@example.com"),        # processed
        ("delivered", "ada@example.com"),
        ("deferred", "ben@example.org"),
        ("hard_bounce", "dora@example.com"),  # dropped: on SendGrid's bounce list
        ("dropped", "eve@example.com"),
        ("open", "ada@example.com"),
        ("click", "ada@example.com"),
        ("unsubscribe", "fay@example.com"),   # group_unsubscribe
        ("other", "fay@example.com"),         # group_resubscribe never re-activates
        ("soft_bounce", "gus@example.com"),   # blocked
    ]
    assert events[1].event_id == "sg-m-2" and events[1].ledger_id == 1
    assert events[1].occurred_at is not None and events[1].occurred_at.isoformat() == "2026-11-26T08:58:05+00:00"


def test_config_rejects_a_key_that_is_not_p256(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"webhooks.sendgrid_public_key: not a base64 DER public key"):
        config.from_dict({"webhooks": {"sendgrid_public_key": "bm90IGEga2V5"}}, file="c.yaml")
    p384 = public_b64(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigError, match=r"webhooks.sendgrid_public_key: SendGrid signs with an ECDSA P-256"):
        config.from_dict({"webhooks": {"sendgrid_public_key": p384}}, file="c.yaml")


def test_verify_is_pure(key: ec.EllipticCurvePrivateKey, clock: FrozenClock) -> None:
    settings = config.Webhooks(sendgrid_public_key=public_b64(key))
    raw = b"[]"
    headers: dict[str, Any] = signed_headers(key, str(int(clock().timestamp())), raw)
    lowered = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
    first = sendgrid.verify(lowered, raw, settings, clock())
    assert first == sendgrid.verify(headers, raw, settings, clock())
    assert first.replay_key is not None and first.replay_key.startswith("sha256:")
    assert json.loads(raw) == [] and sendgrid.parse(raw) == []
