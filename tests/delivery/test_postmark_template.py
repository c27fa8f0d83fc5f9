"""PostmarkProvider's template path: the body it splices, and send_template_batch over HTTP.

The template path is an optimisation of the full-body path only: the same bytes on the wire,
the same results. These tests pin both, and the shortcuts the splicing takes for short values.
"""

from __future__ import annotations

import email.header
import email.utils
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from digest.config import Delivery
from digest.delivery.mime import clean_header_value, format_address, normalize_address
from digest.delivery.providers.base import UncertainDeliveryError, expand_template, json_escape
from digest.delivery.providers.postmark import PostmarkProvider
from digest.errors import AuthError, DeliveryError
from digest.types import TemplateMessage, TemplateRecipient
from tests.delivery.conftest import TOKEN
from tests.delivery.test_provider_contract import make_recipient, make_template
from tests.fakes.provider_server import FakeProviderServer

TRICKY = [
    "",
    "plain",
    "https://news.example.org/u/41.RB_YEu5jU_QKC2wja-dNZQ",
    'quote " and backslash \\',
    "newline\nreturn\rtab\t",
    "controls \x00\x01\x0b\x1f and DEL \x7f and NEL \x85",
    "unicode é — 日本 😀 \u2028 \u2029",
    "lone \ud800 surrogate",
]


def _reference_escape(value: str) -> bytes:
    """What JSON itself writes inside the quotes (lone surrogates as "?", as json_escape does)."""
    return json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8", "replace")


@pytest.mark.parametrize("value", TRICKY)
def test_json_escape_equals_the_json_encoder(value: str) -> None:
    assert json_escape(value) == _reference_escape(value)


@given(st.text())
def test_json_escape_equals_the_json_encoder_for_any_text(value: str) -> None:
    assert json_escape(value) == _reference_escape(value)


NAMES = ["", "Reader 41", "  Ada  ", "Smith, Jo", "J. R. Bob", 'Say "hi"', "back\\slash",
         "Zoë", "日本", "=?utf-8?q?x?=", "Eve\r\nBcc: x@y.example", "tab\there", "(comment)"]
ADDRESSES = ["reader41@example.com", " Reader41@Example.COM ", "a@bücher.example", "broken",
             "two@at@example.com", "sp ace@example.com", "é@example.com"]


def _reference_address(name: str, address: str) -> str:
    """The email package's own formatting of a cleaned name and a normalized address."""
    return email.utils.formataddr((clean_header_value(name), normalize_address(address)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("address", ADDRESSES)
def test_format_address_equals_the_email_package(name: str, address: str) -> None:
    try:
        expected = _reference_address(name, address)
    except ValueError as exc:
        with pytest.raises(ValueError) as info:
            format_address(name, address)
        assert str(info.value) == str(exc)
    else:
        assert format_address(name, address) == expected


@given(st.text(max_size=40))
def test_format_address_equals_the_email_package_for_any_name(name: str) -> None:
    expected = _reference_address(name, "reader@example.com")
    got = format_address(name, "reader@example.com")
    if clean_header_value(name).isascii() or len(expected.rpartition(" <")[0]) <= 75:
        assert got == expected
    else:  # the package's one encoded-word is longer than RFC 2047 allows: several (test_long_names.py)
        assert all(len(word) <= 75 for word in got.rpartition(" <")[0].split(" "))
        assert _decoded(got) == _decoded(expected)


def _decoded(value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(value)))


def _recipient(i: int, name: str) -> TemplateRecipient:
    url = f"https://x.org/u/{i}"
    return TemplateRecipient(i, f"r{i}@example.com", name, (name, url, url), (name, url, url),
                             (("List-Unsubscribe", f"<{url}>"),
                              ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
                              ("X-Digest-Ledger-Id", str(i))))


def test_template_body_is_the_full_body_batch_byte_for_byte() -> None:
    template = TemplateMessage(
        draft_id=7, from_addr="Field Notes <d@example.org>", subject='Ünïcode "digest"\r\nBcc: x',
        html_parts=("<p>Hi ", ', <a href="', '">unsubscribe</a> \u2014 é</p>', "\n"),
        html_slots=("name", "unsubscribe_url", "preferences_url"),
        text_parts=("Hi ", "\nUnsubscribe: ", "\n"), text_slots=("name", "unsubscribe_url"),
        reply_to="Reply <r@example.org>", tag="digest-7")
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="t"))
    recipients = [_recipient(i, name) for i, name in
                  enumerate(["Ann", 'Bo &amp; "Cy"', "李", "Smith, Jo", "tab\tname", ""], 1)]
    for headers in (True, False):
        batch = recipients if headers else [r._replace(headers=()) for r in recipients]
        call = provider.build_template_request(template, batch)
        full = provider.build_request([expand_template(template, r) for r in batch])
        assert call.body == full.body
        assert [m.ledger_id for m in call.messages] == [r.ledger_id for r in batch]


