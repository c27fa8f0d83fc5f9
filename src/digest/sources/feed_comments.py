"""Comments from each essay's own comment feed (RSS ``wfw:commentRss``, Atom ``rel="replies"``).

The ``feed`` source records an item's comment feed as ``Essay.comments_url``; this comment
source fetches that feed for each recent essay that has one and reads its entries as comments.
A ``feed`` source gets one implicitly, named ``<name>:comments`` (``comment_feeds: false``
turns it off; an explicit ``{type: feed_comments, ...}`` entry under ``comments:`` replaces it).

What the comment fields mean here:

- ``key``: the entry's id/guid; else its link; else a hash of the essay, author, date and body.
- ``author``: the entry's author (WordPress writes ``dc:creator``).
- ``html``: the entry's content (``content:encoded``), else its summary/description. Not
  sanitized here: the renderer sanitizes every piece of HTML once (DESIGN rule 4).
- ``score``: always ``None``. Neither comment feeds nor their extensions carry a rating.
- ``position``: the index in date order, oldest first. Comment feeds usually list the newest
  first; the oldest comments of a discussion are the ones later comments answer, so that is
  the order a reader meets them on the page. Undated entries keep their feed order, last.
- ``parent_key``: RFC 4685 ``thr:in-reply-to`` when an Atom comment feed has it and it names
  another comment (not the essay itself). WordPress comment feeds carry no threading: ``None``.

Each essay costs one bounded GET per run. Conditional GET would need a cursor per essay,
which the store keeps per source, so ``lookback_days`` and ``max_essays`` bound the cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from digest import http
from digest.sources import feed
from digest.sources.base import CommentSource, CommentSourceConfig
from digest.types import CollectResult, Comment, Essay

ACCEPT = (
    "application/atom+xml, application/rss+xml, application/rdf+xml;q=0.9, "
    "application/xml;q=0.8, text/xml;q=0.8, */*;q=0.1"
)
MAX_BYTES = 2 * 1024 * 1024  # one post's comment feed; a bigger one is not a comment feed

# ``Store.record_collect`` reads an empty ``covered`` as "every essay with comments in this
# result is complete" (right for sources that list essays and comments together) and marks
# the essay's other comments deleted. A comment feed is only a window of the newest comments
# (WordPress serves posts_per_rss, 10 by default), so a comment that slid out of it was not
# deleted. Naming one essay that cannot exist says "no essay here is complete".
NO_COVERAGE: tuple[tuple[str, str], ...] = (("", ""),)


class FeedCommentsConfig(CommentSourceConfig):
    """``{type: feed_comments, name, lookback_days, max_essays, timeout, max_bytes}``."""

    timeout: float = Field(default=30.0, gt=0)
    max_bytes: int = Field(default=MAX_BYTES, gt=0)


class FeedCommentsSource(CommentSource):
    """Comments read from the comment feed each essay names (``Essay.comments_url``)."""

    type_name = "feed_comments"
    config_model = FeedCommentsConfig
    config: FeedCommentsConfig


    def collect_for(self, essays: Sequence[Essay], now: datetime) -> CollectResult:
        """Comments for the essays that have a comment feed; the others are skipped quietly.

        The result never claims an essay's comment list complete (see ``NO_COVERAGE``).
        """
        with_feeds = [essay for essay in essays if essay.comments_url]
        if not with_feeds:
            return CollectResult(source=self.name)
        own_session = self.session is None
        if own_session:
            self.session = http.build_session()
        try:
            result = super().collect_for(with_feeds, now)
        finally:
            if own_session and self.session is not None:
                self.session.close()
                self.session = None
        if result.error:
            return result
        return replace(result, covered=NO_COVERAGE)

    def fetch_for(self, essay: Essay, now: datetime) -> http.Fetched:
        """One bounded GET of the essay's comment feed; :class:`SourceError` on failure."""
        connect = min(http.DEFAULT_TIMEOUT[0], self.config.timeout)
        with self.http_session() as session:
            return http.fetch(
                session,
                essay.comments_url,
                headers={"Accept": ACCEPT},
                timeout=(connect, self.config.timeout),
                max_bytes=self.config.max_bytes,
                sleep=self.sleep,
            )

    def parse_for(self, essay: Essay, raw: http.Fetched, now: datetime) -> list[Comment]:
        """A comment feed's entries → comments, oldest first. Pure."""
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        where = essay.comments_url
        if raw.url != where:
            where = f"{where} (redirected to {raw.url})"
        entries = feed.feed_entries(raw, where)
        found: list[tuple[int, Comment, Any]] = []
        for index, entry in enumerate(entries):
            html = feed.entry_html(entry)
            author = feed.entry_author(entry)
            published = feed.entry_date(entry, now)
            link = feed.http_url(entry.get("link"))
            key = _comment_key(entry.get("id"), link, essay.key, author, published, html)
            found.append(
                (
                    index,
                    Comment(
                        source=self.name,
                        essay_key=essay.key,
                        key=key,
                        author=author,
                        html=html,
                        url=link,
                        score=None,
                        published=published,
                    ),
                    entry,
                )
            )
        # Oldest first; undated entries after the dated ones, in the order the feed gave them.
        found.sort(key=lambda t: (t[1].published is None, t[1].published or now, t[0]))
        keys = {comment.key for _, comment, _ in found}
        out: list[Comment] = []
        seen: set[str] = set()
        for _, comment, entry in found:
            if comment.key in seen:  # a feed that repeats an entry: keep the first copy
                continue
            seen.add(comment.key)
            parent = _parent_key(entry, essay, keys)
            out.append(replace(comment, position=len(out), parent_key=parent))
        return out


def _comment_key(
    entry_id: Any, link: str, essay_key: str, author: str, published: datetime | None, html: str
) -> str:
    """guid/id, else the link, else a hash of what makes the comment this comment.

    WordPress comment guids look like ``https://blog.example.org/?p=12#comment-34``: unique
    across the site, so across every essay of one feed source.
    """
    if entry_id is not None and str(entry_id).strip():
        return str(entry_id).strip()
    if link:
        return link
    basis = "\x00".join([essay_key, author, published.isoformat() if published else "", html])
    return "sha256:" + hashlib.sha256(basis.encode("utf-8")).hexdigest()[:32]


def _parent_key(entry: Mapping[str, Any], essay: Essay, keys: set[str]) -> str | None:
    """The comment this entry answers, from RFC 4685 ``thr:in-reply-to``; ``None`` for the essay.

    feedparser does not know the threading namespace, so the attribute dict arrives under
    the document's own prefix (``thr_in-reply-to``, ``t_in-reply-to`` ...). A top-level
    comment replies to the essay entry itself, whose id is the essay's key (or its URL). A
    ref to something else that is not in this feed is still a comment: the feed is only a
    window of the newest comments, and its parent may have slid out of it.
    """
    for name, value in entry.items():
        if not str(name).endswith("in-reply-to") or not isinstance(value, Mapping):
            continue
        ref = str(value.get("ref") or "").strip()
        if not ref:
            continue
        if ref in keys:
            return ref
        if ref in (essay.key, essay.url):
            return None
        return ref
    return None
