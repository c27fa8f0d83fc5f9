"""Provider webhooks: verify, then parse into :class:`~digest.types.DeliveryEvent` values.

One module per provider, each with two pure functions (DESIGN.md rule 7)::

    verify(request_headers, raw_body, settings, now) -> Verified    raises WebhookVerificationError
    parse(raw_body) -> list[DeliveryEvent]                           raises MalformedPayload (a ValueError)

``verify`` never touches the store: it checks credentials or the signature and the signed
timestamp's freshness, and returns the request's *replay key* (Mailgun's token, the Svix id,
the SNS message id, a hash of SendGrid's signed bytes). The web route then applies the request
through ``pipeline.apply_events``, which records the replay key, the request's events and what
they do (suppressions) in one database transaction (``Store.apply_webhook``): a key remembered
means its events were applied, and a failure remembers neither, so the provider's retry is let
in. Keys are remembered for twice the provider's freshness window (``Webhooks.max_age_for``);
that memory only has to outlive the window, because an older copy is already refused as stale.

A second request carrying a remembered key is, for SendGrid, SNS and Svix, the same signed
content again: their signatures cover the whole body (and the key), so it is the provider
retrying after our answer was lost, or someone replaying a captured request. Either way it
is answered 200 as a duplicate and applies nothing (a reader re-activated since must stay
active), and the provider stops retrying instead of flagging the endpoint. Mailgun signs only
timestamp + token, so its ``verify`` also returns a ``content_hash`` of the body: the token is
a duplicate only on the same content; on other content it is a captured signature stapled onto
a forged event, and refused with 406 (which Mailgun takes as "rejected, do not retry").

Each event also has an id of its own, unique in the store and stored in the same transaction
as its effect, so the same event under another key (SendGrid signs each retry anew; SES may
publish one event in two SNS messages) is stored and applied once too. Postmark signs nothing
and sends no timestamp, so it has no replay key; the event ids alone keep its replays from
applying twice. An SNS SubscriptionConfirmation has no events and no memory: every validly
signed, fresh copy is confirmed again (see the web route).

``parse`` normalizes each provider's vocabulary through a small mapping table into
:data:`EVENT_TYPES`; anything unknown becomes ``other`` and is stored, never applied. It gives
each event's address in the form its subscriber is stored in (:func:`address`: providers report
an IDN domain IDNA-encoded, as it was sent). A value the store cannot hold (an address past its
column, a ledger id past its 32 bits) is dropped from its event, so one odd event does not hold
up the rest of a batch; text that is no Unicode (a lone surrogate) makes the body malformed.

Adding a provider is one module here plus one line in :data:`PROVIDERS`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any, Protocol

from digest.config import Webhooks
from digest.errors import WebhookVerificationError
from digest.subscribers import canonical_email
from digest.types import DeliveryEvent

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "delivered", "hard_bounce", "soft_bounce", "complaint", "unsubscribe",
    "deferred", "dropped", "open", "click", "other",
)

PROVIDERS: dict[str, str] = {
    "postmark": "digest.web.webhooks.postmark",
    "sendgrid": "digest.web.webhooks.sendgrid",
    "mailgun": "digest.web.webhooks.mailgun",
    "ses": "digest.web.webhooks.ses",
    "resend": "digest.web.webhooks.resend",
}

# The ledger id every send carries as provider metadata (DESIGN.md rule 1) comes back here.
LEDGER_KEY = "ledger_id"
# The largest ledger id: send_ledger.id and delivery_events.ledger_id are 32-bit Integers.
MAX_LEDGER_ID = 2**31 - 1
# The longest address the store holds (delivery_events.email and suppressions.email: String(320)).
MAX_ADDRESS = 320


class MalformedPayload(ValueError):
    """The body is not the shape the provider documents: HTTP 400, nothing applied."""


class BadCredentials(WebhookVerificationError):
    """Missing or wrong credentials or signature: HTTP 401."""

    status = 401


class Refused(WebhookVerificationError):
    """Authentic-looking but refused (not configured, stale, wrong topic): HTTP 403."""

    status = 403


class Unavailable(WebhookVerificationError):
    """Verification needs something we could not fetch (an SNS certificate): HTTP 503, retry."""

    status = 503


@dataclass(frozen=True)
class Verified:
    """What a successful ``verify`` learned about the request.

    ``replay_key`` names what the provider signed: the same on the provider's retries of one
    delivery (``None`` when the provider signs nothing). ``content_hash`` is set only where the
    signature does not cover the body (Mailgun): a hash of that body, which a request reusing
    the key must match to count as a duplicate. ``subscribe_url`` is set only for an SNS
    SubscriptionConfirmation, already checked to be an https URL on an
    ``sns.<region>.amazonaws.com`` host.
    """

    replay_key: str | None = None
    content_hash: str | None = None
    subscribe_url: str | None = None
    message_type: str = "notification"


class Handler(Protocol):
    """What a provider module offers (the module itself satisfies this)."""

    def verify(self, request_headers: Mapping[str, str], raw_body: bytes, settings: Webhooks,
               now: datetime) -> Verified: ...

    def parse(self, raw_body: bytes) -> list[DeliveryEvent]: ...


def handler(name: str) -> Handler:
    """The verifier/parser module for provider ``name``; ``KeyError`` if there is none."""
    module: Handler = importlib.import_module(PROVIDERS[name])
    return module


# -- helpers the provider modules share ---------------------------------------------------------


def header(request_headers: Mapping[str, str], name: str) -> str | None:
    """A header value, looked up case-insensitively (WSGI and test clients differ in case)."""
    wanted = name.lower()
    for key, value in request_headers.items():
        if key.lower() == wanted:
            return value
    return None


def not_configured(provider: str, keys: str) -> Refused:
    """Fail closed, with one log line that tells the operator which keys to set."""
    log.error("webhooks: %s webhooks are refused because %s is not set in config.yaml (webhooks:)",
              provider, keys)
    return Refused(f"{provider} webhooks are not configured")


def check_fresh(timestamp: str | None, settings: Webhooks, now: datetime, provider: str) -> int:
    """The signed epoch-seconds ``timestamp`` as an int, if within the provider's
    ``max_age`` (:meth:`Webhooks.max_age_for`) of ``now``.

    Future timestamps are refused too: a clock far ahead would otherwise stretch the replay
    window past the memory that guards it.
    """
    if not timestamp or not timestamp.strip().isascii() or not timestamp.strip().isdigit():
        raise BadCredentials("missing or malformed timestamp")
    value = int(timestamp.strip())
    check_age(datetime.fromtimestamp(value, UTC), settings, now, provider)
    return value


def check_age(when: datetime, settings: Webhooks, now: datetime, provider: str) -> None:
    """Refuse ``when`` if it is more than the provider's ``max_age`` seconds away from ``now``."""
    if abs((now - when).total_seconds()) > settings.max_age_for(provider):
        raise Refused("stale timestamp")


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (optional nested blocks)."""
    return value if isinstance(value, dict) else {}


def load_json(raw_body: bytes) -> Any:
    """The body as JSON; ``MalformedPayload`` (HTTP 400) if it is not."""
    try:
        return json.loads(raw_body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: a body nested thousands deep (which no provider sends).
        raise MalformedPayload(f"body is not JSON ({exc.__class__.__name__})") from exc


def address(value: Any) -> str:
    """The address of a recipient a provider reports, in the form its subscriber is stored in
    ('' for none, and for one the store cannot hold).

    Providers echo the To they were given, and ours carry the reader's name
    (``"Ada Quill <ada@example.com>"``): an event must suppress ``ada@example.com``. They were
    given the domain IDNA-encoded, as SMTP carries it, and report it so
    (``ada@xn--bcher-kva.example``), while the reader is stored as ``ada@bücher.example``:
    :func:`~digest.subscribers.canonical_email` turns the one into the other (and upper case or
    another Unicode normalization into the stored form), so the suppression names her row and
    the claim's ``x.email = l.email`` skips her. Text that is no valid address stays lower-cased.

    An address longer than the store's column, or holding a NUL (which PostgreSQL text cannot
    hold), is dropped: no subscriber has one, and the event is still stored and the rest of
    its request applied. A lone surrogate (a JSON escape like ``\\ud800``) is not text at all,
    and makes the body ``MalformedPayload``.
    """
    if not isinstance(value, str):
        return ""
    storable(value, "address")
    found: str = value.strip()
    if "<" in found:
        found = parseaddr(found)[1] or found
    if len(found) > MAX_ADDRESS or "\x00" in found:
        return ""
    found = canonical_email(found)
    return found if len(found) <= MAX_ADDRESS else ""


def storable(value: str, what: str) -> None:
    """``MalformedPayload`` if ``value`` holds a lone surrogate (a JSON escape like ``\\ud800``):
    that is no text a database driver can encode, and no provider's JSON encoder writes one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedPayload(f"an event's {what} is not valid Unicode text") from None


