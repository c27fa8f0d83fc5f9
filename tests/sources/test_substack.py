"""The Substack source (unofficial endpoints): saved payloads, shape checks, mocked HTTP, and the
whole collect → draft flow against a local Substack-shaped server."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic
import pytest
import responses
from click.testing import CliRunner

from digest.cli import cli
from digest.errors import SourceError
from digest.sources.registry import build_source
from digest.sources.substack import SubstackConfig, SubstackFetch, SubstackSource
from digest.store import open_store
from digest.types import SourceCursor
from tests.fakes.site_server import Answer, LocalSite, Seen

DATA = Path(__file__).resolve().parent.parent / "data" / "substack"
PUB = "https://quietletters.substack.com"
API = f"{PUB}/api/v1"
NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
POST_IDS = (140001, 139872, 139500)
CHANGED = "substack: the unofficial API changed: "


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def make_source(sleeps: list[float] | None = None, **keys: Any) -> SubstackSource:
    config = SubstackConfig.model_validate(
        {"name": "letters", "type": "substack", "url": PUB, **keys}
    )
    return SubstackSource(config, sleep=(sleeps.append if sleeps is not None else lambda _s: None))


def saved_fetch(**changes: Any) -> SubstackFetch:
    raw = SubstackFetch(
        archive=load("archive.json"),
        bodies={
            140001: load("post_the-long-winter-garden.json"),
            139500: load("post_on-mending.json"),
        },
        comments={i: load(f"comments_{i}.json") for i in POST_IDS},
    )
    for key, value in changes.items():
        object.__setattr__(raw, key, value)
    return raw


# --- parse: saved payloads --------------------------------------------------------------------


def test_saved_archive_and_bodies_become_essays() -> None:
    result = make_source().parse(saved_fetch(), NOW)
    assert [(e.key, e.url, e.title, e.author, e.published) for e in result.essays] == [
        (
            "substack:140001",
            f"{PUB}/p/the-long-winter-garden",
            "The long winter garden",
            "Hanna Vale",
            datetime(2026, 11, 18, 9, 30, tzinfo=UTC),
        ),
        (
            "substack:139872",
            f"{PUB}/p/letters-i-never-sent",
            "Letters I never sent",
            "Hanna Vale",
            datetime(2026, 11, 11, 9, 30, tzinfo=UTC),
        ),
        (
            "substack:139500",
            f"{PUB}/p/on-mending",
            "On mending",
            "Hanna Vale",
            datetime(2026, 11, 4, 9, 30, tzinfo=UTC),
        ),
    ]
    garden, paid, mending = result.essays
    assert garden.html == load("post_the-long-winter-garden.json")["body_html"]
    assert garden.summary == "What grows when nothing seems to"
    # a paid-only post keeps its subtitle as the summary and no body at all
    assert paid.html == ""
    assert paid.summary == "For paying readers: the drafts behind this year\u2019s essays"
    # an empty subtitle falls back to the description
    assert mending.summary == "A darning needle, a sock, and an argument for keeping things."


def test_saved_comment_tree_in_best_first_order() -> None:
    result = make_source().parse(saved_fetch(), NOW)
    rows = [
        (c.essay_key, c.key, c.author, c.score, c.parent_key, c.position) for c in result.comments
    ]
    assert rows == [
        # depth first: 9101, its reply 9105, the reply to the deleted 9107; then 9102, 9103
        ("substack:140001", "9101", "Leo Park", 12.0, None, 0),
        ("substack:140001", "9105", "Mira Okafor", 4.0, "9101", 1),  # reactions dict summed
        ("substack:140001", "9110", "Sam Ruiz", 1.0, "9107", 2),  # last id of ancestor_path
        ("substack:140001", "9102", "Ada", 7.0, None, 3),
        ("substack:140001", "9103", "Jo Lin", 0.0, None, 4),
        ("substack:139872", "9050", "Nell Ashby", 3.0, None, 0),
    ]
    leo, mira = result.comments[:2]
    # plain text: blank lines make paragraphs, single newlines line breaks; markup is escaped
    assert leo.html == (
        "<p>This made me go out and look at my frozen beds.<br>The kale is still "
        "there!</p><p>Thanks for the nudge.</p>"
    )
    assert mira.html == (
        "<p>Kale is indestructible. Mine survived a &lt;b&gt;blizzard&lt;/b&gt; &amp; a goat.</p>"
    )
    assert leo.url == f"{PUB}/p/the-long-winter-garden/comment/9101"
    assert leo.published == datetime(2026, 11, 18, 11, 2, 13, 412000, tzinfo=UTC)
    assert result.covered == tuple(("letters", f"substack:{i}") for i in POST_IDS)
    assert result.warnings == ()


def test_a_post_whose_comments_failed_is_a_warning_and_not_covered() -> None:
    comments = {i: load(f"comments_{i}.json") for i in (139872, 139500)}
    raw = saved_fetch(comments=comments, problems={140001: "comments not read: HTTP 500"})
    result = make_source().parse(raw, NOW)
    assert len(result.essays) == 3
    assert [c.key for c in result.comments] == ["9050"]
    assert ("letters", "substack:140001") not in result.covered
    assert result.warnings == (f"{PUB}/p/the-long-winter-garden: comments not read: HTTP 500",)


def _mutate_archive(fn: Any) -> Any:
    archive = load("archive.json")
    fn(archive)
    return archive


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"archive": {"posts": []}}, "archive is a dict, not a list of posts"),
        (
            {"archive": _mutate_archive(lambda a: a[1].pop("id"))},
            "archive item 2 has no numeric id",
        ),
        (
            {"archive": _mutate_archive(lambda a: a[0].pop("slug"))},
            "archive item 1 (post 140001) has no slug",
        ),
        (
            {"archive": _mutate_archive(lambda a: a[2].pop("audience"))},
            "archive item 3 (post 139500) has no audience",
        ),
        (
            {
                "bodies": {
                    140001: {"id": 140001, "body": "<p>x</p>"},
                    139500: load("post_on-mending.json"),
                }
            },
            "posts/the-long-winter-garden has no body_html",
        ),
        (
            {
                "comments": {
                    **{i: load(f"comments_{i}.json") for i in POST_IDS},
                    140001: [{"id": 1}],
                }
            },
            "post/140001/comments has no comments list",
        ),
    ],
)
def test_an_unexpected_shape_is_a_clear_error(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SourceError) as caught:
        make_source().parse(saved_fetch(**change), NOW)
    assert str(caught.value).startswith(CHANGED + message)
    assert caught.value.hint is not None and "type: feed" in caught.value.hint


def _comment_change(fn: Any) -> dict[str, Any]:
    comments = {i: load(f"comments_{i}.json") for i in POST_IDS}
    fn(comments[140001]["comments"])
    return {"comments": comments}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda cs: cs[1].pop("reaction_count"),
            "comment 9102 on post 140001 has neither reaction_count nor reactions",
        ),
        (
            lambda cs: cs[0].update(children={"9105": {}}),
            "comment 9101 on post 140001 has children that are not a list",
        ),
        (lambda cs: cs[2].update(id="9103"), "a comment on post 140001 has no numeric id"),
        (
            lambda cs: cs[2].update(body={"text": "x"}),
            "comment 9103 on post 140001 has a body that is not text",
        ),
    ],
)
def test_an_unexpected_comment_shape_is_a_clear_error(change: Any, message: str) -> None:
    with pytest.raises(SourceError, match="^" + CHANGED + message):
        make_source().parse(saved_fetch(**_comment_change(change)), NOW)


def test_a_very_deep_thread_is_cut_not_a_crash() -> None:
    node: dict[str, Any] = {
        "id": 1,
        "body": "root",
        "name": "A",
        "reaction_count": 0,
        "children": [],
    }
    top = node
    for i in range(2, 5000):
        child = {"id": i, "body": f"reply {i}", "name": "A", "reaction_count": 0, "children": []}
        node["children"] = [child]
        node = child
    comments: dict[int, Any] = {i: {"comments": []} for i in POST_IDS}
    comments[140001] = {"comments": [top]}
    result = make_source().parse(saved_fetch(comments=comments), NOW)
    assert len(result.comments) == 51  # the root and 50 levels of replies


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_registry() -> None:
    source = build_source({"name": "letters", "type": "substack", "url": PUB + "/"})
    assert isinstance(source, SubstackSource)
    assert source.config == SubstackConfig(
        name="letters", type="substack", url=PUB, base_url=None, max_posts=12, timeout=30.0
    )
    assert source.config.api_root == API
    assert (
        make_source(base_url="http://127.0.0.1:9/api/v1").config.api_root
        == "http://127.0.0.1:9/api/v1"
    )


@pytest.mark.parametrize(
    "keys",
    [{"url": "quietletters.substack.com"}, {"max_posts": 0}, {"timeout": -1}, {"cookie": "x"}],
)
def test_config_rejects(keys: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        SubstackConfig.model_validate({"name": "letters", "type": "substack", "url": PUB, **keys})


# --- fetch over (mocked) HTTP -----------------------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def serve_saved(rsps: responses.RequestsMock, *, skip: tuple[str, ...] = ()) -> None:
    urls = {
        f"{API}/archive": load("archive.json"),
        f"{API}/posts/the-long-winter-garden": load("post_the-long-winter-garden.json"),
        f"{API}/posts/on-mending": load("post_on-mending.json"),
        **{f"{API}/post/{i}/comments": load(f"comments_{i}.json") for i in POST_IDS},
    }
    for url, body in urls.items():
        if url not in skip:
            rsps.get(url, json=body)


def test_fetch_asks_for_the_archive_free_bodies_and_every_comment_tree(
    mocked: responses.RequestsMock,
) -> None:
    serve_saved(mocked)
    result = make_source(max_posts=3).collect(SourceCursor(), NOW)
    assert result.error is None
    assert len(result.essays) == 3 and len(result.comments) == 6
    assert [str(c.request.url) for c in mocked.calls] == [
        f"{API}/archive?sort=new&offset=0&limit=3",
        f"{API}/posts/the-long-winter-garden",
        f"{API}/post/140001/comments?all_comments=true&sort=best_first",
        # the paid post's body is never asked for
        f"{API}/post/139872/comments?all_comments=true&sort=best_first",
        f"{API}/posts/on-mending",
        f"{API}/post/139500/comments?all_comments=true&sort=best_first",
    ]
    assert all(c.request.headers["Accept"] == "application/json" for c in mocked.calls)
    assert all("Cookie" not in c.request.headers for c in mocked.calls)


def test_max_posts_bounds_the_work_even_if_the_archive_sends_more(
    mocked: responses.RequestsMock,
) -> None:
    serve_saved(mocked)
    result = make_source(max_posts=1).collect(SourceCursor(), NOW)
    assert [e.key for e in result.essays] == ["substack:140001"]
    assert len(mocked.calls) == 3


def test_429_is_retried_after_the_servers_delay(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{API}/archive", status=429, headers={"Retry-After": "4"})
    serve_saved(mocked)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect(SourceCursor(), NOW)
    assert result.error is None and len(result.essays) == 3
    assert sleeps == [4.0]


def test_a_comment_request_that_fails_is_a_warning(mocked: responses.RequestsMock) -> None:
    serve_saved(mocked, skip=(f"{API}/post/139872/comments",))
    mocked.get(f"{API}/post/139872/comments", status=503)
    sleeps: list[float] = []
    result = make_source(sleeps=sleeps).collect(SourceCursor(), NOW)
    assert result.error is None and len(result.essays) == 3
    assert result.warnings == (
        (
            f"{PUB}/p/letters-i-never-sent: comments not read: "
            f"{API}/post/139872/comments?all_comments=true&sort=best_first: HTTP 503"
        ),
    )
    assert sleeps == [0.5, 1.0, 2.0]


def test_html_instead_of_json_means_the_api_changed(mocked: responses.RequestsMock) -> None:
    mocked.get(
        f"{API}/archive", body="<!doctype html><title>Substack</title>", content_type="text/html"
    )
    result = make_source().collect(SourceCursor(), NOW)
    assert result.error is not None
    assert result.error.startswith(
        CHANGED + f"{API}/archive?sort=new&offset=0&limit=12 did not answer JSON (JSONDecodeError)"
    )


def test_a_missing_archive_is_an_error_naming_the_url(mocked: responses.RequestsMock) -> None:
    mocked.get(f"{API}/archive", status=404)
    result = make_source().collect(SourceCursor(), NOW)
    assert result.error == f"{API}/archive?sort=new&offset=0&limit=12: HTTP 404"


# --- end to end: a local Substack-shaped server, the CLI, the store ---------------------------


def _answer_substack(req: Seen) -> Answer | None:
    name = {
        "/api/v1/archive": "archive.json",
        "/api/v1/posts/the-long-winter-garden": "post_the-long-winter-garden.json",
        "/api/v1/posts/on-mending": "post_on-mending.json",
        **{f"/api/v1/post/{i}/comments": f"comments_{i}.json" for i in POST_IDS},
    }.get(req.path)
    if name is None or (name.startswith("comments_") and req.params.get("sort") != "best_first"):
        return None
    return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(load(name)).encode()


@pytest.fixture
def substack_server() -> Iterator[LocalSite]:
    with LocalSite(_answer_substack) as site:
        yield site


def test_end_to_end_collect_and_draft(substack_server: LocalSite, tmp_path: Path) -> None:
    host, port = substack_server.host, substack_server.port
    db_url = f"sqlite:///{tmp_path / 'digest.db'}"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"""
