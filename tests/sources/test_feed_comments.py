"""Comment feeds (wfw:commentRss): saved payloads, the implicit source a feed gets, mocked HTTP,
the store's view of a sliding window, and collect → draft against a local blog server."""

from __future__ import annotations

import email.utils
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from click.testing import CliRunner

from digest.cli import cli
from digest.errors import SourceError
from digest.http import Fetched
from digest.sources.feed_comments import (
    NO_COVERAGE,
    FeedCommentsConfig,
    FeedCommentsSource,
)
from digest.sources.registry import build_comment_sources, comment_blocks, validate_source_block
from digest.store import Store, open_store
from digest.types import CollectResult, Comment, Essay
from tests.fakes.site_server import Answer, LocalSite, Seen

DATA = Path(__file__).resolve().parent.parent / "data" / "feed_comments"
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
WP_FEED = "https://fieldnotes.example.org/essays/slow-build/feed/"
ATOM_FEED = "https://fieldnotes.example.org/blog/2026/sharpening/comments.xml"
SLOW_BUILD = Essay(
    source="blog",
    key="fieldnotes-2026-0042",
    url="https://fieldnotes.example.org/essays/slow-build",
    title="Tools & the slow build",
    comments_url=WP_FEED,
)
SHARPENING = Essay(
    source="blog",
    key="tag:fieldnotes.example.org,2026:entry-7",
    url="https://fieldnotes.example.org/blog/2026/sharpening",
    title="Sharpening",
    comments_url=ATOM_FEED,
)


def make_source(sleeps: list[float] | None = None, **keys: Any) -> FeedCommentsSource:
    config = FeedCommentsConfig.model_validate(
        {"type": "feed_comments", "name": "blog:comments", **keys}
    )
    return FeedCommentsSource(
        config, sleep=(sleeps.append if sleeps is not None else lambda _s: None)
    )


def parse(essay: Essay, body: bytes, content_type: str = "application/rss+xml") -> list[Comment]:
    fetched = Fetched(
        url=essay.comments_url, status=200, body=body, headers={"content-type": content_type}
    )
    return make_source().parse_for(essay, fetched, NOW)


def rows(comments: list[Comment]) -> list[tuple[Any, ...]]:
    return [(c.key, c.author, c.position, c.parent_key, c.published, c.score) for c in comments]


def rss(items: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>Comments</title>'
        f"<link>https://fieldnotes.example.org/</link>{items}</channel></rss>"
    ).encode()


# --- parse: saved payloads --------------------------------------------------------------------


def test_wordpress_comment_feed_is_read_oldest_first_without_threading() -> None:
    comments = parse(SLOW_BUILD, (DATA / "wordpress_post_comments.xml").read_bytes())
    guid = "https://fieldnotes.example.org/?p=42#comment-{}"
    assert rows(comments) == [
        # the feed lists the newest first; positions follow the date, oldest first
        (guid.format(31), "Bo Reed", 0, None, datetime(2026, 11, 4, 9, 10, tzinfo=UTC), None),
        (guid.format(32), "Ada Quill", 1, None, datetime(2026, 11, 4, 12, 0, tzinfo=UTC), None),
        (guid.format(33), "Cy Ode", 2, None, datetime(2026, 11, 5, 18, 20, tzinfo=UTC), None),
    ]
    bo = comments[0]
    assert bo.url == "https://fieldnotes.example.org/essays/slow-build#comment-31"
    # content:encoded wins over the description; relative links are made absolute
    assert bo.html == (
        '<p>I built the <a href="https://fieldnotes.example.org/essays/bench">bench</a> '
        "before the shelves, as you said.</p>"
    )
    assert bo.essay_key == "fieldnotes-2026-0042" and bo.source == "blog:comments"


def test_atom_comment_feed_with_rfc4685_threading() -> None:
    comments = parse(SHARPENING, (DATA / "atom_threaded.xml").read_bytes(), "application/atom+xml")
    tag = "tag:fieldnotes.example.org,2026:comment-{}"
    assert rows(comments) == [
        # in-reply-to the essay's own id: a top-level comment
        (tag.format(701), "Bo Reed", 0, None, datetime(2026, 11, 4, 20, 0, tzinfo=UTC), None),
        (tag.format(702), "Cy Ode", 1, None, datetime(2026, 11, 5, 9, 0, tzinfo=UTC), None),
        # in-reply-to another comment of this feed (and a +01:00 date normalized to UTC)
        (
            tag.format(703),
            "Dee Vance",
            2,
            tag.format(701),
            datetime(2026, 11, 5, 15, 30, tzinfo=UTC),
            None,
        ),
        # in-reply-to a comment that slid out of the feed's window: still its parent
        (
            tag.format(704),
            "Eli Marsh",
            3,
            tag.format(690),
            datetime(2026, 11, 6, 8, 0, tzinfo=UTC),
            None,
        ),
        # no id: the link is the key; no date: after the dated ones
        (
            "https://fieldnotes.example.org/blog/2026/sharpening#c-undated",
            "Fay Lund",
            4,
            None,
            None,
            None,
        ),
    ]
    by_key = {c.key: c for c in comments}
    # xml:base resolves the links; a text summary becomes an escaped paragraph
    assert by_key[tag.format(703)].html == (
        '<p>Water stones, then a <a href="https://fieldnotes.example.org/blog/2026/strop">strop</a>.</p>'
    )
    assert by_key[tag.format(702)].html == "<p>Five minutes every Monday &amp; nothing else.</p>"
    assert by_key[tag.format(701)].url == "https://fieldnotes.example.org/blog/2026/sharpening#c701"


