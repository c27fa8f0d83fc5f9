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
their name and links in the bodies. A header with the same value for every reader of the call
(``List-Unsubscribe-Post: List-Unsubscribe=One-Click``, see :func:`_batch_wide`) is a plain
``h:`` field instead, which every copy carries: once per call, not once per reader.

**Injection.** Mailgun substitutes ``%recipient.<key>%`` anywhere, its unsubscribe
variables (``%unsubscribe_url%``, ``%tag_unsubscribe_url%``, ``%mailing_list_unsubscribe_url%``,
``%unsubscribe_email%``) and its own reader variables (``%recipient%``, ``%recipient_email%``,
``%recipient_name%``, ``%recipient_fname%``, ``%recipient_lname%``) too, so a comment quoting
``%recipient.unsubscribe_url%`` would otherwise show one reader another's link, show readers
their own address, or unsubscribe them through Mailgun. Every piece of content we send (static
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from itertools import chain, groupby, repeat
from json.encoder import encode_basestring
from operator import attrgetter, itemgetter
from typing import Any, ClassVar, Protocol, cast
from urllib.parse import quote

import requests

from digest.config import Delivery
from digest.delivery.mime import (
    clean_header_value,
    format_address,
    format_mailbox,
    normalize_address,
    parse_mailbox,
)
from digest.delivery.providers.base import (
    CallPacer,
    HttpProvider,
    PreparedCall,
    UncertainDeliveryError,
    body_summary,
    checked_headers,
    response_text,
    slot_map,
)
from digest.delivery.readers import (
    BATCH_HEADERS,
    EMAIL,
    HEADER_STEPS,
    LEDGER,
    SLOT_FIELDS,
    TO,
    Readers,
    Step,
    ledger_ids,
)
from digest.errors import BlockedError, ConfigError, DeliveryError
from digest.http import build_session
from digest.types import (
    SLOT_NAMES,
    OutgoingMessage,
    SendResult,
    TemplateMessage,
    TemplateRecipient,
)

US_API_URL = "https://api.mailgun.net"
EU_API_URL = "https://api.eu.mailgun.net"

# Every variable Mailgun may fill in per reader: ``%recipient.<key>%``, its own ``%recipient%``,
# ``%recipient_email%``, ``%recipient_name%``, ``%recipient_fname%``, ``%recipient_lname%``
# (documented for mailing lists; neutralized whatever the sending path, since a batch may be
# treated alike), ``%unsubscribe_email%`` and the three unsubscribe links.
_MAILGUN_VARIABLE_RE = re.compile(
    r"%(?=recipient[.%]|recipient_[a-z]+%|(?:tag_|mailing_list_)?unsubscribe_url%|unsubscribe_email%)",
    re.IGNORECASE,
)
_ZWSP = "\u200b"
_MAGNIFICENT = b"Mailgun Magnificent API"
_TWICE = "the same address twice in one batch"
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
    return _multipart(
        [(name, [value for _, value in run]) for name, run in groupby(fields, key=itemgetter(0))]
    )


_Run = Sequence[str] | Sequence[bytes] | bytes  # a run's values, or its one value encoded


def _encoded(run: _Run) -> bool:
    """Whether ``run`` holds values already encoded as UTF-8 (an empty run holds none)."""
    return isinstance(run, bytes) or (bool(run) and isinstance(run[0], bytes))


def _multipart(runs: Sequence[tuple[str, _Run]]) -> tuple[bytes, str]:
    """:func:`multipart_form` for runs of fields that share a name: ``(name, values)``, or
    ``(name, value)`` for one value already encoded as UTF-8 (recipient-variables: half a
    megabyte that need not wait as text for the body to be joined). The values of a run are
    all text or all UTF-8 bytes (the ``to`` of a batch the C module wrote).

    A run (a template call's thousand ``to``) is joined and encoded at once, each run on its
    own, so that one non-ASCII character in the html does not widen the whole body.
    """
    while True:
        boundary = f"digest-{secrets.token_hex(16)}"
        marker = boundary.encode("ascii")
        # In no value: each run is searched joined, one search instead of a thousand for the
        # ``to`` (a match across two values only costs another draw).
        if not any(marker in values if isinstance(values, bytes)
                   else marker in b"".join(values) if _encoded(values)  # type: ignore[arg-type]
                   else boundary in "".join(values)  # type: ignore[arg-type]
                   for _, values in runs):
            break
    parts: list[bytes] = []
    for name, run in runs:
        if not run:
            continue
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        if isinstance(run, bytes):
            joined = run
        elif _encoded(run):
            joined = f"\r\n{head}".encode("ascii").join(run)  # type: ignore[arg-type]
        else:
            joined = f"\r\n{head}".join(run).encode("utf-8")  # type: ignore[arg-type]
        parts += (
            head.encode("ascii"),  # our own field names; anything else is a bug
            joined,
            b"\r\n",
        )
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# The C string encoder behind json.dumps, non-ASCII kept as it is (like ensure_ascii=False).
_json: Callable[[str], str] = encode_basestring
# What that encoder escapes: '"', '\\' and the C0 controls. Looked for in UTF-8 bytes, where
# these bytes only ever stand for themselves (a multi-byte character's bytes are all >= 0x80).
_JSON_ESCAPED = bytes(range(0x20)) + b'"\\'


def _escaped(values: Sequence[str]) -> Sequence[str]:
    """Each of ``values`` as a JSON string's content (escaped, without the quotes).

    A column of values usually holds nothing to escape, and one C scan of it all (deleting
    those characters from its bytes) tells so at a fraction of the encoder's cost, and
    without a call per value.
    """
    raw = "".join(values).encode("utf-8", "surrogatepass")
    if len(raw.translate(None, _JSON_ESCAPED)) == len(raw):
        return values
    return [_json(value)[1:-1] for value in values]


def _cleaned(values: Sequence[str]) -> Sequence[str]:
    """:func:`clean_header_value` of each of ``values``; once for a column of one value
    repeated."""
    if values and values.count(values[0]) == len(values):
        return [clean_header_value(values[0])] * len(values)
    return list(map(clean_header_value, values))


def _neutralized(values: Sequence[str], neutralize: Callable[[str], str]) -> Sequence[str]:
    """``values`` through ``neutralize``, without a call per value when none holds a '%' (the
    usual case: every Mailgun variable starts with one)."""
    return list(map(neutralize, values)) if "%" in "".join(values) else values


def _to_field(name: str, address: str) -> str:
    """``format_address(name, address)`` for an ``address`` already normalized (normalizing
    it again would be a large part of a batch's cost)."""
    return format_mailbox(clean_header_value(name), address)


class _Envelope(Protocol):
    """What :meth:`MailgunProvider._recipients` reads of a message or a template recipient."""

    @property
    def ledger_id(self) -> int: ...
    @property
    def to_email(self) -> str: ...
    @property
    def to_name(self) -> str: ...
    @property
    def headers(self) -> Sequence[tuple[str, str]]: ...


_Columns = tuple[tuple[str, ...], list[tuple[str, ...]]]  # header names, one column of values each


def _shared_headers(headers: Sequence[Sequence[tuple[str, str]]]) -> _Columns | None:
    """The header names and one column of values per name, when every reader has the same
    names in the same order, each once, and they pass :func:`checked_headers` (the sender's
    case: checked once for the batch). None otherwise: then each reader is checked alone."""
    if len(set(map(len, headers))) != 1:
        return None
    names = tuple(name for name, _ in headers[0])
    columns = list(zip(*headers))  # one column of (name, value) pairs per position
    if len(set(names)) != len(names) or any(
        set(map(itemgetter(0), column)) != {name} for name, column in zip(names, columns)
    ):
        return None
    try:
        checked_headers(headers[0])
    except ValueError:
        return None
    return names, [tuple(map(itemgetter(1), column)) for column in columns]


def _header_columns(headers: Sequence[Sequence[tuple[str, str]]]) -> _Columns:
    """The header names of all readers, as first seen, and one column of values per name:
    "" for a reader without that header, the last value for one that gives it twice."""
    names = tuple(dict.fromkeys(name for pairs in headers for name, _ in pairs))
    rows = [tuple(map(dict(pairs).get, names, repeat(""))) for pairs in headers]
    return names, list(zip(*rows))


def _check_names(headers: Sequence[tuple[str, str]], checked: set[tuple[str, ...]]) -> None:
    """ValueError when a name in ``headers`` is bad or reserved; ``checked`` holds the lists
    of names known good."""
    names = tuple(name for name, _ in headers)
    if names not in checked:
        checked_headers(headers)
        checked.add(names)


def _var(key: str) -> str:
    return f"%recipient.{key}%"


def _join(parts: Sequence[str], slots: Sequence[str], key: Callable[[str], str]) -> str:
    out = [parts[0]]
    for slot, part in zip(slots, parts[1:]):
        out += (_var(key(slot)), part)
    return "".join(out)


_HTML_VALUES = attrgetter("html_values")
_TEXT_VALUES = attrgetter("text_values")

_Slot = tuple[str, str]  # a part ("html" or "text") and a slot's name
# What a template batch's readers make of the request: the slots with one variable for both
# parts, the runs of fields for _multipart, the ledger ids carried and the refused results.
_Built = tuple[frozenset[str], list[tuple[str, _Run]], list[int], list[SendResult]]


def _slot_columns(template: TemplateMessage, envelopes: Sequence[TemplateRecipient]) -> dict[_Slot, Sequence[str]]:
    """Each distinct slot of each part once: a column of every reader's values, neutralized."""
    columns: dict[_Slot, Sequence[str]] = {}
    for kind, slots, values, neutralize in (
        ("html", template.html_slots, _HTML_VALUES, neutralize_html),
        ("text", template.text_slots, _TEXT_VALUES, neutralize_text),
    ):
        by_index = list(zip(*map(values, envelopes))) or [()] * len(SLOT_NAMES)
        for slot in dict.fromkeys(slots):
            columns[kind, slot] = _neutralized(by_index[SLOT_NAMES.index(slot)], neutralize)
    return columns


def _shared_slots(columns: Mapping[_Slot, Sequence[str]]) -> frozenset[str]:
    """The slots whose HTML and text values agree for every reader (signed links, names with
    nothing to escape): one variable for both parts, a third less of recipient-variables, the
    largest part of the request."""
    return frozenset(slot for (kind, slot), column in columns.items()
                     if kind == "html" and ("text", slot) in columns and tuple(columns["text", slot]) == tuple(column))


def _slot_key(shared: frozenset[str], kind: str, slot: str) -> str:
    """A slot's key in recipient-variables: ``digest_<slot>`` for a slot in ``shared``."""
    return f"digest_{slot}" if slot in shared else f"digest_{kind}_{slot}"


def _slot_variables(columns: Mapping[_Slot, Sequence[str]], shared: frozenset[str]) -> dict[str, Sequence[str]]:
    """The slots' keys in recipient-variables, in order, each with its column of values."""
    return {_slot_key(shared, kind, slot): column for (kind, slot), column in columns.items()}


def _streams(opening: Iterable[str], addresses: Sequence[str], ids: Sequence[int], keys: Sequence[str],
             columns: Sequence[Sequence[str]]) -> list[Iterable[str]]:
    """Readers' entries in recipient-variables, ``"a@x.org":{"ledger_id":"1","h:X":"..."}``, as
    streams of pieces: zipped, one piece of each per reader. ``opening`` comes before each
    reader's address (its quote, and what opens the object or follows the reader before)."""
    streams: list[Iterable[str]] = [
        opening,
        _escaped(addresses),
        repeat('":{"ledger_id":"'),
        _escaped([str(ledger_id) for ledger_id in ids]),
    ]
    for key, column in zip(keys, columns):
        streams += (repeat(f'",{_json(key)}:"'), column)
    streams.append(repeat('"}'))
    return streams


_HEADER_NAMES = tuple(name for name, _steps in HEADER_STEPS)


def _batch_wide(name: str, column: Sequence[str]) -> bool:
    """Whether header ``name``, with these values (one per reader of the call), is written once
    as a plain ``h:`` field: a header of :data:`~digest.delivery.readers.BATCH_HEADERS` that
    every reader has with its one value. Anything else is substituted per reader (a literal
    ``h:`` field is the same in every copy); a value with a ``%`` never goes as a literal field,
    where Mailgun would substitute in it."""
    value = BATCH_HEADERS.get(name)
    return value is not None and "%" not in value and column.count(value) == len(column)


def _header_runs(names: Sequence[str], batch_wide: Sequence[str]) -> list[tuple[str, _Run]]:
    """The ``h:`` fields: a header in ``batch_wide`` with its value, the others each naming the
    reader's own value in recipient-variables."""
    return [(f"h:{name}", [clean_header_value(BATCH_HEADERS[name]) if name in batch_wide else _var(f"h:{name}")])
            for name in names]


# The headers of HEADER_STEPS a call of plain readers has once (see _batch_wide): their steps
# write the one value every reader gets.
_ONCE = tuple(name for name, steps in HEADER_STEPS
              if steps == (BATCH_HEADERS.get(name, "").encode(),) and _batch_wide(name, [BATCH_HEADERS.get(name, "")]))


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
            raise BlockedError(
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
        envelopes: Sequence[_Envelope],
        more: Sequence[tuple[str, Sequence[str]]] = (),
    ) -> tuple[list[tuple[str, _Run]], list[int], list[SendResult]]:
        """The ``to`` fields, the per-header ``h:`` fields and ``recipient-variables``.

        ``more`` holds further variables: ``(key, values)``, one value per envelope, already
        neutralized. Returns the fields as runs for :func:`_multipart`, the ledger ids
        included, in order, and the refused results.

        Why it looks the way it does: it runs for up to a thousand readers per call, and a
        Python call per value would cost more than all the rest. Each reader is checked in a
        loop (address, duplicates); then values are cleaned, encoded and written into the
        JSON text a whole column at a time.
        """
        shared = _shared_headers([e.headers for e in envelopes])
        # The display names too: Mailgun may substitute in the To header as well.
        names = _neutralized([e.to_name for e in envelopes], neutralize_text)
        checked: set[tuple[str, ...]] = set()
        kept: list[int] = []  # indices into envelopes
        addresses: list[str] = []
        tos: list[str] = []
        seen: set[str] = set()
        refused: list[SendResult] = []
        for index, e in enumerate(envelopes):
            try:
                address = normalize_address(e.to_email)
                to = _to_field(names[index], address)
                if shared is None:
                    _check_names(e.headers, checked)
            except ValueError as exc:
                refused.append(SendResult(e.ledger_id, "invalid", None, str(exc)))
                continue
            lowered = address.lower()
            if lowered in seen:
                # Why: recipient-variables are keyed by address; two rows for one address
                # would share one set of values (and one unsubscribe link).
                refused.append(SendResult(e.ledger_id, "failed", None, _TWICE))
                continue
            seen.add(lowered)
            kept.append(index)
            addresses.append(address)
            tos.append(to)
        everyone = len(kept) == len(envelopes)
        chosen = envelopes if everyone else [envelopes[i] for i in kept]
        ids = [e.ledger_id for e in chosen]
        # Every reader needs every key, or the raw %recipient.x% would reach them.
        header_names: tuple[str, ...] = ()
        values: list[tuple[str, ...]] = []
        if chosen and shared is None:
            header_names, values = _header_columns([e.headers for e in chosen])
        elif chosen and shared is not None:
            header_names, values = shared
            if not everyone:
                values = [tuple(column[i] for i in kept) for column in values]
        batch_wide = [name for name, column in zip(header_names, values) if _batch_wide(name, column)]
        keys = [f"h:{name}" for name in header_names if name not in batch_wide]
        columns = [_escaped(_cleaned(column)) for name, column in zip(header_names, values) if name not in batch_wide]
        for key, column in more:
            keys.append(key)
            columns.append(_escaped(column if everyone else [column[i] for i in kept]))
        # The object as one join of pieces, reader by reader, each column a stream:
        # {"a@x.org":{"ledger_id":"1","h:X":"...","digest_name":"..."},"b@y.org":{...}}
        # The first reader opens the object, each next one follows a comma.
        streams = _streams(chain(['{"'], repeat(',"')), addresses, ids, keys, columns)
        variables = "".join(chain(chain.from_iterable(zip(*streams)), ["}"])) if ids else "{}"
        # Encoded at once, each copy let go as soon as the next exists: the columns, the text
        # and its bytes are each about half a megabyte for a thousand readers.
        del streams, columns
        encoded = variables.encode("utf-8")
        del variables
        runs: list[tuple[str, _Run]] = [("to", tos), *_header_runs(header_names, batch_wide)]
        runs.append(("recipient-variables", encoded))
        return runs, ids, refused

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
        runs, ids, refused = self._recipients(messages)
        body, content_type = _multipart([(name, [value]) for name, value in fields] + runs)
        kept = set(ids)
        included = tuple(m for m in messages if m.ledger_id in kept)
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

        Static parts are neutralized, then joined with ``%recipient.digest_<slot>%`` variables
        whose values, neutralized too, sit in recipient-variables: one per slot whose HTML and
        text values agree for every reader, else ``digest_html_<slot>`` and ``digest_text_<slot>``.
        A :class:`~digest.delivery.readers.Readers` batch has its plain readers written by the
        C module (:meth:`_from_readers`): the same bytes.
        """
        fields = self._common_fields(
            template.from_addr, template.subject, template.reply_to, template.tag, template.draft_id
        )
        built = self._from_readers(template, recipients) if isinstance(recipients, Readers) else None
        shared, runs, ids, refused = built or self._from_recipients(template, recipients)
        if template.text_slots or any(template.text_parts):
            text_parts = [neutralize_text(p) for p in template.text_parts]
            fields.append(("text", _join(text_parts, template.text_slots, partial(_slot_key, shared, "text"))))
        if template.html_slots or any(template.html_parts):
            html_parts = [neutralize_html(p) for p in template.html_parts]
            fields.append(("html", _join(html_parts, template.html_slots, partial(_slot_key, shared, "html"))))
        body, content_type = _multipart([(name, [value]) for name, value in fields] + runs)
        call = PreparedCall(
            "POST",
            self.messages_url,
            {**self._auth, "Content-Type": content_type},
            body,
            (),
            tuple(refused),
        )
        return call, tuple(ids)

    def _from_recipients(self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]) -> _Built:
        """What :meth:`build_template_request` sends for ``recipients``, each written in Python."""
        width = len(SLOT_NAMES)
        envelopes: Sequence[TemplateRecipient] = recipients
        refused_early: list[SendResult] = []
        counts = {*map(len, map(_HTML_VALUES, recipients))}
        counts.update(map(len, map(_TEXT_VALUES, recipients)))
        if counts != {width}:  # some reader has the wrong number of slot values
            fitting: list[TemplateRecipient] = []
            for r in recipients:
                try:
                    slot_map(r.html_values)
                    slot_map(r.text_values)
                except ValueError as exc:
                    refused_early.append(SendResult(r.ledger_id, "invalid", None, str(exc)))
                    continue
                fitting.append(r)
            envelopes = fitting
        columns = _slot_columns(template, envelopes)
        shared = _shared_slots(columns)
        more = _slot_variables(columns, shared)
        del columns
        runs, ids, refused = self._recipients(envelopes, list(more.items()))
        return shared, runs, ids, refused_early + refused

    def _from_readers(self, template: TemplateMessage, readers: Readers) -> _Built | None:
        """:meth:`_from_recipients` for a :class:`~digest.delivery.readers.Readers` batch: the
        plain readers' ``to`` and recipient-variables entry written by the C module, from one
        program each built here; the other readers by the same Python code as there, in batch
        order (duplicate addresses are refused across both, the later one). ``None`` when the
        C module cannot write them (not built, links of another kind or that an escaping
        changes): then every reader takes the Python path.

        What the batch decides (which slots get one variable for both parts) depends only on
        the readers whose values an escaping changes: plain readers' values are the same for
        both parts and hold no ``%``, and every reader has the same headers. So it is decided
        before the C module runs, from the readers whose names hold anything but ASCII letters,
        digits, spaces, ``_`` and ``-`` (:meth:`~digest.delivery.readers.Readers.odd`), made in Python; the links are
        checked once (:meth:`~digest.delivery.readers.Readers.in_c`). Any other reader the C
        module leaves to Python is checked to change nothing either (else the batch takes the
        Python path).
        """
        rows = readers.rows
        if not rows or not readers.in_c():
            return None
        width = len(SLOT_NAMES)
        odd = readers.odd()
        if any(len(r.html_values) != width or len(r.text_values) != width
               or tuple(map(itemgetter(0), r.headers)) != _HEADER_NAMES for r in odd.values()):
            return None  # not as template_recipients makes them: the Python path sorts them out
        shared = _shared_slots(_slot_columns(template, list(odd.values())))
        # A plain reader's entry as _recipients writes it: their values need no escaping.
        entry: list[Step] = [b'"', EMAIL, b'":{"ledger_id":"', LEDGER]
        for name, steps in HEADER_STEPS:
            if name not in _ONCE:  # written once for the call
                entry += (f'",{_json("h:" + name)}:"'.encode(), *steps)
        slot_fields = {_slot_key(shared, kind, slot): SLOT_FIELDS[SLOT_NAMES.index(slot)]
                       for kind, slots in (("html", template.html_slots), ("text", template.text_slots))
                       for slot in slots}
        for key, field in slot_fields.items():
            entry += (f'",{_json(key)}:"'.encode(), field)
        entry.append(b'"}')
        filled = readers.fill((TO,), tuple(entry))
        if filled is None:
            return None
        tos, entries = filled  # for each reader; None for one left to Python
        # Each reader's key for "the same address twice" (a plain address is its own normalized
        # form); a refused reader's is its index, which no address equals.
        keys: list[object] = list(map(str.lower, map(itemgetter(2), rows)))
        refusals: dict[int, SendResult] = {}
        python: dict[int, tuple[TemplateRecipient, str]] = {}  # by index: the reader, its address
        for index in [index for index, entry in enumerate(entries) if entry is None]:
            r = odd.get(index)
            if r is None:
                r = readers.recipient(index)
                if (r.html_values != r.text_values or len(r.text_values) != width or "%" in "".join(r.text_values)
                        or tuple(map(itemgetter(0), r.headers)) != _HEADER_NAMES):
                    return None  # it would change what the batch decided
            try:
                address = normalize_address(r.to_email)
                # The display names too: Mailgun may substitute in the To header as well.
                to = _to_field(neutralize_text(r.to_name), address)
            except ValueError as exc:
                refusals[index] = SendResult(r.ledger_id, "invalid", None, str(exc))
                keys[index] = index
                continue
            keys[index] = address.lower()
            tos[index] = to.encode("utf-8")
            python[index] = (r, address)
        if len(set(keys)) < len(keys):  # an address twice: the later readers are refused
            seen: set[object] = set()
            for index, address_key in enumerate(keys):
                if address_key in seen:
                    refusals[index] = SendResult(rows[index][0], "failed", None, _TWICE)
                seen.add(address_key)
        if kept := [index for index in python if index not in refusals]:  # in batch order
            recipients = [python[index][0] for index in kept]
            header = _shared_headers([r.headers for r in recipients])
            if header is None:
                return None  # never: their header names were checked above
            if any(name in _ONCE and not _batch_wide(name, column) for name, column in zip(*header)):
                return None  # never: template_recipients gives every reader the same one
            more = _slot_variables(_slot_columns(template, recipients), shared)
            columns = [_escaped(_cleaned(column)) for name, column in zip(*header) if name not in _ONCE]
            columns += [_escaped(column) for column in more.values()]
            streams = _streams(repeat('"'), [python[index][1] for index in kept], [r.ledger_id for r in recipients],
                               [*(f"h:{name}" for name in header[0] if name not in _ONCE), *more], columns)
            for index, text in zip(kept, map("".join, zip(*streams))):
                entries[index] = text.encode("utf-8")
            del streams, columns, more
        if refusals:
            carried = [index for index in range(len(rows)) if index not in refusals]
            tos, entries = [tos[index] for index in carried], [entries[index] for index in carried]
            ids = [rows[index][0] for index in carried]
        else:
            ids = list(map(itemgetter(0), rows))
        pieces = cast(list[bytes], entries)  # every reader carried has one now
        if pieces:  # the object's braces joined to its first and last entries
            pieces[0] = b"{" + pieces[0]
            pieces[-1] += b"}"
        runs: list[tuple[str, _Run]] = [("to", cast(list[bytes], tos))]
        if ids:
            runs += _header_runs(_HEADER_NAMES, _ONCE)
        runs.append(("recipient-variables", b",".join(pieces) if pieces else b"{}"))
        return shared, runs, ids, [refusals[index] for index in sorted(refusals)]

    def send_template_batch(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> list[SendResult]:
        """One call for the whole batch; Mailgun makes each reader's copy."""
        return self.template_sender(template, recipients)()

    def template_sender(
        self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
    ) -> Callable[[], list[SendResult]]:
        """The batch's one call, built now; the returned function sends it (again, for a
        retry: the same body) and returns one result per recipient."""
        if not recipients:
            return list
        self._check_batch(recipients)
        call, ids = self.build_template_request(template, recipients)
        order = ledger_ids(recipients)
        return partial(self.send_built_template, call, ids, order, self._answer)

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
            raise BlockedError(
                "mailgun: the API answered 'Mailgun Magnificent API' instead of sending: "
                f"wrong URL {self.messages_url}",
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
            raise BlockedError(
                f"mailgun: HTTP 404: {detail or 'not found'} (domain {self.domain!r})",
                status=status,
                response_text=response_text(body),
                hint=_DOMAIN_HINT,
            )
        if status == 400:
            raise DeliveryError(
                f"mailgun: HTTP 400: {detail or 'bad request'}",
                retryable=False,
                status=status,
                response_text=response_text(body),
            )
        raise self.status_error(status, body, detail)

    def check(self) -> str:
        """``GET /v3/domains/<domain>``: proves the key, the domain and the region."""
        url = f"{self.base_url}/v3/domains/{quote(self.domain, safe='')}"
        status, headers, body = self.request("GET", url, self._auth)
        self.raise_for_common_status(
            status, {k.lower(): v for k, v in headers.items()}, body, sends_mail=False
        )
        if status == 404:
            raise DeliveryError(
                f"mailgun: domain {self.domain!r} not found at {self.base_url}", hint=_DOMAIN_HINT
            )
        if status != 200 or _MAGNIFICENT in body:
            raise self.status_error(status, body, _message(body))
        try:
            data: Any = json.loads(body)
        except ValueError:
            raise self.status_error(status, body, body_summary(body)) from None
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
        return body_summary(body)
    if isinstance(data, dict) and data.get("message"):
        return response_text(str(data["message"]))
    return ""
