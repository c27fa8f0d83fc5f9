"""Resend: ``POST /emails/batch``, up to 100 full emails per call, with an idempotency key.

Request: a JSON array of ``{from, to, subject, html, text, headers, tags, reply_to}`` with
``Authorization: Bearer re_...`` and ``Idempotency-Key``. Answer: 200 ``{"data": [{"id"}, ...]}``
in request order; errors are ``{"statusCode", "name", "message"}``. The batch is validated
all or nothing (Resend's default "strict" mode). Reference: shared/reference/APIS.md
section A.5.

**Idempotency.** Resend keeps an ``Idempotency-Key`` for 24 hours: the same key with the same
body returns the first answer (the same ids) and sends nothing. :meth:`ResendProvider.
idempotency_key` derives the key from the batch itself (draft id and the sorted ledger ids)
and the installation (:attr:`~digest.delivery.providers.base.Provider.installation`), so the
very same batch always carries the very same key, and resending it after an uncertain outcome
(a timeout, a reset, a gateway's 502, 504 or 524) cannot deliver it twice. That is what
:attr:`idempotent` says. Why the installation: keys are per Resend team, and another
installation on the same team (staging, a second newsletter) has the same draft and ledger
ids, with other bodies (Resend would refuse its batches: 409). :meth:`ResendProvider.key_space`
names the keys' space (this format, the installation, the account), so that a batch is resent
by itself only where Resend saw it under the same key.
Our bodies are deterministic for a ledger row (the signed links carry no timestamp and we send
no Message-ID), which is what makes the repeat byte-identical.

**Templates.** Like Postmark, Resend takes a full body per message, so the sender hands it a
template and each recipient's slot values (:attr:`ResendProvider.accepts_templates`): the JSON
everyone shares is encoded once per draft and each message splices in only its own values.
The result is byte for byte the body :meth:`ResendProvider.build_request` gives for the
expanded messages, under the same key, so a batch resent after a crash is still a replay.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, ClassVar, NamedTuple

import requests

from digest.config import Delivery
from digest.delivery.mime import clean_header_value, format_address, parse_mailbox
from digest.delivery.providers.base import (
    HttpProvider,
    PreparedCall,
    UncertainDeliveryError,
    body_summary,
    checked_headers,
    json_escape,
    json_string,
    response_text,
)
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from digest.http import retry_after_seconds
from digest.types import (
    SLOT_NAMES,
    OutgoingMessage,
    SendResult,
    TemplateMessage,
    TemplateRecipient,
)

API_URL = "https://api.resend.com"
KEY_LIMIT = 256  # characters of an Idempotency-Key

_AUTH_NAMES = frozenset({"missing_api_key", "invalid_api_key", "restricted_api_key"})
_QUOTA_NAMES = frozenset({"daily_quota_exceeded", "monthly_quota_exceeded"})


def _error(body: bytes) -> tuple[str, str]:
    """Resend's error ``name`` and ``message`` ('' when the body is not its error shape)."""
    try:
        data = json.loads(body)
    except ValueError:
        return "", body_summary(body)
    if not isinstance(data, dict):
        return "", ""
    return str(data.get("name") or ""), str(data.get("message") or "")


# The keys' format, in the key space (ResendProvider.key_space): a batch sent under keys of
# another format (before the installation was in them: "digest/<draft>/<hash>") would get a
# new key now, so it is not resent by itself.
KEY_FORMAT = "digest/<installation>/<drafts>/<sha256 of ledger ids>"


def _key(installation: str, draft_ids: Iterable[int], ledger_ids: Iterable[int]) -> str:
    """The Idempotency-Key of a batch (see :meth:`ResendProvider.idempotency_key`); both the
    full-body and the template path derive it here, so a batch has one key whichever built it."""
    drafts = "+".join(str(d) for d in sorted(set(draft_ids)))
    ids = ",".join(str(i) for i in sorted(ledger_ids))
    return f"digest/{installation or '-'}/{drafts}/{hashlib.sha256(ids.encode('ascii')).hexdigest()}"[:KEY_LIMIT]


