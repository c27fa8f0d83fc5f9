"""PostmarkProvider.parse_response / handle_response on saved payloads: pure, no HTTP."""

from __future__ import annotations

import json

import pytest

from digest.config import Delivery
from digest.delivery.providers.base import UncertainDeliveryError, maybe_delivered
from digest.delivery.providers.postmark import PostmarkProvider
from digest.errors import AuthError, BlockedError, DeliveryError
from digest.types import OutgoingMessage
from tests.delivery.conftest import MessageFactory, payload_bytes


@pytest.fixture
def provider(postmark_settings: Delivery) -> PostmarkProvider:
    return PostmarkProvider(postmark_settings)


def batch(make_message: MessageFactory, *emails: str) -> list[OutgoingMessage]:
    return [make_message(i, to_email=e) for i, e in enumerate(emails, start=1)]


def test_all_sent(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    messages = batch(make_message, "ada@example.com", "bo@example.com", "cy@example.com")
    results = provider.handle_response(
        200, {"Content-Type": "application/json"}, payload_bytes("batch_ok.json"), messages
    )
    assert [(r.ledger_id, r.status, r.error) for r in results] == [
        (1, "sent", None),
        (2, "sent", None),
        (3, "sent", None),
    ]
    assert [r.provider_message_id for r in results] == [
        "0a4c1f52-0f4e-4d7b-9a55-6f0e1b2c3d01",
        "0a4c1f52-0f4e-4d7b-9a55-6f0e1b2c3d02",
        "0a4c1f52-0f4e-4d7b-9a55-6f0e1b2c3d03",
    ]


def test_every_per_message_case(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    messages = batch(
        make_message,
        "ok@example.com",
        "gone@example.com",
        "nobody@invalid",
        "x@exa-mple.com",
        "from-problem@example.com",
        "slow@example.com",
        "Bounced@Example.com",
        "later@example.com",
        "empty@example.com",
        "limit@example.com",
    )
    results = provider.parse_response(200, {}, payload_bytes("batch_mixed.json"), messages)
    assert [r.status for r in results] == [
        "sent",  # ErrorCode 0
        "suppressed",  # 406 inactive recipient
        "invalid",  # 300 "Invalid 'To' address"
        "invalid",  # 300 "Error parsing 'To'"
        # 300 about the From: no reader's fault, and every message would get it; since others
        # of this batch were accepted, it goes back to the queue (the next batch stops the send)
        "deferred",
        "sent",  # no ErrorCode: "delivery may be delayed" is still a success
        "suppressed",  # "Message OK, but will not deliver to these inactive addresses" naming ours
        "deferred",  # per-message 429: not sent, may work later
        "rejected",  # any other code (here a 300 about something else)
        "deferred",  # 405, the account may not send: as for the From
    ]
    assert [r.ledger_id for r in results] == list(range(1, 11))
    assert results[0].provider_message_id == "7f0c2a9e-1111-4c3b-8d2e-000000000001"
    assert results[5].provider_message_id == "7f0c2a9e-1111-4c3b-8d2e-000000000006"
    assert results[1].provider_message_id is None
    assert results[1].error is not None and results[1].error.startswith("Postmark ErrorCode 406: ")
    assert (
        results[4].error
        == "not sent: Postmark ErrorCode 300: Invalid 'From' address: 'digest@unverified.example'."
    )
    assert results[9].error == "not sent: Postmark ErrorCode 405: You have exceeded your sending limit."
    assert results[0].error is None


SENDER_REFUSALS = [
    (400, "The 'From' address you supplied (digest@example.org) is not a Sender Signature on your account.",
     "sender signature"),
    (401, "Sender signature not confirmed.", "sender signature"),
    (405, "You have exceeded your sending limit.", "not allowed to send"),
    (412, "Account pending approval.", "pending approval"),
    (413, "This account may not send.", "may not send"),
    (300, "Invalid 'From' address: 'digest@unverified.example'.", "newsletter.from"),
    (300, "Error parsing 'From': Illegal email address 'digest@'.", "newsletter.from"),
]


@pytest.mark.parametrize(("code", "text", "hint"), SENDER_REFUSALS)
def test_a_refusal_of_the_sender_or_the_account_stops_the_send(
    provider: PostmarkProvider, make_message: MessageFactory, code: int, text: str, hint: str
) -> None:
    # Postmark answers 200 with the refusal in each item: no reader is at fault, and every
    # batch would meet it, so it is no reader's rejection: the batch goes back, the send stops.
    refused = {"ErrorCode": code, "Message": text}
    body = json.dumps([refused, refused, refused]).encode()
    messages = batch(make_message, "a@x.example", "b@x.example", "c@x.example")
    with pytest.raises(BlockedError) as info:
        provider.handle_response(200, {}, body, messages)
    assert str(info.value).startswith(f"postmark: Postmark ErrorCode {code}: {text}")
    assert info.value.hint and hint in info.value.hint
    assert not info.value.retryable and not maybe_delivered(info.value)


def test_a_sender_refusal_beside_readers_own_refusals_still_stops_the_send(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    items = [
        {"ErrorCode": 406, "Message": "You tried to send to a recipient that has been marked as inactive."},
        {"ErrorCode": 300, "Message": "Invalid 'To' address: 'nobody@invalid'."},
        {"ErrorCode": 401, "Message": "Sender signature not confirmed."},
    ]
    messages = batch(make_message, "gone@example.com", "nobody@invalid", "c@x.example")
    with pytest.raises(BlockedError, match="ErrorCode 401"):
        provider.parse_response(200, {}, json.dumps(items).encode(), messages)


def test_ok_with_other_inactive_address_is_sent(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    item = {
        "ErrorCode": 0,
        "Message": "Message OK, but will not deliver to these inactive addresses: "
        "other@example.com. "
        "Inactive recipients are ones that have generated a hard bounce or a spam complaint.",
        "MessageID": "m-1",
        "To": "ada@example.com",
    }
    (result,) = provider.parse_response(
        200, {}, json.dumps([item]).encode(), batch(make_message, "ada@example.com")
    )
    assert result.status == "sent"


def test_an_inactive_reader_at_a_non_ascii_domain_is_suppressed(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    """Postmark names the address as it was sent: the domain IDNA-encoded."""
    item = {
        "ErrorCode": 0,
        "Message": "Message OK, but will not deliver to these inactive addresses: "
        "zoe@xn--bcher-kva.example. "
        "Inactive recipients are ones that have generated a hard bounce or a spam complaint.",
        "MessageID": "m-1",
        "To": "zoe@xn--bcher-kva.example",
    }
    (result,) = provider.parse_response(
        200, {}, json.dumps([item]).encode(), batch(make_message, "zoe@bücher.example")
    )
    assert result.status == "suppressed"


def test_wrong_length_is_uncertain(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(UncertainDeliveryError, match="3 results for 2 messages") as info:
        provider.parse_response(
            200,
            {},
            payload_bytes("batch_ok.json"),
            batch(make_message, "a@x.example", "b@x.example"),
        )
    assert maybe_delivered(info.value)
    assert info.value.status == 200


@pytest.mark.parametrize("body", [b'{"ErrorCode": 0, "Message": "OK"}', b"[1, 2]", b"null"])
def test_unexpected_json_shape_is_uncertain(
    provider: PostmarkProvider, make_message: MessageFactory, body: bytes
) -> None:
    messages = batch(make_message, "a@x.example", "b@x.example")
    with pytest.raises(UncertainDeliveryError):
        provider.parse_response(200, {}, body, messages)


def test_garbage_on_200_is_uncertain_and_not_retryable(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(UncertainDeliveryError) as info:
        provider.parse_response(
            200, {}, b"<html>Bad Gateway</html>", batch(make_message, "a@x.example")
        )
    err = info.value
    assert isinstance(err, DeliveryError) and maybe_delivered(err)
    assert not err.retryable
    assert err.status == 200 and err.response_text == "<html>Bad Gateway</html>"


@pytest.mark.parametrize(
    ("payload", "kind", "retryable", "hint"),
    [
        (
            "error_422_bad_token.json",
            AuthError,
            False,
            "check delivery.api_key: it must be a Postmark server token",
        ),
        ("error_422_maintenance.json", DeliveryError, True, None),
        ("error_422_rate_limit.json", DeliveryError, True, None),
        ("error_422_invalid_request.json", DeliveryError, False, None),
        (
            "error_422_too_many_messages.json",
            BlockedError,
            False,
            "lower delivery.batch_size (Postmark takes at most 500 messages per batch)",
        ),
        (
            "error_422_sender_signature.json",
            BlockedError,
            False,
            "the From address needs a confirmed sender signature or domain in Postmark",
        ),
    ],
)
def test_whole_call_422_by_error_code(
    provider: PostmarkProvider,
    make_message: MessageFactory,
    payload: str,
    kind: type[DeliveryError],
    retryable: bool,
    hint: str | None,
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(
            422, {}, payload_bytes(payload), batch(make_message, "a@x.example")
        )
    err = info.value
    assert type(err) is kind
    assert err.retryable is retryable
    assert err.status == 422
    assert err.hint == hint
    assert not maybe_delivered(err)
    assert err.response_text == payload_bytes(payload).decode()


def test_422_without_json_is_not_retryable(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(422, {}, b"nope", batch(make_message, "a@x.example"))
    assert not info.value.retryable and not maybe_delivered(info.value)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_statuses(
    provider: PostmarkProvider, make_message: MessageFactory, status: int
) -> None:
    with pytest.raises(AuthError) as info:
        provider.handle_response(
            status,
            {},
            b'{"ErrorCode":10,"Message":"bad token"}',
            batch(make_message, "a@x.example"),
        )
    assert info.value.status == status and info.value.hint == "check delivery.api_key"


def test_429_reads_retry_after_case_insensitively(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(
            429, {"RETRY-AFTER": "12"}, b"{}", batch(make_message, "a@x.example")
        )
    assert info.value.retryable and info.value.retry_after == 12.0 and info.value.status == 429


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retryable(
    provider: PostmarkProvider, make_message: MessageFactory, status: int
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(status, {}, b"x" * 5000, batch(make_message, "a@x.example"))
    err = info.value
    assert err.retryable and not maybe_delivered(err)
    assert err.response_text is not None and len(err.response_text) <= 500


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_are_uncertain(
    provider: PostmarkProvider, make_message: MessageFactory, status: int
) -> None:
    # A proxy in front of Postmark answered, perhaps after Postmark took the batch.
    with pytest.raises(UncertainDeliveryError) as info:
        provider.handle_response(
            status, {"Retry-After": "9"}, b"<html>x</html>" * 500, batch(make_message, "a@x.example")
        )
    err = info.value
    assert err.retryable and maybe_delivered(err) and err.status == status and err.retry_after == 9.0
    assert err.response_text is not None and len(err.response_text) <= 500


@pytest.mark.parametrize("status", [301, 400, 404, 413])
def test_other_statuses_are_not_retryable(
    provider: PostmarkProvider, make_message: MessageFactory, status: int
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(status, {}, b'{"Message":"?"}', batch(make_message, "a@x.example"))
    # A 404 means the URL is wrong, a 413 the batch too large (for Postmark or a proxy in front
    # of it), for every batch alike: the send stops, nobody is failed.
    assert type(info.value) is (BlockedError if status in (404, 413) else DeliveryError)
    assert not info.value.retryable and info.value.status == status
