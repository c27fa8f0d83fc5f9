"""digest.http: Retry-After parsing and the bounded, retrying, conditional fetch."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
import responses

from digest import __version__
from digest.errors import SourceError
from digest.http import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    Fetched,
    build_session,
    fetch,
    read_environment_once,
    reset_at_seconds,
    retry_after_seconds,
)

URL = "https://api.example.org/feed"
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)


# --- retry_after_seconds ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("120", 120.0), (" 7 ", 7.0), ("0", 0.0)])
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert retry_after_seconds(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 10 Nov 2026 12:01:30 GMT", 90.0),
        ("Tue, 10 Nov 2026 12:01:30 -0000", 90.0),  # "-0000" parses naive: read as UTC
        ("Tue, 10 Nov 2026 13:01:30 +0100", 90.0),
        ("Tue, 10 Nov 2026 11:00:00 GMT", 0.0),  # already past: retry now, never negative
    ],
)
def test_retry_after_http_date(value: str, expected: float) -> None:
    assert retry_after_seconds(value, now=NOW) == expected


@pytest.mark.parametrize("value", [None, "", "soon", "1.5", "-5", "Tuesday", "²", "٣"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    # "²" and "٣" are str.isdigit() but not something float() takes: they must not raise.
    assert retry_after_seconds(value, now=NOW) is None


def test_retry_after_cap() -> None:
    assert retry_after_seconds("100000", now=NOW) == 300.0
    assert retry_after_seconds("100000", now=NOW, cap=60.0) == 60.0
    assert retry_after_seconds("Fri, 01 Jan 2100 00:00:00 GMT", now=NOW, cap=60.0) == 60.0
    assert retry_after_seconds("59", now=NOW, cap=60.0) == 59.0


# --- reset_at_seconds (a rate-limit reset given as Unix time) ---------------------------------


def test_reset_at_seconds_is_the_time_until_the_reset() -> None:
    epoch = int(NOW.timestamp())
    assert reset_at_seconds(str(epoch + 42), now=NOW) == 42.0
    assert reset_at_seconds(f" {epoch + 2}.5 ", now=NOW) == 2.5
    assert reset_at_seconds(str(epoch + 100_000), now=NOW) == 300.0  # capped
    assert reset_at_seconds(str(epoch + 100_000), now=NOW, cap=60.0) == 60.0


@pytest.mark.parametrize("offset", [0, -1, -3600])
def test_a_reset_already_past_is_none_never_negative(offset: int) -> None:
    # The window has reset, or the clocks disagree: the caller's own backoff applies.
    assert reset_at_seconds(str(int(NOW.timestamp()) + offset), now=NOW) is None
    assert reset_at_seconds("30", now=NOW) is None  # seconds, not a Unix time: long past


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1e10", "nan", "inf", "1.2.3", "²", "Tue, 10 Nov 2026"])
def test_reset_at_garbage_is_none(value: str | None) -> None:
    assert reset_at_seconds(value, now=NOW) is None


# --- fetch ------------------------------------------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def no_sleep(_seconds: float) -> None:
    raise AssertionError("fetch slept when it should not have")


def test_user_agent_is_digests(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, body=b"ok")
    fetch(build_session(), URL, sleep=no_sleep)
    agent = mocked.calls[0].request.headers["User-Agent"]
    assert agent == USER_AGENT
    assert agent.startswith(f"digest/{__version__} ")


def test_timeouts_are_passed(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, body=b"ok")
    fetch(build_session(), URL, sleep=no_sleep)
    fetch(build_session(), URL, timeout=(1.5, 4.0), sleep=no_sleep)
    kwargs = [call.request.req_kwargs for call in mocked.calls]  # type: ignore[attr-defined]
    assert [k["timeout"] for k in kwargs] == [DEFAULT_TIMEOUT, (1.5, 4.0)]
    assert all(k["stream"] is True for k in kwargs)  # streamed, so the size cap can stop it early


def test_ok_response(mocked: responses.RequestsMock) -> None:
    mocked.get(
        URL,
        body=b"<rss/>",
        headers={
            "ETag": '"a"',
            "Last-Modified": "Mon, 02 Nov 2026 07:30:00 GMT",
            "X-Odd-Case": "kept",
        },
    )
    got = fetch(build_session(), URL, headers={"Accept": "application/rss+xml"}, sleep=no_sleep)
    assert (got.url, got.status, got.body, got.not_modified) == (URL, 200, b"<rss/>", False)
    assert got.etag == '"a"' and got.last_modified == "Mon, 02 Nov 2026 07:30:00 GMT"
    assert got.headers["x-odd-case"] == "kept"  # header names are lower-cased
    assert got.wire_bytes == 6
    request = mocked.calls[0].request
    assert request.headers["Accept"] == "application/rss+xml"
    assert "If-None-Match" not in request.headers and "If-Modified-Since" not in request.headers


def test_conditional_get(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, status=304, headers={"ETag": '"a"'})
    got = fetch(
        build_session(),
        URL,
        etag='"a"',
        last_modified="Mon, 02 Nov 2026 07:30:00 GMT",
        sleep=no_sleep,
    )
    assert got == Fetched(url=URL, status=304, headers=got.headers, not_modified=True)
    assert got.body == b"" and got.etag == '"a"'
    request = mocked.calls[0].request
    assert request.headers["If-None-Match"] == '"a"'
    assert request.headers["If-Modified-Since"] == "Mon, 02 Nov 2026 07:30:00 GMT"


def test_client_errors_are_not_retried(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, status=404)
    with pytest.raises(SourceError, match=f"^{URL}: HTTP 404$"):
        fetch(build_session(), URL, sleep=no_sleep)
    assert len(mocked.calls) == 1


def test_5xx_backs_off_then_succeeds(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, status=503)
    mocked.get(URL, status=502)
    mocked.get(URL, body=b"ok")
    sleeps: list[float] = []
    got = fetch(build_session(), URL, sleep=sleeps.append)
    assert got.body == b"ok"
    assert sleeps == [0.5, 1.0]


def test_retry_after_is_obeyed_and_capped_at_a_minute(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, status=429, headers={"Retry-After": "3"})
    mocked.get(URL, status=503, headers={"Retry-After": "86400"})
    mocked.get(URL, body=b"ok")
    sleeps: list[float] = []
    fetch(build_session(), URL, sleep=sleeps.append)
    assert sleeps == [3.0, 60.0]


def test_a_retry_after_of_now_or_in_the_past_leaves_the_backoff(mocked: responses.RequestsMock) -> None:
    """"0" or a date already past (clocks that disagree) would spend every retry at once."""
    mocked.get(URL, status=429, headers={"Retry-After": "0"})
    mocked.get(URL, status=503, headers={"Retry-After": "Thu, 01 Jan 2015 00:00:00 GMT"})
    mocked.get(URL, body=b"ok")
    sleeps: list[float] = []
    fetch(build_session(), URL, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0]


def test_retries_exhausted(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, status=503)
    sleeps: list[float] = []
    with pytest.raises(SourceError, match=f"^{URL}: HTTP 503$"):
        fetch(build_session(), URL, sleep=sleeps.append)
    assert len(mocked.calls) == 4 and sleeps == [0.5, 1.0, 2.0]
    with pytest.raises(SourceError, match="HTTP 503"):
        fetch(build_session(), URL, retries=0, sleep=no_sleep)


def test_network_errors_are_retried_then_raised(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, body=requests.ConnectTimeout("timed out"))
    sleeps: list[float] = []
    with pytest.raises(SourceError, match=f"^{URL}: timed out connecting to api.example.org$") as caught:
        fetch(build_session(), URL, sleep=sleeps.append)
    assert isinstance(caught.value.__cause__, requests.ConnectTimeout)
    assert sleeps == [0.5, 1.0, 2.0]


def test_redirects_are_followed_and_capped(mocked: responses.RequestsMock) -> None:
    final = "https://cdn.example.org/feed"
    mocked.get(URL, status=301, headers={"Location": final})
    mocked.get(final, body=b"moved")
    got = fetch(build_session(), URL, sleep=no_sleep)
    assert (got.url, got.body) == (final, b"moved")

    loop = "https://loop.example.org/a"
    mocked.get(loop, status=302, headers={"Location": loop})
    with pytest.raises(SourceError, match=f"^{loop}: more than 5 redirects$"):
        fetch(build_session(), loop, sleep=no_sleep)


def test_size_cap(mocked: responses.RequestsMock) -> None:
    mocked.get(URL, body=b"x" * 1000, auto_calculate_content_length=True)
    with pytest.raises(SourceError, match="body of 1000 bytes is over the 999-byte cap"):
        fetch(build_session(), URL, max_bytes=999, sleep=no_sleep)
    assert (
        fetch(build_session(), URL, max_bytes=1000, sleep=no_sleep).body == b"x" * 1000
    )  # boundary

    streamed = "https://api.example.org/streamed"
    mocked.get(streamed, body=b"x" * 1000)  # no Content-Length: counted while streaming
    with pytest.raises(SourceError, match="body is over the 999-byte cap"):
        fetch(build_session(), streamed, max_bytes=999, sleep=no_sleep)


def test_non_ascii_digit_content_length_does_not_crash(mocked: responses.RequestsMock) -> None:
    # Header values are decoded as Latin-1, so "\xb2" arrives as "²", which str.isdigit()
    # accepts and int() rejects. It must count as "no length", not raise ValueError.
    mocked.get(URL, body=b"fine", headers={"Content-Length": "\xb2"})
    assert fetch(build_session(), URL, sleep=no_sleep).body == b"fine"


@responses.activate
def test_redirect_to_another_origin_drops_credentials_but_keeps_validators() -> None:
    from digest.http import build_session, fetch

    responses.add(responses.GET, "https://forum.example.org/t/1.json", status=301,
                  headers={"Location": "https://cdn.example.net/t/1.json"})
    responses.add(responses.GET, "https://cdn.example.net/t/1.json", body=b"{}", status=200)
    fetched = fetch(build_session(), "https://forum.example.org/t/1.json", etag='"v1"',
                    headers={"Api-Key": "secret", "Accept": "application/json"})
    assert fetched.status == 200 and fetched.url == "https://cdn.example.net/t/1.json"
    first, second = (c.request for c in responses.calls)
    assert first.headers["Api-Key"] == "secret"
    assert "Api-Key" not in second.headers
    assert second.headers["If-None-Match"] == '"v1"' and second.headers["Accept"] == "application/json"


@responses.activate
def test_http_errors_carry_their_status() -> None:
    from digest.errors import SourceError
    from digest.http import build_session, fetch

    responses.add(responses.GET, "https://x.example.org/gone", status=404)
    with pytest.raises(SourceError) as info:
        fetch(build_session(), "https://x.example.org/gone")
    assert info.value.status == 404


def test_network_errors_read_as_one_short_phrase(mocked: responses.RequestsMock) -> None:
    from digest.http import describe

    resolution = requests.ConnectionError(
        "HTTPSConnectionPool(host='nowhere.example', port=443): Max retries exceeded with url: /feed "
        "(Caused by NameResolutionError(\"Failed to resolve 'nowhere.example'\"))",
        request=requests.Request("GET", "https://nowhere.example/feed?a=1").prepare())
    assert describe(resolution) == "cannot resolve the host name nowhere.example"
    mocked.get(URL + "?page=2&fields=x", body=resolution)
    with pytest.raises(SourceError) as caught:
        fetch(build_session(), URL + "?page=2&fields=x", sleep=lambda _s: None)
    assert str(caught.value) == f"{URL}?page=2&fields=x: cannot resolve the host name api.example.org"


# --- read_environment_once ----------------------------------------------------------------------


class _Recorder(requests.adapters.BaseAdapter):
    """An adapter that answers 200 ``{}`` and keeps what each request was sent with."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[requests.PreparedRequest, dict[str, object]]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
        self.sent.append((request, kwargs))
        response = requests.Response()
        response.status_code, response._content, response.url = 200, b'{"Name": "s"}', request.url or ""
        return response

    def close(self) -> None:
        pass


