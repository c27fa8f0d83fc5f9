"""Postmark webhooks: HTTP Basic auth, one JSON event per POST.

Postmark signs nothing (APIS.md A.1): the operator puts ``user:password@`` in the webhook URL
and we compare both halves in constant time. There is no signed timestamp, so freshness cannot
be checked and there is no replay key; a replayed event is stored and applied once because its
event id (Postmark's ``ID``, else a hash of the event) is unique in the store.
"""

from __future__ import annotations

import base64
import binascii
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
    content_id,
    header,
    iso,
    ledger_id,
    load_json,
    not_configured,
    obj,
    short_id,
    text,
)

NAME = "postmark"

# RecordType → our type; Bounce and SubscriptionChange are refined by the tables below.
RECORD_TYPES: dict[str, str] = {
    "Delivery": "delivered",
    "Open": "open",
    "Click": "click",
    "SpamComplaint": "complaint",
}

# A Bounce record's ``Type``. Transient means Postmark is still retrying (a delay, not a bounce);
# ManuallyDeactivated/Blocked/DMARCPolicy are Postmark refusing or a policy rejection, which we
# record but do not treat as the reader's address being dead.
BOUNCE_TYPES: dict[str, str] = {
    "HardBounce": "hard_bounce",
    "BadEmailAddress": "hard_bounce",
    "SoftBounce": "soft_bounce",
    "DnsError": "soft_bounce",
    "Transient": "deferred",
    "SpamComplaint": "complaint",
    "Unsubscribe": "unsubscribe",
    "ManuallyDeactivated": "dropped",
    "Blocked": "dropped",
    "DMARCPolicy": "dropped",
}

# A SubscriptionChange with SuppressSending=true, by SuppressionReason. SuppressSending=false
# (Postmark reactivated the address) maps to "other": only the reader's own new consent
# re-activates a subscriber here, never a provider.
SUPPRESSION_REASONS: dict[str, str] = {
    "HardBounce": "hard_bounce",
    "SpamComplaint": "complaint",
    "ManualSuppression": "unsubscribe",
}

# Which field holds the address and the time, per RecordType.
_EMAIL_FIELD = {"Bounce": "Email", "SpamComplaint": "Email"}
_TIME_FIELDS = ("BouncedAt", "DeliveredAt", "ReceivedAt", "ChangedAt")


def verify(request_headers: Mapping[str, str], raw_body: bytes, settings: Webhooks,
           now: datetime) -> Verified:
    """Check the Basic credentials against ``webhooks.postmark_username``/``_password``."""
    if not settings.postmark_username or not settings.postmark_password:
        raise not_configured(NAME, "webhooks.postmark_username / webhooks.postmark_password")
    auth = header(request_headers, "Authorization") or ""
    scheme, _, encoded = auth.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise BadCredentials("basic auth required")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadCredentials("basic auth required") from None
    user, sep, password = decoded.partition(b":")
    # Compare both halves every time (no early exit) so timing says nothing about which failed.
    user_ok = hmac.compare_digest(user, settings.postmark_username.encode("utf-8"))
    password_ok = hmac.compare_digest(password, settings.postmark_password.encode("utf-8"))
    if not (sep and user_ok and password_ok):
        raise BadCredentials("wrong credentials")
    return Verified(replay_key=None)


def parse(raw_body: bytes) -> list[DeliveryEvent]:
    """One event per POST (a list is accepted too, for batch replays an operator might send)."""
    data = load_json(raw_body)
    records = data if isinstance(data, list) else [data]
    return [_event(record) for record in records]


def _event(record: Any) -> DeliveryEvent:
    if not isinstance(record, dict):
        raise MalformedPayload("postmark: an event must be a JSON object")
    record_type = str(record.get("RecordType") or "")
    kind = str(record.get("Type") or "")
    event_type = RECORD_TYPES.get(record_type, "other")
    if record_type == "Bounce":
        event_type = BOUNCE_TYPES.get(kind, "other")
    elif record_type == "SubscriptionChange":
        reason = str(record.get("SuppressionReason") or "")
        event_type = SUPPRESSION_REASONS.get(reason, "other") if record.get("SuppressSending") is True else "other"
    email = record.get(_EMAIL_FIELD.get(record_type, "Recipient")) or record.get("Email") or ""
    # Bounces and complaints carry Postmark's own numeric ID; other records have none, so a
    # hash of the record stands in (a byte-identical retry still dedupes).
    raw_id = record.get("ID")
    event_id = f"{record_type}:{raw_id}" if raw_id not in (None, "") else content_id(record)
    occurred = next((t for t in (iso(record.get(f)) for f in _TIME_FIELDS) if t is not None), None)
    metadata = obj(record.get("Metadata"))
    detail = {
        "record_type": record_type,
        "type": kind,
        "message_id": text(record.get("MessageID")),
        "description": text(record.get("Description") or record.get("Details")),
        "tag": text(record.get("Tag")),
    }
    if record_type == "SubscriptionChange":
        detail["suppression_reason"] = text(record.get("SuppressionReason"))
    return DeliveryEvent(
        provider=NAME,
        event_id=short_id(event_id),
        event_type=event_type,
        email=address(email),
        occurred_at=occurred,
        ledger_id=ledger_id(metadata.get(LEDGER_KEY)),
        detail={k: v for k, v in detail.items() if v},
    )
