"""Resend: ``POST /emails/batch``, up to 100 full emails per call, with an idempotency key.

Request: a JSON array of ``{from, to, subject, html, text, headers, tags, reply_to}`` with
``Authorization: Bearer re_...`` and ``Idempotency-Key``. Answer: 200 ``{"data": [{"id"}, ...]}``
in request order; errors are ``{"statusCode", "name", "message"}``. The batch is validated
all or nothing (Resend's default "strict" mode). Reference: shared/reference/APIS.md
section A.5.

**Idempotency.** Resend keeps an ``Idempotency-Key`` for 24 hours: the same key with the same
body returns the first answer (the same ids) and sends nothing. :meth:`ResendProvider.
idempotency_key` derives the key from the batch itself (draft id and the sorted ledger ids), so
the very same batch always carries the very same key, and resending it after an uncertain
outcome (a timeout, a reset) cannot deliver it twice. That is what :attr:`idempotent` says.
Our bodies are deterministic for a ledger row (the signed links carry no timestamp and we send
no Message-ID), which is what makes the repeat byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import requests

from digest.config import Delivery
from digest.delivery.mime import clean_header_value, format_address, parse_mailbox
from digest.delivery.providers.base import (
    HttpProvider,
    PreparedCall,
    UncertainDeliveryError,
    checked_headers,
    response_text,
)
from digest.errors import AuthError, ConfigError, DeliveryError
from digest.http import retry_after_seconds
from digest.types import OutgoingMessage, SendResult

API_URL = "https://api.resend.com"
KEY_LIMIT = 256  # characters of an Idempotency-Key

_AUTH_NAMES = frozenset({"missing_api_key", "invalid_api_key", "restricted_api_key"})
_QUOTA_NAMES = frozenset({"daily_quota_exceeded", "monthly_quota_exceeded"})


def _error(body: bytes) -> tuple[str, str]:
    """Resend's error ``name`` and ``message`` ('' when the body is not its error shape)."""
    try:
        data = json.loads(body)
    except ValueError:
        return "", response_text(body)
    if not isinstance(data, dict):
        return "", ""
    return str(data.get("name") or ""), str(data.get("message") or "")


class ResendProvider(HttpProvider):
    """Sends through Resend's batch endpoint; see the module docstring."""

    name: ClassVar[str] = "resend"
    max_batch: ClassVar[int] = 100
    default_base_url: ClassVar[str] = API_URL
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        if not settings.api_key:
            raise ConfigError("delivery.api_key: provider resend needs an API key (re_...)")
        super().__init__(settings, session)
        self.batch_url = f"{self.base_url}/emails/batch"
        self._read_headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
        }

    @staticmethod
    def idempotency_key(messages: Sequence[OutgoingMessage]) -> str:
        """``digest/<draft id>/<sha256 of the sorted ledger ids>``: the same for the same batch.

        Ledger ids are unique per (draft, subscriber), so two different batches never share a
        key, and a batch sent again (in any order) always has its first key.
        """
        drafts = "+".join(str(d) for d in sorted({m.draft_id for m in messages}))
        ids = ",".join(str(i) for i in sorted(m.ledger_id for m in messages))
        return f"digest/{drafts}/{hashlib.sha256(ids.encode('ascii')).hexdigest()}"[:KEY_LIMIT]

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

    @staticmethod
    def _address(memo: dict[tuple[str, str], str], value: str, key: str) -> str:
        cached = memo.get((key, value))
        if cached is not None:
            return cached
        try:
            name, addr = parse_mailbox(value)
        except ValueError as exc:
            raise DeliveryError(
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
            raise DeliveryError(
                what,
                retryable=False,
                status=status,
                response_text=shown,
                hint=f"the Resend {period} quota is used up: run `digest send` after it resets, "
                "or raise the plan's quota",
            )
        if status == 429:  # rate_limit_exceeded (2 requests/s per team by default)
            raise DeliveryError(
                what, retryable=True, status=status, response_text=shown, retry_after=retry_after
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
            # invalid_idempotency_key ...: the request is wrong and stays wrong.
            raise DeliveryError(
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
        self.raise_for_common_status(status, lowered, body)
        if status != 200:
            raise self.status_error(status, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, "the body is not JSON") from None
        domains = data.get("data") if isinstance(data, dict) else None
        names = [
            f"{d.get('name')} ({d.get('status')})"
            for d in (domains if isinstance(domains, list) else [])
            if isinstance(d, dict)
        ]
        listed = ", ".join(names) if names else "no domains"
        return f"resend: reached {self.base_url}; domains: {listed}"
