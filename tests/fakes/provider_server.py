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
    answer ``code`` at once; nothing is recorded. Without ``json_body`` the body (and any
    header the provider adds, such as SES's ``x-amzn-ErrorType``) is the error shape of the
    provider whose route the request was for (see :meth:`FakeProviderServer.route`), Postmark's
    ``{"ErrorCode": code, "Message": ...}`` otherwise; ``headers`` are added to it.
``("delay", seconds)``
    handle the request (messages **are** recorded as accepted), then wait before answering:
    with a shorter client timeout, the client cannot know the messages were accepted.
``("reset",)`` or ``("reset", "before")`` / ``("reset", "after")``
    close the connection without answering (RST), before or after recording the messages.
``("garbage",)``
    record the messages, then answer 200 with a body that is not JSON.
``("gateway", code[, headers])``
    handle the request (messages **are** recorded as accepted), then answer ``code`` (502, 504,
    Cloudflare's 524 ...) with a proxy's HTML page instead of the provider's answer, as a load
    balancer in front of the provider does when the provider's answer is lost or late. (A
    ``("status", 504)`` is a gateway that never passed the request on: nothing is recorded.)
``("partial", {index: (error_code, message)})``
    the handler answers those messages with that error instead of accepting them.
``("hold", event)``
    handle the request (messages recorded), add it to ``srv.held``, then answer only once the
    ``threading.Event`` is set (or the server closes): a test waits until ``srv.held`` holds the
    requests it expects, and then knows exactly what is in flight (no timing involved).
``("hold", event, code)``
    the same, but answer ``code`` as a ``("status", code)`` fault does: nothing is recorded.
``("pass",)``
    no fault: a placeholder, so that a fault meets the n-th request and not the first.

Every request records, in ``Request.ledger_ids``, the ledger ids of the messages accepted while
handling it (not in light mode): which readers a given call delivered, even with calls in flight
side by side.

``srv.inactive`` is a set of addresses that always get Postmark's 406 (inactive recipient).

Other providers plug in with ``install_sendgrid(srv)``, ``install_mailgun(srv, domain=...)``,
``install_ses(srv, ...)`` and ``install_resend(srv)`` (routes at the providers' own paths, so
they coexist with Postmark's). Each checks its provider's auth, parses the request the way the
provider does, records one entry in ``srv.messages`` per **reader** (for SendGrid and Mailgun,
after applying the substitutions the provider would apply, so a test sees exactly what each
reader got) with ``srv.ledger_ids`` alongside, and honours the fault queue. For SES,
``srv.ses_rejected`` maps an address to a ``MessageRejected`` message and ``srv.ses_identities``
says which From identities SES will send as (None: all); Resend remembers
idempotency keys in ``srv.idempotency``.

Why the server writes each response with one ``sendall`` and sets TCP_NODELAY: a response
written in two segments (headers, then body) on a keep-alive connection waits on the client's
delayed ACK, adding ~40 ms to every call, which would make throughput tests measure Nagle.

``light=True`` skips JSON parsing of batches (ledger ids are pulled out with a literal search,
or a regex, and every message is accepted) and keeps only ledger ids, not messages: use it in
benchmarks so the fake is not the bottleneck. Mailgun's light path reads a batch's ledger ids
from recipient-variables without parsing the form (it checks their number against the ``to``
fields); a single message still has its form parsed and only its ledger id substituted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote

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
    ledger_ids: list[int] = field(default_factory=list)  # accepted while handling it

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


# Reason phrases of statuses http.HTTPStatus does not know: Cloudflare's and some proxies'.
_OTHER_PHRASES = {
    520: "Web Server Returned an Unknown Error", 521: "Web Server Is Down", 522: "Connection Timed Out",
    523: "Origin Is Unreachable", 524: "A Timeout Occurred", 525: "SSL Handshake Failed",
    526: "Invalid SSL Certificate", 527: "Railgun Error", 530: "Origin Error",
    598: "Network Read Timeout Error", 599: "Network Connect Timeout Error",
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return _OTHER_PHRASES.get(status, "Unknown")


Route = Callable[["FakeProviderServer", Request], Reply]
# A provider's error answer for an HTTP status (what a "status" fault answers on its routes).
ErrorReply = Callable[[int], Reply]


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
        self.error_replies: dict[tuple[str, str], ErrorReply] = {}
        self.held: list[Request] = []  # requests a ("hold", event) fault holds, or held
        self._local = threading.local()  # the request being handled in this handler thread
        self.connections_opened = 0  # TCP connections accepted: shows whether keep-alive works
        # Provider-specific state for the routes below (unused by Postmark).
        self.ses_rejected: dict[str, str] = {}  # address -> SES MessageRejected message
        # SES identities (addresses, domains; lower case) -> verified? None: every From is
        # verified and every identity looked up is (the fake models none).
        self.ses_identities: dict[str, bool] | None = None
        self.ses_credentials: tuple[str, str, str] = ("AKIDEXAMPLE", token, "us-east-1")
        self.idempotency: dict[str, tuple[str, Reply]] = {}  # Resend: key -> (body hash, reply)
        self.mailgun_domain = "mg.example.org"
        self.templates: dict[str, dict[str, Any]] = {}  # Postmark: alias -> template
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
    def route(self, method: str, path: str, handler: Route, error: ErrorReply | None = None) -> None:
        """Answer ``method path`` with ``handler`` (how another provider plugs in); ``error``
        gives the provider's error answer for a status, for ``("status", code)`` faults."""
        self.routes[(method.upper(), path)] = handler
        if error is not None:
            self.error_replies[(method.upper(), path)] = error

    def accept(self, message: dict[str, Any] | None, ledger_id: int | None) -> None:
        """Record one accepted message (thread-safe); routes call this."""
        current: Request | None = getattr(self._local, "request", None)
        with self.lock:
            if message is not None:
                self.messages.append(message)
            if ledger_id is not None:
                self.ledger_ids.append(ledger_id)
                if current is not None:
                    current.ledger_ids.append(ledger_id)

    def accept_many(self, ledger_ids: list[int]) -> None:
        """Record many accepted messages that are not kept (light mode), taking the lock once."""
        current: Request | None = getattr(self._local, "request", None)
        with self.lock:
            self.ledger_ids.extend(ledger_ids)
            if current is not None:
                current.ledger_ids.extend(ledger_ids)

    def clear(self) -> None:
        """Forget recorded messages, requests and pending faults."""
        with self.lock:
            self.messages.clear()
            self.ledger_ids.clear()
            self.requests.clear()
            self.faults.clear()
            self.idempotency.clear()
            self.held.clear()

    def _record(self, request: Request) -> Request:
        """Keep ``request`` in :attr:`requests` (without its body in light mode); the kept one."""
        kept = request
        if self.light:  # a benchmark sends gigabytes; keep only the sizes
            kept = Request(
                request.method, request.path, request.query, request.headers, b"", request.size
            )
        with self.lock:
            self.requests.append(kept)
        return kept

    def _error_reply(self, request: Request, code: int, headers: dict[str, str]) -> Reply:
        """What a ("status", code) fault answers: the route's provider's error shape, if it
        has one, else Postmark's; with ``headers`` added."""
        shape = self.error_replies.get((request.method, request.path))
        if shape is not None:
            reply = shape(code)
        else:
            reply = Reply.of_json(code, {"ErrorCode": code, "Message": f"injected HTTP {code}"})
        reply.headers.update(headers)
        return reply

    def _next_fault(self) -> Fault | None:
        try:
            return self.faults.popleft()
        except IndexError:
            return None

    def _dispatch(self, request: Request) -> Reply:
        handler = self.routes.get((request.method, request.path))
        if handler is None:  # a route for a path with an id at its end: "/templates/*"
            handler = self.routes.get((request.method, request.path.rpartition("/")[0] + "/*"))
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
        kept = fake._record(request)
        if fault is not None and kind == "reset" and fault[1:] in ((), ("before",)):
            self._reset()
            return
        if fault is not None and kind == "hold" and len(fault) > 2:
            with fake.lock:
                fake.held.append(kept)
            while not fault[1].wait(0.05) and not fake._stopping.is_set():
                pass
            self._write(fake._error_reply(request, int(fault[2]), {}))
            return
        if fault is not None and kind == "status":
            code = int(fault[1])
            headers = dict(fault[2]) if len(fault) > 2 else {}
            if len(fault) > 3:
                self._write(Reply.of_json(code, fault[3], headers))
            else:
                self._write(fake._error_reply(request, code, headers))
            return
        # So that accept() notes the ledger ids on this request (not in a benchmark: light).
        fake._local.request = None if fake.light else kept
        try:
            reply = fake._dispatch(request)
        finally:
            fake._local.request = None
        if fault is not None and kind == "hold":
            with fake.lock:
                fake.held.append(kept)
            released = fault[1]
            while not released.wait(0.05) and not fake._stopping.is_set():
                pass
        if kind == "reset":  # ("reset", "after"): the messages were recorded
            self._reset()
            return
        if kind == "garbage":
            reply = Reply(
                200,
                b"<html><body>502 Bad Gateway (not JSON)</body></html>",
                content_type="text/html",
            )
        if fault is not None and kind == "gateway":
            code = int(fault[1])
            phrase = _phrase(code)
            reply = Reply(
                code,
                f"<html><head><title>{code} {phrase}</title></head>"
                f"<body><h1>{code} {phrase}</h1></body></html>".encode(),
                dict(fault[2]) if len(fault) > 2 else {},
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
        reason = _phrase(reply.status)
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
    """Routes that play Postmark: POST /email/batch, POST /email, GET /server, and templates:
    POST /templates, GET and DELETE /templates/{alias}, POST /email/batchWithTemplates."""
    srv.route("POST", "/email/batch", postmark_batch)
    srv.route("POST", "/email", postmark_single)
    srv.route("GET", "/server", postmark_server)
    srv.route("POST", "/templates", postmark_create_template)
    srv.route("GET", "/templates/*", postmark_get_template)
    srv.route("DELETE", "/templates/*", postmark_delete_template)
    srv.route("POST", "/email/batchWithTemplates", postmark_batch_with_templates)


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
    early, overrides = _postmark_batch_start(srv, request)
    if early is not None:
        return early
    try:
        data = request.json()
    except ValueError:
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if not isinstance(data, list):
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if len(data) > POSTMARK_MAX_BATCH:
        return Reply.of_json(422, {"ErrorCode": 410, "Message": "Too many batch messages."})
    return Reply.of_json(
        200, [_postmark_one(srv, _postmark_placeholders(item), overrides.get(i)) for i, item in enumerate(data)]
    )


# Postmark's unsubscribe placeholder in a message sent without a template: Postmark puts its
# own unsubscribe link there, in the HTML and the text (postmarkapp.com support article 1208).
_PM_UNSUBSCRIBE_RE = re.compile(r'\{\{\{\s*pm:unsubscribe(?:\s+label="[^"]*")?\s*\}\}\}')
PM_UNSUBSCRIBE_URL = "https://pm.example/unsubscribe/"


def _postmark_placeholders(item: Any) -> Any:
    """``item`` with Postmark's unsubscribe placeholder in HtmlBody and TextBody replaced by
    a link, as Postmark does for a message without a template."""
    if not isinstance(item, dict):
        return item
    out = dict(item)
    for key in ("HtmlBody", "TextBody"):
        if isinstance(out.get(key), str):
            out[key] = _PM_UNSUBSCRIBE_RE.sub(PM_UNSUBSCRIBE_URL + uuid.uuid4().hex, out[key])
    return out


def _postmark_batch_start(
    srv: FakeProviderServer, request: Request
) -> tuple[Reply | None, dict[int, tuple[int, str]]]:
    """What both batch endpoints do first: the token's check, the per-message overrides of a
    ("partial", ...) fault, and in light mode the whole answer. A reply when that is the
    answer already, else None; and the overrides."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused, {}
    overrides: dict[int, tuple[int, str]] = dict(request.fault[1]) if request.fault else {}
    if srv.light:
        return _postmark_batch_light(srv, request, overrides), overrides
    return None, overrides


def _postmark_batch_light(
    srv: FakeProviderServer, request: Request, overrides: dict[int, tuple[int, str]]
) -> Reply:
    ledger_ids = postmark_ledger_ids(request.body)
    # Random 32-hex-digit ids like uuid4().hex, drawn in one call: a uuid4 per message cost
    # more than the rest of the answer.
    random_hex = os.urandom(16 * len(ledger_ids)).hex()
    out: list[bytes] = []
    accepted: list[int] = []
    for i, ledger_id in enumerate(ledger_ids):
        if i in overrides:
            code, text = overrides[i]
            out.append(json.dumps({"ErrorCode": code, "Message": text}).encode())
            continue
        accepted.append(ledger_id)
        out.append(
            b'{"ErrorCode":0,"Message":"OK","MessageID":"%s","To":""}'
            % random_hex[32 * i : 32 * i + 32].encode()
        )
    srv.accept_many(accepted)
    return Reply(200, b"[" + b",".join(out) + b"]")


# Every message our Postmark builder writes carries exactly this, once, right before its ledger
# id. Inside a JSON string every quote is escaped, so these bytes can only be the Metadata key
# itself, never part of a subject or body.
_POSTMARK_LEDGER_MARK = b'"Metadata":{"ledger_id":"'


def postmark_ledger_ids(body: bytes) -> list[int]:
    """The Metadata ledger ids of a ``/email/batch`` body, in order, without parsing it.

    Why ``find`` and not a regular expression: a batch is ~25 MB, and a literal search runs
    several times faster than the regex engine over it, which otherwise bounds what a
    benchmark can measure. Bodies written by hand (spaces after colons, other key order) fall
    back to the regex.
    """
    ids: list[int] = []
    find = body.find
    skip = len(_POSTMARK_LEDGER_MARK)
    at = find(_POSTMARK_LEDGER_MARK)
    if at < 0:
        return [int(m.group(1)) for m in _LEDGER_ID_RE.finditer(body)]
    while at >= 0:
        start = at + skip
        end = find(b'"', start)
        if end < 0:
            break
        digits = body[start:end]
        if digits.isdigit():
            ids.append(int(digits))
        at = find(_POSTMARK_LEDGER_MARK, end)
    return ids


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
    result = _postmark_one(srv, _postmark_placeholders(item), None)
    return Reply.of_json(200 if result["ErrorCode"] == 0 else 422, result)


# -- Postmark templates ---------------------------------------------------------------------

# Mustachio's tags (ActiveCampaign/mustachio, Tokenizer.cs): two or three opening braces, one
# or more characters that are not braces, as many closing ones. Everything else is content.
_MUSTACHIO_TAG_RE = re.compile(r"\{\{\{[^{}]+?\}\}\}|\{\{[^{}]+?\}\}")
# A path Mustachio accepts: word characters, dots and slashes (it refuses the template else).
_MUSTACHIO_PATH_RE = re.compile(r"[\w./]+")
# Not Postmark's documented code (none was found): what this fake answers for a taken alias.
POSTMARK_ALIAS_TAKEN = 1122


def mustachio_parse(template: str) -> list[tuple[str, str]] | str:
    """``template`` as ``("content", text)``, ``("raw", path)`` and ``("escaped", path)``
    pieces, or the reason Postmark would refuse it. Sections, partials and anything else this
    fake does not implement are refused too: our templates never use them, so one seen here
    came from content that should have stayed content."""
    pieces: list[tuple[str, str]] = []
    at = 0
    for match in _MUSTACHIO_TAG_RE.finditer(template):
        if match.start() > at:
            pieces.append(("content", template[at:match.start()]))
        at = match.end()
        tag = match.group(0)
        if tag.startswith("{{{"):
            kind, path = "raw", tag[3:-3].strip()
        elif tag.startswith("{{&"):
            kind, path = "raw", tag[3:-2].strip()
        elif tag.startswith("{{!"):
            continue  # a comment
        elif tag[2] in "#^/>":
            return f"unsupported tag {tag!r}"
        else:
            kind, path = "escaped", tag[2:-2].strip()
        if not _MUSTACHIO_PATH_RE.fullmatch(path):
            return f"The path '{path}' is not valid."
        pieces.append((kind, path))
    if at < len(template):
        pieces.append(("content", template[at:]))
    return pieces


def mustachio_render(template: str, model: dict[str, Any], *, html: bool) -> str:
    """``template`` filled from ``model`` as Postmark would: ``{{{x}}}`` as it is, ``{{x}}``
    HTML-escaped in an HTML body; a missing value is empty."""
    import html as _html

    pieces = mustachio_parse(template)
    assert not isinstance(pieces, str), pieces  # checked when the template was created
    out = []
    for kind, value in pieces:
        if kind == "content":
            out.append(value)
            continue
        filled = str(model.get(value, ""))
        out.append(_html.escape(filled, quote=True) if kind == "escaped" and html else filled)
    return "".join(out)


def postmark_create_template(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /templates: 200 with the new template's id; 422 for a taken alias or a template
    Mustachio cannot parse."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    try:
        data = request.json()
    except ValueError:
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    alias = str(data.get("Alias") or "")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", alias) or data.get("TemplateType") not in (None, "Standard"):
        return Reply.of_json(422, {"ErrorCode": 1120, "Message": "Invalid template alias or type."})
    for field_name in ("Subject", "HtmlBody", "TextBody"):
        problem = mustachio_parse(str(data.get(field_name) or ""))
        if isinstance(problem, str):
            return Reply.of_json(422, {"ErrorCode": 1105, "Message": f"{field_name}: {problem}"})
    with srv.lock:
        if alias in srv.templates:
            return Reply.of_json(422, {"ErrorCode": POSTMARK_ALIAS_TAKEN,
                                       "Message": f"The alias '{alias}' is already in use."})
        template_id = len(srv.templates) + 1000
        srv.templates[alias] = {**data, "TemplateId": template_id, "Active": True}
    return Reply.of_json(200, {"TemplateId": template_id, "Name": data.get("Name"), "Alias": alias,
                               "Active": True})


def postmark_get_template(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /templates/{alias}: the template, or 404."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    template = srv.templates.get(request.path.rpartition("/")[2])
    if template is None:
        return Reply.of_json(404, {"ErrorCode": 1101, "Message": "Template not found."})
    return Reply.of_json(200, template)


def postmark_delete_template(srv: FakeProviderServer, request: Request) -> Reply:
    """DELETE /templates/{alias}: 200, or 404 for a template that is not there."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    with srv.lock:
        template = srv.templates.pop(request.path.rpartition("/")[2], None)
    if template is None:
        return Reply.of_json(404, {"ErrorCode": 1101, "Message": "Template not found."})
    return Reply.of_json(200, {"ErrorCode": 0, "Message": f"Template {template['TemplateId']} removed."})


def postmark_batch_with_templates(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /email/batchWithTemplates: ``{"Messages": [...]}``, each rendered from its template
    and model as Postmark would (the record holds the result as ``Subject``, ``HtmlBody``,
    ``TextBody``, and ``html``/``text``); 200 with one result per message, in order."""
    early, overrides = _postmark_batch_start(srv, request)
    if early is not None:
        return early
    try:
        data = request.json()
    except ValueError:
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    items = data.get("Messages") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return Reply.of_json(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if len(items) > POSTMARK_MAX_BATCH:
        return Reply.of_json(422, {"ErrorCode": 410, "Message": "Too many batch messages."})
    results = []
    for i, item in enumerate(items):
        template = srv.templates.get(str(item.get("TemplateAlias"))) if isinstance(item, dict) else None
        if i in overrides or template is None or not isinstance(item.get("TemplateModel"), dict):
            results.append(_postmark_one(srv, item, overrides.get(i) or (
                1101, f"The template '{item.get('TemplateAlias') if isinstance(item, dict) else ''}' "
                "was not found.")))
            continue
        model = item["TemplateModel"]
        html = mustachio_render(str(template.get("HtmlBody") or ""), model, html=True)
        text = mustachio_render(str(template.get("TextBody") or ""), model, html=False)
        subject = mustachio_render(str(template.get("Subject") or ""), model, html=False)
        rendered = {key: value for key, value in item.items()
                    if key not in ("TemplateAlias", "TemplateId", "TemplateModel")}
        rendered.update(Subject=subject, HtmlBody=html, TextBody=text, html=html, text=text,
                        TemplateAlias=item.get("TemplateAlias"), InlineCss=item.get("InlineCss", True))
        results.append(_postmark_one(srv, rendered, None))
    return Reply.of_json(200, results)


def postmark_server(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /server: the server's settings (we return a few fields)."""
    refused = _postmark_auth(srv, request)
    if refused is not None:
        return refused
    return Reply.of_json(
        200, {"ID": 1, "Name": "Fake Postmark", "Color": "Blue", "DeliveryType": "Live"}
    )


# -- shared helpers for the other providers ---------------------------------------------------

_ANY_LEDGER_RE = re.compile(rb'"ledger_id"\s*[:,]\s*(?:"value"\s*:\s*)?"(\d+)"')


def _new_id() -> str:
    return uuid.uuid4().hex


def _bearer_ok(srv: FakeProviderServer, request: Request) -> bool:
    return request.headers.get("authorization") == f"Bearer {srv.token}"


_FORM_NAME_RE = re.compile(rb'name="([^"]*)"')


def parse_form(request: Request) -> list[tuple[str, str]]:
    """The fields of a ``multipart/form-data`` or urlencoded body, in order (repeats kept)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        return parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or not match:
        raise ValueError(f"not a form: {content_type!r}")
    delimiter = b"--" + match.group(1).encode("ascii")
    fields: list[tuple[str, str]] = []
    for chunk in request.body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, value = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a form part without a blank line")
        name = _FORM_NAME_RE.search(head)
        if name is None:
            raise ValueError("a form part without a name")
        fields.append((name.group(1).decode("utf-8"), value.removesuffix(b"\r\n").decode("utf-8")))
    return fields


# -- SendGrid ---------------------------------------------------------------------------------

SENDGRID_MAX_PERSONALIZATIONS = 1000


def install_sendgrid(srv: FakeProviderServer) -> None:
    """Routes that play SendGrid v3: POST /v3/mail/send, GET /v3/scopes (key: srv.token)."""
    srv.route("POST", "/v3/mail/send", sendgrid_send, sendgrid_status_error)
    srv.route("GET", "/v3/scopes", sendgrid_scopes, sendgrid_status_error)


def _sendgrid_error(status: int, *messages: str) -> Reply:
    return Reply.of_json(
        status, {"errors": [{"message": m, "field": None, "help": None} for m in messages]}
    )


def sendgrid_status_error(status: int) -> Reply:
    """SendGrid's error shape for a status (a 429 when a limit is reached, a 5xx ...)."""
    if status == 429:
        return _sendgrid_error(429, "too many requests")
    if status >= 500:
        return _sendgrid_error(status, "internal error")
    return _sendgrid_error(status, f"HTTP {status}")


def _sendgrid_auth(srv: FakeProviderServer, request: Request) -> Reply | None:
    if not _bearer_ok(srv, request):
        return _sendgrid_error(
            401, "The provided authorization grant is invalid, expired, or revoked"
        )
    return None


def sendgrid_send(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /v3/mail/send: 202 and X-Message-Id; one record per personalization, substituted."""
    refused = _sendgrid_auth(srv, request)
    if refused is not None:
        return refused
    message_id = _new_id()[:22]
    if srv.light:
        srv.accept_many([int(m) for m in _ANY_LEDGER_RE.findall(request.body)])
        return Reply(202, b"", {"X-Message-Id": message_id})
    try:
        data = request.json()
    except ValueError:
        return _sendgrid_error(400, "Bad Request")
    personalizations = data.get("personalizations") if isinstance(data, dict) else None
    if not isinstance(personalizations, list) or not personalizations:
        return _sendgrid_error(400, "You must have at least one personalization.")
    if len(personalizations) > SENDGRID_MAX_PERSONALIZATIONS:
        return _sendgrid_error(
            400,
            "The personalization block is limited to 1000 personalizations per API request.",
        )
    if not isinstance(data.get("from"), dict) or "@" not in str(data["from"].get("email", "")):
        return _sendgrid_error(400, "The from object must be provided for every email send.")
    content = {c.get("type"): c.get("value") for c in data.get("content") or []}
    if not content or any(not v for v in content.values()):
        return _sendgrid_error(
            400, "The content value must be a string at least one character in length."
        )
    seen: set[str] = set()
    for p in personalizations:
        to = p.get("to") or []
        if len(to) != 1 or "@" not in str(to[0].get("email", "")):
            return _sendgrid_error(400, "Each to object must at least have an email address.")
        address = str(to[0]["email"]).lower()
        if address in seen:
            return _sendgrid_error(
                400,
                "Each unique email address in the personalizations array should only be "
                "included once.",
            )
        seen.add(address)
        for v in {**(p.get("custom_args") or {}), **(p.get("substitutions") or {})}.values():
            if not isinstance(v, str):
                return _sendgrid_error(400, "Bad Request")  # SendGrid wants strings there
    for p in personalizations:
        subs: dict[str, str] = p.get("substitutions") or {}

        def apply(text: str | None, subs: dict[str, str] = subs) -> str | None:
            if text is None:
                return None
            for key, value in subs.items():  # SendGrid replaces only the keys given
                text = text.replace(key, value)
            return text

        custom_args = {**(data.get("custom_args") or {}), **(p.get("custom_args") or {})}
        record = {
            "to": p["to"][0]["email"],
            "name": p["to"][0].get("name"),
            "from": data["from"],
            "reply_to": data.get("reply_to"),
            "subject": apply(p.get("subject") or data.get("subject")),
            "html": apply(content.get("text/html")),
            "text": apply(content.get("text/plain")),
            "headers": {**(data.get("headers") or {}), **(p.get("headers") or {})},
            "custom_args": custom_args,
            "categories": data.get("categories"),
            "tracking_settings": data.get("tracking_settings"),
            "X-Message-Id": message_id,
        }
        ledger = str(custom_args.get("ledger_id", ""))
        srv.accept(record, int(ledger) if ledger.isdigit() else None)
    return Reply(202, b"", {"X-Message-Id": message_id})


def sendgrid_scopes(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /v3/scopes: what the key may do."""
    refused = _sendgrid_auth(srv, request)
    if refused is not None:
        return refused
    return Reply.of_json(200, {"scopes": ["mail.send", "scopes.read"]})


# -- Mailgun ----------------------------------------------------------------------------------

MAILGUN_MAX_RECIPIENTS = 1000
_MAILGUN_RECIPIENT_RE = re.compile(r"%recipient\.([^%\s]+)%")
_MAILGUN_UNSUBSCRIBE_RE = re.compile(r"%(?:tag_|mailing_list_)?unsubscribe_url%")
# Mailgun's own variables for the reader a copy goes to (its docs list them for mailing lists).
_MAILGUN_READER_RE = re.compile(r"%(recipient|recipient_email|recipient_name|recipient_fname|"
                                r"recipient_lname|unsubscribe_email)%")


def install_mailgun(srv: FakeProviderServer, domain: str = "mg.example.org") -> None:
    """Routes that play Mailgun for ``domain``: POST /v3/<domain>/messages and GET
    /v3/domains/<domain> (basic auth ``api:<srv.token>``)."""
    srv.mailgun_domain = domain
    srv.route("POST", f"/v3/{domain}/messages", mailgun_send, mailgun_status_error)
    srv.route("GET", f"/v3/domains/{domain}", mailgun_domain, mailgun_status_error)


def mailgun_status_error(status: int) -> Reply:
    """Mailgun's error shape for a status: ``{"message": ...}``."""
    text = {429: "Too many requests", 500: "Internal Server Error"}.get(status, f"HTTP {status}")
    return Reply.of_json(status, {"message": text})


def _mailgun_auth(srv: FakeProviderServer, request: Request) -> Reply | None:
    expected = "Basic " + base64.b64encode(f"api:{srv.token}".encode()).decode()
    if request.headers.get("authorization") != expected:
        return Reply(401, b"Forbidden", content_type="text/plain")
    return None


def mailgun_send(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /v3/<domain>/messages: one record per ``to``, with %recipient.x% substituted."""
    refused = _mailgun_auth(srv, request)
    if refused is not None:
        return refused
    if srv.light and b'name="recipient-variables"' in request.body:
        return _mailgun_batch_light(srv, request.body)
    try:
        fields = parse_form(request)
    except (ValueError, UnicodeDecodeError):
        return Reply.of_json(400, {"message": "Bad request"})
    tos = [v for n, v in fields if n == "to"]
    single = {n: v for n, v in fields if n != "to"}
    tags = [v for n, v in fields if n == "o:tag"]
    if not single.get("from"):
        return Reply.of_json(400, {"message": "from parameter is missing"})
    if not tos:
        return Reply.of_json(400, {"message": "to parameter is missing"})
    if len(tos) > MAILGUN_MAX_RECIPIENTS:
        return Reply.of_json(400, {"message": "Too many recipients"})
    if not single.get("text") and not single.get("html"):
        return Reply.of_json(
            400, {"message": "Need at least one of 'text' or 'html' parameters specified"}
        )
    # Light mode takes the plain "Name <address>" shape without parseaddr: ~14 µs a reader, the
    # fake's largest cost after the bodies; anything else still goes through parseaddr.
    address_of = _mailbox_address if srv.light else _parsed_address
    addresses = [address_of(to) for to in tos]
    if any("@" not in address for address in addresses):
        return Reply.of_json(
            400,
            {"message": "'to' parameter is not a valid address. please check documentation"},
        )
    try:
        variables: dict[str, dict[str, str]] = json.loads(single.get("recipient-variables", "{}"))
    except ValueError:
        return Reply.of_json(400, {"message": "recipient-variables parameter is not a valid JSON"})
    message_id = f"<{datetime.now(UTC):%Y%m%d%H%M%S}.{_new_id()[:12]}@{srv.mailgun_domain}>"
    reply = Reply.of_json(200, {"id": message_id, "message": "Queued. Thank you."})
    batch = "recipient-variables" in single
    if srv.light:
        # Only the ledger ids are kept, so only v:ledger_id is substituted: filling every
        # reader's copy of the bodies was most of the 0.19 ms a reader this route took.
        ledger_template = single.get("v:ledger_id")
        # The usual "%recipient.ledger_id%" is a plain lookup, not a substitution per reader.
        whole = _MAILGUN_RECIPIENT_RE.fullmatch(ledger_template or "")
        key = whole.group(1) if whole else None
        ledger_ids: list[int] = []
        for address in addresses if batch else addresses[:1]:
            values = variables.get(address, {})
            if key is not None:
                ledger = str(values.get(key, ""))
            else:
                ledger = str(_mailgun_substitute(ledger_template, values, address) or "")
            if ledger.isdigit():
                ledger_ids.append(int(ledger))
        srv.accept_many(ledger_ids)
        return reply
    for to, address in zip(tos, addresses):
        values = variables.get(address, {})

        def apply(
            text: str | None, values: dict[str, str] = values, address: str = address
        ) -> str | None:
            return _mailgun_substitute(text, values, address)

        user_variables = {n[2:]: apply(v) for n, v in single.items() if n.startswith("v:")}
        record = {
            "to": address,
            # Without recipient-variables Mailgun sends one message listing every reader.
            "to_header": to if batch else ", ".join(tos),
            "from": single["from"],
            "subject": apply(single.get("subject")),
            "html": apply(single.get("html")),
            "text": apply(single.get("text")),
            "headers": {n[2:]: apply(v) for n, v in single.items() if n.startswith("h:")},
            "variables": user_variables,
            "tags": tags,
            "id": message_id,
        }
        ledger = str(user_variables.get("ledger_id") or "")
        srv.accept(record, int(ledger) if ledger.isdigit() else None)
        if not batch:
            break  # one message for everyone
    return reply


def _mailgun_substitute(text: str | None, values: dict[str, str], address: str) -> str | None:
    """``text`` as the reader at ``address`` gets it: %recipient.x% filled in from ``values``."""
    if text is None:
        return None
    text = _MAILGUN_RECIPIENT_RE.sub(lambda m: str(values.get(m.group(1), m.group(0))), text)
    text = _MAILGUN_READER_RE.sub(
        lambda m: f"unsubscribe+{address}@mailgun.fake" if m.group(1) == "unsubscribe_email" else address, text)
    # Mailgun's own unsubscribe variables become its own unsubscribe links.
    return _MAILGUN_UNSUBSCRIBE_RE.sub(f"https://mailgun.fake/unsubscribe/{address}", text)


# A display name without specials, then one address in angle brackets with none either: the
# shape our providers write. For it parseaddr returns exactly the bracketed address.
_PLAIN_MAILBOX_RE = re.compile(
    r'[^"()<>@,;:\\\[\]]*<([^\s"()<>@,;:\\\[\]]+@[^\s"()<>@,;:\\\[\]]+)>'
)


def _parsed_address(value: str) -> str:
    return parseaddr(value)[1]


def _mailgun_batch_light(srv: FakeProviderServer, body: bytes) -> Reply:
    """A benchmark's batch: each reader's ledger id read from recipient-variables with a
    literal search, checked against the number of ``to`` fields, without parsing the form.
    Parsing it (an 840 KB form for 1,000 readers) took 6 µs a reader, on the cores the
    sender being measured needs."""
    ledger_ids = [int(i) for i in _ANY_LEDGER_RE.findall(body)]
    if not ledger_ids or body.count(b'name="to"') != len(ledger_ids):
        return Reply.of_json(400, {"message": "recipient-variables do not match the 'to' parameters"})
    srv.accept_many(ledger_ids)
    message_id = f"<{datetime.now(UTC):%Y%m%d%H%M%S}.{_new_id()[:12]}@{srv.mailgun_domain}>"
    return Reply.of_json(200, {"id": message_id, "message": "Queued. Thank you."})


def _mailbox_address(value: str) -> str:
    """``parseaddr(value)[1]``, without parsing when ``value`` has the plain shape."""
    match = _PLAIN_MAILBOX_RE.fullmatch(value)
    return match.group(1) if match else parseaddr(value)[1]


def mailgun_domain(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /v3/domains/<domain>: the domain's settings (a few fields)."""
    refused = _mailgun_auth(srv, request)
    if refused is not None:
        return refused
    return Reply.of_json(
        200,
        {"domain": {"name": srv.mailgun_domain, "state": "active"}, "receiving_dns_records": []},
    )


# -- Amazon SES v2 ----------------------------------------------------------------------------

SES_ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazonaws.sesv2/"
_SES_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})"
)


def install_ses(
    srv: FakeProviderServer,
    *,
    access_key: str = "AKIDEXAMPLE",
    secret_key: str | None = None,
    region: str = "us-east-1",
) -> None:
    """Routes that play SES API v2: POST /v2/email/outbound-emails, GET /v2/email/account and
    GET /v2/email/identities/{identity}.

    Requests must carry a valid SigV4 signature for ``access_key``/``secret_key`` (default:
    srv.token) in ``region`` and service ``ses``; the fake recomputes it from the request
    exactly as received.
    """
    srv.ses_credentials = (access_key, secret_key or srv.token, region)
    srv.route("POST", "/v2/email/outbound-emails", ses_send, ses_status_error)
    srv.route("GET", "/v2/email/account", ses_account, ses_status_error)
    srv.route("GET", "/v2/email/identities/*", ses_identity, ses_status_error)


def ses_status_error(status: int) -> Reply:
    """SES's error shape for a status: the type in x-amzn-ErrorType (no Retry-After: SES
    sends none)."""
    if status == 429:
        return ses_error(429, "TooManyRequestsException", "Too Many Requests")
    if status == 503:
        return ses_error(503, "ServiceUnavailable", "Service is unavailable. Please try again later.")
    if status >= 500:
        return ses_error(status, "InternalFailure", "The request processing has failed because of an unknown error.")
    return ses_error(status, "BadRequestException", f"HTTP {status}")


def ses_error(status: int, kind: str, message: str) -> Reply:
    """An SES error answer: the type in x-amzn-ErrorType, the text in the body."""
    return Reply.of_json(
        status, {"message": message}, {"x-amzn-ErrorType": f"{kind}:{SES_ERROR_NAMESPACE}"}
    )


def _ses_auth(srv: FakeProviderServer, request: Request) -> Reply | None:
    from digest.delivery.providers.ses import canonical_request, signing_key

    access_key, secret_key, region = srv.ses_credentials
    match = _SES_AUTH_RE.fullmatch(request.headers.get("authorization", ""))
    if match is None:
        return ses_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    key, date, got_region, service, signed, signature = match.groups()
    if key != access_key:
        return ses_error(
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    amz_date = request.headers.get("x-amz-date", "")
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return ses_error(400, "IncompleteSignatureException", "X-Amz-Date is missing or malformed")
    if abs(datetime.now(UTC) - when) > timedelta(minutes=15) or date != amz_date[:8]:
        return ses_error(403, "InvalidSignatureException", "Signature expired")
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return ses_error(403, "InvalidSignatureException", "host and x-amz-date must be signed")
    headers = {n: request.headers.get(n, "") for n in names}
    url = f"http://{request.headers.get('host', '')}{request.path}" + (
        f"?{request.query}" if request.query else ""
    )
    canonical, _ = canonical_request(request.method, url, headers, request.body)
    scope = f"{date}/{got_region}/{service}/aws4_request"
    to_sign = "\n".join(
        ("AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    expected = hmac.new(
        signing_key(secret_key, date, region, "ses"), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    if got_region != region or service != "ses" or not hmac.compare_digest(expected, signature):
        return ses_error(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
    return None


def ses_send(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /v2/email/outbound-emails: one message; 200 {"MessageId"}."""
    refused = _ses_auth(srv, request)
    if refused is not None:
        return refused
    try:
        data = request.json()
        simple = data["Content"]["Simple"]
        to_addresses = data["Destination"]["ToAddresses"]
        sender = data["FromEmailAddress"]
    except (ValueError, KeyError, TypeError):
        return ses_error(400, "BadRequestException", "Invalid request")
    if not isinstance(to_addresses, list) or not to_addresses or len(to_addresses) > 50:
        return ses_error(400, "BadRequestException", "Destination must have 1 to 50 addresses")
    address = parseaddr(str(to_addresses[0]))[1].lower()
    if "@" not in address:
        return ses_error(400, "BadRequestException", f"Illegal address: {to_addresses[0]}")
    sender_address = parseaddr(str(sender))[1].lower()
    if not _ses_verified(srv, sender_address):
        # What SES answers every message from an identity not verified in its region.
        region = srv.ses_credentials[2].upper()
        return ses_error(400, "MessageRejected", "Email address is not verified. The following identities "
                         f"failed the check in region {region}: {sender}, {sender_address}")
    rejected = {a.lower(): m for a, m in srv.ses_rejected.items()}
    if address in rejected:
        return ses_error(400, "MessageRejected", rejected[address])
    tags = {t.get("Name"): t.get("Value") for t in data.get("EmailTags") or []}
    for value in tags.values():
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(value)):
            return ses_error(400, "BadRequestException", f"Invalid tag value {value!r}")
    message_id = f"0100{_new_id()}-000000"
    body = simple.get("Body") or {}
    record = {
        "to": to_addresses[0],
        "from": sender,
        "reply_to": data.get("ReplyToAddresses"),
        "subject": (simple.get("Subject") or {}).get("Data"),
        "html": (body.get("Html") or {}).get("Data"),
        "text": (body.get("Text") or {}).get("Data"),
        "headers": {h["Name"]: h["Value"] for h in simple.get("Headers") or []},
        "tags": tags,
        "configuration_set": data.get("ConfigurationSetName"),
        "MessageId": message_id,
    }
    ledger = str(tags.get("ledger_id") or "")
    srv.accept(None if srv.light else record, int(ledger) if ledger.isdigit() else None)
    return Reply.of_json(200, {"MessageId": message_id})


def _ses_verified(srv: FakeProviderServer, address: str) -> bool:
    """Whether SES sends as ``address``: it, or its domain, is a verified identity."""
    known = srv.ses_identities
    if known is None:
        return True
    return any(known.get(name) for name in (address, address.rpartition("@")[2]))


def ses_identity(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /v2/email/identities/{identity}: its type and verification status, or 404."""
    refused = _ses_auth(srv, request)
    if refused is not None:
        return refused
    name = unquote(request.path.rpartition("/")[2]).lower()
    known = srv.ses_identities
    if known is not None and name not in known:
        return ses_error(404, "NotFoundException", f"Email identity {name} does not exist.")
    verified = True if known is None else known[name]
    return Reply.of_json(200, {
        "IdentityType": "EMAIL_ADDRESS" if "@" in name else "DOMAIN",
        "VerifiedForSendingStatus": verified,
        "VerificationStatus": "SUCCESS" if verified else "PENDING",
    })


def ses_account(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /v2/email/account: quota and status."""
    refused = _ses_auth(srv, request)
    if refused is not None:
        return refused
    return Reply.of_json(
        200,
        {
            "SendingEnabled": True,
            "ProductionAccessEnabled": True,
            "EnforcementStatus": "HEALTHY",
            "SendQuota": {"Max24HourSend": 50000.0, "MaxSendRate": 14.0, "SentLast24Hours": 0.0},
        },
    )


# -- Resend -----------------------------------------------------------------------------------

RESEND_MAX_BATCH = 100


def install_resend(srv: FakeProviderServer) -> None:
    """Routes that play Resend: POST /emails/batch (with Idempotency-Key), GET /domains."""
    srv.route("POST", "/emails/batch", resend_batch, resend_status_error)
    srv.route("GET", "/domains", resend_domains, resend_status_error)


def resend_error(status: int, name: str, message: str) -> Reply:
    """A Resend error answer."""
    return Reply.of_json(status, {"statusCode": status, "name": name, "message": message})


def resend_status_error(status: int) -> Reply:
    """Resend's error shape for a status: ``rate_limit_exceeded`` for a 429,
    ``internal_server_error`` for a 5xx."""
    if status == 429:
        return resend_error(
            429, "rate_limit_exceeded", "Too many requests. You can only make 2 requests per second."
        )
    if status >= 500:
        return resend_error(status, "internal_server_error", "An unexpected error occurred.")
    return resend_error(status, "application_error", f"HTTP {status}")


def _resend_auth(srv: FakeProviderServer, request: Request) -> Reply | None:
    if not request.headers.get("authorization"):
        return resend_error(401, "missing_api_key", "Missing API key in the authorization header")
    if not _bearer_ok(srv, request):
        return resend_error(403, "invalid_api_key", "API key is invalid")
    return None


def resend_batch(srv: FakeProviderServer, request: Request) -> Reply:
    """POST /emails/batch: strict validation, one id per email, idempotency for 24 h."""
    refused = _resend_auth(srv, request)
    if refused is not None:
        return refused
    key = request.headers.get("idempotency-key")
    body_hash = hashlib.sha256(request.body).hexdigest()
    if key is not None:
        if not 1 <= len(key) <= 256:
            return resend_error(400, "invalid_idempotency_key", "The key must be 1-256 characters")
        with srv.lock:
            stored = srv.idempotency.get(key)
        if stored is not None:
            if stored[0] != body_hash:
                return resend_error(
                    409,
                    "invalid_idempotent_request",
                    "Same idempotency key used with a different request payload.",
                )
            return stored[1]  # the first answer again; nothing is sent
    if srv.light:
        ledger_ids = [int(m.group(1)) for m in _ANY_LEDGER_RE.finditer(request.body)]
        for ledger in ledger_ids:
            srv.accept(None, ledger)
        reply = Reply.of_json(200, {"data": [{"id": _new_id()} for _ in ledger_ids]})
    else:
        try:
            items = request.json()
        except ValueError:
            return resend_error(422, "validation_error", "Invalid JSON")
        if not isinstance(items, list) or not 1 <= len(items) <= RESEND_MAX_BATCH:
            return resend_error(422, "validation_error", "The batch must hold 1 to 100 emails")
        for item in items:  # strict mode: one bad email refuses the batch
            problem = _resend_problem(item)
            if problem:
                return resend_error(422, "validation_error", problem)
        data = []
        for item in items:
            email_id = str(uuid.uuid4())
            tags = {t["name"]: t["value"] for t in item.get("tags") or []}
            record = {**item, "tags": tags, "id": email_id}
            ledger = str(tags.get("ledger_id") or "")
            srv.accept(record, int(ledger) if ledger.isdigit() else None)
            data.append({"id": email_id})
        reply = Reply.of_json(200, {"data": data})
    if key is not None:
        with srv.lock:
            srv.idempotency[key] = (body_hash, reply)
    return reply


def _resend_problem(item: Any) -> str:
    if not isinstance(item, dict):
        return "Each email must be an object"
    if "@" not in parseaddr(str(item.get("from", "")))[1]:
        return "Invalid `from` field."
    to = item.get("to")
    tos = to if isinstance(to, list) else [to]
    if not tos or any("@" not in parseaddr(str(t))[1] for t in tos):
        return "Invalid `to` field."
    if not item.get("subject"):
        return "Missing `subject` field."
    if not item.get("html") and not item.get("text"):
        return "Missing `html` or `text` field."
    headers = item.get("headers") or {}
    if not isinstance(headers, dict) or any(not isinstance(v, str) for v in headers.values()):
        return "Header values must be strings."
    for tag in item.get("tags") or []:
        for part in (tag.get("name"), tag.get("value")):
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(part)):
                return "Tags should only contain ASCII letters, numbers, underscores, or dashes."
    return ""


def resend_domains(srv: FakeProviderServer, request: Request) -> Reply:
    """GET /domains: the account's domains."""
    refused = _resend_auth(srv, request)
    if refused is not None:
        return refused
    return Reply.of_json(
        200, {"data": [{"id": "d91cd9bd", "name": "news.example.org", "status": "verified"}]}
    )
