"""The WordPress source: saved REST payloads, pagination and failures over mocked HTTP, and
the whole collect → draft flow against a local WordPress-shaped server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest
import requests
import responses
from click.testing import CliRunner

from digest.cli import cli
from digest.errors import SourceError
from digest.sources.registry import build_source
from digest.sources.wordpress import (
    MAX_COMMENT_PAGES,
    WordPressConfig,
    WordPressFetch,
    WordPressSource,
)
from digest.store import open_store
from digest.types import Comment, Essay, SourceCursor
from tests.fakes.site_server import Answer, LocalSite, Seen

DATA = Path(__file__).resolve().parent.parent / "data" / "wordpress"
SITE = "https://blog.example.org"
API = f"{SITE}/wp-json/wp/v2"
NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def make_source(sleeps: list[float] | None = None, **keys: Any) -> WordPressSource:
    config = WordPressConfig.model_validate(
        {"name": "wp", "type": "wordpress", "url": SITE, **keys}
    )
    return WordPressSource(config, sleep=(sleeps.append if sleeps is not None else lambda _s: None))


def saved_fetch() -> WordPressFetch:
    return WordPressFetch(
        posts_url=f"{API}/posts",
        posts=load("posts.json"),
        comments={214: load("comments_214.json"), 207: load("comments_207.json")},
    )


def comment_rows(comments: tuple[Comment, ...]) -> list[tuple[Any, ...]]:
    return [
        (c.essay_key, c.key, c.author, c.parent_key, c.position, c.score, c.published)
        for c in comments
    ]


# --- parse: saved payloads --------------------------------------------------------------------


def test_saved_posts_become_essays() -> None:
    result = make_source().parse(saved_fetch(), NOW)
    assert [(e.key, e.url, e.title, e.author, e.published) for e in result.essays] == [
        # guid.rendered is the key, not the permalink; entities in the title decoded, tags gone
        (
            "https://blog.example.org/?p=214",
            "https://blog.example.org/2026/11/longhand/",
            "Why I\u2019m still writing longhand",
            "Ines Marlow",
            datetime(2026, 11, 20, 8, 0, tzinfo=UTC),
        ),
        # no guid in the answer: wp:<id>
        (
            "wp:207",
            "https://blog.example.org/2026/11/repair-and-care/",
            "Notes on repair & care",
            "Ines Marlow",
            datetime(2026, 11, 12, 17, 45, tzinfo=UTC),
        ),
        # post 199 is password-protected: left out
    ]
    longhand, repair = result.essays
    # content.rendered, with relative links made absolute against the post's link
    assert longhand.html.startswith("<p>Every draft starts on paper. ")
    assert 'href="https://blog.example.org/2026/10/ink/"' in longhand.html
    assert 'src="https://blog.example.org/wp-content/uploads/2026/11/desk.jpg"' in longhand.html
    assert longhand.summary == "Pens, paper & the patience they teach."
    # an empty excerpt falls back to the content's text
    assert repair.summary == "A chair with a new leg is still the same chair. Or is it?"
    assert longhand.comments_url == ""


def test_saved_comments_in_date_order_with_threading() -> None:
    result = make_source().parse(saved_fetch(), NOW)
    key = "https://blog.example.org/?p=214"
    assert comment_rows(result.comments) == [
        (key, "5001", "Tomas Berg", None, 0, None, datetime(2026, 11, 20, 10, 15, tzinfo=UTC)),
        (key, "5002", "Ines Marlow", "5001", 1, None, datetime(2026, 11, 20, 12, 40, tzinfo=UTC)),
        (key, "5003", "Priya N.", None, 2, None, datetime(2026, 11, 21, 6, 5, tzinfo=UTC)),
        ("wp:207", "4870", "Wen Li", None, 0, None, datetime(2026, 11, 13, 9, 30, tzinfo=UTC)),
    ]
    first, _, third, _ = result.comments
    assert first.url == "https://blog.example.org/2026/11/longhand/#comment-5001"
    assert first.source == "wp"
    assert first.html == (
        "<p>I switched to a fountain pen last year&#8230; my drafts got shorter and better.</p>\n"
    )
    assert 'href="https://blog.example.org/2026/09/quiet/"' in third.html
    # both posts' comments were read in full
    assert result.covered == (("wp", key), ("wp", "wp:207"))
    assert result.warnings == ()


def test_unapproved_comments_pingbacks_and_unpublished_posts_are_left_out() -> None:
    posts = load("posts.json")[:1] + [{**load("posts.json")[1], "id": 300, "status": "draft"}]
    rows = load("comments_214.json")
    rows[0] = {**rows[0], "status": "hold"}
    rows[2] = {**rows[2], "type": "pingback"}
    raw = WordPressFetch(posts_url=API, posts=posts, comments={214: rows, 300: []})
    result = make_source().parse(raw, NOW)
    assert [e.key for e in result.essays] == ["https://blog.example.org/?p=214"]
    # positions count only the comments kept
    assert [(c.key, c.position) for c in result.comments] == [("5002", 0)]


def test_partial_comments_are_kept_but_the_post_is_not_covered() -> None:
    raw = WordPressFetch(
        posts_url=API,
        posts=load("posts.json")[:2],
        comments={207: load("comments_207.json")},
        partial={214: load("comments_214.json")[:1]},
        problems={214: "more than 1000 comments: only the oldest 1000 were read"},
    )
    result = make_source().parse(raw, NOW)
    assert [c.key for c in result.comments] == ["5001", "4870"]
    assert result.covered == (("wp", "wp:207"),)
    assert result.warnings == (
        (
            "https://blog.example.org/2026/11/longhand/: more than 1000 comments: only the oldest "
            "1000 were read"
        ),
    )


def test_a_post_without_an_id_is_an_error() -> None:
    raw = WordPressFetch(posts_url=f"{API}/posts", posts=[{"title": {"rendered": "x"}}])
    with pytest.raises(SourceError, match=r"wordpress: .*/posts: post 1 has no numeric id"):
        make_source().parse(raw, NOW)


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_registry() -> None:
    source = build_source({"name": "wp", "type": "wordpress", "url": SITE + "/"})
    assert isinstance(source, WordPressSource)
    assert source.config == WordPressConfig(
        name="wp", type="wordpress", url=SITE, base_url=None, max_posts=20, timeout=30.0
    )
    assert source.config.api_root == API
    custom = make_source(base_url=f"{SITE}/?rest_route=/wp/v2")
    assert custom.config.api_root == f"{SITE}/?rest_route=/wp/v2"


@pytest.mark.parametrize(
    "keys",
    [
        {"url": "blog.example.org"},
        {"url": "ftp://blog.example.org"},
        {"base_url": "/wp-json"},
        {"max_posts": 0},
        {"max_posts": 101},
        {"timeout": 0},
        {"colour": "red"},
    ],
)
def test_config_rejects(keys: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        WordPressConfig.model_validate({"name": "wp", "type": "wordpress", "url": SITE, **keys})


# --- fetch over (mocked) HTTP -----------------------------------------------------------------


Handler = Callable[[dict[str, str]], tuple[int, dict[str, str], str]]


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def route(rsps: responses.RequestsMock, url: str, handler: Handler) -> None:
    """Answer GET ``url`` (any query) with ``handler(query params)``."""

    def callback(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        query = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        return handler(query)

    rsps.add_callback(responses.GET, url, callback=callback, content_type="application/json")


def one_post(post_id: int = 214) -> list[dict[str, Any]]:
    return [{**load("posts.json")[0], "id": post_id}]


def fake_comments(post_id: int, count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": 10_000 + i,
            "post": post_id,
            "parent": 0,
            "author_name": f"Reader {i}",
            "date_gmt": f"2026-11-2{i // 1000}T{(i // 60) % 24:02d}:{i % 60:02d}:00",
            "content": {"rendered": f"<p>Comment {i}</p>"},
            "link": f"{SITE}/p/#comment-{i}",
            "status": "approved",
            "type": "comment",
        }
        for i in range(count)
    ]


def paged(rows: list[dict[str, Any]], *, header: bool = True) -> Handler:
    """Comments ``rows`` served 100 a page, with X-WP-Total/X-WP-TotalPages unless ``header``."""

    def handler(query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        page, per_page = int(query["page"]), int(query["per_page"])
        pages = -(-len(rows) // per_page)
        headers = {"X-WP-Total": str(len(rows)), "X-WP-TotalPages": str(pages)} if header else {}
        return 200, headers, json.dumps(rows[(page - 1) * per_page : page * per_page])

    return handler


def test_posts_request_and_comment_pages_follow_total_pages(mocked: responses.RequestsMock) -> None:
    route(mocked, f"{API}/posts", lambda q: (200, {}, json.dumps(one_post())))
    route(mocked, f"{API}/comments", paged(fake_comments(214, 250)))
    result = make_source(max_posts=5).collect(SourceCursor(), NOW)
    assert result.error is None and result.warnings == ()
    assert len(result.comments) == 250
    assert [c.position for c in result.comments] == list(range(250))
    assert result.covered == (("wp", "https://blog.example.org/?p=214"),)
    posts_query = parse_qs(urlsplit(str(mocked.calls[0].request.url)).query)
    assert posts_query["per_page"] == ["5"]
    assert posts_query["orderby"] == ["date"] and posts_query["order"] == ["desc"]
    assert posts_query["_embed"] == ["author"]
    assert set(posts_query["_fields"][0].split(",")) >= {
        "id",
        "guid",
        "link",
        "title",
        "content",
        "excerpt",
        "date_gmt",
        "_embedded",
    }
    pages = [parse_qs(urlsplit(str(call.request.url)).query) for call in mocked.calls[1:]]
    assert [(p["post"], p["page"], p["per_page"], p["order"]) for p in pages] == [
        (["214"], ["1"], ["100"], ["asc"]),
        (["214"], ["2"], ["100"], ["asc"]),
        (["214"], ["3"], ["100"], ["asc"]),
    ]


def test_comment_pages_are_capped(mocked: responses.RequestsMock) -> None:
    route(mocked, f"{API}/posts", lambda q: (200, {}, json.dumps(one_post())))
    route(mocked, f"{API}/comments", paged(fake_comments(214, 1234)))
    result = make_source().collect(SourceCursor(), NOW)
    assert len(mocked.calls) == 1 + MAX_COMMENT_PAGES == 11
    assert len(result.comments) == 1000  # what was read still shows
    assert result.covered == ()  # but nothing may be taken for deleted
    assert result.warnings == (
        (
            "https://blog.example.org/2026/11/longhand/: more than 1000 comments: only the oldest "
            "1000 were read"
        ),
    )


def test_without_the_pages_header_a_short_page_is_the_last(mocked: responses.RequestsMock) -> None:
    route(mocked, f"{API}/posts", lambda q: (200, {}, json.dumps(one_post())))
    route(mocked, f"{API}/comments", paged(fake_comments(214, 130), header=False))
    result = make_source().collect(SourceCursor(), NOW)
    assert len(result.comments) == 130 and len(mocked.calls) == 3
    assert result.covered == (("wp", "https://blog.example.org/?p=214"),)


def test_zero_comments_is_one_request_and_covered(mocked: responses.RequestsMock) -> None:
    route(mocked, f"{API}/posts", lambda q: (200, {}, json.dumps(one_post())))
    route(mocked, f"{API}/comments", paged([]))
    result = make_source().collect(SourceCursor(), NOW)
    assert result.comments == () and len(mocked.calls) == 2
    assert result.covered == (("wp", "https://blog.example.org/?p=214"),)


@pytest.mark.parametrize(
    ("status", "payload"),
    [(401, "rest_cannot_access.json"), (403, "rest_cannot_access.json"), (404, "no_route.json")],
)
def test_rest_api_off_is_an_error_with_a_feed_hint(
    mocked: responses.RequestsMock, status: int, payload: str
) -> None:
    mocked.get(f"{API}/posts", status=status, body=(DATA / payload).read_text())
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect(SourceCursor(), NOW)
    assert result.error is not None
    assert result.error.startswith(f"wordpress: {API}/posts?per_page=20&")
    assert (
        f": HTTP {status} (the site's REST API is off or hidden: use a `type: feed` source"
        in result.error
    )
    assert sleeps == [] and len(mocked.calls) == 1  # not retried


def test_html_instead_of_json_is_an_error_with_a_feed_hint(mocked: responses.RequestsMock) -> None:
    mocked.get(
        f"{API}/posts",
        body="<html><body>Welcome to my blog</body></html>",
        content_type="text/html",
    )
    result = make_source().collect(SourceCursor(), NOW)
    assert result.error is not None
    assert "the answer is not JSON (JSONDecodeError)" in result.error
    assert "use a `type: feed` source" in result.error


def test_an_object_instead_of_a_list_of_posts_is_an_error(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{API}/posts", json={"posts": []})
    result = make_source().collect(SourceCursor(), NOW)
    assert result.error is not None and "expected a list of posts, got dict" in result.error


def test_one_posts_comment_failure_is_a_warning(mocked: responses.RequestsMock) -> None:
    posts = load("posts.json")

    def comments(query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        if query["post"] == "207":
            return 500, {}, "{}"
        return 200, {"X-WP-TotalPages": "1"}, (DATA / "comments_214.json").read_text()

    route(mocked, f"{API}/posts", lambda q: (200, {}, json.dumps(posts)))
    route(mocked, f"{API}/comments", comments)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect(SourceCursor(), NOW)
    assert result.error is None
    assert [e.key for e in result.essays] == ["https://blog.example.org/?p=214", "wp:207"]
    assert [c.key for c in result.comments] == ["5001", "5002", "5003"]
    assert result.covered == (("wp", "https://blog.example.org/?p=214"),)
    (warning,) = result.warnings
    assert warning.startswith(
        "https://blog.example.org/2026/11/repair-and-care/: comments not read: "
    )
    assert warning.endswith(": HTTP 500")
    assert sleeps == [0.5, 1.0, 2.0]
    # the protected post's comments were never asked for
    assert all("post=199" not in str(call.request.url) for call in mocked.calls)


def test_429_is_retried_after_the_servers_delay(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{API}/posts", status=429, headers={"Retry-After": "3"})
    mocked.get(f"{API}/posts", json=one_post())
    route(mocked, f"{API}/comments", paged([]))
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect(SourceCursor(), NOW)
    assert result.error is None and len(result.essays) == 1
    assert sleeps == [3.0]


def test_plain_permalink_sites_use_rest_route(mocked: responses.RequestsMock) -> None:
    def answer(query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        return 200, {}, json.dumps(one_post() if query["rest_route"] == "/wp/v2/posts" else [])

    route(mocked, f"{SITE}/", answer)
    result = make_source(base_url=f"{SITE}/?rest_route=/wp/v2").collect(SourceCursor(), NOW)
    assert result.error is None and len(result.essays) == 1
    urls = [str(call.request.url) for call in mocked.calls]
    assert urls[0].startswith(f"{SITE}/?rest_route=/wp/v2/posts&per_page=20&")
    assert urls[1].startswith(f"{SITE}/?rest_route=/wp/v2/comments&post=214&per_page=100&page=1&")


# --- end to end: a local WordPress-shaped server, the CLI, the store --------------------------


def _answer_wp(req: Seen) -> Answer:
    query = req.params
    json_type = {"Content-Type": "application/json; charset=UTF-8"}
    if req.path == "/wp-json/wp/v2/posts":
        return 200, {**json_type, "X-WP-Total": "3", "X-WP-TotalPages": "1"}, (DATA / "posts.json").read_bytes()
    if req.path == "/wp-json/wp/v2/comments" and query.get("post") in ("214", "207"):
        body = (DATA / f"comments_{query['post']}.json").read_bytes()
        total = len(json.loads(body))
        return 200, {**json_type, "X-WP-Total": str(total), "X-WP-TotalPages": "1"}, body
    return 404, json_type, (DATA / "no_route.json").read_bytes()


@pytest.fixture
def wp_server() -> Iterator[LocalSite]:
    with LocalSite(_answer_wp) as site:
        yield site


def test_end_to_end_collect_and_draft(wp_server: LocalSite, tmp_path: Path) -> None:
    host, port = wp_server.host, wp_server.port
    db_url = f"sqlite:///{tmp_path / 'digest.db'}"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"""
