"""The provider base classes: error taxonomy, transport classification, the registry."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError
from urllib3.exceptions import SSLError as Urllib3SSLError

from digest.config import Delivery
from digest.delivery.providers.base import (
    HttpProvider,
    PreparedCall,
    Provider,
    UncertainDeliveryError,
    body_summary,
    maybe_delivered,
    response_text,
)
from digest.delivery.providers.outbox import OutboxProvider
from digest.delivery.providers.postmark import PostmarkProvider
from digest.delivery.providers.registry import PROVIDERS, build_provider, provider_class
from digest.errors import AuthError, BlockedError, DeliveryError
from digest.http import build_session
from digest.types import OutgoingMessage, SendResult
from tests.delivery.conftest import MessageFactory

URL = "https://api.example/send"


class Minimal(HttpProvider):
    """The smallest HTTP provider: what a new provider has to write."""

    name = "minimal"
    max_batch = 10
    default_base_url = "https://api.example"

    def build_request(self, messages: Sequence[OutgoingMessage]) -> PreparedCall:
        return PreparedCall("POST", f"{self.base_url}/send", {}, b"[]", tuple(messages))

    def parse_response(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        messages: Sequence[OutgoingMessage],
    ) -> list[SendResult]:
        if status != 200:
            raise self.status_error(status, body)
        self.decode_json(status, body)
        return [SendResult(m.ledger_id, "sent") for m in messages]

    def check(self) -> str:
        return "minimal"


@pytest.fixture
def minimal() -> Minimal:
    return Minimal(Delivery())


def test_uncertain_is_a_delivery_error() -> None:
    err = UncertainDeliveryError("x", retryable=True, status=200)
    assert isinstance(err, DeliveryError)
    assert err.maybe_delivered is True and maybe_delivered(err)
    assert not maybe_delivered(DeliveryError("x"))
    assert not maybe_delivered(AuthError("x"))
    assert not maybe_delivered(ValueError("x"))


def test_response_text_is_truncated() -> None:
    assert response_text(None) == ""
    assert response_text(b"short") == "short"
    long = response_text(b"a" * 2000)
    assert len(long) == 500 and long.endswith("…")
    assert response_text(b"\xff\xfe bad utf-8") == "\ufffd\ufffd bad utf-8"


# A gateway's answer that may follow a request the provider took: uncertain when it answers a
# send. Cloudflare's 520, 522 and 524 among them (see base.GATEWAY_STATUSES for each reason).
@pytest.mark.parametrize("status", [502, 504, 520, 522, 524, 527, 598, 599])
def test_a_gateway_status_answering_a_send_is_uncertain(minimal: Minimal, status: int) -> None:
    page = f"<html><head><title>{status}</title></head><body>gateway</body></html>".encode()
    with pytest.raises(UncertainDeliveryError) as info:
        minimal.raise_for_common_status(status, {"retry-after": "2"}, page)
    assert info.value.retryable and info.value.status == status and info.value.retry_after == 2
    assert f"HTTP {status}" in str(info.value) and "gateway" in str(info.value)
    # `digest check` sends nothing: there it is a plain retryable error.
    with pytest.raises(DeliveryError) as checked:
        minimal.raise_for_common_status(status, {}, page, sends_mail=False)
    assert type(checked.value) is DeliveryError and checked.value.retryable


# The origin never had the request (Cloudflare: 521 refused, 523 unreachable, 525 and 526 no
# TLS with it, 530 its DNS or tunnel), or the provider answered itself: retried like any 5xx.
@pytest.mark.parametrize("status", [500, 503, 521, 523, 525, 526, 530])
def test_a_5xx_the_provider_never_took_the_request_for_is_retryable(minimal: Minimal, status: int) -> None:
    with pytest.raises(DeliveryError) as info:
        minimal.raise_for_common_status(status, {}, b"<html><body>error</body></html>")
    assert type(info.value) is DeliveryError and info.value.retryable


NGINX_413 = (b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
             b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
             b"</body>\r\n</html>\r\n")


@pytest.mark.parametrize(
    ("body", "summary"),
    [
        (NGINX_413, 'the body is not JSON (HTML: "413 Request Entity Too Large")'),
        # No title: the page's text, without markup, scripts or styles.
        (b"<!DOCTYPE html>\n<html><head><style>\nbody { color: red }\n</style><script>var x = '<b>';</script>"
         b"</head>\n<body>\n<h1>Error 1015</h1>\n<p>You are being\n   rate limited</p></body></html>",
         'the body is not JSON (HTML: "Error 1015 You are being rate limited")'),
        (b"<?xml version='1.0'?><Error><Code>Throttling</Code><Message>Rate exceeded</Message></Error>",
         'the body is not JSON (XML: "Throttling Rate exceeded")'),
        (b"Bad Gateway\r\n\r\nupstream \x1b[31mreset\x00 &amp; gone", 'the body is not JSON (text: "Bad Gateway '
         'upstream [31mreset &amp; gone")'),
        (b"", "the body is empty"),
        (b" \r\n\t", "the body is empty"),
        (b"<html><head><title> </title></head><body></body></html>", "the body is not JSON (HTML)"),
    ],
)
def test_body_summary_is_one_short_line(body: bytes, summary: str) -> None:
    assert body_summary(body) == summary


def test_body_summary_cuts_a_long_body() -> None:
    text = body_summary(b"word " * 1000)
    assert text.startswith('the body is not JSON (text: "word word') and text.endswith('…")')
    assert len(text) < 120


def test_a_status_the_provider_does_not_document_describes_a_body_that_is_not_json(minimal: Minimal) -> None:
    error = minimal.status_error(413, NGINX_413)
    assert str(error) == 'minimal: HTTP 413: the body is not JSON (HTML: "413 Request Entity Too Large")'
    assert error.response_text == NGINX_413.decode()  # the body itself is kept on the error
    assert str(minimal.status_error(409, b'{"message": "conflict"}')) == "minimal: HTTP 409"


def _cert_error() -> requests.exceptions.SSLError:
    inner = ssl.SSLCertVerificationError(1, "certificate verify failed")
    return requests.exceptions.SSLError(MaxRetryError(None, URL, Urllib3SSLError(inner)))


@pytest.mark.parametrize(
    ("exc", "kind", "retryable"),
    [
        (requests.ConnectTimeout("connect"), DeliveryError, True),
        (
            requests.ConnectionError(MaxRetryError(None, URL, NewConnectionError(None, "refused"))),
            DeliveryError,
            True,
        ),
        (
            requests.ConnectionError(
                MaxRetryError(None, URL, NameResolutionError("api.example", None, OSError("dns")))
            ),
            DeliveryError,
            True,
        ),
        (_cert_error(), BlockedError, False),
        (requests.exceptions.InvalidURL("bad"), BlockedError, False),
        (requests.exceptions.MissingSchema("bad"), BlockedError, False),
        (requests.ReadTimeout("read"), UncertainDeliveryError, True),
        (
            requests.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError())),
            UncertainDeliveryError,
            True,
        ),
        # An SSLError that is not a certificate failure may be a TLS connection cut mid-request.
        (
            requests.exceptions.SSLError(
                ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
            ),
            UncertainDeliveryError,
            True,
        ),
        (requests.exceptions.ChunkedEncodingError("truncated"), UncertainDeliveryError, True),
        (requests.exceptions.ContentDecodingError("gzip"), UncertainDeliveryError, True),
    ],
)
def test_transport_error_classification(
    minimal: Minimal, exc: requests.RequestException, kind: type[DeliveryError], retryable: bool
) -> None:
    err = minimal.transport_error(exc, URL, sends_mail=True)
    assert type(err) is kind
    assert err.retryable is retryable
    assert URL in str(err)


def test_transport_errors_outside_sending_are_never_uncertain(minimal: Minimal) -> None:
    err = minimal.transport_error(requests.ReadTimeout("read"), URL, sends_mail=False)
    assert type(err) is DeliveryError and err.retryable


class _Answering(requests.adapters.BaseAdapter):
    """An adapter that keeps each request it is given and answers ``status`` with ``body``."""

    def __init__(self, status: int = 200, body: bytes = b"[]", headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.status, self.body, self.headers = status, body, headers or {}
        self.sent: list[tuple[requests.PreparedRequest, dict[str, object]]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
        self.sent.append((request, kwargs))
        response = requests.Response()
        response.status_code, response._content, response.url = self.status, self.body, request.url or ""
        response.headers.update(self.headers)
        response.request = request
        return response

    def close(self) -> None:
        pass


def _minimal_with(adapter: _Answering, **settings: object) -> Minimal:
    session = build_session()
    session.mount("https://", adapter)
    return Minimal(Delivery(**settings), session=session)  # type: ignore[arg-type]


def test_minimal_provider_sends_through_the_template_method(make_message: MessageFactory) -> None:
    adapter = _Answering()
    provider = _minimal_with(adapter, timeout=3)
    results = provider.send_batch([make_message(1), make_message(2)])
    assert [r.status for r in results] == ["sent", "sent"]
    ((request, kwargs),) = adapter.sent
    assert (request.method, request.url, kwargs["timeout"], kwargs["stream"]) == (
        "POST", "https://api.example/send", 3, False)
    assert request.headers["Content-Length"] == str(len(request.body or b""))


def test_a_provider_call_carries_the_sessions_user_agent_and_its_own_headers(make_message: MessageFactory) -> None:
    adapter = _Answering()
    provider = _minimal_with(adapter)
    provider.session.headers["X-Session-Only"] = "kept"
    provider.session.headers["Accept"] = "text/html"  # the call's own Accept wins, whatever its case
    provider.request("GET", "https://api.example/server", {"accept": "application/json", "X-Token": "t"})
    ((request, _),) = adapter.sent
    assert request.headers["User-Agent"].startswith("digest/")
    assert request.headers["X-Session-Only"] == "kept"
    assert request.headers["Accept"] == "application/json" and request.headers["X-Token"] == "t"
    assert "Content-Length" not in request.headers  # a GET without a body


def test_a_redirect_is_reported_not_followed(make_message: MessageFactory) -> None:
    adapter = _Answering(302, b"", {"Location": "https://elsewhere.example/send"})
    provider = _minimal_with(adapter)
    with pytest.raises(DeliveryError):
        provider.send_batch([make_message(1)])
    assert [r.url for r, _ in adapter.sent] == ["https://api.example/send"]


def test_cookies_a_provider_sets_are_neither_kept_nor_sent(make_message: MessageFactory) -> None:
    provider = Minimal(Delivery())
    with responses.RequestsMock() as mocked:
        mocked.add(responses.POST, URL, body=b"[]", headers={"Set-Cookie": "track=1; Path=/"})
        provider.send_batch([make_message(1)])
        provider.send_batch([make_message(2)])
        assert ["Cookie" in call.request.headers for call in mocked.calls] == [False, False]
    assert not provider.session.cookies


def test_a_header_value_no_request_can_carry_is_one_clear_error() -> None:
    adapter = _Answering()
    provider = _minimal_with(adapter)
    with pytest.raises(BlockedError) as caught:
        provider.request("GET", "https://api.example/server", {"X-Token": "key\r\nInjected: 1"})
    assert "delivery.api_key" in (caught.value.hint or "") and adapter.sent == []


def test_result_count_mismatch_is_uncertain(make_message: MessageFactory) -> None:
    class Short(Minimal):
        def parse_response(self, status, headers, body, messages):  # type: ignore[no-untyped-def]
            return []

        def perform(self, call: PreparedCall) -> tuple[int, Mapping[str, str], bytes]:
            return 200, {}, b"[]"

    with pytest.raises(UncertainDeliveryError, match="0 results for 1 messages"):
        Short(Delivery()).send_batch([make_message(1)])


def test_provider_is_abstract() -> None:
    with pytest.raises(TypeError):
        Provider(Delivery())  # type: ignore[abstract]


def test_registry_builds_known_providers(tmp_path: Path) -> None:
    outbox = build_provider(Delivery(provider="outbox", outbox_dir=str(tmp_path)))
    assert isinstance(outbox, OutboxProvider)
    postmark = build_provider(Delivery(provider="postmark", api_key="t"))
    assert isinstance(postmark, PostmarkProvider)
    postmark.close()


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_every_registered_provider_declares_itself(name: str) -> None:
    cls = provider_class(name)
    assert issubclass(cls, Provider)
    assert cls.name == name
    assert cls.max_batch > 0
    assert cls.send_batch.__doc__ and cls.check.__doc__


def test_credentials_in_the_base_url_become_basic_auth_as_in_requests(make_message: MessageFactory) -> None:
    adapter = _Answering()
    provider = _minimal_with(adapter, base_url="https://user:p%40ss@api.example")
    provider.send_batch([make_message(1)])
    ((request, _),) = adapter.sent
    assert request.headers["Authorization"] == requests.auth._basic_auth_str("user", "p@ss")
