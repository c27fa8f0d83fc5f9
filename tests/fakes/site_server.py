"""A real HTTP server on 127.0.0.1 for end-to-end source tests.

Each test gives one function that answers a request: ``(status, headers, body)``, or ``None``
for a 404. The server records every request it saw::

    def answer(req: Seen) -> Answer | None:
        return (200, {"Content-Type": "application/rss+xml"}, FEED) if req.path == "/feed.xml" else None

    with LocalSite(answer) as site:
        collect(f"{site.url}/feed.xml")
        assert [s.path for s in site.seen] == ["/feed.xml"]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import parse_qsl, urlsplit

Answer = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True)
class Seen:
    """One request: its raw target, path, query pairs, and headers (names lower-cased)."""

    target: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, str]:
        """The query as a mapping (the first value of each name)."""
        out: dict[str, str] = {}
        for name, value in self.query:
            out.setdefault(name, value)
        return out


class _Server(ThreadingHTTPServer):
    site: LocalSite


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        seen = Seen(self.path, parts.path, parse_qsl(parts.query),
                    {k.lower(): v for k, v in self.headers.items()})
        site = self.server.site
        with site.lock:
            site.seen.append(seen)
        reply = site.answer(seen)
        if reply is None:
            self.send_error(404)
            return
        status, headers, body = reply
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 304:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class LocalSite:
    """The server; use it as a context manager. ``answer`` may be replaced while it runs."""

    def __init__(self, answer: Callable[[Seen], Answer | None]) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.site = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
