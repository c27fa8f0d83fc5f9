"""Mailgun Messages API: ``POST /v3/<domain>/messages``, up to 1000 recipients per call.

Request: ``multipart/form-data`` with ``from``, one ``to`` per recipient, ``subject``,
``text``, ``html``, ``h:<Header>`` (custom headers), ``v:<key>`` (custom variables, returned
in webhooks as ``user-variables``), ``o:tag`` and ``recipient-variables`` (a JSON object keyed
by address), with HTTP Basic auth ``api:<key>``. Answer: 200 ``{"id", "message": "Queued.
Thank you."}``: one id for the whole call, no per-recipient results; 400 for any bad input
(all or nothing), 401, 404 "Domain not found" (often the wrong region), 429, 5xx. EU domains
live at ``https://api.eu.mailgun.net`` (``delivery.region: eu``). Reference:
shared/reference/APIS.md section A.3.

Why ``recipient-variables`` is always sent: with several ``to`` and no recipient-variables,
Mailgun sends **one** message whose To header lists every reader. With it, each ``to`` gets
its own copy, and ``%recipient.<key>%`` anywhere in the message (body, subject, ``h:`` and
``v:`` values) becomes that reader's value. That is how each reader gets their own
List-Unsubscribe header (``h:List-Unsubscribe = %recipient.h:List-Unsubscribe%``), ledger id
(``v:ledger_id = %recipient.ledger_id%``) and, for :meth:`MailgunProvider.send_template_batch`,
their name and links in the bodies.

**Injection.** Mailgun substitutes ``%recipient.<key>%`` anywhere, and its unsubscribe
variables (``%unsubscribe_url%``, ``%tag_unsubscribe_url%``, ``%mailing_list_unsubscribe_url%``)
too, so a comment quoting ``%recipient.unsubscribe_url%`` would otherwise show one reader
another's link, or unsubscribe them through Mailgun. Every piece of content we send (static
template parts, full bodies, the subject, per-reader values) goes through :func:`neutralize_html`
or :func:`neutralize_text` first:

* HTML: the ``%`` that starts such a variable becomes ``&#37;``, which every HTML parser turns
  back into ``%`` (in text and in attribute values alike), so readers see the text unchanged;
* text: a ZERO WIDTH SPACE (U+200B) goes right after that ``%``: invisible to readers, and
  the variable no longer matches. A reader who copies the text gets the extra character.

Only these patterns are touched; other ``%`` (percent-encoded URLs, "50%") stay as they are.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from digest.config import Delivery
from digest.delivery.mime import (
    clean_header_value,
    format_address,
    normalize_address,
    parse_mailbox,
)
from digest.delivery.providers.base import (
    CallPacer,
    HttpProvider,
    PreparedCall,
    UncertainDeliveryError,
    checked_headers,
    response_text,
    slot_map,
)
from digest.errors import ConfigError, DeliveryError
from digest.http import build_session
from digest.types import OutgoingMessage, SendResult, TemplateMessage, TemplateRecipient

US_API_URL = "https://api.mailgun.net"
EU_API_URL = "https://api.eu.mailgun.net"

_MAILGUN_VARIABLE_RE = re.compile(
    r"%(?=recipient\.|(?:tag_|mailing_list_)?unsubscribe_url%)", re.IGNORECASE
)
_ZWSP = "\u200b"
_MAGNIFICENT = b"Mailgun Magnificent API"
_DOMAIN_HINT = "check delivery.domain, and delivery.region (an EU domain needs region: eu) or delivery.base_url"


def neutralize_html(html: str) -> str:
    """``html`` with every Mailgun variable start (``%recipient.``, ``%unsubscribe_url%`` ...)
    written as ``&#37;``: the same text for readers, nothing Mailgun substitutes."""
    if "%" not in html:
        return html
    return _MAILGUN_VARIABLE_RE.sub("&#37;", html)


def neutralize_text(text: str) -> str:
    """``text`` with U+200B after the ``%`` of every Mailgun variable: invisible, inert."""
    if "%" not in text:
        return text
    return _MAILGUN_VARIABLE_RE.sub("%" + _ZWSP, text)


