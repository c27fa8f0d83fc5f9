"""Discourse, Reddit and Hacker News end to end: a real local HTTP server plays the blog and the
discussion site, and ``digest collect``, ``draft``, ``preview`` and ``status`` run through click.

The payloads are the saved ones in tests/data/<source>/; the feed's essay links the URL they
discuss. Only ``base_url`` points the sources at the local server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from digest.cli import cli
from tests.fakes.site_server import Answer, LocalSite, Seen

DATA = Path(__file__).resolve().parent.parent / "data"
ESSAY_URL = "https://fieldnotes.example.org/essays/the-quiet-pager"
REDDIT_UA = "python:fieldnotes-digest:1.2 (by /u/ada_quill)"


@dataclass(frozen=True)
class Route:
    """What the server answers for one path."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class _Server(LocalSite):
    """The blog and the discussion site: ``routes`` maps a path to its answer."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        super().__init__(self._answer)

    @property
    def base(self) -> str:
        return self.url

    def _answer(self, req: Seen) -> Answer | None:
        route = self.routes.get(req.path)
        if route is None:
            return None
        return route.status, {"Content-Type": route.content_type, **dict(route.headers)}, route.body


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as srv:
        yield srv


def data(source: str, name: str) -> Route:
    kind = "application/rss+xml" if name.endswith(".xml") else "application/json"
    return Route((DATA / source / name).read_bytes(), content_type=kind)


def serve_discourse(srv: _Server) -> None:
    srv.routes.update(
        {
            "/feed.xml": data("discourse", "feed.xml"),
            "/embed/info": data("discourse", "embed_info.json"),
            "/t/4217.json": data("discourse", "topic_4217.json"),
            "/t/4217/posts.json": data("discourse", "posts_4217.json"),
        }
    )


def write_config(tmp_path: Path, srv: _Server, comments: str, extra: str = "") -> str:
    # lookback_days is wide so the saved essay (November 2026) stays recent whenever this runs.
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
database: {{url: "sqlite:///{tmp_path / "digest.db"}"}}
newsletter: {{name: Field Notes Digest, public_url: https://news.example.org}}
sources:
  - name: blog
    type: feed
    url: {srv.base}/feed.xml
    comments: {comments}
delivery: {{provider: outbox, outbox_dir: out}}
{extra}
""",
        encoding="utf-8",
    )
    return str(path)


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def collect_draft_preview(cfg: str, out: Path, collect_code: int = 0) -> tuple[str, str, str]:
    """Run collect, draft and preview; return the collect output and the preview's text and HTML."""
    code, collected = invoke("--config", cfg, "collect")
    assert code == collect_code, collected
    code, drafted = invoke("--config", cfg, "draft")
    assert code == 0 and "draft 1 is ready for review" in drafted, drafted
    code, previewed = invoke("--config", cfg, "preview", "1", "--out", str(out))
    assert code == 0, previewed
    return (
        collected,
        (out / "draft-1.txt").read_text(encoding="utf-8"),
        (out / "draft-1.html").read_text(encoding="utf-8"),
    )


# "Ann wrote:" or "Ann wrote, in reply to Bo (...):" in the text part.
_WROTE = re.compile(r"^(?P<author>\S.*?) wrote(?::$|, in reply to )")


def authors_in_order(text: str) -> list[str]:
    return [m["author"] for line in text.splitlines() if (m := _WROTE.match(line))]


def assert_hostile_content_is_gone(html: str, kept_text: str) -> None:
    assert kept_text in html  # the comment itself made it, only its code did not
    lowered = html.lower()
    for needle in ("alert(", "onerror", "<img", "javascript:", "<script>alert"):
        assert needle not in lowered, needle


def test_discourse_end_to_end(server: _Server, tmp_path: Path) -> None:
    serve_discourse(server)
    cfg = write_config(
        tmp_path, server, f"{{type: discourse, base_url: {server.base}, lookback_days: 36500}}"
    )
    collected, text, html = collect_draft_preview(cfg, tmp_path / "preview")
    assert "blog: 1 new essays" in collected
    assert "blog:discourse: 0 new essays, 0 updated; 17 new comments" in collected
    # the three most-liked posts (the second from beyond the first chunk of 20), best first
    assert authors_in_order(text) == ["Mara Lindqvist", "Inès Laurent", "Mallory Quinn"]
    assert f"View comment: {server.base}/t/the-quiet-pager/4217/21" in text
    assert_hostile_content_is_gone(html, "The section on quiet hours is the best thing")
    paths = [(s.path, s.query) for s in server.seen if s.path != "/feed.xml"]
    assert paths == [
        ("/embed/info", [("embed_url", ESSAY_URL)]),
        ("/t/4217.json", []),
        ("/t/4217/posts.json", [("post_ids[]", str(i)) for i in (71021, 71022, 71023, 71024)]),
    ]


