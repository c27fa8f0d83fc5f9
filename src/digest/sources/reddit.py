"""Reddit: reader comments from the submissions that link an essay.

``GET {base_url}/api/info.json?url=<essay url>`` lists the submissions (``t3`` things) that
link the essay's exact URL. The best ``max_submissions`` of them by score (only those in
``subreddits`` when that is set, and only those with comments) are read with
``GET {base_url}/r/{sub}/comments/{id}.json?sort=top&limit=200&raw_json=1``, whose answer is
``[submission Listing, comment Listing]`` with replies nested under each comment.

What the comment fields mean here:

- ``key``: ``reddit:<fullname>`` (``reddit:t1_abc12``), unique site-wide;
- ``author``: the username; ``""`` for ``[deleted]`` (an account deleted since);
- ``html``: ``body_html``, un-escaped once when it arrives HTML-escaped (see
  :func:`_body_html`); not sanitized here, the renderer does that once;
- ``url``: ``{base_url}{permalink}`` (``https://www.reddit.com/r/…/comments/…/…/abc12/``);
- ``score``: the comment's score. New comments may have it hidden for a while
  (``score_hidden: true``): their score is then ``None`` (unknown, ranked by position), never
  the placeholder Reddit sends, unless ``include_hidden_scores`` says to take it anyway;
- ``upvotes``: ``ups`` (when the score is shown); ``downvotes`` stay unknown, because
  Reddit stopped publishing them (``downs`` is always 0);
- ``position``: 0-based, depth first in the ``top`` order Reddit gives, across submissions
  in the order they were read (best submission first);
- ``parent_key``: the key of the comment it answers, even when that one was deleted;
  ``None`` for a top-level comment (whose parent is the ``t3_`` submission);
- ``published``: ``created_utc`` in UTC.

Skipped: ``[deleted]`` and ``[removed]`` bodies (their replies stay), pinned moderator
notices (stickied and distinguished, usually AutoModerator), and ``kind: "more"`` stubs.
Expanding a stub needs ``/api/morechildren``, which wants OAuth and costs a request per
stub; the top 200 comments by score are what a digest picks from anyway.

Rate limits: Reddit allows about 10 requests a minute without OAuth and says so in its
``X-Ratelimit-Remaining``/``X-Ratelimit-Reset`` headers. When the remaining allowance is
used up, every further request of this run fails at once with a :class:`SourceError` that
says when to retry, instead of being sent and refused.
"""

from __future__ import annotations

import html as html_lib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import requests
from pydantic import Field, field_validator

from digest import __version__, http
from digest.errors import SourceError
from digest.sources.base import CommentSource, CommentSourceConfig, http_base_url
from digest.types import Comment, Essay

