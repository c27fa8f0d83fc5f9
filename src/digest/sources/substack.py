"""A Substack publication: essays and their reader comments. UNOFFICIAL.

Substack publishes no API. This source reads the JSON endpoints its own web pages use, which
were found by reverse engineering (see APIS.md C.6) and may change or disappear without
notice. So it checks every response's shape and, when it is not what is expected, fails with
``substack: the unofficial API changed: <what>`` instead of guessing: a guess could mail
readers a wrong or empty digest. Public posts need no login; nothing here sends a cookie.

Requests, against ``{url}/api/v1`` (``base_url`` overrides it):

1. ``archive?sort=new&offset=0&limit=<max_posts>``: the newest posts' metadata.
2. ``posts/<slug>``: one post's ``body_html``, for posts whose ``audience`` is ``everyone``.
3. ``post/<id>/comments?all_comments=true&sort=best_first``: the post's comment tree.

What the fields mean here:

- essay ``key``: ``substack:<post id>``. The id never changes; the URL changes when a
  publication moves to a custom domain, and the slug when the author edits it.
- essay ``html``: ``body_html`` for free posts. Posts for paid (or signed-in) subscribers
  keep only their subtitle as the summary and no body: anonymously the API returns a cut-off
  preview at best, and a digest must not pass paid writing on to every subscriber anyway.
- comment ``score``: ``reaction_count``, else the sum of the ``reactions`` counts (likes).
- comment ``position``: the order of a depth-first walk of the ``best_first`` tree (a
  comment, then its replies, then the next comment): Substack's own "best" order.
- comment ``parent_key``: the last id in ``ancestor_path`` (``"12.34"``: the parent is 34),
  else the comment it is nested under.
- comment ``html``: the plain-text ``body`` as escaped paragraphs. Deleted comments
  (``deleted: true`` or ``body: null``) are left out; their replies are kept.

Rate limits are undocumented and bursts get 429s; :func:`digest.http.fetch` waits and retries.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeGuard
from urllib.parse import quote, urlencode

import requests
from pydantic import Field

from digest import http
from digest.errors import SourceError
from digest.sources import feed
from digest.sources.base import SiteConfig, Source
from digest.types import CollectResult, Comment, Essay, SourceCursor

MAX_DEPTH = 50  # reply nesting we follow; deeper is a runaway (or hostile) tree
PUBLIC_AUDIENCE = "everyone"


class ApiChanged(SourceError):
    """A Substack response did not have the shape this source knows."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"substack: the unofficial API changed: {what}",
            hint="Substack has no official API; update digest, or use the publication's "
            "/feed as a `type: feed` source meanwhile",
        )




class SubstackConfig(SiteConfig):
    """``{name, type: substack, url, base_url, max_posts, timeout}``.

    ``url`` is the publication (``https://<pub>.substack.com`` or its custom domain);
    ``base_url`` overrides the API root (default ``{url}/api/v1``).
    """

    api_path: ClassVar[str] = "/api/v1"

    # Each post costs two requests (body, comments) on an API that answers bursts with 429.
    max_posts: int = Field(default=12, ge=1, le=100)


@dataclass(frozen=True)
class SubstackFetch:
    """What :meth:`SubstackSource.fetch` hands to :meth:`SubstackSource.parse`.

    ``bodies`` and ``comments`` are keyed by post id; ``problems`` says why a post's
    comments are missing (a network failure for one post is a warning, not a failure).
    """

    archive: Any
    bodies: dict[int, Any] = field(default_factory=dict)
    comments: dict[int, Any] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)


