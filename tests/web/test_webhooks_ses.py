"""POST /webhooks/ses: SNS signatures (versions 1 and 2), certificate URL and topic checks,
freshness, MessageId replays, and the SubscriptionConfirmation handshake.

A self-signed certificate and RSA key stand in for Amazon's; the certificate fetch is a dict
lookup, and every URL the verifier asks for is recorded, so the tests can show that an
untrusted URL is never fetched at all.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from digest import config, pipeline, subscribers
from digest.errors import ConfigError
from digest.web.app import create_app
from digest.web.webhooks import Refused, Unavailable, ses
from tests.conftest import NOW, FrozenClock, make_settings, reactivate, writes_refused

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks" / "ses"
TOPIC = "arn:aws:sns:us-east-1:123456789012:digest-feedback"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem"


def make_cert(key: rsa.RSAPrivateKey, days_before: int = 1, days_after: int = 365) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=days_before)).not_valid_after(NOW + timedelta(days=days_after))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Served:
    """Certificates by URL, recording every fetch the verifier makes."""

    def __init__(self, certs: dict[str, bytes]) -> None:
        self.certs = certs
        self.fetched: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.fetched.append(url)
        return self.certs[url]  # KeyError: the verifier treats it as an unavailable certificate


@pytest.fixture
def served(key: rsa.RSAPrivateKey) -> Served:
    return Served({CERT_URL: make_cert(key)})


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[pipeline.App]:
    a = pipeline.App.open(make_settings(tmp_path, db_url, webhooks={"ses_topic_arns": [TOPIC]}), clock)
    for email, name in pipeline.DEMO_SUBSCRIBERS:
        subscribers.add(a.store, email, name, clock())
    yield a
    a.close()


@pytest.fixture
def confirmed() -> list[str]:
    return []


@pytest.fixture
def client(app: pipeline.App, served: Served, confirmed: list[str], clock: FrozenClock) -> FlaskClient:
    certificates = ses.CertificateCache(fetch=served, clock=lambda: clock().timestamp())
    web = create_app(app, sns_certificates=certificates, sns_confirm=confirmed.append)
    return web.test_client()


def canonical(envelope: dict[str, Any]) -> bytes:
    """The string to sign, written out from the AWS page, independently of the module."""
    if envelope["Type"] == "Notification":
        names = ["Message", "MessageId"] + (["Subject"] if "Subject" in envelope else []) + [
            "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{n}\n{envelope[n]}\n" for n in names).encode()


def sign(envelope: dict[str, Any], key: rsa.RSAPrivateKey, clock: FrozenClock, *, version: str = "2",
         age: int = 5, cert_url: str = CERT_URL, hash_version: str | None = None) -> dict[str, Any]:
    envelope = copy.deepcopy(envelope)
    envelope["Timestamp"] = (clock() - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    envelope["SignatureVersion"] = version
    envelope["SigningCertURL"] = cert_url
    algorithm = hashes.SHA1() if (hash_version or version) == "1" else hashes.SHA256()
    envelope["Signature"] = base64.b64encode(key.sign(canonical(envelope), padding.PKCS1v15(), algorithm)).decode()
    return envelope


def load(name: str) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads((DATA / name).read_text())
    return envelope


def post(client: FlaskClient, envelope: dict[str, Any] | bytes, message_type: str | None = None) -> TestResponse:
    raw = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    kind = message_type or (envelope["Type"] if isinstance(envelope, dict) else "Notification")
    # SNS posts with text/plain, whatever the body is.
    return client.post("/webhooks/ses", data=raw, content_type="text/plain; charset=UTF-8",
                       headers={"x-amz-sns-message-type": kind, "x-amz-sns-topic-arn": TOPIC})


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


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_signed_permanent_bounce_suppresses_at_once(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                                      key: rsa.RSAPrivateKey, version: str) -> None:
    draft_id = sending_draft(app)
    r = post(client, sign(load("bounce_permanent.json"), key, clock, version=version))
    assert r.status_code == 200 and r.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == ["ben@example.org", "chloe@example.net"]


def test_a_wrong_signature_is_refused(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                      key: rsa.RSAPrivateKey) -> None:
    good = sign(load("bounce_permanent.json"), key, clock)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tampered = copy.deepcopy(good)
    tampered["Message"] = tampered["Message"].replace("ada@", "ben@")
    attempts = [
        sign(load("bounce_permanent.json"), other_key, clock),          # not the certificate's key
        tampered,                                                       # the message changed
        sign(load("bounce_permanent.json"), key, clock, version="1", hash_version="2"),  # v1 is SHA1
        good | {"SignatureVersion": "3"},
        good | {"Signature": "%%%"},
        {k: v for k, v in good.items() if k != "Signature"},
    ]
    for envelope in attempts:
        assert post(client, envelope).status_code == 401
    assert post(client, good, message_type="SubscriptionConfirmation").status_code == 401  # header ≠ body
    assert status_of(app, "ada@example.com") == "active" and app.store.event_counts() == {}


@pytest.mark.parametrize("url", [
    "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem",
    "https://evil.com/SimpleNotificationService-0000.pem",
    "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-0000.pem",
    "https://sns.us-east-1.amazonaws.com@evil.com/SimpleNotificationService-0000.pem",
    "https://evil.com/sns.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem",
    "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-0000.pem",
    "https://s3.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem",
    "https://sns.us-east-1.amazonaws.com/not-a-certificate.txt",
])
def test_an_untrusted_certificate_url_is_never_fetched(app: pipeline.App, client: FlaskClient, served: Served,
                                                       clock: FrozenClock, key: rsa.RSAPrivateKey, url: str) -> None:
    served.certs[url] = served.certs[CERT_URL]  # even if it would serve the right certificate
    r = post(client, sign(load("bounce_permanent.json"), key, clock, cert_url=url))
    assert r.status_code == 403 and r.json == {"error": "untrusted SNS URL"}
    assert served.fetched == []
    assert status_of(app, "ada@example.com") == "active"


def test_trusted_sns_urls() -> None:
    assert ses.trusted_sns_url(CERT_URL, pem=True) == CERT_URL
    assert ses.trusted_sns_url("https://sns.eu-central-2.amazonaws.com/x.pem", pem=True)
    assert ses.trusted_sns_url("https://sns.us-gov-west-1.amazonaws.com/x.pem", pem=True)
    for bad in ("https://sns.amazonaws.com/x.pem", "https://SNS.us-east-1.amazonaws.com.evil/x.pem",
                "https://sns.us-east-1.amazonaws.com:99999/x.pem", "ftp://sns.us-east-1.amazonaws.com/x.pem"):
        with pytest.raises(Refused):
            ses.trusted_sns_url(bad, pem=True)


def test_a_topic_not_in_the_allow_list_is_refused(app: pipeline.App, client: FlaskClient, served: Served,
                                                  clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    envelope = load("bounce_permanent.json") | {"TopicArn": "arn:aws:sns:us-east-1:999999999999:someone-else"}
    r = post(client, sign(envelope, key, clock))
    assert r.status_code == 403 and r.json == {"error": "topic not allowed"}
    assert served.fetched == [] and status_of(app, "ada@example.com") == "active"


@pytest.mark.parametrize(("age", "expected"), [(300, 200), (301, 403), (-301, 403)])
def test_a_stale_timestamp_is_refused(client: FlaskClient, clock: FrozenClock, key: rsa.RSAPrivateKey,
                                      age: int, expected: int) -> None:
    assert post(client, sign(load("bounce_permanent.json"), key, clock, age=age)).status_code == expected


def test_a_retried_message_id_is_a_duplicate(app: pipeline.App, client: FlaskClient, served: Served,
                                             clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    """SNS retries (same MessageId, same signed fields) when it did not get a 2xx in time."""
    envelope = sign(load("bounce_permanent.json"), key, clock)
    assert post(client, envelope).status_code == 200
    clock.advance(seconds=20)  # SNS's default retry delay
    again = post(client, envelope)
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert app.store.event_counts() == {"hard_bounce": 1}
    assert served.fetched == [CERT_URL]  # fetched once, then cached
    # Past the freshness window the same copy is refused as stale, as before.
    clock.advance(seconds=300)
    assert post(client, envelope).json == {"error": "stale timestamp"}


def test_a_retried_confirmation_is_confirmed_again(client: FlaskClient, confirmed: list[str],
                                                   clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    """SNS sends a SubscriptionConfirmation again (same MessageId) when it did not get our 200:
    it is confirmed again, not answered as a duplicate, since the first answer may have been
    lost with the subscription still pending (confirming twice is harmless)."""
    envelope = sign(load("subscription_confirmation.json"), key, clock)
    first = post(client, envelope)
    clock.advance(seconds=20)  # SNS's default retry delay
    again = post(client, envelope)
    assert first.status_code == again.status_code == 200
    assert first.json == again.json == {"confirmed": True, "received": 0, "stored": 0, "duplicates": 0,
                                        "suppressed": 0}
    assert confirmed == [envelope["SubscribeURL"]] * 2


def test_a_confirmation_whose_first_answer_never_came_is_confirmed_by_the_retry(
        app: pipeline.App, served: Served, clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    """The first fetch of SubscribeURL hangs until SNS gives up on our answer, and SNS sends the
    confirmation again meanwhile: the retry fetches SubscribeURL itself rather than trusting
    the first attempt to finish."""
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def hanging_once(url: str) -> None:
        calls.append(url)
        if len(calls) == 1:
            started.set()
            release.wait(10)
            raise Unavailable("could not confirm the subscription (read timed out)")

    client = create_app(app, sns_certificates=ses.CertificateCache(fetch=served),
                        sns_confirm=hanging_once).test_client()
    envelope = sign(load("subscription_confirmation.json"), key, clock)
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(post(client, envelope)))
    first.start()
    assert started.wait(10)
    retry = post(client, envelope)  # while the first is still waiting for SNS
    release.set()
    first.join(10)
    assert retry.status_code == 200 and retry.json is not None and retry.json["confirmed"] is True
    assert [a.status_code for a in answers] == [503]
    assert calls == [envelope["SubscribeURL"]] * 2


def test_an_expired_certificate_is_refused(app: pipeline.App, client: FlaskClient, served: Served,
                                           clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    served.certs[CERT_URL] = make_cert(key, days_before=400, days_after=-1)
    r = post(client, sign(load("bounce_permanent.json"), key, clock))
    assert r.status_code == 403 and status_of(app, "ada@example.com") == "active"


def test_an_unavailable_certificate_is_503_and_the_retry_works(app: pipeline.App, client: FlaskClient,
                                                               served: Served, clock: FrozenClock,
                                                               key: rsa.RSAPrivateKey) -> None:
    certificate = served.certs.pop(CERT_URL)
    envelope = sign(load("bounce_permanent.json"), key, clock)
    assert post(client, envelope).status_code == 503 and served.fetched == [CERT_URL]
    served.certs[CERT_URL] = certificate
    # A copy right after is answered without another fetch (forged requests naming missing
    # certificates cost a fetch per URL every few seconds, not one per request) ...
    assert post(client, envelope).status_code == 503 and served.fetched == [CERT_URL]
    clock.advance(seconds=20)  # ... and SNS's retry, 20 seconds later, fetches again
    assert post(client, envelope).status_code == 200
    assert served.fetched == [CERT_URL, CERT_URL]
    assert status_of(app, "ada@example.com") == "bounced"


def test_a_stale_copy_costs_no_certificate_fetch(client: FlaskClient, served: Served, clock: FrozenClock,
                                                 key: rsa.RSAPrivateKey) -> None:
    envelope = sign(load("bounce_permanent.json"), key, clock, age=3600)
    assert post(client, envelope).status_code == 403 and served.fetched == []


def test_a_subscription_confirmation_is_verified_then_confirmed(app: pipeline.App, client: FlaskClient,
                                                                confirmed: list[str], clock: FrozenClock,
                                                                key: rsa.RSAPrivateKey) -> None:
    envelope = load("subscription_confirmation.json")
    assert post(client, envelope).status_code == 401  # unsigned: never confirmed
    assert confirmed == []
    r = post(client, sign(envelope, key, clock, version="1"))
    assert r.status_code == 200 and r.json is not None and r.json["confirmed"] is True
    assert confirmed == [envelope["SubscribeURL"]]
    assert app.store.event_counts() == {}


@pytest.mark.parametrize("subscribe_url", [
    "https://evil.com/?Action=ConfirmSubscription&Token=x",
    "http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=x",
    "https://sns.us-east-1.amazonaws.com.evil.com/?Action=ConfirmSubscription&Token=x",
    "https://sns.us-east-1.amazonaws.com/?Action=Publish&Message=x",
])
def test_a_signed_confirmation_with_an_untrusted_subscribe_url_is_not_fetched(
        client: FlaskClient, confirmed: list[str], clock: FrozenClock, key: rsa.RSAPrivateKey,
        subscribe_url: str) -> None:
    envelope = load("subscription_confirmation.json") | {"SubscribeURL": subscribe_url}
    assert post(client, sign(envelope, key, clock)).status_code == 403
    assert confirmed == []


def test_a_failed_confirmation_is_503_and_can_be_retried(app: pipeline.App, served: Served, clock: FrozenClock,
                                                         key: rsa.RSAPrivateKey) -> None:
    calls: list[str] = []

    def flaky(url: str) -> None:
        calls.append(url)
        if len(calls) == 1:
            raise Unavailable("could not confirm the subscription (HTTP 500)")

    client = create_app(app, sns_certificates=ses.CertificateCache(fetch=served), sns_confirm=flaky).test_client()
    envelope = sign(load("subscription_confirmation.json"), key, clock)
    assert post(client, envelope).status_code == 503
    assert post(client, envelope).status_code == 200
    assert len(calls) == 2


def test_an_unsubscribe_confirmation_changes_nothing(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                                     key: rsa.RSAPrivateKey) -> None:
    envelope = load("subscription_confirmation.json") | {
        "Type": "UnsubscribeConfirmation", "MessageId": "0b5e-unsub",
        "Message": "You have chosen to deactivate subscription."}
    r = post(client, sign(envelope, key, clock))
    assert r.status_code == 200 and r.json == {"received": 0, "stored": 0, "duplicates": 0, "suppressed": 0}


def test_a_complaint_suppresses(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                key: rsa.RSAPrivateKey) -> None:
    draft_id = sending_draft(app)
    assert post(client, sign(load("complaint.json"), key, clock)).status_code == 200
    assert status_of(app, "ben@example.org") == "complained"
    assert_next_claim_skips(app, draft_id, "ben@example.org")


def test_a_list_unsubscribe_is_honoured(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                        key: rsa.RSAPrivateKey) -> None:
    draft_id = sending_draft(app)
    assert post(client, sign(load("subscription_unsubscribe.json"), key, clock)).status_code == 200
    assert status_of(app, "chloe@example.net") == "unsubscribed"
    assert_next_claim_skips(app, draft_id, "chloe@example.net")


def test_a_transient_bounce_is_only_counted(app: pipeline.App, client: FlaskClient, clock: FrozenClock,
                                            key: rsa.RSAPrivateKey) -> None:
    # This payload has a Subject, which the string to sign then includes.
    assert post(client, sign(load("bounce_transient.json"), key, clock)).status_code == 200
    assert post(client, sign(load("delivery_delay.json"), key, clock)).status_code == 200
    assert status_of(app, "ada@example.com") == "active"
    assert app.store.event_counts() == {"soft_bounce": 1, "deferred": 1}


def in_another_message(envelope: dict[str, Any], message_id: str, **changes: Any) -> dict[str, Any]:
    """The same SES event published again: SNS gives every publish a MessageId of its own.

    ``changes`` edit the SES event inside (for example ``notificationType`` for the identity
    notification that carries the same bounce as event publishing does).
    """
    message = json.loads(envelope["Message"])
    message.update(changes)
    message = {k: v for k, v in message.items() if v is not None}
    return envelope | {"MessageId": message_id, "Message": json.dumps(message)}


def another_bounce(envelope: dict[str, Any], n: int) -> dict[str, Any]:
    """Another bounce of the same reader: its own feedbackId, in its own SNS message."""
    message = json.loads(envelope["Message"])
    message["bounce"]["feedbackId"] = f"0100-bounce-other-{n}"
    return envelope | {"MessageId": f"a1b2c3d4-09{n:02d}-5e6f-7a8b-9c0d1e2f3a4b", "Message": json.dumps(message)}


def test_a_copy_of_a_bounce_after_the_reader_came_back_changes_nothing(app: pipeline.App, client: FlaskClient,
                                                                      clock: FrozenClock,
                                                                      key: rsa.RSAPrivateKey) -> None:
    """SNS retries with the same MessageId; SES may publish the same bounce again (its
    feedbackId) in a new message. After Ada was taken back, neither suppresses her again."""
    envelope = sign(load("bounce_permanent.json"), key, clock)
    assert post(client, envelope).json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ada@example.com") == "bounced"
    reactivate(app.store, "ada@example.com", clock())
    clock.advance(seconds=40)
    again = post(client, envelope)
    assert again.status_code == 200
    assert again.json == {"duplicate": True, "received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    published_again = sign(in_another_message(load("bounce_permanent.json"), "a1b2c3d4-0909-5e6f-7a8b-9c0d1e2f3a4b"),
                           key, clock)
    r = post(client, published_again)
    assert r.status_code == 200 and r.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    assert status_of(app, "ada@example.com") == "active"


def test_a_notification_that_fails_halfway_is_applied_by_the_retry(app: pipeline.App, client: FlaskClient,
                                                                   clock: FrozenClock,
                                                                   key: rsa.RSAPrivateKey) -> None:
    envelope = sign(load("complaint.json"), key, clock)
    with writes_refused(app.store):
        r = post(client, envelope)
    assert r.status_code == 503
    assert app.store.event_counts() == {} and status_of(app, "ben@example.org") == "active"
    clock.advance(seconds=20)  # SNS's retry: the same message
    retry = post(client, envelope)
    assert retry.status_code == 200
    assert retry.json == {"received": 1, "stored": 1, "duplicates": 0, "suppressed": 1}
    assert status_of(app, "ben@example.org") == "complained"


def test_an_event_published_again_in_a_new_sns_message_is_applied_once(
        app: pipeline.App, client: FlaskClient, clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    original = load("bounce_permanent.json")
    assert post(client, sign(original, key, clock)).status_code == 200
    clock.advance(seconds=40)
    again = post(client, sign(in_another_message(original, "a1b2c3d4-0101-5e6f-7a8b-9c0d1e2f3a4b"), key, clock))
    assert again.status_code == 200
    assert again.json == {"received": 1, "stored": 0, "duplicates": 1, "suppressed": 0}
    complaint = load("complaint.json")
    assert post(client, sign(complaint, key, clock)).status_code == 200
    again = post(client, sign(in_another_message(complaint, "a1b2c3d4-0103-5e6f-7a8b-9c0d1e2f3a4b"), key, clock))
    assert again.status_code == 200 and again.json is not None and again.json["stored"] == 0
    assert app.store.event_counts() == {"hard_bounce": 1, "complaint": 1}


def test_a_soft_bounce_published_again_counts_once_toward_the_limit(
        app: pipeline.App, client: FlaskClient, clock: FrozenClock, key: rsa.RSAPrivateKey) -> None:
    original = load("bounce_transient.json")
    copies = [
        original,
        in_another_message(original, "a1b2c3d4-0102-5e6f-7a8b-9c0d1e2f3a4b"),
        # The same bounce as an identity notification (notificationType, not eventType), which
        # SES sends besides event publishing when both are set up.
        in_another_message(original, "a1b2c3d4-0202-5e6f-7a8b-9c0d1e2f3a4b",
                           eventType=None, notificationType="Bounce"),  # None: left out
    ]
    for envelope in copies:
        clock.advance(seconds=20)
        r = post(client, sign(envelope, key, clock))
        assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 0
    assert app.store.event_counts() == {"soft_bounce": 1}
    assert status_of(app, "ada@example.com") == "active"
    # Two bounces of her own (new feedbackIds) make three: now she is suppressed.
    assert post(client, sign(another_bounce(original, 1), key, clock)).json["suppressed"] == 0  # type: ignore[index]
    assert post(client, sign(another_bounce(original, 2), key, clock)).json["suppressed"] == 1  # type: ignore[index]
    assert status_of(app, "ada@example.com") == "bounced"


def test_unconfigured_ses_refuses_everything(tmp_path: Path, served: Served, clock: FrozenClock,
                                             key: rsa.RSAPrivateKey) -> None:
    a = pipeline.App.open(make_settings(tmp_path), clock)
    try:
        client = create_app(a, sns_certificates=ses.CertificateCache(fetch=served)).test_client()
        r = post(client, sign(load("bounce_permanent.json"), key, clock))
        assert r.status_code == 403 and r.json == {"error": "ses webhooks are not configured"}
        assert served.fetched == []
    finally:
        a.close()


def test_unparseable_body_is_400(client: FlaskClient) -> None:
    assert post(client, b"<xml/>").status_code == 400
    assert post(client, b"[" * 100_000).status_code == 400  # nested too deep to parse: no 500


def test_config_checks_topic_arns() -> None:
    with pytest.raises(ConfigError, match=r"webhooks.ses_topic_arns: 'digest-feedback' is not an SNS topic ARN"):
        config.from_dict({"webhooks": {"ses_topic_arns": ["digest-feedback"]}}, file="c.yaml")


def test_parse_normalizes_through_the_tables() -> None:
    def events(name: str) -> list[Any]:
        return ses.parse((DATA / name).read_bytes())

    (bounce,) = events("bounce_permanent.json")
    assert (bounce.event_type, bounce.email, bounce.ledger_id) == ("hard_bounce", "ada@example.com", 1)
    assert bounce.event_id == "ses-feedback:0100-bounce-1:ada@example.com"  # SES's feedbackId, not SNS's id
    assert bounce.detail["bounce_subtype"] == "General"
    assert [e.event_type for e in events("bounce_transient.json")] == ["soft_bounce"]
    assert [e.event_type for e in events("complaint.json")] == ["complaint"]
    assert [e.event_type for e in events("subscription_unsubscribe.json")] == ["unsubscribe"]
    assert [e.event_type for e in events("delivery_delay.json")] == ["deferred"]
    deliveries = events("delivery.json")
    assert [(e.event_type, e.email) for e in deliveries] == [
        ("delivered", "ada@example.com"), ("delivered", "ben@example.org")]
    # No feedbackId: the content identifies the event, per recipient, whatever SNS message carries it.
    assert deliveries[0].event_id != deliveries[1].event_id
    assert [e.event_id for e in deliveries] == [e.event_id for e in ses.parse(json.dumps(
        load("delivery.json") | {"MessageId": "another-sns-message"}).encode())]
    assert events("subscription_confirmation.json") == []


def test_the_default_network_calls_stay_on_sns_hosts(key: rsa.RSAPrivateKey) -> None:
    responses = pytest.importorskip("responses")
    subscribe = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=t&Token=x"
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, CERT_URL, status=302, headers={"Location": "https://evil.com/x.pem"})
        mock.add(responses.GET, "https://evil.com/x.pem", body=make_cert(key))
        with pytest.raises(Refused):  # a redirect off the SNS host is not followed into trust
            ses.CertificateCache().get(CERT_URL)
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, CERT_URL, body=make_cert(key))
        cache = ses.CertificateCache()
        assert cache.get(CERT_URL) is cache.get(CERT_URL)  # one fetch, then the cache
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, subscribe, body="<ConfirmSubscriptionResponse/>")
        ses.confirm_subscription(subscribe)
        mock.replace(responses.GET, subscribe, status=500)
        with pytest.raises(Unavailable):
            ses.confirm_subscription(subscribe)
    with pytest.raises(Refused):
        ses.confirm_subscription("https://evil.com/?Action=ConfirmSubscription")
