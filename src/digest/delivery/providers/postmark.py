"""Postmark: ``POST /email/batch``, up to 500 messages per call, one result per message.

Request: a JSON array of ``{From, To, Subject, HtmlBody, TextBody, MessageStream, Tag,
Metadata, Headers, ReplyTo}`` with the server token in ``X-Postmark-Server-Token``. Answer:
HTTP 200 with an array in request order, one ``{ErrorCode, Message, MessageID, To}`` per
message, even when some failed; a failure of the whole call is HTTP 401, 422 (with an
``ErrorCode``), 429 or 5xx. The token ``POSTMARK_API_TEST`` makes Postmark validate without
delivering. Reference: shared/reference/APIS.md section A.1.

A per-message ErrorCode about the sender or the account (a sender signature missing or not
confirmed, an account that may not send, an invalid From) is no reader's rejection: every
message of the send would get it. Such a batch stops the send, back in the queue; see
:meth:`PostmarkProvider._results`.

Bodies go out with no two braces side by side (:func:`literal_braces`): Postmark replaces its
unsubscribe placeholder, ``{{{ pm:unsubscribe }}}``, in the bodies of messages sent without a
template, and a comment quoting it must reach readers as written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import requests

from digest.config import Delivery
from digest.delivery.mime import (
    clean_header_value,
    custom_headers,
    format_address,
    normalize_address,
    parse_mailbox,
)
from digest.delivery.providers.base import (
    HttpProvider,
    PreparedCall,
    Provider,
    UncertainDeliveryError,
    body_summary,
    json_escape,
    json_string,
    response_text,
)
from digest.delivery.readers import HEADER_STEPS, LEDGER, SLOT_FIELDS, TO, Readers, Step, ledger_ids
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from digest.http import BodyParts
from digest.types import (
    SLOT_NAMES,
    OutgoingMessage,
    ResultStatus,
    SendResult,
    TemplateMessage,
    TemplateRecipient,
)

API_URL = "https://api.postmarkapp.com"
TEST_TOKEN = "POSTMARK_API_TEST"

# Per-message ErrorCode → our status, for codes with a meaning of their own (see _result).
_INACTIVE = 406  # the recipient hard-bounced or complained earlier: Postmark will not send
_INVALID_REQUEST = 300
_RETRY_LATER = frozenset({100, 429})  # maintenance, rate limit
_INVALID_TO_RE = re.compile(r"^\s*(Invalid|Error\s+parsing)\s+'To'", re.IGNORECASE)
_INACTIVE_OK_RE = re.compile(
    r"will not deliver to these inactive addresses:\s*(.*?)\.\s*Inactive recipients",
    re.IGNORECASE | re.DOTALL,
)

# Postmark puts its own unsubscribe link where a message sent without a template holds the
# placeholder {{{ pm:unsubscribe }}} (or {{{ pm:unsubscribe label="..." }}}), in its HTML and
# its text (postmarkapp.com/support/article/1208-how-to-add-an-unsubscribe-link). A comment
# quoting it must reach readers as written, so no two braces may stay side by side in a body
# (see literal_braces): each "{" followed by another becomes, in the HTML, the character
# reference &#123;, which every client renders as "{"; in the text, "{" and a zero-width space.
_BRACE_PAIR_RE = re.compile(r"\{(?=\{)")
# Why a zero-width space in the text: it is invisible, it breaks the pair for Postmark, and it
# is what the Mailgun path puts into its own syntax, so readers and tests meet one convention.
# A visible change (a space, a backslash) would alter what the commenter wrote for every
# reader; a word joiner (U+2060) would do too, but fewer fonts draw it as nothing.
ZWSP = "\u200b"


def literal_braces(text: str, *, html: bool, before_slot: bool = False) -> str:
    """``text`` with no "{" next to another for Postmark to read as its placeholder: each
    "{" followed by a "{" made a character reference (``html``) or followed by a zero-width
    space (text). Text without "{{" comes back as itself.

    ``before_slot``: a reader's value follows ``text`` in the body, and may begin with "{":
    a "{" ending ``text`` is made literal too (a value itself is always followed by something,
    so the pieces of a template pass True for every piece but the last)."""
    if "{" not in text:
        return text
    if "{{" in text:
        text = _BRACE_PAIR_RE.sub("&#123;" if html else "{" + ZWSP, text)
    if before_slot and text.endswith("{"):
        text = text[:-1] + "&#123;" if html else text + ZWSP
    return text


def _literal_parts(parts: Sequence[str], *, html: bool) -> list[str]:
    """A template's static parts through :func:`literal_braces`, each but the last followed
    by a reader's value."""
    last = len(parts) - 1
    return [literal_braces(p, html=html, before_slot=i < last) for i, p in enumerate(parts)]