def content_id(value: Any) -> str:
    """A stable id for an event the provider gives no id of its own: a hash of its content.

    A byte-identical replay gets the same id, so it is stored (and applied) once.
    """
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a lone surrogate in a field we only hash must not fail the request.
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:48]


def short_id(value: str) -> str:
    """An event id the store can hold: up to 200 characters and no NUL (which PostgreSQL text
    cannot hold). Another one is hashed, never cut (two long ids sharing a prefix must not
    collide); one with a lone surrogate is ``MalformedPayload``, like such an address."""
    storable(value, "id")
    if len(value) <= 200 and "\x00" not in value:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def ledger_id(value: Any) -> int | None:
    """Our ledger id from provider metadata, if it is a plain integer within the ledger's ids.

    Anything else is no ledger id: the event is still stored and applied by its address. A
    number past the 32-bit column would fail the whole request on PostgreSQL (and overflow
    SQLite past 64 bits), and no send ledger row has one.
    """
    if isinstance(value, list) and value:  # SES tags are lists of values
        value = value[0]
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LEDGER_ID:
        return value
    return None


def text(value: Any, limit: int = 500) -> str:
    """A detail value as short text (details are stored and shown, never interpreted)."""
    if value is None:
        return ""
    return (value if isinstance(value, str) else json.dumps(value, sort_keys=True))[:limit]


def epoch(value: Any) -> datetime | None:
    """An epoch-seconds number (int, float or digit string) as an aware datetime."""
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def iso(value: Any) -> datetime | None:
    """An ISO 8601 string as an aware datetime (naive means UTC); ``None`` if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)  # 3.11 reads "Z" and 7 fractional digits
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
