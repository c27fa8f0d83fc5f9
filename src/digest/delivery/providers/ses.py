"""Amazon SES API v2: ``POST /v2/email/outbound-emails``, one message per call, SigV4-signed.

Request: JSON ``{FromEmailAddress, Destination{ToAddresses}, ReplyToAddresses,
Content{Simple{Subject, Body{Text, Html}, Headers[{Name, Value}]}}, EmailTags,
ConfigurationSetName}`` on ``https://email.<region>.amazonaws.com``, signed with AWS Signature
Version 4 (service ``ses``), which :func:`sigv4_headers` implements with hashlib and hmac so
that every call goes through ``requests`` like the other providers. Answer: 200
``{"MessageId": ...}``; errors carry their type in the ``x-amzn-ErrorType`` header (or the
body's ``__type``/``code``) and a ``message``. Reference: shared/reference/APIS.md section A.4.

Why one message per call: ``SendEmail`` with ``Content.Simple`` takes one body for all its
recipients. The bulk endpoint (``SendBulkEmail``, 50 entries a call) renders a template, stored
or given inline, with each entry's replacement data; but SES documents inline templates as
"simple substitutions" without saying how a value is escaped in the HTML part or how literal
``{{`` in the digest's text is kept from being substituted, and a comment quoting ``{{name}}``
must reach readers as written. Full bodies send exactly the approved bytes. SES meters its
sending rate and quota per message, not per call, so batching would not send faster either.
So ``max_batch`` is 50 (the size of a batch the sender claims at once) and
:meth:`SesProvider.send_batch` makes one call per message, ``delivery.concurrency`` at a time,
paced by ``delivery.rate_per_second``.
A batch is then several calls, with the partial-batch rules of
:func:`~digest.delivery.providers.base.send_in_calls`: once a message was accepted, a later
429 no longer fails the whole batch (that would make the sender send the accepted ones
again); the messages not sent come back ``deferred``, for the queue. An error SES answers one
call with for good (a 400, ``LimitExceededException``) fails that call's message only and the
batch goes on; if SES answers every call of a batch so, the batch fails, and such batches in a
row pause the send (see ``send_in_calls``). ``MessageRejected`` is the reader's own refusal
(``rejected``: in the sandbox, an unverified recipient), except when it says the From address
or its domain is not verified in the region: that would refuse every reader alike, so it stops
the send with the batch back in the queue (:func:`refuses_the_sender`). ``digest check`` asks
SES whether it will send as ``newsletter.from`` (``GET /v2/email/identities/{identity}``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlsplit

import requests

from digest import clock
from digest.config import Delivery
from digest.delivery.mime import format_address, parse_mailbox
from digest.delivery.providers.base import (
    GATEWAY_STATUSES,
    CallPacer,
    HttpProvider,
    PreparedCall,
    UncertainDeliveryError,
    body_summary,
    checked_headers,
    response_text,
    send_in_calls,
)
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from digest.http import build_session
from digest.types import OutgoingMessage, SendResult

SERVICE = "ses"
SEND_PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"
IDENTITY_PATH = "/v2/email/identities/"  # + the identity (an address or a domain), encoded
ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Error types that concern one message: it is refused, the batch goes on.
_REJECTED = frozenset({"MessageRejected"})
# Error types that stop every message of the account: not retryable, with what to do.
_ACCOUNT_HINTS: dict[str, str] = {
    "AccountSuspendedException": "the SES account may no longer send; see the SES console",
    "SendingPausedException": "sending is paused for the SES account or configuration set",
    "NotFoundException": "check delivery.configuration_set and that the From identity exists",
    "MailFromDomainNotVerifiedException": "verify the MAIL FROM domain of newsletter.from in SES",
}
_THROTTLED = frozenset({"TooManyRequestsException", "ThrottlingException", "Throttling"})
# Why read the text: SES reports the daily quota with a throttling-looking error, but retrying
# within seconds cannot help; only the quota window (24 h) or a raised quota can.
_DAILY_QUOTA_RE = re.compile(r"daily (message|sending) quota", re.IGNORECASE)
_TAG_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")
# MessageRejected "Email address is not verified. The following identities failed the check in
# region EU-WEST-1: Name <a@x.org>, a@x.org" (ending in "..." when SES cuts the list). The From
# address (or its domain) among them: SES will take no message from it in this region. Only
# recipients named: the sandbox refusing that reader (unverified recipients).
_NOT_VERIFIED_RE = re.compile(r"not verified", re.IGNORECASE)
_FAILED_IDENTITIES_RE = re.compile(r"failed the check in region\s*([^:]*):(.*)", re.IGNORECASE | re.DOTALL)
_IDENTITY_TOKEN_RE = re.compile(r"[^\s,<>\"']+")
_FROM_HINT = ("verify the address of newsletter.from, or its domain, in SES in region {region}; identities "
              "are verified per region, so check delivery.region too")
_AUTH_HINT = (
    "check delivery.aws_access_key_id, delivery.aws_secret_access_key and delivery.region "
    "(and the system clock: SigV4 signatures expire after 15 minutes)"
)


# -- AWS Signature Version 4 ----------------------------------------------------------------


def _host(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


def canonical_request(
    method: str, url: str, headers: Mapping[str, str], body: bytes
) -> tuple[str, str]:
    """The SigV4 canonical request for a request and the ``SignedHeaders`` list. Pure.

    ``headers`` must include ``host`` and ``x-amz-date`` (any case); every header given is
    signed. Paths are encoded as botocore does for services other than S3 (each character
    outside ``A-Za-z0-9-_.~/`` percent-encoded, so an already encoded path is encoded again).
    """
    parts = urlsplit(url)
    path = quote(parts.path or "/", safe="/~")
    query = sorted(
        (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    canonical_query = "&".join(f"{k}={v}" for k, v in query)
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        # Trim and collapse runs of spaces in values (SigV4 "Trimall").
        lowered[name.strip().lower()] = " ".join(str(value).split())
    names = sorted(lowered)
    canonical_headers = "".join(f"{n}:{lowered[n]}\n" for n in names)
    signed_headers = ";".join(names)
    payload_hash = hashlib.sha256(body).hexdigest()
    canonical = (
        f"{method.upper()}\n{path}\n{canonical_query}\n"
        f"{canonical_headers}\n{signed_headers}\n{payload_hash}"
    )
    return canonical, signed_headers


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The SigV4 signing key: four chained HMAC-SHA256 over date, region, service, request."""
    key = _hmac(f"AWS4{secret_key}".encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def sigv4_headers(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    region: str,
    service: str,
    access_key: str,
    secret_key: str,
    session_token: str | None = None,
    *,
    now: datetime,
) -> dict[str, str]:
    """The headers that sign a request with AWS Signature Version 4. Pure.

    Signs ``host`` (from ``url``), ``x-amz-date`` (``now``), ``x-amz-security-token`` when
    ``session_token`` is given, and every header in ``headers``. Returns ``Host``,
    ``X-Amz-Date``, ``Authorization`` (and ``X-Amz-Security-Token``): send them with
    ``headers`` and ``body`` exactly as signed.
    """
    when = now.astimezone(UTC)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    added: dict[str, str] = {"Host": _host(url), "X-Amz-Date": amz_date}
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    to_sign = {k: v for k, v in headers.items() if k.lower() not in ("host", "x-amz-date")}
    canonical, signed_headers = canonical_request(method, url, {**to_sign, **added}, body)
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        (ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest())
    )
    signature = hmac.new(
        signing_key(secret_key, date, region, service),
        string_to_sign.encode("utf-8"),
        hashlib.sha256,
    ).hexdigest()
    added["Authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return added


# -- the provider ---------------------------------------------------------------------------


def unverified_identities(text: str) -> frozenset[str] | None:
    """The identities an SES "not verified" refusal names, lower-cased: each address and
    domain of its list, display names split off. None when the text names none (an older
    wording, "Email address is not verified." alone)."""
    match = _FAILED_IDENTITIES_RE.search(text)
    if match is None:
        return None
    names = frozenset(t.strip(".…").lower() for t in _IDENTITY_TOKEN_RE.findall(match.group(2)))
    return (names - {""}) or None


def refuses_the_sender(text: str, from_addr: str) -> bool:
    """True when an SES ``MessageRejected`` text is about the From identity, not the reader:
    "not verified", naming the From address or its domain (case-insensitively), or naming no
    identity at all (then nobody can tell it from a refusal of every message, and a refusal
    of every reader must never be recorded as each reader's own)."""
    if not _NOT_VERIFIED_RE.search(text):
        return False
    named = unverified_identities(text)
    if named is None:
        return True
    try:
        address = parse_mailbox(from_addr)[1].lower()
    except ValueError:
        return True  # cannot happen: the request was built from it
    return address in named or address.rpartition("@")[2] in named


def error_type(headers: Mapping[str, str], body: bytes) -> tuple[str, str]:
    """An SES error's type and message: ``("MessageRejected", "Email address is not ...")``.

    The type comes from ``x-amzn-ErrorType`` (``Name:http://...`` in some answers), else the
    body's ``__type`` (``namespace#Name``) or ``code``; ``headers`` have lower-case names.
    """
    data: Any = None
    try:
        data = json.loads(body) if body else None
    except ValueError:
        pass
    if not isinstance(data, dict):
        data = {}
    raw = headers.get("x-amzn-errortype") or data.get("__type") or data.get("code") or ""
    name = str(raw).split(":", 1)[0].rsplit("#", 1)[-1].strip()
    message = data.get("message") or data.get("Message") or ""
    return name, str(message)


class SesProvider(HttpProvider):
    """Sends through SES API v2, one signed call per message; see the module docstring."""

    name: ClassVar[str] = "ses"
    # Why 50: a sender batch, not an SES limit (SendEmail takes one message per call); large
    # enough that the claim/settle round trips are cheap, small enough to settle often.
    max_batch: ClassVar[int] = 50
    parallel_calls: ClassVar[bool] = True
    default_base_url: ClassVar[str] = "https://email.{region}.amazonaws.com"

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        if not (settings.region and settings.aws_access_key_id and settings.aws_secret_access_key):
            raise ConfigError(
                "delivery: provider ses needs region, aws_access_key_id and aws_secret_access_key"
            )
        # Why our own session: calls run delivery.concurrency at a time; the pool must hold them.
        own = session is None
        super().__init__(
            settings, session or build_session(pool_size=max(10, settings.concurrency))
        )
        self._owns_session = own
        self.region = settings.region
        self.base_url = (
            settings.base_url or self.default_base_url.format(region=self.region)
        ).rstrip("/")
        self.send_url = f"{self.base_url}{SEND_PATH}"
        self._access_key = settings.aws_access_key_id
        self._secret_key = settings.aws_secret_access_key
        self._session_token = settings.aws_session_token
        self._pacer = CallPacer(settings.rate_per_second)

    # -- sending ----------------------------------------------------------------------------

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One call per message, ``delivery.concurrency`` at a time; see ``send_in_calls``.

        Per-message refusals (``MessageRejected``) are ``rejected`` results, other permanent
        errors ``failed`` ones; throttling, auth and account errors (an unverified MAIL FROM
        domain among them) stop the batch.
        """
        if not messages:
            return []
        self._check_batch(messages)
        results = send_in_calls(
            self.name,
            [[m] for m in messages],
            self._send_one,
            concurrency=self.settings.concurrency,
            pacer=self._pacer,
        )
        by_id = {r.ledger_id: r for r in results}
        return [by_id[m.ledger_id] for m in messages]

    def _send_one(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        call = self.build_request(messages)
        if not call.messages:
            return list(call.refused)
        status, headers, body = self.perform(call)
        return self.handle_response(status, headers, body, call.messages)

    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        """The unsigned ``SendEmail`` request for one message. Pure (signing is in perform)."""
        if len(messages) != 1:
            raise ValueError("ses: SendEmail takes exactly one message per call")
        m = messages[0]
        try:
            to = format_address(m.to_name, m.to_email)
        except ValueError as exc:
            refused = SendResult(ledger_id=m.ledger_id, status="invalid", error=str(exc))
            return PreparedCall("POST", self.send_url, {}, b"", (), (refused,))
        data: dict[str, Any] = {
            "FromEmailAddress": self._address(m.from_addr, "newsletter.from"),
            "Destination": {"ToAddresses": [to]},
            "Content": {
                "Simple": {
                    "Subject": {"Data": m.subject, "Charset": "UTF-8"},
                    "Body": {
                        "Text": {"Data": m.text, "Charset": "UTF-8"},
                        "Html": {"Data": m.html, "Charset": "UTF-8"},
                    },
                    # Why Headers here and not Raw MIME: Simple keeps SES's own MIME building
                    # and DKIM, and still carries our per-recipient List-Unsubscribe pair.
                    "Headers": [{"Name": n, "Value": v} for n, v in checked_headers(m.headers)],
                }
            },
            # EmailTags come back in SES events (bounces, complaints): how we match them.
            # Values may hold only ASCII letters, digits, '_' and '-'.
            "EmailTags": [
                {"Name": "ledger_id", "Value": str(m.ledger_id)},
                {"Name": "draft_id", "Value": str(m.draft_id)},
            ],
        }
        if m.tag:
            tag = _TAG_UNSAFE_RE.sub("_", m.tag)[:256]
            data["EmailTags"].append({"Name": "tag", "Value": tag})
        if m.reply_to:
            data["ReplyToAddresses"] = [self._address(m.reply_to, "newsletter.reply_to")]
        if self.settings.configuration_set:
            data["ConfigurationSetName"] = self.settings.configuration_set
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return PreparedCall(
            method="POST",
            url=self.send_url,
            headers={"Content-Type": "application/json"},
            body=body,
            messages=(m,),
        )

    def _address(self, value: str, key: str) -> str:
        try:
            name, addr = parse_mailbox(value)
            return format_address(name, addr)
        except ValueError as exc:
            raise BlockedError(f"ses: bad address in {key}: {exc}", hint=f"check {key}") from exc

    def perform(self, call: PreparedCall) -> tuple[int, Mapping[str, str], bytes]:
        """Sign ``call`` now (SigV4 dates expire after 15 minutes) and send it once."""
        return self.request(call.method, call.url, self._signed(call), call.body, sends_mail=True)

    def _signed(self, call: PreparedCall) -> dict[str, str]:
        signed = sigv4_headers(
            call.method,
            call.url,
            call.headers,
            bytes(call.body),  # the signature covers the body's bytes
            self.region,
            SERVICE,
            self._access_key or "",
            self._secret_key or "",
            self._session_token,
            now=clock.now(),
        )
        return {**call.headers, **signed}

    # -- answers ----------------------------------------------------------------------------

    def handle_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """Classify by SES error type first: a 429 may be a daily quota, a 403 a signature."""
        lowered = {k.lower(): v for k, v in headers.items()}
        if status >= 400:
            self._raise_for_error(status, lowered, body)
        return self.parse_response(status, lowered, body, messages)

    def _raise_for_error(
        self, status: int, headers: Mapping[str, str], body: bytes, *, sends_mail: bool = True
    ) -> None:
        if sends_mail and status in GATEWAY_STATUSES:
            # Before any error type: a gateway answered, not SES, and SES may have taken the
            # message already. Whatever the body says, only SES's own answer would tell.
            raise self.gateway_error(status, headers, body)
        if status in (407, 408, 413):  # a proxy's, or the HTTP layer's: as for every provider
            self.raise_for_common_status(status, headers, body, sends_mail=sends_mail)
        kind, text = error_type(headers, body)
        what = f"ses: HTTP {status} {kind or 'error'}: {text}".rstrip(": ")
        shown = response_text(body)
        if status in (401, 403):
            # SignatureDoesNotMatch, InvalidClientTokenId, ExpiredToken, AccessDenied ...
            raise AuthError(what, status=status, response_text=shown, hint=_AUTH_HINT)
        if _DAILY_QUOTA_RE.search(text):
            raise BlockedError(
                what,
                status=status,
                response_text=shown,
                hint="the SES daily sending quota is used up; the send can resume once it resets, "
                "or ask AWS for a higher quota",
            )
        if kind in _ACCOUNT_HINTS:
            raise BlockedError(what, status=status, response_text=shown, hint=_ACCOUNT_HINTS[kind])
        if kind == "LimitExceededException":
            raise DeliveryError(what, retryable=False, status=status, response_text=shown)
        if status == 429 or status >= 500 or kind in _THROTTLED:
            # Why no Retry-After from SES: it sends none; the sender's backoff applies.
            raise DeliveryError(
                what,
                retryable=True,
                status=status,
                response_text=shown,
                retry_after=self.retry_after_of(status, headers),
            )

    def parse_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """200 → sent with the MessageId; a per-message refusal → rejected; else an error."""
        (m,) = messages
        if 200 <= status < 300:
            data = self.decode_json(status, body)
            message_id = data.get("MessageId") if isinstance(data, dict) else None
            if not message_id:
                raise UncertainDeliveryError(
                    f"ses: HTTP {status} without a MessageId; the message may have been accepted",
                    status=status,
                    response_text=response_text(body),
                )
            return [SendResult(m.ledger_id, "sent", str(message_id))]
        kind, text = error_type(headers, body)
        if kind in _REJECTED and refuses_the_sender(text, m.from_addr):
            # The From identity is not verified in this region (a new domain, a typo in
            # newsletter.from, or the wrong delivery.region): every message meets the same
            # answer and no reader is at fault, so the send stops with the batch in the queue.
            raise BlockedError(
                response_text(f"ses: HTTP {status} {kind}: {text}"),
                status=status,
                response_text=response_text(body),
                hint=_FROM_HINT.format(region=self.region),
            )
        if kind in _REJECTED:
            # MessageRejected: e.g. an unverified recipient in the sandbox, or content SES
            # refuses. (An unverified MAIL FROM domain comes per message too, but refuses
            # every message alike: it stops the send instead, see _ACCOUNT_HINTS; so does an
            # unverified From, above.)
            return [SendResult(m.ledger_id, "rejected", None, response_text(f"SES {kind}: {text}"))]
        raise self.status_error(status, body, f"{kind}: {text}" if kind else text)

    def check(self) -> str:
        """``GET /v2/email/account``: proves the keys, the region and the URL, sends nothing.
        Then, when the From address is known (:attr:`~.base.Provider.from_addr`), whether SES
        may send as it in this region (:meth:`_check_identity`)."""
        data = self._get_json(ACCOUNT_PATH)[1] or {}
        line = f"ses: reached account in {self.region} at {self.base_url}"
        quota = data.get("SendQuota") or {}
        if isinstance(quota, dict) and quota.get("MaxSendRate") is not None:
            line += (
                f", {quota.get('MaxSendRate')} messages/s, "
                f"{quota.get('SentLast24Hours', '?')} of {quota.get('Max24HourSend', '?')} "
                "sent in 24 h"
            )
        if data.get("SendingEnabled") is False:
            raise DeliveryError(
                "ses: sending is disabled for this account",
                hint=_ACCOUNT_HINTS["SendingPausedException"],
            )
        if data.get("ProductionAccessEnabled") is False:
            line += " (sandbox: only verified recipients receive mail)"
        if self.from_addr:
            line += f"; {self._check_identity(self.from_addr)}"
        return line

    def _get_json(self, path: str, *, identity: bool = False) -> tuple[int, dict[str, Any] | None]:
        """A signed GET of ``path`` (for ``check``, which sends nothing): its status and its
        JSON object. With ``identity``, a 404 (no such identity) and a 401/403 (these keys may
        not read identities) come back as their status and None; other errors are raised."""
        url = f"{self.base_url}{path}"
        call = PreparedCall("GET", url, {}, b"", ())
        status, headers, body = self.request("GET", url, self._signed(call))
        lowered = {k.lower(): v for k, v in headers.items()}
        if identity and status in (401, 403, 404):
            return status, None
        if status >= 400:
            self._raise_for_error(status, lowered, body, sends_mail=False)
            raise self.status_error(status, body, " ".join(error_type(lowered, body)))
        try:
            data = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, body_summary(body)) from None
        if not isinstance(data, dict):
            raise self.status_error(status, body, "unexpected answer")
        return status, data

    def _check_identity(self, from_addr: str) -> str:
        """``GET /v2/email/identities/{identity}`` for the From address, then for its domain:
        SES sends as an address verified itself or at a verified domain. One line for
        ``check`` when SES may send as it; a :class:`BlockedError` naming what to verify when
        it may not (what a send would meet at its first message).

        Why a refusal of this call is no failure: keys made for sending alone may not be
        allowed to read identities (``ses:GetEmailIdentity``), and they send all the same."""
        address = parse_mailbox(self._address(from_addr, "newsletter.from"))[1]
        domain = address.rpartition("@")[2].lower()  # a domain name has no case
        seen: list[str] = []
        for name in (address, domain):
            status, data = self._get_json(IDENTITY_PATH + quote(name, safe=""), identity=True)
            if status in (401, 403):
                return f"could not read the SES identity of {address} (these keys may not: ses:GetEmailIdentity)"
            if data is None:
                continue
            verified = data.get("VerifiedForSendingStatus")
            if verified is None:
                verified = data.get("VerificationStatus") == "SUCCESS"
            if verified is True:
                return f"may send as {address} ({name} is verified)"
            seen.append(f"{name}: {data.get('VerificationStatus') or 'not verified'}")
        state = "; ".join(seen) if seen else "neither it nor its domain is an identity there"
        raise BlockedError(
            f"ses: SES in {self.region} will not send as {address} ({state})",
            hint=_FROM_HINT.format(region=self.region),
        )