database: {{url: "{db_url}"}}
newsletter: {{public_url: https://news.example.org}}
sources:
  - {{name: wp, type: wordpress, url: "http://{host}:{port}"}}
delivery: {{provider: outbox, outbox_dir: out}}
""",
        encoding="utf-8",
    )
    runner = CliRunner()
    collected = runner.invoke(cli, ["--config", str(cfg), "collect"], catch_exceptions=False)
    assert collected.exit_code == 0, collected.output
    assert "wp: 2 new essays, 0 updated; 4 new comments, 0 updated, 0 gone" in collected.output
    drafted = runner.invoke(cli, ["--config", str(cfg), "draft"], catch_exceptions=False)
    assert drafted.exit_code == 0, drafted.output
    assert "draft 1 is ready for review" in drafted.output

    store = open_store(db_url)
    try:
        draft = store.get_draft(1)
    finally:
        store.close()
    # oldest essay first; the author's own reply (Ines Marlow) never takes a reader's place
    assert [(i.essay.key, i.essay.title) for i in draft.items] == [
        ("wp:207", "Notes on repair & care"),
        ("https://blog.example.org/?p=214", "Why I\u2019m still writing longhand"),
    ]
    picked = [sorted((r.comment.key, r.comment.author) for r in i.comments) for i in draft.items]
    assert picked == [[("4870", "Wen Li")], [("5001", "Tomas Berg"), ("5003", "Priya N.")]]
    assert all(isinstance(i.essay, Essay) for i in draft.items)
    paths = [urlsplit(seen.target) for seen in wp_server.seen]
    assert [(p.path, parse_qs(p.query).get("post")) for p in paths] == [
        ("/wp-json/wp/v2/posts", None),
        ("/wp-json/wp/v2/comments", ["214"]),
        ("/wp-json/wp/v2/comments", ["207"]),
    ]
