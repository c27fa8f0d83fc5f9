"""The Discourse comment source: parsing saved topics, topic lookup, pagination, failures."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pydantic
import pytest
import responses

from digest.http import USER_AGENT
from digest.sources.discourse import (
    DiscourseConfig,
    DiscourseSource,
    DiscourseThread,
    normalize_url,
)
from digest.sources.registry import build_comment_sources, validate_source_block
from digest.types import Comment, Essay

DATA = Path(__file__).resolve().parent.parent / "data" / "discourse"
FORUM = "https://forum.fieldnotes.example.org"
ESSAY_URL = "https://fieldnotes.example.org/essays/the-quiet-pager"
ESSAY = Essay(source="blog", key=ESSAY_URL, url=ESSAY_URL, title="The quiet pager")
NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def make_source(sleeps: list[float] | None = None, **keys: Any) -> DiscourseSource:
    block = {"name": "blog:discourse", "type": "discourse", "base_url": FORUM, **keys}
    config = DiscourseConfig.model_validate(block)
    return DiscourseSource(config, sleep=(sleeps.append if sleeps is not None else lambda _s: None))


def saved_thread() -> DiscourseThread:
    return DiscourseThread(topic=load("topic_4217.json"), pages=(load("posts_4217.json"),))


def parsed() -> list[Comment]:
    return make_source().parse_for(ESSAY, saved_thread(), NOW)


# --- parsing saved payloads -------------------------------------------------------------------


def test_reader_posts_in_stream_order_with_likes_and_parents() -> None:
    rows = [(c.key, c.author, c.score, c.parent_key, c.position) for c in parsed()]
    assert rows == [
        ("discourse:71002", "Mara Lindqvist", 14, None, 0),
        ("discourse:71003", "Tomás Jones", 3, "discourse:71002", 1),
        ("discourse:71008", "Mallory Quinn", 9, None, 2),
        # a deleted account: no name, no username
        ("discourse:71009", "", 2, "discourse:71008", 3),
        ("discourse:71010", "Dev Okafor", 5, None, 4),
        ("discourse:71011", "Mara Lindqvist", 4, "discourse:71010", 5),
        # an empty display name falls back to the username
        ("discourse:71012", "sam_w", 1, None, 6),
        ("discourse:71013", "Priya Raman", 6, "discourse:71002", 7),
        # no like item in actions_summary: zero likes
        ("discourse:71014", "Lena Vogt", 0, None, 8),
        ("discourse:71015", "Tomás Jones", 2, "discourse:71014", 9),
        ("discourse:71016", "Chen Wei", 1, None, 10),
        ("discourse:71017", "Ola Nordmann", 0, None, 11),
        ("discourse:71018", "Grace Hopkins", 3, "discourse:71013", 12),
        ("discourse:71019", "Priya Raman", 2, "discourse:71018", 13),
        # from the second request (beyond the first chunk of 20)
        ("discourse:71021", "Inès Laurent", 11, None, 14),
        ("discourse:71022", "Dev Okafor", 1, "discourse:71021", 15),
        ("discourse:71023", "Hugo Brandt", 0, "discourse:71009", 16),
    ]


def test_skips_the_first_post_whispers_deleted_hidden_and_moderator_posts() -> None:
    keys = {c.key for c in parsed()}
    skipped = {
        "discourse:71001",  # post 1: the embed's "companion discussion" post
        "discourse:71004",  # whisper (post_type 4)
        "discourse:71005",  # deleted by staff (deleted_at)
        "discourse:71006",  # hidden by flags
        "discourse:71007",  # small action "pinned" (post_type 3)
        "discourse:71020",  # withdrawn by its author (user_deleted)
        "discourse:71024",  # moderator action (post_type 2)
    }
    assert keys.isdisjoint(skipped)
    assert len(keys) == 24 - len(skipped)


def test_comment_fields() -> None:
    by_key = {c.key: c for c in parsed()}
    first = by_key["discourse:71002"]
    assert first == Comment(
        source="blog:discourse",
        essay_key=ESSAY_URL,
        key="discourse:71002",
        author="Mara Lindqvist",
        html="<p>We cut our pages by two thirds the year we started asking <em>who would have woken up "
        "for this</em> before any alert went live. Most of our alerts failed that test.</p>",
        url=f"{FORUM}/t/the-quiet-pager/4217/2",
        score=14,
        published=datetime(2026, 11, 20, 11, 14, 14, 126000, tzinfo=UTC),
        parent_key=None,
        position=0,
        upvotes=14,
        downvotes=None,
    )
    assert by_key["discourse:71022"].url == f"{FORUM}/t/the-quiet-pager/4217/22"
    assert all(c.published is not None and c.published.tzinfo is UTC for c in by_key.values())


def test_html_is_kept_as_given_for_the_renderer_to_sanitize() -> None:
    hostile = {c.key: c for c in parsed()}["discourse:71008"].html
    assert '<script>alert("pwned")</script>' in hostile
    assert 'onerror="alert(document.cookie)"' in hostile


def test_discourse_own_score_is_not_the_like_count() -> None:
    topic = load("topic_4217.json")
    post = topic["post_stream"]["posts"][1]
    assert post["score"] != 14  # the internal ranking score differs from the likes we use
    assert parsed()[0].score == 14


def test_no_topic_means_no_comments() -> None:
    assert make_source().parse_for(ESSAY, None, NOW) == []


def test_reply_to_post_one_or_to_an_unlisted_post_is_top_level() -> None:
    topic = load("topic_4217.json")
    posts = topic["post_stream"]["posts"]
    posts[1]["reply_to_post_number"] = 1
    posts[2]["reply_to_post_number"] = 99  # a post the stream no longer lists
    comments = make_source().parse_for(ESSAY, DiscourseThread(topic), NOW)
    assert [(c.key, c.parent_key) for c in comments[:2]] == [
        ("discourse:71002", None),
        ("discourse:71003", None),
    ]


def test_posts_of_another_topic_and_repeats_are_ignored() -> None:
    page = load("posts_4217.json")
    stray = copy.deepcopy(page["post_stream"]["posts"][0])
    stray.update(id=88888, topic_id=5000, post_number=30)
    page["post_stream"]["posts"].append(stray)
    repeat = {"post_stream": {"posts": [load("topic_4217.json")["post_stream"]["posts"][1]]}}
    comments = make_source().parse_for(
        ESSAY, DiscourseThread(load("topic_4217.json"), (page, repeat)), NOW
    )
    keys = [c.key for c in comments]
    assert "discourse:88888" not in keys
    assert len(keys) == len(set(keys)) == 17


def test_future_dates_are_clamped_to_now() -> None:
    topic = load("topic_4217.json")
    topic["post_stream"]["posts"][1]["created_at"] = "2099-01-01T00:00:00Z"
    topic["post_stream"]["posts"][2]["created_at"] = "not a date"
    comments = make_source().parse_for(ESSAY, DiscourseThread(topic), NOW)
    assert comments[0].published == NOW
    assert comments[1].published is None


def test_normalize_url() -> None:
    assert normalize_url("https://www.Example.org/a/b/") == normalize_url(
        "http://example.org/a/b#x"
    )
    assert normalize_url("https://example.org/a?x=1") != normalize_url("https://example.org/a")
    assert normalize_url("https://example.org:8443/a") != normalize_url("https://example.org/a")


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_registry() -> None:
    block = {
        "name": "blog",
        "type": "feed",
        "url": "https://fieldnotes.example.org/feed.xml",
        "comments": {"type": "discourse", "base_url": FORUM + "/"},
    }
    validate_source_block(block)
    # (a feed may also get other comment sources by default: pick ours)
    (source,) = [s for s in build_comment_sources(block) if s.config.type == "discourse"]
    assert isinstance(source, DiscourseSource)
    cfg = source.config
    assert (cfg.name, cfg.base_url, cfg.topic_id, cfg.topic_ids, cfg.api_key, cfg.max_posts) == (
        "blog:discourse",
        FORUM,
        None,
        {},
        None,
        400,
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({}, "base_url"),
        ({"base_url": "ftp://forum.example.org"}, "http:// or https://"),
        ({"base_url": FORUM, "topic_id": 0}, "topic_id"),
        ({"base_url": FORUM, "topic_ids": {ESSAY_URL: -3}}, "positive"),
        ({"base_url": FORUM, "api_username": "system"}, "api_username needs api_key"),
        ({"base_url": FORUM, "topic": 3}, "topic"),
    ],
)
def test_config_rejects(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DiscourseConfig.model_validate({"name": "d", "type": "discourse", **keys})


# --- fetch over (mocked) HTTP -----------------------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def path_and_query(call: Any) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(call.request.url)
    return parts.path, parse_qsl(parts.query)


def serve_topic(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{FORUM}/t/4217.json", json=load("topic_4217.json"))
    mocked.get(f"{FORUM}/t/4217/posts.json", json=load("posts_4217.json"))


def test_embed_lookup_then_topic_then_the_posts_beyond_the_first_chunk(
    mocked: responses.RequestsMock,
) -> None:
    mocked.get(f"{FORUM}/embed/info", json=load("embed_info.json"))
    serve_topic(mocked)
    result = make_source().collect_for([ESSAY], NOW)
    assert result.error is None and result.warnings == ()
    assert len(result.comments) == 17
    assert result.covered == (("blog", ESSAY_URL),)
    assert [path_and_query(c) for c in mocked.calls] == [
        ("/embed/info", [("embed_url", ESSAY_URL)]),
        ("/t/4217.json", []),
        (
            "/t/4217/posts.json",
            [
                ("post_ids[]", "71021"),
                ("post_ids[]", "71022"),
                ("post_ids[]", "71023"),
                ("post_ids[]", "71024"),
            ],
        ),
    ]
    for call in mocked.calls:
        assert call.request.headers["Accept"] == "application/json"
        assert call.request.headers["User-Agent"] == USER_AGENT
        assert "Api-Key" not in call.request.headers


def test_configured_topic_ids_win_and_match_a_normalized_url(
    mocked: responses.RequestsMock,
) -> None:
    serve_topic(mocked)
    source = make_source(
        topic_ids={"http://www.fieldnotes.example.org/essays/the-quiet-pager/": 4217}, topic_id=1
    )
    result = source.collect_for([ESSAY], NOW)
    assert len(result.comments) == 17
    assert [path_and_query(c)[0] for c in mocked.calls] == ["/t/4217.json", "/t/4217/posts.json"]


def test_a_fixed_topic_id_skips_the_lookup(mocked: responses.RequestsMock) -> None:
    serve_topic(mocked)
    result = make_source(topic_id=4217).collect_for([ESSAY], NOW)
    assert len(result.comments) == 17
    assert [path_and_query(c)[0] for c in mocked.calls] == ["/t/4217.json", "/t/4217/posts.json"]


def test_without_embedding_search_finds_the_topic_that_links_the_essay(
    mocked: responses.RequestsMock,
) -> None:
    mocked.get(f"{FORUM}/embed/info", status=404, json={"errors": ["not found"]})
    mocked.get(f"{FORUM}/search.json", json=load("search.json"))
    mocked.get(f"{FORUM}/t/3999.json", json=load("topic_3999.json"))
    serve_topic(mocked)
    result = make_source().collect_for([ESSAY], NOW)
    assert result.error is None and len(result.comments) == 17
    # the first hit only mentions the blog; the second links the essay and is read only once
    assert [path_and_query(c) for c in mocked.calls][:4] == [
        ("/embed/info", [("embed_url", ESSAY_URL)]),
        ("/search.json", [("q", ESSAY_URL)]),
        ("/t/3999.json", []),
        ("/t/4217.json", []),
    ]
    assert [path_and_query(c)[0] for c in mocked.calls][4:] == ["/t/4217/posts.json"]


def test_embed_info_forbidden_without_a_key_also_falls_back_to_search(
    mocked: responses.RequestsMock,
) -> None:
    mocked.get(f"{FORUM}/embed/info", status=403)
    mocked.get(f"{FORUM}/search.json", json={"posts": [], "topics": []})
    result = make_source().collect_for([ESSAY], NOW)
    assert result.error is None and result.warnings == ()
    # no discussion yet: no comments, and the essay counts as read
    assert result.comments == () and result.covered == (("blog", ESSAY_URL),)


def test_embed_info_server_error_is_not_mistaken_for_not_found(
    mocked: responses.RequestsMock,
) -> None:
    mocked.get(f"{FORUM}/embed/info", status=500)
    result = make_source().collect_for([ESSAY], NOW)
    assert (
        result.error == f"{ESSAY_URL}: {FORUM}/embed/info?embed_url="
        "https%3A%2F%2Ffieldnotes.example.org%2Fessays%2Fthe-quiet-pager: HTTP 500"
    )
    assert not any(path_and_query(c)[0] == "/search.json" for c in mocked.calls)


def synthetic_topic(
    count: int, first_chunk: int = 20
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    posts = {
        100 + n: {
            "id": 100 + n,
            "post_number": n,
            "post_type": 1,
            "username": f"user{n}",
            "cooked": f"<p>post {n}</p>",
            "created_at": "2026-11-21T10:00:00Z",
            "topic_id": 77,
        }
        for n in range(1, count + 1)
    }
    topic = {
        "id": 77,
        "slug": "long-one",
        "post_stream": {
            "posts": [posts[100 + n] for n in range(1, first_chunk + 1)],
            "stream": sorted(posts),
        },
    }
    return topic, posts


def test_the_rest_of_a_long_topic_comes_in_chunks_of_twenty(mocked: responses.RequestsMock) -> None:
    topic, posts = synthetic_topic(45)
    mocked.get(f"{FORUM}/t/77.json", json=topic)

    def page(request: Any) -> tuple[int, dict[str, str], str]:
        ids = [int(v) for k, v in parse_qsl(urlsplit(request.url).query) if k == "post_ids[]"]
        return 200, {}, json.dumps({"post_stream": {"posts": [posts[i] for i in ids]}})

    mocked.add_callback(responses.GET, f"{FORUM}/t/77/posts.json", callback=page)
    result = make_source(topic_id=77).collect_for([ESSAY], NOW)
    assert result.error is None
    assert [c.key for c in result.comments] == [f"discourse:{100 + n}" for n in range(2, 46)]
    chunks = [[int(v) for _, v in path_and_query(c)[1]] for c in mocked.calls[1:]]
    assert chunks == [list(range(121, 141)), list(range(141, 146))]


def test_max_posts_bounds_a_runaway_topic(mocked: responses.RequestsMock) -> None:
    topic, posts = synthetic_topic(45)
    mocked.get(f"{FORUM}/t/77.json", json=topic)
    mocked.get(
        f"{FORUM}/t/77/posts.json",
        json={"post_stream": {"posts": [posts[i] for i in range(121, 126)]}},
    )
    result = make_source(topic_id=77, max_posts=25).collect_for([ESSAY], NOW)
    assert len(mocked.calls) == 2
    assert [int(v) for _, v in path_and_query(mocked.calls[1])[1]] == list(range(121, 126))
    assert len(result.comments) == 24


def test_api_key_headers(mocked: responses.RequestsMock) -> None:
    serve_topic(mocked)
    make_source(topic_id=4217, api_key="k3y", api_username="digest-bot").collect_for([ESSAY], NOW)
    for call in mocked.calls:
        assert call.request.headers["Api-Key"] == "k3y"
        assert call.request.headers["Api-Username"] == "digest-bot"


def test_429_waits_for_retry_after_then_reads(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{FORUM}/t/4217.json", status=429, headers={"Retry-After": "4"})
    serve_topic(mocked)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps, topic_id=4217).collect_for([ESSAY], NOW)
    assert result.error is None and len(result.comments) == 17
    assert sleeps == [4.0]
    assert [path_and_query(c)[0] for c in mocked.calls] == [
        "/t/4217.json",
        "/t/4217.json",
        "/t/4217/posts.json",
    ]


def test_one_broken_topic_is_a_warning_and_the_others_still_arrive(
    mocked: responses.RequestsMock,
) -> None:
    other = Essay(
        source="blog",
        key="e2",
        url="https://fieldnotes.example.org/essays/margins",
        title="Margins",
    )
    serve_topic(mocked)
    mocked.get(f"{FORUM}/t/5001.json", status=500)
    sleeps: list[float] = []
    source = make_source(sleeps=sleeps, topic_ids={ESSAY_URL: 4217, other.url: 5001})
    result = source.collect_for([ESSAY, other], NOW)
    assert result.error is None
    assert result.warnings == (f"{other.url}: {FORUM}/t/5001.json: HTTP 500",)
    assert result.covered == (("blog", ESSAY_URL),)
    assert {c.essay_key for c in result.comments} == {ESSAY_URL}
    assert sleeps == [0.5, 1.0, 2.0]  # 500 is retried three times first


def test_a_missing_topic_is_an_error_value_naming_it(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{FORUM}/t/4217.json", status=404)
    result = make_source(topic_id=4217).collect_for([ESSAY], NOW)
    assert result.error == f"{ESSAY_URL}: {FORUM}/t/4217.json: HTTP 404"
    assert result.comments == () and result.covered == ()


def test_the_size_cap_is_respected(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{FORUM}/t/4217.json", json=load("topic_4217.json"))
    result = make_source(topic_id=4217, max_bytes=4096).collect_for([ESSAY], NOW)
    assert result.error == f"{ESSAY_URL}: {FORUM}/t/4217.json: body is over the 4096-byte cap"


def test_an_answer_that_is_not_a_topic_is_an_error(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{FORUM}/t/4217.json", body="<html>maintenance</html>", content_type="text/html")
    mocked.get(f"{FORUM}/t/4218.json", json={"errors": ["nope"]})
    result = make_source(topic_ids={ESSAY_URL: 4217, "https://x.example/": 4218}).collect_for(
        [ESSAY, Essay(source="blog", key="x", url="https://x.example/", title="X")], NOW
    )
    assert result.error is not None
    assert "the answer is not JSON" in result.error
    assert f"{FORUM}/t/4218.json: not a Discourse topic" in result.error
