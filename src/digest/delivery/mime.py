"""Standards-correct MIME messages for an :class:`~digest.types.OutgoingMessage`.

:func:`build_mime` makes a ``multipart/alternative`` message (text/plain, then text/html, both
UTF-8) with From, To, Subject, Date, Message-ID, optional Reply-To, MIME-Version and the
message's own headers (List-Unsubscribe, List-Unsubscribe-Post ...). :func:`as_bytes`
serializes it with CRLF line endings, 7-bit clean, ready for SMTP or an ``.eml`` file.

Rule 5 of DESIGN.md lives here too: :func:`clean_header_value` removes CR, LF and every other
control character from anything that goes into a header, so a subject, a display name or a
header value can never start a new header. Providers that build headers themselves (Postmark's
JSON ``Headers`` array) use the same helpers.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime
from email import base64mime, quoprimime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from typing import Any

import idna

from digest import clock
from digest.types import OutgoingMessage

# C0 controls (CR, LF, TAB, NUL ...), DEL, C1 controls (including NEL, U+0085) and the Unicode
# line and paragraph separators: everything that str.splitlines() or a mail parser could treat
# as a line break, plus the rest of the controls, which have no business in a header either.
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_CONTROL_RUN_RE = re.compile(f"[ ]*[{_CONTROLS}][{_CONTROLS} ]*")
# RFC 5322 field names: printable ASCII except the colon.
_HEADER_NAME_RE = re.compile(r"[!-9;-~]+\Z")
_ADDRESS_FORBIDDEN = frozenset(' <>()[],;:"\\')

#: Header names build_mime and the providers set themselves; ``OutgoingMessage.headers`` may not
#: carry them (a second From or Content-Type would make the message ambiguous).
RESERVED_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "return-path",
    }
)

_FOLD_AT = 78  # RFC 5322: lines SHOULD be at most 78 characters (and MUST be at most 998)


def clean_header_value(value: str) -> str:
    """``value`` made safe for a header: every run of control characters becomes one space.

    CR and LF are the header-injection risk; TAB, NUL, DEL, the C1 controls and U+2028/U+2029
    go too. Leading and trailing spaces are stripped. Printable text is returned unchanged.
    """
    if value.isprintable():  # the common case; every control character is non-printable
        return value.strip()
    return _CONTROL_RUN_RE.sub(" ", value).strip()


# RFC 2047 section 2: an encoded-word is at most 75 characters long, and a header line that
# holds one at most 76.
_WORD_MAX = 75
_WORD_LINE = 76
_WORD_CHROME = len("=?utf-8?q??=")


def encoded_words(text: str, first: int = _WORD_MAX) -> list[str]:
    """``text`` (not ASCII) as RFC 2047 encoded-words in UTF-8, each at most 75 characters (the
    first at most ``first``), every character (spaces too) inside a word, none split between
    two: read in a row, whatever white space separates them, they give ``text`` back (RFC 2047
    section 6.2).

    One word when it fits: exactly what ``email.utils.formataddr`` writes for a display name
    (``Charset("utf-8").header_encode``, "Q" or base64, whichever is shorter). A longer text
    takes that same encoding for every word, and is cut after a space where one fits, so that
    a reader which (against section 6.2) shows the white space between words shows it
    between the name's own words.
    """
    data = text.encode("utf-8")
    q_length, b_length = quoprimime.header_length(data), base64mime.header_length(data)
    q = q_length <= b_length  # as Charset's SHORTEST chooses
    encode = quoprimime.header_encode if q else base64mime.header_encode
    if _WORD_CHROME + min(q_length, b_length) <= first:
        return [encode(data, "utf-8")]
    words: list[str] = []
    room = first - _WORD_CHROME
    start, n = 0, len(text)
    while start < n:
        end, size, q_size, after_space = start, 0, 0, 0
        while end < n:
            octets = text[end].encode("utf-8")
            # "Q": each octet's own length, added up; base64: 4 characters per 3 octets begun.
            grown = q_size + quoprimime.header_length(octets) if q else 4 * -(-(size + len(octets)) // 3)
            if grown > room and end > start:
                break
            size, q_size, end = size + len(octets), grown, end + 1
            if text[end - 1] == " ":
                after_space = end
        if end < n and after_space > start:
            end = after_space  # the word ends with the name's own space
        words.append(encode(text[start:end].encode("utf-8"), "utf-8"))
        start, room = end, _WORD_MAX - _WORD_CHROME
    return words


def _encoded_words(name: str, value: str) -> str:
    """Non-ASCII header text as folded RFC 2047 encoded words, every character (spaces too)
    inside a word (:func:`encoded_words`), one word to a line, no line over 76 characters.
    Why not the email package's own folding: it can break a line at a space between two
    encoded words, and readers drop whitespace between encoded words (RFC 2047), so "¡ Hola"
    could arrive as "¡Hola". Nor ``email.header.Header``'s: its words reach 76 characters, one
    more than RFC 2047 allows."""
    return "\n ".join(encoded_words(value, first=min(_WORD_MAX, _WORD_LINE - len(name) - 2)))


def _folded_name(header: str, name: str, address: str) -> _Verbatim:
    """A non-ASCII display name and its address as a header value, folded by us: encoded-words
    (:func:`encoded_words`) one to a line, each line holding one at most 76 characters (the
    first with the header's name), and ``<address>`` on the last line where it fits."""
    words = encoded_words(name, first=min(_WORD_MAX, _WORD_LINE - len(header) - 2))
    last = len(words[-1]) + (len(header) + 2 if len(words) == 1 else 1)
    sep = " " if last + 2 + len(address) + 1 <= _WORD_LINE else "\n "
    return _Verbatim("\n ".join(words) + f"{sep}<{address}>")


def normalize_address(address: str) -> str:
    """A bare ``local@domain`` address, cleaned, with a non-ASCII domain IDNA-encoded.

    Raises :class:`ValueError` for anything that is not one plain address: no ``@``, spaces,
    angle brackets, commas, quotes, or a non-ASCII local part (that needs SMTPUTF8, which
    ``digest`` does not use). Subscriber addresses were validated on the way in; this is the
    last line of defence before a header.
    """
    cleaned = clean_header_value(address)
    local, at, domain = cleaned.rpartition("@")
    if (
        not at
        or not local
        or not domain
        or not _ADDRESS_FORBIDDEN.isdisjoint(cleaned)
        or "@" in local
    ):
        raise ValueError(f"not a single email address: {address!r}")
    if not local.isascii():
        raise ValueError(
            f"non-ASCII local part needs SMTPUTF8, which is not supported: {address!r}"
        )
    if not domain.isascii():
        # IDNA 2008 with UTS 46 (non-transitional), as email_validator checks a subscriber's
        # domain on the way in: the domain a provider reports back then reads as the stored one
        # (digest.subscribers.canonical_email). Python's own "idna" codec is IDNA 2003, which
        # turns faß.de into fass.de: another domain, and a bounce that names no subscriber.
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except UnicodeError as exc:  # idna.IDNAError is one
            raise ValueError(f"domain cannot be IDNA-encoded: {address!r}") from exc
    return f"{local}@{domain}"


def parse_mailbox(value: str) -> tuple[str, str]:
    """Split ``"Name <addr>"`` (or a bare address) into a cleaned name and a normalized address."""
    name, addr = email.utils.parseaddr(clean_header_value(value))
    if not addr:
        raise ValueError(f"not an email address: {value!r}")
    return clean_header_value(name), normalize_address(addr)


def format_address(name: str, address: str) -> str:
    """``Name <local@domain>`` for a header or a provider's JSON ``To``/``From`` field.

    The name is cleaned, quoted when it holds specials (``"Smith, Jo"``) and RFC 2047-encoded
    when it is not ASCII, so the result is always one ASCII line.
    """
    return format_mailbox(clean_header_value(name), normalize_address(address))


# RFC 5322 specials: a display name holding any of them is quoted.
_NAME_SPECIALS = frozenset('()<>[]:;@\\,."')


def format_mailbox(clean_name: str, address: str) -> str:
    """:func:`format_address` for a name already cleaned and an address already normalized.

    Most readers' names are plain ASCII words, written as they are: that case skips the
    ``email`` package's formatter, which costs three times as much and runs once per reader.
    A name that is not ASCII is RFC 2047 encoded-words (:func:`encoded_words`), separated by a
    single space: one, as ``formataddr`` writes it, unless that would be longer than the 75
    characters an encoded-word may have (a long Cyrillic or CJK name), where ``formataddr``
    wrote one word all the same. (A value for a provider's JSON field: the provider folds it.)
    """
    if not clean_name:
        return address
    if clean_name.isascii():
        if _NAME_SPECIALS.isdisjoint(clean_name):
            return f"{clean_name} <{address}>"
        return email.utils.formataddr((clean_name, address))
    return " ".join(encoded_words(clean_name)) + f" <{address}>"


def custom_headers(msg: OutgoingMessage) -> list[tuple[str, str]]:
    """``msg.headers`` with names checked and values cleaned.

    Raises :class:`ValueError` for a malformed name or a reserved one (see
    :data:`RESERVED_HEADERS`): both are bugs in whoever built the message, not bad input.
    """
    out: list[tuple[str, str]] = []
    for name, value in msg.headers:
        if not _HEADER_NAME_RE.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set from the message's own fields")
        out.append((name, clean_header_value(value)))
    return out


class _Verbatim(str):
    """A header value to write exactly as given (already cleaned, ASCII, folded by us)."""


class _DigestPolicy(EmailPolicy):
    """``email.policy.SMTP``, 7-bit clean, that leaves :class:`_Verbatim` header values alone.

    Why: the email package folds an unstructured header whose single token is longer than 78
    characters by turning it into RFC 2047 encoded-words, so a long List-Unsubscribe URL came
    out as ``=?utf-8?q?=3Chttps=3A//...?=``, which mail clients do not decode in that header and
    one-click unsubscribe then breaks. We fold such values ourselves, only at spaces.
    """

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if isinstance(value, _Verbatim):
            return (name, str(value))
        return super().header_store_parse(name, value)


# cte_type="7bit": bodies become 7bit, quoted-printable or base64 (never raw 8bit), so the
# message passes through any SMTP server. refold_source="none": a stored raw string (only our
# _Verbatim values, since we never parse messages here) is written as is.
POLICY = _DigestPolicy(linesep="\r\n", cte_type="7bit", refold_source="none")


def _fold_at_spaces(name: str, value: str, limit: int = _FOLD_AT) -> str:
    """Break ``value`` at spaces so header lines stay under ``limit`` where a break exists."""
    if len(name) + 2 + len(value) <= limit or " " not in value:
        return value
    lines: list[str] = []
    current = ""
    width = len(name) + 2
    for word in value.split(" "):
        if current and width + len(current) + 1 + len(word) > limit:
            lines.append(current)
            current, width = word, 1  # continuation lines start with the space we broke at
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    # "\n " is a fold: the generator writes it as CRLF + space, and unfolding restores the space.
    return "\n ".join(lines)


def _verbatim(name: str, value: str) -> str | _Verbatim:
    """Write an ASCII value verbatim (folded at spaces); leave non-ASCII to RFC 2047."""
    if value.isascii():
        return _Verbatim(_fold_at_spaces(name, value))
    return value


def _message_id(msg: OutgoingMessage, from_addr: str) -> str:
    if msg.message_id:
        value = clean_header_value(msg.message_id)
        if not value.startswith("<"):
            value = f"<{value}>"
        if not value.isascii() or " " in value or not value.endswith(">"):
            raise ValueError(f"invalid Message-ID {msg.message_id!r}")
        return value
    return email.utils.make_msgid(domain=from_addr.rpartition("@")[2])


def _mailbox_header(header: str, name: str, address: str) -> Address | _Verbatim:
    """A From, To or Reply-To value. An ASCII name goes to the email package, as it always did
    (a display name is a phrase: its white space may be refolded, RFC 5322, which is fine). A
    name that is not ASCII is written by us (:func:`_folded_name`): the package wrote a long
    one as encoded-words of 76 characters, one more than RFC 2047 allows."""
    if name.isascii():
        return Address(display_name=name, addr_spec=address)
    return _folded_name(header, name, address)


def build_mime(msg: OutgoingMessage, *, now: datetime | None = None) -> EmailMessage:
    """The message as a ``multipart/alternative`` :class:`EmailMessage` (text part first).

    ``now`` sets the Date header (UTC); it defaults to :func:`digest.clock.now`. The Message-ID
    is ``msg.message_id`` when set, else a fresh one at the From domain. Raises
    :class:`ValueError` when an address cannot be put in a header (see :func:`normalize_address`).
    """
    from_name, from_addr = parse_mailbox(msg.from_addr)
    to_addr = normalize_address(msg.to_email)
    when = (now or clock.now()).astimezone(UTC)

    out = EmailMessage(policy=POLICY)
    out["From"] = _mailbox_header("From", from_name, from_addr)
    out["To"] = _mailbox_header("To", clean_header_value(msg.to_name), to_addr)
    subject = clean_header_value(msg.subject)
    out["Subject"] = subject if subject.isascii() else _Verbatim(_encoded_words("Subject", subject))
    out["Date"] = email.utils.format_datetime(when)
    out["Message-ID"] = _Verbatim(_message_id(msg, from_addr))
    if msg.reply_to:
        reply_name, reply_addr = parse_mailbox(msg.reply_to)
        out["Reply-To"] = _mailbox_header("Reply-To", reply_name, reply_addr)
    for name, value in custom_headers(msg):
        out[name] = _verbatim(name, value)
    out["MIME-Version"] = "1.0"
    out.set_content(msg.text, subtype="plain", charset="utf-8")
    out.add_alternative(msg.html, subtype="html", charset="utf-8")
    # add_alternative leaves a MIME-Version header on the parts; it belongs only at the top.
    for part in out.iter_parts():
        del part["MIME-Version"]
    return out


def as_bytes(message: EmailMessage) -> bytes:
    """The message serialized for SMTP or an ``.eml`` file: CRLF line endings, 7-bit clean."""
    return message.as_bytes(policy=POLICY)
