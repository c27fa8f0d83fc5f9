"""ResendProvider: the idempotency key, the request, the answers, safe resends on the fake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

from digest.config import Delivery
from digest.delivery.providers.base import UncertainDeliveryError, maybe_delivered
from digest.delivery.providers.resend import ResendProvider
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from tests.delivery.conftest import MessageFactory
from tests.fakes.provider_server import FakeProviderServer, Reply, install_resend

DATA = Path(__file__).resolve().parents[1] / "data" / "resend"
KEY = "re_test_key"


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.fixture
def provider() -> ResendProvider:
    return ResendProvider(Delivery(provider="resend", api_key=KEY, base_url="https://rs.test"))


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=KEY) as server:
        install_resend(server)
        yield server


def live(srv: FakeProviderServer, timeout: float = 5) -> ResendProvider:
    return ResendProvider(
        Delivery(provider="resend", api_key=KEY, base_url=srv.url, timeout=timeout)
    )


def test_needs_a_key() -> None:
    with pytest.raises(ConfigError):
        ResendProvider(Delivery(provider="outbox"))


# -- the idempotency key ------------------------------------------------------------------------


def test_idempotency_key_is_derived_from_the_batch(provider: ResendProvider, make_message: MessageFactory) -> None:
    provider.installation = "inst"
    batch = [make_message(i) for i in (3, 1, 2)]
    key = provider.idempotency_key(batch)
    assert key.startswith("digest/inst/7/") and len(key) == len("digest/inst/7/") + 64
    # The same rows, rebuilt and reordered: the same key. Other rows: another key.
    assert provider.idempotency_key([make_message(i) for i in (1, 2, 3)]) == key
    assert provider.idempotency_key([make_message(i) for i in (1, 2)]) != key
    assert provider.idempotency_key([make_message(i, draft_id=8) for i in (1, 2, 3)]) != key
    assert ResendProvider.idempotent is True


def test_another_installation_has_other_keys_and_another_key_space(make_message: MessageFactory) -> None:
    """Staging beside production on one Resend team: both start at draft 1, ledger ids 1..N.
    Their batches must not share keys (Resend refuses the second body: 409), and a batch is
    resent by itself only within the key space it went out in: this format, this
    installation, this account (the API key, hashed; never the key itself)."""
    def build(installation: str, api_key: str = KEY, base_url: str = "https://rs.test") -> ResendProvider:
        p = ResendProvider(Delivery(provider="resend", api_key=api_key, base_url=base_url))
        p.installation = installation
        return p

    batch = [make_message(i) for i in (1, 2, 3)]
    prod, staging = build("aaaa"), build("bbbb")
    assert prod.idempotency_key(batch) != staging.idempotency_key(batch)
    assert prod.key_space() != staging.key_space()
    assert prod.key_space() == build("aaaa").key_space() and len(prod.key_space()) == 16
    assert build("aaaa", api_key="re_other_team").key_space() != prod.key_space()
    assert build("aaaa", base_url="https://eu.rs.test").key_space() != prod.key_space()
    assert KEY not in prod.key_space() and "aaaa" not in prod.key_space()


def test_idempotency_key_is_capped(provider: ResendProvider, make_message: MessageFactory) -> None:
    many_drafts = [make_message(i, draft_id=10**30 + i) for i in range(1, 12)]
    assert len(provider.idempotency_key(many_drafts)) == 256


# -- building -----------------------------------------------------------------------------------


def test_request_shape(provider: ResendProvider, make_message: MessageFactory) -> None:
    messages = [
        make_message(1, reply_to="Editors <editors@news.example.org>"),
        make_message(2, to_email="bad"),
    ]
    call = provider.build_request(messages)
    assert (call.method, call.url) == ("POST", "https://rs.test/emails/batch")
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.headers["Idempotency-Key"] == provider.idempotency_key(messages[:1])
    assert [r.status for r in call.refused] == ["invalid"]
    (item,) = json.loads(call.body)
    assert item == {
        "from": "Field Notes <digest@news.example.org>",
        "to": ["Reader 1 <reader1@example.com>"],
        "subject": messages[0].subject,
        "html": messages[0].html,
        "text": messages[0].text,
        "headers": {
            "List-Unsubscribe": "<https://news.example.org/u/tok0001>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
        "tags": [{"name": "ledger_id", "value": "1"}, {"name": "draft_id", "value": "7"}],
        "reply_to": ["Editors <editors@news.example.org>"],
    }


def test_body_is_deterministic(provider: ResendProvider, make_message: MessageFactory) -> None:
    # A resend must be byte-identical, or Resend refuses the key (409 invalid_idempotent_request).
    first = provider.build_request([make_message(1, message_id="<a@x>"), make_message(2)])
    again = provider.build_request([make_message(1, message_id="<b@x>"), make_message(2)])
    assert first.body == again.body and first.headers == again.headers


# -- answers ------------------------------------------------------------------------------------


def test_ids_in_order(provider: ResendProvider, make_message: MessageFactory) -> None:
    messages = [make_message(i) for i in (1, 2, 3)]
    results = provider.handle_response(200, {}, payload("batch_ok.json"), messages)
    assert [(r.ledger_id, r.status, r.provider_message_id) for r in results] == [
        (1, "sent", "ae2014de-c168-4c61-8267-70d2662a1ce1"),
        (2, "sent", "faccb7a5-8a28-4e9a-ac64-8da1cc3bc1cb"),
        (3, "sent", "0f0b6a31-4f4f-4c8e-9bb4-7d3e0c9a1e22"),
    ]


def test_wrong_number_of_ids_is_uncertain(
    provider: ResendProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(UncertainDeliveryError):
        provider.handle_response(200, {}, payload("batch_ok.json"), [make_message(1)])


@pytest.mark.parametrize(
    ("status", "file", "kind", "retryable", "retry_after", "hint"),
    [
        (422, "error_422_validation.json", DeliveryError, False, None, None),
        (409, "error_409_concurrent.json", DeliveryError, True, 1.0, None),
        (429, "error_429_rate_limit.json", DeliveryError, True, 2.0, None),
        (429, "error_429_daily_quota.json", BlockedError, False, None, "daily quota"),
        (429, "error_429_monthly_quota.json", BlockedError, False, None, "monthly quota"),
        (
            409,
            "error_409_invalid_idempotent.json",
            UncertainDeliveryError,
            False,
            None,
            "resolve-uncertain",
        ),
        (403, "error_403_domain.json", AuthError, False, None, "verify the domain"),
        (403, "error_403_invalid_key.json", AuthError, False, None, "delivery.api_key"),
    ],
)
def test_errors(
    provider: ResendProvider,
    make_message: MessageFactory,
    status: int,
    file: str,
    kind: type[DeliveryError],
    retryable: bool,
    retry_after: float | None,
    hint: str | None,
) -> None:
    headers = {"retry-after": "2"} if file == "error_429_rate_limit.json" else {}
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(status, headers, payload(file), [make_message(1)])
    assert type(info.value) is kind
    assert info.value.retryable is retryable and info.value.status == status
    assert info.value.retry_after == retry_after
    if hint:
        assert info.value.hint and hint in info.value.hint
    name = json.loads(payload(file))["name"]
    assert name in str(info.value)


@responses.activate
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"ratelimit-limit": "2", "ratelimit-remaining": "0", "ratelimit-reset": "3"}, 3.0),
        ({"retry-after": "1", "ratelimit-reset": "3"}, 1.0),  # retry-after wins
        ({}, None),  # neither: the sender's own backoff
        ({"ratelimit-reset": "0"}, None),  # resetting now: the sender's own backoff, not no wait
    ],
)
def test_a_rate_limit_waits_for_ratelimit_reset_without_retry_after(
    provider: ResendProvider, make_message: MessageFactory, headers: dict[str, str], expected: float | None
) -> None:
    # Resend sends ratelimit-reset (seconds) on every answer, and retry-after on a 429 (APIS.md A.5).
    responses.add(responses.POST, "https://rs.test/emails/batch", status=429,
                  body=payload("error_429_rate_limit.json"), headers=headers)
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert type(info.value) is DeliveryError
    assert info.value.retryable and info.value.status == 429 and info.value.retry_after == expected


def test_ratelimit_reset_does_not_set_the_wait_of_a_concurrent_request(
    provider: ResendProvider, make_message: MessageFactory
) -> None:
    # A 409 concurrent_idempotent_requests waits for the first request, not the rate window.
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(409, {"ratelimit-reset": "30"}, payload("error_409_concurrent.json"),
                                 [make_message(1)])
    assert info.value.retry_after == 1.0


# -- against the fake -----------------------------------------------------------------------------


def test_resend_after_an_uncertain_outcome_does_not_duplicate(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.append(("reset", "after"))  # Resend took the batch, the answer was lost
    with pytest.raises(UncertainDeliveryError) as info:
        live(srv).send_batch([make_message(i) for i in (1, 2, 3)])
    assert maybe_delivered(info.value)
    assert srv.ledger_ids == [1, 2, 3]
    # The batch rebuilt (another process, another order) and sent again: same key, same
    # body, so Resend answers with the first ids and sends nothing.
    results = live(srv).send_batch([make_message(i) for i in (1, 2, 3)])
    assert [r.status for r in results] == ["sent"] * 3
    assert srv.ledger_ids == [1, 2, 3] and len(srv.messages) == 3
    assert [r.provider_message_id for r in results] == [m["id"] for m in srv.messages]
    keys = {r.headers["idempotency-key"] for r in srv.requests}
    assert len(keys) == 1


def test_same_key_with_another_body_is_uncertain(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    live(srv).send_batch([make_message(1)])
    with pytest.raises(UncertainDeliveryError) as info:
        live(srv).send_batch([make_message(1, subject="Edited after sending")])
    assert info.value.status == 409 and not info.value.retryable
    assert srv.ledger_ids == [1]


def test_timeout_then_resend(srv: FakeProviderServer, make_message: MessageFactory) -> None:
    srv.faults.append(("delay", 1.0))
    with pytest.raises(UncertainDeliveryError):
        live(srv, timeout=0.3).send_batch([make_message(1), make_message(2)])
    results = live(srv).send_batch([make_message(1), make_message(2)])
    assert [r.status for r in results] == ["sent", "sent"] and srv.ledger_ids == [1, 2]


def test_strict_validation_refuses_the_batch(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    with pytest.raises(DeliveryError) as info:
        live(srv).send_batch([make_message(1), make_message(2, subject="   ")])
    assert info.value.status == 422 and not info.value.retryable
    assert srv.ledger_ids == []


def test_missing_and_wrong_keys(srv: FakeProviderServer, make_message: MessageFactory) -> None:
    wrong = ResendProvider(Delivery(provider="resend", api_key="re_wrong", base_url=srv.url))
    with pytest.raises(AuthError) as info:
        wrong.send_batch([make_message(1)])
    assert info.value.status == 403


def test_check(srv: FakeProviderServer) -> None:
    assert live(srv).check().endswith("domains: news.example.org (verified)")
    srv.route("GET", "/domains", lambda s, r: Reply(401, payload("error_401_restricted.json")))
    assert "sending access only" in live(srv).check()
    srv.route("GET", "/domains", lambda s, r: Reply(403, payload("error_403_invalid_key.json")))
    with pytest.raises(AuthError):
        live(srv).check()
