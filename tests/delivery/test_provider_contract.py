"""One contract, every HTTP provider in the registry, against the fake provider server.

For each provider: a batch carries a per-recipient List-Unsubscribe + List-Unsubscribe-Post
pair and the ledger id as the provider's metadata (Metadata, custom_args, v:, EmailTags,
tags); results come back one per message, in order, mapped to the ledger (sent, invalid, and
the provider's own refusals); 401 is an AuthError; 429 and a 5xx the provider answered
itself (500, 503) are retryable (429 with retry_after); a 502 or 504, which a gateway in front
of the provider answers, perhaps after the provider took the batch, is uncertain (retryable,
but only the send ledger may resend it); permanent errors are not retryable;
``delivery.base_url`` is where requests go.
Providers that personalize server-side meet the same contract through send_template_batch.

The outbox writes files and SMTP talks SMTP: they have their own tests, and
test_provider_contract_all.py runs the shared part of this contract over every provider,
them included, each through its real transport. The helpers at the
end (send_in_calls, PartialBatchError, expand_template) are what the multi-call providers
(SES, SMTP, full-body SendGrid and Mailgun) stand on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from digest.config import Delivery
from digest.delivery.providers.base import (
    CallPacer,
    HttpProvider,
    PartialBatchError,
    Provider,
    UncertainDeliveryError,
    call_journal,
    expand_template,
    fill_template,
    maybe_delivered,
    send_in_calls,
)
from digest.delivery.providers.registry import PROVIDERS, build_provider, provider_class
from digest.errors import AuthError, BlockedError, DeliveryError
from digest.types import OutgoingMessage, SendResult, TemplateMessage, TemplateRecipient
from tests.delivery.conftest import MessageFactory
from tests.fakes.provider_server import (
    FakeProviderServer,
    install_mailgun,
    install_resend,
    install_sendgrid,
    install_ses,
)

TOKEN = "contract-token"
DOMAIN = "mg.example.org"
NOT_HTTP = {"outbox", "smtp"}


# -- template helpers (also used by the SendGrid and Mailgun tests) ---------------------------


def make_template(
    *,
    comment: str = "A fine essay.",
    subject: str = "Field Notes Digest: The slow build",
    draft_id: int = 7,
) -> TemplateMessage:
    """A small digest template: name and unsubscribe slots in both parts, ``comment`` as content
    (escaped for the HTML part as the renderer would)."""
    from html import escape

    return TemplateMessage(
        draft_id=draft_id,
        from_addr="Field Notes <digest@news.example.org>",
        subject=subject,
        html_parts=(
            "<html><body><p>Hello ",
            f',</p><blockquote>{escape(comment)}</blockquote><p><a href="',
            '">Unsubscribe</a></p></body></html>',
        ),
        html_slots=("name", "unsubscribe_url"),
        text_parts=("Hello ", f",\n\n> {comment}\n\nUnsubscribe: ", "\n"),
        text_slots=("name", "unsubscribe_url"),
        tag=f"digest-{draft_id}",
    )


def make_recipient(ledger_id: int, name: str = "", email: str | None = None) -> TemplateRecipient:
    """A recipient of :func:`make_template` with escaped HTML values and its RFC 8058 headers."""
    from html import escape

    url = f"https://news.example.org/u/tok{ledger_id:04d}"
    prefs = f"https://news.example.org/preferences/tok{ledger_id:04d}"
    name = name or f"Reader {ledger_id}"
    return TemplateRecipient(
        ledger_id=ledger_id,
        to_email=email or f"reader{ledger_id}@example.com",
        to_name=name,
        # One value per SLOT_NAMES entry: name, unsubscribe URL, preferences URL.
        html_values=(escape(name), escape(url), escape(prefs)),
        text_values=(name, url, prefs),
        headers=(
            ("List-Unsubscribe", f"<{url}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ),
    )


# -- what the contract needs to know about each provider ------------------------------------


@dataclass
class Spec:
    """How to build a provider against the fake, and read what the fake recorded."""

    settings: Callable[[str, str], Delivery]  # (base_url, key) -> settings
    install: Callable[[FakeProviderServer], None]
    path: str  # where a send goes
    headers_of: Callable[[dict[str, Any]], dict[str, str]]
    ledger_of: Callable[[dict[str, Any]], str]
    auth_status: int  # what the fake answers to a wrong key
    permanent: tuple[int, dict[str, str], Any]  # an injected permanent error
    rate_limited_body: Any
    # Arrange for one address to be refused by the provider, and the status it maps to.
    refuse: Callable[[FakeProviderServer, str], str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _postmark_refuse(srv: FakeProviderServer, address: str) -> str:
    srv.inactive.add(address)
    return "suppressed"


def _ses_refuse(srv: FakeProviderServer, address: str) -> str:
    # The sandbox refusing an unverified recipient, as SES words it (naming the reader).
    srv.ses_rejected[address] = ("Email address is not verified. The following identities failed the check "
                                 f"in region US-EAST-1: {address}")
    return "rejected"


SPECS: dict[str, Spec] = {
    "postmark": Spec(
        settings=lambda url, key: Delivery(provider="postmark", api_key=key, base_url=url),
        install=lambda srv: None,
        path="/email/batch",
        headers_of=lambda rec: {h["Name"]: h["Value"] for h in rec["Headers"]},
        ledger_of=lambda rec: rec["Metadata"]["ledger_id"],
        auth_status=401,
        permanent=(422, {}, {"ErrorCode": 300, "Message": "Invalid email request"}),
        rate_limited_body={"ErrorCode": 429, "Message": "Rate limit exceeded"},
        refuse=_postmark_refuse,
    ),
    "sendgrid": Spec(
        settings=lambda url, key: Delivery(provider="sendgrid", api_key=key, base_url=url),
        install=install_sendgrid,
        path="/v3/mail/send",
        headers_of=lambda rec: rec["headers"],
        ledger_of=lambda rec: rec["custom_args"]["ledger_id"],
        auth_status=401,
        permanent=(400, {}, {"errors": [{"message": "Bad Request", "field": None}]}),
        rate_limited_body={"errors": [{"message": "too many requests"}]},
    ),
    "mailgun": Spec(
        settings=lambda url, key: Delivery(
            provider="mailgun", api_key=key, base_url=url, domain=DOMAIN
        ),
        install=lambda srv: install_mailgun(srv, DOMAIN),
        path=f"/v3/{DOMAIN}/messages",
        headers_of=lambda rec: rec["headers"],
        ledger_of=lambda rec: rec["variables"]["ledger_id"],
        auth_status=401,
        permanent=(400, {}, {"message": "'to' parameter is not a valid address"}),
        rate_limited_body={"message": "Too Many Requests"},
    ),
    "ses": Spec(
        settings=lambda url, key: Delivery(
            provider="ses",
            base_url=url,
            region="us-east-1",
            aws_access_key_id="AKIDEXAMPLE",
            aws_secret_access_key=key,
        ),
        install=lambda srv: install_ses(srv, secret_key=TOKEN),
        path="/v2/email/outbound-emails",
        headers_of=lambda rec: rec["headers"],
        ledger_of=lambda rec: rec["tags"]["ledger_id"],
        auth_status=403,
        permanent=(
            400,
            {"x-amzn-ErrorType": "BadRequestException"},
            {"message": "Missing required field"},
        ),
        rate_limited_body={"message": "Too Many Requests"},
        refuse=_ses_refuse,
    ),
    "resend": Spec(
        settings=lambda url, key: Delivery(provider="resend", api_key=key, base_url=url),
        install=install_resend,
        path="/emails/batch",
        headers_of=lambda rec: rec["headers"],
        ledger_of=lambda rec: rec["tags"]["ledger_id"],
        auth_status=403,
        permanent=(422, {}, {"statusCode": 422, "name": "validation_error", "message": "bad"}),
        rate_limited_body={"statusCode": 429, "name": "rate_limit_exceeded", "message": "slow"},
    ),
}

HTTP_PROVIDERS = sorted(set(PROVIDERS) - NOT_HTTP)


def test_every_registered_http_provider_has_a_contract_spec() -> None:
    # A provider added to the registry without a spec here fails this test: add one.
    assert set(HTTP_PROVIDERS) == set(SPECS)
    assert {"postmark", "sendgrid", "mailgun", "ses", "resend", "smtp", "outbox"} <= set(PROVIDERS)


@pytest.fixture(params=HTTP_PROVIDERS)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def srv(name: str) -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=TOKEN) as server:
        SPECS[name].install(server)
        yield server


def provider_for(name: str, srv: FakeProviderServer, key: str = TOKEN) -> Provider:
    settings = SPECS[name].settings(srv.url, key).model_copy(update={"timeout": 5.0})
    return build_provider(settings)


def _one_click(headers: dict[str, str]) -> tuple[str, str]:
    return headers["List-Unsubscribe"], headers["List-Unsubscribe-Post"]


# -- the contract ---------------------------------------------------------------------------


def test_batch_carries_one_click_headers_and_ledger_ids(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    spec = SPECS[name]
    messages = [make_message(i) for i in (21, 22, 23)]
    with provider_for(name, srv) as provider:
        results = provider.send_batch(messages)
    assert [(r.ledger_id, r.status) for r in results] == [(21, "sent"), (22, "sent"), (23, "sent")]
    assert all(r.provider_message_id for r in results)
    assert sorted(srv.ledger_ids) == [21, 22, 23]
    by_ledger = {spec.ledger_of(rec): rec for rec in srv.messages}
    assert set(by_ledger) == {"21", "22", "23"}
    for i in (21, 22, 23):
        assert _one_click(spec.headers_of(by_ledger[str(i)])) == (
            f"<https://news.example.org/u/tok{i:04d}>",
            "List-Unsubscribe=One-Click",
        )


def test_results_map_to_the_ledger(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    spec = SPECS[name]
    expected = ["sent", "invalid", "sent"]
    messages = [make_message(31), make_message(32, to_email="not an address"), make_message(33)]
    if spec.refuse is not None:
        expected.append(spec.refuse(srv, "gone@example.com"))
        messages.append(make_message(34, to_email="gone@example.com"))
    results = provider_for(name, srv).send_batch(messages)
    assert [r.ledger_id for r in results] == [m.ledger_id for m in messages]
    assert [r.status for r in results] == expected
    assert sorted(srv.ledger_ids) == [31, 33]
    assert results[1].error and "not a single email address" in results[1].error


def test_wrong_key_is_an_auth_error(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    with pytest.raises(AuthError) as info:
        provider_for(name, srv, key="wrong-key").send_batch([make_message(1)])
    assert info.value.status == SPECS[name].auth_status
    assert not info.value.retryable
    assert srv.messages == [] and srv.ledger_ids == []


def test_401_is_an_auth_error(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.append(("status", 401, {}, {"message": "Unauthorized"}))
    with pytest.raises(AuthError):
        provider_for(name, srv).send_batch([make_message(1)])


def test_429_is_retryable_with_retry_after(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.append(("status", 429, {"Retry-After": "7"}, SPECS[name].rate_limited_body))
    with pytest.raises(DeliveryError) as info:
        provider_for(name, srv).send_batch([make_message(1)])
    assert info.value.retryable and info.value.status == 429
    assert info.value.retry_after == 7
    assert not isinstance(info.value, AuthError) and not maybe_delivered(info.value)


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_retryable(
    name: str, srv: FakeProviderServer, make_message: MessageFactory, status: int
) -> None:
    # The provider itself answered that the call failed: nothing was taken, send it again.
    srv.faults.append(("status", status, {}, {"message": "oops"}))
    with pytest.raises(DeliveryError) as info:
        provider_for(name, srv).send_batch([make_message(1)])
    assert info.value.retryable and info.value.status == status
    assert not maybe_delivered(info.value)


def gateway_error_of(err: DeliveryError) -> DeliveryError:
    """The error of the call a gateway answered: ``err`` itself, or for a batch sent as
    several calls (SES, full-body SendGrid and Mailgun) the call's error behind the
    PartialBatchError."""
    if isinstance(err, PartialBatchError):
        assert isinstance(err.__cause__, DeliveryError)
        return err.__cause__
    return err


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateway_5xx_after_the_request_went_out_is_uncertain(
    name: str, srv: FakeProviderServer, make_message: MessageFactory, status: int
) -> None:
    """A proxy or load balancer in front of the provider answers 502/504 after it passed the
    request on: here the provider did take the messages. Sending the batch again would give
    every reader a second copy (no idempotency key but Resend's), so the answer is uncertain,
    still retryable (for a provider that dedupes), with the status and Retry-After kept."""
    srv.faults.append(("gateway", status, {"Retry-After": "4"}))
    with pytest.raises(DeliveryError) as info:
        provider_for(name, srv).send_batch([make_message(1), make_message(2)])
    err = info.value
    assert maybe_delivered(err) and not isinstance(err, AuthError)
    if isinstance(err, PartialBatchError):
        # One call per message (SES; SendGrid and Mailgun with full bodies): the first call was
        # answered so, and the second never started.
        assert srv.ledger_ids == [1]
        assert err.uncertain == (1,) and [(r.ledger_id, r.status) for r in err.results] == [(2, "deferred")]
    else:
        assert sorted(srv.ledger_ids) == [1, 2]  # the provider took them
    call = gateway_error_of(err)
    assert isinstance(call, UncertainDeliveryError)
    assert call.retryable and call.status == status and call.retry_after == 4
    assert "gateway" in str(call) and "may have accepted" in str(call)


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateway_5xx_that_never_reached_the_provider_is_uncertain_too(
    name: str, srv: FakeProviderServer, make_message: MessageFactory, status: int
) -> None:
    # The client cannot tell this gateway from the one above: same answer, nothing resent.
    srv.faults.append(("status", status))
    with pytest.raises(DeliveryError) as info:
        provider_for(name, srv).send_batch([make_message(1)])
    assert srv.ledger_ids == []
    assert maybe_delivered(info.value)
    assert gateway_error_of(info.value).status == status


def test_permanent_error_is_not_retryable(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    status, headers, body = SPECS[name].permanent
    srv.faults.append(("status", status, headers, body))
    with pytest.raises(DeliveryError) as info:
        provider_for(name, srv).send_batch([make_message(1)])
    assert not info.value.retryable and not isinstance(info.value, AuthError)
    assert info.value.status == status


def test_base_url_is_honoured(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    provider = provider_for(name, srv)
    assert isinstance(provider, HttpProvider)
    assert provider.base_url == srv.url
    provider.send_batch([make_message(1)])
    assert [(r.method, r.path) for r in srv.requests] == [("POST", SPECS[name].path)]
    # Without base_url, the provider's own API host.
    default = build_provider(SPECS[name].settings("", TOKEN).model_copy(update={"base_url": None}))
    assert isinstance(default, HttpProvider)
    assert default.base_url.startswith("https://") and "127.0.0.1" not in default.base_url


def test_check_reaches_the_provider_without_sending(name: str, srv: FakeProviderServer) -> None:
    line = provider_for(name, srv).check()
    assert line.startswith(f"{name}: ")
    assert srv.messages == [] and all(r.method == "GET" for r in srv.requests)


# Each API's documented limit on one call (shared/reference/APIS.md): Postmark's batch
# endpoint 500 messages, SendGrid 1000 personalizations, Mailgun 1000 recipients, Resend's
# batch 100 emails; SES sends one message per call here, and a batch is 50 of them.
DOCUMENTED_LIMITS = {"postmark": 500, "sendgrid": 1000, "mailgun": 1000, "resend": 100, "ses": 50}


def test_batches_are_the_size_each_api_documents(name: str) -> None:
    assert provider_class(name).max_batch == DOCUMENTED_LIMITS[name]


def test_batch_limit_is_enforced(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    provider = provider_for(name, srv)
    limit = DOCUMENTED_LIMITS[name]
    with pytest.raises(ValueError, match="the limit is"):
        provider.send_batch([make_message(i) for i in range(1, limit + 2)])
    assert srv.requests == []


def test_a_full_batch_goes_in_as_few_calls_as_the_api_allows(
    name: str, srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    """A batch of the documented size is one call (the fake refuses a call over the real
    limit), through server-side personalization where the provider has it; SES's is one call
    per message."""
    limit = DOCUMENTED_LIMITS[name]
    with provider_for(name, srv) as provider:
        if provider.personalizes:
            results = provider.send_template_batch(make_template(), [make_recipient(i) for i in range(1, limit + 1)])
        else:
            results = provider.send_batch([make_message(i) for i in range(1, limit + 1)])
    assert [r.status for r in results] == ["sent"] * limit
    assert sorted(srv.ledger_ids) == list(range(1, limit + 1))
    assert len([r for r in srv.requests if r.method == "POST"]) == (limit if name == "ses" else 1)


# -- the same contract through server-side personalization ---------------------------------


PERSONALIZING = [n for n in HTTP_PROVIDERS if provider_class(n).personalizes]


def test_personalizing_providers_are_the_expected_ones() -> None:
    assert PERSONALIZING == ["mailgun", "sendgrid"]
    assert [n for n in sorted(PROVIDERS) if provider_class(n).idempotent] == ["resend"]


# Variants a setting opts into, with the registry's name of their provider. Postmark with
# delivery.postmark_templates creates a server template before its first batch.
TEMPLATE_SPECS: dict[str, Spec] = {
    **{n: SPECS[n] for n in PERSONALIZING},
    "postmark-templates": Spec(
        settings=lambda url, key: Delivery(provider="postmark", api_key=key, base_url=url,
                                           postmark_templates=True),
        install=lambda srv: None,
        path="/email/batchWithTemplates",
        headers_of=SPECS["postmark"].headers_of,
        ledger_of=SPECS["postmark"].ledger_of,
        auth_status=401,
        permanent=SPECS["postmark"].permanent,
        rate_limited_body=SPECS["postmark"].rate_limited_body,
    ),
}


@pytest.mark.parametrize("pname", sorted(TEMPLATE_SPECS))
def test_template_batch_meets_the_contract(pname: str) -> None:
    spec = TEMPLATE_SPECS[pname]
    with FakeProviderServer(token=TOKEN) as server:
        spec.install(server)
        provider = build_provider(spec.settings(server.url, TOKEN).model_copy(update={"timeout": 5.0}))
        assert provider.personalizes
        template = make_template()
        recipients = [make_recipient(41), make_recipient(42, email="broken"), make_recipient(43)]
        results = provider.send_template_batch(template, recipients)
        assert [(r.ledger_id, r.status) for r in results] == [
            (41, "sent"),
            (42, "invalid"),
            (43, "sent"),
        ]
        # One call for the whole batch (Postmark's template creation aside, once per draft).
        assert [r.path for r in server.requests if r.path != "/templates"] == [spec.path]
        by_ledger = {spec.ledger_of(rec): rec for rec in server.messages}
        for r in (recipients[0], recipients[2]):
            got = by_ledger[str(r.ledger_id)]
            assert _one_click(spec.headers_of(got)) == (
                dict(r.headers)["List-Unsubscribe"],
                "List-Unsubscribe=One-Click",
            )
            assert got["html"] == expand_template(template, r).html
            assert got["text"] == expand_template(template, r).text

        for status, retryable in ((429, True), (503, True), (400, False)):
            server.faults.append(("status", status, {"Retry-After": "3"}, {"message": "x"}))
            with pytest.raises(DeliveryError) as info:
                provider.send_template_batch(template, recipients[:1])
            assert info.value.retryable is retryable and not maybe_delivered(info.value)
        for status in (502, 504):  # a gateway answered, after the provider took the batch
            server.faults.append(("gateway", status))
            with pytest.raises(UncertainDeliveryError) as uncertain:
                provider.send_template_batch(template, recipients[:1])
            assert uncertain.value.retryable and uncertain.value.status == status
        server.faults.append(("status", 401, {}, {"message": "no"}))
        with pytest.raises(AuthError):
            provider.send_template_batch(template, recipients[:1])


def test_non_personalizing_providers_refuse_templates(tmp_path: Any) -> None:
    provider = build_provider(Delivery(provider="outbox", outbox_dir=str(tmp_path)))
    assert not provider.personalizes
    with pytest.raises(NotImplementedError):
        provider.send_template_batch(make_template(), [make_recipient(1)])


# -- helpers the multi-call providers stand on ----------------------------------------------


def _msgs(make_message: MessageFactory, n: int) -> list[OutgoingMessage]:
    return [make_message(i) for i in range(1, n + 1)]


def test_send_in_calls_returns_every_result(make_message: MessageFactory) -> None:
    calls = [[m] for m in _msgs(make_message, 5)]
    results = send_in_calls("t", calls, lambda ms: [SendResult(ms[0].ledger_id, "sent", "x")])
    assert [r.ledger_id for r in results] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "error",
    [
        DeliveryError("429", retryable=True, status=429, retry_after=2),
        AuthError("no", status=401),
        BlockedError("account suspended", status=400),
    ],
)
def test_send_in_calls_raises_when_nothing_was_accepted(
    make_message: MessageFactory, error: DeliveryError
) -> None:
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        if ms[0].ledger_id == 1:
            return [SendResult(1, "rejected", None, "refused")]  # refused: nothing delivered
        raise error

    tried: list[int] = []

    def tracking(ms: list[OutgoingMessage]) -> list[SendResult]:
        tried.append(ms[0].ledger_id)
        return send(ms)

    with pytest.raises(DeliveryError) as info:
        send_in_calls("t", [[m] for m in _msgs(make_message, 4)], tracking)
    assert info.value is error
    assert tried == [1, 2]  # no new call after the first error


def test_send_in_calls_keeps_accepted_messages_after_a_retryable_error(
    make_message: MessageFactory,
) -> None:
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        if ms[0].ledger_id == 3:
            raise DeliveryError("HTTP 429", retryable=True, status=429)
        return [SendResult(ms[0].ledger_id, "sent", "id")]

    results = send_in_calls("t", [[m] for m in _msgs(make_message, 5)], send)
    assert [(r.ledger_id, r.status) for r in results] == [
        (1, "sent"),
        (2, "sent"),
        (3, "deferred"),
        (4, "deferred"),
        (5, "deferred"),
    ]
    assert all("not sent" in (r.error or "") and "429" in (r.error or "") for r in results[2:])


def test_send_in_calls_reports_uncertain_calls_apart(make_message: MessageFactory) -> None:
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        if ms[0].ledger_id == 2:
            raise UncertainDeliveryError("read timeout", retryable=True)
        return [SendResult(ms[0].ledger_id, "sent", "id")]

    with pytest.raises(PartialBatchError) as info:
        send_in_calls("t", [[m] for m in _msgs(make_message, 4)], send)
    err = info.value
    assert maybe_delivered(err) and isinstance(err, UncertainDeliveryError)
    assert err.uncertain == (2,)
    assert [(r.ledger_id, r.status) for r in err.results] == [
        (1, "sent"),
        (3, "deferred"),
        (4, "deferred"),
    ]


# A call the provider refused for good: SES's 400 for that one message.
def _refused(ledger_id: int) -> DeliveryError:
    return DeliveryError(f"ses: HTTP 400 BadRequestException: bad message {ledger_id}", retryable=False, status=400)


@pytest.mark.parametrize("concurrency", [1, 3])
@pytest.mark.parametrize("bad", [1, 3])
def test_send_in_calls_fails_only_the_call_refused_for_good_and_goes_on(
    make_message: MessageFactory, bad: int, concurrency: int
) -> None:
    """A permanent error about one call's message fails that message, worded as the sender
    words a failed batch, and every other call still runs: also when it is the batch's first
    call, before anything was accepted."""
    tried: list[int] = []

    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        tried.append(ms[0].ledger_id)
        if ms[0].ledger_id == bad:
            raise _refused(bad)
        return [SendResult(ms[0].ledger_id, "sent", "id")]

    results = send_in_calls("t", [[m] for m in _msgs(make_message, 5)], send, concurrency=concurrency)
    assert sorted(tried) == [1, 2, 3, 4, 5]
    assert [(r.ledger_id, r.status) for r in results] == [
        (i, "failed" if i == bad else "sent") for i in range(1, 6)]
    assert results[bad - 1].error == str(_refused(bad))


@pytest.mark.parametrize("concurrency", [1, 3])
def test_send_in_calls_raises_the_first_error_when_every_call_was_refused_for_good(
    make_message: MessageFactory, concurrency: int
) -> None:
    """Every call refused (a setting the provider rejects, whoever the reader): the batch
    fails as a whole, as for one call, so the sender counts it toward its pause; each call
    was tried and the journal has each message's own verdict."""
    errors = {i: _refused(i) for i in range(1, 5)}
    tried: list[int] = []

    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        tried.append(ms[0].ledger_id)
        if ms[0].ledger_id == 2:
            return [SendResult(2, "rejected", None, "refused")]  # refused too: nobody accepted
        raise errors[ms[0].ledger_id]

    journal = _Journal()
    token = call_journal.set(journal)
    try:
        with pytest.raises(DeliveryError) as info:
            send_in_calls("t", [[m] for m in _msgs(make_message, 4)], send, concurrency=concurrency)
    finally:
        call_journal.reset(token)
    assert info.value is errors[1]  # the first call's, whichever answered first
    assert sorted(tried) == [1, 2, 3, 4]
    done = sorted(r for kind, rs in journal.events if kind == "done" for r in rs)
    assert done == [(1, "failed"), (2, "rejected"), (3, "failed"), (4, "failed")]


def test_send_in_calls_returns_refused_and_deferred_messages_when_nothing_else_failed(
    make_message: MessageFactory,
) -> None:
    """Nothing accepted, but a message the provider will take later: the results come back
    (that one goes back to the queue), not an error that would fail it."""
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        if ms[0].ledger_id == 1:
            raise _refused(1)
        return [SendResult(ms[0].ledger_id, "deferred", None, "greylisted")]

    results = send_in_calls("t", [[m] for m in _msgs(make_message, 3)], send)
    assert [(r.ledger_id, r.status) for r in results] == [(1, "failed"), (2, "deferred"), (3, "deferred")]


def test_send_in_calls_raises_the_error_that_stopped_it_not_an_earlier_refusal(
    make_message: MessageFactory,
) -> None:
    """A refusal for good, then a 429 with nothing accepted: the 429 is raised (the sender
    retries the batch, or puts it back), never the refusal, which would fail the whole batch;
    the refused message keeps its verdict in the journal."""
    throttled = DeliveryError("HTTP 429", retryable=True, status=429)
    tried: list[int] = []

    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        tried.append(ms[0].ledger_id)
        if ms[0].ledger_id == 1:
            raise _refused(1)
        raise throttled

    journal = _Journal()
    token = call_journal.set(journal)
    try:
        with pytest.raises(DeliveryError) as info:
            send_in_calls("t", [[m] for m in _msgs(make_message, 4)], send)
    finally:
        call_journal.reset(token)
    assert info.value is throttled and tried == [1, 2]  # no new call after the 429
    assert journal.events == [("start", [1]), ("done", [(1, "failed")]), ("start", [2]), ("done", [(2, "deferred")])]


def test_send_in_calls_keeps_a_refusal_for_good_among_partial_results(make_message: MessageFactory) -> None:
    """Refused for good, accepted, then a 503 and a timeout: the refused message is failed,
    the timed-out one uncertain, the one after the 503 not sent."""
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        i = ms[0].ledger_id
        if i == 1:
            raise _refused(1)
        if i == 3:
            raise UncertainDeliveryError("read timeout", retryable=True)
        return [SendResult(i, "sent", "id")]

    with pytest.raises(PartialBatchError) as info:
        send_in_calls("t", [[m] for m in _msgs(make_message, 4)], send)
    assert info.value.uncertain == (3,)
    assert [(r.ledger_id, r.status) for r in info.value.results] == [(1, "failed"), (2, "sent"), (4, "deferred")]

    def after_503(ms: list[OutgoingMessage]) -> list[SendResult]:
        i = ms[0].ledger_id
        if i == 1:
            raise _refused(1)
        if i == 3:
            raise DeliveryError("HTTP 503", retryable=True, status=503)
        return [SendResult(i, "sent", "id")]

    results = send_in_calls("t", [[m] for m in _msgs(make_message, 4)], after_503)
    assert [(r.ledger_id, r.status) for r in results] == [(1, "failed"), (2, "sent"), (3, "deferred"),
                                                          (4, "deferred")]


class _Journal:
    """Records what send_in_calls tells the batch's journal, in order."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.fail_at = fail_at
        self.answered: dict[int, Any] = {}  # an earlier attempt's verdicts: none here

    def starting(self, ledger_ids: Any) -> None:
        if ledger_ids[0] == self.fail_at:
            raise RuntimeError("the ledger is gone")
        self.events.append(("start", list(ledger_ids)))

    def finished(self, results: Any) -> None:
        self.events.append(("done", [(r.ledger_id, r.status) for r in results]))


def test_send_in_calls_tells_the_journal_of_each_call_before_and_after(make_message: MessageFactory) -> None:
    """Each call is announced before it starts and reported once answered; a call that
    certainly sent nothing is reported deferred, one that may have gone out is not reported
    (it stays in flight until the batch's verdict), and calls never started are not announced."""
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        if ms[0].ledger_id == 2:
            return [SendResult(2, "rejected", None, "refused")]
        if ms[0].ledger_id == 3:
            raise UncertainDeliveryError("read timeout", retryable=True)
        return [SendResult(ms[0].ledger_id, "sent", "id")]

    journal = _Journal()
    token = call_journal.set(journal)
    try:
        with pytest.raises(PartialBatchError):
            send_in_calls("t", [[m] for m in _msgs(make_message, 5)], send)
    finally:
        call_journal.reset(token)
    assert journal.events == [("start", [1]), ("done", [(1, "sent")]), ("start", [2]), ("done", [(2, "rejected")]),
                              ("start", [3])]

    def refused(ms: list[OutgoingMessage]) -> list[SendResult]:
        raise DeliveryError("HTTP 429", retryable=True, status=429)

    journal = _Journal()
    token = call_journal.set(journal)
    try:
        with pytest.raises(DeliveryError):
            send_in_calls("t", [[m] for m in _msgs(make_message, 3)], refused)
    finally:
        call_journal.reset(token)
    assert journal.events[0] == ("start", [1])
    assert journal.events[1][0] == "done" and journal.events[1][1] == [(1, "deferred")]
    assert len(journal.events) == 2


def test_a_call_whose_record_was_written_while_another_failed_does_not_start(make_message: MessageFactory) -> None:
    """Two calls at once: the second one's record is written while the first meets a 429. The
    batch stops at the first error, so the second does not go out after its record, and it is
    reported as not sent."""
    import threading

    recording, failed = threading.Event(), threading.Event()
    sent: list[int] = []

    class Slow(_Journal):
        def starting(self, ledger_ids: Any) -> None:
            super().starting(ledger_ids)
            if ledger_ids[0] == 2:
                recording.set()
                assert failed.wait(5)  # still writing when the other call fails

    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        sent.append(ms[0].ledger_id)
        assert recording.wait(5)
        failed.set()
        raise DeliveryError("HTTP 429", retryable=True, status=429)

    journal = Slow()
    token = call_journal.set(journal)
    try:
        with pytest.raises(DeliveryError, match="429"):
            send_in_calls("t", [[m] for m in _msgs(make_message, 2)], send, concurrency=2)
    finally:
        call_journal.reset(token)
    assert sent == [1]
    assert ("done", [(2, "deferred")]) in journal.events


def test_send_in_calls_makes_no_call_the_journal_could_not_record(make_message: MessageFactory) -> None:
    """A call starts only once recorded: when the ledger fails, the batch stops there."""
    sent: list[int] = []

    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        sent.append(ms[0].ledger_id)
        return [SendResult(ms[0].ledger_id, "sent", "id")]

    for concurrency in (1, 3):
        sent.clear()
        token = call_journal.set(_Journal(fail_at=2))
        try:
            with pytest.raises(RuntimeError, match="the ledger is gone"):
                send_in_calls("t", [[m] for m in _msgs(make_message, 4)], send, concurrency=concurrency)
        finally:
            call_journal.reset(token)
        assert 2 not in sent and (concurrency > 1 or sent == [1])


def test_send_in_calls_uncertain_first_call_is_still_partial(make_message: MessageFactory) -> None:
    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        raise UncertainDeliveryError("reset", retryable=True)

    with pytest.raises(PartialBatchError) as info:
        send_in_calls("t", [[m] for m in _msgs(make_message, 3)], send)
    assert info.value.uncertain == (1,)
    assert [r.status for r in info.value.results] == ["deferred", "deferred"]


def test_send_in_calls_in_parallel_stops_starting_calls(make_message: MessageFactory) -> None:
    import threading
    import time

    started: list[int] = []
    lock = threading.Lock()

    def send(ms: list[OutgoingMessage]) -> list[SendResult]:
        with lock:
            started.append(ms[0].ledger_id)
        if ms[0].ledger_id == 1:
            time.sleep(0.1)  # the others get going (and some finish) before this one fails
            raise DeliveryError("HTTP 503", retryable=True, status=503)
        time.sleep(0.03)
        return [SendResult(ms[0].ledger_id, "sent", "id")]

    results = send_in_calls("t", [[m] for m in _msgs(make_message, 40)], send, concurrency=4)
    assert len(started) < 40  # calls stopped starting after the error
    assert {r.ledger_id for r in results} == set(range(1, 41))
    assert all(
        r.status == ("sent" if r.ledger_id in set(started) - {1} else "deferred") for r in results
    )


def test_call_pacer_spaces_calls() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)

    pacer = CallPacer(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        pacer.wait()
    assert slept == [0.25, 0.5]
    CallPacer(None).wait()  # no rate: no wait


def test_expand_template_fills_every_slot() -> None:
    template = make_template(comment="5 < 6 & -name- {{name}} %recipient.name%")
    recipient = make_recipient(9, name="Ann & Bo")
    msg = expand_template(template, recipient)
    assert msg.html.startswith("<html><body><p>Hello Ann &amp; Bo,</p>")
    assert "5 &lt; 6 &amp; -name- {{name}} %recipient.name%" in msg.html
    assert msg.text.startswith("Hello Ann & Bo,\n\n> 5 < 6 & -name- {{name}} %recipient.name%")
    assert (msg.ledger_id, msg.draft_id, msg.tag) == (9, 7, "digest-7")
    assert dict(msg.headers)["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    with pytest.raises(ValueError, match="no value for slot"):
        fill_template(("a", "b"), ("name",), {})


def test_light_mode_records_ledger_ids(name: str, make_message: MessageFactory) -> None:
    """Benchmarks run the fake in light mode: it must still count every accepted message."""
    with FakeProviderServer(token=TOKEN, light=True) as server:
        SPECS[name].install(server)
        results = provider_for(name, server).send_batch([make_message(i) for i in (1, 2, 3)])
        assert [r.status for r in results] == ["sent"] * 3
        assert sorted(server.ledger_ids) == [1, 2, 3]
        assert server.messages == []


@pytest.mark.parametrize("server_side", ["sendgrid", "mailgun"])
def test_light_mode_records_a_template_batch(server_side: str) -> None:
    """Benchmarks send template batches to the light fake, which takes their ledger ids
    without parsing the request (Mailgun: checking their number against the ``to`` fields)."""
    with FakeProviderServer(token=TOKEN, light=True) as server:
        SPECS[server_side].install(server)
        provider = provider_for(server_side, server)
        results = provider.send_template_batch(make_template(), [make_recipient(i) for i in (4, 5, 6)])
        assert [r.status for r in results] == ["sent"] * 3
        assert sorted(server.ledger_ids) == [4, 5, 6]
        assert server.messages == []
