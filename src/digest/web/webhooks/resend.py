"""Resend webhooks, signed by Svix: HMAC-SHA256 over ``id.timestamp.body``.

Verification (APIS.md A.5): the headers ``svix-id``, ``svix-timestamp`` (epoch seconds) and
``svix-signature`` (space-separated ``v1,<base64>`` entries: several during a secret rotation).
The key is the base64-decoded part of ``webhooks.resend_secret`` after ``whsec_``; the signed
content is ``"{svix-id}.{svix-timestamp}.{raw body}"``. Any one ``v1`` entry matching (in
constant time) is enough. ``svix-id`` stays the same across Svix's retries, so it is the replay
key; each retry is freshly signed with a new timestamp. The signature covers the id and the
body, so a retry of a message we already took (our 200 was lost) is the same content: it is
answered 200 as a duplicate, since Svix keeps retrying, and in the end disables, an endpoint
that answers anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from digest.config import Webhooks
from digest.types import DeliveryEvent
from digest.web.webhooks import (
    LEDGER_KEY,
    BadCredentials,
    MalformedPayload,
    Verified,
    address,
    check_fresh,
    header,
    iso,
    ledger_id,
    load_json,
    not_configured,
    obj,
    short_id,
    text,
)

NAME = "resend"
SECRET_PREFIX = "whsec_"

EVENTS: dict[str, str] = {
    "email.delivered": "delivered",
    "email.delivery_delayed": "deferred",
    "email.complained": "complaint",
    "email.bounced": "hard_bounce",
    "email.opened": "open",
    "email.clicked": "click",
    "email.failed": "dropped",
    "email.sent": "other",
    "email.scheduled": "other",
    "email.received": "other",
}

# Resend documents ``email.bounced`` as a permanent rejection; its ``bounce.type`` (an SES-style
# Permanent/Transient, not checked in Resend's own docs) demotes a transient one to a soft bounce.
BOUNCE_TYPES: dict[str, str] = {"Permanent": "hard_bounce", "Transient": "soft_bounce",
                                "Undetermined": "soft_bounce"}


def decode_secret(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_…`` secret; ``ValueError`` if it is not one."""
    secret = secret.strip()
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("must be the webhook signing secret from Resend, starting with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the part after whsec_ is not base64") from exc
    if len(key) < 16:
        raise ValueError("the secret is too short to be a Resend signing secret")
    return key


def sign(secret: str, msg_id: str, timestamp: str, raw_body: bytes) -> str:
    """The base64 ``v1`` signature Svix would send (also used by tests)."""
    content = f"{msg_id}.{timestamp}.".encode() + raw_body
    return base64.b64encode(hmac.new(decode_secret(secret), content, hashlib.sha256).digest()).decode("ascii")


def verify(request_headers: Mapping[str, str], raw_body: bytes, settings: Webhooks,
           now: datetime) -> Verified:
    """Check one ``v1`` signature matches, then freshness; ``svix-id`` is the replay key."""
    if not settings.resend_secret:
        raise not_configured(NAME, "webhooks.resend_secret")
    msg_id = header(request_headers, "svix-id") or ""
    timestamp = header(request_headers, "svix-timestamp") or ""
    signatures = header(request_headers, "svix-signature") or ""
    if not msg_id or len(msg_id) > 200 or not timestamp.isascii() or not timestamp.isdigit() or not signatures:
        raise BadCredentials("missing svix headers")
    expected = sign(settings.resend_secret, msg_id, timestamp, raw_body).encode("ascii")
    matched = False
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        # Keep comparing after a match: the loop's duration should not depend on where it matched.
        if version == "v1" and hmac.compare_digest(expected, value.encode("utf-8")):
            matched = True
    if not matched:
        raise BadCredentials("bad signature")
    check_fresh(timestamp, settings, now, "resend")
    return Verified(replay_key=f"svix:{msg_id}")


def parse(raw_body: bytes) -> list[DeliveryEvent]:
    """One envelope per POST; one event per recipient in ``data.to``."""
    data = load_json(raw_body)
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise MalformedPayload("resend: the body must be an object with type and data")
    kind = str(data.get("type") or "")
    body: dict[str, Any] = data["data"]
    occurred = iso(data.get("created_at")) or iso(body.get("created_at"))
    if kind.startswith("contact."):
        return [_contact_event(kind, body, data, occurred)]
    event_type = EVENTS.get(kind, "other")
    bounce = obj(body.get("bounce"))
    if kind == "email.bounced":
        event_type = BOUNCE_TYPES.get(str(bounce.get("type") or "Permanent"), "hard_bounce")
    recipients = body.get("to")
    if isinstance(recipients, str):
        recipients = [recipients]
    if not isinstance(recipients, list) or not recipients:
        recipients = [""]
    email_id = str(body.get("email_id") or "")
    detail = {
        "type": kind,
        "email_id": email_id,
        "bounce_type": text(bounce.get("type")),
        "description": text(bounce.get("message")),
    }
    # Resend's body has no event id of its own (svix-id is in the headers); the email id, the
    # event type and its time identify one event per recipient, and are the same on retries.
    return [
        DeliveryEvent(
            provider=NAME,
            event_id=short_id(f"{email_id}:{kind}:{data.get('created_at') or ''}:{address(to)}"),
            event_type=event_type,
            email=address(to),
            occurred_at=occurred,
            ledger_id=ledger_id(_tag(body.get("tags"), LEDGER_KEY)),
            detail={k: v for k, v in detail.items() if v},
        )
        for to in recipients
    ]


def _contact_event(kind: str, body: dict[str, Any], data: dict[str, Any],
                   occurred: datetime | None) -> DeliveryEvent:
    # Resend's audiences report an unsubscribe as contact.updated with unsubscribed: true.
    event_type = "unsubscribe" if kind == "contact.updated" and body.get("unsubscribed") is True else "other"
    return DeliveryEvent(
        provider=NAME,
        event_id=short_id(f"{body.get('id') or ''}:{kind}:{body.get('updated_at') or data.get('created_at') or ''}"),
        event_type=event_type,
        email=address(body.get("email")),
        occurred_at=occurred,
        detail={"type": kind, "audience_id": text(body.get("audience_id"))},
    )


def _tag(tags: Any, name: str) -> Any:
    """A tag's value: Resend sends tags as an object, or as a list of {name, value}."""
    if isinstance(tags, dict):
        return tags.get(name)
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, dict) and tag.get("name") == name:
                return tag.get("value")
    return None
