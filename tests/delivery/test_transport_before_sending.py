"""Failures before the request reaches the provider, over real sockets, through the real sender.

A TLS handshake that fails (https:// to a port that speaks plain HTTP, a handshake alert, the
server closing or going silent during the handshake) and a proxy that will not open the CONNECT
tunnel (HTTPS_PROXY answering 407 or 502) all happen before a byte of the request is written:
the provider never had the batch, so nobody may be marked uncertain (the batch goes back to the
queue, or is retried), and the operator reads one line saying what to fix.

The other side, kept uncertain: the same exceptions after the request went out. A garbled TLS
record in the answer gives the very WRONG_VERSION_NUMBER a plain-HTTP port gives during the
handshake, and urllib3 reports a provider that closes a tunnelled connection after reading the
request as a ProxyError ("Unable to connect to proxy"); only where the failure happened tells
them apart (HttpProvider.transport_error).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from digest import pipeline
from digest.delivery.sender import Sender, SendSummary
from tests.conftest import FrozenClock, make_settings
from tests.delivery import test_smtp
from tests.delivery.test_smtp import Cert
from tests.fakes.provider_server import FakeProviderServer

TOKEN = "transport-token"
EMAILS = [f"t{i:02d}@example.com" for i in range(8)]
RETRIES = 2
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")

# test_smtp's self-signed certificate for 127.0.0.1 (a module-scoped fixture).
cert = test_smtp.cert

Handler = Callable[[socket.socket], None]


@pytest.fixture(autouse=True)
def no_proxy_but_ours(monkeypatch: pytest.MonkeyPatch, cert: Cert) -> None:
    """No proxy from the machine's environment; the test's certificate trusted (the provider's
    session reads REQUESTS_CA_BUNDLE, as it does in production)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert.cert))


@contextmanager
def listening(handler: Handler) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that runs ``handler`` for each connection (in a thread);
    yields its ``host:port``."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_run, args=(handler, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    host, port = server.getsockname()
    try:
        yield f"{host}:{port}"
    finally:
        server.close()


def _run(handler: Handler, conn: socket.socket) -> None:
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