# Reddit asks every client for a unique User-Agent of the form
# "<platform>:<app id>:<version> (by /u/<username>)" and throttles generic ones (such as
# python-requests) hard. Operators should set user_agent with their own Reddit username, which
# is how Reddit contacts them instead of blocking them; digest cannot know that name.
DEFAULT_USER_AGENT = (
    f"python:digest-newsletter:{__version__} (+https://github.com/digest-newsletter/digest)"
)
COMMENT_LIMIT = 200  # comments per submission request: what one unauthenticated request returns
FUTURE_GRACE = timedelta(days=1)
REMOVED_BODIES = frozenset({"[deleted]", "[removed]"})
_SUBREDDIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{1,20}$")
_THING_ID = re.compile(r"^[a-z0-9]{1,16}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RedditConfig(CommentSourceConfig):
    """``{type: reddit, base_url, user_agent, subreddits, max_submissions, include_hidden_scores}``.

    Also ``timeout`` (seconds) and ``max_bytes`` (per answer), like every HTTP source.
    """

    base_url: str = "https://www.reddit.com"
    user_agent: str = DEFAULT_USER_AGENT
    subreddits: tuple[str, ...] = ()
    max_submissions: int = Field(default=3, ge=1, le=25)
    include_hidden_scores: bool = False
    timeout: float = Field(default=30.0, gt=0)
    max_bytes: int = Field(default=http.MAX_BYTES, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        return http_base_url(value)

    @field_validator("user_agent")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        value = value.strip()
        if not value or _CONTROL.search(value):
            raise ValueError(
                "must be one non-empty line, e.g. 'python:my-digest:1.0 (by /u/yourname)'"
            )
        return value

    @field_validator("subreddits")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for name in value:
            bare = name.strip().removeprefix("/").removeprefix("r/")
            if not _SUBREDDIT.match(bare):
                raise ValueError(
                    f"{name!r} is not a subreddit name "
                    "(write it as 'programming' or 'r/programming')"
                )
            names.append(bare)
        return tuple(names)


@dataclass(frozen=True)
class RedditThreads:
    """What :meth:`RedditSource.fetch_for` hands to :meth:`RedditSource.parse_for`.

    ``threads`` holds each chosen submission's ``/comments/{id}.json`` answer, best first.
    """

    threads: tuple[Any, ...] = ()


class RedditSource(CommentSource):
    """Comments on an essay from the Reddit submissions that link it."""

    type_name = "reddit"
    config_model = RedditConfig
    config: RedditConfig
    # Set when Reddit says the allowance is used up: no request goes out before then.
    blocked_until: datetime | None = None

    # -- network ---------------------------------------------------------------------------

    def fetch_for(self, essay: Essay, now: datetime) -> RedditThreads:
        """Find the submissions linking the essay and read their comment trees."""
        if not essay.url:
            raise SourceError("the essay has no URL to look Reddit submissions up by")
        base = self.config.base_url
        with self.http_session() as session:
            listing = self._get(session, f"{base}/api/info.json", {"url": essay.url}, now)
            threads = []
            for subreddit, thing_id in _pick_submissions(listing, self.config):
                threads.append(
                    self._get(
                        session,
                        f"{base}/r/{subreddit}/comments/{thing_id}.json",
                        # raw_json=1 opts out of Reddit's legacy escaping of <, > and & in strings.
                        {"sort": "top", "limit": str(COMMENT_LIMIT), "raw_json": "1"},
                        now,
                    )
                )
            return RedditThreads(tuple(threads))

    def _get(
        self, session: requests.Session, url: str, params: dict[str, str], now: datetime
    ) -> Any:
        if self.blocked_until is not None and now < self.blocked_until:
            raise SourceError(_blocked_message(self.blocked_until, now))
        target = f"{url}?{urlencode(params)}"
        cfg = self.config
        connect = min(http.DEFAULT_TIMEOUT[0], cfg.timeout)
        # http.fetch rather than get_json: the rate-limit headers matter as much as the body.
        fetched = http.fetch(
            session,
            target,
            timeout=(connect, cfg.timeout),
            max_bytes=cfg.max_bytes,
            sleep=self.sleep,
            headers={"Accept": "application/json", "User-Agent": cfg.user_agent},
        )
        self._note_rate_limit(fetched.headers, now)
        try:
            return json.loads(fetched.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SourceError(f"{target}: the answer is not JSON ({type(exc).__name__})") from exc

    def _note_rate_limit(self, headers: dict[str, str], now: datetime) -> None:
        remaining = _number(headers.get("x-ratelimit-remaining"))
        if remaining is None or remaining >= 1:
            return
        # X-Ratelimit-Reset is the seconds until Reddit's (ten-minute) window resets; without
        # it, wait a minute. The cap keeps an odd value from blocking for days (or overflowing
        # timedelta).
        reset = _number(headers.get("x-ratelimit-reset"))
        seconds = 60.0 if reset is None else min(max(reset, 0.0), 3600.0)
        self.blocked_until = now + timedelta(seconds=seconds)

    # -- parsing ---------------------------------------------------------------------------

    def parse_for(self, essay: Essay, raw: RedditThreads, now: datetime) -> list[Comment]:
        """Every kept comment of every thread, depth first in Reddit's order. Pure."""
        comments: list[Comment] = []
        seen: set[str] = set()
        for thread in raw.threads:
            if not (isinstance(thread, list) and len(thread) == 2):
                raise SourceError("a Reddit comments page is not [submission, comments]")
            for data in _walk(_children(thread[1])):
                comment = self._comment(essay, data, len(comments), now)
                if comment is not None and comment.key not in seen:
                    seen.add(comment.key)
                    comments.append(comment)
        return comments

    def _comment(
        self, essay: Essay, data: dict[str, Any], position: int, now: datetime
    ) -> Comment | None:
        name = data.get("name")
        body = data.get("body")
        if not isinstance(name, str) or not name.startswith("t1_"):
            return None
        if isinstance(body, str) and body.strip() in REMOVED_BODIES:
            return None
        # Pinned moderator notices (usually AutoModerator's rules reminder) sit first in
        # every thread; they are the subreddit talking, not a reader.
        if data.get("stickied") and data.get("distinguished"):
            return None
        hidden = bool(data.get("score_hidden")) and not self.config.include_hidden_scores
        author = data.get("author")
        parent = data.get("parent_id")
        permalink = data.get("permalink")
        return Comment(
            source=self.name,
            essay_key=essay.key,
            key=f"reddit:{name}",
            author=author.strip()
            if isinstance(author, str) and author.strip() != "[deleted]"
            else "",
            html=_body_html(data.get("body_html")),
            url=f"{self.config.base_url}{permalink}"
            if isinstance(permalink, str) and permalink.startswith("/")
            else "",
            # A hidden score is a placeholder (often 1), not a rating: unknown it is.
            score=None if hidden else _number(data.get("score")),
            upvotes=None if hidden else _int(data.get("ups")),
            position=position,
            parent_key=f"reddit:{parent}"
            if isinstance(parent, str) and parent.startswith("t1_")
            else None,
            published=_from_epoch(data.get("created_utc"), now),
        )


# --- helpers ---------------------------------------------------------------------------------


def _pick_submissions(listing: Any, config: RedditConfig) -> list[tuple[str, str]]:
    """(subreddit, id) of the best submissions to read, best first."""
    wanted = {name.casefold() for name in config.subreddits}
    found: list[tuple[float, str, str]] = []
    seen: set[str] = set()
    for child in _children(listing):
        if child.get("kind") != "t3" or not isinstance(child.get("data"), dict):
            continue
        data = child["data"]
        subreddit, thing_id = data.get("subreddit"), data.get("id")
        # Both go into a URL path: only accept what Reddit's own names look like.
        if not (isinstance(subreddit, str) and _SUBREDDIT.match(subreddit)):
            continue
        if not (isinstance(thing_id, str) and _THING_ID.match(thing_id)) or thing_id in seen:
            continue
        if wanted and subreddit.casefold() not in wanted:
            continue
        # A submission with no comments costs a request and gives nothing.
        if data.get("num_comments") == 0:
            continue
        seen.add(thing_id)
        found.append((_number(data.get("score")) or 0.0, subreddit, thing_id))
    found.sort(key=lambda entry: -entry[0])  # stable: equal scores keep Reddit's order
    return [(subreddit, thing_id) for _, subreddit, thing_id in found[: config.max_submissions]]


def _children(listing: Any) -> list[dict[str, Any]]:
    """A Listing's children; ``[]`` for anything else (a comment without replies has ``""``)."""
    if not isinstance(listing, dict) or listing.get("kind") != "Listing":
        return []
    data = listing.get("data")
    children = data.get("children") if isinstance(data, dict) else None
    return [c for c in children if isinstance(c, dict)] if isinstance(children, list) else []


def _walk(children: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each t1 comment's data, depth first (a parent, then its replies), in Reddit's order.

    Iterative: a long back-and-forth nests deeper than is comfortable for recursion.
    """
    stack = list(reversed(children))
    while stack:
        child = stack.pop()
        data = child.get("data")
        # "more" stubs only list the ids of comments left out of this answer; see the module doc.
        if child.get("kind") != "t1" or not isinstance(data, dict):
            continue
        yield data
        stack.extend(reversed(_children(data.get("replies"))))


_ESCAPED_WRAPPER = re.compile(r"^\s*&lt;")


def _body_html(value: Any) -> str:
    """``body_html`` as HTML.

    Without ``raw_json=1`` Reddit HTML-escapes the HTML once more (``&lt;div class="md"&gt;``);
    with it, the HTML comes as it is. body_html always starts with its ``<div class="md">``
    wrapper, so an escaped wrapper tells which: un-escape exactly once then, never otherwise,
    or a comment *about* ``&lt;script&gt;`` would turn into a real tag.
    """
    if not isinstance(value, str):
        return ""
    return html_lib.unescape(value) if _ESCAPED_WRAPPER.match(value) else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _from_epoch(value: Any, now: datetime) -> datetime | None:
    seconds = _number(value)
    if seconds is None:
        return None
    try:
        when = datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    # A date far ahead is a broken clock; left alone it would sort as the newest forever.
    return now if when > now + FUTURE_GRACE else when


def _blocked_message(until: datetime, now: datetime) -> str:
    seconds = max(0, int((until - now).total_seconds()))
    return (
        f"Reddit's rate limit is used up (X-Ratelimit-Remaining: 0): not sending more requests; "
        f"retry after {until.strftime('%Y-%m-%d %H:%M:%S UTC')} (in {seconds} s, X-Ratelimit-Reset)"
    )
