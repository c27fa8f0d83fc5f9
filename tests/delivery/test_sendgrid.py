"""SendGridProvider: the request it builds, the answers it reads, and the fake server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import responses

from digest import clock
from digest.config import Delivery
from digest.delivery.providers.base import PartialBatchError, expand_template
from digest.delivery.providers.sendgrid import SendGridProvider
from digest.delivery.readers import BATCH_HEADERS, list_headers
from digest.errors import AuthError, ConfigError, DeliveryError
from digest.types import OutgoingMessage, TemplateRecipient
from tests.delivery.conftest import MessageFactory
from tests.delivery.test_provider_contract import make_recipient, make_template
from tests.fakes.provider_server import FakeProviderServer, install_sendgrid

DATA = Path(__file__).resolve().parents[1] / "data" / "sendgrid"
KEY = "SG.test-key"


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.fixture
def provider() -> SendGridProvider:
    return SendGridProvider(Delivery(provider="sendgrid", api_key=KEY, base_url="https://sg.test"))


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=KEY) as server:
        install_sendgrid(server)
        yield server


def live(srv: FakeProviderServer, **settings: object) -> SendGridProvider:
    return SendGridProvider(
        Delivery(provider="sendgrid", api_key=KEY, base_url=srv.url, timeout=5, **settings)  # type: ignore[arg-type]
    )


# -- building -----------------------------------------------------------------------------


def test_needs_a_key() -> None:
    with pytest.raises(ConfigError):
        SendGridProvider(Delivery(provider="outbox"))


def test_full_body_request_shape(provider: SendGridProvider, make_message: MessageFactory) -> None:
    msg = make_message(5, reply_to="Editors <editors@news.example.org>", tag="digest-7")
    call = provider.build_request([msg])
    assert (call.method, call.url) == ("POST", "https://sg.test/v3/mail/send")
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    data = json.loads(call.body)
    assert data["from"] == {"email": "digest@news.example.org", "name": "Field Notes"}
    assert data["reply_to"] == {"email": "editors@news.example.org", "name": "Editors"}
    assert data["subject"] == msg.subject
    assert data["content"] == [
        {"type": "text/plain", "value": msg.text},  # text/plain must come first
        {"type": "text/html", "value": msg.html},
    ]
    assert data["categories"] == ["digest-7"]
    assert data["tracking_settings"] == {"subscription_tracking": {"enable": False}}
    # The same for every reader: once for the call, in the message-level headers.
    assert data["headers"] == {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    (p,) = data["personalizations"]
    assert p["to"] == [{"email": "reader5@example.com", "name": "Reader 5"}]
    assert p["headers"] == {"List-Unsubscribe": "<https://news.example.org/u/tok0005>"}
    assert p["custom_args"] == {"ledger_id": "5", "draft_id": "7"}  # strings, as SendGrid wants


def test_names_with_commas_are_quoted_in_personalizations(
    provider: SendGridProvider, make_message: MessageFactory
) -> None:
    call = provider.build_request([make_message(1, to_name="Smith, Jo; Jr")])
    (p,) = json.loads(call.body)["personalizations"]
    assert p["to"][0]["name"] == '"Smith, Jo; Jr"'


def test_header_injection_is_cleaned(
    provider: SendGridProvider, make_message: MessageFactory
) -> None:
    msg = make_message(1, subject="Hi\r\nBcc: victim@example.com", headers=(("X-Note", "a\r\nb"),))
    data = json.loads(provider.build_request([msg]).body)
    assert data["subject"] == "Hi Bcc: victim@example.com"
    assert data["personalizations"][0]["headers"] == {"X-Note": "a b"}
    assert "headers" not in data  # no List-Unsubscribe-Post here: nothing for the whole call


def _list_headers(ledger_id: int, one_click: str | None = "List-Unsubscribe=One-Click"
                  ) -> tuple[tuple[str, str], ...]:
    """Reader ``ledger_id``'s headers as the sender gives them (readers.list_headers), with
    List-Unsubscribe-Post's value ``one_click`` (None: without it)."""
    headers = list_headers(ledger_id, f"https://news.example.org/u/tok{ledger_id:04d}")
    return tuple((n, one_click if n == "List-Unsubscribe-Post" else v) for n, v in headers
                 if one_click is not None or n != "List-Unsubscribe-Post")


