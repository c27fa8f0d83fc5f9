"""The Hacker News comment source: parsing saved trees, story lookup by URL, failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pydantic
import pytest
import responses

from digest.errors import SourceError
from digest.http import USER_AGENT
from digest.sources.hackernews import (
    HackerNewsConfig,
    HackerNewsSource,
    HackerNewsStories,
    normalize_url,
)
from digest.sources.registry import build_comment_sources
from digest.types import Comment, Essay

DATA = Path(__file__).resolve().parent.parent / "data" / "hackernews"
BASE = "https://hn.algolia.com/api/v1"
ESSAY_URL = "https://fieldnotes.example.org/essays/the-quiet-pager"
ESSAY = Essay(source="blog", key=ESSAY_URL, url=ESSAY_URL, title="The quiet pager")
NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def make_source(sleeps: list[float] | None = None, **keys: Any) -> HackerNewsSource:
    config = HackerNewsConfig.model_validate(
        {"name": "blog:hackernews", "type": "hackernews", **keys}
    )
    return HackerNewsSource(
        config, sleep=(sleeps.append if sleeps is not None else lambda _s: None)
    )


def parsed() -> list[Comment]:
    raw = HackerNewsStories((load("item_41230001.json"), load("item_41230555.json")))
    return make_source().parse_for(ESSAY, raw, NOW)


# --- parsing saved payloads -------------------------------------------------------------------


def test_comments_depth_first_in_hn_order_without_scores() -> None:
    rows = [(c.key, c.author, c.score, c.parent_key, c.position) for c in parsed()]
    assert rows == [
        ("hn:41230101", "hollowcore", None, None, 0),
        ("hn:41230150", "jlund", None, "hn:41230101", 1),
        ("hn:41230190", "hollowcore", None, "hn:41230150", 2),
        # the reply of a deleted comment stays, naming the deleted parent
        ("hn:41230199", "marisol", None, "hn:41230160", 3),
        ("hn:41230120", "nightshift", None, None, 4),
        ("hn:41230140", "kestrel", None, None, 5),
        # the second story's comments are numbered on after the first's
        ("hn:41230601", "ops_anon", None, None, 6),
    ]


def test_deleted_and_dead_comments_are_skipped() -> None:
    keys = {c.key for c in parsed()}
    assert "hn:41230160" not in keys  # deleted: author and text null
    assert "hn:41230130" not in keys  # dead: text null
    assert "hn:41230001" not in keys  # the story itself


def test_comment_fields() -> None:
    first = parsed()[0]
    assert first == Comment(
        source="blog:hackernews",
        essay_key=ESSAY_URL,
        key="hn:41230101",
        author="hollowcore",
        html="<p>This matches my experience running a payments on-call. The alerts nobody would wake up for "
        "were 80% of our pages, and deleting them made the remaining ones <i>mean</i> something again.",
        url="https://news.ycombinator.com/item?id=41230101",
        score=None,
        published=datetime(2026, 11, 20, 13, 17, tzinfo=UTC),
        parent_key=None,
        position=0,
    )


def test_html_is_kept_as_given_for_the_renderer_to_sanitize() -> None:
    hostile = {c.key: c for c in parsed()}["hn:41230120"].html
    assert "<script>alert('hn')</script>" in hostile and "onerror=alert(1)" in hostile


def test_created_at_is_the_fallback_date_and_future_dates_clamp() -> None:
    story = load("item_41230555.json")
    child = story["children"][0]
    del child["created_at_i"]
    (comment,) = make_source().parse_for(ESSAY, HackerNewsStories((story,)), NOW)
    assert child["created_at"] == "2026-11-21T04:35:00.000Z"
    assert comment.published == datetime(2026, 11, 21, 4, 35, tzinfo=UTC)
    child["created_at_i"] = 4_102_444_800  # 2100
    (comment,) = make_source().parse_for(ESSAY, HackerNewsStories((story,)), NOW)
    assert comment.published == NOW


def test_an_answer_that_is_not_an_item_is_an_error() -> None:
    with pytest.raises(SourceError, match="not an item"):
        make_source().parse_for(ESSAY, HackerNewsStories(({"error": "not found"},)), NOW)


def test_url_normalization() -> None:
    same = [
        "https://fieldnotes.example.org/essays/the-quiet-pager",
        "http://www.fieldnotes.example.org/essays/the-quiet-pager/",
        "HTTPS://FieldNotes.example.org/essays/the-quiet-pager#comments",
        "https://fieldnotes.example.org:443/essays/the-quiet-pager",
    ]
    assert {normalize_url(u) for u in same} == {"fieldnotes.example.org/essays/the-quiet-pager"}
    assert normalize_url(ESSAY_URL + "-revisited") != normalize_url(ESSAY_URL)
    assert normalize_url("https://fieldnotes.example.org/essays/The-Quiet-Pager") != normalize_url(
        ESSAY_URL
    )


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_registry() -> None:
    block = {"name": "blog", "type": "folder", "path": ".", "comments": {"type": "hackernews"}}
    (source,) = [s for s in build_comment_sources(block) if s.config.type == "hackernews"]
    assert isinstance(source, HackerNewsSource)
    cfg = source.config
    assert (cfg.name, cfg.base_url, cfg.max_stories, cfg.min_points) == (
        "blog:hackernews",
        BASE,
        3,
        0,
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"max_stories": 0}, "max_stories"),
        ({"min_points": -1}, "min_points"),
        ({"base_url": "hn.algolia.com"}, "http:// or https://"),
        ({"api_key": "x"}, "api_key"),
    ],
)
def test_config_rejects(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        HackerNewsConfig.model_validate({"name": "h", "type": "hackernews", **keys})


# --- fetch over (mocked) HTTP -----------------------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def path_and_query(call: Any) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(call.request.url)
    return parts.path, parse_qsl(parts.query)


SEARCH = (
    "/api/v1/search",
    [("query", ESSAY_URL), ("restrictSearchableAttributes", "url"), ("tags", "story")],
)


def serve(mocked: responses.RequestsMock, base: str = BASE) -> None:
    mocked.get(f"{base}/search", json=load("search.json"))
    mocked.get(f"{base}/items/41230001", json=load("item_41230001.json"))
    mocked.get(f"{base}/items/41230555", json=load("item_41230555.json"))


def test_search_by_url_then_read_the_matching_stories_best_first(
    mocked: responses.RequestsMock,
) -> None:
    serve(mocked)
    result = make_source().collect_for([ESSAY], NOW)
    assert result.error is None and result.warnings == ()
    assert [c.key for c in result.comments][-1] == "hn:41230601" and len(result.comments) == 7
    # "-revisited" is another URL, the Ask HN has none, 41231000 has no comments
    assert [path_and_query(c) for c in mocked.calls] == [
        SEARCH,
        ("/api/v1/items/41230001", []),
        ("/api/v1/items/41230555", []),
    ]
    assert all(c.request.headers["User-Agent"] == USER_AGENT for c in mocked.calls)


def test_min_points_and_max_stories(mocked: responses.RequestsMock) -> None:
    serve(mocked)
    make_source(min_points=5).collect_for([ESSAY], NOW)
    make_source(max_stories=1).collect_for([ESSAY], NOW)
    paths = [path_and_query(c)[0] for c in mocked.calls]
    assert paths == ["/api/v1/search", "/api/v1/items/41230001"] * 2


def test_base_url_override(mocked: responses.RequestsMock) -> None:
    local = "http://127.0.0.1:8766/api"
    serve(mocked, base=local)
    result = make_source(base_url=local + "/").collect_for([ESSAY], NOW)
    assert len(result.comments) == 7
    # comment links always go to HN itself, whatever serves the API
    assert result.comments[0].url == "https://news.ycombinator.com/item?id=41230101"


def test_no_matching_story_means_no_comments(mocked: responses.RequestsMock) -> None:
    found = load("search.json")
    found["hits"] = [h for h in found["hits"] if h["objectID"] == "41230777"]
    mocked.get(f"{BASE}/search", json=found)
    result = make_source().collect_for([ESSAY], NOW)
    assert (
        result.error is None and result.comments == () and result.covered == (("blog", ESSAY_URL),)
    )
    assert len(mocked.calls) == 1


def test_a_search_answer_without_hits_is_an_error(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/search", json={"message": "Invalid parameters"})
    result = make_source().collect_for([ESSAY], NOW)
    assert result.error == f"{ESSAY_URL}: the Hacker News search answer has no hits list"


def test_429_waits_for_retry_after_then_reads(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/items/41230001", status=429, headers={"Retry-After": "2"})
    serve(mocked)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect_for([ESSAY], NOW)
    assert result.error is None and len(result.comments) == 7
    assert sleeps == [2.0]


def test_one_broken_story_fails_its_essay_with_a_warning(mocked: responses.RequestsMock) -> None:
    other = Essay(
        source="blog", key="e2", url="https://fieldnotes.example.org/essays/margins", title="M"
    )
    serve(mocked)
    mocked.get(
        f"{BASE}/search",
        json={"hits": [{"objectID": "999", "url": other.url, "points": 9, "num_comments": 3}]},
        match=[
            responses.matchers.query_param_matcher(
                {"query": other.url, "restrictSearchableAttributes": "url", "tags": "story"}
            )
        ],
    )
    mocked.get(f"{BASE}/items/999", status=404)
    result = make_source().collect_for([ESSAY, other], NOW)
    assert result.covered == (("blog", ESSAY_URL),) and len(result.comments) == 7
    assert result.warnings == (f"{other.url}: {BASE}/items/999: HTTP 404",)


def test_a_server_error_is_an_error_value(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/search", status=503)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect_for([ESSAY], NOW)
    assert result.error is not None and result.error.endswith(": HTTP 503")
    assert len(mocked.calls) == 4 and sleeps == [0.5, 1.0, 2.0]


def test_the_size_cap_is_respected(mocked: responses.RequestsMock) -> None:
    serve(mocked)
    result = make_source(max_bytes=3000).collect_for([ESSAY], NOW)
    assert (
        result.error == f"{ESSAY_URL}: {BASE}/search?query=https%3A%2F%2Ffieldnotes.example.org%2F"
        "essays%2Fthe-quiet-pager&restrictSearchableAttributes=url&tags=story: body is over the 3000-byte cap"
    )
