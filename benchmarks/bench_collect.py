"""Collect benchmark: fetching and parsing feeds cold versus unchanged (conditional GET, 304).

Run: ``/work/venv/bin/python benchmarks/bench_collect.py [--feeds 50] [--entries 100] [--runs 7]``

A local threaded HTTP server (stdlib; TCP_NODELAY; HTTP/1.1 keep-alive; each response written
with a single ``write``; gzip when the client accepts it, as real servers do) serves
``--feeds`` generated RSS 2.0 feeds of ``--entries`` items each, shaped like a WordPress
full-content feed (``content:encoded`` of 0.8-4.5 KB, an excerpt, dc:creator, categories,
wfw:commentRss, slash:comments), each with an ``ETag`` and a ``Last-Modified``. It answers
``If-None-Match`` (and, without it, ``If-Modified-Since``) with ``304 Not Modified``.

Then, through :meth:`digest.sources.feed.FeedSource.collect` with one shared session (as
``digest collect`` does), one feed after another:

(a) cold: every feed with an empty cursor, so every answer is a full 200 that is parsed;
(b) unchanged: every feed with the cursor (a) returned, so every answer is a 304.

Each is run ``--runs`` times, alternating (a) and (b) so machine noise hits both alike, after
one untimed warm-up of each. Reported side by side: the median wall time, the bytes the
server wrote (status line, headers and body, as sent on the wire) and the decoded body bytes
the client had to parse, and the ratio cold/unchanged.
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import hashlib
import platform
import random
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

from digest import http
from digest.sources.feed import FeedConfig, FeedSource
from digest.types import CollectResult, SourceCursor

WORDS = (
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "an",
    "be",
    "this",
    "from",
    "are",
    "or",
    "have",
    "not",
    "essay",
    "garden",
    "slow",
    "build",
    "craft",
    "winter",
    "letters",
    "river",
    "notes",
    "field",
    "memory",
    "light",
    "patience",
    "writing",
    "reading",
    "season",
    "walk",
    "repair",
    "tool",
    "habit",
    "kitchen",
    "library",
    "workshop",
    "bench",
    "chisel",
    "paper",
    "ink",
    "margin",
    "draft",
    "evening",
    "morning",
    "harbour",
    "orchard",
    "lantern",
    "stone",
    "timber",
    "quiet",
)
NAMES = ("Ada Quill", "Bo Reed", "Cy Ode", "Dee Vance", "Ines Marlow", "Tomas Berg")
CATEGORIES = ("Essays", "Craft", "Reading", "Notes", "Tools", "Seasons")
LAST_MODIFIED = "Wed, 25 Nov 2026 08:00:00 GMT"


# --- the feeds -------------------------------------------------------------------------------


def _sentence(rng: random.Random, low: int = 8, high: int = 22) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + rng.choice(".........?!")


def _paragraph(rng: random.Random, site: str) -> str:
    sentences = [_sentence(rng) for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.4:
        i = rng.randrange(len(sentences))
        sentences[i] = (
            f'<a href="{site}/essays/{rng.choice(WORDS)}-{rng.randint(1, 400)}/">{sentences[i]}</a>'
        )
    if rng.random() < 0.3:
        sentences[0] = f"<em>{sentences[0]}</em>"
    return "<p>" + " ".join(sentences) + "</p>"


def _content(rng: random.Random, site: str) -> str:
    parts: list[str] = []
    target = rng.randint(800, 4500)  # bytes of HTML in content:encoded, a WordPress-like spread
    while sum(map(len, parts)) < target:
        roll = rng.random()
        if roll < 0.08:
            items = "".join(f"<li>{_sentence(rng, 3, 9)}</li>" for _ in range(rng.randint(2, 5)))
            parts.append(f"<ul>{items}</ul>")
        elif roll < 0.14:
            parts.append(f"<blockquote><p>{_sentence(rng)}</p></blockquote>")
        elif roll < 0.18:
            n = rng.randint(1, 900)
            parts.append(
                f'<figure><img src="{site}/wp-content/uploads/2026/11/p{n}.jpg" '
                f'alt="{_sentence(rng, 3, 6)}" width="1200" height="800" /></figure>'
            )
        else:
            parts.append(_paragraph(rng, site))
    return "\n".join(parts)


def make_feed(index: int, entries: int, seed: int = 20261126) -> bytes:
    """One RSS 2.0 feed shaped like a WordPress full-content feed."""
    rng = random.Random(seed * 1000 + index)
    site = f"https://blog{index}.example.org"
    start = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    items: list[str] = []
    for n in range(entries):
        post_id = 10_000 - n
        slug = "-".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        title = _sentence(rng, 3, 9).rstrip(".?!")
        content = _content(rng, site)
        excerpt = escape(" ".join(_sentence(rng) for _ in range(2))[:280]) + " [&#8230;]"
        when = email.utils.format_datetime(
            start - timedelta(days=n, minutes=rng.randint(0, 600)), usegmt=True
        )
        cats = "".join(
            f"<category><![CDATA[{c}]]></category>"
            for c in rng.sample(CATEGORIES, rng.randint(1, 3))
        )
        items.append(
            f"""
	<item>
		<title>{escape(title)}</title>
		<link>{site}/{2026 - n // 52}/{slug}/</link>
		<comments>{site}/{2026 - n // 52}/{slug}/#comments</comments>
		<dc:creator><![CDATA[{rng.choice(NAMES)}]]></dc:creator>
		<pubDate>{when}</pubDate>
		{cats}
		<guid isPermaLink="false">{site}/?p={post_id}</guid>
		<description><![CDATA[{excerpt}]]></description>
		<content:encoded><![CDATA[{content}]]></content:encoded>
		<wfw:commentRss>{site}/{2026 - n // 52}/{slug}/feed/</wfw:commentRss>
		<slash:comments>{rng.randint(0, 40)}</slash:comments>
	</item>"""
        )
    return f"""<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"
	xmlns:content="http://purl.org/rss/1.0/modules/content/"
	xmlns:wfw="http://wellformedweb.org/CommentAPI/"
	xmlns:dc="http://purl.org/dc/elements/1.1/"
	xmlns:atom="http://www.w3.org/2005/Atom"
	xmlns:sy="http://purl.org/rss/1.0/modules/syndication/"
	xmlns:slash="http://purl.org/rss/1.0/modules/slash/">
<channel>
	<title>Blog number {index}</title>
	<atom:link href="{site}/feed/" rel="self" type="application/rss+xml" />
	<link>{site}</link>
	<description>Essays, notes and letters</description>
	<lastBuildDate>{LAST_MODIFIED}</lastBuildDate>
	<language>en-US</language>
	<sy:updatePeriod>hourly</sy:updatePeriod>
	<sy:updateFrequency>1</sy:updateFrequency>
{"".join(items)}
</channel>
</rss>
""".encode()


@dataclass(frozen=True)
class Served:
    """One feed, ready to send: both encodings and its validators."""

    identity: bytes
    gzipped: bytes
    etag: str


# --- the server ------------------------------------------------------------------------------


class BenchServer(ThreadingHTTPServer):
    """Serves the feeds; counts what it writes."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, feeds: dict[str, Served]) -> None:
        super().__init__(("127.0.0.1", 0), BenchHandler)
        self.feeds = feeds
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.wire_bytes = 0
            self.decoded_bytes = 0
            self.statuses: dict[int, int] = {}
            self.connections = 0

    def count(self, status: int, wire: int, decoded: int) -> None:
        with self.lock:
            self.wire_bytes += wire
            self.decoded_bytes += decoded
            self.statuses[status] = self.statuses.get(status, 0) + 1


class BenchHandler(BaseHTTPRequestHandler):
    """GET /feeds/<n>.xml with ETag/Last-Modified, 304 on a match, gzip when accepted."""

    server: BenchServer
    protocol_version = "HTTP/1.1"  # keep-alive: requests' pool reuses the connection
    wbufsize = 0  # unbuffered: one wfile.write is one sendall

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
        # Without TCP_NODELAY, Nagle's algorithm plus the client's delayed ACK can hold a
        # small response (a 304) for up to 40 ms and measure the kernel, not the code.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        feed = self.server.feeds.get(self.path)
        if feed is None:
            self._write(404, [("Content-Type", "text/plain")], b"not found\n", 0)
            return
        validators = [("ETag", feed.etag), ("Last-Modified", LAST_MODIFIED)]
        inm = self.headers.get("If-None-Match")
        ims = self.headers.get("If-Modified-Since")
        # RFC 9110 13.2.2: If-None-Match decides when present; If-Modified-Since only without it.
        if (inm is not None and feed.etag in [t.strip() for t in inm.split(",")]) or (
            inm is None and ims == LAST_MODIFIED
        ):
            self._write(304, validators, b"", 0)
            return
        headers = [
            ("Content-Type", "application/rss+xml; charset=UTF-8"),
            ("Vary", "Accept-Encoding"),
            *validators,
        ]
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            headers.append(("Content-Encoding", "gzip"))
            self._write(200, headers, feed.gzipped, len(feed.identity))
        else:
            self._write(200, headers, feed.identity, len(feed.identity))

    def _write(
        self, status: int, headers: list[tuple[str, str]], body: bytes, decoded: int
    ) -> None:
        reason = {200: "OK", 304: "Not Modified", 404: "Not Found"}[status]
        lines = [f"HTTP/1.1 {status} {reason}", f"Date: {self.date_time_string()}", "Server: bench"]
        lines += [f"{name}: {value}" for name, value in headers]
        if status != 304:  # a 304 has no body, so no length either
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.wfile.write(data)  # the single write
        self.server.count(status, len(data), decoded)

    def log_message(self, format: str, *args: object) -> None:
        pass


# --- the runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    wire_bytes: int
    decoded_bytes: int
    client_bytes_read: int
    statuses: dict[int, int]
    connections: int
    results: list[CollectResult]


def collect_all(server: BenchServer, sources: list[FeedSource], cursors: list[SourceCursor]) -> Run:
    server.reset()
    now = datetime.now(UTC)
    start = time.perf_counter()
    results = [source.collect(cursor, now) for source, cursor in zip(sources, cursors, strict=True)]
    seconds = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"collect failed: {errors[:3]}")
    with server.lock:
        return Run(
            seconds,
            server.wire_bytes,
            server.decoded_bytes,
            sum(r.bytes_read for r in results),
            dict(server.statuses),
            server.connections,
            results,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--feeds", type=int, default=50)
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)

    print(f"generating {args.feeds} feeds of {args.entries} entries ...", file=sys.stderr)
    feeds: dict[str, Served] = {}
    for i in range(args.feeds):
        body = make_feed(i, args.entries)
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        feeds[f"/feeds/{i}.xml"] = Served(body, gzip.compress(body, compresslevel=6, mtime=0), etag)
    server = BenchServer(feeds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = "127.0.0.1", server.server_port
    session = http.build_session()
    try:
        sources = [
            FeedSource(
                FeedConfig(name=f"feed{i}", type="feed", url=f"http://{host}:{port}/feeds/{i}.xml"),
                session,
            )
            for i in range(args.feeds)
        ]
        empty = [SourceCursor()] * len(sources)
        warm = collect_all(server, sources, empty)  # untimed: fills the connection pool, imports
        cursors = [r.cursor for r in warm.results]
        assert all(len(r.essays) == args.entries for r in warm.results), "every entry must parse"
        assert all(c.etag for c in cursors), "every feed must return an ETag"
        collect_all(server, sources, cursors)
        cold_runs: list[Run] = []
        same_runs: list[Run] = []
        for _ in range(args.runs):
            cold_runs.append(collect_all(server, sources, empty))
            same_runs.append(collect_all(server, sources, cursors))
        assert all(r.not_modified for run in same_runs for r in run.results), (
            "unchanged must be 304"
        )
        assert all(not r.not_modified for run in cold_runs for r in run.results), "cold must be 200"
    finally:
        session.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    report(args, feeds, cold_runs, same_runs)
    return 0


def report(
    args: argparse.Namespace, feeds: dict[str, Served], cold: list[Run], same: list[Run]
) -> None:
    def med(runs: list[Run]) -> float:
        return statistics.median(r.seconds for r in runs)

    identity = sum(len(f.identity) for f in feeds.values())
    zipped = sum(len(f.gzipped) for f in feeds.values())
    c, s = cold[-1], same[-1]
    rows = [
        (
            "median wall time",
            f"{med(cold):.3f} s",
            f"{med(same) * 1000:.1f} ms",
            f"{med(cold) / med(same):.0f}x",
        ),
        (
            "  min .. max",
            f"{min(r.seconds for r in cold):.3f} .. {max(r.seconds for r in cold):.3f} s",
            (
                f"{min(r.seconds for r in same) * 1e3:.1f} .. "
                f"{max(r.seconds for r in same) * 1e3:.1f} ms"
            ),
            "",
        ),
        (
            "  per feed",
            f"{med(cold) / args.feeds * 1000:.1f} ms",
            f"{med(same) / args.feeds * 1000:.2f} ms",
            "",
        ),
        (
            "responses",
            " ".join(f"{n} x {k}" for k, n in sorted(c.statuses.items())),
            " ".join(f"{n} x {k}" for k, n in sorted(s.statuses.items())),
            "",
        ),
        ("new connections", str(c.connections), str(s.connections), ""),
        (
            "wire bytes (server wrote)",
            f"{c.wire_bytes:,}",
            f"{s.wire_bytes:,}",
            f"{c.wire_bytes / s.wire_bytes:.0f}x",
        ),
        ("decoded body bytes", f"{c.decoded_bytes:,}", f"{s.decoded_bytes:,}", "-"),
        ("client bytes_read", f"{c.client_bytes_read:,}", f"{s.client_bytes_read:,}", "-"),
    ]
    print(
        f"bench_collect: {args.feeds} RSS 2.0 feeds x {args.entries} entries through "
        f"FeedSource.collect, one shared keep-alive session, {args.runs} runs each "
        "(alternating, after a warm-up)"
    )
    print(
        f"feeds: {identity:,} bytes decoded, {zipped:,} gzipped "
        f"(average {identity // len(feeds):,} / {zipped // len(feeds):,} bytes per feed)"
    )
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print()
    widths = [
        max(len(r[i]) for r in rows + [("", "cold (200)", "unchanged (304)", "cold/unchanged")])
        for i in range(4)
    ]
    header = ("", "cold (200)", "unchanged (304)", "cold/unchanged")
    for row in [header, *rows]:
        print(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )


if __name__ == "__main__":
    sys.exit(main())
