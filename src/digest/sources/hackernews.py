"""Hacker News: reader comments from the stories that link an essay, through Algolia's HN API.

``GET {base_url}/search?query=<essay url>&restrictSearchableAttributes=url&tags=story`` finds
stories by their URL. The search matches words, so only hits whose ``url`` is the essay's
URL are kept, compared without scheme, ``www.``, fragment or trailing slash. The best
``max_stories`` of those with at least ``min_points`` points (and any comments at all) are read
with ``GET {base_url}/items/{id}``, which returns the story with its whole comment tree nested
under ``children``.

**Hacker News exposes no comment scores**: neither the official API nor Algolia's has them
(HN's developers said they are private on purpose), and Algolia's ``points`` is ``null`` for
comments. So ``score`` is ``None`` and the ranking falls back to HN's own order: ``position``
is the comment's index depth first (a comment, then its replies) in the order the tree is
given, the way HN displays a thread, numbered on across stories best story first.

What the other comment fields mean here:

- ``key``: ``hn:<item id>``;
- ``author``: the HN username;
- ``html``: ``text`` as HN gave it (HTML; not sanitized here, the renderer does that once);
- ``url``: ``https://news.ycombinator.com/item?id=<id>`` (the API's host is not HN's);
- ``parent_key``: ``hn:<parent_id>``; ``None`` when the parent is the story;
- ``published``: ``created_at_i`` (else ``created_at``) in UTC.

Skipped: deleted and dead comments (``text`` or ``author`` null); their replies stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from pydantic import Field, field_validator

from digest import http
from digest.errors import SourceError
from digest.sources.base import CommentSource, CommentSourceConfig, http_base_url, normalize_url, positive_id
from digest.types import Comment, Essay

ITEM_URL = "https://news.ycombinator.com/item?id={id}"
FUTURE_GRACE = timedelta(days=1)


class HackerNewsConfig(CommentSourceConfig):
    """``{type: hackernews, base_url, max_stories, min_points}``.

    ``base_url`` is Algolia's HN API (or a local server in tests). Also ``timeout`` (seconds)
    and ``max_bytes`` (per answer), like every HTTP source.
    """

    base_url: str = "https://hn.algolia.com/api/v1"
    max_stories: int = Field(default=3, ge=1, le=20)
    min_points: int = Field(default=0, ge=0)
    timeout: float = Field(default=30.0, gt=0)
    max_bytes: int = Field(default=http.MAX_BYTES, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        return http_base_url(value)


@dataclass(frozen=True)
class HackerNewsStories:
    """What :meth:`HackerNewsSource.fetch_for` hands to :meth:`HackerNewsSource.parse_for`.

    ``stories`` holds each chosen story's ``/items/{id}`` answer, best first.
    """

    stories: tuple[Any, ...] = ()


class HackerNewsSource(CommentSource):
    """Comments on an essay from the Hacker News stories that link it (unscored, HN's order)."""

    type_name = "hackernews"
    config_model = HackerNewsConfig
    config: HackerNewsConfig


    # -- network ---------------------------------------------------------------------------

    def fetch_for(self, essay: Essay, now: datetime) -> HackerNewsStories:
        """Search stories by the essay's URL and read the comment tree of the best ones."""
        if not essay.url:
            raise SourceError("the essay has no URL to look Hacker News stories up by")
        base = self.config.base_url
        with self.http_session() as session:
            found = self._get(
                session,
                f"{base}/search",
                {
                    "query": essay.url,
                    # Without this Algolia also matches the URL's words in titles and texts.
                    "restrictSearchableAttributes": "url",
                    "tags": "story",
                },
            )
            stories = [
                self._get(session, f"{base}/items/{story_id}", None)
                for story_id in _pick_stories(found, essay.url, self.config)
            ]
            return HackerNewsStories(tuple(stories))

    def _get(self, session: requests.Session, url: str, params: dict[str, str] | None) -> Any:
        cfg = self.config
        connect = min(http.DEFAULT_TIMEOUT[0], cfg.timeout)
        return http.get_json(
            session,
            url,
            params=params,
            timeout=(connect, cfg.timeout),
            max_bytes=cfg.max_bytes,
            sleep=self.sleep,
        )

    # -- parsing ---------------------------------------------------------------------------

    def parse_for(self, essay: Essay, raw: HackerNewsStories, now: datetime) -> list[Comment]:
        """Every live comment of every story, depth first in HN's order. Pure."""
        comments: list[Comment] = []
        seen: set[str] = set()
        for story in raw.stories:
            if not isinstance(story, dict) or positive_id(story.get("id")) is None:
                raise SourceError("a Hacker News item answer is not an item with an id")
            story_id = positive_id(story.get("id"))
            for item in _walk(story):
                item_id = positive_id(item.get("id"))
                text, author = item.get("text"), item.get("author")
                # Deleted and dead comments come back with text and author null.
                if item_id is None or not isinstance(text, str) or not text.strip():
                    continue
                if not isinstance(author, str) or not author.strip():
                    continue
                if item.get("type", "comment") != "comment" or f"hn:{item_id}" in seen:
                    continue
                seen.add(f"hn:{item_id}")
                parent = positive_id(item.get("parent_id"))
                comments.append(
                    Comment(
                        source=self.name,
                        essay_key=essay.key,
                        key=f"hn:{item_id}",
                        author=author.strip(),
                        html=text,
                        url=ITEM_URL.format(id=item_id),
                        score=None,  # HN keeps comment scores private: see the module docstring
                        position=len(comments),
                        parent_key=f"hn:{parent}"
                        if parent is not None and parent != story_id
                        else None,
                        published=_when(item, now),
                    )
                )
        return comments


# --- helpers ---------------------------------------------------------------------------------




def _pick_stories(found: Any, essay_url: str, config: HackerNewsConfig) -> list[int]:
    """Ids of the stories to read: the essay's own URL, enough points, best first."""
    hits = found.get("hits") if isinstance(found, dict) else None
    if not isinstance(hits, list):
        raise SourceError("the Hacker News search answer has no hits list")
    wanted = normalize_url(essay_url)
    picked: list[tuple[int, int]] = []
    for hit in hits:
        if not isinstance(hit, dict):
            continue
        story_id = positive_id(hit.get("objectID"))
        url = hit.get("url")
        raw_points = hit.get("points")
        points = (
            raw_points if isinstance(raw_points, int) and not isinstance(raw_points, bool) else 0
        )
        if story_id is None or not isinstance(url, str) or normalize_url(url) != wanted:
            continue
        if points < config.min_points or hit.get("num_comments") == 0:
            continue  # too little attention, or nothing to read for a request
        if story_id not in {s for _, s in picked}:
            picked.append((points, story_id))
    picked.sort(key=lambda entry: -entry[0])  # stable: equal points keep Algolia's order
    return [story_id for _, story_id in picked[: config.max_stories]]


def _walk(story: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The story's comments, depth first (a comment, then its replies), in the given order.

    Iterative: HN threads nest far deeper than is comfortable for recursion.
    """
    stack = list(reversed(_kids(story)))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(reversed(_kids(item)))


def _kids(item: dict[str, Any]) -> list[dict[str, Any]]:
    children = item.get("children")
    return [c for c in children if isinstance(c, dict)] if isinstance(children, list) else []




def _when(item: dict[str, Any], now: datetime) -> datetime | None:
    when: datetime | None = None
    seconds = item.get("created_at_i")
    if isinstance(seconds, int) and not isinstance(seconds, bool):
        try:
            when = datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError):
            when = None
    if when is None and isinstance(item.get("created_at"), str):
        try:
            parsed = datetime.fromisoformat(item["created_at"])
        except ValueError:
            parsed = None
        if parsed is not None:
            when = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if when is None:
        return None
    # A date far ahead is a broken clock; left alone it would sort as the newest forever.
    return now if when > now + FUTURE_GRACE else when