def test_a_differently_prefixed_thread_namespace_still_threads() -> None:
    body = (
        (DATA / "atom_threaded.xml")
        .read_bytes()
        .replace(b"thr:", b"t:")
        .replace(b"xmlns:thr", b"xmlns:t")
    )
    comments = parse(SHARPENING, body, "application/atom+xml")
    assert [c.parent_key for c in comments][2] == "tag:fieldnotes.example.org,2026:comment-701"


def test_an_empty_comment_feed_is_no_comments() -> None:
    assert parse(SLOW_BUILD, rss("")) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"", "empty body"), (b"<html><body>Comments are closed.</body></html>", "not a feed")],
)
def test_something_that_is_not_a_feed_is_an_error_naming_the_comment_feed(
    body: bytes, reason: str
) -> None:
    with pytest.raises(SourceError, match=reason) as caught:
        parse(SLOW_BUILD, body, "text/html")
    assert str(caught.value).startswith(f"{WP_FEED}: not a feed: ")


def test_repeated_entries_once_and_keys_without_id_or_link_are_stable() -> None:
    item = (
        "<item><title>By: Bo</title><dc:creator xmlns:dc='http://purl.org/dc/elements/1.1/'>Bo</dc:creator>"
        "<pubDate>Mon, 02 Nov 2026 07:30:00 GMT</pubDate><description>{}</description></item>"
    )
    dup = "<item><guid isPermaLink='false'>c-1</guid><description>same</description></item>"
    first = parse(SLOW_BUILD, rss(item.format("Hello") + dup + dup))
    again = parse(SLOW_BUILD, rss(item.format("Hello") + dup))
    other = parse(SLOW_BUILD, rss(item.format("Other words")))
    assert [c.key for c in first][1:] == ["c-1"]
    assert first[0].key.startswith("sha256:") and first[0].key == again[0].key != other[0].key
    assert first[0].author == "Bo" and first[0].url == ""


# --- collect_for over (mocked) HTTP -----------------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def test_only_essays_with_a_comment_feed_are_fetched(mocked: responses.RequestsMock) -> None:
    mocked.get(
        WP_FEED,
        body=(DATA / "wordpress_post_comments.xml").read_bytes(),
        content_type="application/rss+xml",
    )
    plain = Essay(source="blog", key="no-feed", url="https://fieldnotes.example.org/x", title="x")
    result = make_source().collect_for([plain, SLOW_BUILD], NOW)
    assert result.error is None and result.warnings == ()
    assert len(mocked.calls) == 1
    assert "application/rss+xml" in mocked.calls[0].request.headers["Accept"]
    assert [(c.source, c.essay_source, c.essay_key) for c in result.comments] == [
        ("blog:comments", "blog", "fieldnotes-2026-0042")
    ] * 3
    # a comment feed is a window of the newest comments: it never claims to be complete
    assert result.covered == NO_COVERAGE
    assert make_source().collect_for([plain], NOW) == CollectResult(source="blog:comments")


def test_one_broken_comment_feed_is_a_warning(mocked: responses.RequestsMock) -> None:
    mocked.get(
        WP_FEED,
        body=(DATA / "wordpress_post_comments.xml").read_bytes(),
        content_type="application/rss+xml",
    )
    mocked.get(ATOM_FEED, status=404)
    result = make_source().collect_for([SLOW_BUILD, SHARPENING], NOW)
    assert result.error is None and len(result.comments) == 3
    assert result.warnings == (f"{SHARPENING.url}: {ATOM_FEED}: HTTP 404",)


def test_every_comment_feed_broken_is_an_error(mocked: responses.RequestsMock) -> None:
    mocked.get(WP_FEED, status=410)
    mocked.get(ATOM_FEED, body=b"<html>gone</html>", content_type="text/html")
    result = make_source().collect_for([SLOW_BUILD, SHARPENING], NOW)
    assert result.comments == () and result.error is not None
    assert result.error.startswith(
        f"{SLOW_BUILD.url}: {WP_FEED}: HTTP 410; {SHARPENING.url}: {ATOM_FEED}: not a feed"
    )


