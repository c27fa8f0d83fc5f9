"""The Reddit comment source: parsing saved threads, submission lookup, User-Agent, rate limits."""

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

from digest.sources.reddit import DEFAULT_USER_AGENT, RedditConfig, RedditSource, RedditThreads
from digest.sources.registry import build_comment_sources
from digest.types import Comment, Essay

DATA = Path(__file__).resolve().parent.parent / "data" / "reddit"
BASE = "https://www.reddit.com"
ESSAY_URL = "https://fieldnotes.example.org/essays/the-quiet-pager"
ESSAY = Essay(source="blog", key=ESSAY_URL, url=ESSAY_URL, title="The quiet pager")
NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
UA = "python:fieldnotes-digest:1.2 (by /u/ada_quill)"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def make_source(sleeps: list[float] | None = None, **keys: Any) -> RedditSource:
    config = RedditConfig.model_validate({"name": "blog:reddit", "type": "reddit", **keys})
    return RedditSource(config, sleep=(sleeps.append if sleeps is not None else lambda _s: None))


def parsed(**keys: Any) -> list[Comment]:
    raw = RedditThreads((load("comments_1qx7ab.json"), load("comments_1qx9cd.json")))
    return make_source(**keys).parse_for(ESSAY, raw, NOW)


def single(comment_data: dict[str, Any]) -> RedditThreads:
    page = load("comments_1qx9cd.json")
    page[1]["data"]["children"] = [{"kind": "t1", "data": comment_data}]
    return RedditThreads((page,))


def first_comment_data() -> dict[str, Any]:
    data: dict[str, Any] = copy.deepcopy(
        load("comments_1qx9cd.json")[1]["data"]["children"][0]["data"]
    )
    data["replies"] = ""
    return data


# --- parsing saved payloads -------------------------------------------------------------------


def test_comments_depth_first_with_scores_and_parents() -> None:
    rows = [(c.key, c.author, c.score, c.upvotes, c.parent_key, c.position) for c in parsed()]
    assert rows == [
        ("reddit:t1_k7a001", "quietops", 230, 230, None, 0),
        ("reddit:t1_k7a002", "pagerfatigue", 88, 88, "reddit:t1_k7a001", 1),
        # its parent was deleted; the reply stays and still names what it answers
        ("reddit:t1_k7a004", "sre_dan", 12, 12, "reddit:t1_k7a003", 2),
        ("reddit:t1_k7a006", "xss_enthusiast", 97, 97, None, 3),
        # score_hidden: unknown, not the placeholder 1
        ("reddit:t1_k7a007", "new_here", None, None, None, 4),
        # the account was deleted but the comment kept
        ("reddit:t1_k7a008", "", 41, 41, None, 5),
        ("reddit:t1_k7a009", "quietops", 15, 15, "reddit:t1_k7a008", 6),
        # the second submission's thread follows the first's
        ("reddit:t1_k7b001", "oncall_olga", 34, 34, None, 7),
        ("reddit:t1_k7b002", "mtbf", 9, 9, "reddit:t1_k7b001", 8),
        ("reddit:t1_k7b003", "quietops", 3, 3, None, 9),
    ]


def test_skips_deleted_removed_pinned_notices_and_more_stubs() -> None:
    keys = {c.key for c in parsed()}
    assert keys.isdisjoint(
        {
            "reddit:t1_k7a000",  # AutoModerator's pinned notice
            "reddit:t1_k7a003",  # body [deleted]
            "reddit:t1_k7a005",  # body [removed]
            "reddit:t1_k7a0zz",  # "more" stub inside replies
            "reddit:t1_k7a0yy",  # "more" stub at the top level
        }
    )


def test_comment_fields() -> None:
    first = parsed()[0]
    assert first == Comment(
        source="blog:reddit",
        essay_key=ESSAY_URL,
        key="reddit:t1_k7a001",
        author="quietops",
        html='<div class="md"><p>The best alert is the one you deleted. We went from 40 pages a week to 6 '
        "by asking <em>who would have woken up for this?</em></p>\n</div>",
        url=f"{BASE}/r/programming/comments/1qx7ab/the_quiet_pager_why_the_best_oncall_rotations/k7a001/",
        score=230,
        published=datetime(2026, 11, 20, 12, 20, tzinfo=UTC),
        parent_key=None,
        position=0,
        upvotes=230,
        downvotes=None,
    )


