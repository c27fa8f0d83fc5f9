"""PostmarkProvider against FakeProviderServer: real HTTP, real sockets, injected faults."""

from __future__ import annotations

import json
import socket
import time
from email.utils import parseaddr
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from digest.config import Delivery
from digest.delivery.providers.base import UncertainDeliveryError, maybe_delivered
from digest.delivery.providers.mailgun import MailgunProvider
from digest.delivery.providers.postmark import PostmarkProvider
from digest.errors import AuthError, DeliveryError
from tests.delivery.conftest import TOKEN, MessageFactory
from tests.fakes.provider_server import (
    FakeProviderServer,
    Reply,
    Request,
    _mailbox_address,
    install_mailgun,
    postmark_ledger_ids,
)


def provider_for(
    server: FakeProviderServer, *, token: str = TOKEN, timeout: float = 5
) -> PostmarkProvider:
    return PostmarkProvider(
        Delivery(provider="postmark", api_key=token, base_url=server.url, timeout=timeout)
    )


def test_happy_path_records_three_messages(
    fake_provider: FakeProviderServer, make_message: MessageFactory
) -> None:
    messages = [make_message(i) for i in (11, 12, 13)]
    with provider_for(fake_provider) as provider:
        results = provider.send_batch(messages)
    assert [r.status for r in results] == ["sent"] * 3
    assert fake_provider.ledger_ids == [11, 12, 13]
    recorded = fake_provider.messages
    assert [r.provider_message_id for r in results] == [m["MessageID"] for m in recorded]
    first = recorded[0]
    assert first["To"] == "Reader 11 <reader11@example.com>"
    assert first["From"] == "Field Notes <digest@news.example.org>"
    assert first["HtmlBody"] == messages[0].html and first["TextBody"] == messages[0].text
    assert first["MessageStream"] == "broadcast"
    assert first["Metadata"] == {"ledger_id": "11", "draft_id": "7"}
    assert first["Headers"] == [
        {"Name": "List-Unsubscribe", "Value": "<https://news.example.org/u/tok0011>"},
        {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"},
    ]
    (request,) = fake_provider.requests
    assert (request.method, request.path) == ("POST", "/email/batch")


def test_inactive_and_invalid_recipients(
    fake_provider: FakeProviderServer, make_message: MessageFactory
) -> None:
    fake_provider.inactive = {"Gone@Example.com"}
    messages = [
        make_message(1),
        make_message(2, to_email="gone@example.com"),
        make_message(3, to_email="broken"),
    ]
    results = provider_for(fake_provider).send_batch(messages)
    assert [r.status for r in results] == ["sent", "suppressed", "invalid"]
    assert fake_provider.ledger_ids == [1]


def test_partial_failures(fake_provider: FakeProviderServer, make_message: MessageFactory) -> None:
    fake_provider.faults.append(
        (
            "partial",
            {1: (300, "Invalid 'To' address: 'reader2@example.com'."), 2: (405, "Not allowed")},
        )
    )
    results = provider_for(fake_provider).send_batch([make_message(i) for i in (1, 2, 3, 4)])
    # 405 (the account may not send) is no reader's fault: not sent, back to the queue; the
    # accepted messages beside it stay sent (raising would send them again).
    assert [r.status for r in results] == ["sent", "invalid", "deferred", "sent"]
    assert fake_provider.ledger_ids == [1, 4]


def test_wrong_token(fake_provider: FakeProviderServer, make_message: MessageFactory) -> None:
    with pytest.raises(AuthError) as info:
        provider_for(fake_provider, token="wrong").send_batch([make_message(1)])
    assert info.value.status == 401
    assert fake_provider.messages == []


def test_garbage_answer_is_uncertain(
    fake_provider: FakeProviderServer, make_message: MessageFactory
) -> None:
    fake_provider.faults.append(("garbage",))
    with pytest.raises(UncertainDeliveryError) as info:
        provider_for(fake_provider).send_batch([make_message(1), make_message(2)])
    assert not info.value.retryable and maybe_delivered(info.value)
    assert fake_provider.ledger_ids == [1, 2]  # and indeed the provider had accepted them


@pytest.mark.parametrize(
    ("fault", "recorded"), [(("reset",), []), (("reset", "before"), []), (("reset", "after"), [1])]
)
def test_reset_is_uncertain_either_way(
    fake_provider: FakeProviderServer,
    make_message: MessageFactory,
    fault: tuple[str, ...],
    recorded: list[int],
) -> None:
    fake_provider.faults.append(fault)
    provider = provider_for(fake_provider)
    with pytest.raises(UncertainDeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable and maybe_delivered(info.value)
    assert fake_provider.ledger_ids == recorded
    # The next call opens a fresh connection and works.
    assert [r.status for r in provider.send_batch([make_message(2)])] == ["sent"]


def test_timeout_after_acceptance_is_uncertain(
    fake_provider: FakeProviderServer, make_message: MessageFactory
) -> None:
    fake_provider.faults.append(("delay", 2.0))
    started = time.monotonic()
    with pytest.raises(UncertainDeliveryError, match="timed out waiting for the answer") as info:
        provider_for(fake_provider, timeout=0.3).send_batch([make_message(1)])
    assert time.monotonic() - started < 1.5
    assert info.value.retryable and maybe_delivered(info.value)
    assert fake_provider.ledger_ids == [1]


def test_injected_statuses(fake_provider: FakeProviderServer, make_message: MessageFactory) -> None:
    fake_provider.faults.extend(
        [
            ("status", 429, {"Retry-After": "3"}),
            ("status", 503),
            ("status", 422, {}, {"ErrorCode": 100, "Message": "Maintenance"}),
        ]
    )
    provider = provider_for(fake_provider)
    for expected_status, retry_after in ((429, 3.0), (503, None), (422, None)):
        with pytest.raises(DeliveryError) as info:
            provider.send_batch([make_message(1)])
        assert (
            info.value.retryable
            and info.value.status == expected_status
            and info.value.retry_after == retry_after
        )
        assert not maybe_delivered(info.value)
    assert fake_provider.messages == []
    assert [r.status for r in provider.send_batch([make_message(1)])] == ["sent"]


def test_connection_refused_is_certain(make_message: MessageFactory) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = PostmarkProvider(
        Delivery(provider="postmark", api_key=TOKEN, base_url=f"http://127.0.0.1:{port}", timeout=2)
    )
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable and not maybe_delivered(info.value)


def test_keep_alive_reuses_one_connection(
    fake_provider: FakeProviderServer, make_message: MessageFactory
) -> None:
    provider = provider_for(fake_provider)
    for i in range(20):
        provider.send_batch([make_message(i + 1)])
    assert fake_provider.connections_opened == 1
    assert len(fake_provider.ledger_ids) == 20


def test_check(fake_provider: FakeProviderServer) -> None:
    assert (
        provider_for(fake_provider).check().startswith("postmark: reached server 'Fake Postmark'")
    )
    with pytest.raises(AuthError):
        provider_for(fake_provider, token="wrong").check()


def test_fake_is_reusable_for_other_providers(fake_provider: FakeProviderServer) -> None:
    def echo(server: FakeProviderServer, request: Request) -> Reply:
        return Reply.of_json(202, {"got": request.json(), "query": request.query})

    fake_provider.route("POST", "/v3/mail/send", echo)
    response = requests.post(f"{fake_provider.url}/v3/mail/send?x=1", json={"a": 1}, timeout=5)
    assert response.status_code == 202 and response.json() == {"got": {"a": 1}, "query": "x=1"}
    assert requests.get(f"{fake_provider.url}/nowhere", timeout=5).status_code == 404


def test_light_mode_counts_without_parsing(make_message: MessageFactory) -> None:
    with FakeProviderServer(token=TOKEN, light=True) as server:
        results = provider_for(server).send_batch([make_message(i) for i in range(1, 101)])
        assert [r.status for r in results] == ["sent"] * 100
        assert server.ledger_ids == list(range(1, 101))
        assert (
            server.messages == [] and server.requests[0].body == b"" and server.requests[0].size > 0
        )


def test_light_mode_answers_partial_faults_in_order(make_message: MessageFactory) -> None:
    with FakeProviderServer(token=TOKEN, light=True) as server:
        server.faults.append(("partial", {1: (406, "inactive")}))
        results = provider_for(server).send_batch([make_message(i) for i in (5, 6, 7)])
        assert [r.status for r in results] == ["sent", "suppressed", "sent"]
        assert server.ledger_ids == [5, 7]
        assert len({r.provider_message_id for r in results if r.status == "sent"}) == 2


def test_light_mode_reads_ledger_ids_however_the_json_is_spaced() -> None:
    # The fast scan looks for the compact form our builder writes; other JSON falls back.
    items: list[dict[str, Any]] = [
        {"To": "a@x.example", "Metadata": {"ledger_id": str(i), "draft_id": "1"}} for i in (3, 1, 2)
    ]
    with FakeProviderServer(token=TOKEN, light=True) as server:
        answer = requests.post(f"{server.url}/email/batch", json=items, timeout=5,
                               headers={"X-Postmark-Server-Token": TOKEN})
        assert answer.status_code == 200 and len(answer.json()) == 3
        assert server.ledger_ids == [3, 1, 2]
    assert postmark_ledger_ids(json.dumps(items, separators=(",", ":")).encode()) == [3, 1, 2]
    # A quote inside a body is escaped, so a body quoting the marker is not a message.
    quoted = json.dumps([{"HtmlBody": '"Metadata":{"ledger_id":"9"}',
                          "Metadata": {"ledger_id": "4"}}], separators=(",", ":"))
    assert postmark_ledger_ids(quoted.encode()) == [4]


@given(st.text(max_size=30))
def test_mailgun_light_mode_reads_addresses_as_parseaddr(value: str) -> None:
    for to in (value, f"{value} <reader@example.com>", f"Reader <{value}@example.com>"):
        assert _mailbox_address(to) == parseaddr(to)[1]


def test_mailgun_light_mode_records_ledger_ids_in_order() -> None:
    from tests.delivery.test_provider_contract import make_recipient, make_template

    with FakeProviderServer(token=TOKEN, light=True) as server:
        install_mailgun(server, "mg.example.org")
        provider = MailgunProvider(Delivery(provider="mailgun", api_key=TOKEN, base_url=server.url,
                                            domain="mg.example.org"))
        recipients = [make_recipient(i, name=name) for i, name in
                      ((12, "Smith, Jo"), (10, "Zoë"), (11, ""))]
        results = provider.send_template_batch(make_template(), recipients)
        assert [r.status for r in results] == ["sent"] * 3
        assert server.ledger_ids == [12, 10, 11] and server.messages == []
