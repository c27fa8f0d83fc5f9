"""A :class:`BodyParts` body over plain HTTP goes to the socket as its pieces (``sendmsg``),
never joined; anywhere else it is sent as joined slices. Either way the server receives the
very bytes ``bytes(body)`` gives, framed by Content-Length."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from digest.http import GATHER, ApiCalls, BodyParts, build_session, send_gathered


def _pieces(n: int, large: int = 40_000) -> list[bytes]:
    """Pieces of uneven sizes, some empty, some up to ``large`` bytes, each with its own bytes."""
    return [bytes([33 + i % 90]) * ((i * 7919) % (5 if i % 3 else large)) for i in range(n)]


class _Trickle:
    """A socket whose ``sendmsg`` takes at most ``limit`` bytes a call, as a full send buffer
    does, and records what it was given."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = bytearray()
        self.calls: list[int] = []

    def sendmsg(self, buffers: list[bytes | memoryview]) -> int:
        assert len(buffers) <= GATHER
        self.calls.append(len(buffers))
        room = self.limit
        for buffer in buffers:
            taken = bytes(buffer[:room])
            self.received += taken
            room -= len(taken)
            if not room:
                break
        return self.limit - room


@pytest.mark.parametrize("limit", [1, 3, 4096, 65_537, 10**9])
def test_send_gathered_sends_every_byte_in_order_whatever_each_call_takes(limit: int) -> None:
    pieces = _pieces(2500, 40_000 if limit > 1000 else 50)
    sock = _Trickle(limit)
    send_gathered(sock, pieces)
    assert bytes(sock.received) == b"".join(pieces)
    if limit == 10**9:  # each call takes all it is given: GATHER pieces at a time
        assert sock.calls == [GATHER, GATHER, 2500 - 2 * GATHER]


def test_a_socket_that_takes_nothing_is_an_error_not_a_loop() -> None:
    with pytest.raises(ConnectionError, match="took no more"):
        send_gathered(_Trickle(0), [b"abc"])


def test_send_gathered_with_nothing_to_send_makes_no_call() -> None:
    sock = _Trickle(10)
    send_gathered(sock, [])
    assert sock.calls == []


class _Sink(http.server.BaseHTTPRequestHandler):
    """Reads a body by its Content-Length and answers with what it got."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        answer = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[str]:
    _Sink.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/batch"
    finally:
        server.shutdown()
        server.server_close()


def _post(session: requests.Session, url: str, body: BodyParts) -> requests.Response:
    return ApiCalls(session)("POST", url, {"Content-Type": "application/json"}, body, 5.0)


def test_a_body_of_pieces_reaches_a_plain_http_server_whole_and_uncopied(
        sink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = _pieces(3000)  # three sendmsg calls at least
    body = BodyParts(pieces)
    monkeypatch.setattr(BodyParts, "__iter__", lambda self: pytest.fail("the body was joined into slices"))
    session = build_session()
    for _ in range(2):  # and again on the same connection (a retried call)
        response = _post(session, sink, body)
        assert response.status_code == 200
        assert response.content == hashlib.sha256(b"".join(pieces)).hexdigest().encode()
    assert [b for _h, b in _Sink.received] == [b"".join(pieces)] * 2
    headers = _Sink.received[0][0]
    assert headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in headers


def test_a_socket_without_sendmsg_gets_the_body_in_slices(sink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a TLS socket does (``ssl.SSLSocket`` has no scatter-gather send)."""
    from digest import http as digest_http

    sliced: list[int] = []
    original = BodyParts.__iter__

    def counted(self: BodyParts) -> Iterator[bytes]:
        for chunk in original(self):
            sliced.append(len(chunk))
            yield chunk

    monkeypatch.setattr(BodyParts, "__iter__", counted)
    monkeypatch.setattr(digest_http, "send_gathered", lambda *_a: pytest.fail("sendmsg on a socket without it"))
    real_send = digest_http._GatheringConnection.send

    def send(self: Any, data: Any) -> None:
        if isinstance(data, BodyParts):
            sock = self.sock
            self.sock = _NoGather(sock)
            try:
                real_send(self, data)
            finally:
                self.sock = sock
            return
        real_send(self, data)

    monkeypatch.setattr(digest_http._GatheringConnection, "send", send)
    pieces = _pieces(600)
    response = _post(build_session(), sink, BodyParts(pieces))
    assert response.status_code == 200
    assert _Sink.received[0][1] == b"".join(pieces)
    assert sum(sliced) == len(b"".join(pieces)) and len(sliced) > 1


class _NoGather:
    """A socket with ``sendall`` and no ``sendmsg``."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)


def test_https_and_proxied_pools_keep_their_own_connections() -> None:
    """Only the plain-HTTP pool sends pieces; HTTPS connections are urllib3's own."""
    import urllib3

    adapter = build_session().get_adapter("https://api.example.org")
    pools = adapter.poolmanager.pool_classes_by_scheme  # type: ignore[attr-defined]
    assert pools["https"] is urllib3.HTTPSConnectionPool
    assert issubclass(pools["http"].ConnectionCls, urllib3.connection.HTTPConnection)
    assert pools["http"] is not urllib3.HTTPConnectionPool


def test_a_connection_cut_while_the_body_goes_out_is_an_uncertain_call() -> None:
    """The provider reads part of a 25 MB batch and drops the connection (a reset): the send
    of the pieces fails at once, not after a timeout, and the call is uncertain (some of the
    body, and so perhaps the request, may have been taken), never a hang or a success."""
    import socket
    import struct

    from digest.config import Delivery
    from digest.delivery.providers.base import PreparedCall, UncertainDeliveryError
    from digest.delivery.providers.postmark import PostmarkProvider

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    taken: list[int] = []

    def cut() -> None:
        conn, _ = listener.accept()
        total = 0
        while total < 200_000:
            total += len(conn.recv(65536))
        taken.append(total)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        conn.close()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="t", base_url=url, timeout=10))
    body = BodyParts([b"[" + b"x" * 50_000] * 500 + [b"]"])
    call = PreparedCall("POST", f"{url}/email/batch", {"Content-Type": "application/json"}, body, ())
    try:
        with pytest.raises(UncertainDeliveryError):
            provider.perform(call)
    finally:
        thread.join(5)
        listener.close()
    assert taken and taken[0] < len(body)