def _message(make_message: MessageFactory, ledger_id: int, one_click: str | None = "List-Unsubscribe=One-Click"
             ) -> OutgoingMessage:
    return make_message(ledger_id, html="<p>same</p>", text="same", headers=_list_headers(ledger_id, one_click))


def _recipient(ledger_id: int, one_click: str | None = "List-Unsubscribe=One-Click") -> TemplateRecipient:
    return make_recipient(ledger_id)._replace(headers=_list_headers(ledger_id, one_click))


@pytest.mark.parametrize("build", ["full bodies", "template"])
def test_one_click_is_once_for_the_call(provider: SendGridProvider, make_message: MessageFactory,
                                        srv: FakeProviderServer, build: str) -> None:
    """List-Unsubscribe-Post is the same for every reader: once, in the message-level headers,
    which apply to every personalization; each reader keeps their own List-Unsubscribe and
    X-Digest-Ledger-Id in their personalization."""
    assert BATCH_HEADERS == {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    if build == "full bodies":
        messages = [_message(make_message, i) for i in (1, 2, 3)]
        body = provider.build_request(messages).body
        live(srv).send_batch(messages)
    else:
        recipients = [_recipient(i) for i in (1, 2, 3)]
        body = provider.build_template_request(make_template(), recipients)[0].body
        live(srv).send_template_batch(make_template(), recipients)
    assert isinstance(body, bytes) and body.count(b'"List-Unsubscribe-Post"') == 1
    data = json.loads(body)
    assert data["headers"] == {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    assert [p["headers"] for p in data["personalizations"]] == [
        {"List-Unsubscribe": f"<https://news.example.org/u/tok{i:04d}>", "X-Digest-Ledger-Id": str(i)}
        for i in (1, 2, 3)]
    # Each copy carries all three (the fake merges them as SendGrid does).
    assert [m["headers"] for m in srv.messages] == [dict(_list_headers(i)) for i in (1, 2, 3)]


@pytest.mark.parametrize("build", ["full bodies", "template"])
@pytest.mark.parametrize("other", [None, "List-Unsubscribe=Something-Else"])
def test_one_click_stays_per_personalization_when_a_reader_differs(
        provider: SendGridProvider, make_message: MessageFactory, srv: FakeProviderServer, build: str,
        other: str | None) -> None:
    """A reader without the header, or with another value: no message-level header (it would
    give that reader the others' value), each reader's own in their personalization, as before."""
    values = ["List-Unsubscribe=One-Click", other, "List-Unsubscribe=One-Click"]
    if build == "full bodies":
        messages = [_message(make_message, i, value) for i, value in zip((1, 2, 3), values)]
        body = provider.build_request(messages).body
        live(srv).send_batch(messages)
    else:
        recipients = [_recipient(i, value) for i, value in zip((1, 2, 3), values)]
        body = provider.build_template_request(make_template(), recipients)[0].body
        live(srv).send_template_batch(make_template(), recipients)
    assert isinstance(body, bytes)
    data = json.loads(body)
    assert "headers" not in data
    assert [p["headers"] for p in data["personalizations"]] == [dict(_list_headers(i, value))
                                                                for i, value in zip((1, 2, 3), values)]
    assert [m["headers"] for m in srv.messages] == [dict(_list_headers(i, value))
                                                    for i, value in zip((1, 2, 3), values)]


def test_a_refused_reader_without_the_header_keeps_it_per_personalization(provider: SendGridProvider) -> None:
    """The message-level headers are decided from every reader given, those refused too: at
    worst the header goes per personalization."""
    refused = _recipient(2, None)._replace(to_email="no-at.example.org")
    call, ids = provider.build_template_request(make_template(), [_recipient(1), refused])
    assert ids == (1,) and [r.ledger_id for r in call.refused] == [2]
    data = json.loads(call.body)
    assert "headers" not in data
    assert data["personalizations"][0]["headers"] == dict(_list_headers(1))


def test_one_request_per_distinct_body(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    same = {"html": "<p>same</p>", "text": "same"}
    messages = [make_message(1, **same), make_message(2), make_message(3, **same)]
    results = live(srv).send_batch(messages)
    assert [(r.ledger_id, r.status) for r in results] == [(1, "sent"), (2, "sent"), (3, "sent")]
    bodies = sorted(len(r.json()["personalizations"]) for r in srv.requests)
    assert bodies == [1, 2]  # 1 and 3 share one request


def test_the_same_address_twice_is_not_sent_twice(
    provider: SendGridProvider, make_message: MessageFactory
) -> None:
    same = {"html": "<p>same</p>", "text": "same"}
    call = provider.build_request(
        [make_message(1, **same), make_message(2, to_email="READER1@example.com", **same)]
    )
    assert [m.ledger_id for m in call.messages] == [1]
    assert [(r.ledger_id, r.status) for r in call.refused] == [(2, "failed")]


# -- server-side personalization ----------------------------------------------------------------


def test_template_request_uses_nonce_keys(provider: SendGridProvider) -> None:
    template = make_template()
    call, ids = provider.build_template_request(
        template, [make_recipient(1), make_recipient(2)], nonce="abc123"
    )
    assert ids == (1, 2)
    data = json.loads(call.body)
    text, html = (c["value"] for c in data["content"])
    # Names and links read the same in HTML and text for both readers: one key per slot.
    assert html == (
        "<html><body><p>Hello -dabc123-name-,</p><blockquote>A fine essay.</blockquote>"
        '<p><a href="-dabc123-unsubscribe_url-">Unsubscribe</a></p></body></html>'
    )
    assert text == "Hello -dabc123-name-,\n\n> A fine essay.\n\nUnsubscribe: -dabc123-unsubscribe_url-\n"
    p = data["personalizations"][1]
    assert p["substitutions"] == {
        "-dabc123-name-": "Reader 2",
        "-dabc123-unsubscribe_url-": "https://news.example.org/u/tok0002",
    }
    assert p["headers"]["List-Unsubscribe"] == "<https://news.example.org/u/tok0002>"
    assert p["custom_args"] == {"ledger_id": "2", "draft_id": "7"}


def test_a_slot_escaped_differently_gets_a_key_per_part(provider: SendGridProvider) -> None:
    """One reader's name needs HTML escaping, so that slot's HTML and text values differ for
    the batch: separate keys, each reader's right value in each part."""
    call, _ = provider.build_template_request(
        make_template(), [make_recipient(1), make_recipient(2, name="Ann & Bo")], nonce="abc123"
    )
    data = json.loads(call.body)
    text, html = (c["value"] for c in data["content"])
    assert "Hello -dabc123-h-name-," in html and "Hello -dabc123-t-name-," in text
    assert "-dabc123-unsubscribe_url-" in html and "-dabc123-unsubscribe_url-" in text
    assert data["personalizations"][1]["substitutions"] == {
        "-dabc123-h-name-": "Ann &amp; Bo",
        "-dabc123-t-name-": "Ann & Bo",
        "-dabc123-unsubscribe_url-": "https://news.example.org/u/tok0002",
    }
    # What each reader gets, with the keys substituted as SendGrid does.
    for p, name in zip(data["personalizations"], ["Reader 1", "Ann & Bo"]):
        got_text = text
        for k, v in p["substitutions"].items():
            got_text = got_text.replace(k, v)
        assert got_text.startswith(f"Hello {name},")


def test_template_nonce_is_fresh_per_call(provider: SendGridProvider) -> None:
    template = make_template()
    bodies = {
        provider.build_template_request(template, [make_recipient(1)])[0].body for _ in range(3)
    }
    assert len(bodies) == 3


def test_a_nonce_found_in_the_content_is_refused(provider: SendGridProvider) -> None:
    template = make_template(comment="see -dabc123- here")
    with pytest.raises(ValueError, match="nonce occurs in the content"):
        provider.build_template_request(template, [make_recipient(1)], nonce="abc123")


def test_missing_slot_value_refuses_that_recipient(provider: SendGridProvider) -> None:
    broken = make_recipient(2)
    broken = broken._replace(html_values=("x",))
    call, ids = provider.build_template_request(make_template(), [make_recipient(1), broken])
    assert ids == (1,)
    assert [(r.ledger_id, r.status) for r in call.refused] == [(2, "invalid")]


def test_injection_content_reaches_readers_literally(srv: FakeProviderServer) -> None:
    """Comments quoting substitution syntax must not be substituted by SendGrid."""
    comment = "Try -name- or {{name}} or %recipient.name% or -unsubscribe_url- [Unsubscribe]"
    template = make_template(comment=comment, subject="About -name- and {{name}}")
    recipients = [make_recipient(1, name="Ann"), make_recipient(2, name="Bo <b>")]
    results = live(srv).send_template_batch(template, recipients)
    assert [r.status for r in results] == ["sent", "sent"]
    for r, got in zip(recipients, srv.messages):
        expected = expand_template(template, r)
        assert got["html"] == expected.html
        assert got["text"] == expected.text
        assert got["subject"] == "About -name- and {{name}}"
        assert comment in got["text"]
    assert "Hello Bo &lt;b&gt;," in srv.messages[1]["html"]  # values arrive escaped


def test_template_ids_share_the_request_message_id(srv: FakeProviderServer) -> None:
    results = live(srv).send_template_batch(make_template(), [make_recipient(1), make_recipient(2)])
    xid = srv.messages[0]["X-Message-Id"]
    assert [r.provider_message_id for r in results] == [xid, xid]


# -- answers ----------------------------------------------------------------------------------


def test_202_is_sent(provider: SendGridProvider, make_message: MessageFactory) -> None:
    messages = [make_message(1), make_message(2)]
    results = provider.handle_response(202, {"X-Message-Id": "abcXYZ"}, b"", messages)
    assert [(r.ledger_id, r.status, r.provider_message_id) for r in results] == [
        (1, "sent", "abcXYZ"),
        (2, "sent", "abcXYZ"),
    ]


def test_400_is_permanent_with_sendgrid_reasons(
    provider: SendGridProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(400, {}, payload("error_400_validation.json"), [make_message(1)])
    assert not info.value.retryable and info.value.status == 400
    assert "limited to 1000 personalizations" in str(info.value)
    assert "personalizations.1.to: Each unique email address" in str(info.value)


def test_401_and_403(provider: SendGridProvider, make_message: MessageFactory) -> None:
    with pytest.raises(AuthError, match="invalid, expired, or revoked"):
        provider.handle_response(401, {}, payload("error_401.json"), [make_message(1)])
    with pytest.raises(AuthError) as info:
        provider.handle_response(
            403, {}, payload("error_403_sender_identity.json"), [make_message(1)]
        )
    assert info.value.hint and "Sender Identity" in info.value.hint


def test_429_uses_retry_after(provider: SendGridProvider, make_message: MessageFactory) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(
            429, {"Retry-After": "12"}, payload("error_429.json"), [make_message(1)]
        )
    assert info.value.retryable and info.value.retry_after == 12


SEND_URL = "https://sg.test/v3/mail/send"
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def frozen_now(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """``digest.clock.now`` held at NOW, which the provider reads X-RateLimit-Reset against."""
    monkeypatch.setattr(clock, "now", lambda: NOW)
    return NOW


def reset_in(seconds: float) -> str:
    return str(int(NOW.timestamp() + seconds))


@responses.activate
@pytest.mark.parametrize("server_side", [True, False])
def test_a_429_without_retry_after_waits_until_x_ratelimit_reset(
    frozen_now: datetime, make_message: MessageFactory, server_side: bool
) -> None:
    """SendGrid's v3 limits come as X-RateLimit-Limit/-Remaining/-Reset (Unix seconds) and a
    429 (APIS.md A.2): the wait is the time until the reset, through either send path."""
    responses.add(responses.POST, SEND_URL, status=429, body=payload("error_429.json"),
                  headers={"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                           "X-RateLimit-Reset": reset_in(17)})
    provider = SendGridProvider(Delivery(provider="sendgrid", api_key=KEY, base_url="https://sg.test"))
    with pytest.raises(DeliveryError) as info:
        if server_side:
            provider.send_template_batch(make_template(), [make_recipient(1)])
        else:
            provider.send_batch([make_message(1)])
    assert info.value.retryable and info.value.status == 429 and info.value.retry_after == 17.0
    assert len(responses.calls) == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "5", "X-RateLimit-Reset": reset_in(40)}, 5.0),  # Retry-After wins
        ({"X-RateLimit-Reset": reset_in(100_000)}, 300.0),  # capped (the sender caps it again)
        ({"X-RateLimit-Reset": reset_in(-5)}, None),  # past: the sender's own backoff
        ({"X-RateLimit-Reset": "soon"}, None),
        ({}, None),
    ],
)
def test_x_ratelimit_reset_only_when_retry_after_is_missing(
    provider: SendGridProvider, frozen_now: datetime, make_message: MessageFactory,
    headers: dict[str, str], expected: float | None,
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(429, headers, payload("error_429.json"), [make_message(1)])
    assert info.value.retryable and info.value.retry_after == expected


def test_x_ratelimit_reset_is_read_on_a_429_only(
    provider: SendGridProvider, frozen_now: datetime, make_message: MessageFactory
) -> None:
    # Every v3 answer carries the headers; only a 429 says the limit was hit.
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(503, {"X-RateLimit-Reset": reset_in(30)}, b"", [make_message(1)])
    assert info.value.retryable and info.value.retry_after is None


def test_413_suggests_smaller_batches(
    provider: SendGridProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(413, {}, b"", [make_message(1)])
    assert not info.value.retryable and info.value.hint == "lower delivery.batch_size"


# -- several calls per batch (full bodies) --------------------------------------------------------


def test_a_later_429_keeps_the_accepted_messages(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.extend([(), ("status", 429, {}, {"errors": [{"message": "slow down"}]})])
    results = live(srv, concurrency=1).send_batch([make_message(i) for i in (1, 2, 3)])
    assert [r.status for r in results] == ["sent", "deferred", "deferred"]
    assert srv.ledger_ids == [1]


def test_a_lost_answer_mid_batch_is_uncertain_for_that_call_only(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.extend([(), ("reset", "after")])
    with pytest.raises(PartialBatchError) as info:
        live(srv, concurrency=1).send_batch([make_message(i) for i in (1, 2, 3)])
    assert info.value.uncertain == (2,)
    assert [(r.ledger_id, r.status) for r in info.value.results] == [(1, "sent"), (3, "deferred")]
    assert srv.ledger_ids == [1, 2]  # and indeed the fake took message 2


# -- check ------------------------------------------------------------------------------------


def test_check(srv: FakeProviderServer) -> None:
    assert "mail.send" in live(srv).check()
    with pytest.raises(AuthError):
        SendGridProvider(Delivery(provider="sendgrid", api_key="nope", base_url=srv.url)).check()


def test_check_needs_the_send_scope(srv: FakeProviderServer) -> None:
    from tests.fakes.provider_server import Reply

    srv.route("GET", "/v3/scopes", lambda s, r: Reply(200, payload("scopes_no_send.json")))
    with pytest.raises(AuthError, match="mail.send"):
        live(srv).check()


def test_a_built_template_batch_is_resent_as_it_was(
        provider: SendGridProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender keeps the built batch, not the recipients, for a retry: sending it again
    posts the very same body and answers for the same recipients, in their order."""
    posted: list[bytes] = []

    def perform(call: object) -> tuple[int, dict[str, str], bytes]:
        posted.append(call.body)  # type: ignore[attr-defined]
        return 202, {"X-Message-Id": "m1"}, b""

    monkeypatch.setattr(provider, "perform", perform)
    broken = make_recipient(3)._replace(html_values=("x",))
    send = provider.template_sender(make_template(), [make_recipient(2), broken, make_recipient(1)])
    first, again = send(), send()
    assert first == again
    assert [(r.ledger_id, r.status) for r in first] == [(2, "sent"), (3, "invalid"), (1, "sent")]
    assert len(posted) == 2 and posted[0] == posted[1]
    assert [p["custom_args"]["ledger_id"] for p in json.loads(posted[0])["personalizations"]] == ["2", "1"]
    assert provider.template_sender(make_template(), [])() == []


def test_the_body_is_the_json_text_in_utf8(provider: SendGridProvider) -> None:
    """Built as bytes piece by piece, the body is still exactly the JSON text, encoded once
    (a lone surrogate, which no valid input holds, becomes "?")."""
    readers = [make_recipient(1, name="Zoë"), make_recipient(2, name="Bad \ud800 name"), make_recipient(3)]
    call, ids = provider.build_template_request(make_template(), readers, nonce="abc123")
    assert ids == (1, 2, 3)
    text = call.body.decode("utf-8")  # type: ignore[union-attr]
    data = json.loads(text)
    assert [p["custom_args"]["ledger_id"] for p in data["personalizations"]] == ["1", "2", "3"]
    assert "Zoë" in text and "Bad ? name" in text
    assert call.body == json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    empty, no_ids = provider.build_template_request(make_template(), [], nonce="abc123")
    assert no_ids == () and json.loads(empty.body)["personalizations"] == []
