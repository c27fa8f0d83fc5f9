"""A local HTTP server that plays an email provider's API, with fault injection.

It speaks real HTTP/1.1 with keep-alive on 127.0.0.1 (an ephemeral port), so a provider class
is tested through ``requests`` exactly as in production. Postmark is built in; other providers
add their routes with :meth:`FakeProviderServer.route`::

    with FakeProviderServer(token="t0k") as srv:
        provider = PostmarkProvider(Delivery(provider="postmark", api_key="t0k", base_url=srv.url))
        srv.faults.append(("status", 429, {"Retry-After": "1"}))   # the next request gets a 429
        ...
        assert [m["To"] for m in srv.messages] == [...]

Faults (``srv.faults`` is a deque; each request takes the next one, whatever its path):

``("status", code[, headers[, json_body]])``
    answer ``code`` at once (default body ``{"ErrorCode": code, "Message": ...}``); nothing is
    recorded.
``("delay", seconds)``
    handle the request (messages **are** recorded as accepted), then wait before answering:
    with a shorter client timeout, the client cannot know the messages were accepted.
``("reset",)`` or ``("reset", "before")`` / ``("reset", "after")``
    close the connection without answering (RST), before or after recording the messages.
``("garbage",)``
    record the messages, then answer 200 with a body that is not JSON.
``("partial", {index: (error_code, message)})``
    the handler answers those messages with that error instead of accepting them.

``srv.inactive`` is a set of addresses that always get Postmark's 406 (inactive recipient).

Why the server writes each response with one ``sendall`` and sets TCP_NODELAY: a response
written in two segments (headers, then body) on a keep-alive connection waits on the client's
delayed ACK, adding ~40 ms to every call, which would make throughput tests measure Nagle.

``light=True`` skips JSON parsing of batches (ledger ids are pulled out with a regex and every
message is accepted): use it in benchmarks so the fake is not the bottleneck.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

Fault = tuple[Any, ...]


@dataclass
class Request:
    """One request as the fake saw it. Header names are lower case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    size: int
    fault: Fault | None = None  # a handler-specific fault ("partial") for this request

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """What a route answers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def of_json(cls, status: int, data: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(data).encode(), dict(headers or {}))


Route = Callable[["FakeProviderServer", Request], Reply]


class FakeProviderServer:
    """A threaded fake provider API; see the module docstring. Start with ``with`` or start()."""

    def __init__(
        self, *, token: str = "test-token", light: bool = False, host: str = "127.0.0.1"
    ) -> None:
        self.token = token
        self.light = light
        self.faults: deque[Fault] = deque()
        self.inactive: set[str] = set()
        self.messages: list[dict[str, Any]] = []  # accepted messages, in order (not in light mode)
        self.ledger_ids: list[int] = []  # Metadata.ledger_id of every accepted message
        self.requests: list[Request] = []  # every request (bodies dropped in light mode)
        self.routes: dict[tuple[str, str], Route] = {}
        self.connections_opened = 0  # TCP connections accepted: shows whether keep-alive works
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server((host, 0), _Handler, self)
        self._thread: threading.Thread | None = None
        install_postmark(self)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-provider",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- configuration and records ---------------------------------------------------------
    def route(self, method: str, path: str, handler: Route) -> None:
        """Answer ``method path`` with ``handler`` (how another provider plugs in)."""
        self.routes[(method.upper(), path)] = handler

    def accept(self, message: dict[str, Any] | None, ledger_id: int | None) -> None:
        """Record one accepted message (thread-safe); routes call this."""
        with self.lock:
            if message is not None:
                self.messages.append(message)
            if ledger_id is not None:
                self.ledger_ids.append(ledger_id)

    def clear(self) -> None:
        """Forget recorded messages, requests and pending faults."""
        with self.lock:
            self.messages.clear()
            self.ledger_ids.clear()
            self.requests.clear()
            self.faults.clear()

    def _record(self, request: Request) -> None:
        kept = request
        if self.light:  # a benchmark sends gigabytes; keep only the sizes
            kept = Request(
                request.method, request.path, request.query, request.headers, b"", request.size
            )
        with self.lock:
            self.requests.append(kept)

    def _next_fault(self) -> Fault | None:
        try:
            return self.faults.popleft()
        except IndexError:
            return None

    def _dispatch(self, request: Request) -> Reply:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return Reply.of_json(
                404, {"ErrorCode": 404, "Message": f"no route {request.method} {request.path}"}
            )
        return handler(self, request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a thread stuck in a "delay" fault must not block close()
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        fake: FakeProviderServer,
    ):
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.connections_lock:
            self.connections.add(sock)
            self.fake.connections_opened += 1
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections."""
        with self.connections_lock:
            socks = list(self.connections)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 60  # an idle keep-alive connection's thread ends after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        fault = fake._next_fault()
        kind = fault[0] if fault else None
        request = Request(
            method=self.command,
            path=path,
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            size=len(body),
            fault=fault if kind == "partial" else None,
        )
        fake._record(request)
        if fault is not None and kind == "reset" and fault[1:] in ((), ("before",)):
            self._reset()
            return
        if fault is not None and kind == "status":
            code = int(fault[1])
            headers = dict(fault[2]) if len(fault) > 2 else {}
            data = (
                fault[3]
                if len(fault) > 3
                else {"ErrorCode": code, "Message": f"injected HTTP {code}"}
            )
            self._write(Reply.of_json(code, data, headers))
            return
        reply = fake._dispatch(request)
        if kind == "reset":  # ("reset", "after"): the messages were recorded
            self._reset()
            return
        if kind == "garbage":
            reply = Reply(
                200,
                b"<html><body>502 Bad Gateway (not JSON)</body></html>",
                content_type="text/html",
            )
        if fault is not None and kind == "delay":
            fake._stopping.wait(float(fault[1]))
        self._write(reply)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _reset(self) -> None:
        # SO_LINGER 0: closing sends RST, as a crashed proxy or provider would.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _write(self, reply: Reply) -> None:
        try:
            reason = HTTPStatus(reply.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [
            f"HTTP/1.1 {reply.status} {reason}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
        ]
        lines += [f"{k}: {v}" for k, v in reply.headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body
        try:
            self.wfile.write(data)  # one sendall: no delayed-ACK stall between headers and body
        except OSError:  # the client gave up (a "delay" fault outlived its timeout)
            self.close_connection = True


# -- Postmark -------------------------------------------------------------------------------

POSTMARK_MAX_BATCH = 500
_LEDGER_ID_RE = re.compile(rb'"ledger_id":\s*"(\d+)"')


def install_postmark(srv: FakeProviderServer) -> None:
    """Routes that play Postmark: POST /email/batch, POST /email, GET /server."""
    srv.route("POST", "/email/batch", postmark_batch)
    srv.route("POST", "/email", postmark_single)
    srv.route("GET", "/server", postmark_server)


def _postmark_auth(srv: FakeProviderServer, request: Request) -> Reply | None:
    if request.headers.get("x-postmark-server-token") != srv.token:
        return Reply.of_json(
            401,
            {
                "ErrorCode": 10,
                "Message": "The Server Token you provided in the X-Postmark-Server-Token "
                "header was invalid.",
            },
        )
    return None


def postmark_batch(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /email/batch: 200 with one result per message, in order."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    overrides: dict[int, tuple[int, str]] = dict(request.fault[1]) if request.fault else {}
    if srv.light:
        return _postmark_batch_light(srv, request, overrides)
    try:
        data = request.json()
    except ValueError:
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if not isinstance(data, list):
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if len(data) > POSTMARK_MAX_BATCH:
        return Reply.of_json(422, {"ErrorCode": 410, "Message": "Too many batch messages."})
    return Reply.of_json(
        200, [_postmark_one(srv, item, overrides.get(i)) for i, item in enumerate(data)]
    )


def _postmark_batch_light(
    srv: FakeProviderServer, request: Request, overrides: dict[int, tuple[int, str]]
) -> Reply:
    out: list[bytes] = []
    for i, match in enumerate(_LEDGER_ID_RE.finditer(request.body)):
        if i in overrides:
            code, text = overrides[i]
            out.append(json.dumps({"ErrorCode": code, "Message": text}).encode())
            continue
        srv.accept(None, int(match.group(1)))
        out.append(
            b'{"ErrorCode":0,"Message":"OK","MessageID":"%s","To":""}' % uuid.uuid4().hex.encode()
        )
    return Reply(200, b"[" + b",".join(out) + b"]")


def _postmark_one(
    srv: FakeProviderServer, item: Any, override: tuple[int, str] | None
) -> dict[str, Any]:
    if override is not None:
        return {"ErrorCode": override[0], "Message": override[1]}
    if not isinstance(item, dict):
        return {"ErrorCode": 402, "Message": "Received invalid JSON input."}
    to = item.get("To")
    address = parseaddr(to)[1].lower() if isinstance(to, str) else ""
    if "@" not in address:
        return {"ErrorCode": 300, "Message": f"Invalid 'To' address: '{to}'."}
    if address in {a.lower() for a in srv.inactive}:
        return {
            "ErrorCode": 406,
            "Message": "You tried to send to a recipient that has been marked as inactive. "
            f"Found inactive addresses: {address}. Inactive recipients are ones that have "
            "generated a hard bounce or a spam complaint. ",
        }
    if not item.get("From"):
        return {"ErrorCode": 300, "Message": "Invalid 'From' address: ''."}
    if not item.get("HtmlBody") and not item.get("TextBody"):
        return {"ErrorCode": 300, "Message": "Provide either email TextBody or HtmlBody or both."}
    message_id = str(uuid.uuid4())
    metadata = item.get("Metadata") or {}
    ledger = metadata.get("ledger_id") if isinstance(metadata, dict) else None
    srv.accept(
        {**item, "MessageID": message_id}, int(ledger) if str(ledger or "").isdigit() else None
    )
    return {
        "ErrorCode": 0,
        "Message": "OK",
        "MessageID": message_id,
        "SubmittedAt": datetime.now(UTC).isoformat(),
        "To": to,
    }


def postmark_single(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /email: one message; errors are HTTP 422 with the ErrorCode."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    try:
        item = request.json()
    except ValueError:
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    result = _postmark_one(srv, item, None)
    return Reply.of_json(200 if result["ErrorCode"] == 0 else 422, result)


def postmark_server(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /server: the server's settings (we return a few fields)."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    return Reply.of_json(
        200, {"ID": 1, "Name": "Fake Postmark", "Color": "Blue", "DeliveryType": "Live"}
    )
