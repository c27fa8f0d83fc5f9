"""Discourse: reader comments from the forum topic that discusses an essay.

An essay finds its topic in this order; the first that answers wins:

1. ``topic_ids``: a mapping of essay URL → topic id in the config;
2. ``topic_id``: one fixed topic, for single-essay setups;
3. ``GET {base_url}/embed/info?embed_url=<essay url>``: Discourse's own record of which topic
   embeds a page. It only knows essays when the forum's embedding is configured (Admin →
   Customize → Embedding, with the blog as an embeddable host) and the blog embeds the
   comments; otherwise it answers 404 (or 403 where the endpoint wants an API key);
4. ``GET {base_url}/search.json?q=<essay url>``: the first topic in the results one of whose
   posts links the essay (the search matches words, not links, so each candidate is checked).

No topic found is not an error: the essay has no discussion yet, so it has no comments.

Then ``GET /t/{id}.json``. Its ``post_stream.posts`` holds only the first chunk (20 posts), but
``post_stream.stream`` lists every post id; the rest come from
``GET /t/{id}/posts.json?post_ids[]=…`` in chunks of 20, up to ``max_posts`` posts in all.

What the comment fields mean here:

- ``key``: ``discourse:<post id>`` (post ids are unique forum-wide and never reused);
- ``author``: the display name, else the username; ``""`` for a deleted account;
- ``html``: ``cooked`` as the forum gave it (not sanitized here: the renderer does that once);
- ``url``: ``{base_url}/t/{slug}/{topic id}/{post number}``;
- ``score`` and ``upvotes``: the post's likes (``actions_summary`` item ``id: 2``; absent = 0);
  Discourse has no down-votes, so ``downvotes`` stays unknown;
- ``position``: 0-based order in the topic's stream (Discourse shows posts in that order);
- ``parent_key``: the key of the post ``reply_to_post_number`` names; ``None`` for a reply to
  the topic itself (post 1) or to a post the forum no longer lists;
- ``published``: ``created_at`` in UTC.

Skipped: post 1 (the essay itself, or the "companion discussion" post an embed creates),
hidden posts (flagged away), deleted posts (``deleted_at`` set, or deleted by their author),
and every ``post_type`` other than 1 (whispers, moderator actions, small actions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, urlencode

import requests
from pydantic import Field, field_validator, model_validator

from digest import http
from digest.errors import SourceError
from digest.sources.base import CommentSource, CommentSourceConfig, http_base_url, normalize_url, positive_id
from digest.types import Comment, Essay

CHUNK = 20  # posts per /t/{id}/posts.json request: Discourse's own chunk size
LIKE = 2  # the actions_summary id of a like; 3, 4, 6, 7 and 8 are flags
REGULAR = 1  # post_type of a reader's post; 2 moderator action, 3 small action, 4 whisper
SEARCH_CANDIDATES = 3  # topics from a search checked for a link to the essay, at most
FUTURE_GRACE = timedelta(days=1)


class DiscourseConfig(CommentSourceConfig):
    """``{type: discourse, base_url, topic_id, topic_ids, api_key, api_username, max_posts, ...}``.

    ``base_url`` is the forum (``https://forum.example.org``). ``api_key`` and
    ``api_username`` are sent as Discourse's ``Api-Key``/``Api-Username`` headers; public
    forums need neither. ``max_posts`` bounds the posts read per topic (20 per request);
    ``timeout`` (seconds) and ``max_bytes`` (per answer) bound each request.
    """

    base_url: str
    topic_id: int | None = Field(default=None, gt=0)
    topic_ids: dict[str, int] = Field(default_factory=dict)
    api_key: str | None = None
    api_username: str | None = None
    max_posts: int = Field(default=400, ge=1)
    timeout: float = Field(default=30.0, gt=0)
    max_bytes: int = Field(default=http.MAX_BYTES, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        return http_base_url(value)

    @field_validator("topic_ids")
    @classmethod
    def _positive_ids(cls, value: dict[str, int]) -> dict[str, int]:
        for url, topic in value.items():
            if topic <= 0:
                raise ValueError(f"topic id for {url!r} must be a positive integer, not {topic}")
        return value

    @model_validator(mode="after")
    def _key_with_user(self) -> DiscourseConfig:
        # A global API key acts as the user named in Api-Username; a username alone means nothing.
        if self.api_username and not self.api_key:
            raise ValueError("api_username needs api_key")
        return self


@dataclass(frozen=True)
class DiscourseThread:
    """What :meth:`DiscourseSource.fetch_for` hands to :meth:`DiscourseSource.parse_for`.

    ``topic`` is the ``/t/{id}.json`` answer; ``pages`` the ``/t/{id}/posts.json`` answers
    for the posts beyond its first chunk.
    """

    topic: dict[str, Any]
    pages: tuple[dict[str, Any], ...] = ()


class DiscourseSource(CommentSource):
    """Comments on an essay from the Discourse topic that discusses it."""

    type_name = "discourse"
    config_model = DiscourseConfig
    config: DiscourseConfig


    # -- network ---------------------------------------------------------------------------

    def fetch_for(self, essay: Essay, now: datetime) -> DiscourseThread | None:
        """Find the essay's topic and read all its posts; ``None`` when no topic discusses it."""
        with self.http_session() as session:
            topic_id, topic = self._find_topic(session, essay)
            if topic_id is None:
                return None
            if topic is None:
                topic = self._topic(session, topic_id)
            return DiscourseThread(
                topic=topic, pages=tuple(self._more_posts(session, topic_id, topic))
            )

    def _find_topic(
        self, session: requests.Session, essay: Essay
    ) -> tuple[int | None, dict[str, Any] | None]:
        """(topic id, its JSON when reading it was part of the lookup) or (None, None)."""
        cfg = self.config
        wanted = normalize_url(essay.url)
        for url, topic_id in cfg.topic_ids.items():
            if url == essay.url or normalize_url(url) == wanted:
                return topic_id, None
        if cfg.topic_id is not None:
            return cfg.topic_id, None
        if not essay.url:
            raise SourceError("the essay has no URL to look its Discourse topic up by")
        try:
            info = self._get(
                f"{cfg.base_url}/embed/info?{urlencode({'embed_url': essay.url})}", session
            )
        except SourceError as exc:
            # 404: no topic embeds this URL, or embedding is not configured at all; 403: the
            # endpoint wants an API key on this forum. Either way search can still find it.
            if _http_status(exc) not in (403, 404):
                raise
        else:
            found = positive_id(info.get("topic_id")) if isinstance(info, dict) else None
            if found is not None:
                return found, None
        return self._search(session, essay.url)

    def _search(
        self, session: requests.Session, essay_url: str
    ) -> tuple[int | None, dict[str, Any] | None]:
        cfg = self.config
        results = self._get(f"{cfg.base_url}/search.json?{urlencode({'q': essay_url})}", session)
        wanted = normalize_url(essay_url)
        for topic_id in _candidate_topics(results)[:SEARCH_CANDIDATES]:
            topic = self._topic(session, topic_id)
            # Search matches the URL's words anywhere, so a topic that merely mentions the
            # blog's name can rank first: keep only one whose posts really link the essay.
            if wanted in {normalize_url(link) for link in _topic_links(topic)}:
                return topic_id, topic
        return None, None

    def _topic(self, session: requests.Session, topic_id: int) -> dict[str, Any]:
        topic = self._get(f"{self.config.base_url}/t/{topic_id}.json", session)
        if not isinstance(topic, dict) or not isinstance(topic.get("post_stream"), dict):
            raise SourceError(f"{self.config.base_url}/t/{topic_id}.json: not a Discourse topic")
        return topic

    def _more_posts(
        self, session: requests.Session, topic_id: int, topic: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        stream_ids = _stream(topic)[: self.config.max_posts]
        have = {positive_id(p.get("id")) for p in _posts(topic)}
        missing = [i for i in stream_ids if i not in have]
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start : start + CHUNK]
            # Rails reads repeated "post_ids[]" keys as one array; a plain "post_ids" is ignored.
            query = urlencode([("post_ids[]", str(i)) for i in chunk])
            page = self._get(f"{self.config.base_url}/t/{topic_id}/posts.json?{query}", session)
            if not isinstance(page, dict):
                raise SourceError(
                    f"{self.config.base_url}/t/{topic_id}/posts.json: not a post list"
                )
            yield page

    def _get(self, url: str, session: requests.Session) -> Any:
        """One bounded GET through :func:`digest.http.get_json` (429 waits honour Retry-After)."""
        cfg = self.config
        headers: dict[str, str] = {}
        # Only ever sent to base_url; note that a redirect elsewhere would carry them too,
        # because requests strips only Authorization, not custom headers, across hosts.
        if cfg.api_key:
            headers["Api-Key"] = cfg.api_key
        if cfg.api_username:
            headers["Api-Username"] = cfg.api_username
        connect = min(http.DEFAULT_TIMEOUT[0], cfg.timeout)
        return http.get_json(
            session,
            url,
            headers=headers,
            timeout=(connect, cfg.timeout),
            max_bytes=cfg.max_bytes,
            sleep=self.sleep,
        )

    # -- parsing ---------------------------------------------------------------------------

    def parse_for(self, essay: Essay, raw: DiscourseThread | None, now: datetime) -> list[Comment]:
        """The topic's reader posts as comments, in the topic's order. Pure."""
        if raw is None:
            return []
        topic = raw.topic
        topic_id = positive_id(topic.get("id"))
        if topic_id is None:
            raise SourceError(f"{self.config.base_url}: topic JSON without an id")
        slug = quote(str(topic.get("slug") or "topic"), safe="-")
        posts: dict[int, dict[str, Any]] = {}
        for post in _chain_posts(topic, raw.pages):
            post_id = positive_id(post.get("id"))
            # A page answering with another topic's posts is a bug or a hostile server.
            if post_id is None or positive_id(post.get("topic_id")) not in (None, topic_id):
                continue
            posts.setdefault(post_id, post)
        order = {post_id: i for i, post_id in enumerate(_stream(topic))}
        ordered = sorted(
            posts.items(),
            key=lambda kv: (
                order.get(kv[0], len(order)),
                positive_id(kv[1].get("post_number")) or 0,
            ),
        )
        ids_by_number = {
            n: post_id
            for post_id, p in posts.items()
            if (n := positive_id(p.get("post_number"))) is not None
        }
        comments: list[Comment] = []
        for post_id, post in ordered:
            number = positive_id(post.get("post_number"))
            if number is None or number == 1 or _skipped(post):
                continue
            parent = positive_id(post.get("reply_to_post_number"))
            parent_id = ids_by_number.get(parent) if parent not in (None, 1) else None
            likes = _likes(post)
            comments.append(
                Comment(
                    source=self.name,
                    essay_key=essay.key,
                    key=f"discourse:{post_id}",
                    author=_author(post),
                    html=_str(post.get("cooked")),
                    url=f"{self.config.base_url}/t/{slug}/{topic_id}/{number}",
                    score=likes,
                    upvotes=likes,
                    position=len(comments),
                    parent_key=f"discourse:{parent_id}" if parent_id is not None else None,
                    published=_when(post.get("created_at"), now),
                )
            )
        return comments


# --- helpers ---------------------------------------------------------------------------------






_HTTP_STATUS = re.compile(r": HTTP (\d{3})$")


def _http_status(exc: SourceError) -> int | None:
    """The HTTP status a :func:`digest.http.fetch` error was about, if it was one."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    # digest.http reports a refused request as "<url>: HTTP <status>" and keeps no status
    # attribute, so the message is all there is to read.
    match = _HTTP_STATUS.search(str(exc))
    return int(match.group(1)) if match else None




def _posts(doc: Any) -> list[dict[str, Any]]:
    stream = doc.get("post_stream") if isinstance(doc, dict) else None
    posts = stream.get("posts") if isinstance(stream, dict) else None
    return [p for p in posts if isinstance(p, dict)] if isinstance(posts, list) else []


def _stream(topic: dict[str, Any]) -> list[int]:
    stream = topic.get("post_stream")
    ids = stream.get("stream") if isinstance(stream, dict) else None
    if not isinstance(ids, list):
        return []
    out: list[int] = []
    seen: set[int] = set()
    for value in ids:
        post_id = positive_id(value)
        if post_id is not None and post_id not in seen:
            seen.add(post_id)
            out.append(post_id)
    return out


def _chain_posts(
    topic: dict[str, Any], pages: Iterable[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    yield from _posts(topic)
    for page in pages:
        yield from _posts(page)


def _candidate_topics(results: Any) -> list[int]:
    """Topic ids from a search answer, best first, each once."""
    if not isinstance(results, dict):
        return []
    ids: list[int] = []
    for key, field in (("topics", "id"), ("posts", "topic_id")):
        entries = results.get(key)
        for entry in entries if isinstance(entries, list) else []:
            topic_id = positive_id(entry.get(field)) if isinstance(entry, dict) else None
            if topic_id is not None and topic_id not in ids:
                ids.append(topic_id)
    return ids


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href" and v)


def _topic_links(topic: dict[str, Any]) -> list[str]:
    """Every link in the topic's first chunk of posts, and the topic's own link list."""
    parser = _Hrefs()
    for post in _posts(topic):
        cooked = post.get("cooked")
        if isinstance(cooked, str):
            parser.feed(cooked)
    parser.close()
    links = list(parser.links)
    details = topic.get("details")
    listed = details.get("links") if isinstance(details, dict) else None
    for link in listed if isinstance(listed, list) else []:
        if isinstance(link, dict) and isinstance(link.get("url"), str):
            links.append(link["url"])
    return links


def _skipped(post: dict[str, Any]) -> bool:
    if post.get("hidden") or post.get("deleted_at") or post.get("user_deleted"):
        return True
    # post_type is 1 for an ordinary post; whispers (4) are staff-only and moderator actions
    # (2) and small actions (3: "closed", "pinned" ...) are the forum talking, not a reader.
    return bool(post.get("post_type", REGULAR) != REGULAR)


def _likes(post: dict[str, Any]) -> int:
    # Likes live in actions_summary as {"id": 2, "count": N}; Discourse leaves the item out
    # when a post has no likes, which means zero (per the /posts/{id}.json documentation).
    summary = post.get("actions_summary")
    for action in summary if isinstance(summary, list) else []:
        if isinstance(action, dict) and action.get("id") == LIKE:
            count = action.get("count")
            return (
                count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0
            )
    return 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _author(post: dict[str, Any]) -> str:
    # "name" is the display name and is often empty; a deleted account leaves both null.
    for field in ("name", "username"):
        value = post.get(field)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return ""


def _when(value: Any, now: datetime) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None  # one odd date must not lose the comment
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    # A date far ahead is a broken clock; left alone it would sort as the newest forever.
    return now if when > now + FUTURE_GRACE else when
