"""A WordPress site through its REST API (``/wp-json/wp/v2``): essays and their comments.

``fetch()`` makes one GET for the newest posts, then for each post GETs its approved comments,
oldest first, page by page (100 a page, following ``X-WP-TotalPages``, at most
``MAX_COMMENT_PAGES`` pages). ``parse()`` is pure.

What the fields mean here:

- essay ``key``: the post's ``guid.rendered`` (``https://blog.example.org/?p=123``), else
  ``wp:<id>``. Not ``link``: the permalink changes whenever the slug or the site's permalink
  structure does, and a changed key would send the essay again as new. WordPress writes the
  guid once, when the post is created, and never rewrites it (even when the site moves);
  its RSS feed uses the same guid, so the key matches what a ``feed`` source would use.
- essay ``title``: ``title.rendered`` as plain text (it is HTML with entities: ``&#8217;``).
- essay ``html``: ``content.rendered``, relative links made absolute; not sanitized here
  (the renderer sanitizes once, DESIGN rule 4). ``summary``: ``excerpt.rendered`` as text.
- essay ``author``: the embedded author's name when the site embeds it, else empty.
- password-protected posts are left out: they are for the people who know the password.
- comment ``score``: ``None``. WordPress core has no comment rating; rating plugins differ
  per site, and ``karma`` is only in the authenticated edit context (and normally 0).
- comment ``position``: the index in date order, oldest first (the order WordPress shows).
- comment ``parent_key``: the parent comment's id (``parent`` 0 means a top-level comment).

A post whose comments were all read is listed in ``CollectResult.covered``, so comments
missing from it later were deleted or unapproved at the site. A post whose comments could not
all be read is a warning, not a failure: its essay is still collected.

Sites that disable the REST API answer 401, 403 or 404; the error says to use a ``feed``
source instead, which reads WordPress's per-post comment feeds by default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeGuard
from urllib.parse import urlencode

import requests
from pydantic import Field

from digest import http
from digest.errors import SourceError
from digest.sources import feed
from digest.sources.base import SiteConfig, Source
from digest.types import CollectResult, Comment, Essay, SourceCursor

PER_PAGE = 100  # the REST API's maximum per_page
MAX_COMMENT_PAGES = 10  # 1,000 comments per post per run; a bigger thread is read partly
POST_FIELDS = (
    "id,date_gmt,modified_gmt,link,guid,title,content,excerpt,author,status,"
    # _embed=author needs _links (embedding follows them) and _embedded listed when _fields
    # is used [unverified: core behaviour since WordPress 5.4]. A site that ignores it only
    # loses the author's name.
    "_links,_embedded"
)
COMMENT_FIELDS = "id,post,parent,author_name,date_gmt,content,link,status,type"
DISABLED_STATUSES = frozenset({401, 403, 404})
FEED_HINT = (
    "the site's REST API is off or hidden: use a `type: feed` source with its /feed/ URL "
    "instead; it reads each post's comment feed by default"
)




class WordPressConfig(SiteConfig):
    """``{name, type: wordpress, url, base_url, max_posts, timeout}``.

    ``url`` is the site (``https://blog.example.org``); ``base_url`` overrides the REST root
    (default ``{url}/wp-json/wp/v2``; a site without pretty permalinks needs
    ``{url}/?rest_route=/wp/v2``).
    """

    api_path: ClassVar[str] = "/wp-json/wp/v2"

    max_posts: int = Field(default=20, ge=1, le=PER_PAGE)


@dataclass(frozen=True)
class WordPressFetch:
    """What :meth:`WordPressSource.fetch` hands to :meth:`WordPressSource.parse`.

    By post id: ``comments`` holds a post's comments when all of them were read;
    ``partial`` the pages read before a failure or the page cap; ``problems`` says why a
    post's comments are missing or partial.
    """

    posts_url: str
    posts: Any
    comments: dict[int, list[Any]] = field(default_factory=dict)
    partial: dict[int, list[Any]] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)


class WordPressSource(Source):
    """Essays and their comments from a WordPress site's REST API."""

    type_name = "wordpress"
    config_model = WordPressConfig
    config: WordPressConfig


    # -- network ---------------------------------------------------------------------------

    def fetch(self, cursor: SourceCursor, now: datetime) -> WordPressFetch:
        """The newest posts, then each post's comments; :class:`SourceError` if posts fail."""
        with self.http_session() as session:
            posts_url = _url(
                f"{self.config.api_root}/posts",
                {
                    "per_page": str(self.config.max_posts),
                    "orderby": "date",
                    "order": "desc",
                    "_embed": "author",
                    "_fields": POST_FIELDS,
                },
            )
            try:
                posts, _ = self._get(session, posts_url)
            except SourceError as exc:
                status = _status_of(exc, posts_url)
                if status in DISABLED_STATUSES:
                    raise SourceError(
                        f"wordpress: {posts_url}: HTTP {status}", hint=FEED_HINT
                    ) from exc
                raise
            if not isinstance(posts, list):
                raise SourceError(
                    f"wordpress: {posts_url}: expected a list of posts, got {type(posts).__name__}",
                    hint=FEED_HINT,
                )
            result = WordPressFetch(posts_url=posts_url, posts=posts)
            # A site that ignores per_page must not multiply the comment requests.
            for post in posts[: self.config.max_posts]:
                post_id = post.get("id") if isinstance(post, dict) else None
                if not isinstance(post_id, int) or isinstance(post_id, bool):
                    continue  # parse() reports the malformed post
                if _protected(post):
                    continue  # parse() leaves it out, so its comments are not needed
                self._fetch_comments(session, post_id, result)
            return result

    def _fetch_comments(
        self, session: requests.Session, post_id: int, into: WordPressFetch
    ) -> None:
        """All of one post's comments, oldest first, page by page, into ``into``."""
        rows: list[Any] = []
        page = 1
        while True:
            url = _url(
                f"{self.config.api_root}/comments",
                {
                    "post": str(post_id),
                    "per_page": str(PER_PAGE),
                    "page": str(page),
                    "order": "asc",
                    "_fields": COMMENT_FIELDS,
                },
            )
            try:
                data, headers = self._get(session, url)
            except SourceError as exc:
                status = _status_of(exc, url)
                hint = f" ({FEED_HINT})" if status in DISABLED_STATUSES and page == 1 else ""
                into.problems[post_id] = f"comments not read: {exc}{hint}"
                if rows:
                    into.partial[post_id] = rows
                return
            if not isinstance(data, list):
                into.problems[post_id] = (
                    f"comments not read: {url}: expected a list, got {type(data).__name__}"
                )
                return
            rows.extend(data)
            total = _int_header(headers.get("x-wp-totalpages"))
            if total is None:
                # Without the header (a caching proxy may strip it), a full page means there
                # may be more; a short one is the last.
                more = len(data) >= PER_PAGE
            else:
                more = page < total
            if not more or not data:
                into.comments[post_id] = rows
                return
            if page >= MAX_COMMENT_PAGES:
                into.problems[post_id] = (
                    f"more than {MAX_COMMENT_PAGES * PER_PAGE} comments: only the oldest "
                    f"{len(rows)} were read"
                )
                into.partial[post_id] = rows
                return
            page += 1

    def _get(self, session: requests.Session, url: str) -> tuple[Any, dict[str, str]]:
        connect = min(http.DEFAULT_TIMEOUT[0], self.config.timeout)
        fetched = http.fetch(
            session,
            url,
            headers={"Accept": "application/json"},
            timeout=(connect, self.config.timeout),
            sleep=self.sleep,
        )
        try:
            return json.loads(fetched.body), fetched.headers
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # A site with the REST API off often serves its HTML home page at /wp-json/.
            raise SourceError(
                f"wordpress: {url}: the answer is not JSON ({type(exc).__name__})", hint=FEED_HINT
            ) from exc

    # -- parsing ---------------------------------------------------------------------------

    def parse(self, raw: WordPressFetch, now: datetime) -> CollectResult:
        """Posts and comments → essays and comments. Pure."""
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        essays: list[Essay] = []
        comments: list[Comment] = []
        covered: list[tuple[str, str]] = []
        warnings: list[str] = []
        for index, post in enumerate(raw.posts[: self.config.max_posts]):
            if not isinstance(post, dict) or not _is_id(post.get("id")):
                raise SourceError(f"wordpress: {raw.posts_url}: post {index + 1} has no numeric id")
            if post.get("status", "publish") != "publish":
                continue  # the public API lists published posts only; be sure of it
            if _protected(post):
                # A password-protected post is for the people who know the password: a digest
                # must not announce it to every subscriber (the API hides its body anyway).
                continue
            essay = self._essay(post, now)
            essays.append(essay)
            post_id = int(post["id"])
            rows = raw.comments.get(post_id)
            if rows is not None:
                comments.extend(self._comments(essay, rows, now))
                covered.append((essay.source, essay.key))
            else:
                # Partial pages still show; the essay is just not "covered", so no comment
                # of its is taken for deleted.
                comments.extend(self._comments(essay, raw.partial.get(post_id, []), now))
                warnings.append(f"{essay.url}: {raw.problems.get(post_id, 'comments not read')}")
        return CollectResult(
            source=self.name,
            essays=tuple(essays),
            comments=tuple(comments),
            covered=tuple(covered),
            warnings=tuple(warnings),
        )

    def _essay(self, post: Mapping[str, Any], now: datetime) -> Essay:
        post_id = int(post["id"])
        guid = _rendered(post.get("guid")).strip()
        link = feed.http_url(post.get("link")) or feed.absolute_http_url(
            self.config.url + "/", f"?p={post_id}"
        )
        content = _rendered(post.get("content"))
        excerpt_html = _rendered(post.get("excerpt"))
        return Essay(
            source=self.name,
            key=guid or f"wp:{post_id}",
            url=link,
            title=feed.plain_text(_rendered(post.get("title"))) or feed.UNTITLED,
            html=feed.resolve_links(content, link),
            summary=feed.excerpt(feed.plain_text(excerpt_html or content)),
            author=_embedded_author(post),
            published=_gmt(post.get("date_gmt"), now),
        )

    def _comments(self, essay: Essay, rows: list[Any], now: datetime) -> list[Comment]:
        out: list[Comment] = []
        for row in rows:
            if not isinstance(row, dict) or not _is_id(row.get("id")):
                continue
            # The public API returns approved comments only, and type "comment" by default
            # (pingbacks and trackbacks are not readers' words); check both anyway.
            if row.get("status", "approved") != "approved":
                continue
            if row.get("type", "comment") not in ("comment", ""):
                continue
            parent = row.get("parent")
            out.append(
                Comment(
                    source=self.name,
                    essay_key=essay.key,
                    key=str(row["id"]),
                    author=feed.plain_text(str(row.get("author_name") or "")),
                    html=feed.resolve_links(_rendered(row.get("content")), essay.url),
                    url=feed.http_url(row.get("link")),
                    score=None,
                    published=_gmt(row.get("date_gmt"), now),
                    parent_key=str(parent) if _is_id(parent) and parent != 0 else None,
                    position=len(out),
                )
            )
        return out


# --- helpers ---------------------------------------------------------------------------------


def _url(base: str, params: Mapping[str, str]) -> str:
    # "&" when the REST root already has a query: {url}/?rest_route=/wp/v2 on plain permalinks.
    return f"{base}{'&' if '?' in base else '?'}{urlencode(params)}"


def _status_of(exc: SourceError, url: str) -> int | None:
    """The HTTP status :func:`digest.http.fetch` put in its message (``"<url>: HTTP 404"``)."""
    match = re.fullmatch(re.escape(url) + r": HTTP (\d{3})", str(exc))
    return int(match.group(1)) if match else None


def _int_header(value: str | None) -> int | None:
    if value is None or not value.strip().isascii() or not value.strip().isdigit():
        return None
    return int(value.strip())


def _is_id(value: Any) -> TypeGuard[int]:
    """A JSON integer id (``True`` is an int to Python, but never an id)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rendered(value: Any) -> str:
    """``{"rendered": "..."}`` → the string; tolerate a bare string (some plugins flatten it)."""
    if isinstance(value, Mapping):
        value = value.get("rendered")
    return value if isinstance(value, str) else ""


def _protected(post: Mapping[str, Any]) -> bool:
    content = post.get("content")
    return isinstance(content, Mapping) and content.get("protected") is True


def _embedded_author(post: Mapping[str, Any]) -> str:
    embedded = post.get("_embedded")
    people = embedded.get("author") if isinstance(embedded, Mapping) else None
    if isinstance(people, list) and people and isinstance(people[0], Mapping):
        return feed.plain_text(str(people[0].get("name") or ""))
    return ""


def _gmt(value: Any, now: datetime) -> datetime | None:
    """``date_gmt`` (ISO 8601 without an offset, in UTC) → aware UTC, clamped to ``now``.

    Not ``date``: that is the site's local time, also without an offset.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None  # one bad date must not lose the post
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return now if when > now + feed.FUTURE_GRACE else when