def test_reddit_end_to_end(server: _Server, tmp_path: Path) -> None:
    server.routes.update(
        {
            "/feed.xml": data("reddit", "feed.xml"),
            "/api/info.json": data("reddit", "info.json"),
            "/r/programming/comments/1qx7ab.json": data("reddit", "comments_1qx7ab.json"),
            "/r/sre/comments/1qx9cd.json": data("reddit", "comments_1qx9cd.json"),
        }
    )
    cfg = write_config(
        tmp_path,
        server,
        f'{{type: reddit, base_url: "{server.base}", max_submissions: 2, '
        f'user_agent: "{REDDIT_UA}", lookback_days: 36500}}',
    )
    collected, text, html = collect_draft_preview(cfg, tmp_path / "preview")
    assert "blog:reddit: 0 new essays, 0 updated; 10 new comments" in collected
    assert authors_in_order(text) == ["quietops", "xss_enthusiast", "pagerfatigue"]
    # body_html arrived HTML-escaped; it was un-escaped once, so the code sample is text again
    assert "sleep <5m> then check" in text
    assert_hostile_content_is_gone(html, "Quiet hours saved my team")
    reddit = [s for s in server.seen if s.path != "/feed.xml"]
    assert [s.path for s in reddit] == [
        "/api/info.json",
        "/r/programming/comments/1qx7ab.json",
        "/r/sre/comments/1qx9cd.json",
    ]
    assert reddit[0].query == [("url", ESSAY_URL)]
    assert all(s.headers["user-agent"] == REDDIT_UA for s in reddit)


def test_hackernews_end_to_end(server: _Server, tmp_path: Path) -> None:
    server.routes.update(
        {
            "/feed.xml": data("hackernews", "feed.xml"),
            "/api/v1/search": data("hackernews", "search.json"),
            "/api/v1/items/41230001": data("hackernews", "item_41230001.json"),
            "/api/v1/items/41230555": data("hackernews", "item_41230555.json"),
        }
    )
    cfg = write_config(
        tmp_path,
        server,
        f"{{type: hackernews, base_url: {server.base}/api/v1, lookback_days: 36500}}",
        extra="ranking: {per_essay: 5}",
    )
    collected, text, html = collect_draft_preview(cfg, tmp_path / "preview")
    assert "blog:hackernews: 0 new essays, 0 updated; 7 new comments" in collected
    # no scores on HN: HN's own order, one comment per author
    assert authors_in_order(text) == ["hollowcore", "jlund", "marisol", "nightshift", "kestrel"]
    assert "View comment: https://news.ycombinator.com/item?id=41230150" in text
    assert_hostile_content_is_gone(html, "Quiet hours are underrated.")
    assert [s.path for s in server.seen if s.path != "/feed.xml"] == [
        "/api/v1/search",
        "/api/v1/items/41230001",
        "/api/v1/items/41230555",
    ]


def run_with_broken_reddit(srv: _Server, tmp_path: Path) -> tuple[str, str, str]:
    """Discourse answers, Reddit fails with 500: collect, draft, preview; (config, collect output, text)."""
    serve_discourse(srv)
    # Retry-After: 0 keeps the three retries of a 500 from sleeping in the test.
    srv.routes["/api/info.json"] = Route(
        b'{"message": "Internal Server Error", "error": 500}',
        status=500,
        headers=(("Retry-After", "0"),),
    )
    cfg = write_config(
        tmp_path,
        srv,
        f"[{{type: discourse, base_url: {srv.base}, lookback_days: 36500}}, "
        f'{{type: reddit, base_url: "{srv.base}", lookback_days: 36500}}]',
    )
    collected, text, _html = collect_draft_preview(cfg, tmp_path / "preview", collect_code=1)
    return cfg, collected, text


def test_a_broken_comment_source_is_recorded_and_the_others_still_make_the_draft(
    server: _Server, tmp_path: Path
) -> None:
    _cfg, collected, text = run_with_broken_reddit(server, tmp_path)
    assert "blog:discourse1: 0 new essays, 0 updated; 17 new comments" in collected
    assert "blog:reddit2: FAILED: " in collected and "/api/info.json?url=" in collected
    assert authors_in_order(text) == ["Mara Lindqvist", "Inès Laurent", "Mallory Quinn"]
    assert (
        len([s for s in server.seen if s.path == "/api/info.json"]) == 4
    )  # one try, three retries

    from digest.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'digest.db'}")
    try:
        states = {s.source: s for s in store.source_statuses()}
    finally:
        store.close()
    reddit = states["blog:reddit2"]
    assert reddit.last_error is not None and reddit.last_error.endswith(": HTTP 500")
    assert reddit.last_error.startswith(f"{ESSAY_URL}: ")
    assert states["blog:discourse1"].last_error is None and states["blog:discourse1"].comments == 17


def test_digest_status_shows_the_broken_comment_source(server: _Server, tmp_path: Path) -> None:
    cfg, _collected, _text = run_with_broken_reddit(server, tmp_path)
    code, status = invoke("--config", cfg, "status")
    assert code == 0, status
    (line,) = [line for line in status.splitlines() if "blog:reddit2" in line]
    assert "ERROR" in line and "HTTP 500" in line and ESSAY_URL in line
    (line,) = [line for line in status.splitlines() if "blog:discourse1" in line]
    assert "17 comments" in line and line.endswith("— ok")