# Whole-call 422 ErrorCodes that need a hint for the operator.
_CALL_HINTS: dict[int, str] = {
    10: "check delivery.api_key: it must be a Postmark server token",
    400: "the From address needs a confirmed sender signature or domain in Postmark",
    401: "the From address needs a confirmed sender signature or domain in Postmark",
    405: "the Postmark account is not allowed to send; see its activity page",
    410: "lower delivery.batch_size (Postmark takes at most 500 messages per batch)",
    412: "the Postmark account is pending approval",
    413: "the Postmark account may not send",
}
# Per-message ErrorCodes about the sender or the account, not the reader: sender signature
# not found (400) or not confirmed (401), not allowed to send (405), account pending (412) or
# barred (413) (shared/reference/APIS.md A.1 classes them "config" or "account"). Every
# message of the send meets the same answer, so none is a reader's own rejection: the send
# stops (see _results).
_SENDER_HINTS: dict[int, str] = {code: _CALL_HINTS[code] for code in (400, 401, 405, 412, 413)}
# ErrorCode 300 (invalid request) about the From (or Reply-To) address rather than the To:
# "Invalid 'From' address: ...", "Error parsing 'From': ...". The Reply-To wording is assumed
# to follow the From's; it was not seen in Postmark's answers.
_INVALID_SENDER_RE = re.compile(r"^\s*(Invalid|Error\s+parsing)\s+'(From|ReplyTo|Reply-To)'", re.IGNORECASE)


class _Addressed(Protocol):
    """What reading an answer needs of a message (an OutgoingMessage, a TemplateRecipient or
    a claimed row)."""

    @property
    def ledger_id(self) -> int: ...

    @property
    def to_email(self) -> str: ...

    @property
    def to_name(self) -> str: ...


# A shared part at least this long is sent by reference; shorter ones are copied into the
# message's runs of small pieces.
_LARGE = 2048


class _Skeleton(NamedTuple):
    """A template's shared JSON, encoded once per draft (see ``_skeleton``)."""

    lead: bytes  # '{"From":..., "To":"', before the recipient's address
    next_lead: bytes  # the same after another message: with the comma between them
    first: bytes  # from the end of To to the first recipient value
    gaps: tuple[tuple[int, bytes, bool], ...]  # (value position, the constant bytes after it, large?)
    end: MessageEnd  # after the ledger id
    # A plain reader's message for the C module (see readers.Readers.fill): one program per
    # run of small pieces, and the large parts that come between the runs. The first program
    # opens with the comma between messages.
    programs: tuple[tuple[Step, ...], ...]
    larges: tuple[bytes, ...]


#: The JSON before a header's value, by the header's name: for the first header of a message
#: (which opens the array), and for the others (which follow one).
HeaderPrefixes = tuple[dict[str, bytes], dict[str, bytes]]


class MessageEnd(NamedTuple):
    """A message's JSON after its ledger id, the same for all of a draft's messages but for
    the reader's headers: the draft id, the headers, the Reply-To (see ``_message_end``)."""

    bare: bytes  # for a message without headers
    headers_open: bytes  # up to the headers array
    headers_tail: bytes  # after the last header value

    def write(self, run: list[bytes], headers: Sequence[tuple[str, str]], prefixes: HeaderPrefixes) -> None:
        """Append the end of a message with ``headers`` to ``run`` (see :func:`header_values`)."""
        if not headers:
            run.append(self.bare)
        else:
            run.append(self.headers_open)
            header_values(run, headers, prefixes)
            run.append(self.headers_tail)

    def program(self) -> tuple[Step, ...]:
        """The same as steps of a plain reader's program: its headers are
        :func:`~digest.delivery.readers.list_headers`' (see ``HEADER_STEPS``)."""
        steps: list[Step] = [self.headers_open]
        for number, (name, value) in enumerate(HEADER_STEPS):
            steps += ((b'{"Name":' if number == 0 else b'"},{"Name":') + json_string(name) + b',"Value":"', *value)
        steps.append(self.headers_tail)
        return tuple(steps)