class _Skeleton(NamedTuple):
    """The JSON of one email that every recipient of a template shares, as byte pieces.

    An email is ``head <to> subject [html_open html[0] <value> html[1] ... "]
    [text_open text[0] <value> ... "] [<headers>] tags_open <ledger id> tags_close tail``.
    """

    head: bytes  # {"from":"...","to":[
    subject: bytes  # ],"subject":"..."
    html: tuple[bytes, ...]  # the static parts, escaped for the inside of a JSON string
    html_index: tuple[int, ...]  # gap i of html takes the value at SLOT_NAMES position html_index[i]
    html_static: bool  # some static part is not empty, so every html body is not empty
    text: tuple[bytes, ...]
    text_index: tuple[int, ...]
    text_static: bool
    tags_close: bytes  # the rest of the tags after the ledger id: the draft id
    tail: bytes  # reply_to and the closing brace


def _escape_values(values: Sequence[str]) -> list[bytes]:
    """Each value escaped as :func:`json_escape` does it.

    Why the shortcut: a recipient's values (a name, two links) almost never hold anything JSON
    escapes, and one check over all of them costs less than a :func:`json_escape` call each.
    Every character JSON escapes besides the quote and the backslash is a control character,
    which :meth:`str.isprintable` rejects (so do lone surrogates, which UTF-8 cannot carry).
    """
    joined = "".join(values)
    if joined.isprintable() and '"' not in joined and "\\" not in joined:
        return [v.encode("utf-8") for v in values]
    return [json_escape(v) for v in values]


def _headers_json(headers: Sequence[tuple[str, str]], names: dict[str, bytes]) -> bytes:
    """``,"headers":{...}`` exactly as :meth:`ResendProvider.build_request` writes
    ``dict(checked_headers(headers))`` (a repeated name keeps its first place and its last
    value), or ``b""`` when there are none.

    ``names`` (one per request) keeps each name checked and encoded: a batch repeats the same
    few names for every recipient, while values (the unsubscribe link) differ.
    """
    parts: list[bytes] = []
    for name, value in dict(headers).items():
        key = names.get(name)
        if key is None:
            checked_headers([(name, "")])  # raises for a bad or reserved name
            key = names[name] = json_string(name) + b':"'
        parts += (b"," if parts else b',"headers":{', key,
                  _escape_values((clean_header_value(value),))[0], b'"')
    if not parts:
        return b""
    parts.append(b"}")
    return b"".join(parts)


_HTML_OPEN = b',"html":"'
_TEXT_OPEN = b',"text":"'
_TAGS_OPEN = b',"tags":[{"name":"ledger_id","value":"'