def test_escaped_body_html_is_unescaped_exactly_once() -> None:
    by_key = {c.key: c for c in parsed()}
    # the comment's text mentions "<5m>": it must stay text (&lt;5m&gt;), not become a tag
    assert by_key["reddit:t1_k7a002"].html == (
        '<div class="md"><p>Our rule of thumb: if the runbook says <code>sleep &lt;5m&gt; then check</code>, '
        "it&#39;s not an alert, it&#39;s a cron job.</p>\n</div>"
    )
    # markup stays as given: sanitizing is the renderer's job
    assert '<script>alert("r")</script>' in by_key["reddit:t1_k7a006"].html
    assert 'onerror="alert(1)"' in by_key["reddit:t1_k7a006"].html


def test_raw_json_body_html_is_not_unescaped_again() -> None:
    data = first_comment_data()
    data["body_html"] = '<div class="md"><p>a &lt;b&gt; &amp;amp; c</p>\n</div>'
    (comment,) = make_source().parse_for(ESSAY, single(data), NOW)
    assert comment.html == '<div class="md"><p>a &lt;b&gt; &amp;amp; c</p>\n</div>'


def test_hidden_scores_can_be_included_on_request() -> None:
    by_key = {c.key: c for c in parsed(include_hidden_scores=True)}
    assert (by_key["reddit:t1_k7a007"].score, by_key["reddit:t1_k7a007"].upvotes) == (1, 1)


def test_a_page_that_is_not_submission_and_comments_is_an_error() -> None:
    from digest.errors import SourceError

    with pytest.raises(SourceError, match=r"not \[submission, comments\]"):
        make_source().parse_for(ESSAY, RedditThreads(({"kind": "Listing"},)), NOW)


def test_a_relative_permalink_only_and_odd_dates() -> None:
    data = first_comment_data()
    data.update(permalink="javascript:alert(1)", created_utc=4_102_444_800.0)  # 2100
    (comment,) = make_source().parse_for(ESSAY, single(data), NOW)
    assert comment.url == "" and comment.published == NOW


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_registry() -> None:
    block = {"name": "blog", "type": "folder", "path": ".", "comments": [{"type": "reddit"}]}
    (source,) = [s for s in build_comment_sources(block) if s.config.type == "reddit"]
    assert isinstance(source, RedditSource)
    cfg = source.config
    assert (
        cfg.base_url,
        cfg.user_agent,
        cfg.subreddits,
        cfg.max_submissions,
        cfg.include_hidden_scores,
    ) == (BASE, DEFAULT_USER_AGENT, (), 3, False)
    assert DEFAULT_USER_AGENT.startswith("python:digest-newsletter:")