def _provider_with_recorder(monkeypatch: pytest.MonkeyPatch, base_url: str) -> tuple[object, _Recorder]:
    from digest.config import Delivery
    from digest.delivery.providers.postmark import PostmarkProvider

    session, recorder = build_session(), _Recorder()
    session.mount("https://", recorder)
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="k", base_url=base_url), session)
    return provider, recorder


def test_a_provider_reads_the_proxy_and_ca_bundle_once_and_uses_them_on_every_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/company-ca.pem")
    provider, recorder = _provider_with_recorder(monkeypatch, "https://api.postmarkapp.example")
    provider.check()  # type: ignore[attr-defined]
    monkeypatch.setenv("HTTPS_PROXY", "http://changed.internal:1")  # read once: not seen now
    provider.check()  # type: ignore[attr-defined]
    assert [kwargs["proxies"] for _, kwargs in recorder.sent] == [{"https": "http://proxy.internal:3128"}] * 2
    assert [kwargs["verify"] for _, kwargs in recorder.sent] == ["/etc/company-ca.pem"] * 2


def test_no_proxy_for_the_providers_host_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.postmarkapp.example")
    provider, recorder = _provider_with_recorder(monkeypatch, "https://api.postmarkapp.example")
    provider.check()  # type: ignore[attr-defined]
    assert not recorder.sent[0][1]["proxies"]


