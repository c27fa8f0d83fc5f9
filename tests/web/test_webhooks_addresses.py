"""Every provider's events name the address as its subscriber is stored, however the provider
echoes the To.

Our messages go to ``"Reader Name <address>"``, with the domain IDNA-encoded, and providers report
the recipient as they were given it: an event for ``"Ada Quill <ada@example.com>"`` must suppress
``ada@example.com``, and one for ``zoe@xn--bcher-kva.example`` the reader stored as
``zoe@bücher.example``. Values the store cannot hold (an over-long address, a ledger id past its
32-bit column) are dropped from the event; one that is no text is a malformed body.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from digest import pipeline, subscribers
from digest.delivery.mime import normalize_address
from digest.web.app import create_app
from digest.web.webhooks import MAX_LEDGER_ID, MalformedPayload, address, handler, ledger_id
from tests.conftest import FrozenClock, make_settings
from tests.web.test_webhooks_mailgun import signed as mailgun_signed
from tests.web.test_webhooks_sendgrid import public_b64, signed_headers

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks"


def _ses_named(raw: bytes, bare: str, named: str) -> bytes:
    envelope = json.loads(raw)
    message = json.loads(envelope["Message"])
    message["mail"]["destination"] = [named if d == bare else d for d in message["mail"]["destination"]]
    envelope["Message"] = json.dumps(message)
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(("provider", "fixture", "bare", "event_type"), [
    ("resend", "bounced.json", "ada@example.com", "hard_bounce"),
    ("resend", "complained.json", "ben@example.org", "complaint"),
    ("sendgrid", "hard_bounce.json", "ada@example.com", "hard_bounce"),
    ("mailgun", "failed_permanent.json", "ada@example.com", "hard_bounce"),
    ("postmark", "subscription_change.json", "chloe@example.net", "unsubscribe"),
    ("ses", "subscription_unsubscribe.json", "chloe@example.net", "unsubscribe"),
])
def test_a_named_recipient_is_reported_as_its_address(provider: str, fixture: str, bare: str,
                                                      event_type: str) -> None:
    raw = (DATA / provider / fixture).read_bytes()
    named = f"Reader Q. Name <{bare.upper()}>"
    if provider == "ses":
        changed = _ses_named(raw, bare, named)
    else:
        changed = raw.replace(f'"{bare}"'.encode(), json.dumps(named).encode())
    assert changed != raw
    (before,) = [e for e in handler(provider).parse(raw) if e.event_type == event_type]
    (after,) = [e for e in handler(provider).parse(changed) if e.event_type == event_type]
    assert before.email == after.email == bare


def test_address_takes_the_address_out_of_a_mailbox() -> None:
    assert address('"Quill, Ada" <Ada@Example.com>') == "ada@example.com"
    assert address("  ben@example.org ") == "ben@example.org"
    assert address(None) == address(42) == address("") == ""


# -- an address as a provider reports it finds the row it is stored as --------------------------
#
# Subscribers are stored as normalize_email makes them: lower-cased, the domain in Unicode. A
# message goes out with the domain IDNA-encoded (mime.normalize_address), and the provider
# reports that form back.

IDN_READER = "zoe@bücher.example"
IDN_SENT = "zoe@xn--bcher-kva.example"  # what the provider was given, and echoes


@pytest.mark.parametrize("reported", [
    IDN_SENT,
    IDN_SENT.upper(),
    f"Zoë Lind <{IDN_SENT}>",
    "ZOE@BÜCHER.EXAMPLE",
    "zoe@bu\u0308cher.example",  # the ü decomposed (NFD)
    " zoe@bücher.example ",
])
def test_a_reported_address_takes_the_form_it_is_stored_in(reported: str) -> None:
    assert address(reported) == IDN_READER


def test_an_address_that_is_not_valid_stays_lower_cased_text() -> None:
    assert address("a\u0308da@Example.com") == "\u00e4da@example.com"  # NFC, like normalize_email
    assert address("Not An Address") == "not an address"
    assert address("X@XN--ZZ") == "x@xn--zz"  # no valid IDNA: the text, never an exception
    assert address("ada@example.com.") == "ada@example.com."


def test_an_address_the_store_cannot_hold_is_dropped_and_one_that_is_not_text_is_malformed() -> None:
    long_one = "x" * 310 + "@example.com"  # past String(320)
    assert address(long_one) == address(f"X <{long_one}>") == ""
    assert address("ada\x00@example.com") == ""  # PostgreSQL text holds no NUL
    with pytest.raises(MalformedPayload, match="not valid Unicode"):
        address("\ud800ada@example.com")


@pytest.mark.parametrize(("value", "expected"), [
    ("1", 1), (7, 7), (["12"], 12), (MAX_LEDGER_ID, MAX_LEDGER_ID), (str(MAX_LEDGER_ID), MAX_LEDGER_ID),
    # Past the 32-bit column: no ledger row has one, and PostgreSQL would refuse the request.
    (MAX_LEDGER_ID + 1, None), ("3000000000", None), (10 ** 20, None), ("9" * 18, None), ("9" * 40, None),
    ("0", None), (0, None), (-1, None), (True, None), ("1.0", None), ("١", None), (None, None),
])
def test_ledger_id_is_only_an_id_the_ledger_can_have(value: object, expected: int | None) -> None:
    assert ledger_id(value) == expected


@pytest.mark.parametrize(("provider", "fixture", "bare", "event_type"), [
    ("postmark", "hard_bounce.json", "Ada@Example.com", "hard_bounce"),
    ("postmark", "subscription_change.json", "chloe@example.net", "unsubscribe"),
    ("sendgrid", "unsubscribe.json", "chloe@example.net", "unsubscribe"),
    ("mailgun", "failed_permanent.json", "ada@example.com", "hard_bounce"),
    ("mailgun", "unsubscribed.json", "chloe@example.net", "unsubscribe"),
    ("resend", "bounced.json", "ada@example.com", "hard_bounce"),
    ("resend", "contact_unsubscribed.json", "chloe@example.net", "unsubscribe"),
    ("ses", "bounce_permanent.json", "ada@example.com", "hard_bounce"),
    ("ses", "complaint.json", "ben@example.org", "complaint"),
    ("ses", "subscription_unsubscribe.json", "chloe@example.net", "unsubscribe"),
])
def test_every_provider_reports_an_idn_address_in_its_stored_form(provider: str, fixture: str, bare: str,
                                                                   event_type: str) -> None:
    local = bare.partition("@")[0]
    raw = (DATA / provider / fixture).read_bytes()
    changed = raw.replace(bare.encode(), f"{local}@xn--bcher-kva.example".encode())  # inside SES's Message too
    assert changed != raw
    (event,) = [e for e in handler(provider).parse(changed) if e.event_type == event_type]
    assert event.email == f"{local.lower()}@bücher.example"


# -- the same, through the web route and the store, on both backends ----------------------------

SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
MAILGUN_KEY = "whk-0123456789abcdef0123456789abcdef"
POSTMARK_AUTH = {"Authorization": "Basic " + base64.b64encode(b"hooks:secret").decode()}


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[pipeline.App]:
    settings = make_settings(tmp_path, db_url, webhooks={
        "postmark_username": "hooks", "postmark_password": "secret",
        "sendgrid_public_key": public_b64(SENDGRID_KEY), "mailgun_signing_key": MAILGUN_KEY})
    a = pipeline.App.open(settings, clock)
    for email, name in [*pipeline.DEMO_SUBSCRIBERS, ("Zoe@Bücher.example", "Zoë Lind")]:
        subscribers.add(a.store, email, name, clock())
    yield a
    a.close()


def sending_draft(app: pipeline.App) -> int:
    """A draft approved and sending to the demo readers and the IDN one; nothing claimed yet."""
    pipeline.collect(app)
    draft = pipeline.make_draft(app).draft
    assert draft is not None and draft.id is not None
    pipeline.approve(app, draft.id)
    assert app.store.start_send(draft.id, app.now()) == 4
    # What the provider is given as To, and so reports back.
    assert normalize_address(IDN_READER) == IDN_SENT
    return draft.id


def post_postmark(client: FlaskClient, reported: str) -> TestResponse:
    event = json.loads((DATA / "postmark" / "hard_bounce.json").read_bytes()) | {"Email": reported}
    return client.post("/webhooks/postmark", data=json.dumps(event), content_type="application/json",
                       headers=POSTMARK_AUTH)


def post_sendgrid(client: FlaskClient, reported: str, clock: FrozenClock) -> TestResponse:
    # A batch: the reader's unsubscribe among another reader's delivery.
    batch = [*json.loads((DATA / "sendgrid" / "unsubscribe.json").read_bytes()),
             {"email": "ben@example.org", "event": "delivered", "sg_event_id": "sg-d-1", "timestamp": 1795683580}]
    batch[0]["email"] = reported
    raw = json.dumps(batch).encode()
    return client.post("/webhooks/sendgrid", data=raw, content_type="application/json",
                       headers=signed_headers(SENDGRID_KEY, str(int(clock().timestamp())), raw))


def post_mailgun(client: FlaskClient, reported: str, clock: FrozenClock) -> TestResponse:
    body = mailgun_signed("failed_permanent.json", clock, key=MAILGUN_KEY)  # signs timestamp + token only
    body["event-data"]["recipient"] = reported
    return client.post("/webhooks/mailgun", data=json.dumps(body), content_type="application/json")


@pytest.mark.parametrize(("provider", "reported", "status"), [
    ("postmark", IDN_SENT, "bounced"),
    ("mailgun", IDN_SENT, "bounced"),
    ("sendgrid", IDN_SENT.upper(), "unsubscribed"),
])
def test_an_idn_reader_is_suppressed_and_the_next_claim_skips_her(app: pipeline.App, clock: FrozenClock,
                                                                  provider: str, reported: str, status: str) -> None:
    draft_id = sending_draft(app)
    client = create_app(app).test_client()
    if provider == "postmark":
        r = post_postmark(client, reported)
    elif provider == "sendgrid":
        r = post_sendgrid(client, reported, clock)
    else:
        r = post_mailgun(client, reported, clock)
    assert r.status_code == 200 and r.json is not None and r.json["suppressed"] == 1
    sub = app.store.subscriber_by_email(IDN_READER)
    assert sub is not None and sub.status == status
    claimed = app.store.claim_batch(draft_id, 10, "claim-1", app.now())
    assert sorted(c.recipient.email for c in claimed) == sorted(e for e, _ in pipeline.DEMO_SUBSCRIBERS)
    assert (IDN_READER, "skipped") in [(e, s) for _, e, s in app.store.ledger_rows(draft_id)]