def test_subreddit_names_are_normalized() -> None:
    assert make_source(subreddits=["r/SRE", "/r/programming", "devops"]).config.subreddits == (
        "SRE",
        "programming",
        "devops",
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"user_agent": "digest\r\nX-Evil: 1"}, "one non-empty line"),
        ({"user_agent": "  "}, "one non-empty line"),
        ({"subreddits": ["../admin"]}, "not a subreddit name"),
        ({"max_submissions": 0}, "max_submissions"),
        ({"base_url": "reddit.com"}, "http:// or https://"),
        ({"client_secret": "x"}, "client_secret"),
    ],
)
def test_config_rejects(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        RedditConfig.model_validate({"name": "r", "type": "reddit", **keys})


# --- fetch over (mocked) HTTP -----------------------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def path_and_query(call: Any) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(call.request.url)
    return parts.path, parse_qsl(parts.query)


TOP = [("sort", "top"), ("limit", "200"), ("raw_json", "1")]


def serve(mocked: responses.RequestsMock, base: str = BASE, **info_headers: str) -> None:
    mocked.get(f"{base}/api/info.json", json=load("info.json"), headers=info_headers)
    mocked.get(f"{base}/r/programming/comments/1qx7ab.json", json=load("comments_1qx7ab.json"))
    mocked.get(f"{base}/r/sre/comments/1qx9cd.json", json=load("comments_1qx9cd.json"))


def test_finds_submissions_by_url_best_first_with_a_descriptive_user_agent(
    mocked: responses.RequestsMock,
) -> None:
    serve(mocked)
    mocked.get(
        f"{BASE}/r/devops/comments/1qz1gh.json",
        json=[
            {"kind": "Listing", "data": {"children": []}},
            {"kind": "Listing", "data": {"children": []}},
        ],
    )
    result = make_source(user_agent=UA).collect_for([ESSAY], NOW)
    assert result.error is None and result.warnings == ()
    assert len(result.comments) == 10
    # by score: 1qx7ab (412), 1qx9cd (57), 1qz1gh (3); 1qy0ef has no comments and costs nothing
    assert [path_and_query(c) for c in mocked.calls] == [
        ("/api/info.json", [("url", ESSAY_URL)]),
        ("/r/programming/comments/1qx7ab.json", TOP),
        ("/r/sre/comments/1qx9cd.json", TOP),
        ("/r/devops/comments/1qz1gh.json", TOP),
    ]
    assert all(c.request.headers["User-Agent"] == UA for c in mocked.calls)
    assert all(c.request.headers["Accept"] == "application/json" for c in mocked.calls)


def test_max_submissions_and_the_default_user_agent(mocked: responses.RequestsMock) -> None:
    serve(mocked)
    result = make_source(max_submissions=1).collect_for([ESSAY], NOW)
    assert [c.key for c in result.comments][:1] == ["reddit:t1_k7a001"] and len(
        result.comments
    ) == 7
    assert [path_and_query(c)[0] for c in mocked.calls] == [
        "/api/info.json",
        "/r/programming/comments/1qx7ab.json",
    ]
    assert mocked.calls[0].request.headers["User-Agent"] == DEFAULT_USER_AGENT


def test_subreddits_restrict_the_submissions(mocked: responses.RequestsMock) -> None:
    serve(mocked)
    result = make_source(subreddits=["r/SRE"]).collect_for([ESSAY], NOW)
    assert [c.key for c in result.comments] == [
        "reddit:t1_k7b001",
        "reddit:t1_k7b002",
        "reddit:t1_k7b003",
    ]
    assert [c.position for c in result.comments] == [0, 1, 2]
    assert [path_and_query(c)[0] for c in mocked.calls] == [
        "/api/info.json",
        "/r/sre/comments/1qx9cd.json",
    ]


def test_base_url_override_for_a_local_server(mocked: responses.RequestsMock) -> None:
    local = "http://127.0.0.1:8765"
    serve(mocked, base=local)
    result = make_source(base_url=local + "/", max_submissions=2).collect_for([ESSAY], NOW)
    assert result.comments[0].url.startswith(f"{local}/r/programming/comments/1qx7ab/")


def test_no_submission_means_no_comments(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/api/info.json", json={"kind": "Listing", "data": {"children": []}})
    result = make_source().collect_for([ESSAY], NOW)
    assert (
        result.error is None and result.comments == () and result.covered == (("blog", ESSAY_URL),)
    )


def test_ids_that_are_not_reddit_names_never_reach_a_url(mocked: responses.RequestsMock) -> None:
    info = load("info.json")
    for child in info["data"]["children"]:
        child["data"]["id"] = "../../api/v1/me"
    mocked.get(f"{BASE}/api/info.json", json=info)
    result = make_source().collect_for([ESSAY], NOW)
    assert result.comments == () and len(mocked.calls) == 1


def test_an_exhausted_rate_limit_stops_requests_and_says_when_to_retry(
    mocked: responses.RequestsMock,
) -> None:
    serve(
        mocked,
        **{"X-Ratelimit-Used": "10", "X-Ratelimit-Remaining": "0.0", "X-Ratelimit-Reset": "240"},
    )
    other = Essay(
        source="blog", key="e2", url="https://fieldnotes.example.org/essays/margins", title="M"
    )
    result = make_source().collect_for([ESSAY, other], NOW)
    # nothing was read beyond the answer that said the allowance is gone
    assert [path_and_query(c)[0] for c in mocked.calls] == ["/api/info.json"]
    message = (
        "Reddit's rate limit is used up (X-Ratelimit-Remaining: 0): not sending more requests; "
        "retry after 2026-11-26 09:04:00 UTC (in 240 s, X-Ratelimit-Reset)"
    )
    assert result.error == f"{ESSAY_URL}: {message}; {other.url}: {message}"


def test_allowance_used_up_on_the_last_request_keeps_that_essay(
    mocked: responses.RequestsMock,
) -> None:
    mocked.get(
        f"{BASE}/api/info.json", json=load("info.json"), headers={"X-Ratelimit-Remaining": "2"}
    )
    mocked.get(
        f"{BASE}/r/programming/comments/1qx7ab.json",
        json=load("comments_1qx7ab.json"),
        headers={"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "30"},
    )
    other = Essay(
        source="blog", key="e2", url="https://fieldnotes.example.org/essays/margins", title="M"
    )
    result = make_source(max_submissions=1).collect_for([ESSAY, other], NOW)
    assert result.covered == (("blog", ESSAY_URL),) and len(result.comments) == 7
    assert len(result.warnings) == 1 and "retry after 2026-11-26 09:00:30 UTC" in result.warnings[0]
    assert len(mocked.calls) == 2


def test_429_waits_for_retry_after_then_reads(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/api/info.json", status=429, headers={"Retry-After": "6"})
    serve(mocked)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps, max_submissions=2).collect_for([ESSAY], NOW)
    assert result.error is None and len(result.comments) == 10
    assert sleeps == [6.0]


def test_a_server_error_is_an_error_value(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/api/info.json", status=500)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect_for([ESSAY], NOW)
    assert result.error == (
        f"{ESSAY_URL}: {BASE}/api/info.json?url=https%3A%2F%2Ffieldnotes.example.org"
        "%2Fessays%2Fthe-quiet-pager: HTTP 500"
    )
    assert len(mocked.calls) == 4 and sleeps == [0.5, 1.0, 2.0]


def test_a_blocked_or_missing_thread_is_a_warning_for_that_essay(
    mocked: responses.RequestsMock,
) -> None:
    other = Essay(
        source="blog", key="e2", url="https://fieldnotes.example.org/essays/margins", title="M"
    )
    mocked.get(
        f"{BASE}/api/info.json",
        json=load("info.json"),
        match=[responses.matchers.query_param_matcher({"url": ESSAY_URL})],
    )
    mocked.get(f"{BASE}/r/programming/comments/1qx7ab.json", json=load("comments_1qx7ab.json"))
    mocked.get(
        f"{BASE}/api/info.json",
        status=404,
        match=[responses.matchers.query_param_matcher({"url": other.url})],
    )
    result = make_source(max_submissions=1).collect_for([ESSAY, other], NOW)
    assert result.covered == (("blog", ESSAY_URL),)
    assert len(result.warnings) == 1 and result.warnings[0].startswith(f"{other.url}: ")
    assert result.warnings[0].endswith(": HTTP 404")


def test_the_size_cap_is_respected(mocked: responses.RequestsMock) -> None:
    serve(mocked)
    result = make_source(max_bytes=8000).collect_for([ESSAY], NOW)
    assert result.error is not None
    assert result.error.endswith(
        "/r/programming/comments/1qx7ab.json?sort=top&limit=200&raw_json=1: "
        "body is over the 8000-byte cap"
    )


def test_an_answer_that_is_not_json_is_an_error(mocked: responses.RequestsMock) -> None:
    mocked.get(
        f"{BASE}/api/info.json", body="<html>whoa there, pardner</html>", content_type="text/html"
    )
    result = make_source().collect_for([ESSAY], NOW)
    assert result.error is not None and result.error.endswith(
        "the answer is not JSON (JSONDecodeError)"
    )