def test_429_is_retried_and_size_is_capped(mocked: responses.RequestsMock) -> None:
    mocked.get(WP_FEED, status=429, headers={"Retry-After": "2"})
    mocked.get(
        WP_FEED,
        body=(DATA / "wordpress_post_comments.xml").read_bytes(),
        content_type="application/rss+xml",
    )
    mocked.get(ATOM_FEED, body=b"x" * 5000, content_type="application/atom+xml")
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps, max_bytes=4096, timeout=3).collect_for(
        [SLOW_BUILD, SHARPENING], NOW
    )
    assert sleeps == [2.0] and len(result.comments) == 3
    assert result.warnings == (f"{SHARPENING.url}: {ATOM_FEED}: body is over the 4096-byte cap",)
    assert mocked.calls[0].request.req_kwargs["timeout"] == (3.0, 3.0)  # type: ignore[attr-defined]


def test_a_given_session_is_used_and_left_open(mocked: responses.RequestsMock) -> None:
    mocked.get(WP_FEED, body=rss(""), content_type="application/rss+xml")
    session = requests.Session()
    source = FeedCommentsSource(make_source().config, session)
    source.collect_for([SLOW_BUILD], NOW)
    assert source.session is session and session.adapters


# --- the store: a sliding window never deletes -------------------------------------------------


def test_comments_that_slide_out_of_the_feed_are_not_taken_for_deleted(sqlite_store: Store) -> None:
    sqlite_store.record_collect(CollectResult(source="blog", essays=(SLOW_BUILD,)), NOW)
    source = make_source()
    body = (DATA / "wordpress_post_comments.xml").read_bytes()
    first = source.parse_for(SLOW_BUILD, Fetched(url=WP_FEED, status=200, body=body), NOW)
    window = CollectResult(
        source="blog:comments",
        covered=NO_COVERAGE,
        comments=tuple(replace(c, essay_source="blog") for c in first),
    )
    assert sqlite_store.record_collect(window, NOW).new_comments == 3
    # later, the feed shows only the newest comment
    slid = CollectResult(source="blog:comments", covered=NO_COVERAGE, comments=window.comments[-1:])
    assert sqlite_store.record_collect(slid, NOW + timedelta(hours=1)).deleted_comments == 0
    ((essay_id, _),) = sqlite_store.candidate_essays(None, 10)
    assert len(sqlite_store.comments_for([essay_id])[essay_id]) == 3


# --- the implicit source a feed gets ----------------------------------------------------------


FEED_BLOCK = {"name": "blog", "type": "feed", "url": "https://fieldnotes.example.org/feed.xml"}


def test_a_feed_gets_comment_feeds_by_default() -> None:
    assert comment_blocks(FEED_BLOCK) == [{"type": "feed_comments", "name": "blog:comments"}]
    validate_source_block(FEED_BLOCK)
    (source,) = build_comment_sources(FEED_BLOCK)
    assert isinstance(source, FeedCommentsSource) and source.name == "blog:comments"
    assert source.config == FeedCommentsConfig(
        type="feed_comments",
        name="blog:comments",
        lookback_days=30,
        max_essays=30,
        timeout=30.0,
        max_bytes=2 * 1024 * 1024,
    )


@pytest.mark.parametrize("off", [False, "false", "no", 0])
def test_comment_feeds_false_turns_them_off(off: object) -> None:
    block = {**FEED_BLOCK, "comment_feeds": off}
    assert comment_blocks(block) == []
    validate_source_block(block)


def test_an_explicit_feed_comments_entry_replaces_the_implicit_one() -> None:
    block = {**FEED_BLOCK, "comments": {"type": "feed_comments", "lookback_days": 7}}
    assert comment_blocks(block) == [
        {"type": "feed_comments", "lookback_days": 7, "name": "blog:feed_comments"}
    ]
    (source,) = build_comment_sources(block)
    assert source.config.lookback_days == 7


def test_other_comment_sources_keep_the_implicit_one_beside_them() -> None:
    block = {**FEED_BLOCK, "comments": {"type": "discourse", "url": "https://talk.example.org"}}
    assert [(e["type"], e["name"]) for e in comment_blocks(block)] == [
        ("discourse", "blog:discourse"),
        ("feed_comments", "blog:comments"),
    ]
    # another entry that took the default name pushes the implicit one's name aside
    taken = {**FEED_BLOCK, "comments": {"type": "discourse", "name": "blog:comments"}}
    assert [e["name"] for e in comment_blocks(taken)] == ["blog:comments", "blog:feed_comments"]
    # an explicit feed_comments entry under any name means no implicit one
    own = {
        **FEED_BLOCK,
        "comments": [{"type": "feed_comments", "name": "blog:comments", "max_essays": 3}],
    }
    assert [e["name"] for e in comment_blocks(own)] == ["blog:comments"]


