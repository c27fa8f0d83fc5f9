"""SesProvider: SigV4 against AWS's published vectors, the request, the answers, the fake."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from digest.config import Delivery
from digest.delivery.providers.base import PartialBatchError, UncertainDeliveryError
from digest.delivery.providers.ses import (
    SesProvider,
    canonical_request,
    error_type,
    sigv4_headers,
)
from digest.errors import AuthError, BlockedError, DeliveryError
from tests.delivery.conftest import MessageFactory
from tests.fakes.provider_server import FakeProviderServer, Reply, install_ses

DATA = Path(__file__).resolve().parents[1] / "data" / "ses"
SECRET = "ses-test-secret"

# The AWS Signature Version 4 test suite (docs.aws.amazon.com/general/latest/gr/
# signature-v4-test-suite.html, reproduced in many SDKs' tests): these credentials, this
# instant, region us-east-1, service "service".
SUITE_KEY = "AKIDEXAMPLE"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_NOW = datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC)


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


def sign(
    method: str, url: str, headers: dict[str, str], body: bytes, token: str | None = None
) -> dict[str, str]:
    return sigv4_headers(
        method,
        url,
        headers,
        body,
        "us-east-1",
        "service",
        SUITE_KEY,
        SUITE_SECRET,
        token,
        now=SUITE_NOW,
    )


# -- SigV4 ----------------------------------------------------------------------------------


def test_sigv4_get_vanilla() -> None:
    headers = sign("GET", "https://example.amazonaws.com/", {}, b"")
    assert headers == {
        "Host": "example.amazonaws.com",
        "X-Amz-Date": "20150830T123600Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
        "aws4_request, SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    }


def test_sigv4_post_x_www_form_urlencoded() -> None:
    headers = sign(
        "POST",
        "https://example.amazonaws.com/",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"Param1=value1",
    )
    assert headers["Authorization"].endswith(
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
    )
    canonical, signed = canonical_request(
        "POST",
        "https://example.amazonaws.com/",
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "Host": "example.amazonaws.com",
            "X-Amz-Date": "20150830T123600Z",
        },
        b"Param1=value1",
    )
    assert canonical == (
        "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n"
        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
    )
    assert signed == "content-type;host;x-amz-date"


def test_sigv4_get_utf8_canonical_request() -> None:
    # Suite case get-utf8: the string to sign ends with this hash of the canonical request.
    canonical, _ = canonical_request(
        "GET",
        "https://example.amazonaws.com/\u1234",
        {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"},
        b"",
    )
    assert canonical.split("\n")[1] == "/%E1%88%B4"
    assert hashlib.sha256(canonical.encode()).hexdigest() == (
        "2a0a97d02205e45ce2e994789806b19270cfbbb0921b278ccf58f5249ac42102"
    )


def test_sigv4_query_and_header_normalization() -> None:
    canonical, signed = canonical_request(
        "GET",
        "https://example.amazonaws.com/?b=2&a=x%20y&a=1",
        {
            "Host": "example.amazonaws.com",
            "X-Amz-Date": "20150830T123600Z",
            "My-Header": "  a   b  ",
        },
        b"",
    )
    lines = canonical.split("\n")
    assert lines[2] == "a=1&a=x%20y&b=2"
    assert "my-header:a b" in lines
    assert signed == "host;my-header;x-amz-date"


def test_sigv4_signs_the_session_token_and_default_ports() -> None:
    headers = sign("GET", "https://example.amazonaws.com:443/", {}, b"", token="tok/en")
    assert headers["Host"] == "example.amazonaws.com"
    assert headers["X-Amz-Security-Token"] == "tok/en"
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in headers["Authorization"]
    assert sign("GET", "http://127.0.0.1:8025/", {}, b"")["Host"] == "127.0.0.1:8025"


# -- building -------------------------------------------------------------------------------


def settings(**overrides: object) -> Delivery:
    values: dict[str, object] = {
        "provider": "ses",
        "region": "eu-west-1",
        "aws_access_key_id": "AKIDTEST",
        "aws_secret_access_key": SECRET,
    }
    values.update(overrides)
    return Delivery(**values)  # type: ignore[arg-type]


@pytest.fixture
def provider() -> SesProvider:
    return SesProvider(settings(configuration_set="digest-events"))


def test_default_endpoint_is_regional(provider: SesProvider) -> None:
    assert provider.send_url == "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails"


def test_config_needs_region_and_keys() -> None:
    with pytest.raises(ValueError, match="needs delivery.region"):
        Delivery(provider="ses", aws_access_key_id="a", aws_secret_access_key="b")
    with pytest.raises(ValueError, match="not an AWS region"):
        Delivery(provider="ses", region="Ireland", aws_access_key_id="a", aws_secret_access_key="b")
    with pytest.raises(ValueError, match="aws_access_key_id"):
        Delivery(provider="ses", region="eu-west-1")


def test_request_shape(provider: SesProvider, make_message: MessageFactory) -> None:
    msg = make_message(5, reply_to="Editors <editors@news.example.org>", tag="digest 7!")
    call = provider.build_request([msg])
    assert call.headers == {"Content-Type": "application/json"}  # signed at send time
    data = json.loads(call.body)
    assert data["FromEmailAddress"] == "Field Notes <digest@news.example.org>"
    assert data["Destination"] == {"ToAddresses": ["Reader 5 <reader5@example.com>"]}
    assert data["ReplyToAddresses"] == ["Editors <editors@news.example.org>"]
    simple = data["Content"]["Simple"]
    assert simple["Subject"] == {"Data": msg.subject, "Charset": "UTF-8"}
    assert simple["Body"]["Html"]["Data"] == msg.html and simple["Body"]["Text"]["Data"] == msg.text
    assert simple["Headers"] == [
        {"Name": "List-Unsubscribe", "Value": "<https://news.example.org/u/tok0005>"},
        {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"},
    ]
    assert data["EmailTags"] == [
        {"Name": "ledger_id", "Value": "5"},
        {"Name": "draft_id", "Value": "7"},
        {"Name": "tag", "Value": "digest_7_"},  # tag values: letters, digits, _ and - only
    ]
    assert data["ConfigurationSetName"] == "digest-events"


def test_invalid_address_is_refused_without_a_call(
    provider: SesProvider, make_message: MessageFactory
) -> None:
    call = provider.build_request([make_message(1, to_email="nobody")])
    assert call.messages == () and call.refused[0].status == "invalid"


# -- answers ----------------------------------------------------------------------------------


def err(kind: str) -> dict[str, str]:
    return {"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazonaws.sesv2/"}


def test_error_type_from_header_or_body() -> None:
    assert error_type({"x-amzn-errortype": "MessageRejected:http://x/"}, b'{"message":"m"}') == (
        "MessageRejected",
        "m",
    )
    assert error_type({}, b'{"__type":"com.amazon#TooManyRequestsException","Message":"t"}') == (
        "TooManyRequestsException",
        "t",
    )
    assert error_type({}, b"not json") == ("", "")


def test_sent(provider: SesProvider, make_message: MessageFactory) -> None:
    (result,) = provider.handle_response(200, {}, payload("send_ok.json"), [make_message(1)])
    assert result.status == "sent"
    assert (
        result.provider_message_id == "010001930f1e7c3a-6b1d1c2e-0f4a-4d8e-9c11-2a7b3c4d5e6f-000000"
    )


@pytest.mark.parametrize(
    ("kind", "file"),
    [
        ("MessageRejected", "error_message_rejected.json"),
    ],
)
def test_per_message_refusals_are_rejected(
    provider: SesProvider, make_message: MessageFactory, kind: str, file: str
) -> None:
    (result,) = provider.handle_response(400, err(kind), payload(file), [make_message(2)])
    assert (result.ledger_id, result.status) == (2, "rejected")
    assert result.error and result.error.startswith(f"SES {kind}: ")


NOT_VERIFIED = "Email address is not verified. The following identities failed the check in region EU-WEST-1: "


@pytest.mark.parametrize(
    "named",
    [
        "digest@news.example.org",  # the From address
        "Field Notes <DIGEST@News.Example.org>, digest@news.example.org",  # as SES often lists it
        "news.example.org",  # its domain
        "reader2@example.com, digest@news.example.org",  # the sandbox: both unverified
        "",  # no identity named (an older wording): cannot be told from the From's refusal
    ],
)
def test_an_unverified_from_stops_the_send_instead_of_rejecting_the_reader(
    provider: SesProvider, make_message: MessageFactory, named: str
) -> None:
    text = NOT_VERIFIED + named if named else "Email address is not verified."
    with pytest.raises(BlockedError) as info:
        provider.handle_response(400, err("MessageRejected"), json.dumps({"message": text}).encode(),
                                 [make_message(2)])
    assert "not verified" in str(info.value) and info.value.status == 400
    assert info.value.hint and "newsletter.from" in info.value.hint and "eu-west-1" in info.value.hint
    assert "delivery.region" in info.value.hint


@pytest.mark.parametrize(
    "named",
    [
        "reader2@example.com",
        "Reader 2 <reader2@example.com>, reader2@example.com",
        # the reader's address at the From's domain is still the reader's own refusal
        "reader2@news.example.org",
        "reader2@example.com, digest@news.exa...",  # cut by SES: what is shown names the reader
    ],
)
def test_an_unverified_recipient_in_the_sandbox_is_that_readers_rejection(
    provider: SesProvider, make_message: MessageFactory, named: str
) -> None:
    msg = make_message(2, to_email=named.split(",")[0].strip().rpartition("<")[2].rstrip(">"))
    (result,) = provider.handle_response(
        400, err("MessageRejected"), json.dumps({"message": NOT_VERIFIED + named}).encode(), [msg])
    assert (result.ledger_id, result.status) == (2, "rejected")


@pytest.mark.parametrize(
    ("status", "kind", "file", "retryable", "hint"),
    [
        (429, "TooManyRequestsException", "error_throttled.json", True, None),
        (400, "ThrottlingException", "error_throttled.json", True, None),
        (400, "ThrottlingException", "error_daily_quota.json", False, "quota"),
        (429, "TooManyRequestsException", "error_daily_quota.json", False, "quota"),
        (400, "AccountSuspendedException", "error_account_suspended.json", False, "SES console"),
        (400, "SendingPausedException", "error_sending_paused.json", False, "paused"),
        (400, "BadRequestException", "error_bad_request.json", False, None),
        (404, "NotFoundException", "error_bad_request.json", False, "configuration_set"),
        (400, "MailFromDomainNotVerifiedException", "error_mail_from_not_verified.json", False, "MAIL FROM"),
        (500, "InternalServiceErrorException", "error_bad_request.json", True, None),
    ],
)
def test_whole_call_errors(
    provider: SesProvider,
    make_message: MessageFactory,
    status: int,
    kind: str,
    file: str,
    retryable: bool,
    hint: str | None,
) -> None:
    with pytest.raises(DeliveryError) as info:
        provider.handle_response(status, err(kind), payload(file), [make_message(1)])
    assert not isinstance(info.value, AuthError)
    assert info.value.retryable is retryable
    # An account or configuration problem (the ones with a hint here) stops the send with the
    # batch back in the queue; the others fail or retry the batch.
    assert isinstance(info.value, BlockedError) is (hint is not None)
    assert kind in str(info.value)
    if hint:
        assert info.value.hint and hint in info.value.hint


@pytest.mark.parametrize("status", [502, 504])
@pytest.mark.parametrize("kind", [None, "InternalFailure", "AccountSuspendedException"])
def test_a_gateway_status_is_uncertain_whatever_the_body_says(
    provider: SesProvider, make_message: MessageFactory, status: int, kind: str | None
) -> None:
    # A 502/504 is a gateway's answer, not SES's: SES may have taken the message, so no error
    # type in the body may turn it into a retry (a second copy) or a batch back in the queue.
    headers = err(kind) if kind else {}
    with pytest.raises(UncertainDeliveryError) as info:
        provider.handle_response(status, headers, payload("error_bad_request.json"), [make_message(1)])
    assert info.value.retryable and info.value.status == status


def test_signature_errors_are_auth_errors(
    provider: SesProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(AuthError) as info:
        provider.handle_response(
            403, err("SignatureDoesNotMatch"), payload("error_signature.json"), [make_message(1)]
        )
    assert info.value.hint and "aws_secret_access_key" in info.value.hint


def test_unreadable_success_is_uncertain(
    provider: SesProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(UncertainDeliveryError):
        provider.handle_response(200, {}, b"<html/>", [make_message(1)])
    with pytest.raises(UncertainDeliveryError):
        provider.handle_response(200, {}, b"{}", [make_message(1)])


# -- against the fake (which checks every signature) ---------------------------------------------


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token="unused") as server:
        install_ses(server, access_key="AKIDTEST", secret_key=SECRET, region="eu-west-1")
        yield server


def live(srv: FakeProviderServer, **overrides: object) -> SesProvider:
    values: dict[str, object] = {"base_url": srv.url, "timeout": 5, "rate_per_second": 1000}
    values.update(overrides)
    return SesProvider(settings(**values))


def test_batch_in_parallel(srv: FakeProviderServer, make_message: MessageFactory) -> None:
    srv.ses_rejected["reader4@example.com"] = ("Email address is not verified. The following identities "
                                               "failed the check in region EU-WEST-1: reader4@example.com")
    messages = [make_message(i) for i in range(1, 13)]
    with live(srv, concurrency=4) as provider:
        results = provider.send_batch(messages)
    assert [r.ledger_id for r in results] == list(range(1, 13))
    assert [r.status for r in results] == ["sent"] * 3 + ["rejected"] + ["sent"] * 8
    assert sorted(srv.ledger_ids) == [i for i in range(1, 13) if i != 4]
    assert len(srv.requests) == 12
    got = next(m for m in srv.messages if m["tags"]["ledger_id"] == "7")
    assert got["headers"]["List-Unsubscribe"] == "<https://news.example.org/u/tok0007>"
    assert got["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_wrong_secret_is_an_auth_error(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    with pytest.raises(AuthError) as info:
        live(srv, aws_secret_access_key="wrong").send_batch([make_message(1), make_message(2)])
    assert info.value.status == 403 and "SignatureDoesNotMatch" in str(info.value)
    assert srv.ledger_ids == []


def test_a_later_throttle_keeps_the_accepted_messages(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.extend(
        [(), (), ("status", 429, err("TooManyRequestsException"), {"message": "slow"})]
    )
    results = live(srv, concurrency=1).send_batch([make_message(i) for i in range(1, 6)])
    assert [r.status for r in results] == ["sent", "sent", "deferred", "deferred", "deferred"]
    assert "not sent" in (results[2].error or "") and len(srv.requests) == 3


def test_throttled_first_call_is_retryable(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.append(("status", 429, err("TooManyRequestsException"), {"message": "slow"}))
    with pytest.raises(DeliveryError) as info:
        live(srv, concurrency=1).send_batch([make_message(1), make_message(2)])
    assert info.value.retryable and info.value.status == 429


def test_suspended_account_stops_the_batch(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.append(("status", 400, err("AccountSuspendedException"), {"message": "restricted"}))
    with pytest.raises(DeliveryError) as info:
        live(srv, concurrency=1).send_batch([make_message(1), make_message(2)])
    assert not info.value.retryable and len(srv.requests) == 1


def test_lost_answer_is_uncertain_for_that_message(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.faults.extend([(), ("reset", "after")])
    with pytest.raises(PartialBatchError) as info:
        live(srv, concurrency=1).send_batch([make_message(i) for i in (1, 2, 3)])
    assert info.value.uncertain == (2,)
    assert [(r.ledger_id, r.status) for r in info.value.results] == [(1, "sent"), (3, "deferred")]


def test_check(srv: FakeProviderServer) -> None:
    line = live(srv).check()
    assert line.startswith("ses: reached account in eu-west-1") and "14.0 messages/s" in line
    with pytest.raises(AuthError):
        live(srv, aws_access_key_id="AKIDOTHER").check()
    srv.route("GET", "/v2/email/account", lambda s, r: Reply(200, payload("account.json")))
    assert "sandbox" in live(srv).check()


def test_an_unverified_from_sends_nothing_and_stops_the_batch(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.ses_identities = {"example.com": True}  # not the From's domain (news.example.org)
    with pytest.raises(BlockedError) as info:
        live(srv, concurrency=1).send_batch([make_message(i) for i in (1, 2, 3)])
    assert "digest@news.example.org" in str(info.value) and "eu-west-1" in (info.value.hint or "")
    assert srv.ledger_ids == [] and len(srv.requests) == 1  # no call after the first refusal


def test_a_from_refusal_after_accepted_messages_keeps_them_sent(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    # Unlikely (SES verifies the From for every message alike), but if the refusal comes after
    # a message was accepted, the accepted one stays sent and the rest go back to the queue:
    # a BlockedError would put the batch back whole and send the first reader again.
    srv.ses_rejected["reader2@example.com"] = NOT_VERIFIED + "digest@news.example.org"
    results = live(srv, concurrency=1).send_batch([make_message(i) for i in (1, 2, 3)])
    assert [(r.ledger_id, r.status) for r in results] == [(1, "sent"), (2, "deferred"), (3, "deferred")]
    assert "not verified" in (results[1].error or "") and srv.ledger_ids == [1]


def test_check_asks_whether_ses_sends_as_the_from_address(srv: FakeProviderServer) -> None:
    provider = live(srv)
    provider.from_addr = "Field Notes <Digest@News.Example.org>"
    srv.ses_identities = {"news.example.org": True}
    assert "may send as Digest@News.Example.org (news.example.org is verified)" in provider.check()
    srv.ses_identities = {"digest@news.example.org": True}
    assert "(Digest@News.Example.org is verified)" in provider.check()

    srv.ses_identities = {"digest@news.example.org": False}  # asked for, not confirmed yet
    with pytest.raises(BlockedError) as info:
        provider.check()
    assert "will not send as Digest@News.Example.org (Digest@News.Example.org: PENDING)" in str(info.value)
    assert info.value.hint and "eu-west-1" in info.value.hint and "delivery.region" in info.value.hint
    srv.ses_identities = {}  # another region's identities, say
    with pytest.raises(BlockedError, match="neither it nor its domain is an identity there"):
        provider.check()
    asked = [r.path for r in srv.requests if "/identities/" in r.path]
    assert asked[-2:] == ["/v2/email/identities/Digest%40News.Example.org",
                          "/v2/email/identities/news.example.org"]


def test_check_without_leave_to_read_identities_still_passes(srv: FakeProviderServer) -> None:
    # Keys allowed to send but not to read identities send all the same: check says so.
    srv.route("GET", "/v2/email/identities/*",
              lambda s, r: Reply.of_json(403, {"message": "not authorized"},
                                         err("AccessDeniedException")))
    provider = live(srv)
    provider.from_addr = "digest@news.example.org"
    assert "could not read the SES identity of digest@news.example.org" in provider.check()
    # Without a known From (a provider built outside the app), nothing is asked.
    srv.requests.clear()
    assert "identity" not in live(srv).check() and len(srv.requests) == 1


def test_digest_check_names_an_unverified_from(tmp_path: Path, srv: FakeProviderServer) -> None:
    """`digest check` (pipeline.check) gives the provider newsletter.from: an SES that will not
    send as it is a failed check naming what to verify, before any send uses up a batch."""
    from digest import pipeline
    from tests.conftest import FrozenClock, make_settings

    settings = make_settings(tmp_path, sources=[], newsletter={"from": "Field Notes <digest@news.example.org>"},
                             delivery={"provider": "ses", "region": "eu-west-1", "aws_access_key_id": "AKIDTEST",
                                       "aws_secret_access_key": SECRET, "base_url": srv.url, "timeout": 5})
    app = pipeline.App.open(settings, FrozenClock())
    try:
        srv.ses_identities = {"example.com": True}
        (_db, (what, ok, detail)) = pipeline.check(app, sleep=lambda s: None)
        assert (what, ok) == ("provider ses", False)
        assert "will not send as digest@news.example.org" in detail and "delivery.region" in detail
        srv.ses_identities["news.example.org"] = True
        (_db, (what, ok, detail)) = pipeline.check(app, sleep=lambda s: None)
        assert ok and "may send as digest@news.example.org" in detail
    finally:
        app.close()
