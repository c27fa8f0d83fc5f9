"""SendGrid v3 Mail Send: ``POST /v3/mail/send``, up to 1000 personalizations per request.

Request: JSON ``{from, reply_to, subject, content[text/plain, text/html], headers,
personalizations[{to, headers, custom_args, substitutions}], categories, tracking_settings}``
with ``Authorization: Bearer <key>``. Answer: **202** with an empty body and an ``X-Message-Id``
header shared by the whole request; errors are ``{"errors": [{"message", "field"}]}`` with
HTTP 400 (validation, all or nothing), 401/403, 413, 429 or 5xx. There are no per-recipient
results and no idempotency key. A 429 says when to call again in ``Retry-After`` or, failing
that, ``X-RateLimit-Reset`` (Unix seconds). Reference: shared/reference/APIS.md section A.2.

Two ways to send, because a request has **one** body for all its personalizations:

* :meth:`SendGridProvider.send_template_batch` (preferred, :attr:`personalizes`): one request
  per batch. ``content`` is the template with a substitution key in each slot, and each
  personalization carries that reader's values in ``substitutions``. The keys are built from a
  random nonce per call (``-d<nonce>-name-``), so static content (a comment quoting
  ``-name-``, ``{{name}}`` or ``%recipient.name%``) can never match one: SendGrid only
  substitutes the keys a personalization lists.
* :meth:`SendGridProvider.send_batch` (full bodies): one request per distinct body, so in
  practice one per message (every body holds its reader's own unsubscribe link), made
  ``delivery.concurrency`` at a time with the partial-batch rules of
  :func:`~digest.delivery.providers.base.send_in_calls`. It works, but slowly; the sender
  prefers the template path.

**Headers.** Each reader's own headers (List-Unsubscribe, X-Digest-Ledger-Id) go in their
personalization's ``headers``. A header with the same value for every reader of the call
(``List-Unsubscribe-Post: List-Unsubscribe=One-Click``, see :func:`_batch_wide`) goes once, in
the message-level ``headers``, which apply to every personalization (APIS.md A.2): once per
call, not once per reader. When some reader lacks it or has another value, it stays in each
personalization instead, so nothing here depends on how SendGrid resolves a name given at both
levels.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from email.utils import quote as rfc822_quote
from functools import partial
from json.encoder import encode_basestring
from typing import Any, ClassVar

import requests

from digest import clock
from digest.config import Delivery
from digest.delivery.mime import clean_header_value, normalize_address, parse_mailbox
from digest.delivery.providers.base import (
    CallPacer,
    HttpProvider,
    PreparedCall,
    UncertainDeliveryError,
    body_summary,
    checked_headers,
    response_text,
)
from digest.delivery.readers import (
    BATCH_HEADERS,
    EMAIL,
    HEADER_STEPS,
    LEDGER,
    RAW_NAME,
    SLOT_FIELDS,
    Readers,
    Step,
    ledger_ids,
)
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from digest.http import build_session, reset_at_seconds
from digest.types import SLOT_NAMES, OutgoingMessage, SendResult, TemplateMessage, TemplateRecipient

API_URL = "https://api.sendgrid.com"
SEND_PATH = "/v3/mail/send"
SCOPES_PATH = "/v3/scopes"

_AUTH_HINT = "check delivery.api_key: it needs the mail.send scope"
_FROM_HINT = "newsletter.from must be a verified Sender Identity (or domain) in SendGrid"


def _email_object(name: str, address: str, *, quote_name: bool) -> dict[str, str]:
    """``{"email", "name"}`` for SendGrid; ValueError when the address cannot be used."""
    obj = {"email": normalize_address(address)}
    name = clean_header_value(name)
    if name:
        # Why quote: SendGrid does not quote display names holding ',' or ';' in
        # personalizations, which splits the To header in two. It does quote them in from
        # and reply_to.
        if quote_name and ("," in name or ";" in name):
            name = f'"{rfc822_quote(name)}"'
        obj["name"] = name
    return obj


def _email_json(name: str, address: str) -> tuple[str, str]:
    """A personalization's ``{"email", "name"}`` as JSON text, and the normalized address:
    :func:`_email_object` with ``quote_name``, written out because it runs for every reader.
    ValueError when the address cannot be used."""
    email = normalize_address(address)
    name = clean_header_value(name)
    if not name:
        return f'{{"email":{_json(email)}}}', email
    if "," in name or ";" in name:
        name = f'"{rfc822_quote(name)}"'
    return f'{{"email":{_json(email)},"name":{_json(name)}}}', email


# The C string encoder behind json.dumps, without json.dumps's per-call dispatch: a
# personalization holds about ten strings, and this is a fifth of the cost of dumps().
_json: Callable[[str], str] = encode_basestring


def _utf8(text: str) -> bytes:
    """``text`` as body bytes. A lone surrogate (which no valid input holds) becomes "?"
    instead of failing the batch."""
    return text.encode("utf-8", "replace")


class _Body:
    """A request body written as it is built: ``data``'s JSON with the personalizations
    added one by one, each encoded (see :func:`_utf8`) as it comes.

    Why not join them at the end: a batch's body is over half a megabyte, and a list of the
    pieces, their text joined, then encoded, held three copies of it at once. Here the body
    is the only copy (the buffer's last bytes are handed over as they are).
    """

    def __init__(self, head: str) -> None:
        self._out = io.BytesIO()
        self._out.write(_utf8(f'{head[:-1]},"personalizations":['))
        self._sep = b""

    def add(self, personalization: str) -> None:
        self._out.write(self._sep)
        self._out.write(_utf8(personalization))
        self._sep = b","

    def add_bytes(self, personalization: bytes) -> None:
        """A personalization written already (by the C module)."""
        self._out.write(self._sep)
        self._out.write(personalization)
        self._sep = b","

    def done(self) -> bytes:
        self._out.write(b"]}")
        return self._out.getvalue()


# Header names already checked, with their JSON text: the same few names come with every
# reader, and checking them once per name is enough.
_HEADER_KEYS: dict[str, str] = {}


def _header_key(name: str) -> str:
    """A header's name as the JSON text ``"name":``, checked the first time it comes (see
    :func:`checked_headers`): ValueError for a bad or reserved name."""
    key = _HEADER_KEYS.get(name)
    if key is None:
        checked_headers([(name, "")])
        key = _HEADER_KEYS[name] = f"{_json(name)}:"
    return key


def _headers_json(headers: Sequence[tuple[str, str]], once: Collection[str] = ()) -> str:
    """``"headers":{...},`` for a personalization ('' for none), but for the headers in ``once``
    (the call's message-level headers, see :func:`_batch_wide`). Names are checked once per
    distinct name (:func:`_header_key`), values cleaned every time."""
    if not headers:
        return ""
    out = []
    for name, value in headers:
        if name in once:
            continue
        key = _HEADER_KEYS.get(name) or _header_key(name)
        out.append(key + _json(clean_header_value(value)))
    return f'"headers":{{{",".join(out)}}},' if out else ""


_BATCH_NAMES = tuple(BATCH_HEADERS)


def _batch_wide(batch: Sequence[Sequence[tuple[str, str]]], names: Sequence[str] = _BATCH_NAMES
                ) -> tuple[str, ...]:
    """The headers of ``names`` (of :data:`~digest.delivery.readers.BATCH_HEADERS`, in its
    order) that every reader of ``batch`` (each one's headers) has, and with BATCH_HEADERS' value
    only: written once, in the message-level ``headers`` (:func:`_message_headers`), and left out
    of every personalization. A header some reader lacks, or has with another value, stays in
    each personalization, each reader's own. Every reader given counts, those refused later too
    (the message-level headers are written before the personalizations): at worst a header
    goes per personalization, never to a reader who should not have it."""
    wide = []
    for name in names:
        one = BATCH_HEADERS[name]
        pair = (name, one)
        if all(pair in headers and all(value == one for other, value in headers if other == name)
               for headers in batch):
            wide.append(name)
    return tuple(wide)


def _message_headers(data: dict[str, Any], wide: Sequence[str]) -> None:
    """The message-level ``headers`` of ``data``: the headers of ``wide`` (see
    :func:`_batch_wide`) with their one value, names checked as a personalization's are."""
    if wide:
        data["headers"] = dict(checked_headers([(name, BATCH_HEADERS[name]) for name in wide]))


def _key(nonce: str, kind: str, slot: str) -> str:
    """The substitution key for ``slot``: ``-d<nonce>-name-`` when the HTML and text parts
    share it (``kind`` ""), else ``-d<nonce>-h-name-`` / ``-d<nonce>-t-name-``."""
    return f"-d{nonce}-{kind}-{slot}-" if kind else f"-d{nonce}-{slot}-"


def _join(parts: Sequence[str], slots: Sequence[str], key: Callable[[str, str], str], kind: str) -> str:
    out = [parts[0]]
    for slot, part in zip(slots, parts[1:]):
        out += (key(kind, slot), part)
    return "".join(out)


def _substitutions(template: TemplateMessage, nonce: str, shared: frozenset[str]
                   ) -> tuple[Callable[[str, str], str], tuple[tuple[str, bool, int], ...]]:
    """The batch's substitution keys: the function naming a slot's key in one part (one key for
    both parts for a slot in ``shared``), and each key once, as the JSON text ``"key":`` with
    where its value is: (from the HTML values?, the slot's index)."""

    def key(kind: str, slot: str) -> str:
        return _key(nonce, "" if slot in shared else kind, slot)

    pairs: dict[str, tuple[str, bool, int]] = {}
    for kind, slots in (("h", template.html_slots), ("t", template.text_slots)):
        for slot in slots:
            pairs.setdefault(key(kind, slot), (f"{_json(key(kind, slot))}:", kind == "h", SLOT_NAMES.index(slot)))
    return key, tuple(pairs.values())


def _shared_slots(slots: frozenset[str], recipients: Iterable[TemplateRecipient]) -> frozenset[str]:
    """The ``slots`` whose HTML and text values agree for every one of ``recipients`` (URLs,
    and names with nothing to escape): one key for both parts, a third less JSON. A reader
    with the wrong number of values (refused later) decides nothing."""
    width = len(SLOT_NAMES)
    differ = [r for r in recipients if r.html_values != r.text_values and len(r.html_values) == width
              and len(r.text_values) == width]
    return frozenset(slot for slot in slots
                     if all(r.html_values[SLOT_NAMES.index(slot)] == r.text_values[SLOT_NAMES.index(slot)]
                            for r in differ))


# The headers of HEADER_STEPS a call of plain readers has once (see _batch_wide): their steps
# write the one value BATCH_HEADERS gives. In BATCH_HEADERS' order, as _batch_wide gives them.
_ONCE = tuple(name for name in _BATCH_NAMES
              if dict(HEADER_STEPS).get(name) == (BATCH_HEADERS[name].encode(),))


def _program(draft_id: int, substitutions: Sequence[tuple[str, bool, int]]) -> tuple[Step, ...]:
    """A plain reader's personalization as a program for the C module: what
    :meth:`SendGridProvider._personalization` writes with these substitutions, the reader's
    values as fields (see :mod:`digest.delivery.readers`), and the headers of :data:`_ONCE`
    left to the message-level ``headers``. A plain reader's values are what every escaping here
    leaves as they are, and the same for HTML and text."""
    steps: list[Step] = [b'{"to":[{"email":"', EMAIL, b'"', (b',"name":"', RAW_NAME, b'"'), b'}]']
    own = [(name, value) for name, value in HEADER_STEPS if name not in _ONCE]
    for number, (name, value) in enumerate(own):
        steps += (_utf8(("," if number else ',"headers":{') + _header_key(name) + '"'), *value, b'"')
    steps += (b'},"custom_args":{"ledger_id":"' if own else b',"custom_args":{"ledger_id":"', LEDGER,
              b'","draft_id":"%d"}' % draft_id)
    if substitutions:
        for number, (key, _is_html, index) in enumerate(substitutions):
            steps += (_utf8(("," if number else ',"substitutions":{') + key + '"'), SLOT_FIELDS[index], b'"')
        steps.append(b"}")
    steps.append(b"}")
    return tuple(steps)


class SendGridProvider(HttpProvider):
    """Sends through SendGrid's Mail Send endpoint; see the module docstring."""

    name: ClassVar[str] = "sendgrid"
    max_batch: ClassVar[int] = 1000  # personalizations (and recipients) per request
    parallel_calls: ClassVar[bool] = True
    default_base_url: ClassVar[str] = API_URL
    personalizes: ClassVar[bool] = True

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        if not settings.api_key:
            raise ConfigError("delivery.api_key: provider sendgrid needs an API key")
        own = session is None
        super().__init__(
            settings, session or build_session(pool_size=max(10, settings.concurrency))
        )
        self._owns_session = own
        self.send_url = f"{self.base_url}{SEND_PATH}"
        self._read_headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
        }
        self._post_headers = {**self._read_headers, "Content-Type": "application/json"}
        self._pacer = CallPacer(settings.rate_per_second)

    # -- shared pieces ------------------------------------------------------------------------

    def _envelope(
        self, from_addr: str, subject: str, reply_to: str | None, tag: str
    ) -> dict[str, Any]:
        try:
            from_name, from_email = parse_mailbox(from_addr)
            data: dict[str, Any] = {
                "from": _email_object(from_name, from_email, quote_name=False),
                "subject": clean_header_value(subject),
            }
            if reply_to:
                reply_name, reply_email = parse_mailbox(reply_to)
                data["reply_to"] = _email_object(reply_name, reply_email, quote_name=False)
        except ValueError as exc:
            raise BlockedError(
                f"sendgrid: bad From or Reply-To address: {exc}",
                hint="check newsletter.from and newsletter.reply_to",
            ) from exc
        if tag:
            data["categories"] = [tag[:255]]
        # Why off: SendGrid's subscription tracking adds its own unsubscribe link and footer;
        # ours (RFC 8058 one-click, per reader) is already in the headers and the body.
        data["tracking_settings"] = {"subscription_tracking": {"enable": False}}
        return data

    @staticmethod
    def _personalization(
        ledger_id: int,
        draft_id: int,
        to_email: str,
        to_name: str,
        headers: Sequence[tuple[str, str]],
        substitutions: str = "",
        once: Collection[str] = (),
    ) -> tuple[str, str]:
        """One reader's personalization as JSON text, and the address it goes to; its headers
        but for those in ``once``, the call's message-level ones.

        Written as text, not a dict for ``json.dumps``: this runs for every reader, and the
        generic encoder costs several times more. ValueError when the address cannot be used.
        """
        to, address = _email_json(to_name, to_email)
        # custom_args come back on every event webhook: how a bounce finds its ledger row.
        # SendGrid wants strings here (a number gives a bare "Bad Request").
        subs = f',"substitutions":{{{substitutions}}}' if substitutions else ""
        return (f'{{"to":[{to}],{_headers_json(headers, once)}"custom_args":{{"ledger_id":"{ledger_id}",'
                f'"draft_id":"{draft_id}"}}{subs}}}', address)

    @staticmethod
    def _duplicate(address: str, seen: set[str]) -> bool:
        # Why: SendGrid refuses the whole request when one address appears twice.
        key = address.strip().lower()
        if key in seen:
            return True
        seen.add(key)
        return False

    @staticmethod
    def _post(data: dict[str, Any]) -> _Body:
        """The request body, to be written: ``data`` now, then the personalizations."""
        return _Body(json.dumps(data, ensure_ascii=False, separators=(",", ":")))

    # -- full bodies ----------------------------------------------------------------------------

    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        """One request for messages that share their content (From, Subject, bodies). Pure.

        Each message becomes a personalization with its own To, headers and custom_args.
        """
        first = messages[0]
        if any(
            (m.from_addr, m.subject, m.html, m.text, m.reply_to, m.tag)
            != (first.from_addr, first.subject, first.html, first.text, first.reply_to, first.tag)
            for m in messages
        ):
            raise ValueError("sendgrid: one request carries one body; group messages first")
        data = self._envelope(first.from_addr, first.subject, first.reply_to, first.tag)
        data["content"] = self._content(first.text, first.html)
        once = _batch_wide([m.headers for m in messages])
        _message_headers(data, once)
        body = self._post(data)
        included: list[OutgoingMessage] = []
        refused: list[SendResult] = []
        seen: set[str] = set()
        for m in messages:
            try:
                item, address = self._personalization(
                    m.ledger_id, m.draft_id, m.to_email, m.to_name, m.headers, once=once
                )
            except ValueError as exc:
                refused.append(SendResult(m.ledger_id, "invalid", None, str(exc)))
                continue
            if self._duplicate(address, seen):
                refused.append(
                    SendResult(m.ledger_id, "failed", None, "the same address twice in one batch")
                )
                continue
            body.add(item)
            included.append(m)
        return PreparedCall(
            "POST",
            self.send_url,
            self._post_headers,
            body.done(),
            tuple(included),
            tuple(refused),
        )

    @staticmethod
    def _content(text: str, html: str) -> list[dict[str, str]]:
        # SendGrid wants text/plain before text/html, and no empty values (an empty string
        # makes it render one part from the other).
        content = []
        if text:
            content.append({"type": "text/plain", "value": text})
        if html:
            content.append({"type": "text/html", "value": html})
        return content

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One request per distinct body (in practice per message); see the module docstring."""
        return self.send_in_groups(messages, self._pacer)

    # -- server-side personalization ------------------------------------------------------------

    def build_template_request(
        self,
        template: TemplateMessage,
        recipients: Sequence[TemplateRecipient],
        nonce: str | None = None,
    ) -> tuple[PreparedCall, tuple[int, ...]]:
        """The one request for a template batch and the ledger ids it carries, in order.

        Pure but for the random ``nonce`` (pass one to make it deterministic). Refused
        recipients (an unusable address) are in ``PreparedCall.refused``.

        Plain readers of a :class:`~digest.delivery.readers.Readers` batch are written by the
        C module (:func:`_program`); the others (every reader, without the module) in Python.
        Both write the same bytes, in batch order. The keys (:func:`_shared_slots`) depend only
        on the readers whose values an escaping may change, found by one scan of the names
        (:meth:`~digest.delivery.readers.Readers.odd`) and made in Python first: the C module
        then writes the plain readers once, with the batch's own keys.
        """
        statics = (*template.html_parts, *template.text_parts, template.subject)
        chosen = nonce or secrets.token_hex(8)
        while any(f"-d{chosen}-" in part for part in statics):
            if nonce:
                raise ValueError("sendgrid: the given nonce occurs in the content")
            chosen = secrets.token_hex(8)  # astronomically unlikely: the content holds it
        width = len(SLOT_NAMES)
        draft_id = template.draft_id
        every_slot = frozenset((*template.html_slots, *template.text_slots))
        # The C path: plain readers' personalizations, and the readers it leaves to Python,
        # made one by one (iterating the Readers would make them all).
        batch = recipients if isinstance(recipients, Readers) and recipients.in_c() else None
        pieces: list[bytes | None] | None = None
        others: dict[int, TemplateRecipient] = {}
        if batch is not None:
            odd = batch.odd()  # the only readers whose values can split a key
            shared = _shared_slots(every_slot, odd.values())
            key, substitutions = _substitutions(template, chosen, shared)
            filled = batch.fill(_program(draft_id, substitutions))
            if filled is not None:
                pieces = filled[0]
                others = {i: odd[i] if i in odd else batch.recipient(i)
                          for i, piece in enumerate(pieces) if piece is None}
                if any(r.html_values != r.text_values for i, r in others.items() if i not in odd):
                    pieces = None  # never (see Readers.odd): the whole batch in Python, its keys decided again
                elif _batch_wide([r.headers for r in others.values()], _ONCE) != _ONCE:
                    pieces = None  # never (template_recipients gives every reader the one value): the
                    # plain readers were written without it, so the whole batch in Python
        if pieces is None:
            shared = _shared_slots(every_slot, recipients)
            key, substitutions = _substitutions(template, chosen, shared)
            once = _batch_wide([r.headers for r in recipients])
        else:
            once = _ONCE  # every plain reader has them, and (checked above) every other one

        data = self._envelope(template.from_addr, template.subject, template.reply_to, template.tag)
        data["content"] = self._content(
            _join(template.text_parts, template.text_slots, key, "t"),
            _join(template.html_parts, template.html_slots, key, "h"),
        )
        _message_headers(data, once)
        body = self._post(data)
        ids: list[int] = []
        refused: list[SendResult] = []
        seen: set[str] = set()

        def add(r: TemplateRecipient) -> None:
            html, text = r.html_values, r.text_values
            try:
                if len(html) != width or len(text) != width:
                    # A key without a value would reach the reader as "-d...-name-".
                    raise ValueError(f"slot values for {width} slots expected")
                subs = ",".join([name + _json(html[i] if is_html else text[i])
                                 for name, is_html, i in substitutions])
                item, address = self._personalization(
                    r.ledger_id, draft_id, r.to_email, r.to_name, r.headers, subs, once
                )
            except ValueError as exc:
                refused.append(SendResult(r.ledger_id, "invalid", None, str(exc)))
                return
            if self._duplicate(address, seen):
                refused.append(
                    SendResult(r.ledger_id, "failed", None, "the same address twice in one batch")
                )
                return
            body.add(item)
            ids.append(r.ledger_id)

        if batch is None or pieces is None:
            for r in recipients:
                add(r)
        else:
            for index, (row, piece) in enumerate(zip(batch.rows, pieces, strict=True)):
                if piece is None:
                    add(others[index])
                elif self._duplicate(row.email, seen):  # a plain address is its own normal form
                    refused.append(
                        SendResult(row.ledger_id, "failed", None, "the same address twice in one batch")
                    )
                else:
                    body.add_bytes(piece)
                    ids.append(row.ledger_id)
        call = PreparedCall(
            "POST", self.send_url, self._post_headers, body.done(), (),
            tuple(refused)
        )
        return call, tuple(ids)

    def send_template_batch(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> list[SendResult]:
        """One request for the whole batch: the template once, each reader's values apart."""
        return self.template_sender(template, recipients)()

    def template_sender(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> Callable[[], list[SendResult]]:
        """The batch's one request, built now; the returned function sends it (again, for a
        retry: the same body, nonce included) and returns one result per recipient."""
        if not recipients:
            return list
        self._check_batch(recipients)
        call, ids = self.build_template_request(template, recipients)
        order = ledger_ids(recipients)
        return partial(self.send_built_template, call, ids, order, self._answer)

    def _answer(self, status: int, headers: Mapping[str, str], body: bytes, ids: Sequence[int]) -> list[SendResult]:
        self._raise_for_status(status, headers, body)
        return self._parse(status, headers, body, ids)

    # -- answers ----------------------------------------------------------------------------

    def handle_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """As the base class, with SendGrid's error messages in auth errors."""
        lowered = {k.lower(): v for k, v in headers.items()}
        self._raise_for_status(status, lowered, body)
        return self.parse_response(status, lowered, body, messages)

    def retry_after_of(self, status: int, headers: Mapping[str, str]) -> float | None:
        """``Retry-After`` if SendGrid sent one; else, on a 429, the time until
        ``X-RateLimit-Reset`` (Unix seconds) says the limit resets (APIS.md A.2)."""
        wait = super().retry_after_of(status, headers)
        if wait is None and status == 429:
            wait = reset_at_seconds(headers.get("x-ratelimit-reset"), now=clock.now())
        return wait

    def _raise_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, sends_mail: bool = True
    ) -> None:
        if status in (401, 403):
            detail = _errors(body)
            # Why 403 is still an AuthError: SendGrid answers 403 both for a key without the
            # mail.send scope and for an unverified From; neither gets better by retrying,
            # and both need the operator, so the send stops.
            hint = _FROM_HINT if "sender identity" in detail.lower() else _AUTH_HINT
            raise AuthError(
                f"sendgrid: HTTP {status}: {detail or 'the provider refused the credentials'}",
                status=status,
                response_text=response_text(body),
                hint=hint,
            )
        self.raise_for_common_status(status, headers, body, sends_mail=sends_mail)

    def parse_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """202 → every message sent; 400/413 → a not-retryable error with SendGrid's reasons."""
        return self._parse(status, headers, body, [m.ledger_id for m in messages])

    def _parse(
        self, status: int, headers: Mapping[str, str], body: bytes, ids: Sequence[int]
    ) -> list[SendResult]:
        if 200 <= status < 300:
            # Why the index: SendGrid gives one X-Message-Id for the whole request; events name
            # it as the prefix of sg_message_id and carry our ledger_id custom arg.
            message_id = headers.get("x-message-id")
            if status != 202 and not message_id:
                raise UncertainDeliveryError(
                    f"sendgrid: unexpected HTTP {status}; the messages may have been accepted",
                    status=status,
                    response_text=response_text(body),
                )
            # Every row gets the request's id: SendGrid's events carry it as the prefix of
            # sg_message_id, and our ledger_id custom arg names the row.
            return [SendResult(i, "sent", message_id) for i in ids]
        detail = _errors(body)
        if status == 400:
            raise DeliveryError(
                f"sendgrid: HTTP 400: {detail or 'bad request'}",
                retryable=False,
                status=status,
                response_text=response_text(body),
            )
        raise self.status_error(status, body, detail)

    def check(self) -> str:
        """``GET /v3/scopes``: proves the key and the URL, and that the key may send."""
        url = f"{self.base_url}{SCOPES_PATH}"
        status, headers, body = self.request("GET", url, self._read_headers)
        self._raise_for_status(
            status, {k.lower(): v for k, v in headers.items()}, body, sends_mail=False
        )
        if status != 200:
            raise self.status_error(status, body, _errors(body))
        try:
            data = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, body_summary(body)) from None
        scopes = data.get("scopes") if isinstance(data, dict) else None
        if not isinstance(scopes, list):
            raise self.status_error(status, body, "no scopes in the answer")
        if "mail.send" not in scopes:
            raise AuthError("sendgrid: the API key lacks the mail.send scope", hint=_AUTH_HINT)
        return f"sendgrid: reached {self.base_url}; the key may send (mail.send)"


def _errors(body: bytes) -> str:
    """SendGrid's ``errors[].message`` joined, or ''."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return ""
    messages = []
    for item in errors:
        if isinstance(item, dict) and item.get("message"):
            field = item.get("field")
            text = str(item["message"])
            messages.append(f"{field}: {text}" if field else text)
    return response_text("; ".join(messages))