def read_request(conn: socket.socket | ssl.SSLSocket) -> bytes:
    """An HTTP request's head and its Content-Length of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def open_app(tmp_path: Path, clock: FrozenClock, base_url: str, **delivery: Any) -> pipeline.App:
    settings = make_settings(tmp_path, digest={"approval": {"required": False}}, delivery={
        "provider": "postmark", "api_key": TOKEN, "base_url": base_url, "batch_size": 4,
        "concurrency": 1, "max_retries": RETRIES, "timeout": 2.0, "rate_per_second": 1000, **delivery})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([(e, "") for e in EMAILS], "cli", clock())
    pipeline.collect(app)
    pipeline.make_draft(app)
    return app


def send(app: pipeline.App, pauses: list[float]) -> SendSummary:
    (draft_id,) = app.store.due_drafts(app.now())
    draft = app.store.get_draft(draft_id)
    return Sender(app.store, app.provider, app.settings, draft, pipeline.compile_for(app, draft),
                  app.link_pair, now=app.now, sleep=pauses.append).run()


def statuses(app: pipeline.App) -> set[str]:
    return {status for _id, _email, status in app.store.ledger_rows(1)}


def assert_nothing_sent_nobody_uncertain(app: pipeline.App, summary: SendSummary) -> str:
    """The batch never reached the provider: no row is uncertain (nor sent, nor failed), and
    the send stopped with one line for the operator, which is returned."""
    assert summary.uncertain == 0 and summary.sent == 0 and not summary.failed
    assert app.store.uncertain_messages(1) == []
    assert statuses(app).isdisjoint({"uncertain", "sent", "failed"}), statuses(app)
    stopped = summary.stopped or ""
    assert stopped and "\n" not in stopped and "\r" not in stopped
    assert "nothing was sent" in stopped
    return stopped


# -- the TLS handshake fails: nothing was sent -----------------------------------------------


def test_https_to_a_port_that_speaks_plain_http_is_retried_not_uncertain(
        tmp_path: Path, clock: FrozenClock) -> None:
    """delivery.base_url says https:// for a server speaking plain HTTP: the handshake fails
    (WRONG_VERSION_NUMBER) before the request is written. Retried, then the send pauses with
    the batch back in the queue; the operator is told to check delivery.base_url."""
    with FakeProviderServer(token=TOKEN) as srv:
        app = open_app(tmp_path, clock, srv.url.replace("http://", "https://"))
        pauses: list[float] = []
        summary = send(app, pauses)
        assert srv.requests == []  # no request ever reached it
    stopped = assert_nothing_sent_nobody_uncertain(app, summary)
    assert summary.retries == RETRIES and len(pauses) == RETRIES
    assert "TLS handshake failed (WRONG_VERSION_NUMBER)" in stopped and "delivery.base_url" in stopped
    app.close()


def _no_shared_cipher(cert: Cert) -> ssl.SSLContext:
    """A server that offers only RSA-signed suites of TLS 1.2 with an EC certificate: it answers
    every ClientHello with a handshake_failure alert."""
    context = cert.server_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aRSA")
    return context


@pytest.mark.parametrize("server", ["handshake-alert", "closed-during-handshake", "silent-during-handshake"])
def test_a_failed_tls_handshake_is_retried_not_uncertain(
        tmp_path: Path, clock: FrozenClock, cert: Cert, server: str) -> None:
    """A handshake alert (no shared cipher), the server closing the connection during the
    handshake (an SSLEOFError, the very type an EOF in the middle of a session raises) and a
    server that never answers the handshake (a timeout): the request was never written."""
    handled: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        if server == "closed-during-handshake":
            hello = b""  # the ClientHello's record, read whole (unread bytes would make the close a reset)
            while len(hello) < 5 or len(hello) < 5 + int.from_bytes(hello[3:5], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                hello += chunk
            return  # closed unanswered
        if server == "silent-during-handshake":
            time.sleep(1.5)
            return
        with _no_shared_cipher(cert).wrap_socket(conn, server_side=True) as tls:
            handled.append(read_request(tls))

    with listening(handler) as address:
        app = open_app(tmp_path, clock, f"https://{address}", timeout=0.5)
        summary = send(app, [])
    stopped = assert_nothing_sent_nobody_uncertain(app, summary)
    assert handled == [] and summary.retries == RETRIES
    if server == "handshake-alert":
        assert "TLS handshake failed (SSLV3_ALERT_HANDSHAKE_FAILURE)" in stopped
    elif server == "closed-during-handshake":
        assert "TLS handshake failed (UNEXPECTED_EOF_WHILE_READING)" in stopped
    else:
        assert "could not connect (timed out)" in stopped
    app.close()


# -- after the request went out: uncertain, whatever the exception ---------------------------


def test_a_garbled_tls_record_after_the_request_went_out_stays_uncertain(
        tmp_path: Path, clock: FrozenClock, cert: Cert) -> None:
    """The provider read the whole request, then its answer came as bytes that are no TLS
    record: the client sees WRONG_VERSION_NUMBER, as for a plain-HTTP port during the handshake,
    but here the provider had the batch. Uncertain, not resent."""
    handled: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        tls = cert.server_context().wrap_socket(conn, server_side=True)
        handled.append(read_request(tls))
        raw = socket.socket(fileno=tls.detach())
        raw.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # not inside TLS
        time.sleep(0.2)
        raw.close()

    with listening(handler) as address:
        app = open_app(tmp_path, clock, f"https://{address}")
        summary = send(app, [])
    assert len(handled) == 2 and all(b"/email/batch" in h for h in handled)  # both batches arrived
    assert summary.uncertain == 8 and summary.retries == 0
    assert all("may have accepted" in m.error for m in app.store.uncertain_messages(1))
    app.close()


# -- a proxy (HTTPS_PROXY) and its CONNECT tunnel --------------------------------------------


def proxy_answering(code: int, phrase: str, seen: list[bytes]) -> Handler:
    """A proxy that answers every CONNECT with ``code``."""

    def handler(conn: socket.socket) -> None:
        seen.append(read_request(conn).split(b"\r\n", 1)[0])
        conn.sendall(f"HTTP/1.1 {code} {phrase}\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n"
                     "Content-Length: 0\r\n\r\n".encode())

    return handler


def test_a_proxy_asking_for_credentials_stops_the_send_with_the_batch_in_the_queue(
        tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """407 to the CONNECT: the request never left for the provider. The operator must fix the
    proxy's credentials: the send stops at once (no retries), nobody is marked."""
    seen: list[bytes] = []
    with listening(proxy_answering(407, "Proxy Authentication Required", seen)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://{proxy}")
        app = open_app(tmp_path, clock, "https://api.postmarkapp.example")
        summary = send(app, [])
    assert seen == [b"CONNECT api.postmarkapp.example:443 HTTP/1.0"]
    stopped = assert_nothing_sent_nobody_uncertain(app, summary)
    assert summary.blocked and summary.retries == 0
    assert "407 Proxy Authentication Required" in stopped and "HTTPS_PROXY" in stopped
    app.close()


def test_a_proxy_failing_to_open_the_tunnel_is_retried_not_uncertain(
        tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """502 to the CONNECT (the proxy could not reach the provider): retried, then the send
    pauses with the batch back in the queue."""
    seen: list[bytes] = []
    with listening(proxy_answering(502, "Bad Gateway", seen)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://{proxy}")
        app = open_app(tmp_path, clock, "https://api.postmarkapp.example")
        summary = send(app, [])
    assert len(seen) == RETRIES + 1
    stopped = assert_nothing_sent_nobody_uncertain(app, summary)
    assert not summary.blocked and summary.retries == RETRIES
    assert "502 Bad Gateway" in stopped and "HTTPS_PROXY" in stopped
    app.close()


def test_a_provider_closing_a_tunnelled_connection_after_the_request_stays_uncertain(
        tmp_path: Path, clock: FrozenClock, cert: Cert, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy opened the tunnel, the provider read the request and closed the connection
    without answering. urllib3 reports this as a ProxyError ("Unable to connect to proxy"),
    yet the provider had the batch: uncertain, not resent."""
    handled: list[bytes] = []

    def provider(conn: socket.socket) -> None:
        tls = cert.server_context().wrap_socket(conn, server_side=True)
        handled.append(read_request(tls))
        tls.unwrap()  # close_notify: a clean close, without an answer

    with listening(provider) as target:
        host, port = target.split(":")

        def tunnel(conn: socket.socket) -> None:
            read_request(conn)  # the CONNECT
            upstream = socket.create_connection((host, int(port)))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            pump = threading.Thread(target=_pump, args=(conn, upstream), daemon=True)
            pump.start()
            _pump(upstream, conn)
            pump.join(2)
            upstream.close()

        with listening(tunnel) as proxy:
            monkeypatch.setenv("HTTPS_PROXY", f"http://{proxy}")
            app = open_app(tmp_path, clock, f"https://{target}")
            summary = send(app, [])
    assert len(handled) == 2 and all(b"/email/batch" in h for h in handled)
    assert summary.uncertain == 8 and summary.retries == 0
    app.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