def header_values(run: list[bytes], headers: Sequence[tuple[str, str]], prefixes: HeaderPrefixes) -> None:
    """Append a message's ``Headers`` array entries to ``run``: each header's JSON up to its
    value (kept in ``prefixes`` for the batch: the header names repeat in every message),
    then the value, cleaned and escaped. The caller writes the array's opening and its
    closing ``"}]``. Runs for every header of every reader: a printable value without
    quotes or backslashes (ours, as a rule) is cleaned and escaped by ``strip`` alone."""
    known = prefixes[0]
    for name, value in headers:
        prefix = known.get(name)
        if prefix is None:
            opening = known is prefixes[0]
            prefix = known[name] = (b'{"Name":' if opening else b'"},{"Name":') + json_string(name) + b',"Value":"'
        if value.isprintable() and '"' not in value and "\\" not in value:
            run += (prefix, value.strip().encode())
        else:
            run += (prefix, json_escape(clean_header_value(value)))
        known = prefixes[1]


def reader_to(r: TemplateRecipient, width: int) -> bytes:
    """A template recipient's ``To``, escaped for the JSON string, once its values are checked
    (one per slot in each part); ``ValueError`` for a reader no message can carry. Shared by
    Postmark's two per-reader builders (full bodies, server templates)."""
    if len(r.html_values) != width or len(r.text_values) != width:
        raise ValueError(f"slot values for {width} slots expected")
    return json_escape(format_address(r.to_name, r.to_email))


