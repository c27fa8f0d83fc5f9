"""The base classes every email provider implements, and the errors they raise.

A :class:`Provider` takes a batch of at most :attr:`Provider.max_batch` messages, makes exactly
**one** call to the provider and returns one :class:`~digest.types.SendResult` per message in
the order given. A failure of the whole call is an exception::

    DeliveryError (digest.errors)     the call failed; ``retryable`` says whether to try again
    ├── BlockedError (digest.errors)  the account or the configuration stops every batch (a
    │   │                             quota, a paused account, an unknown domain, a wrong URL):
    │   │                             the batch goes back to the queue and the send stops
    │   └── AuthError (digest.errors) credentials refused: the same, fix the credentials
    └── UncertainDeliveryError        (here) the call failed *after* the request went out (a
                                      read timeout, a reset, an unreadable answer, a 502, 504 or
                                      524 from a gateway in front of the provider): the provider may
                                      have accepted the messages. ``maybe_delivered`` is True;
                                      the sender marks the rows 'uncertain' instead of retrying
                                      blindly, because none of Postmark, SendGrid, Mailgun or
                                      SES has an idempotency key (Resend's batches are sent
                                      again under the same key).
        └── PartialBatchError         (here) a batch sent as several calls (SES, SMTP ...) stopped
                                      with some messages possibly accepted: ``results`` holds the
                                      messages whose fate is known, ``uncertain`` the ledger ids
                                      that may have been delivered, ``reasons`` why, each
                                      message its own call's failure.

Per-message outcomes (a bad address, an inactive recipient, a message the provider will take
only later: ``deferred``) are values, never exceptions.

HTTP providers subclass :class:`HttpProvider`, which owns the send loop (the template method
:meth:`HttpProvider.send_batch`) and the HTTP status classification: a 5xx the provider itself
answered (500, 503 ...) is a retryable :class:`DeliveryError`, since it failed the call; a 502,
504 or 524 (:data:`GATEWAY_STATUSES`) comes from a proxy, load balancer or CDN that had already
passed the request on, or may have, so it is an :class:`UncertainDeliveryError`. A new HTTP
provider writes
only two pure methods, :meth:`~HttpProvider.build_request` and
:meth:`~HttpProvider.parse_response`, plus :meth:`~Provider.check`. Providers that hand over
finished MIME messages (SMTP, the outbox) subclass :class:`MimeProvider`, whose pure
:meth:`~MimeProvider.build_mime_message` builds each message for their send and for
:meth:`~Provider.refusals`.

Optional hooks a provider may add (the defaults keep the behaviour above):

* :attr:`Provider.personalizes` and :meth:`Provider.send_template_batch`: the provider fills in
  each recipient's values itself (SendGrid substitutions, Mailgun recipient-variables), so a
  batch is one template plus small per-recipient values instead of one full body each;
* :meth:`Provider.variant`, :meth:`Provider.template_ready` and :meth:`Provider.template_done`:
  a subclass built for an opt-in mode (Postmark's server templates,
  ``delivery.postmark_templates``), the start of a draft's send, when such a provider creates
  what it needs before any batch is claimed, and its end, when it deletes it;
* :attr:`Provider.idempotent`: resending the same batch is safe (Resend's Idempotency-Key);
  :meth:`Provider.key_space` then says in which keys' space, so that only a batch that went
  out in the same one is resent under its key, and :attr:`Provider.installation` tells this
  installation's keys from another's on the same account;
* :meth:`Provider.refusals`: without I/O, the messages a send would refuse before handing them
  over, and the :class:`BlockedError` it would raise (a bad From), for ``digest send --dry-run``
  through a provider that has no pure :meth:`~HttpProvider.build_request` (the default refuses
  nothing; :class:`MimeProvider` runs its send's own build);
* :func:`send_in_calls`: the send loop for providers that need several calls per batch (one
  message per call), with the partial-batch rules described there. It tells the sender's
  :class:`CallJournal` (:data:`call_journal`) of each call before it starts and after it is
  answered, so that a process killed inside such a batch leaves only its calls in flight
  uncertain.
"""

from __future__ import annotations

import html
import json
import re
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Protocol, Self

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import NewConnectionError, ProxyError

from digest import clock
from digest.config import Delivery
from digest.delivery.mime import (
    RESERVED_HEADERS,
    build_mime,
    clean_header_value,
    normalize_address,
    parse_mailbox,
)
from digest.errors import AuthError, BlockedError, DeliveryError
from digest.http import ApiCalls, BodyParts, build_session, describe, read_environment_once, retry_after_seconds
from digest.types import SLOT_NAMES, OutgoingMessage, SendResult, TemplateMessage, TemplateRecipient

RESPONSE_TEXT_LIMIT = 500  # characters of a provider's response kept on an error
# Answered by a gateway (a proxy, a load balancer, a CDN) in front of the provider, not by the
# provider, and possibly after the provider received the request and acted on it: a send
# answered so may have been delivered. Each status with the words its error uses, and why.
GATEWAY_STATUSES: Mapping[int, str] = MappingProxyType({
    502: "bad gateway",  # the provider's answer was lost or unreadable
    504: "gateway timeout",  # the provider did not answer in time
    # Cloudflare's own statuses:
    520: "unknown error from the origin",  # the origin's answer was empty or unreadable: it had the request
    # Not only "no TCP connection": Cloudflare also answers 522 when the origin did not
    # acknowledge the request it sent on an established connection within 90 s, and an
    # acknowledgement lost on the way back says nothing of what the origin received.
    522: "connection timed out",
    524: "a timeout occurred",  # the origin took the request and did not answer in time
    527: "railgun error",  # Railgun (retired) lost the origin, its LAN timeout among the causes
    # Informal statuses of some proxies: 598, a read timeout behind the proxy (after it passed
    # the request on); 599, said to be a connect timeout, but specified nowhere, and Tornado's
    # HTTP client reports every failure as 599, read timeouts included, which a proxy built on
    # it may pass on.
    598: "network read timeout",
    599: "network connect timeout",
})
# Left out on purpose, so plain retryable 5xx: Cloudflare's 521 (the origin refused the
# connection), 523 (the origin is unreachable), 525 (no TLS handshake with it), 526 (its
# certificate is invalid) and 530 (its DNS or tunnel failed) all mean the origin never had
# the request.