def test_a_netrc_entry_adds_no_credentials_to_provider_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.postmarkapp.example login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    provider, recorder = _provider_with_recorder(monkeypatch, "https://api.postmarkapp.example")
    provider.check()  # type: ignore[attr-defined]
    assert "Authorization" not in recorder.sent[0][0].headers
    assert recorder.sent[0][0].headers["X-Postmark-Server-Token"] == "k"


def test_the_environment_overrides_the_sessions_own_as_in_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    session = build_session()
    session.proxies["https"] = "http://chosen:1"
    monkeypatch.setenv("HTTPS_PROXY", "http://env:2")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env.pem")
    expected = session.merge_environment_settings("https://api.example.org", {}, None, None, None)
    read_environment_once(session, "https://api.example.org")
    assert session.proxies["https"] == expected["proxies"]["https"] == "http://env:2"
    assert session.verify == expected["verify"] == "/env.pem"
    assert session.trust_env is False


@pytest.mark.parametrize("base_url", ["https://[::1", "https://api.postmarkapp.example:99999"])
def test_a_base_url_that_cannot_be_parsed_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    from digest.errors import BlockedError

    monkeypatch.setenv("NO_PROXY", "localhost")
    provider, recorder = _provider_with_recorder(monkeypatch, base_url)
    with pytest.raises(BlockedError) as caught:
        provider.check()  # type: ignore[attr-defined]
    assert "delivery.base_url" in (caught.value.hint or "") and recorder.sent == []


