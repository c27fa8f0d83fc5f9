"""PostmarkProvider.send_batch and check() through requests, with `responses` as the server."""

from __future__ import annotations

import json

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from digest.config import Delivery
from digest.delivery.providers.base import UncertainDeliveryError, maybe_delivered
from digest.delivery.providers.postmark import PostmarkProvider
from digest.errors import AuthError, DeliveryError
from tests.delivery.conftest import TOKEN, MessageFactory, load_payload, payload_bytes

BATCH = "https://pm.test/email/batch"
SERVER = "https://pm.test/server"


@pytest.fixture
def provider(postmark_settings: Delivery) -> PostmarkProvider:
    return PostmarkProvider(postmark_settings)


@responses.activate
def test_happy_path_sends_one_request(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    responses.add(responses.POST, BATCH, json=load_payload("batch_ok.json"))
    messages = [
        make_message(i, to_email=e)
        for i, e in enumerate(["ada@example.com", "bo@example.com", "cy@example.com"], 1)
    ]
    results = provider.send_batch(messages)
    assert [r.status for r in results] == ["sent"] * 3
    assert len(responses.calls) == 1
    request = responses.calls[0].request
    assert request.headers["X-Postmark-Server-Token"] == TOKEN
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"].startswith("digest/")
    assert [m["To"] for m in json.loads(request.body)] == [
        f"Reader {i} <{e}>"
        for i, e in enumerate(["ada@example.com", "bo@example.com", "cy@example.com"], 1)
    ]
    assert request.req_kwargs["timeout"] == 5


@responses.activate
def test_401_is_auth_error(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    responses.add(
        responses.POST,
        BATCH,
        status=401,
        json={"ErrorCode": 10, "Message": "Bad or missing Server API token."},
    )
    with pytest.raises(AuthError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.status == 401
    assert info.value.response_text is not None and "ErrorCode" in info.value.response_text
    assert not info.value.retryable


@responses.activate
def test_429_with_retry_after(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    responses.add(
        responses.POST,
        BATCH,
        status=429,
        json={"ErrorCode": 429, "Message": "Rate limit exceeded."},
        headers={"Retry-After": "7"},
    )
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    err = info.value
    assert (
        err.retryable and err.retry_after == 7.0 and err.status == 429 and not maybe_delivered(err)
    )


@responses.activate
def test_500_is_retryable(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    responses.add(responses.POST, BATCH, status=500, body="Internal Server Error")
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable and info.value.status == 500
    assert info.value.response_text == "Internal Server Error"


@responses.activate
def test_422_invalid_request_is_not_retryable(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    responses.add(
        responses.POST, BATCH, status=422, body=payload_bytes("error_422_invalid_request.json")
    )
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    err = info.value
    assert type(err) is DeliveryError and not err.retryable and err.status == 422
    assert "ErrorCode 300" in str(err)


@responses.activate
def test_422_bad_token_is_auth_error(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    responses.add(responses.POST, BATCH, status=422, body=payload_bytes("error_422_bad_token.json"))
    with pytest.raises(AuthError):
        provider.send_batch([make_message(1)])


@responses.activate
def test_refused_messages_are_merged_back_in_order(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    responses.add(
        responses.POST,
        BATCH,
        json=[
            {"ErrorCode": 0, "Message": "OK", "MessageID": "m-1", "To": "reader1@example.com"},
            {"ErrorCode": 0, "Message": "OK", "MessageID": "m-3", "To": "reader3@example.com"},
        ],
    )
    results = provider.send_batch(
        [make_message(1), make_message(2, to_email="broken"), make_message(3)]
    )
    assert [(r.ledger_id, r.status, r.provider_message_id) for r in results] == [
        (1, "sent", "m-1"),
        (2, "invalid", None),
        (3, "sent", "m-3"),
    ]


@responses.activate
def test_all_refused_makes_no_call(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    results = provider.send_batch(
        [make_message(1, to_email="broken"), make_message(2, to_email="also broken")]
    )
    assert [r.status for r in results] == ["invalid", "invalid"]
    assert len(responses.calls) == 0


def test_empty_batch_makes_no_call(provider: PostmarkProvider) -> None:
    assert provider.send_batch([]) == []


def test_batch_over_the_limit_is_refused(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(ValueError, match="limit is 500"):
        provider.send_batch([make_message(i) for i in range(501)])


@responses.activate
def test_body_over_50mb_is_refused_before_sending(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    big = "x" * 1_100_000
    with pytest.raises(DeliveryError, match="nothing was sent") as info:
        provider.send_batch([make_message(i, html=big) for i in range(50)])
    assert info.value.hint == "lower delivery.batch_size" and not maybe_delivered(info.value)
    assert len(responses.calls) == 0


@responses.activate
def test_connection_refused_is_retryable_and_certain(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    refused = requests.ConnectionError(
        MaxRetryError(None, BATCH, NewConnectionError(None, "Connection refused"))
    )
    responses.add(responses.POST, BATCH, body=refused)
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable and not maybe_delivered(info.value)
    assert info.value.hint == "if it persists, check delivery.base_url"  # most often a wrong URL


@responses.activate
def test_connect_timeout_is_retryable_and_certain(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    responses.add(responses.POST, BATCH, body=requests.ConnectTimeout("connect timed out"))
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable and not maybe_delivered(info.value)


@pytest.mark.parametrize(
    "exc",
    [
        requests.ReadTimeout("read timed out"),
        requests.ConnectionError(
            ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
        ),
        requests.exceptions.ChunkedEncodingError("truncated"),
    ],
)
@responses.activate
def test_failure_after_sending_is_uncertain(
    provider: PostmarkProvider, make_message: MessageFactory, exc: Exception
) -> None:
    responses.add(responses.POST, BATCH, body=exc)
    with pytest.raises(UncertainDeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable and maybe_delivered(info.value)
    assert isinstance(info.value.__cause__, requests.RequestException)


@responses.activate
def test_check_reaches_the_server(provider: PostmarkProvider) -> None:
    responses.add(responses.GET, SERVER, body=payload_bytes("server.json"))
    line = provider.check()
    assert (
        line
        == "postmark: reached server 'Field Notes Digest' at https://pm.test, stream 'broadcast'"
    )
    assert responses.calls[0].request.headers["X-Postmark-Server-Token"] == TOKEN


@responses.activate
def test_check_notes_the_test_token() -> None:
    responses.add(responses.GET, SERVER, body=payload_bytes("server.json"))
    provider = PostmarkProvider(
        Delivery(provider="postmark", api_key="POSTMARK_API_TEST", base_url="https://pm.test")
    )
    assert provider.check().endswith("(test token: Postmark validates messages but delivers none)")


@responses.activate
def test_check_with_bad_token(provider: PostmarkProvider) -> None:
    responses.add(
        responses.GET,
        SERVER,
        status=401,
        json={"ErrorCode": 10, "Message": "Bad or missing Server API token."},
    )
    with pytest.raises(AuthError, match="refused the credentials"):
        provider.check()


@responses.activate
def test_check_network_error_is_plain_delivery_error(provider: PostmarkProvider) -> None:
    responses.add(responses.GET, SERVER, body=requests.ReadTimeout("read timed out"))
    with pytest.raises(DeliveryError) as info:
        provider.check()
    assert info.value.retryable and not maybe_delivered(info.value)


def test_closes_only_its_own_session(postmark_settings: Delivery) -> None:
    class Session(requests.Session):
        closed = False

        def close(self) -> None:
            self.closed = True
            super().close()

    shared = Session()
    with PostmarkProvider(postmark_settings, session=shared):
        pass
    assert not shared.closed
    own = PostmarkProvider(postmark_settings)
    own.close()