class UncertainDeliveryError(DeliveryError):
    """The provider may have accepted the messages although the call failed.

    Raised when the request was (or may have been) sent but no usable answer came back: a read
    timeout, a connection reset after sending, a 502, 504 or 524 from a gateway in front of the
    provider (:data:`GATEWAY_STATUSES`), a 2xx whose body is not the expected JSON, a result
    array of the wrong length.
    ``maybe_delivered`` is always True here (and absent, so False, on a plain
    :class:`DeliveryError`: use :func:`maybe_delivered` to read it from any exception).
    ``retryable`` still says whether the *provider* would take another call; it does not mean
    a resend is safe: only the send ledger can decide that.
    """

    maybe_delivered: ClassVar[bool] = True


class PartialBatchError(UncertainDeliveryError):
    """A batch sent as several calls stopped while some calls may have been accepted.

    ``results`` are the messages whose fate is known: ``sent`` (accepted), ``rejected`` /
    ``invalid`` (refused), ``failed`` (their call refused for good), or ``deferred`` for
    messages that were never handed over because the batch stopped first (safe to send
    again). ``uncertain`` are the ledger ids of the calls that failed after the request went
    out (a read timeout, an SMTP connection lost during DATA): only those may have been
    delivered. A sender that does not read these attributes treats the
    whole batch as uncertain, which never double-sends; one that does can settle ``results``
    and mark only ``uncertain`` as such.

    ``reasons`` maps every uncertain ledger id to why *that message* is uncertain: the failure
    of its own call (a reset, a timeout, an unreadable answer), without the batch's tally.
    Calls of one batch can fail in different ways, so this is what an operator should read
    per message; :meth:`uncertain_by_reason` groups the ids for recording. ``str()`` of the
    error is the batch's summary, for logs. Ids given no reason get that summary.
    """

    def __init__(
        self,
        message: str,
        *,
        results: Sequence[SendResult],
        uncertain: Sequence[int],
        reasons: Mapping[int, str] | None = None,
        retryable: bool = False,
        status: int | None = None,
        response_text: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(
            message, retryable=retryable, status=status, response_text=response_text, hint=hint
        )
        self.results: tuple[SendResult, ...] = tuple(results)
        self.uncertain: tuple[int, ...] = tuple(uncertain)
        given = reasons or {}
        summary = str(self)
        self.reasons: dict[int, str] = {i: given.get(i) or summary for i in self.uncertain}

    def uncertain_by_reason(self) -> list[tuple[str, list[int]]]:
        """The uncertain ledger ids grouped by their reason, in order of first appearance:
        one ``(reason, ids)`` per distinct failure (one ``mark_uncertain`` each)."""
        groups: dict[str, list[int]] = {}
        for ledger_id in self.uncertain:
            groups.setdefault(self.reasons[ledger_id], []).append(ledger_id)
        return list(groups.items())


# `digest check` asks again after an answer that says "later" (a 429, a 5xx): at most this
# many calls, waiting at most CHECK_MAX_WAIT seconds before each new one (it runs by hand).
CHECK_ATTEMPTS = 3
CHECK_MAX_WAIT = 5.0


def check_with_retries(
    provider: Provider,
    *,
    attempts: int = CHECK_ATTEMPTS,
    max_wait: float = CHECK_MAX_WAIT,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """``provider.check()``, called again after an answer that asks to try later.

    A rate limit (429), a server or gateway error (5xx) or another retryable answer the
    provider gave (an HTTP status is set: SES throttling, Postmark maintenance, an SMTP 4xx)
    is asked again, up to ``attempts`` calls in all, after its Retry-After or else a short
    backoff (0.5 s, 1 s ...), capped at ``max_wait`` seconds. A check sends nothing, so asking
    again is always safe. Anything else is raised at once: refused credentials and other
    :class:`BlockedError` (retrying cannot fix them), and network failures with no answer,
    which most often mean a wrong ``delivery.base_url``. When the last call still fails, the
    error says in one line how many calls were made over how long.
    """
    waited = 0.0
    for attempt in range(1, attempts + 1):
        try:
            return provider.check()
        except BlockedError:
            raise
        except DeliveryError as exc:
            if not (exc.retryable and exc.status is not None) or attempts == 1:
                raise
            if attempt >= attempts:
                over = f" over {waited:.1f} s" if waited else ""
                raise DeliveryError(
                    f"{exc.args[0] if exc.args else exc}; still failing after {attempt} attempts{over}",
                    retryable=True,
                    status=exc.status,
                    retry_after=exc.retry_after,
                    response_text=exc.response_text,
                    hint=exc.hint or "try `digest check` again later",
                ) from exc
            wait = exc.retry_after if exc.retry_after is not None else 0.5 * 2 ** (attempt - 1)
            wait = min(max(wait, 0.0), max_wait)
            sleep(wait)
            waited += wait
    raise ValueError(f"attempts must be at least 1, not {attempts}")


def maybe_delivered(exc: BaseException) -> bool:
    """True when ``exc`` leaves open whether the provider accepted the messages."""
    return bool(getattr(exc, "maybe_delivered", False))


def response_text(body: bytes | str | None, limit: int = RESPONSE_TEXT_LIMIT) -> str:
    """A provider's response body as text for an error, cut to ``limit`` characters."""
    if body is None:
        return ""
    text = body if isinstance(body, str) else body[: limit * 4].decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


BODY_EXCERPT_LIMIT = 80  # characters of a body that is not JSON quoted in an error's message
# Not text in a page: scripts, styles and comments (up to their end, or the end of what is read).
_NOT_TEXT_RE = re.compile(r"<(script|style)\b.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)", re.IGNORECASE | re.DOTALL)
_TITLE_RE = re.compile(r"<title\b[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"<[^>]*>?")


def body_summary(body: bytes, limit: int = BODY_EXCERPT_LIMIT) -> str:
    """A response body that is not JSON, as one short line for an error's message: ``the body
    is not JSON (HTML: "413 Request Entity Too Large")``, or ``the body is empty``.

    Why not the body itself: such an answer mostly comes from a proxy or a CDN in front of the
    provider (nginx's 413 page, Cloudflare's 429), and the whole page, markup, newlines and all,
    would become the operator's message, the ledger's error column and a held send's reason,
    each read as one line. So: what it is (HTML, XML or text, told from the body itself, which a
    proxy's Content-Type describes no better), and at most ``limit`` characters of what it says
    (a page's title, else its text without markup), with control characters and runs of
    whitespace made single spaces. Every provider words such a body through here; the body
    itself stays in the error's ``response_text``.
    """
    text = body[:8192].decode("utf-8", "replace")
    head = text.lstrip()[:512].lower()
    if not head:
        return "the body is empty"
    kind = "text"
    if head.startswith("<"):
        kind = "XML" if head.startswith("<?xml") and "<html" not in head else "HTML"
        title = _TITLE_RE.search(text)
        text = title.group(1) if title else _TAG_RE.sub(" ", _NOT_TEXT_RE.sub(" ", text))
        text = html.unescape(text)
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return f'the body is not JSON ({kind}: "{line}")' if line else f"the body is not JSON ({kind})"


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
    if value.isprintable() and '"' not in value and "\\" not in value:
        # Short values (names, addresses, signed links, header values) mostly need nothing:
        # printable text holds no control character or lone surrogate, so without quotes
        # and backslashes its UTF-8 is already its escaped form. A tenth of the full cost.
        return value.encode()
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
    #: True when the provider implements :meth:`send_template_batch` (server-side
    #: personalization); the sender may then hand it one template per batch.
    personalizes: ClassVar[bool] = False
    #: True when sending the very same batch again cannot deliver it twice (the provider
    #: dedupes by an idempotency key), so a batch with an uncertain outcome may be resent.
    idempotent: ClassVar[bool] = False
    #: How long an idempotent provider keeps a batch's key: a batch first sent longer ago
    #: than this (less a margin) is not resent automatically, since it could arrive twice.
    idempotency_window: ClassVar[timedelta] = timedelta(hours=24)
    #: ``send_batch`` makes several calls per batch, ``delivery.concurrency`` at a time (SES,
    #: and SendGrid and Mailgun with full bodies); the sender then runs one batch at a time,
    #: so that ``delivery.concurrency`` stays the number of provider calls in flight.
    parallel_calls: ClassVar[bool] = False
    #: The From address the sends use (``newsletter.from``), when whoever built the provider
    #: knows it (the app sets it): :meth:`check` may then ask whether the provider will send
    #: as it (SES asks whether it is a verified identity). None: not asked.
    from_addr: str | None = None
    #: A short tag of this installation (a hash of its database's own id, set by the app):
    #: an idempotent provider puts it in its keys, so that two installations sending through
    #: one account (staging beside production) never send one key with different bodies.
    installation: str = ""

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        self.settings = settings

    def key_space(self) -> str | None:
        """For an :attr:`idempotent` provider, a short hash of what its keys are scoped by
        besides the batch (the key's format, :attr:`installation`, the account): a batch that
        went out under another key space was never seen under the key it would get now, so it
        is not resent by itself. ``None`` for providers without keys. Never a secret itself."""
        return None

    @abstractmethod
    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Hand ``messages`` to the provider in one call.

        Returns one result per message, in the same order. Raises :class:`AuthError` when the
        credentials are refused, :class:`UncertainDeliveryError` when the messages may have been
        accepted despite the failure, and :class:`DeliveryError` for any other failure of the
        whole call (``retryable``, ``status``, ``retry_after`` and ``response_text`` set).
        """

    def send_template_batch(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> list[SendResult]:
        """Send one template to ``recipients``, letting the provider fill in their values.

        Only for providers with :attr:`personalizes`; the others raise NotImplementedError.
        Same contract as :meth:`send_batch`: at most :attr:`max_batch` recipients, one result
        per recipient in order, whole-call failures as exceptions. What each recipient receives
        must equal :func:`expand_template` of the template for them, byte for byte in the
        bodies: static parts are content and must never be read as substitution syntax.
        """
        raise NotImplementedError(f"{self.name} does not personalize messages server-side")

    def template_sender(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> Callable[[], list[SendResult]]:
        """:meth:`send_template_batch` in two steps: check and build the batch now, send it
        when the returned function is called. Calling it again sends the very same batch
        again (a retry), so the caller need not keep ``recipients`` for that.

        Raises what :meth:`send_template_batch` raises before anything is sent. The default
        builds nothing ahead: each call is a :meth:`send_template_batch`.
        """
        return partial(self.send_template_batch, template, recipients)

    @classmethod
    def variant(cls, settings: Delivery) -> type[Provider]:
        """The class to build for ``settings``: this one, or a subclass for a mode the
        settings opt into (Postmark's server templates). Called by the registry."""
        return cls

    def template_ready(self, template: TemplateMessage) -> None:  # noqa: B027 (optional hook)
        """Make ready what the provider keeps for ``template``'s draft (Postmark's server
        template) before the first batch is claimed, so that a process killed meanwhile holds
        no batch. Best effort: the sender logs a failure and goes on, and the first batch's own
        call makes it ready again, with the batch's retries and error handling. The default
        keeps nothing."""

    def template_names(self, template: TemplateMessage) -> tuple[str, ...]:
        """The names of what the provider keeps for ``template`` (Postmark: its server
        template's alias), which the sender records before :meth:`template_ready` makes them.
        The default keeps nothing."""
        return ()

    def template_done(self, template: TemplateMessage, earlier: Sequence[str] = ()) -> None:  # noqa: B027
        """The send of ``template``'s draft has finished: let go of whatever the provider keeps
        for it (Postmark's server template), and of what ``earlier`` names: what this provider
        made for the draft's earlier sends, as :meth:`template_names` named it then (the
        content changed mid-send, or a delete failed). Called once by the sender that concludes
        the send; a failure is logged there and never fails the send. The default keeps
        nothing. (An optional hook.)"""

    def refusals(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """The results a send of ``messages`` would give without handing them over (``invalid``:
        an address no header can carry), found without I/O; the rest would be handed over.

        Raises the :class:`BlockedError` the send would raise for a problem that stops every
        message (a From address that cannot be used). The dry run calls it for providers
        without a pure :meth:`HttpProvider.build_request` (those report refusals in
        :attr:`PreparedCall.refused`). A provider overriding it must run the very checks its
        send runs, so that a dry run and a send cannot disagree. The default refuses nothing.
        """
        return []

    @abstractmethod
    def check(self) -> str:
        """Reach the provider without sending anything; return a one-line description.

        Raises :class:`AuthError` or :class:`DeliveryError` (with a ``hint``) on failure.
        """

    def close(self) -> None:  # noqa: B027 (optional hook: most providers hold nothing)
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

    def _check_batch(self, messages: Sequence[object]) -> None:
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
    body: bytes | BodyParts
    messages: tuple[OutgoingMessage, ...]
    refused: tuple[SendResult, ...] = ()


class HttpProvider(Provider):
    """A provider reached over an HTTP API. Owns the send loop and the status classification.

    :meth:`send_batch` builds the request (:meth:`build_request`), sends it once with
    ``settings.timeout``, classifies the outcome and lets :meth:`parse_response` read the rest:

    * network error before the request went out (DNS, connection refused, connect timeout, a
      proxy that will not open the CONNECT tunnel, a failed TLS handshake: whatever fails while
      connecting) → :class:`DeliveryError`, retryable; but a certificate refused, or a proxy
      asking for credentials (407), → :class:`BlockedError`: the operator must fix it;
    * network error after it may have gone out (read timeout, reset, truncated answer) →
      :class:`UncertainDeliveryError`, retryable;
    * 401, 403 → :class:`AuthError`; 429 → retryable with ``retry_after`` from Retry-After
      (:meth:`retry_after_of`); a 5xx from the provider itself (500, 503 ...) → retryable;
    * 502, 504, 524 ... (:data:`GATEWAY_STATUSES`: a gateway answered, perhaps after the
      provider took the batch) → :class:`UncertainDeliveryError`, retryable: the sender marks the batch
      uncertain, or resends it under the same key where the provider has one (Resend);
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
        self._calls = ApiCalls(self.session)
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
        return self.send_call(self.build_request(messages), messages)

    def send_in_groups(self, messages: Sequence[OutgoingMessage], pacer: CallPacer | None) -> list[SendResult]:
        """Full bodies through an API that takes one body per call: one call per group of
        identical bodies (in practice per message), ``delivery.concurrency`` at a time, with
        the partial-batch rules of :func:`send_in_calls`. Results in the order given."""
        if not messages:
            return []
        self._check_batch(messages)
        results = send_in_calls(self.name, group_same_content(messages), self._send_group,
                                concurrency=self.settings.concurrency, pacer=pacer)
        by_id = {r.ledger_id: r for r in results}
        return [by_id[m.ledger_id] for m in messages]

    def send_built_template(
        self,
        call: PreparedCall,
        ids: Sequence[int],
        order: Sequence[int],
        answer: Callable[[int, Mapping[str, str], bytes, Sequence[int]], list[SendResult]],
    ) -> list[SendResult]:
        """Send a built template call (when it carries anyone) and return one result per
        recipient of the batch, in ``order`` (its ledger ids): ``answer`` reads the provider's
        reply for the ledger ``ids`` the call carried (header names lower-cased); refused
        recipients keep their results. Needs no recipients, so a built call can be sent again."""
        results: list[SendResult] = []
        if ids:
            status, headers, body = self.perform(call)
            results = answer(status, {k.lower(): v for k, v in headers.items()}, body, ids)
            if not call.refused and len(results) == len(order) and all(
                    r.ledger_id == i for r, i in zip(results, order)):
                return results  # already one per recipient, in order: the usual case
        by_id = {r.ledger_id: r for r in (*results, *call.refused)}
        return [by_id[i] for i in order]

    def _send_group(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        call = self.build_request(messages)
        results: list[SendResult] = list(call.refused)
        if call.messages:
            status, headers, body = self.perform(call)
            results += self.handle_response(status, headers, body, call.messages)
        return results

    def check_size(self, call: PreparedCall) -> None:
        """Refuse a body over the provider's limit (:attr:`max_request_bytes`) before sending."""
        if self.max_request_bytes is not None and len(call.body) > self.max_request_bytes:
            raise DeliveryError(
                f"{self.name}: request body of {len(call.body)} bytes is over the provider's "
                f"{self.max_request_bytes}-byte limit; nothing was sent",
                hint="lower delivery.batch_size",
            )

    def send_call(self, call: PreparedCall, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send a built call once, classify the answer, and return one result per message."""
        self.check_size(call)
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
        body: bytes | BodyParts | None = None,
        *,
        sends_mail: bool = False,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP request with the provider's timeout, no redirects, exceptions mapped.

        With ``sends_mail`` a failure after the request may have gone out is an
        :class:`UncertainDeliveryError`; without it (``check()``) a plain retryable error.
        """
        if self.session.trust_env:  # the first request: every later one goes to the same host
            try:
                read_environment_once(self.session, url)
            except ValueError as exc:  # what requests would have refused as an invalid URL
                raise self.transport_error(requests.exceptions.InvalidURL(str(exc)), url,
                                           sends_mail=sends_mail) from exc
        try:
            # No redirects (ApiCalls): requests would replay a POST as a GET on 301/302, and a
            # provider API that redirects is misconfigured (base_url); the 3xx is reported instead.
            response = self._calls(method, url, headers, body, self.timeout)
            content = response.content  # read it all here so a truncated body is a network error
        except requests.RequestException as exc:
            raise self.transport_error(exc, url, sends_mail=sends_mail) from exc
        return response.status_code, response.headers, content

    def transport_error(
        self, exc: requests.RequestException, url: str, *, sends_mail: bool
    ) -> DeliveryError:
        """Map a requests exception: was the request certainly not sent, or may it have been?"""
        what = f"{self.name}: calling {url}: {describe(exc)}"
        if isinstance(
            exc,
            (
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidHeader,
            ),
        ):
            return BlockedError(what, hint="check delivery.base_url and delivery.api_key")
        causes = _causes(exc)
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
            # The TLS handshake failed, so nothing was sent; retrying will not fix a certificate.
            return BlockedError(what, hint="check the TLS certificate of delivery.base_url")
        if isinstance(exc, requests.exceptions.ConnectTimeout) or any(
            isinstance(c, NewConnectionError) for c in causes
        ):
            # requests raises these before writing anything: connection refused, DNS failure,
            # connect timeout (urllib3's NewConnectionError, wrapped in MaxRetryError). Retried
            # (a provider's outage passes), but named: most often it is a wrong base_url, or,
            # when it was the proxy that could not be reached, the proxy.
            through_proxy = isinstance(exc, requests.exceptions.ProxyError) or any(
                isinstance(c, ProxyError) for c in causes)
            return DeliveryError(what, retryable=True, hint="if it persists, check the proxy (HTTPS_PROXY)"
                                 if through_proxy else "if it persists, check delivery.base_url")
        if _raised_while_connecting([exc, *causes]):
            return self._connect_error(exc, causes, url)
        if not sends_mail:
            return DeliveryError(what, retryable=True)
        # Why not every SSLError is "not sent": an abrupt close of a TLS connection mid-request
        # surfaces as an SSLError too ("EOF occurred in violation of protocol"), and a garbled
        # record in the answer as the WRONG_VERSION_NUMBER of a plain-HTTP port. ReadTimeout,
        # "Connection aborted" and ChunkedEncodingError may all follow a request the provider got.
        return UncertainDeliveryError(
            f"{what}; the request was sent, so the provider may have accepted the messages",
            retryable=True,
        )

    def _connect_error(
        self, exc: requests.RequestException, causes: Sequence[BaseException], url: str
    ) -> DeliveryError:
        """The error for a failure while connecting (:func:`_raised_while_connecting`): nothing
        of the request was written, so never uncertain. Retryable (a proxy's or a server's
        trouble may pass), but for a proxy that asks for credentials (407 to the CONNECT): that
        is the operator's to fix, so the send stops with the batch back in the queue."""
        where = f"{self.name}: calling {url}"
        refused = _tunnel_refusal(causes)
        if refused is not None:
            status, line = refused
            if status == 407:
                return BlockedError(
                    f"{where}: the proxy refused to open a tunnel to the provider ({line}); nothing was sent",
                    hint="the proxy asks for credentials: set them in HTTPS_PROXY, as http://user:password@host:port",
                )
            return DeliveryError(
                f"{where}: the proxy could not open a tunnel to the provider ({line}); nothing was sent",
                retryable=True,
                hint="if it persists, check the proxy (HTTPS_PROXY)",
            )
        if any(isinstance(c, (requests.exceptions.ProxyError, ProxyError)) for c in causes):
            return DeliveryError(
                f"{where}: could not connect through the proxy ({describe(exc)}); nothing was sent",
                retryable=True,
                hint="if it persists, check the proxy (HTTPS_PROXY)",
            )
        handshake = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
        if handshake is not None:
            return DeliveryError(
                f"{where}: the TLS handshake failed ({handshake.reason or type(handshake).__name__}); "
                "nothing was sent",
                retryable=True,
                hint="if it persists, check delivery.base_url: an https:// URL needs a server that speaks TLS",
            )
        detail = "timed out" if isinstance(exc, requests.exceptions.Timeout) else describe(exc)
        return DeliveryError(
            f"{where}: could not connect ({detail}); nothing was sent",
            retryable=True,
            hint="if it persists, check delivery.base_url",
        )

    def handle_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """Classify auth, rate-limit and server errors; hand everything else to parse_response.

        Pure, like :meth:`parse_response` (but for :meth:`retry_after_of`, which may read the
        clock); override it only for a provider whose 401/429/5xx mean something unusual.
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        self.raise_for_common_status(status, lowered, body)
        return self.parse_response(status, lowered, body, messages)

    def raise_for_common_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, sends_mail: bool = True
    ) -> None:
        """Raise for 401/403 (auth), 407 (a proxy's credentials) and 413 (too large: both stop
        the send), 408 and 429 (try again) and 5xx (server); return otherwise.

        A gateway's 502, 504 ... (:data:`GATEWAY_STATUSES`) answering a call that sends mail is
        an :class:`UncertainDeliveryError` (:meth:`gateway_error`); ``sends_mail=False``
        (``check()``, which sends nothing) makes it a plain retryable error like any 5xx.
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
        if status == 407:  # a proxy between us and the provider (http:// through a forwarding proxy)
            raise BlockedError(
                f"{self.name}: HTTP 407: a proxy asks for credentials",
                status=status,
                response_text=text,
                hint="set the proxy's credentials in HTTPS_PROXY / HTTP_PROXY (http://user:password@host:port)",
            )
        if status == 413:
            # Too large for the provider or a proxy in front of it: every batch of this size
            # would be, so the send stops with the batch back in the queue (no reader's fault).
            raise BlockedError(
                f"{self.name}: HTTP 413: the request is too large",
                status=status,
                response_text=text,
                hint="lower delivery.batch_size",
            )
        if sends_mail and status in GATEWAY_STATUSES:
            raise self.gateway_error(status, headers, body)
        if status in (408, 429) or status >= 500:
            # 408: the server gave up waiting for the request before reading it all; nothing
            # was processed, so it goes again like a 5xx.
            kind = {408: "request timeout", 429: "rate limited"}.get(status, "server error")
            raise DeliveryError(
                f"{self.name}: HTTP {status} ({kind})",
                retryable=True,
                status=status,
                retry_after=self.retry_after_of(status, headers),
                response_text=text,
            )

    def gateway_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UncertainDeliveryError:
        """The error for a status of :data:`GATEWAY_STATUSES` answering a send: a gateway in
        front of the provider answered, not the provider, and the request may have reached the
        provider first (a 504 or a 524 is a timeout *after* forwarding it). Retryable, as a 5xx
        is, but uncertain: only a provider with an idempotency key may be sent the same batch
        again.

        ``headers`` must have lower-case names.
        """
        kind = GATEWAY_STATUSES.get(status, "gateway error")
        return UncertainDeliveryError(
            f"{self.name}: HTTP {status} ({kind}): a gateway in front of the provider answered "
            "after the request went out, so the provider may have accepted the messages",
            retryable=True,
            status=status,
            retry_after=self.retry_after_of(status, headers),
            response_text=response_text(body),
        )

    def retry_after_of(self, status: int, headers: Mapping[str, str]) -> float | None:
        """How long the provider asks us to wait before calling again, in seconds, or None:
        its ``Retry-After`` header (capped). Providers with rate-limit headers of their own
        override it. ``headers`` must have lower-case names."""
        return retry_after_seconds(headers.get("retry-after"))

    def status_error(self, status: int, body: bytes, detail: str = "") -> DeliveryError:
        """A not-retryable :class:`DeliveryError` for a status the provider does not document.

        Without a ``detail``, a body that is not JSON (a proxy's page) is described in a few
        words (:func:`body_summary`)."""
        if not detail and body.strip():
            try:
                json.loads(body)
            except ValueError:
                detail = body_summary(body)
        suffix = f": {detail}" if detail else ""
        if status == 404:  # the endpoint is not there: a wrong URL, for every batch alike
            return BlockedError(f"{self.name}: HTTP 404{suffix}", status=status,
                                response_text=response_text(body), hint="check delivery.base_url")
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
            raise self.status_error(status, body, body_summary(body)) from None

    def close(self) -> None:
        """Close the HTTP session if this provider created it."""
        if self._owns_session:
            self.session.close()


@dataclass(frozen=True)
class BuiltMessage:
    """One message built without I/O by :meth:`MimeProvider.build_mime_message`: the MIME
    message to hand over, and its envelope's bare addresses."""

    mime: EmailMessage
    mail_from: str
    rcpt_to: str


class MimeProvider(Provider):
    """A provider that hands over each message as a finished MIME message (SMTP, the outbox).

    Its :meth:`send_batch` builds every message with :meth:`build_mime_message` before handing
    it over, and :meth:`refusals` (the dry run) runs that same build: the two cannot disagree
    on which readers are refused or on a From address that stops the send.
    """

    def build_mime_message(self, msg: OutgoingMessage, now: datetime) -> BuiltMessage | SendResult:
        """``msg`` as :func:`~digest.delivery.mime.build_mime` makes it (Date ``now``), with its
        envelope. Pure: no I/O.

        A message no header can carry (its To address; a header or a Message-ID build_mime
        refuses) comes back as an ``invalid`` result, with build_mime's reason. A From or
        Reply-To address that cannot be used raises :class:`BlockedError`: it would refuse
        every message of the send, and no reader is at fault.
        """
        # Why before build_mime: it parses these too, and its ValueError would mark every
        # reader invalid for a mistake in the configuration.
        try:
            mail_from = parse_mailbox(msg.from_addr)[1]
        except ValueError as exc:
            raise BlockedError(
                f"{self.name}: bad From address: {exc}", hint="check newsletter.from"
            ) from exc
        if msg.reply_to:
            try:
                parse_mailbox(msg.reply_to)
            except ValueError as exc:
                raise BlockedError(
                    f"{self.name}: bad Reply-To address: {exc}", hint="check newsletter.reply_to"
                ) from exc
        try:
            mime = build_mime(msg, now=now)
            rcpt_to = normalize_address(msg.to_email)
        except ValueError as exc:
            return SendResult(msg.ledger_id, "invalid", None, str(exc))
        return BuiltMessage(mime, mail_from, rcpt_to)

    def refusals(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """:meth:`build_mime_message` of each message, as the send runs it; the results of the
        messages it refuses. The messages built are dropped one by one."""
        now = clock.now()
        built = (self.build_mime_message(m, now) for m in messages)
        return [b for b in built if isinstance(b, SendResult)]


# -- helpers for providers that personalize or send one message per call -----------------------

_HEADER_NAME_RE = re.compile(r"[!-9;-~]+\Z")


def fill_template(parts: Sequence[str], slots: Sequence[str], values: Mapping[str, str]) -> str:
    """``parts[0] + values[slots[0]] + parts[1] + ... + parts[-1]``; ValueError on a gap."""
    if len(parts) != len(slots) + 1:
        raise ValueError("a template needs exactly one more part than slots")
    out = [parts[0]]
    for slot, part in zip(slots, parts[1:]):
        try:
            out.append(values[slot])
        except KeyError:
            raise ValueError(f"no value for slot {slot!r}") from None
        out.append(part)
    return "".join(out)


def slot_map(values: Sequence[str]) -> dict[str, str]:
    """A recipient's slot values (in ``SLOT_NAMES`` order) by slot name; ValueError if the
    count is wrong."""
    if len(values) != len(SLOT_NAMES):
        raise ValueError(f"{len(values)} slot values for {len(SLOT_NAMES)} slots")
    return dict(zip(SLOT_NAMES, values))


def expand_template(template: TemplateMessage, recipient: TemplateRecipient) -> OutgoingMessage:
    """The full-body message ``recipient`` gets from ``template``: what server-side
    personalization must produce, and the fallback for providers without it."""
    return OutgoingMessage(
        ledger_id=recipient.ledger_id,
        draft_id=template.draft_id,
        to_email=recipient.to_email,
        to_name=recipient.to_name,
        from_addr=template.from_addr,
        subject=template.subject,
        html=fill_template(template.html_parts, template.html_slots, slot_map(recipient.html_values)),
        text=fill_template(template.text_parts, template.text_slots, slot_map(recipient.text_values)),
        headers=recipient.headers,
        reply_to=template.reply_to,
        message_id=recipient.message_id,
        tag=template.tag,
    )


def checked_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Like :func:`digest.delivery.mime.custom_headers`, for a bare list of pairs.

    Names must be RFC 5322 field names and not ones the provider sets itself; values lose
    control characters (rule 5). ValueError for a bad or reserved name: a bug, not bad input.
    """
    out: list[tuple[str, str]] = []
    for name, value in headers:
        if not _HEADER_NAME_RE.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set from the message's own fields")
        out.append((name, clean_header_value(value)))
    return out


def group_same_content(messages: Sequence[OutgoingMessage]) -> list[list[OutgoingMessage]]:
    """``messages`` grouped by identical From, Subject, bodies, Reply-To and tag, in order of
    first appearance: messages that one call with per-recipient envelopes can carry."""
    groups: dict[tuple[str, str, str, str, str | None, str], list[OutgoingMessage]] = {}
    for m in messages:
        key = (m.from_addr, m.subject, m.html, m.text, m.reply_to, m.tag)
        groups.setdefault(key, []).append(m)
    return list(groups.values())


class CallPacer:
    """Spaces the starts of calls at least ``1 / rate`` seconds apart, across threads.

    Used inside a batch by providers that make one call per message, so that
    ``delivery.rate_per_second`` still means provider calls per second.
    """

    def __init__(
        self,
        rate_per_second: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate_per_second if rate_per_second else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        """Block until the next call may start."""
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class CallJournal(Protocol):
    """Where a batch sent as several calls is recorded call by call (the sender's ledger).

    A batch is claimed whole, and without this record a process killed inside it would leave
    all of it uncertain: the calls answered, the one in flight and those never made alike.
    :func:`send_in_calls` reports each call to the journal in :data:`call_journal`, if any:
    """

    @property
    def answered(self) -> Mapping[int, SendResult]:
        """The verdict the provider last gave each message of the batch, other than
        ``deferred``, over every attempt at it: a retry of the whole batch does not ask again
        about these."""

    def starting(self, ledger_ids: Sequence[int]) -> None:
        """The call carrying ``ledger_ids`` is about to start: recorded durably before it does
        (it may then be delivered, whatever happens to this process)."""

    def finished(self, results: Sequence[SendResult]) -> None:
        """A call was answered (or refused for good: ``failed`` results; or certainly sent
        nothing: ``deferred`` results). May be kept until the next :meth:`starting`; the
        batch's verdict comes after the last call anyway."""


# The journal of the batch this thread is sending (set by the sender around a provider's send;
# None outside a send, in a dry run and in tests of the providers alone).
call_journal: ContextVar[CallJournal | None] = ContextVar("call_journal", default=None)


def send_in_calls(
    name: str,
    calls: Sequence[Sequence[OutgoingMessage]],
    send_call: Callable[[Sequence[OutgoingMessage]], list[SendResult]],
    *,
    concurrency: int = 1,
    pacer: CallPacer | None = None,
) -> list[SendResult]:
    """Send one batch as several provider calls; return one result per message.

    Results come in the order of ``calls`` (callers that grouped messages put them back in
    the batch's order by ledger id).

    ``calls`` partitions the batch (usually one message per call); ``send_call`` makes one
    call and returns a result per message of it, or raises a :class:`DeliveryError` for the
    whole call. With ``concurrency`` > 1 calls run in a thread pool.

    A call the provider refused for good (:func:`refuses_its_call`: not retryable, not
    uncertain, not a :class:`BlockedError`; SES answering 400 for that one message) fails
    only its own messages: they come back ``failed`` with the error's text, as the sender
    words a failed batch, and the other calls still run. Why: the error is about that call,
    and stopping there would fail, or hold back, readers the provider was never asked about.

    After any other error (a 429, an outage, refused credentials, a call that may have gone
    through) no new call starts: it would only meet the same answer. Then:

    * nothing was accepted (no ``sent`` result, no call that may have gone through): that
      error is raised as it is (a :class:`BlockedError` first), exactly as for a single-call
      provider, so the sender retries, releases or stops as usual; calls refused for good
      keep their ``failed`` verdicts through the journal;
    * some messages were accepted and every failed call certainly was not: the results are
      returned, ``deferred`` (with the reason, "not sent: ...") for the messages never
      accepted, which the sender puts back in the queue.
      Why not raise: a retryable error would make the sender retry the whole batch and
      deliver the accepted messages twice;
    * some call may have been accepted (:func:`maybe_delivered`): :class:`PartialBatchError`
      with the known results, the uncertain ledger ids and, for each of them, its own call's
      failure (``reasons``: calls in flight together can fail in different ways). The messages
      of calls never started, or that failed without going out, are ``deferred`` among the
      results: the provider never had them, so they can go back to the queue.

    When only calls refused for good failed, and the provider took nothing of the batch and
    left nothing for later (no ``sent``, no ``deferred`` result: every call refused, or its
    messages refused one by one), the first error is raised as well. Why: that is how a
    refusal of every call looks (a setting the provider rejects, whoever the reader), and the
    sender counts a batch that raises as failed, so that such batches in a row pause the send
    instead of failing the whole audience; a list of results would count as a batch sent.
    The sender keeps each message's own verdict from the journal.
    """
    outcomes: list[list[SendResult] | BaseException | None] = [None] * len(calls)
    stop = threading.Event()
    journal = call_journal.get()  # here: the pool's threads do not see the caller's context

    def run(index: int) -> None:
        if stop.is_set():
            return
        if journal is not None:
            known = [journal.answered.get(m.ledger_id) for m in calls[index]]
            if all(r is not None for r in known):
                # An earlier attempt at this batch got this call's answer (a refusal for good,
                # a rejection) before a later call's error made the sender try the batch again:
                # its verdict stands, and the provider is not asked again.
                outcomes[index] = [r for r in known if r is not None]
                return
        if pacer is not None:
            pacer.wait()
            if stop.is_set():
                return
        try:
            if journal is not None:
                journal.starting([m.ledger_id for m in calls[index]])
                if stop.is_set():
                    # Another call failed while this one's record was written: it does not
                    # start after all (the batch stops at such an error, as above).
                    journal.finished([SendResult(m.ledger_id, "deferred", None, "not sent: the batch stopped "
                                                 "when another call failed") for m in calls[index]])
                    return
            outcome = send_call(calls[index])
        except DeliveryError as exc:
            outcomes[index] = exc
            if refuses_its_call(exc):
                # Its messages have their verdict, recorded with the next call's start (a
                # kill -9 after that keeps them failed); the batch goes on.
                if journal is not None:
                    journal.finished(_refused(calls[index], exc))
                return
            stop.set()
            if journal is not None and not maybe_delivered(exc):
                # Certainly not sent: not in flight any more (a retry of the batch may wait).
                reason = response_text(f"not sent: {exc}")
                journal.finished([SendResult(m.ledger_id, "deferred", None, reason) for m in calls[index]])
            return
        except BaseException:
            stop.set()  # a bug, or the ledger failed: stop sending, let it propagate
            raise
        outcomes[index] = outcome
        if journal is not None:
            journal.finished(outcome)

    if concurrency <= 1 or len(calls) <= 1:
        for index in range(len(calls)):
            run(index)
            if stop.is_set():
                break
    else:
        workers = min(concurrency, len(calls))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-send") as pool:
            for _ in pool.map(run, range(len(calls))):
                pass

    errors = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    flat = [r for o in outcomes if isinstance(o, list) for r in o]
    if not errors:
        return flat
    # The errors that stopped the batch; the others failed their own call's messages only.
    stopped = [(i, e) for i, e in errors if not refuses_its_call(e)]
    uncertain_calls = [i for i, e in stopped if maybe_delivered(e)]
    accepted = any(r.status == "sent" for r in flat)
    if not accepted and not uncertain_calls:
        if stopped:
            blocked = [e for _, e in stopped if isinstance(e, BlockedError)]
            raise blocked[0] if blocked else stopped[0][1]
        if not any(r.status == "deferred" for r in flat):
            raise errors[0][1]  # every call refused: the batch failed (see above)
    first = stopped[0][1] if stopped else None
    results: list[SendResult] = []
    uncertain: list[int] = []
    reasons: dict[int, str] = {}  # each uncertain message: its own call's failure
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, list):
            results.extend(outcome)
        elif isinstance(outcome, BaseException) and refuses_its_call(outcome):
            results.extend(_refused(calls[i], outcome))
        elif isinstance(outcome, BaseException) and maybe_delivered(outcome):
            uncertain.extend(m.ledger_id for m in calls[i])
            reasons.update((m.ledger_id, str(outcome)) for m in calls[i])
        else:
            # Its own call failed and certainly sent nothing, or it never started because
            # another call had failed: either way the provider never had it.
            if isinstance(outcome, BaseException):
                reason = response_text(f"not sent: {outcome}")
            else:
                reason = response_text(f"not sent: the batch stopped when another call failed ({first})")
            results.extend(SendResult(m.ledger_id, "deferred", None, reason) for m in calls[i])
    if uncertain:
        cause = outcomes[uncertain_calls[0]]
        raise PartialBatchError(
            _partial_summary(name, uncertain, reasons, results),
            results=results,
            uncertain=uncertain,
            reasons=reasons,
            retryable=False,
        ) from (cause if isinstance(cause, BaseException) else None)
    return results


def refuses_its_call(exc: BaseException) -> bool:
    """True when ``exc`` is the provider refusing one call of a batch sent as several for good:
    a :class:`DeliveryError` that is not retryable, certainly delivered nothing, and is not a
    :class:`BlockedError` (which stops every call alike). :func:`send_in_calls` fails only
    that call's messages and goes on with the others."""
    return (isinstance(exc, DeliveryError) and not exc.retryable and not maybe_delivered(exc)
            and not isinstance(exc, BlockedError))


def _refused(messages: Sequence[OutgoingMessage], exc: BaseException) -> list[SendResult]:
    """``failed`` results for the messages of a call refused for good, worded as the sender
    words a failed batch (the error's text), so that both count under the same reason."""
    return [SendResult(m.ledger_id, "failed", None, str(exc)) for m in messages]


def _partial_summary(
    name: str, uncertain: Sequence[int], reasons: Mapping[int, str], results: Sequence[SendResult]
) -> str:
    """One line for the logs on a batch that stopped with messages uncertain: how many, each
    distinct failure once (with its count when shared), and the fate of the rest."""
    counts: dict[str, int] = {}
    for ledger_id in uncertain:
        counts[reasons[ledger_id]] = counts.get(reasons[ledger_id], 0) + 1
    shown = [f"{reason} [{n} messages]" if n > 1 else reason for reason, n in list(counts.items())[:3]]
    if len(counts) > 3:
        shown.append(f"and {len(counts) - 3} other failure(s)")
    sent = sum(r.status == "sent" for r in results)
    not_sent = sum(r.status == "deferred" for r in results)
    refused = len(results) - sent - not_sent
    rest = f"of the other {len(results)}: {sent} accepted, {not_sent} not sent"
    if refused:
        rest += f", {refused} refused"
    return (
        f"{name}: {len(uncertain)} message(s) may have been accepted although their call "
        f"failed ({' | '.join(shown)}); {rest}"
    )


# urllib3's connection setup: the TCP connection, a proxy's CONNECT tunnel and the TLS
# handshake, all done before the request's first byte is written.
_CONNECTING = frozenset({HTTPConnection.connect.__code__, HTTPSConnection.connect.__code__})
# What http.client raises when the proxy answers the CONNECT with anything but 200.
_TUNNEL_REFUSED_RE = re.compile(r"Tunnel connection failed: (\d{3})\b(.*)")


def _raised_while_connecting(errors: Sequence[BaseException]) -> bool:
    """True when one of ``errors`` (an exception and its causes) was raised inside urllib3's
    connection setup, which writes nothing of the request; read from their tracebacks.

    Why where it was raised and not what it is: the same exceptions come from both sides of the
    request's first byte. An SSLEOFError is a server closing during the handshake, or in the
    middle of a session; WRONG_VERSION_NUMBER an https:// URL on a plain-HTTP port, or a
    garbled record in the answer; and urllib3 reports as a ProxyError ("Unable to connect to
    proxy") a provider that closed a tunnelled connection after reading the request (http.client
    closes the connection, which resets urllib3's has_connected_to_proxy). An exception without
    a traceback (built, never raised) gives False: uncertain, never a resend.
    """
    for error in errors:
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in _CONNECTING:
                return True
            tb = tb.tb_next
    return False


def _tunnel_refusal(errors: Sequence[BaseException]) -> tuple[int, str] | None:
    """The proxy's status and status line when it refused to open the CONNECT tunnel, from
    http.client's ``OSError("Tunnel connection failed: 407 Proxy Authentication Required")``."""
    for error in errors:
        match = _TUNNEL_REFUSED_RE.match(str(error))
        if match:
            return int(match.group(1)), response_text(f"{match.group(1)} {match.group(2).strip()}".strip(), 100)
    return None


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
