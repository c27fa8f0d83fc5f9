"""Mailgun webhooks: HMAC-SHA256 over timestamp + token, inside the JSON body.

Verification (APIS.md A.3): the body is ``{"signature": {"timestamp", "token", "signature"},
"event-data": {...}}``; ``signature`` must equal the hex HMAC-SHA256, keyed with the webhook
signing key (``webhooks.mailgun_signing_key``, which is *not* the API key), of
``timestamp + token``. The signature covers only those two values, not the event, so the
freshness check and the token replay check are what stop an old signature being stapled to a
forged event: the token is the replay key, remembered for twice the freshness window together
with a hash of the body. That window is ``webhooks.mailgun_max_age`` (an hour), not the
others' five minutes, because Mailgun retries with the first attempt's signature and
timestamp (5, 15 and 30 minutes after it, then for up to 8 hours: intervals of 5, 10 and 15
minutes, then 1, 2 and 4 hours). The same
token on the same body is a copy (Mailgun retrying after our answer was lost): 200, and nothing
is applied again. The same token on another body is refused with 406, the
status Mailgun's docs say makes it stop retrying (documentation.mailgun.com, webhook retries).
The hash is of the parsed JSON in a canonical form, so a copy re-serialized with other spacing
or key order still matches, while any change to what is applied does not.

Only the current JSON webhooks are accepted; legacy form-encoded posts answer 400.
"""

from __future__ import annotations

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
    content_id,
    epoch,
    ledger_id,
    load_json,
    not_configured,
    obj,
    short_id,
    text,
)

NAME = "mailgun"

EVENTS: dict[str, str] = {
    "delivered": "delivered",
    "complained": "complaint",
    "unsubscribed": "unsubscribe",
    "opened": "open",
    "clicked": "click",
    "rejected": "dropped",
    "accepted": "other",
    "stored": "other",
}

# ``failed`` with ``severity: temporary`` is Mailgun still retrying: a delay, not a bounce.
# With ``severity: permanent`` the ``reason`` says why. "old" means Mailgun gave up retrying a
# temporary failure, which is a soft bounce (counted toward the limit, not suppressed at once);
# reasons not listed (generic, espblock ...) are recorded as dropped, since they do not prove
# the address is dead.
PERMANENT_REASONS: dict[str, str] = {
    "bounce": "hard_bounce",
    "suppress-bounce": "hard_bounce",
    "suppress-complaint": "complaint",
    "suppress-unsubscribe": "unsubscribe",
    "old": "soft_bounce",
}


def verify(request_headers: Mapping[str, str], raw_body: bytes, settings: Webhooks,
           now: datetime) -> Verified:
    """Check the HMAC, then freshness; the token is the replay key."""
    if not settings.mailgun_signing_key:
        raise not_configured(NAME, "webhooks.mailgun_signing_key")
    data = load_json(raw_body)
    block = data.get("signature") if isinstance(data, dict) else None
    if not isinstance(block, dict):
        raise BadCredentials("missing signature")
    timestamp, token, signature = (str(block.get(k) or "") for k in ("timestamp", "token", "signature"))
    if not (timestamp.isascii() and timestamp.isdigit() and token and signature and len(token) <= 200):
        raise BadCredentials("missing signature")
    expected = hmac.new(settings.mailgun_signing_key.encode("utf-8"),
                        (timestamp + token).encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode("ascii"), signature.lower().encode("utf-8")):
        raise BadCredentials("bad signature")
    check_fresh(timestamp, settings, now, "mailgun")
    return Verified(replay_key=f"token:{token}", content_hash=content_id(data))


def parse(raw_body: bytes) -> list[DeliveryEvent]:
    """One event per POST, under ``event-data``."""
    data = load_json(raw_body)
    item = data.get("event-data") if isinstance(data, dict) else None
    if not isinstance(item, dict):
        raise MalformedPayload("mailgun: the body has no event-data object")
    return [_event(item)]


def _event(item: dict[str, Any]) -> DeliveryEvent:
    name = str(item.get("event") or "")
    severity = str(item.get("severity") or "")
    reason = str(item.get("reason") or "")
    event_type = EVENTS.get(name, "other")
    if name == "failed":
        event_type = "deferred" if severity == "temporary" else PERMANENT_REASONS.get(reason, "dropped")
    status = obj(item.get("delivery-status"))
    message = obj(item.get("message"))
    headers = obj(message.get("headers"))
    variables = obj(item.get("user-variables"))
    raw_id = item.get("id")
    detail = {
        "event": name,
        "severity": severity,
        "reason": reason,
        "code": text(status.get("code")),
        "description": text(status.get("message") or status.get("description")),
        "message_id": text(headers.get("message-id")),
    }
    return DeliveryEvent(
        provider=NAME,
        # Mailgun promises its event ids unique "within a day" only: with the event's own
        # time (the same on every retry of one webhook), two days' events never collide.
        event_id=short_id(f"{raw_id}@{item.get('timestamp')}") if raw_id else content_id(item),
        event_type=event_type,
        email=address(item.get("recipient")),
        occurred_at=epoch(item.get("timestamp")),
        ledger_id=ledger_id(variables.get(LEDGER_KEY)),
        detail={k: v for k, v in detail.items() if v},
    )
