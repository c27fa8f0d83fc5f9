"""Long display names that are not ASCII (a reader's, the newsletter's From and Reply-To) go out
as RFC 2047 encoded-words of at most 75 characters each (RFC 2047 section 2), never splitting a
UTF-8 character, in every path that writes "Name <address>": build_mime (SMTP, the outbox),
folded by us, and the providers' JSON and form fields (Postmark, its server templates, Resend,
SES, Mailgun), one space apart. A name of 60 Cyrillic or CJK characters went out as one
encoded-word of 168 or 252 characters, or (build_mime) as words of 76.

SendGrid takes the name in a JSON field of its own ({"email", "name"}) and encodes it itself.
build_mime's Subject, encoded the same way, is held to the same limits at the end.

How they read back: the email package's RFC 2047 decoder (email.header.decode_header, which
drops the white space between adjacent encoded-words, section 6.2) gives the exact name, and
so does policy.default for a Subject. policy.default's address headers, before CPython's fix
for gh-128110, show a space between adjacent encoded-words; the tests then hold them to exactly
that, and to the exact name on a Python with the fix.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import pytest

from digest.config import Delivery
from digest.delivery.mime import as_bytes, build_mime, encoded_words, format_address
from digest.delivery.providers.registry import build_provider
from digest.types import OutgoingMessage, TemplateRecipient
from tests.delivery.conftest import MessageFactory
from tests.delivery.test_provider_contract import SPECS, TOKEN, make_template, provider_for
from tests.delivery.test_smtp import plain
from tests.delivery.test_smtp import provider as smtp_provider
from tests.fakes.provider_server import FakeProviderServer, parse_form

NOW = datetime(2026, 11, 2, 7, 0, tzinfo=UTC)

CYRILLIC = "Александра Константиновна Преображенская-Долгорукова Иванова"
CJK = "山田太郎花子" * 10
MIXED = "Zoë Ñúñez-Ødegård, Jr. " * 4 + "Ω"
EMOJI = "🎉 Ünïcödé 🌍 " * 6 + "x"
NAMES = {"cyrillic": CYRILLIC, "cjk": CJK, "mixed": MIXED.strip(), "emoji": EMOJI}
EW_RE = re.compile(r"=\?utf-8\?([bq])\?([^?]*)\?=", re.IGNORECASE)
SEPARATED_RE = re.compile(r"\?=(\s+)=\?")

# Whether this Python's policy.default drops the white space between adjacent encoded-words in
# a display name, as RFC 2047 section 6.2 says (gh-128110).
_PARSED = email.message_from_string("To: =?utf-8?q?a?= =?utf-8?q?b?= <x@example.org>\n\n",
                                    policy=email.policy.default)
DISPLAY_NAMES_FOLLOW_6_2 = _PARSED["To"].addresses[0].display_name == "ab"


def test_names_are_long() -> None:
    assert len(CYRILLIC) == 60 and len(CJK) == 60
    for name in NAMES.values():  # one encoded-word would be far over 75 characters
        assert len(email.utils.formataddr((name, "a@example.org")).partition(" <")[0]) > 75


def decoded(value: str) -> str:
    """``value`` as the email package's RFC 2047 decoder reads it (section 6.2 applied)."""
    return str(email.header.make_header(email.header.decode_header(value)))


def word_texts(value: str) -> list[str]:
    """The text of each encoded-word in ``value``, each decoded by itself: strict UTF-8, so
    a character split between two words fails here."""
    out = []
    for word in EW_RE.finditer(value):
        ((raw, charset),) = email.header.decode_header(word.group(0))
        assert charset == "utf-8"
        assert isinstance(raw, bytes)
        out.append(raw.decode("utf-8"))
    return out


def assert_encoded(value: str, name: str, address: str, *, folded: bool) -> None:
    """``value`` (a "Name <address>" as it goes out) holds ``name`` as encoded-words of at most
    75 characters, each decoding by itself, that read back as ``name`` exactly; separated by a
    single space (a provider's field), or by a fold (a header we folded)."""
    words = [m.group(0) for m in EW_RE.finditer(value)]
    assert len(words) >= 2, value
    assert all(len(w) <= 75 for w in words), [len(w) for w in words]
    assert "".join(word_texts(value)) == name
    separators = set(SEPARATED_RE.findall(value))
    assert separators == ({"\r\n "} if folded else {" "}), separators
    assert decoded(value.replace("\r\n", "")) == f"{name} <{address}>"