def test_only_feeds_get_one() -> None:
    assert comment_blocks({"name": "n", "type": "folder", "path": "."}) == []
    assert (
        comment_blocks({"name": "w", "type": "wordpress", "url": "https://blog.example.org"}) == []
    )


def test_a_bad_comment_feeds_value_is_reported_by_the_feed_block() -> None:
    with pytest.raises(Exception, match="comment_feeds"):
        validate_source_block({**FEED_BLOCK, "comment_feeds": "sometimes"})


# --- end to end: a local blog with comment feeds, the CLI, the store --------------------------


_BLOG_ROUTES: dict[str, tuple[str, str]] = {
    "/essays/slow-build/feed/": ("wordpress_post_comments.xml", "application/rss+xml; charset=UTF-8"),
    "/essays/sharpening/comments.xml": ("atom_threaded.xml", "application/atom+xml"),
}


@pytest.fixture
def blog_server() -> Iterator[LocalSite]:
    feed: list[bytes] = []

    def answer(req: Seen) -> Answer | None:
        if req.path == "/feed.xml":
            return 200, {"Content-Type": "application/rss+xml; charset=UTF-8"}, feed[0]
        if req.path in _BLOG_ROUTES:
            name, kind = _BLOG_ROUTES[req.path]
            return 200, {"Content-Type": kind}, (DATA / name).read_bytes()
        return None  # the "margins" essay's comment feed is gone

    with LocalSite(answer) as site:
        # The pipeline reads comments of essays published within lookback_days of the real
        # clock, so the essays' dates are set relative to it.
        today = datetime.now(UTC).replace(microsecond=0)
        body = (DATA / "site_feed.xml").read_text(encoding="utf-8").replace("@BASE@", site.url)
        for n in range(1, 5):
            body = body.replace(
                f"@DATE{n}@", email.utils.format_datetime(today - timedelta(days=n), usegmt=True)
            )
        feed.append(body.encode("utf-8"))
        yield site


def test_end_to_end_collect_and_draft(blog_server: LocalSite, tmp_path: Path) -> None:
    host, port = blog_server.host, blog_server.port
    db_url = f"sqlite:///{tmp_path / 'digest.db'}"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"""
database: {{url: "{db_url}"}}
newsletter: {{public_url: https://news.example.org}}
sources:
  - {{name: blog, type: feed, url: "http://{host}:{port}/feed.xml"}}
ranking: {{per_essay: 10, one_per_author: false}}
delivery: {{provider: outbox, outbox_dir: out}}
""",
        encoding="utf-8",
    )
    runner = CliRunner()
    collected = runner.invoke(cli, ["--config", str(cfg), "collect"], catch_exceptions=False)
    assert collected.exit_code == 0, collected.output
    assert "blog: 4 new essays" in collected.output
    assert (
        "blog:comments: 0 new essays, 0 updated; 8 new comments, 0 updated, 0 gone"
        in collected.output
    )
    drafted = runner.invoke(cli, ["--config", str(cfg), "draft"], catch_exceptions=False)
    assert drafted.exit_code == 0, drafted.output

    store = open_store(db_url)
    try:
        draft = store.get_draft(1)
        statuses = {s.source: s for s in store.source_statuses()}
    finally:
        store.close()
    assert [i.essay.title for i in draft.items] == [
        "Notebooks",
        "On margins",
        "Tools & the slow build",
        "Sharpening chisels & habits",
    ]
    assert (
        draft.items[3].essay.comments_url == f"http://{host}:{port}/essays/sharpening/comments.xml"
    )
    picked = [sorted(r.comment.author for r in i.comments) for i in draft.items]
    # every reader's comment; the essay's author (Ada Quill) is never picked as a reader
    assert picked == [
        [],
        [],
        ["Bo Reed", "Cy Ode"],
        ["Bo Reed", "Cy Ode", "Dee Vance", "Eli Marsh", "Fay Lund"],
    ]
    assert all(r.comment.score is None for i in draft.items for r in i.comments)
    # the one missing comment feed is a warning on the comment source, not a failure
    margins = statuses["blog:comments"]
    base = f"http://{host}:{port}"
    assert margins.last_error == f"{base}/essays/margins: {base}/essays/margins/feed/: HTTP 404"
    assert margins.comments == 8

    again = runner.invoke(cli, ["--config", str(cfg), "collect"], catch_exceptions=False)
    assert (
        "blog:comments: 0 new essays, 0 updated; 0 new comments, 0 updated, 0 gone" in again.output
    )