# --- a proxy that cannot be reached -------------------------------------------------------------


def _refused_port() -> int:
    """A local port nothing listens on: a connection to it is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def refusing_proxy(monkeypatch: pytest.MonkeyPatch) -> str:
    """``HTTPS_PROXY`` and ``HTTP_PROXY``: a proxy on a local port that refuses connections, with
    credentials; returns its ``host:port``."""
    for name in ("ALL_PROXY", "NO_PROXY", "all_proxy", "no_proxy", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    where = f"127.0.0.1:{_refused_port()}"
    monkeypatch.setenv("HTTPS_PROXY", f"http://someone:s3cret@{where}")
    monkeypatch.setenv("HTTP_PROXY", f"http://someone:s3cret@{where}")
    return where


@pytest.mark.parametrize("url", ["https://blog.example.org/feed", "http://blog.example.org/feed"])
def test_a_proxy_that_refuses_the_connection_is_named_not_the_host(refusing_proxy: str, url: str) -> None:
    """It said "connection refused by blog.example.org": the operator looked at the source (or
    at the provider) while it was the proxy."""
    with pytest.raises(SourceError) as caught:
        fetch(build_session(), url, retries=0)
    assert str(caught.value) == f"{url}: the proxy {refusing_proxy} refused the connection"
    assert "s3cret" not in str(caught.value) and "someone" not in str(caught.value)


def test_a_proxy_that_cannot_be_resolved_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from digest.http import describe

    session = build_session()
    session.trust_env = False
    session.proxies = {"https": "http://someone:s3cret@proxy.invalid:3128"}
    with pytest.raises(requests.exceptions.ProxyError) as caught:
        session.get("https://blog.example.org/feed", timeout=5)
    assert describe(caught.value) == "cannot resolve the host name of the proxy proxy.invalid:3128"


def test_a_provider_behind_a_refusing_proxy_names_the_proxy(refusing_proxy: str) -> None:
    from digest.config import Delivery
    from digest.delivery.providers.postmark import PostmarkProvider
    from digest.errors import DeliveryError

    provider = PostmarkProvider(Delivery(provider="postmark", api_key="k", base_url="https://api.postmarkapp.example"))
    with pytest.raises(DeliveryError) as caught:
        provider.check()  # type: ignore[attr-defined]
    error = caught.value
    assert str(error).startswith(f"postmark: calling https://api.postmarkapp.example/server: the proxy "
                                 f"{refusing_proxy} refused the connection")
    assert error.hint == "if it persists, check the proxy (HTTPS_PROXY)"
    assert "s3cret" not in str(error) and "refused by api.postmarkapp.example" not in str(error)


def test_a_proxy_that_refuses_the_tunnel_is_named() -> None:
    """A proxy that answers the CONNECT with 407: named, with its status line."""
    import socket
    import threading

    from digest.http import describe

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        session = build_session()
        session.trust_env = False
        session.proxies = {"https": f"http://127.0.0.1:{port}"}
        with pytest.raises(requests.exceptions.ProxyError) as caught:
            session.get("https://blog.example.org/feed", timeout=5)
        thread.join(5)
    assert describe(caught.value) == (f"the proxy 127.0.0.1:{port} refused to open a tunnel to blog.example.org "
                                      "(407 Proxy Authentication Required)")