class SubstackSource(Source):
    """Essays and reader comments from a Substack publication (unofficial endpoints)."""

    type_name = "substack"
    config_model = SubstackConfig
    config: SubstackConfig


    # -- network ---------------------------------------------------------------------------

    def fetch(self, cursor: SourceCursor, now: datetime) -> SubstackFetch:
        """The archive, each free post's body and each post's comments."""
        with self.http_session() as session:
            archive = self._get(
                session,
                "archive",
                {"sort": "new", "offset": "0", "limit": str(self.config.max_posts)},
            )
            result = SubstackFetch(archive=archive)
            for post in _archive_posts(archive)[: self.config.max_posts]:
                post_id, slug = post["id"], post["slug"]
                if post.get("audience") == PUBLIC_AUDIENCE:
                    # A body we cannot read is an essay we cannot show: that fails the run.
                    result.bodies[post_id] = self._get(session, f"posts/{quote(slug, safe='')}")
                try:
                    result.comments[post_id] = self._get(
                        session,
                        f"post/{post_id}/comments",
                        {"all_comments": "true", "sort": "best_first"},
                    )
                except ApiChanged:
                    raise
                except SourceError as exc:
                    result.problems[post_id] = f"comments not read: {exc}"
            return result

    def _get(
        self, session: requests.Session, path: str, params: dict[str, str] | None = None
    ) -> Any:
        url = f"{self.config.api_root}/{path}"
        if params:
            url = f"{url}?{urlencode(params)}"
        connect = min(http.DEFAULT_TIMEOUT[0], self.config.timeout)
        fetched = http.fetch(
            session,
            url,
            headers={"Accept": "application/json"},
            timeout=(connect, self.config.timeout),
            sleep=self.sleep,
        )
        try:
            return json.loads(fetched.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiChanged(f"{url} did not answer JSON ({type(exc).__name__})") from exc

    # -- parsing ---------------------------------------------------------------------------

    def parse(self, raw: SubstackFetch, now: datetime) -> CollectResult:
        """Archive, bodies and comment trees → essays and comments. Pure."""
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        essays: list[Essay] = []
        comments: list[Comment] = []
        covered: list[tuple[str, str]] = []
        warnings: list[str] = []
        for post in _archive_posts(raw.archive)[: self.config.max_posts]:
            post_id = post["id"]
            body = ""
            if post.get("audience") == PUBLIC_AUDIENCE:
                body = _body_html(raw.bodies.get(post_id), post["slug"])
            essay = self._essay(post, body, now)
            essays.append(essay)
            if post_id in raw.comments:
                comments.extend(self._comments(essay, raw.comments[post_id], post_id, now))
                covered.append((essay.source, essay.key))
            else:
                warnings.append(f"{essay.url}: {raw.problems.get(post_id, 'comments not read')}")
        return CollectResult(
            source=self.name,
            essays=tuple(essays),
            comments=tuple(comments),
            covered=tuple(covered),
            warnings=tuple(warnings),
        )

    def _essay(self, post: Mapping[str, Any], body: str, now: datetime) -> Essay:
        url = feed.http_url(post.get("canonical_url")) or (
            f"{self.config.url}/p/{quote(str(post['slug']), safe='')}"
        )
        subtitle = feed.plain_text(_str(post.get("subtitle")) or _str(post.get("description")))
        return Essay(
            source=self.name,
            key=f"substack:{post['id']}",
            url=url,
            title=feed.plain_text(post["title"]) or feed.UNTITLED,
            html=body,
            summary=feed.excerpt(subtitle or feed.plain_text(body)),
            author=_bylines(post),
            published=_date(post.get("post_date"), now),
        )

    def _comments(self, essay: Essay, doc: Any, post_id: int, now: datetime) -> list[Comment]:
        if not isinstance(doc, dict) or not isinstance(doc.get("comments"), list):
            raise ApiChanged(f"post/{post_id}/comments has no comments list")
        out: list[Comment] = []
        for node, tree_parent in _walk(doc["comments"], post_id):
            cid = node["id"]
            body = node.get("body")
            if node.get("deleted") is True or body is None:
                continue  # its replies are still walked
            if not isinstance(body, str):
                raise ApiChanged(f"comment {cid} on post {post_id} has a body that is not text")
            html_text = _paragraphs(body)
            if not html_text:
                continue
            out.append(
                Comment(
                    source=self.name,
                    essay_key=essay.key,
                    key=str(cid),
                    author=feed.plain_text(_str(node.get("name")) or _str(node.get("handle"))),
                    html=html_text,
                    # Substack's comment permalink [unverified: the pattern its web pages link to].
                    url=f"{essay.url.rstrip('/')}/comment/{cid}",
                    score=_score(node, post_id),
                    published=_date(node.get("date"), now),
                    parent_key=_parent(node, tree_parent),
                    position=len(out),
                )
            )
        return out


# --- shape checks and helpers ----------------------------------------------------------------


def _archive_posts(archive: Any) -> list[dict[str, Any]]:
    """The archive's posts after checking the fields this source relies on."""
    if not isinstance(archive, list):
        raise ApiChanged(f"archive is a {type(archive).__name__}, not a list of posts")
    for i, post in enumerate(archive):
        if not isinstance(post, dict):
            raise ApiChanged(f"archive item {i + 1} is not an object")
        if not _is_id(post.get("id")):
            raise ApiChanged(f"archive item {i + 1} has no numeric id")
        for key in ("slug", "title"):
            if not isinstance(post.get(key), str) or not post[key]:
                raise ApiChanged(f"archive item {i + 1} (post {post['id']}) has no {key}")
        if not isinstance(post.get("audience"), str):
            # Without it we cannot tell a paid post from a free one: never guess that.
            raise ApiChanged(f"archive item {i + 1} (post {post['id']}) has no audience")
    return archive


def _body_html(doc: Any, slug: str) -> str:
    if not isinstance(doc, dict):
        raise ApiChanged(f"posts/{slug} is not an object")
    if "body_html" not in doc:
        raise ApiChanged(f"posts/{slug} has no body_html")
    body = doc["body_html"]
    if body is None:
        return ""  # a post with no text body (a podcast or video post)
    if not isinstance(body, str):
        raise ApiChanged(f"posts/{slug} body_html is not text")
    return body


def _walk(nodes: list[Any], post_id: int) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Depth-first, in the given order: (comment, id of the comment it is nested under)."""
    stack: list[tuple[list[Any], int, str | None, int]] = [(nodes, 0, None, 0)]
    # An explicit stack: a deep thread must not hit Python's recursion limit.
    while stack:
        items, index, parent, depth = stack.pop()
        if index >= len(items):
            continue
        stack.append((items, index + 1, parent, depth))
        node = items[index]
        if not isinstance(node, dict) or not _is_id(node.get("id")):
            raise ApiChanged(f"a comment on post {post_id} has no numeric id")
        yield node, parent
        children = node.get("children", [])
        if children is None:
            children = []
        if not isinstance(children, list):
            raise ApiChanged(
                f"comment {node['id']} on post {post_id} has children that are not a list"
            )
        if children and depth < MAX_DEPTH:
            stack.append((children, 0, str(node["id"]), depth + 1))


def _score(node: Mapping[str, Any], post_id: int) -> float:
    count = node.get("reaction_count")
    if _is_id(count):
        return float(count)
    reactions = node.get("reactions")
    if isinstance(reactions, dict) and all(_is_id(v) for v in reactions.values()):
        return float(sum(reactions.values()))
    raise ApiChanged(
        f"comment {node['id']} on post {post_id} has neither reaction_count nor reactions counts"
    )


def _parent(node: Mapping[str, Any], tree_parent: str | None) -> str | None:
    path = node.get("ancestor_path")
    if isinstance(path, str) and path.strip():
        last = path.strip().split(".")[-1].strip()
        if last:
            return last
    return tree_parent


def _paragraphs(text: str) -> str:
    """Plain text → escaped HTML: blank lines separate paragraphs, single newlines break lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(
        "<p>"
        + "<br>".join(html.escape(line.strip()) for line in p.split("\n") if line.strip())
        + "</p>"
        for p in paragraphs
    )


def _bylines(post: Mapping[str, Any]) -> str:
    people = post.get("publishedBylines")
    if not isinstance(people, list):
        return ""
    names = [feed.plain_text(_str(p.get("name"))) for p in people if isinstance(p, dict)]
    return ", ".join(n for n in names if n)


def _date(value: Any, now: datetime) -> datetime | None:
    """ISO 8601 (``2026-11-20T09:30:00.000Z``) → aware UTC, clamped to ``now``."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None  # one bad date must not lose the post
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return now if when > now + feed.FUTURE_GRACE else when


def _is_id(value: Any) -> TypeGuard[int]:
    """A JSON integer id (``True`` is an int to Python, but never an id)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
