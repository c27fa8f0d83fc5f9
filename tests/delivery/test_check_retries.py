"""`digest check` asks a rate-limited or failing provider again, a few times, then says so in
one line; refused credentials and network failures are reported at once.

Each HTTP provider's real ``check()`` runs through requests against `responses`, and
check_with_retries is given a ``sleep`` that records its waits instead of sleeping them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from digest import pipeline
from digest.delivery.providers.base import (
    CHECK_ATTEMPTS,
    CHECK_MAX_WAIT,
    HttpProvider,
    check_with_retries,
    maybe_delivered,
)
from digest.delivery.providers.registry import build_provider
from digest.errors import AuthError, BlockedError, DeliveryError
from tests.conftest import FrozenClock, make_settings
from tests.delivery.test_provider_contract import DOMAIN, SPECS, TOKEN

BASE = "https://provider.test"

# Where each provider's check() goes, and an answer it reads as "reached".
CHECKS: dict[str, tuple[str, dict[str, Any]]] = {
    "postmark": ("/server", {"Name": "Digest"}),
    "sendgrid": ("/v3/scopes", {"scopes": ["mail.send"]}),
    "mailgun": (f"/v3/domains/{DOMAIN}", {"domain": {"name": DOMAIN, "state": "active"}}),
    "ses": ("/v2/email/account", {"SendingEnabled": True, "ProductionAccessEnabled": True}),
    "resend": ("/domains", {"data": [{"name": "news.example.org", "status": "verified"}]}),
}


def test_every_http_provider_has_a_check_row() -> None:
    assert sorted(CHECKS) == sorted(SPECS)


@pytest.fixture(params=sorted(CHECKS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def provider_for(name: str) -> HttpProvider:
    provider = build_provider(SPECS[name].settings(BASE, TOKEN))
    assert isinstance(provider, HttpProvider)
    return provider


def answer(mocked: responses.RequestsMock, name: str, status: int, headers: dict[str, str] | None = None,
           body: Any = None) -> None:
    """The provider's next answer to its check (`responses` gives them in order)."""
    path, ok = CHECKS[name]
    mocked.get(BASE + path, status=status, json=ok if status == 200 else (body or {"message": "x"}),
               headers=headers or {})


def calls(mocked: responses.RequestsMock) -> int:
    return len(mocked.calls)


def test_a_rate_limit_then_a_server_error_are_asked_again(name: str, mocked: responses.RequestsMock) -> None:
    answer(mocked, name, 429, {"Retry-After": "2"})
    answer(mocked, name, 503)
    answer(mocked, name, 200)
    slept: list[float] = []
    line = check_with_retries(provider_for(name), sleep=slept.append)
    assert line.startswith(f"{name}: ")
    assert calls(mocked) == 3
    assert slept == [2.0, 1.0]  # Retry-After, then the backoff for a second retry


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateway_error_is_asked_again_too(name: str, mocked: responses.RequestsMock, status: int) -> None:
    # A check sends nothing: a gateway's 502/504 is only an outage there, not an uncertain send.
    answer(mocked, name, status)
    answer(mocked, name, 200)
    slept: list[float] = []
    assert check_with_retries(provider_for(name), sleep=slept.append).startswith(f"{name}: ")
    assert calls(mocked) == 2 and slept == [0.5]


def test_retries_are_bounded_and_the_failure_is_one_line(name: str, mocked: responses.RequestsMock) -> None:
    answer(mocked, name, 429, {"Retry-After": "3600"})  # an hour: capped, a check runs by hand
    answer(mocked, name, 504)
    answer(mocked, name, 503)
    answer(mocked, name, 200)  # never asked
    slept: list[float] = []
    with pytest.raises(DeliveryError) as info:
        check_with_retries(provider_for(name), sleep=slept.append)
    assert calls(mocked) == CHECK_ATTEMPTS == 3
    assert slept == [CHECK_MAX_WAIT, 1.0]
    err = info.value
    assert not maybe_delivered(err) and not isinstance(err, BlockedError)
    assert err.status == 503 and "HTTP 503" in str(err)
    assert "still failing after 3 attempts over 6.0 s" in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_reported_at_once(name: str, mocked: responses.RequestsMock, status: int) -> None:
    answer(mocked, name, status, body={"message": "no", "name": "invalid_api_key"})
    answer(mocked, name, 200)
    slept: list[float] = []
    with pytest.raises(AuthError):
        check_with_retries(provider_for(name), sleep=slept.append)
    assert calls(mocked) == 1 and slept == []


def test_a_network_failure_is_reported_at_once(name: str, mocked: responses.RequestsMock) -> None:
    # No answer at all: most often a wrong base_url; asking again only makes the user wait.
    path, _ok = CHECKS[name]
    mocked.get(BASE + path, body=requests.ConnectionError("connection refused"))
    slept: list[float] = []
    with pytest.raises(DeliveryError):
        check_with_retries(provider_for(name), sleep=slept.append)
    assert calls(mocked) == 1 and slept == []


def test_a_permanent_answer_is_reported_at_once(mocked: responses.RequestsMock) -> None:
    answer(mocked, "sendgrid", 400, body={"errors": [{"message": "bad"}]})
    slept: list[float] = []
    with pytest.raises(DeliveryError) as info:
        check_with_retries(provider_for("sendgrid"), sleep=slept.append)
    assert not info.value.retryable and calls(mocked) == 1 and slept == []


# -- through pipeline.check and `digest check` ------------------------------------------------------


PIPELINE_CASES = {
    # delivery settings, the check's path, the 429's body and headers, how the row begins
    "sendgrid": ({"provider": "sendgrid", "api_key": TOKEN}, "/v3/scopes",
                 {"errors": [{"message": "too many requests"}]}, {},
                 "sendgrid: HTTP 429 (rate limited)"),
    # SES puts its error message in ours: one with a line break must not break the line
    "ses": ({"provider": "ses", "region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE",
             "aws_secret_access_key": TOKEN}, "/v2/email/account",
            {"message": "Maximum sending rate exceeded.\nSlow down."},
            {"x-amzn-ErrorType": "TooManyRequestsException:http://internal.amazon.com/coral/"},
            "ses: HTTP 429 TooManyRequestsException: Maximum sending rate exceeded. Slow down."),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_pipeline_check_reports_a_provider_still_rate_limited_in_one_line(
        tmp_path: Path, clock: FrozenClock, mocked: responses.RequestsMock, case: str) -> None:
    delivery, path, body, headers, begins = PIPELINE_CASES[case]
    settings = make_settings(tmp_path, sources=[], delivery={**delivery, "base_url": BASE})
    for _ in range(3):
        mocked.get(BASE + path, status=429, json=body, headers={"Retry-After": "1", **headers})
    app = pipeline.App.open(settings, clock)
    slept: list[float] = []
    try:
        rows = pipeline.check(app, sleep=slept.append)
    finally:
        app.close()
    what, ok, detail = rows[-1]
    assert (what, ok) == (f"provider {case}", False)
    assert detail.startswith(f"{begins}; still failing after 3 attempts over 2.0 s")
    assert "\n" not in detail and slept == [1.0, 1.0] and calls(mocked) == 3
