"""The base classes every email provider implements, and the errors they raise.

A :class:`Provider` takes a batch of at most :attr:`Provider.max_batch` messages, makes exactly
**one** call to the provider and returns one :class:`~digest.types.SendResult` per message in
the order given. A failure of the whole call is an exception::

    DeliveryError (digest.errors)     the call failed; ``retryable`` says whether to try again
    ├── AuthError (digest.errors)     credentials refused: stop the send, fix the config
    └── UncertainDeliveryError        (here) the call failed *after* the request went out: the
                                      provider may have accepted the messages. ``maybe_delivered``
                                      is True; the sender marks the rows 'uncertain' instead of
                                      retrying blindly, because none of Postmark, SendGrid,
                                      Mailgun or SES has an idempotency key.

Per-message outcomes (a bad address, an inactive recipient) are values, never exceptions.

HTTP providers subclass :class:`HttpProvider`, which owns the send loop (the template method
:meth:`HttpProvider.send_batch`) and the HTTP status classification. A new HTTP provider writes
only two pure methods, :meth:`~HttpProvider.build_request` and
:meth:`~HttpProvider.parse_response`, plus :meth:`~Provider.check`.
"""

from __future__ import annotations

import json
import ssl
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

import requests
from urllib3.exceptions import NewConnectionError

from digest.config import Delivery
from digest.errors import AuthError, DeliveryError
from digest.http import build_session, retry_after_seconds
from digest.types import OutgoingMessage, SendResult

RESPONSE_TEXT_LIMIT = 500  # characters of a provider's response kept on an error


class UncertainDeliveryError(DeliveryError):
    """The provider may have accepted the messages although the call failed.

    Raised when the request was (or may have been) sent but no usable answer came back: a read
    timeout, a connection reset after sending, a 2xx whose body is not the expected JSON, a
    result array of the wrong length. ``maybe_delivered`` is always True here (and absent, so
    False, on a plain :class:`DeliveryError`: use :func:`maybe_delivered` to read it from any
    exception). ``retryable`` still says whether the *provider* would take another call; it
    does not mean a resend is safe: only the send ledger can decide that.
    """

    maybe_delivered: ClassVar[bool] = True


def maybe_delivered(exc: BaseException) -> bool:
    """True when ``exc`` leaves open whether the provider accepted the messages."""
    return bool(getattr(exc, "maybe_delivered", False))