def multipart_form(fields: Sequence[tuple[str, str]]) -> tuple[bytes, str]:
    """``fields`` as a ``multipart/form-data`` body; returns the body and its Content-Type.

    Why multipart and not urlencoded: bodies go as raw UTF-8 instead of growing by up to
    three times with percent-encoding.
    """
    encoded = [(name.encode("ascii"), value.encode("utf-8")) for name, value in fields]
    while True:
        boundary = f"digest-{secrets.token_hex(16)}".encode("ascii")
        if not any(boundary in value for _, value in encoded):
            break
    parts: list[bytes] = []
    for name, value in encoded:
        parts += (
            b"--",
            boundary,
            b'\r\nContent-Disposition: form-data; name="',
            name,
            b'"\r\n\r\n',
            value,
            b"\r\n",
        )
    parts += (b"--", boundary, b"--\r\n")
    return b"".join(parts), f"multipart/form-data; boundary={boundary.decode('ascii')}"


def _var(key: str) -> str:
    return f"%recipient.{key}%"


def _join(parts: Sequence[str], slots: Sequence[str], kind: str) -> str:
    out = [parts[0]]
    for slot, part in zip(slots, parts[1:]):
        out += (_var(f"digest_{kind}_{slot}"), part)
    return "".join(out)


class MailgunProvider(HttpProvider):
    """Sends through Mailgun's messages endpoint; see the module docstring."""

    name: ClassVar[str] = "mailgun"
    max_batch: ClassVar[int] = 1000  # recipients per call
    parallel_calls: ClassVar[bool] = True
    default_base_url: ClassVar[str] = US_API_URL
    personalizes: ClassVar[bool] = True

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        if not settings.api_key or not settings.domain:
            raise ConfigError("delivery: provider mailgun needs api_key and domain")
        own = session is None
        super().__init__(
            settings, session or build_session(pool_size=max(10, settings.concurrency))
        )
        self._owns_session = own
        if not settings.base_url and settings.region == "eu":
            self.base_url = EU_API_URL
        self.domain = settings.domain
        # quote(safe=""): a '/' would send us to another path, where Mailgun answers 200
        # "Mailgun Magnificent API" instead of an error (config refuses it; belt and braces).
        self.messages_url = f"{self.base_url}/v3/{quote(self.domain, safe='')}/messages"
        token = base64.b64encode(f"api:{settings.api_key}".encode()).decode("ascii")
        self._auth = {"Authorization": f"Basic {token}", "Accept": "application/json"}
        self._pacer = CallPacer(settings.rate_per_second)

    # -- shared pieces ------------------------------------------------------------------------

    def _common_fields(
        self, from_addr: str, subject: str, reply_to: str | None, tag: str, draft_id: int
    ) -> list[tuple[str, str]]:
        try:
            from_name, from_email = parse_mailbox(from_addr)
            fields = [("from", format_address(from_name, from_email))]
            if reply_to:
                reply_name, reply_email = parse_mailbox(reply_to)
                fields.append(("h:Reply-To", format_address(reply_name, reply_email)))
        except ValueError as exc:
            raise DeliveryError(
                f"mailgun: bad From or Reply-To address: {exc}",
                hint="check newsletter.from and newsletter.reply_to",
            ) from exc
        fields.append(("subject", neutralize_text(clean_header_value(subject))))
        if tag:
            fields.append(("o:tag", tag))
        fields += (("v:draft_id", str(draft_id)), ("v:ledger_id", _var("ledger_id")))
        return fields

    def _recipients(
        self,
        envelopes: Sequence[tuple[int, str, str, Sequence[tuple[str, str]]]],
        extra: Mapping[int, Mapping[str, str]] | None = None,
    ) -> tuple[list[tuple[str, str]], list[int], list[SendResult]]:
        """The ``to`` fields, the per-header ``h:`` fields and ``recipient-variables``.

        ``envelopes`` are ``(ledger_id, to_email, to_name, headers)``. Returns the fields, the
        ledger ids included, in order, and the refused results.
        """
        tos: list[tuple[str, str]] = []
        variables: dict[str, dict[str, str]] = {}
        seen: set[str] = set()
        header_names: list[str] = []
        ids: list[int] = []
        refused: list[SendResult] = []
        for ledger_id, to_email, to_name, headers in envelopes:
            try:
                address = normalize_address(to_email)
                # The display name too: Mailgun may substitute in the To header as well.
                to = format_address(neutralize_text(to_name), address)
                clean = checked_headers(headers)
            except ValueError as exc:
                refused.append(SendResult(ledger_id, "invalid", None, str(exc)))
                continue
            if address.lower() in seen:
                # Why: recipient-variables are keyed by address; two rows for one address
                # would share one set of values (and one unsubscribe link).
                refused.append(
                    SendResult(ledger_id, "failed", None, "the same address twice in one batch")
                )
                continue
            values = {"ledger_id": str(ledger_id)}
            for name, value in clean:
                key = f"h:{name}"
                if key not in header_names:
                    header_names.append(key)
                values[key] = value
            values.update((extra or {}).get(ledger_id, {}))
            variables[address] = values
            seen.add(address.lower())
            tos.append(("to", to))
            ids.append(ledger_id)
        for values in variables.values():  # every reader needs every key, or the raw
            for key in header_names:  # %recipient.x% would reach them
                values.setdefault(key, "")
        fields = tos + [(key, _var(key)) for key in header_names]
        fields.append(("recipient-variables", json.dumps(variables, ensure_ascii=False)))
        return fields, ids, refused

    # -- full bodies ----------------------------------------------------------------------------

    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        """One call for messages that share their content; each gets its own copy. Pure."""
        first = messages[0]
        if any(
            (m.from_addr, m.subject, m.html, m.text, m.reply_to, m.tag, m.draft_id)
            != (
                first.from_addr,
                first.subject,
                first.html,
                first.text,
                first.reply_to,
                first.tag,
                first.draft_id,
            )
            for m in messages
        ):
            raise ValueError("mailgun: one call carries one body; group messages first")
        fields = self._common_fields(
            first.from_addr, first.subject, first.reply_to, first.tag, first.draft_id
        )
        if first.text:
            fields.append(("text", neutralize_text(first.text)))
        if first.html:
            fields.append(("html", neutralize_html(first.html)))
        recipient_fields, ids, refused = self._recipients(
            [(m.ledger_id, m.to_email, m.to_name, m.headers) for m in messages]
        )
        body, content_type = multipart_form(fields + recipient_fields)
        included = tuple(m for m in messages if m.ledger_id in set(ids))
        return PreparedCall(
            "POST",
            self.messages_url,
            {**self._auth, "Content-Type": content_type},
            body,
            included,
            tuple(refused),
        )

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One call per distinct body (in practice per message), ``delivery.concurrency`` at a
        time; the sender prefers :meth:`send_template_batch`, one call per batch."""
        return self.send_in_groups(messages, self._pacer)

    # -- server-side personalization ------------------------------------------------------------

    def build_template_request(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> tuple[PreparedCall, tuple[int, ...]]:
        """The one call for a template batch and the ledger ids it carries, in order. Pure.

        Static parts are neutralized, then joined with ``%recipient.digest_html_<slot>%`` (and
        ``_text_``) variables whose values, neutralized too, sit in recipient-variables.
        """
        fields = self._common_fields(
            template.from_addr, template.subject, template.reply_to, template.tag, template.draft_id
        )
        text_parts = [neutralize_text(p) for p in template.text_parts]
        html_parts = [neutralize_html(p) for p in template.html_parts]
        if template.text_slots or any(template.text_parts):
            fields.append(("text", _join(text_parts, template.text_slots, "text")))
        if template.html_slots or any(template.html_parts):
            fields.append(("html", _join(html_parts, template.html_slots, "html")))
        extra: dict[int, dict[str, str]] = {}
        envelopes = []
        refused_early: list[SendResult] = []
        for r in recipients:
            try:
                html = slot_map(r.html_values)
                text = slot_map(r.text_values)
            except ValueError as exc:
                refused_early.append(SendResult(r.ledger_id, "invalid", None, str(exc)))
                continue
            values = {f"digest_html_{s}": neutralize_html(html[s]) for s in template.html_slots}
            values.update(
                {f"digest_text_{s}": neutralize_text(text[s]) for s in template.text_slots}
            )
            extra[r.ledger_id] = values
            envelopes.append((r.ledger_id, r.to_email, r.to_name, r.headers))
        recipient_fields, ids, refused = self._recipients(envelopes, extra)
        body, content_type = multipart_form(fields + recipient_fields)
        call = PreparedCall(
            "POST",
            self.messages_url,
            {**self._auth, "Content-Type": content_type},
            body,
            (),
            tuple(refused_early + refused),
        )
        return call, tuple(ids)

    def send_template_batch(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> list[SendResult]:
        """One call for the whole batch; Mailgun makes each reader's copy."""
        if not recipients:
            return []
        self._check_batch(recipients)
        call, ids = self.build_template_request(template, recipients)
        return self.send_template_call(call, ids, recipients, self._answer)

    def _answer(self, status: int, headers: Mapping[str, str], body: bytes, ids: Sequence[int]) -> list[SendResult]:
        self.raise_for_common_status(status, headers, body)
        return self._parse(status, body, ids)

    # -- answers ----------------------------------------------------------------------------

    def parse_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """200 ``{"id"}`` → every message sent with that id; 4xx → not retryable."""
        return self._parse(status, body, [m.ledger_id for m in messages])

    def _parse(self, status: int, body: bytes, ids: Sequence[int]) -> list[SendResult]:
        if status == 200 and _MAGNIFICENT in body:
            # Why: Mailgun answers a request to a path it does not serve with 200 and this
            # text. Nothing was sent; the URL is wrong.
            raise DeliveryError(
                "mailgun: the API answered 'Mailgun Magnificent API' instead of sending: "
                f"wrong URL {self.messages_url}",
                retryable=False,
                status=status,
                response_text=response_text(body),
                hint=_DOMAIN_HINT,
            )
        if 200 <= status < 300:
            data = self.decode_json(status, body)
            message_id = data.get("id") if isinstance(data, dict) else None
            if not message_id:
                raise UncertainDeliveryError(
                    f"mailgun: HTTP {status} without a message id; the messages may have "
                    "been accepted",
                    status=status,
                    response_text=response_text(body),
                )
            return [SendResult(i, "sent", str(message_id)) for i in ids]
        detail = _message(body)
        if status == 404:
            raise DeliveryError(
                f"mailgun: HTTP 404: {detail or 'not found'} (domain {self.domain!r})",
                retryable=False,
                status=status,
                response_text=response_text(body),
                hint=_DOMAIN_HINT,
            )
        if status in (400, 413):
            raise DeliveryError(
                f"mailgun: HTTP {status}: {detail or 'bad request'}",
                retryable=False,
                status=status,
                response_text=response_text(body),
                hint="lower delivery.batch_size" if status == 413 else None,
            )
        raise self.status_error(status, body, detail)

    def check(self) -> str:
        """``GET /v3/domains/<domain>``: proves the key, the domain and the region."""
        url = f"{self.base_url}/v3/domains/{quote(self.domain, safe='')}"
        status, headers, body = self.request("GET", url, self._auth)
        self.raise_for_common_status(status, {k.lower(): v for k, v in headers.items()}, body)
        if status == 404:
            raise DeliveryError(
                f"mailgun: domain {self.domain!r} not found at {self.base_url}", hint=_DOMAIN_HINT
            )
        if status != 200 or _MAGNIFICENT in body:
            raise self.status_error(status, body, _message(body))
        try:
            data: Any = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, "the body is not JSON") from None
        domain = data.get("domain") if isinstance(data, dict) else None
        state = domain.get("state") if isinstance(domain, dict) else None
        line = f"mailgun: reached domain {self.domain!r} at {self.base_url}"
        if state and state != "active":
            line += f" (state {state!r}: Mailgun may not deliver until it is active)"
        return line


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return response_text(body)
    if isinstance(data, dict) and data.get("message"):
        return response_text(str(data["message"]))
    return ""