class PostmarkProvider(HttpProvider):
    """Sends through Postmark's batch endpoint; see the module docstring for the wire format."""

    name: ClassVar[str] = "postmark"
    max_batch: ClassVar[int] = 500
    default_base_url: ClassVar[str] = API_URL
    # 50 MB per batch, counted by Postmark after base64 (we send no attachments).
    max_request_bytes: ClassVar[int | None] = 50_000_000

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        if not settings.api_key:
            raise ConfigError("delivery.api_key: provider postmark needs a server token")
        super().__init__(settings, session)
        self._template_cache: tuple[TemplateMessage, _Skeleton] | None = None
        self.token = settings.api_key
        self.batch_url = f"{self.base_url}/email/batch"
        self._read_headers = {"X-Postmark-Server-Token": self.token, "Accept": "application/json"}
        self._post_headers = {**self._read_headers, "Content-Type": "application/json"}
        self._stream = json_string(settings.message_stream)

    @classmethod
    def variant(cls, settings: Delivery) -> type[Provider]:
        """:class:`~.postmark_templates.PostmarkTemplateProvider` when the settings opt into
        Postmark's server templates (``postmark_templates`` with
        ``server_side_personalization``), else full bodies through this class."""
        if cls is PostmarkProvider and settings.postmark_templates and settings.server_side_personalization:
            from digest.delivery.providers.postmark_templates import PostmarkTemplateProvider

            return PostmarkTemplateProvider
        return cls

    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        """The ``/email/batch`` request: a JSON array, one object per message. Pure.

        Built as bytes pieces joined once: values shared across the batch (From, Subject, Tag,
        header names and values) are encoded once, and each body is escaped with
        :func:`json_escape` instead of going through ``json.dumps`` on a dict of dicts.
        """
        memo: dict[tuple[str, str], bytes] = {}

        def shared(kind: str, value: str) -> bytes:
            key = (kind, value)
            encoded = memo.get(key)
            if encoded is None:
                encoded = memo[key] = json_string(self._header_text(kind, value))
            return encoded

        parts: list[bytes] = [b"["]
        included: list[OutgoingMessage] = []
        refused: list[SendResult] = []
        for m in messages:
            try:
                to = json_string(format_address(m.to_name, m.to_email))
            except ValueError as exc:
                refused.append(SendResult(ledger_id=m.ledger_id, status="invalid", error=str(exc)))
                continue
            if included:
                parts.append(b",")
            included.append(m)
            parts += (
                b'{"From":',
                shared("from", m.from_addr),
                b',"To":',
                to,
                b',"Subject":',
                shared("subject", m.subject),
            )
            if m.html:
                parts += (b',"HtmlBody":"', json_escape(literal_braces(m.html, html=True)), b'"')
            if m.text:
                parts += (b',"TextBody":"', json_escape(literal_braces(m.text, html=False)), b'"')
            parts += (b',"MessageStream":', self._stream)
            if m.tag:
                parts += (b',"Tag":', shared("tag", m.tag))
            # Metadata values are strings in Postmark; the ledger id comes back on webhooks.
            parts.append(
                b',"Metadata":{"ledger_id":"%d","draft_id":"%d"}' % (m.ledger_id, m.draft_id)
            )
            # Why no Message-ID: Postmark assigns its own and reports it as MessageID, which is
            # the id its webhooks carry; m.message_id is only used by the outbox and SMTP.
            headers = custom_headers(m)
            if headers:
                parts.append(b',"Headers":[')
                for i, (name, value) in enumerate(headers):
                    parts += (
                        b',{"Name":' if i else b'{"Name":',
                        shared("name", name),
                        b',"Value":',
                        shared("value", value),
                        b"}",
                    )
                parts.append(b"]")
            if m.reply_to:
                parts += (b',"ReplyTo":', shared("reply_to", m.reply_to))
            parts.append(b"}")
        parts.append(b"]")
        return PreparedCall(
            method="POST",
            url=self.batch_url,
            headers=self._post_headers,
            body=b"".join(parts),
            messages=tuple(included),
            refused=tuple(refused),
        )

    # -- the template path: the digest's shared parts are JSON-encoded once per draft -------

    #: The sender may hand this provider a template and per-recipient values instead of
    #: finished messages; Postmark still gets a full body per message, built here.
    accepts_templates: ClassVar[bool] = True

    def _skeleton(self, template: TemplateMessage) -> _Skeleton:
        """Every byte of a message's JSON that all recipients share, encoded once per draft."""
        cached = self._template_cache
        if cached is not None and cached[0] is template:
            return cached[1]
        # Postmark's placeholder made literal here, once per draft (see literal_braces).
        html = [json_escape(p) for p in _literal_parts(template.html_parts, html=True)]
        text = [json_escape(p) for p in _literal_parts(template.text_parts, html=False)]
        meta = b',"MessageStream":' + self._stream
        if template.tag:
            meta += b',"Tag":' + json_string(clean_header_value(template.tag))
        meta += b',"Metadata":{"ledger_id":"'
        # A message from Subject to the ledger id, as constant bytes and the positions of the
        # recipient's values (its html values, then its text values, in SLOT_NAMES order).
        width = len(SLOT_NAMES)
        sequence: list[bytes | int] = [b'","Subject":' + json_string(clean_header_value(template.subject))]
        for key, parts, slots, offset in ((b"HtmlBody", html, template.html_slots, 0),
                                          (b"TextBody", text, template.text_slots, width)):
            if not slots and not parts[0]:
                continue  # an empty body is left out, as build_request leaves it (slot values never are empty)
            sequence += (b',"' + key + b'":"', parts[0])
            for slot, part in zip(slots, parts[1:]):
                sequence += (offset + SLOT_NAMES.index(slot), part)
            sequence.append(b'"')
        sequence.append(meta)
        # Adjacent constants merged: fewer, larger pieces to splice per message.
        first = b""
        gaps: list[tuple[int, bytes]] = []
        for piece in sequence:
            if isinstance(piece, int):
                gaps.append((piece, b""))
            elif gaps:
                gaps[-1] = (gaps[-1][0], gaps[-1][1] + piece)
            else:
                first += piece
        end = self._message_end(template)
        lead = b'{"From":' + json_string(self._header_text("from", template.from_addr)) + b',"To":"'
        # The same message as programs: the runs between the large parts, a value as its field
        # (a plain reader's HTML and text values are the same, with nothing to escape).
        programs: list[tuple[Step, ...]] = []
        larges: list[bytes] = []
        run: list[Step] = [b"," + lead, TO]
        for field, constant in ((None, first), *((SLOT_FIELDS[index % width], constant) for index, constant in gaps)):
            if field is not None:
                run.append(field)
            if len(constant) >= _LARGE:
                programs.append(tuple(run))
                larges.append(constant)
                run = []
            elif constant:
                run.append(constant)
        programs.append((*run, LEDGER, *end.program()))
        skeleton = _Skeleton(
            lead=lead,
            next_lead=b"," + lead,
            first=first,
            gaps=tuple((index, constant, len(constant) >= _LARGE) for index, constant in gaps),
            end=end,
            programs=tuple(programs),
            larges=tuple(larges),
        )
        self._template_cache = (template, skeleton)
        return skeleton

    def _template_parts(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> tuple[list[bytes], list[_Addressed], list[SendResult]]:
        """The pieces of the ``/email/batch`` body for ``recipients``, the recipients it
        carries and the results of those refused (see :meth:`build_template_request`).

        Plain readers of a :class:`~digest.delivery.readers.Readers` batch are written by the
        C module, from one program per run of small pieces between the draft's large shared
        parts (:attr:`_Skeleton.programs`); the others (every reader, without the module) by
        :meth:`_reader_parts`. Both write the same bytes."""
        skeleton = self._skeleton(template)
        header_prefix: HeaderPrefixes = ({}, {})
        parts: list[bytes] = [b"["]
        included: list[_Addressed] = []
        refused: list[SendResult] = []
        if isinstance(recipients, Readers) and (filled := recipients.fill(*skeleton.programs)) is not None:
            rows, larges = recipients.rows, skeleton.larges
            # A message's pieces: its runs (written in C) with the large parts between them.
            message: list[bytes] = [b""] * (2 * len(larges) + 1)
            message[1::2] = larges
            for index, runs in enumerate(zip(*filled)):
                if runs[0] is None:  # left to Python (see Readers.fill)
                    self._reader_parts(recipients.recipient(index), skeleton, header_prefix, parts, included,
                                       refused)
                    continue
                message[::2] = runs
                if not included:  # the programs open with the comma between messages
                    message[0] = message[0][1:]
                parts += message
                included.append(rows[index])
        else:
            for r in recipients:
                self._reader_parts(r, skeleton, header_prefix, parts, included, refused)
        parts.append(b"]")
        return parts, included, refused

    def _reader_parts(self, r: TemplateRecipient, skeleton: _Skeleton, header_prefix: HeaderPrefixes,
                      parts: list[bytes], included: list[_Addressed], refused: list[SendResult]) -> None:
        """One reader's message appended to ``parts`` in Python (see :meth:`_template_parts`),
        or its refusal to ``refused``."""
        join = b"".join
        width = len(SLOT_NAMES)
        html_values, text_values = r.html_values, r.text_values
        try:
            to = reader_to(r, width)
        except ValueError as exc:
            refused.append(SendResult(ledger_id=r.ledger_id, status="invalid", error=str(exc)))
            return
        # The message as a few pieces: the draft's large shared parts by reference, and
        # each run of small pieces between them joined into one (the body is sliced and
        # sent piece by piece, and a piece costs about as much to handle as its copy).
        run = [skeleton.next_lead if included else skeleton.lead, to]
        included.append(r)
        first = skeleton.first
        if len(first) >= _LARGE:
            parts += (join(run), first)
            run = []
        else:
            run.append(first)
        # Each value escaped once, however many gaps it fills; the text values are usually
        # the HTML ones (signed links and plain names need no HTML escaping). A name with
        # braces is made literal for Postmark (a value precedes every other piece).
        # (One join and a search: a tenth of the cost of a test per value.)
        if "{" in "".join(html_values) or (text_values is not html_values and "{" in "".join(text_values)):
            values = [json_escape(literal_braces(v, html=True, before_slot=True)) for v in html_values]
            values += [json_escape(literal_braces(v, html=False, before_slot=True)) for v in text_values]
        else:
            values = [json_escape(v) for v in html_values]
            if text_values == html_values:
                values *= 2
            else:
                values += [json_escape(v) for v in text_values]
        for index, constant, large in skeleton.gaps:
            if large:
                run.append(values[index])
                parts += (join(run), constant)
                run = []
            else:
                run += (values[index], constant)
        run.append(b"%d" % r.ledger_id)
        skeleton.end.write(run, r.headers, header_prefix)
        parts.append(join(run))

    def build_template_request(self, template: TemplateMessage,
                               recipients: Sequence[TemplateRecipient]) -> PreparedCall:
        """The same ``/email/batch`` body :meth:`build_request` gives for the personalized
        messages, without encoding each ~50 KB body again: the shared JSON (addresses,
        subject, the bodies' static parts, stream, tag) is encoded once per draft, and each
        message splices in only its own values. Pure."""
        parts, included, refused = self._template_parts(template, recipients)
        messages = tuple(
            OutgoingMessage(ledger_id=r.ledger_id, draft_id=template.draft_id, to_email=r.to_email,
                            to_name=r.to_name, from_addr=template.from_addr, subject=template.subject,
                            html="", text="")
            for r in included
        )
        return PreparedCall(method="POST", url=self.batch_url, headers=self._post_headers,
                            body=b"".join(parts), messages=messages, refused=tuple(refused))

    def send_template_batch(self, template: TemplateMessage,
                            recipients: Sequence[TemplateRecipient]) -> list[SendResult]:
        """One ``/email/batch`` call for a template batch (see :meth:`build_template_request`).

        Same request and results as sending :meth:`build_template_request`'s call, without an
        OutgoingMessage per recipient: reading the answer needs only ledger ids and addresses.
        """
        if not recipients:
            return []
        self._check_batch(recipients)
        parts, included, refused = self._template_parts(template, recipients)
        call = PreparedCall(method="POST", url=self.batch_url, headers=self._post_headers,
                            body=BodyParts(parts),  # sent in slices, never joined whole
                            messages=(), refused=tuple(refused))
        self.check_size(call)

        def answer(status: int, headers: Mapping[str, str], reply: bytes,
                   ids: Sequence[int]) -> list[SendResult]:
            self.raise_for_common_status(status, headers, reply)
            return self._results(status, reply, included)

        return self.send_built_template(call, [r.ledger_id for r in included], ledger_ids(recipients), answer)

    def _message_end(self, template: TemplateMessage) -> MessageEnd:
        draft = b'","draft_id":"%d"}' % template.draft_id
        tail = (b',"ReplyTo":' + json_string(self._header_text("reply_to", template.reply_to))
                if template.reply_to else b"") + b"}"
        return MessageEnd(bare=draft + tail, headers_open=draft + b',"Headers":[', headers_tail=b'"}]' + tail)

    def _header_text(self, kind: str, value: str) -> str:
        """A shared value made ready for the JSON: addresses formatted, text cleaned."""
        if kind in ("from", "reply_to"):
            try:
                name, addr = parse_mailbox(value)
                return format_address(name, addr)
            except ValueError as exc:
                key = "newsletter.from" if kind == "from" else "newsletter.reply_to"
                raise BlockedError(
                    f"postmark: bad {kind} address: {exc}", hint=f"check {key}"
                ) from exc
        return clean_header_value(value)  # custom_headers already cleaned values; cheap if so

    def parse_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        """Read the per-message array; turn a whole-call 422 into the matching error."""
        return self._results(status, body, messages)

    def _results(self, status: int, body: bytes, messages: Sequence[_Addressed]) -> list[SendResult]:
        """:meth:`parse_response` for anything with a ledger id and an address."""
        if status == 422:
            # Why 422 is not just "a 4xx": Postmark reports most whole-call errors this way,
            # with an ErrorCode that tells auth (10) from maintenance (100) from bad requests.
            raise self.api_error(status, body)
        if not 200 <= status < 300:
            raise self.status_error(status, body)
        data = self.decode_json(status, body)
        if not isinstance(data, list):
            raise UncertainDeliveryError(
                f"postmark: HTTP {status} but the answer is not a per-message array; "
                "the messages may have been accepted",
                status=status,
                response_text=response_text(body),
            )
        if len(data) != len(messages):
            raise UncertainDeliveryError(
                f"postmark: {len(data)} results for {len(messages)} messages; "
                "cannot tell which were accepted",
                status=status,
                response_text=response_text(body),
            )
        # The usual answer, {"ErrorCode": 0, "Message": "OK", "MessageID": ...}, read inline:
        # this runs for every reader, and the general reading below costs three times as much.
        out: list[SendResult] = []
        append = out.append
        refusals: list[tuple[str, str]] = []  # refused for the sender or the account: (what, hint)
        for m, item in zip(messages, data):
            if type(item) is dict and item.get("ErrorCode") == 0 and item.get("Message") == "OK":
                message_id = item.get("MessageID")
                append(SendResult(m.ledger_id, "sent", str(message_id) if message_id else None))
            else:
                append(self._result(m, item, status, body, refusals))
        if refusals and not any(r.status == "sent" for r in out):
            # No reader is at fault, and the next batch would meet the same answer: the send
            # stops with the batch back in the queue, nobody marked.
            what, hint = refusals[0]
            raise BlockedError(f"postmark: {what}", status=status, response_text=response_text(body), hint=hint)
        # Messages of the batch were accepted (unlikely beside such a refusal): raising would
        # put them back in the queue and send them again. They stay sent; the refused ones
        # go back to the queue ("deferred"), and the next batch stops the send.
        return out

    def _result(self, msg: _Addressed, item: Any, status: int, body: bytes,
                refusals: list[tuple[str, str]]) -> SendResult:
        if not isinstance(item, dict):
            raise UncertainDeliveryError(
                f"postmark: result for ledger row {msg.ledger_id} is not an object",
                status=status,
                response_text=response_text(body),
            )
        # Why the default 0: "Message accepted, but delivery may be delayed." comes without an
        # ErrorCode, and it is a success (queued at Postmark).
        code = _as_int(item.get("ErrorCode", 0))
        text = str(item.get("Message", ""))
        message_id = item.get("MessageID")
        provider_id = str(message_id) if message_id else None
        if code == 0:
            # Why read the text of a success: Postmark answers "Message OK, but will not deliver
            # to these inactive addresses: ..." when a recipient is inactive. Our messages have
            # one recipient, so if it is listed nothing is delivered. Addresses come lower-cased.
            inactive = _INACTIVE_OK_RE.search(text)
            if inactive and _listed(msg.to_email, _address_list(inactive.group(1))):
                return SendResult(msg.ledger_id, "suppressed", provider_id, response_text(text))
            return SendResult(msg.ledger_id, "sent", provider_id)
        what = f"Postmark ErrorCode {code}: {text}"
        hint = _SENDER_HINTS.get(code) if code is not None else None
        if code == _INVALID_REQUEST and _INVALID_SENDER_RE.match(text):
            hint = "check newsletter.from and newsletter.reply_to: Postmark refuses the address"
        if hint is not None:
            refusals.append((what, hint))
            return SendResult(msg.ledger_id, "deferred", None, response_text(f"not sent: {what}"))
        result: ResultStatus
        if code == _INACTIVE:
            result = "suppressed"
        elif code == _INVALID_REQUEST and _INVALID_TO_RE.match(text):
            result = "invalid"  # "Invalid 'To' address: ..." / "Error parsing 'To': ..."
        elif code in _RETRY_LATER:
            result = "deferred"  # not sent, and a later call may succeed
        else:
            result = "rejected"
        return SendResult(msg.ledger_id, result, None, response_text(what))

    def api_error(self, status: int, body: bytes) -> DeliveryError:
        """The error for a whole-call failure that carries a Postmark ``ErrorCode`` (HTTP 422)."""
        try:
            data = json.loads(body)
        except ValueError:
            return self.status_error(status, body, body_summary(body))
        code = _as_int(data.get("ErrorCode")) if isinstance(data, dict) else None
        text = str(data.get("Message", "")) if isinstance(data, dict) else ""
        what = f"postmark: HTTP {status}, ErrorCode {code}: {text}"
        shown = response_text(body)
        if code == 10:
            return AuthError(what, status=status, response_text=shown, hint=_CALL_HINTS[10])
        if code in _RETRY_LATER:
            return DeliveryError(what, retryable=True, status=status, response_text=shown)
        hint = _CALL_HINTS.get(code) if code is not None else None
        if code in _CALL_HINTS:  # the sender, the account or the batch size: every batch alike
            return BlockedError(what, status=status, response_text=shown, hint=hint)
        return DeliveryError(what, retryable=False, status=status, response_text=shown, hint=hint)

    def check(self) -> str:
        """``GET /server`` with the token: proves the URL and the token without sending."""
        url = f"{self.base_url}/server"
        status, headers, body = self.request("GET", url, self._read_headers)
        self.raise_for_common_status(
            status, {k.lower(): v for k, v in headers.items()}, body, sends_mail=False
        )
        if status == 422:
            raise self.api_error(status, body)
        if status != 200:
            raise self.status_error(status, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, body_summary(body)) from None
        server = data.get("Name") if isinstance(data, dict) else None
        stream = self.settings.message_stream
        line = f"postmark: reached server {server or '?'!r} at {self.base_url}, stream {stream!r}"
        if self.token == TEST_TOKEN:
            line += " (test token: Postmark validates messages but delivers none)"
        return line


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _address_list(text: str) -> set[str]:
    return {part.strip().lower() for part in text.split(",") if part.strip()}


def _listed(address: str, listed: set[str]) -> bool:
    """Whether Postmark's list names ``address``: as stored, or as it was sent (a domain beyond
    ASCII goes out IDNA-encoded, and Postmark names it that way)."""
    address = address.strip().lower()
    if address in listed:
        return True
    try:
        return normalize_address(address).lower() in listed
    except ValueError:
        return False
