"""SendGrid Event Webhook: ECDSA P-256 signature over timestamp + raw body; a JSON array of events.

Verification (APIS.md A.2): ``X-Twilio-Email-Event-Webhook-Signature`` is a base64 DER ECDSA
signature, with SHA-256, of the bytes of ``X-Twilio-Email-Event-Webhook-Timestamp`` followed by
the raw body, checked with the public key from SendGrid's Mail Settings
(``webhooks.sendgrid_public_key``, base64 DER SubjectPublicKeyInfo). The raw body is used as
received; re-serialized JSON would not match.

SendGrid documents no replay window, so the timestamp must be within ``webhooks.max_age``.
The replay key is a hash of the signed bytes, not the signature: ECDSA signatures are
malleable (``(r, s)`` and ``(r, n - s)`` both verify), so a replay with a rewritten signature
must still be recognized.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from digest.config import Webhooks
from digest.types import DeliveryEvent
from digest.web.webhooks import (
    LEDGER_KEY,
    BadCredentials,
    MalformedPayload,
    Verified,
    address,
    check_fresh,
    content_id,
    epoch,
    header,
    ledger_id,
    load_json,
    not_configured,
    short_id,
    text,
)

NAME = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

EVENTS: dict[str, str] = {
    "delivered": "delivered",
    "deferred": "deferred",
    "open": "open",
    "click": "click",
    "spamreport": "complaint",
    "unsubscribe": "unsubscribe",
    "group_unsubscribe": "unsubscribe",
    "dropped": "dropped",
    "bounce": "hard_bounce",
    "processed": "other",
    "group_resubscribe": "other",
}

# ``bounce`` events carry ``type``: "bounce" is a permanent failure; "blocked" is the receiving
# server refusing for now (reputation, rate), which SendGrid itself does not suppress.
BOUNCE_TYPES: dict[str, str] = {"bounce": "hard_bounce", "blocked": "soft_bounce"}

# A ``dropped`` event means SendGrid refused to send because of its own suppression lists; the
# reason says which. Mirroring those locally stops us from asking SendGrid again every issue.
DROPPED_REASONS: dict[str, str] = {
    "Bounced Address": "hard_bounce",
    "Spam Reporting Address": "complaint",
    "Unsubscribed Address": "unsubscribe",
}


@lru_cache(maxsize=8)
def load_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """The verification key from base64 DER (as SendGrid shows it) or PEM; ``ValueError`` if unusable."""
    value = value.strip()
    try:
        if value.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(value.encode("ascii"))
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(value.split()), validate=True))
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a base64 DER public key (copy it from SendGrid's Mail Settings → "
                         "Signed Event Webhook)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        # ValueError, not TypeError: config validation reports ValueErrors as a bad key.
        raise ValueError("SendGrid signs with an ECDSA P-256 key; this key is another kind")  # noqa: TRY004
    return key


def verify(request_headers: Mapping[str, str], raw_body: bytes, settings: Webhooks,
           now: datetime) -> Verified:
    """Check the ECDSA signature, then the timestamp's freshness."""
    if not settings.sendgrid_public_key:
        raise not_configured(NAME, "webhooks.sendgrid_public_key")
    key = load_public_key(settings.sendgrid_public_key)
    signature_b64 = header(request_headers, SIGNATURE_HEADER)
    timestamp = header(request_headers, TIMESTAMP_HEADER)
    if not signature_b64 or not timestamp or not timestamp.isascii() or not timestamp.isdigit():
        raise BadCredentials("missing signature or timestamp")
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadCredentials("bad signature") from None
    signed = timestamp.encode("ascii") + raw_body
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadCredentials("bad signature") from None
    # Only an authentic request learns that it is stale.
    check_fresh(timestamp, settings, now, "sendgrid")
    return Verified(replay_key="sha256:" + hashlib.sha256(signed).hexdigest())


def parse(raw_body: bytes) -> list[DeliveryEvent]:
    """The body is a JSON array of events."""
    data = load_json(raw_body)
    if not isinstance(data, list):
        raise MalformedPayload("sendgrid: the body must be a JSON array of events")
    return [_event(item) for item in data]


def _event(item: Any) -> DeliveryEvent:
    if not isinstance(item, dict):
        raise MalformedPayload("sendgrid: an event must be a JSON object")
    name = str(item.get("event") or "")
    event_type = EVENTS.get(name, "other")
    if name == "bounce":
        event_type = BOUNCE_TYPES.get(str(item.get("type") or "bounce"), "hard_bounce")
    elif name == "dropped":
        event_type = DROPPED_REASONS.get(str(item.get("reason") or ""), "dropped")
    raw_id = item.get("sg_event_id")
    detail = {
        "event": name,
        "type": text(item.get("type")),
        "reason": text(item.get("reason")),
        "status": text(item.get("status")),
        "message_id": text(item.get("sg_message_id")),
    }
    return DeliveryEvent(
        provider=NAME,
        event_id=short_id(str(raw_id)) if raw_id else content_id(item),
        event_type=event_type,
        email=address(item.get("email")),
        occurred_at=epoch(item.get("timestamp")),
        # custom_args come back as top-level keys of each event.
        ledger_id=ledger_id(item.get(LEDGER_KEY)),
        detail={k: v for k, v in detail.items() if v},
    )