database: {{url: "{db_url}"}}
newsletter: {{public_url: https://news.example.org}}
sources:
  - {{name: letters, type: substack, url: "http://{host}:{port}"}}
delivery: {{provider: outbox, outbox_dir: out}}
""",
        encoding="utf-8",
    )
    runner = CliRunner()
    collected = runner.invoke(cli, ["--config", str(cfg), "collect"], catch_exceptions=False)
    assert collected.exit_code == 0, collected.output
    assert "letters: 3 new essays, 0 updated; 6 new comments, 0 updated, 0 gone" in collected.output
    drafted = runner.invoke(cli, ["--config", str(cfg), "draft"], catch_exceptions=False)
    assert drafted.exit_code == 0, drafted.output

    store = open_store(db_url)
    try:
        draft = store.get_draft(1)
    finally:
        store.close()
    assert [(i.essay.key, i.essay.title, bool(i.essay.html)) for i in draft.items] == [
        ("substack:139500", "On mending", True),
        ("substack:139872", "Letters I never sent", False),  # paid: summary only
        ("substack:140001", "The long winter garden", True),
    ]
    picked = [[(r.comment.key, r.comment.score) for r in i.comments] for i in draft.items]
    # three per essay at most, the most reacted-to first; 1 and 0 reactions lose out
    assert picked == [[], [("9050", 3.0)], [("9101", 12.0), ("9102", 7.0), ("9105", 4.0)]]

    # a second collect changes nothing: the same keys, nothing new, nothing gone
    again = runner.invoke(cli, ["--config", str(cfg), "collect"], catch_exceptions=False)
    assert "letters: 0 new essays, 0 updated; 0 new comments, 0 updated, 0 gone" in again.output


def test_saved_payloads_are_not_mutated_by_parse() -> None:
    raw = saved_fetch()
    before = copy.deepcopy(raw.comments)
    make_source().parse(raw, NOW)
    assert raw.comments == before