class ResendProvider(HttpProvider):
    """Sends through Resend's batch endpoint; see the module docstring."""

    name: ClassVar[str] = "resend"
    max_batch: ClassVar[int] = 100
    default_base_url: ClassVar[str] = API_URL
    idempotent: ClassVar[bool] = True
    idempotency_window: ClassVar[timedelta] = timedelta(hours=24)  # how long Resend keeps a key

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        if not settings.api_key:
            raise ConfigError("delivery.api_key: provider resend needs an API key (re_...)")
        super().__init__(settings, session)
        self.batch_url = f"{self.base_url}/emails/batch"
        self._read_headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
        }
        self._template_cache: tuple[TemplateMessage, _Skeleton] | None = None

    def idempotency_key(self, messages: Sequence[OutgoingMessage]) -> str:
        """``digest/<installation>/<draft id>/<sha256 of the sorted ledger ids>``: the same for
        the same batch.

        Ledger ids are unique per (draft, subscriber) in a database, and the installation tells
        databases apart, so two different batches never share a key, and a batch sent again (in
        any order) always has its first key.
        """
        return _key(self.installation, (m.draft_id for m in messages), (m.ledger_id for m in messages))

    def key_space(self) -> str:
        """A hash of what a key means to Resend besides the batch: the key's format, the
        installation, and the account (keys are per team; the API key and the URL it goes to
        stand for it, hashed: never stored). Another API key of the same team counts as another
        space: its batches wait for the operator, which is only ever the careful side."""
        parts = (KEY_FORMAT, self.installation, self.base_url, self.settings.api_key or "")
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]

    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        """The ``/emails/batch`` request: one full email per message, and its key. Pure."""
        memo: dict[tuple[str, str], str] = {}
        items: list[dict[str, Any]] = []
        included: list[OutgoingMessage] = []
        refused: list[SendResult] = []
        for m in messages:
            try:
                to = format_address(m.to_name, m.to_email)
            except ValueError as exc:
                refused.append(SendResult(m.ledger_id, "invalid", None, str(exc)))
                continue
            item: dict[str, Any] = {
                "from": self._address(memo, m.from_addr, "newsletter.from"),
                "to": [to],
                "subject": clean_header_value(m.subject),
            }
            if m.html:
                item["html"] = m.html
            if m.text:
                item["text"] = m.text
            headers = checked_headers(m.headers)
            if headers:
                item["headers"] = dict(headers)  # Resend wants string values only
            # Tags come back in webhooks. Names and values: ASCII letters, digits, _ and -.
            item["tags"] = [
                {"name": "ledger_id", "value": str(m.ledger_id)},
                {"name": "draft_id", "value": str(m.draft_id)},
            ]
            if m.reply_to:
                item["reply_to"] = [self._address(memo, m.reply_to, "newsletter.reply_to")]
            items.append(item)
            included.append(m)
        body = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers_out = {
            **self._read_headers,
            "Content-Type": "application/json",
            "Idempotency-Key": self.idempotency_key(included or messages),
        }
        return PreparedCall(
            "POST", self.batch_url, headers_out, body, tuple(included), tuple(refused)
        )

    # -- the template path: the digest's shared parts are JSON-encoded once per draft -------

    #: The sender hands this provider a template and per-recipient values instead of finished
    #: messages; Resend still gets a full body per email, built here without encoding each
    #: ~50 KB body again.
    accepts_templates: ClassVar[bool] = True

    def _skeleton(self, template: TemplateMessage) -> _Skeleton:
        """Every byte of an email's JSON that all recipients share, encoded once per draft.

        Cached by the template object: the sender makes one per send, and an equal but distinct
        template (another send) only costs one more encoding.
        """
        cached = self._template_cache
        if cached is not None and cached[0] is template:
            return cached[1]
        memo: dict[tuple[str, str], str] = {}
        from_ = self._address(memo, template.from_addr, "newsletter.from")
        tail = b"}"
        if template.reply_to:
            reply_to = self._address(memo, template.reply_to, "newsletter.reply_to")
            tail = b',"reply_to":[' + json_string(reply_to) + b"]}"
        skeleton = _Skeleton(
            head=b'{"from":' + json_string(from_) + b',"to":[',
            subject=b'],"subject":' + json_string(clean_header_value(template.subject)),
            html=tuple(json_escape(p) for p in template.html_parts),
            html_index=tuple(SLOT_NAMES.index(slot) for slot in template.html_slots),
            html_static=any(template.html_parts),
            text=tuple(json_escape(p) for p in template.text_parts),
            text_index=tuple(SLOT_NAMES.index(slot) for slot in template.text_slots),
            text_static=any(template.text_parts),
            tags_close=b'"},{"name":"draft_id","value":"%d"}]' % template.draft_id,
            tail=tail,
        )
        if len(skeleton.html) != len(skeleton.html_index) + 1 or (
            len(skeleton.text) != len(skeleton.text_index) + 1
        ):
            raise ValueError("a template needs exactly one more part than slots")
        self._template_cache = (template, skeleton)
        return skeleton

    def build_template_request(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> PreparedCall:
        """The ``/emails/batch`` request :meth:`build_request` gives for the messages
        :func:`~digest.delivery.providers.base.expand_template` makes of ``recipients``: the
        same body, byte for byte, and the same Idempotency-Key. Pure.

        The shared JSON comes from :meth:`_skeleton`; each email adds only its own address,
        slot values, headers and ledger id.
        """
        sk = self._skeleton(template)
        width = len(SLOT_NAMES)
        parts: list[bytes] = [b"["]
        included: list[OutgoingMessage] = []
        refused: list[SendResult] = []
        header_names: dict[str, bytes] = {}
        for r in recipients:
            try:
                if len(r.html_values) != width or len(r.text_values) != width:
                    raise ValueError(f"{width} slot values expected (one per slot name)")
                to = json_string(format_address(r.to_name, r.to_email))
            except ValueError as exc:
                refused.append(SendResult(r.ledger_id, "invalid", None, str(exc)))
                continue
            if included:
                parts.append(b",")
            # Only the ledger id is read from these (the answer's order, the key).
            included.append(OutgoingMessage(
                ledger_id=r.ledger_id, draft_id=template.draft_id, to_email=r.to_email,
                to_name=r.to_name, from_addr=template.from_addr, subject=template.subject,
                html="", text=""))
            parts += (sk.head, to, sk.subject)
            # Each value escaped once, however many gaps it fills. Why the emptiness checks:
            # the full-body path leaves out an empty html or text, so this one must too.
            for opening, raw, static, indexes, pieces in (
                    (_HTML_OPEN, r.html_values, sk.html_static, sk.html_index, sk.html),
                    (_TEXT_OPEN, r.text_values, sk.text_static, sk.text_index, sk.text)):
                values = _escape_values(raw)
                if static or any(values[i] for i in indexes):
                    parts += (opening, pieces[0])
                    for index, part in zip(indexes, pieces[1:]):
                        parts += (values[index], part)
                    parts.append(b'"')
            if r.headers:
                parts.append(_headers_json(r.headers, header_names))
            parts += (_TAGS_OPEN, b"%d" % r.ledger_id, sk.tags_close, sk.tail)
        parts.append(b"]")
        keyed = included or recipients
        headers_out = {
            **self._read_headers,
            "Content-Type": "application/json",
            "Idempotency-Key": _key(self.installation, [template.draft_id], (r.ledger_id for r in keyed)),
        }
        return PreparedCall(
            "POST", self.batch_url, headers_out, b"".join(parts), tuple(included), tuple(refused)
        )

    def send_template_batch(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> list[SendResult]:
        """One ``/emails/batch`` call for a template batch (see :meth:`build_template_request`)."""
        if not recipients:
            return []
        self._check_batch(recipients)
        call = self.build_template_request(template, recipients)
        # send_call puts the results in the order of the messages it is given: with refused
        # recipients, that must be every recipient, not only those in the request.
        order = list(call.messages) if not call.refused else [
            OutgoingMessage(ledger_id=r.ledger_id, draft_id=template.draft_id, to_email=r.to_email,
                            to_name=r.to_name, from_addr="", subject="", html="", text="")
            for r in recipients
        ]
        return self.send_call(call, order)

    @staticmethod
    def _address(memo: dict[tuple[str, str], str], value: str, key: str) -> str:
        cached = memo.get((key, value))
        if cached is not None:
            return cached
        try:
            name, addr = parse_mailbox(value)
        except ValueError as exc:
            raise BlockedError(
                f"resend: bad address in {key}: {exc}", hint=f"check {key}"
            ) from exc
        memo[(key, value)] = formatted = format_address(name, addr)
        return formatted

    def handle_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """Classify by Resend's error ``name`` before the generic statuses: a 429 may be a
        quota, a 409 an idempotency conflict, a 403 an unverified domain."""
        lowered = {k.lower(): v for k, v in headers.items()}
        if status in (401, 403, 409, 429):
            self._raise_named(status, lowered, body)
        self.raise_for_common_status(status, lowered, body)
        return self.parse_response(status, lowered, body, messages)

    def retry_after_of(self, status: int, headers: Mapping[str, str]) -> float | None:
        """``retry-after``; on a 429 without it, ``ratelimit-reset`` (seconds until the limit
        resets), which Resend sends on every answer (APIS.md A.5)."""
        wait = super().retry_after_of(status, headers)
        if wait is None and status == 429:
            wait = retry_after_seconds(headers.get("ratelimit-reset"))
            if wait is not None and wait <= 0:
                # A window resetting now says nothing of when to come back: the sender's own
                # backoff, or every retry would be spent within milliseconds.
                wait = None
        return wait

    def _raise_named(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        name, message = _error(body)
        what = f"resend: HTTP {status} {name or 'error'}: {message}".rstrip(": ")
        shown = response_text(body)
        retry_after = retry_after_seconds(headers.get("retry-after"))
        if status in (401, 403):
            # Why a 403 validation_error stops the send too: Resend uses it for an unverified
            # sending domain (and test-mode limits); retrying cannot help, the operator must.
            hint = (
                "check delivery.api_key (a Resend key with sending access)"
                if name in _AUTH_NAMES or not name
                else "verify the domain of newsletter.from in Resend"
            )
            raise AuthError(what, status=status, response_text=shown, hint=hint)
        if name == "concurrent_idempotent_requests":
            # The same batch is still being processed (an earlier attempt timed out while
            # Resend was working on it): ask again shortly, it will answer as the first.
            raise DeliveryError(
                what,
                retryable=True,
                status=status,
                response_text=shown,
                retry_after=retry_after if retry_after is not None else 1.0,
            )
        if name == "invalid_idempotent_request" or status == 409:
            # Why uncertain: this key was already used, with another body, so an earlier
            # attempt at this very batch reached Resend and was probably sent.
            raise UncertainDeliveryError(
                f"{what}; an earlier attempt at this batch (same Idempotency-Key, different "
                "body) reached Resend, so it may have been delivered",
                retryable=False,
                status=status,
                response_text=shown,
                hint="check the Resend dashboard, then run `digest send --resolve-uncertain`",
            )
        if name in _QUOTA_NAMES:
            # Why not retryable: the quota resets at the end of the day or month; retrying
            # within the sender's backoff (seconds) only burns attempts.
            period = "daily" if name.startswith("daily") else "monthly"
            raise BlockedError(
                what,
                status=status,
                response_text=shown,
                hint=f"the Resend {period} quota is used up: the send can resume once it resets, "
                "or raise the plan's quota",
            )
        if status == 429:  # rate_limit_exceeded (2 requests/s per team by default)
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
        """200 ``{"data": [{"id"}]}`` in order → sent; 400/422 → a not-retryable error."""
        if 200 <= status < 300:
            data = self.decode_json(status, body)
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list) or len(items) != len(messages):
                raise UncertainDeliveryError(
                    f"resend: HTTP {status} without one id per email; the batch may have been "
                    "accepted",
                    status=status,
                    response_text=response_text(body),
                )
            results = []
            for m, item in zip(messages, items):
                message_id = item.get("id") if isinstance(item, dict) else None
                results.append(
                    SendResult(m.ledger_id, "sent", str(message_id) if message_id else None)
                )
            return results
        name, message = _error(body)
        if status in (400, 422):
            # validation_error, missing_required_field, invalid_from_address,
            # invalid_idempotency_key ...: the request is wrong and stays wrong. A From that
            # Resend refuses is refused in every batch: the send stops, nobody is failed.
            error = BlockedError if name == "invalid_from_address" else DeliveryError
            raise error(
                f"resend: HTTP {status} {name or 'error'}: {message}".rstrip(": "),
                retryable=False,
                status=status,
                response_text=response_text(body),
                hint="check newsletter.from" if name == "invalid_from_address" else None,
            )
        raise self.status_error(status, body, f"{name}: {message}" if name else message)

    def check(self) -> str:
        """``GET /domains``: proves the key and the URL, and lists the domains' status."""
        url = f"{self.base_url}/domains"
        status, headers, body = self.request("GET", url, self._read_headers)
        lowered = {k.lower(): v for k, v in headers.items()}
        if status in (401, 403):
            name, message = _error(body)
            if name == "restricted_api_key":
                # A sending-only key may not list domains, but Resend did recognize it.
                return f"resend: reached {self.base_url}; the key is valid (sending access only)"
            raise AuthError(
                f"resend: HTTP {status} {name}: {message}".rstrip(": "),
                status=status,
                hint="check delivery.api_key",
            )
        self.raise_for_common_status(status, lowered, body, sends_mail=False)
        if status != 200:
            raise self.status_error(status, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, body_summary(body)) from None
        domains = data.get("data") if isinstance(data, dict) else None
        names = [
            f"{d.get('name')} ({d.get('status')})"
            for d in (domains if isinstance(domains, list) else [])
            if isinstance(d, dict)
        ]
        listed = ", ".join(names) if names else "no domains"
        return f"resend: reached {self.base_url}; domains: {listed}"
