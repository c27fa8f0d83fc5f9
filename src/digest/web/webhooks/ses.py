"""Amazon SES feedback through SNS: an X.509-signed SNS envelope around a JSON SES event.

Verification (APIS.md A.4; docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html),
in this order:

1. ``webhooks.ses_topic_arns`` must be set (fail closed), and the envelope's ``TopicArn`` must
   be one of them: anyone can create an SNS topic and point it at us, and SNS signs theirs too.
2. The ``x-amz-sns-message-type`` header must equal the body's ``Type``.
3. ``SigningCertURL`` must be ``https://sns.<region>.amazonaws.com/….pem`` (no userinfo, no
   other port): the certificate is only as trustworthy as the host it came from, and the TLS
   connection to that host is what makes it Amazon's.
4. The certificate (fetched once per URL and cached; the fetch is injectable) must be within
   its validity period and hold an RSA key, and ``Signature`` must verify over the canonical
   string: ``Key\\nValue\\n`` for each signed field, in the documented order, with SHA1withRSA for
   ``SignatureVersion`` 1 and SHA256withRSA for 2.
5. ``Timestamp`` must be within ``webhooks.max_age``. SNS retries keep the original timestamp,
   so a retry older than ``max_age`` is refused; raise ``max_age`` to match a topic's delivery
   policy if it retries longer.

The SNS ``MessageId`` (the same on SNS retries) is the replay key, but never an event's id: an
event published again in another SNS message is the same event (SES's ``feedbackId`` for bounces
and complaints, the content for the rest), stored and counted once. A SubscriptionConfirmation is
verified the same way; its ``SubscribeURL`` must be ``https://sns.<region>.amazonaws.com/`` with
``Action=ConfirmSubscription`` before the web route fetches it (on every copy SNS sends: the
replay key does not apply to it).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from digest.config import Webhooks
from digest.errors import DigestError, WebhookVerificationError
from digest.types import DeliveryEvent
from digest.web.webhooks import (
    LEDGER_KEY,
    BadCredentials,
    MalformedPayload,
    Refused,
    Unavailable,
    Verified,
    address,
    check_age,
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

log = logging.getLogger(__name__)

NAME = "ses"
MESSAGE_TYPES = {
    "Notification": "notification",
    "SubscriptionConfirmation": "subscription_confirmation",
    "UnsubscribeConfirmation": "unsubscribe_confirmation",
}
# The signed fields, in the order AWS documents; Subject only when present.
NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
SIGNATURE_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
MAX_CERT_BYTES = 64 * 1024

# sns.<region>.amazonaws.com, where a region is e.g. us-east-1, eu-central-2, us-gov-west-1.
_SNS_HOST_RE = re.compile(r"^sns\.[a-z]{2}(?:-[a-z]+)+-\d{1,2}\.amazonaws\.com$")

# The SES event (eventType, or notificationType for identity notifications) → our type, for
# events whose recipients are simply the message's destinations. Bounce, Complaint, Delivery,
# DeliveryDelay and Subscription say which recipients they concern, and are handled below.
EVENTS: dict[str, str] = {
    "Send": "other",
    "Reject": "dropped",
    "Open": "open",
    "Click": "click",
    "Rendering Failure": "other",
}
# Undetermined means SES could not tell; only a Permanent bounce proves the address is dead.
BOUNCE_TYPES: dict[str, str] = {"Permanent": "hard_bounce", "Transient": "soft_bounce",
                                "Undetermined": "soft_bounce"}
# A complaint whose feedback type is "not-spam" is a reader un-marking spam, not a complaint.
COMPLAINT_FEEDBACK: dict[str, str] = {"not-spam": "other"}


def trusted_sns_url(url: str, *, pem: bool) -> str:
    """``url`` if it is https on an ``sns.<region>.amazonaws.com`` host; ``Refused`` otherwise.

    ``pem``: a certificate URL must name a ``.pem`` file. Checks the parsed host, so
    ``sns.us-east-1.amazonaws.com.evil.com`` and ``…amazonaws.com@evil.com`` both fail.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused("untrusted SNS URL") from None
    host = parts.hostname or ""
    if (
        parts.scheme != "https"
        or "@" in parts.netloc
        or port not in (None, 443)
        or not _SNS_HOST_RE.match(host)
        or (pem and not parts.path.endswith(".pem"))
    ):
        raise Refused("untrusted SNS URL")
    return url


def _https_get(url: str) -> bytes:
    """Fetch a certificate through ``digest.http`` (timeouts, size cap, a redirect cap)."""
    from digest.http import build_session, fetch

    session = build_session(pool_size=1)
    try:
        fetched = fetch(session, url, max_bytes=MAX_CERT_BYTES, retries=1)
    finally:
        session.close()
    trusted_sns_url(fetched.url, pem=True)  # a redirect must not lead off an SNS host
    return fetched.body