def response_text(body: bytes | str | None, limit: int = RESPONSE_TEXT_LIMIT) -> str:
    """A provider's response body as text for an error, cut to ``limit`` characters."""
    if body is None:
        return ""
    text = body if isinstance(body, str) else body[: limit * 4].decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Every byte except the controls JSON forbids raw in a string (TAB, LF and CR aside, which
# json_escape replaces itself). Deleting these leaves only the offending bytes: an empty result,
# the usual case, means none. Why delete the complement: it writes nothing, so it is ~40% faster
# than deleting the controls and comparing lengths, and this check is a large part of the cost.
_ALL_BUT_JSON_CONTROLS = bytes(c for c in range(256) if c >= 0x20 or c in (0x09, 0x0A, 0x0D))


def json_escape(value: str) -> bytes:
    """``value`` escaped for the inside of a JSON string (no quotes), as UTF-8 bytes.

    Equal to ``json.dumps(value, ensure_ascii=False)[1:-1].encode()``, about twice as fast on
    large bodies: HTML and text bodies dominate a batch's size, and for them this is a UTF-8
    encode plus a few ``bytes.replace`` passes instead of the JSON encoder's per-character loop.
    Lone surrogates (which UTF-8 cannot carry) become ``?``.
    """
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8", "replace")
    if raw.translate(None, _ALL_BUT_JSON_CONTROLS):  # rare: let json escape \x00, \x0b ...
        return json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8")
    # bytes.replace returns the same object when there is nothing to replace, so absent
    # characters cost one scan and no copy. Backslash first, so we do not double our own.
    if b"\\" in raw:
        raw = raw.replace(b"\\", b"\\\\")
    if b'"' in raw:
        raw = raw.replace(b'"', b'\\"')
    if b"\n" in raw:
        raw = raw.replace(b"\n", b"\\n")
    if b"\r" in raw:
        raw = raw.replace(b"\r", b"\\r")
    if b"\t" in raw:
        raw = raw.replace(b"\t", b"\\t")
    return raw


def json_string(value: str) -> bytes:
    """``value`` as a complete JSON string literal (quotes included), UTF-8 bytes."""
    return b'"' + json_escape(value) + b'"'


class Provider(ABC):
    """An email provider: one call per batch, one :class:`SendResult` per message.

    Subclasses set :attr:`name` and :attr:`max_batch` and implement :meth:`send_batch` and
    :meth:`check`. Providers are used from one thread at a time; a provider holding network
    resources releases them in :meth:`close` (also called on leaving a ``with`` block).
    """

    #: The ``delivery.provider`` name.
    name: ClassVar[str]
    #: The provider's own limit of messages per call; the sender never passes more.
    max_batch: ClassVar[int]

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        self.settings = settings

    @abstractmethod
    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Hand ``messages`` to the provider in one call.

        Returns one result per message, in the same order. Raises :class:`AuthError` when the
        credentials are refused, :class:`UncertainDeliveryError` when the messages may have been
        accepted despite the failure, and :class:`DeliveryError` for any other failure of the
        whole call (``retryable``, ``status``, ``retry_after`` and ``response_text`` set).
        """

    @abstractmethod
    def check(self) -> str:
        """Reach the provider without sending anything; return a one-line description.

        Raises :class:`AuthError` or :class:`DeliveryError` (with a ``hint``) on failure.
        """

    def close(self) -> None:
        """Release network resources. The default has none."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        if len(messages) > self.max_batch:
            raise ValueError(
                f"{self.name}: {len(messages)} messages in one call; the limit is {self.max_batch}"
            )


@dataclass(frozen=True)
class PreparedCall:
    """One HTTP request, built without I/O by :meth:`HttpProvider.build_request`.

    ``messages`` are the messages in ``body``, in order: the ones :meth:`parse_response` gets.
    ``refused`` are results for messages left out of the request because they could not be
    expressed at all (an address no header can carry); they were never sent.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    messages: tuple[OutgoingMessage, ...]
    refused: tuple[SendResult, ...] = ()


class HttpProvider(Provider):
    """A provider reached over an HTTP API. Owns the send loop and the status classification.

    :meth:`send_batch` builds the request (:meth:`build_request`), sends it once with
    ``settings.timeout``, classifies the outcome and lets :meth:`parse_response` read the rest:

    * network error before the request went out (DNS, connection refused, connect timeout,
      TLS handshake) → :class:`DeliveryError`, retryable;
    * network error after it may have gone out (read timeout, reset, truncated answer) →
      :class:`UncertainDeliveryError`, retryable;
    * 401, 403 → :class:`AuthError`; 429 → retryable with ``retry_after`` from Retry-After;
      5xx → retryable;
    * anything else (2xx, 3xx, other 4xx) → :meth:`parse_response`, which raises
      :meth:`status_error` for statuses it does not understand.
    """

    #: Used when ``delivery.base_url`` is not set.
    default_base_url: ClassVar[str]
    #: The provider's limit on one request body, if it has one.
    max_request_bytes: ClassVar[int | None] = None

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        super().__init__(settings, session)
        self._owns_session = session is None
        self.session = session if session is not None else build_session()
        self.base_url = (settings.base_url or self.default_base_url).rstrip("/")
        self.timeout = settings.timeout

    @abstractmethod
    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        """The one request that sends ``messages``. Pure: no I/O, no clock.

        Messages that cannot be expressed (an invalid address) go to ``PreparedCall.refused``
        as ``invalid`` results instead of failing the batch.
        """

    @abstractmethod
    def parse_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """Turn the provider's answer into one result per message of the request. Pure.

        Called for every status that :meth:`handle_response` did not classify already (2xx, 3xx
        and 4xx other than 401, 403 and 429). ``headers`` have lower-case names. Raise
        :meth:`status_error` for a status the provider does not document, and
        :class:`UncertainDeliveryError` when a 2xx answer cannot be read.
        """

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Build, send once, classify, parse; see the class docstring."""
        if not messages:
            return []
        self._check_batch(messages)
        call = self.build_request(messages)
        if self.max_request_bytes is not None and len(call.body) > self.max_request_bytes:
            raise DeliveryError(
                f"{self.name}: request body of {len(call.body)} bytes is over the provider's "
                f"{self.max_request_bytes}-byte limit; nothing was sent",
                hint="lower delivery.batch_size",
            )
        results: list[SendResult] = []
        if call.messages:
            status, headers, body = self.perform(call)
            results = self.handle_response(status, headers, body, call.messages)
            if len(results) != len(call.messages):  # a bug in parse_response, but never guess
                raise UncertainDeliveryError(
                    f"{self.name}: {len(results)} results for {len(call.messages)} messages",
                    status=status,
                    response_text=response_text(body),
                )
        if not call.refused:
            return results
        by_id = {r.ledger_id: r for r in (*results, *call.refused)}
        return [by_id[m.ledger_id] for m in messages]

    def perform(self, call: PreparedCall) -> tuple[int, Mapping[str, str], bytes]:
        """Send ``call`` once; return status, headers and the whole body.

        Network failures become :class:`DeliveryError` or :class:`UncertainDeliveryError`.
        """
        return self.request(call.method, call.url, call.headers, call.body, sends_mail=True)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        sends_mail: bool = False,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP request with the provider's timeout, no redirects, exceptions mapped.

        With ``sends_mail`` a failure after the request may have gone out is an
        :class:`UncertainDeliveryError`; without it (``check()``) a plain retryable error.
        """
        try:
            # Why no redirects: requests would replay a POST as a GET on 301/302, and a provider
            # API that redirects is misconfigured (base_url); report it instead.
            response = self.session.request(
                method,
                url,
                headers=dict(headers),
                data=body,
                timeout=self.timeout,
                allow_redirects=False,
            )
            content = response.content  # read it all here so a truncated body is a network error
        except requests.RequestException as exc:
            raise self.transport_error(exc, url, sends_mail=sends_mail) from exc
        return response.status_code, response.headers, content

    def transport_error(
        self, exc: requests.RequestException, url: str, *, sends_mail: bool
    ) -> DeliveryError:
        """Map a requests exception: was the request certainly not sent, or may it have been?"""
        what = f"{self.name}: {type(exc).__name__} calling {url}: {exc}"
        if isinstance(
            exc,
            (
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidHeader,
            ),
        ):
            return DeliveryError(
                what, retryable=False, hint="check delivery.base_url and delivery.api_key"
            )
        causes = _causes(exc)
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
            # The TLS handshake failed, so nothing was sent; retrying will not fix a certificate.
            return DeliveryError(
                what, retryable=False, hint="check the TLS certificate of delivery.base_url"
            )
        if isinstance(exc, requests.exceptions.ConnectTimeout) or any(
            isinstance(c, NewConnectionError) for c in causes
        ):
            # requests raises these before writing anything: connection refused, DNS failure,
            # connect timeout (urllib3's NewConnectionError, wrapped in MaxRetryError).
            return DeliveryError(what, retryable=True)
        if not sends_mail:
            return DeliveryError(what, retryable=True)
        # Why not every SSLError is "not sent": an abrupt close of a TLS connection mid-request
        # surfaces as an SSLError too ("EOF occurred in violation of protocol"). ReadTimeout,
        # "Connection aborted" and ChunkedEncodingError may all follow a request the provider got.
        return UncertainDeliveryError(
            f"{what}; the request was sent, so the provider may have accepted the messages",
            retryable=True,
        )

    def handle_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """Classify auth, rate-limit and server errors; hand everything else to parse_response.

        Pure, like :meth:`parse_response`; override it only for a provider whose 401/429/5xx
        mean something unusual.
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        self.raise_for_common_status(status, lowered, body)
        return self.parse_response(status, lowered, body, messages)

    def raise_for_common_status(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Raise for 401/403 (auth), 429 (rate limit) and 5xx (server); return otherwise.

        ``headers`` must have lower-case names.
        """
        text = response_text(body)
        if status in (401, 403):
            raise AuthError(
                f"{self.name}: HTTP {status}: the provider refused the credentials",
                status=status,
                response_text=text,
                hint="check delivery.api_key",
            )
        if status == 429 or status >= 500:
            kind = "rate limited" if status == 429 else "server error"
            raise DeliveryError(
                f"{self.name}: HTTP {status} ({kind})",
                retryable=True,
                status=status,
                retry_after=retry_after_seconds(headers.get("retry-after")),
                response_text=text,
            )

    def status_error(self, status: int, body: bytes, detail: str = "") -> DeliveryError:
        """A not-retryable :class:`DeliveryError` for a status the provider does not document."""
        suffix = f": {detail}" if detail else ""
        return DeliveryError(
            f"{self.name}: HTTP {status}{suffix}",
            retryable=False,
            status=status,
            response_text=response_text(body),
        )

    def decode_json(self, status: int, body: bytes) -> Any:
        """``body`` parsed as JSON; a 2xx that is not JSON is an :class:`UncertainDeliveryError`."""
        try:
            return json.loads(body)
        except ValueError:
            if 200 <= status < 300:
                raise UncertainDeliveryError(
                    f"{self.name}: HTTP {status} with a body that is not JSON; "
                    "the provider may have accepted the messages",
                    retryable=False,
                    status=status,
                    response_text=response_text(body),
                ) from None
            raise self.status_error(status, body, "the body is not JSON") from None

    def close(self) -> None:
        """Close the HTTP session if this provider created it."""
        if self._owns_session:
            self.session.close()


def _causes(exc: BaseException, limit: int = 20) -> list[BaseException]:
    """Exceptions wrapped in ``exc``: requests and urllib3 nest them in args, reason, __cause__."""
    found: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(found) < limit:
        current = todo.pop()
        for candidate in (
            getattr(current, "reason", None),
            current.__cause__,
            current.__context__,
            current.args[0] if current.args else None,
        ):
            if isinstance(candidate, BaseException) and candidate not in found:
                found.append(candidate)
                todo.append(candidate)
    return found