# -- encoded_words and format_address ---------------------------------------------------------


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
@pytest.mark.parametrize("first", [75, 66])
def test_encoded_words_are_at_most_75_characters_and_split_no_character(name: str, first: int) -> None:
    words = encoded_words(name, first=first)
    assert len(words) >= 2
    assert len(words[0]) <= first and all(len(w) <= 75 for w in words)
    texts = word_texts(" ".join(words))
    assert len(texts) == len(words) and "".join(texts) == name
    # One encoding for the whole name, the one formataddr would take for it.
    whole = email.utils.formataddr((name, "a@example.org")).partition(" <")[0]
    assert {w[8].lower() for w in words} == {whole[8].lower()}
    assert decoded(" ".join(words)) == name


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_format_address_splits_a_long_non_ascii_name(name: str) -> None:
    value = format_address(name, "reader@example.com")
    assert value.isascii() and value.endswith(" <reader@example.com>")
    assert_encoded(value, name, "reader@example.com", folded=False)


@pytest.mark.parametrize("name", ["Ada", "Ada Lovelace", "Smith, Jo", 'Jo "Danger" Smith', "x" * 120,
                                  "Zoë", "日本", "Zoë Ñúñez, Jr.", "Ünïcödé " * 3])
def test_plain_and_short_names_are_written_as_before(name: str) -> None:
    """ASCII names (whatever their length) and non-ASCII names short enough for one
    encoded-word: what formataddr writes, byte for byte."""
    assert format_address(name, "a@example.com") == email.utils.formataddr((name.strip(), "a@example.com"))


# -- build_mime: SMTP and the outbox ----------------------------------------------------------


def _message(make_message: MessageFactory, name: str) -> OutgoingMessage:
    return make_message(to_name=name, from_addr=f'"{name}" <digest@news.example.org>',
                        reply_to=f'"{name}" <editor@news.example.org>')