class CertificateCache:
    """SNS signing certificates by URL. ``fetch`` is the only network call (tests pass a dict's getter).

    Certificates change rarely, so each URL is fetched once per process; the cache is bounded
    because an attacker can name many (trusted-host) URLs.
    """

    # How long a URL that could not be fetched is not tried again: requests naming URLs that do
    # not exist (on a trusted host) then cost a fetch every few seconds each, not one per
    # request. Shorter than SNS's 20 seconds between retries, so its retry fetches again.
    RETRY_AFTER = 10.0

    def __init__(self, fetch: Callable[[str], bytes] | None = None, max_entries: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch = fetch or _https_get
        self.max_entries = max_entries
        self.clock = clock
        self._certs: dict[str, x509.Certificate] = {}
        self._failed: dict[str, float] = {}  # url -> when its fetch failed
        self._lock = threading.Lock()

    def get(self, url: str) -> x509.Certificate:
        """The certificate at ``url`` (which must pass :func:`trusted_sns_url`)."""
        trusted_sns_url(url, pem=True)
        with self._lock:
            cached = self._certs.get(url)
            failed = self._failed.get(url)
        if cached is not None:
            return cached
        if failed is not None and self.clock() - failed < self.RETRY_AFTER:
            raise Unavailable("signing certificate unavailable")
        try:
            body = self.fetch(url)
            cert = x509.load_pem_x509_certificate(body)
        except WebhookVerificationError:
            raise
        except (DigestError, OSError, KeyError, ValueError) as exc:
            log.warning("webhooks: ses: could not fetch or read the SNS certificate %s: %s", url, exc)
            with self._lock:
                if len(self._failed) >= self.max_entries:
                    self._failed.pop(next(iter(self._failed)))
                self._failed[url] = self.clock()
            raise Unavailable("signing certificate unavailable") from exc
        with self._lock:
            self._failed.pop(url, None)
            if len(self._certs) >= self.max_entries:
                self._certs.pop(next(iter(self._certs)))
            self._certs[url] = cert
        return cert


# The process-wide cache the web route uses unless it is given another.
CERTIFICATES = CertificateCache()


def string_to_sign(envelope: Mapping[str, Any]) -> bytes:
    """The canonical bytes SNS signed: ``Key\\nValue\\n`` per field, in the documented order."""
    fields = NOTIFICATION_FIELDS if envelope.get("Type") == "Notification" else CONFIRMATION_FIELDS
    out: list[str] = []
    for name in fields:
        value = envelope.get(name)
        if name == "Subject" and value is None:
            continue
        if not isinstance(value, str):
            raise BadCredentials(f"missing signed field {name}")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode("utf-8")


def verify(request_headers: Mapping[str, str], raw_body: bytes, settings: Webhooks, now: datetime,
           *, certificates: CertificateCache | None = None) -> Verified:
    """Check topic, certificate URL, certificate, signature and freshness (module docstring)."""
    if not settings.ses_topic_arns:
        raise not_configured(NAME, "webhooks.ses_topic_arns")
    envelope = load_json(raw_body)
    if not isinstance(envelope, dict):
        raise MalformedPayload("ses: the body must be an SNS message object")
    kind = envelope.get("Type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise BadCredentials("not an SNS message")
    if header(request_headers, "x-amz-sns-message-type") != kind:
        raise BadCredentials("message type header does not match the body")
    if envelope.get("TopicArn") not in settings.ses_topic_arns:
        raise Refused("topic not allowed")
    hash_factory = SIGNATURE_HASHES.get(str(envelope.get("SignatureVersion") or ""))
    if hash_factory is None:
        raise BadCredentials("unsupported signature version")
    cert_url = envelope.get("SigningCertURL")
    if not isinstance(cert_url, str):
        raise BadCredentials("missing certificate URL")
    trusted_sns_url(cert_url, pem=True)
    try:
        signature = base64.b64decode(str(envelope.get("Signature") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise BadCredentials("bad signature") from None
    sent_at = iso(envelope.get("Timestamp"))
    if sent_at is None:
        raise BadCredentials("bad timestamp")
    # Before the certificate: a stale or replayed copy costs no fetch. The signature checked
    # below covers the timestamp, so the order changes nothing else.
    check_age(sent_at, settings, now, "ses")
    signed = string_to_sign(envelope)
    cert = (certificates or CERTIFICATES).get(cert_url)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Refused("signing certificate expired or not yet valid")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadCredentials("signing certificate is not RSA")
    try:
        key.verify(signature, signed, padding.PKCS1v15(), hash_factory())
    except InvalidSignature:
        raise BadCredentials("bad signature") from None
    subscribe_url = None
    if kind == "SubscriptionConfirmation":
        subscribe_url = trusted_sns_url(str(envelope.get("SubscribeURL") or ""), pem=False)
        if parse_qs(urlsplit(subscribe_url).query).get("Action") != ["ConfirmSubscription"]:
            raise Refused("untrusted SNS URL")
    return Verified(replay_key=f"sns:{envelope['MessageId']}", subscribe_url=subscribe_url,
                    message_type=MESSAGE_TYPES[kind])


def parse(raw_body: bytes) -> list[DeliveryEvent]:
    """Events of a Notification (one per recipient it concerns); other SNS types carry none."""
    envelope = load_json(raw_body)
    if not isinstance(envelope, dict):
        raise MalformedPayload("ses: the body must be an SNS message object")
    if envelope.get("Type") != "Notification":
        return []
    try:
        message = json.loads(str(envelope.get("Message") or ""))
    except json.JSONDecodeError:
        # SNS test messages and SES's "Successfully validated" notice are plain text.
        return []
    except RecursionError as exc:
        raise MalformedPayload("ses: the message is nested too deep") from exc
    if not isinstance(message, dict):
        return []
    try:
        return _events(message)
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedPayload(f"ses: unexpected event shape ({exc.__class__.__name__}: {exc})") from exc


def _events(message: dict[str, Any]) -> list[DeliveryEvent]:
    kind = str(message.get("eventType") or message.get("notificationType") or "")
    # The event's own identity, never the SNS MessageId: SNS keeps that id only across its own
    # retries, and every publish gets a new one, so one SES event published twice (event
    # publishing and identity notifications both set up, or two topics of ours) would count
    # twice, and a soft bounce twice toward the limit. Bounces and complaints carry SES's
    # feedbackId; other events have no id of their own, so their content identifies them.
    feedback_id = ""
    if kind in ("Bounce", "Complaint"):
        feedback_id = str(obj(message.get(kind.lower())).get("feedbackId") or "")
    identity = f"ses-feedback:{feedback_id}" if feedback_id else content_id(message)
    mail: dict[str, Any] = message.get("mail") or {}
    tags = obj(mail.get("tags"))
    base_detail = {"event": kind, "message_id": text(mail.get("messageId"))}
    destinations = [str(d) for d in mail.get("destination") or []]
    # (recipient, our type, when, extra detail) for each recipient the event concerns.
    rows: list[tuple[str, str, Any, dict[str, str]]]
    if kind == "Bounce":
        bounce = message["bounce"]
        event_type = BOUNCE_TYPES.get(str(bounce.get("bounceType")), "soft_bounce")
        extra = {"bounce_type": text(bounce.get("bounceType")), "bounce_subtype": text(bounce.get("bounceSubType"))}
        rows = [(r["emailAddress"], event_type, bounce.get("timestamp"),
                 {**extra, "description": text(r.get("diagnosticCode"))})
                for r in bounce.get("bouncedRecipients") or []]
    elif kind == "Complaint":
        complaint = message["complaint"]
        feedback = str(complaint.get("complaintFeedbackType") or "")
        event_type = COMPLAINT_FEEDBACK.get(feedback, "complaint")
        rows = [(r["emailAddress"], event_type, complaint.get("timestamp"), {"feedback_type": feedback})
                for r in complaint.get("complainedRecipients") or []]
    elif kind == "Delivery":
        delivery = message["delivery"]
        rows = [(str(r), "delivered", delivery.get("timestamp"), {})
                for r in delivery.get("recipients") or destinations]
    elif kind == "DeliveryDelay":
        delay = message["deliveryDelay"]
        rows = [(r["emailAddress"], "deferred", delay.get("timestamp"),
                 {"description": text(r.get("diagnosticCode"))})
                for r in delay.get("delayedRecipients") or []]
    elif kind == "Subscription":
        subscription = message["subscription"]
        prefs = subscription.get("newTopicPreferences") or {}
        event_type = "unsubscribe" if prefs.get("unsubscribeAll") is True else "other"
        rows = [(d, event_type, subscription.get("timestamp"), {}) for d in destinations]
    else:
        rows = [(d, EVENTS.get(kind, "other"), mail.get("timestamp"), {}) for d in destinations]
    return [
        DeliveryEvent(
            provider=NAME,
            # One event per recipient the SES event concerns.
            event_id=short_id(f"{identity}:{address(email)}"),
            event_type=event_type,
            email=address(email),
            occurred_at=iso(when) or iso(mail.get("timestamp")),
            ledger_id=ledger_id(tags.get(LEDGER_KEY)),
            detail={k: v for k, v in {**base_detail, **extra}.items() if v},
        )
        for email, event_type, when, extra in rows
    ]


def confirm_subscription(url: str) -> None:
    """GET a SubscriptionConfirmation's ``SubscribeURL`` (checked again here), without redirects.

    ``Unavailable`` if SNS does not answer 2xx, so the web route answers 503 and SNS retries.
    """
    import requests

    from digest.http import DEFAULT_TIMEOUT, build_session

    trusted_sns_url(url, pem=False)
    session = build_session(pool_size=1)
    try:
        with session.get(url, timeout=DEFAULT_TIMEOUT, allow_redirects=False) as response:
            status = response.status_code
    except requests.RequestException as exc:
        raise Unavailable("could not confirm the subscription") from exc
    finally:
        session.close()
    if not 200 <= status < 300:
        raise Unavailable(f"could not confirm the subscription (HTTP {status})")