def test_refused_recipients_are_left_out_of_the_body() -> None:
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="t"))
    template = make_template()
    short = make_recipient(2)._replace(html_values=("x",))
    batch = [make_recipient(1), short, make_recipient(3, email="broken"), make_recipient(4)]
    call = provider.build_template_request(template, batch)
    assert [r.ledger_id for r in call.refused] == [2, 3]
    assert {r.status for r in call.refused} == {"invalid"}
    items = json.loads(call.body)
    assert [i["Metadata"]["ledger_id"] for i in items] == ["1", "4"]
    assert call.body == provider.build_request(
        [expand_template(template, r) for r in (batch[0], batch[3])]).body


def _provider(server: FakeProviderServer) -> PostmarkProvider:
    return PostmarkProvider(
        Delivery(provider="postmark", api_key=TOKEN, base_url=server.url, timeout=5))


def test_send_template_batch_over_http(fake_provider: FakeProviderServer) -> None:
    fake_provider.inactive = {"Reader3@Example.com"}
    template = make_template()
    batch = [make_recipient(1), make_recipient(2, email="broken"), make_recipient(3),
             make_recipient(4, name="Smith, Jo")]
    results = _provider(fake_provider).send_template_batch(template, batch)
    assert [(r.ledger_id, r.status) for r in results] == [
        (1, "sent"), (2, "invalid"), (3, "suppressed"), (4, "sent")]
    assert all(r.provider_message_id for r in results if r.status == "sent")
    assert len(fake_provider.requests) == 1
    assert fake_provider.ledger_ids == [1, 4]
    by_ledger = {m["Metadata"]["ledger_id"]: m for m in fake_provider.messages}
    for r in (batch[0], batch[3]):
        expected = expand_template(template, r)
        got = by_ledger[str(r.ledger_id)]
        assert (got["HtmlBody"], got["TextBody"]) == (expected.html, expected.text)
        assert got["To"] == format_address(r.to_name, r.to_email)


def test_send_template_batch_whole_call_failures(fake_provider: FakeProviderServer) -> None:
    provider = _provider(fake_provider)
    template, batch = make_template(), [make_recipient(1)]
    fake_provider.faults.append(("status", 401))
    with pytest.raises(AuthError):
        provider.send_template_batch(template, batch)
    fake_provider.faults.append(("status", 422, {}, {"ErrorCode": 300, "Message": "Invalid"}))
    with pytest.raises(DeliveryError) as info:
        provider.send_template_batch(template, batch)
    assert not info.value.retryable
    fake_provider.faults.append(("status", 429, {"Retry-After": "3"}))
    with pytest.raises(DeliveryError) as info:
        provider.send_template_batch(template, batch)
    assert info.value.retryable and info.value.retry_after == 3
    fake_provider.faults.append(("garbage",))
    with pytest.raises(UncertainDeliveryError):
        provider.send_template_batch(template, batch)
    fake_provider.faults.append(("partial", {0: (406, "inactive")}))
    (result,) = provider.send_template_batch(template, batch)
    assert result.status == "suppressed"


def test_send_template_batch_sends_nothing_it_need_not(fake_provider: FakeProviderServer) -> None:
    class Small(PostmarkProvider):
        max_request_bytes = 1000

    template = make_template()
    small = Small(Delivery(provider="postmark", api_key=TOKEN, base_url=fake_provider.url))
    with pytest.raises(DeliveryError, match="over the provider's 1000-byte limit") as info:
        small.send_template_batch(template, [make_recipient(i) for i in range(1, 4)])
    assert not info.value.retryable
    provider = _provider(fake_provider)
    assert provider.send_template_batch(template, []) == []
    refused = provider.send_template_batch(template, [make_recipient(1, email="broken")])
    assert [r.status for r in refused] == ["invalid"]
    with pytest.raises(ValueError, match="the limit is 500"):
        provider.send_template_batch(template, [make_recipient(i) for i in range(501)])
    assert fake_provider.requests == []


def test_body_parts_send_the_joined_bytes_in_slices_and_again() -> None:
    """A body kept as pieces: its length, its bytes, slices of about SLICE bytes, and a second
    iteration (a retried call) giving the very same bytes."""
    from digest.http import BodyParts

    pieces = [bytes([65 + i % 26]) * (1000 + 7919 * i % 90_000) for i in range(200)]
    body = BodyParts(pieces)
    joined = b"".join(pieces)
    assert len(body) == len(joined) and bytes(body) == joined
    slices = list(body)
    assert b"".join(slices) == joined and b"".join(body) == joined
    assert all(len(s) >= BodyParts.SLICE for s in slices[:-1])
    assert all(len(s) < BodyParts.SLICE + 90_000 for s in slices)
    assert len(slices) > 1