def assert_headers(data: bytes, name: str, to: str = "reader1@example.com") -> None:
    """The From, To and Reply-To of a serialized message, each holding ``name``."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    lines = head.split("\r\n")
    assert all(len(line) <= 76 for line in lines if EW_RE.search(line)), [len(x) for x in lines]
    fields = dict(re.findall(r"^([\w-]+): (.*?)(?=\r\n\S|\Z)", head, re.S | re.M))
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    for header, address in (("From", "digest@news.example.org"), ("To", to),
                            ("Reply-To", "editor@news.example.org")):
        assert_encoded(fields[header], name, address, folded=True)
        (mailbox,) = parsed[header].addresses
        assert mailbox.addr_spec == address and not parsed[header].defects
        words = word_texts(fields[header])
        assert mailbox.display_name == (name if DISPLAY_NAMES_FOLLOW_6_2 else " ".join(words))


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_build_mime_folds_a_long_non_ascii_name_into_short_encoded_words(make_message: MessageFactory,
                                                                         name: str) -> None:
    assert_headers(as_bytes(build_mime(_message(make_message, name), now=NOW)), name)


def test_build_mime_writes_ascii_names_as_before(make_message: MessageFactory) -> None:
    name = "Reader with a rather long plain ASCII name that goes on and on, and on"
    msg = make_message(to_name=name, from_addr="Field Notes <digest@news.example.org>")
    head = as_bytes(build_mime(msg, now=NOW)).split(b"\r\n\r\n", 1)[0]
    assert b"From: Field Notes <digest@news.example.org>\r\n" in head
    assert b'To: "Reader with a rather long plain ASCII name that goes on and on, and on"\r\n' \
           b" <reader1@example.com>\r\n" in head
    assert b"=?" not in head


def test_outbox_writes_short_encoded_words(tmp_path: Path, make_message: MessageFactory) -> None:
    with build_provider(Delivery(provider="outbox", outbox_dir=str(tmp_path))) as provider:
        (result,) = provider.send_batch([_message(make_message, CYRILLIC)])
    assert result.status == "sent"
    (path,) = tmp_path.rglob("*.eml")
    assert_headers(path.read_bytes(), CYRILLIC)


def test_smtp_sends_short_encoded_words(servers: list[Any], make_message: MessageFactory) -> None:
    server = plain(servers)
    (result,) = smtp_provider(server).send_batch([_message(make_message, CJK)])
    assert result.status == "sent"
    (received,) = server.handler.received
    assert_headers(received.data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), CJK)


# -- the providers' own fields ----------------------------------------------------------------


def _recipient(name: str) -> TemplateRecipient:
    values = (name, "https://news.example.org/u/tok1", "https://news.example.org/preferences/tok1")
    return TemplateRecipient(1, "reader1@example.com", name, tuple(escape(v) for v in values), values,
                             (("List-Unsubscribe", "<https://news.example.org/u/tok1>"),
                              ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")))


Fields = Callable[[FakeProviderServer], dict[str, str]]


def _first(value: Any) -> str:
    return str(value[0] if isinstance(value, list) else value)


FIELDS: dict[str, Fields] = {
    "postmark": lambda srv: {k: srv.messages[0][k] for k in ("From", "To", "ReplyTo")},
    "resend": lambda srv: {k: _first(srv.messages[0][k]) for k in ("from", "to", "reply_to")},
    "ses": lambda srv: {k: _first(srv.messages[0][k]) for k in ("from", "to", "reply_to")},
    "mailgun": lambda srv: {k: v for k, v in parse_form(srv.requests[-1]) if k in ("from", "to", "h:Reply-To")},
}


@pytest.fixture
def long_name_server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=TOKEN) as srv:
        for spec in SPECS.values():
            spec.install(srv)
        yield srv


def _assert_fields(fields: dict[str, str], name: str) -> None:
    assert len(fields) == 3, fields
    for key, value in fields.items():
        address = {"f": "digest@news.example.org", "t": "reader1@example.com"}.get(key[0].lower(),
                                                                                 "editor@news.example.org")
        assert_encoded(value, name, address, folded=False)


@pytest.mark.parametrize("provider_name", sorted(FIELDS))
@pytest.mark.parametrize("name", [CYRILLIC, CJK], ids=["cyrillic", "cjk"])
def test_each_provider_gets_short_encoded_words(long_name_server: FakeProviderServer, make_message: MessageFactory,
                                                provider_name: str, name: str) -> None:
    with provider_for(provider_name, long_name_server) as provider:
        (result,) = provider.send_batch([_message(make_message, name)])
    assert result.status == "sent", result
    _assert_fields(FIELDS[provider_name](long_name_server), name)


@pytest.mark.parametrize("name", [CYRILLIC, CJK], ids=["cyrillic", "cjk"])
def test_mailgun_templates_get_short_encoded_words(long_name_server: FakeProviderServer, name: str) -> None:
    template = replace(make_template(), from_addr=f'"{name}" <digest@news.example.org>',
                       reply_to=f'"{name}" <editor@news.example.org>')
    with provider_for("mailgun", long_name_server) as provider:
        (result,) = provider.send_template_batch(template, [_recipient(name)])
    assert result.status == "sent", result
    _assert_fields(FIELDS["mailgun"](long_name_server), name)


@pytest.mark.parametrize("name", [CYRILLIC, CJK], ids=["cyrillic", "cjk"])
def test_postmark_server_templates_get_short_encoded_words(long_name_server: FakeProviderServer,
                                                           name: str) -> None:
    template = replace(make_template(), from_addr=f'"{name}" <digest@news.example.org>',
                       reply_to=f'"{name}" <editor@news.example.org>')
    settings = Delivery(provider="postmark", api_key=TOKEN, base_url=long_name_server.url, timeout=5,
                        postmark_templates=True)
    with build_provider(settings) as provider:
        (result,) = provider.send_template_batch(template, [_recipient(name)])
    assert result.status == "sent", result
    _assert_fields(FIELDS["postmark"](long_name_server), name)


# -- the Subject, which build_mime encodes the same way ----------------------------------------


@pytest.mark.parametrize("subject", [CYRILLIC, CJK, MIXED.strip(), EMOJI, "Wöchentliche Notizen — «café» 日本 " * 3],
                         ids=["cyrillic", "cjk", "mixed", "emoji", "german"])
def test_a_long_non_ascii_subject_is_short_encoded_words(make_message: MessageFactory, subject: str) -> None:
    """email.header.Header wrote it as words of up to 76 characters, on lines of 77."""
    data = as_bytes(build_mime(make_message(subject=subject), now=NOW))
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    (value,) = re.findall(r"^Subject: (.*?)(?=\r\n\S)", head, re.S | re.M)
    lines = f"Subject: {value}".split("\r\n")
    assert len(lines) >= 2 and all(len(line) <= 76 for line in lines), [len(line) for line in lines]
    words = [m.group(0) for m in EW_RE.finditer(value)]
    assert all(len(w) <= 75 for w in words) and "".join(word_texts(value)) == subject.strip()
    assert set(SEPARATED_RE.findall(value)) == {"\r\n "}
    assert email.message_from_bytes(data, policy=email.policy.default)["Subject"] == subject.strip()
