"""build_mime, as_bytes and the header-safety helpers (DESIGN.md rule 5)."""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.delivery.mime import (
    as_bytes,
    build_mime,
    clean_header_value,
    custom_headers,
    format_address,
    normalize_address,
)
from digest.subscribers import canonical_email, normalize_email

NOW = datetime(2026, 11, 2, 7, 0, 0, tzinfo=UTC)
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body_of(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return [line.split(":", 1)[0] for line in head.split("\r\n") if line and not line[0].isspace()]


def test_multipart_alternative_text_then_html(make_message) -> None:
    msg = make_message(text="Plain words.\nSecond line.\n", html="<p>Rich <b>words</b>.</p>\n")
    parsed = parse(as_bytes(build_mime(msg, now=NOW)))
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    assert body_of(parts[0]) == msg.text
    assert body_of(parts[1]) == msg.html
    assert all("MIME-Version" not in p for p in parts)


def test_non_ascii_bodies_use_a_7bit_transfer_encoding(make_message) -> None:
    text = "Zoë’s essay — naïve café " + "long line " * 20 + "\n"
    html = "<p>日本語のテキスト</p>\n" * 20
    data = as_bytes(build_mime(make_message(text=text, html=html), now=NOW))
    assert data.isascii()
    parts = list(parse(data).iter_parts())
    assert [p["Content-Transfer-Encoding"] for p in parts] in (
        ["quoted-printable", "quoted-printable"],
        ["quoted-printable", "base64"],
        ["base64", "base64"],
        ["base64", "quoted-printable"],
    )
    assert body_of(parts[0]) == text
    assert body_of(parts[1]) == html


def test_required_headers(make_message) -> None:
    msg = make_message(reply_to="Editor <editor@news.example.org>")
    data = as_bytes(build_mime(msg, now=NOW))
    parsed = parse(data)
    assert parsed["From"] == "Field Notes <digest@news.example.org>"
    assert parsed["To"] == "Reader 1 <reader1@example.com>"
    assert parsed["Subject"] == msg.subject
    assert parsed["Reply-To"] == "Editor <editor@news.example.org>"
    assert parsed["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(parsed["Date"]) == NOW
    assert parsed["Date"].endswith("+0000")
    assert re.fullmatch(r"<[^<>@\s]+@news\.example\.org>", parsed["Message-ID"])
    assert header_names(data).count("Message-ID") == 1


def test_date_is_converted_to_utc(make_message) -> None:
    paris = timezone(timedelta(hours=1))
    parsed = parse(
        as_bytes(build_mime(make_message(), now=datetime(2026, 11, 2, 8, 0, tzinfo=paris)))
    )
    assert parsed["Date"] == "Mon, 02 Nov 2026 07:00:00 +0000"


def test_no_reply_to_unless_set(make_message) -> None:
    assert "Reply-To" not in parse(as_bytes(build_mime(make_message(), now=NOW)))


@pytest.mark.parametrize(
    ("given_id", "expected"),
    [
        ("<abc.123@news.example.org>", "<abc.123@news.example.org>"),
        ("abc.123@news.example.org", "<abc.123@news.example.org>"),
    ],
)
def test_message_id_from_the_message(make_message, given_id: str, expected: str) -> None:
    parsed = parse(as_bytes(build_mime(make_message(message_id=given_id), now=NOW)))
    assert parsed["Message-ID"] == expected


def test_list_unsubscribe_headers_exact(make_message) -> None:
    msg = make_message()
    data = as_bytes(build_mime(msg, now=NOW))
    assert b"\r\nList-Unsubscribe: <https://news.example.org/u/tok0001>\r\n" in data
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data
    parsed = parse(data)
    assert parsed["List-Unsubscribe"] == "<https://news.example.org/u/tok0001>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_long_list_unsubscribe_is_folded_not_encoded(make_message) -> None:
    # The email package would turn a >78-character token into RFC 2047 encoded-words, which
    # mail clients do not decode in List-Unsubscribe; we fold only at spaces.
    https = "<https://news.example.org/u/" + "A" * 180 + ">"
    value = f"{https}, <mailto:unsubscribe@news.example.org?subject=unsub-842>"
    data = as_bytes(build_mime(make_message(headers=(("List-Unsubscribe", value),)), now=NOW))
    assert (
        b"=?"
        not in data.split(b"\r\n\r\n", 1)[0]
        .split(b"List-Unsubscribe:", 1)[1]
        .split(b"\r\nMIME", 1)[0]
    )
    assert ("List-Unsubscribe: " + https + ",\r\n <mailto:").encode() in data
    assert parse(data)["List-Unsubscribe"] == value


def test_message_is_crlf_and_7bit_with_short_lines(make_message) -> None:
    msg = make_message(
        subject="Ünïcödé " * 30, to_name="Zoë " * 40, html="<p>" + "x" * 3000 + "</p>"
    )
    data = as_bytes(build_mime(msg, now=NOW))
    assert data.isascii()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_non_ascii_subject_and_name_round_trip(make_message) -> None:
    msg = make_message(subject="Wöchentliche Notizen — «café» 日本", to_name="Zoë Ñúñez, Jr.")
    data = as_bytes(build_mime(msg, now=NOW))
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"=?utf-8?" in head  # encoded, since the header block is ASCII
    parsed = parse(data)
    assert parsed["Subject"] == msg.subject
    to = parsed["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ("Zoë Ñúñez, Jr.", "reader1@example.com")


def test_display_name_with_specials_is_quoted(make_message) -> None:
    parsed = parse(as_bytes(build_mime(make_message(to_name='Smith, "Jo" <boss>'), now=NOW)))
    to = parsed["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ('Smith, "Jo" <boss>', "reader1@example.com")


def test_idn_domain_is_punycoded(make_message) -> None:
    parsed = parse(as_bytes(build_mime(make_message(to_email="zoe@bücher.example"), now=NOW)))
    assert parsed["To"].addresses[0].addr_spec == "zoe@xn--bcher-kva.example"


@pytest.mark.parametrize(("stored", "sent"), [
    ("zoe@bücher.example", "zoe@xn--bcher-kva.example"),
    # IDNA 2008, as email_validator reads the domain a subscriber is stored with: Python's IDNA
    # 2003 codec made these fass.de and xn--4xa.gr, other domains than the reader's.
    ("zoe@faß.de", "zoe@xn--fa-hia.de"),
    ("zoe@ς.gr", "zoe@xn--3xa.gr"),
])
def test_idn_domain_is_encoded_so_it_reads_back_as_the_stored_one(stored: str, sent: str) -> None:
    assert normalize_email(stored) == stored
    assert normalize_address(stored) == sent
    assert canonical_email(sent) == stored


@pytest.mark.parametrize(
    "field",
    ["subject", "to_name"],
)
@pytest.mark.parametrize(
    "attack",
    [
        "Hi\r\nBcc: victim@example.net",
        "Hi\nBcc: victim@example.net",
        "Hi\rBcc: victim@example.net",
        "Hi\r\n\r\n<html>body</html>",
        "Hi\x85Bcc: victim@example.net",
        "Hi\u2028Bcc: victim@example.net",
        "Hi\x00\x0bBcc: victim@example.net",
    ],
)
def test_header_injection_in_subject_and_name_is_stripped(
    make_message, field: str, attack: str
) -> None:
    data = as_bytes(build_mime(make_message(**{field: attack}), now=NOW))
    names = header_names(data)
    assert "Bcc" not in names
    assert len(names) == len(set(names))
    parsed = parse(data)
    assert "Bcc" not in parsed
    shown = parsed["Subject"] if field == "subject" else parsed["To"].addresses[0].display_name
    assert not CONTROL_RE.search(shown)
    assert shown.startswith("Hi ")


def test_header_injection_in_header_values_is_stripped(make_message) -> None:
    msg = make_message(
        headers=(("List-Unsubscribe", "<https://x.example/u/1>\r\nBcc: victim@example.net"),)
    )
    data = as_bytes(build_mime(msg, now=NOW))
    assert "Bcc" not in header_names(data)
    assert parse(data)["List-Unsubscribe"] == "<https://x.example/u/1> Bcc: victim@example.net"


def test_header_injection_in_addresses_is_refused_or_stripped(make_message) -> None:
    with pytest.raises(ValueError):
        build_mime(make_message(to_email="a@example.com\r\nBcc: victim@example.net"), now=NOW)
    data = as_bytes(build_mime(make_message(reply_to="r@example.org\r\n"), now=NOW))
    assert parse(data)["Reply-To"] == "r@example.org"


@pytest.mark.parametrize("name", ["X-Evil\r\nBcc", "Bad Name", "Colon:", ""])
def test_invalid_header_names_are_refused(make_message, name: str) -> None:
    with pytest.raises(ValueError, match="invalid header name"):
        build_mime(make_message(headers=((name, "v"),)), now=NOW)


@pytest.mark.parametrize("name", ["From", "to", "Message-ID", "Content-Type", "Bcc"])
def test_reserved_header_names_are_refused(make_message, name: str) -> None:
    with pytest.raises(ValueError, match="set from the message"):
        custom_headers(make_message(headers=((name, "x@example.com"),)))


@pytest.mark.parametrize(
    "bad",
    [
        "no-at-sign",
        "a@",
        "@b.example",
        "a b@example.com",
        "<a@example.com>",
        "a@b@c",
        "ü@example.com",
    ],
)
def test_bad_addresses_raise(make_message, bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_address(bad)
    with pytest.raises(ValueError):
        build_mime(make_message(to_email=bad), now=NOW)


def test_format_address() -> None:
    assert format_address("", "a@example.com") == "a@example.com"
    assert format_address("Ada", "a@example.com") == "Ada <a@example.com>"
    assert format_address("Smith, Jo", "a@example.com") == '"Smith, Jo" <a@example.com>'
    encoded = format_address("Zoë\r\n", "a@example.com")
    assert encoded.isascii() and "\r" not in encoded and "\n" not in encoded
    assert email.utils.parseaddr(
        str(email.header.make_header(email.header.decode_header(encoded)))
    ) == ("Zoë", "a@example.com")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Plain subject", "Plain subject"),
        ("  padded  ", "padded"),
        ("a\r\nb", "a b"),
        ("a \r\n b", "a b"),
        ("a\n\n\nb", "a b"),
        ("a\tb", "a b"),
        ("a\x00b\x7fc\x9fd", "a b c d"),
        ("a\x85b", "a b"),
        ("a\u2028b\u2029c", "a b c"),
        ("\r\nBcc: x@example.net", "Bcc: x@example.net"),
        ("Zoë — café 日本", "Zoë — café 日本"),
        ("", ""),
    ],
)
def test_clean_header_value(raw: str, clean: str) -> None:
    assert clean_header_value(raw) == clean


@given(st.text())
def test_clean_header_value_never_leaves_a_control_or_line_break(value: str) -> None:
    cleaned = clean_header_value(value)
    assert not CONTROL_RE.search(cleaned)
    assert len(cleaned.splitlines()) <= 1
    assert cleaned == cleaned.strip()


@settings(max_examples=300)
@given(subject=st.text(max_size=200), name=st.text(max_size=80))
def test_any_subject_and_name_keep_one_header_each(subject: str, name: str) -> None:
    from digest.types import OutgoingMessage

    msg = OutgoingMessage(
        ledger_id=1,
        draft_id=1,
        to_email="r@example.com",
        to_name=name,
        from_addr="d@example.org",
        subject=subject,
        html="<p>x</p>",
        text="x",
    )
    data = as_bytes(build_mime(msg, now=NOW))
    names = header_names(data)
    assert sorted(names) == sorted(
        ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
    )
    parsed = parse(data)
    assert parsed["Subject"] == clean_header_value(subject)
    to = parsed["To"].addresses[0]
    # A display name is a phrase: its white space may be refolded (RFC 5322); its text may not.
    assert to.addr_spec == "r@example.com"
    assert "".join(to.display_name.split()) == "".join(clean_header_value(name).split())
