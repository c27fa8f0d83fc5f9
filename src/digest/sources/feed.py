"""A syndication feed: RSS 0.9x, RSS 1.0 (RDF), RSS 2.0, Atom, or JSON Feed 1.0/1.1.

``fetch()`` is one bounded conditional GET through :func:`digest.http.fetch`; ``parse()`` is
pure and turns the bytes into :class:`~digest.types.Essay` values. XML feeds go through
feedparser; JSON Feed is read here because feedparser does not read it.

What the essay fields mean here:

- ``key``: the item's guid/id; else its absolute link; else a hash of its title and date.
- ``url``: the item's absolute http(s) link; else the feed's home page (never another scheme).
- ``title``: plain text, tags stripped, entities decoded, whitespace collapsed; ``(untitled)``
  when empty.
- ``html``: the item's content as the feed gave it, with relative links made absolute.
  It is **not** sanitized here: the renderer sanitizes every piece of HTML once (DESIGN rule 4).
- ``summary``: a plain-text excerpt of the summary/description (or of the content).
- ``published``: aware UTC; dates more than a day past ``now`` are clamped to ``now``.
- ``comments_url``: the item's own comment feed, absolute (empty when ``slash:comments`` says
  there are none): RSS ``wfw:commentRss`` (also spelled
  ``commentRSS``), else an Atom ``link rel="replies"`` to a feed (RFC 4685). The
  ``feed_comments`` source reads it; ``comment_feeds: false`` turns that off.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

from pydantic import Field, field_validator

from digest import http
from digest.errors import SourceError
from digest.sources.base import Source, SourceConfig
from digest.types import CollectResult, Essay, SourceCursor

MAX_ENTRIES = 500  # per fetch: bounds parse work and store writes for a runaway feed
SUMMARY_CHARS = 300
UNTITLED = "(untitled)"
FUTURE_GRACE = timedelta(days=1)
JSON_FEED_TYPES = frozenset({"application/feed+json", "application/json"})
ACCEPT = (
    "application/feed+json, application/atom+xml, application/rss+xml, application/rdf+xml;q=0.9, "
    "application/xml;q=0.8, text/xml;q=0.8, application/json;q=0.7, */*;q=0.1"
)


class FeedConfig(SourceConfig):
    """``{name, type: feed, url, timeout, max_bytes, comment_feeds}``.

    ``comment_feeds`` (default true) attaches an implicit ``feed_comments`` source named
    ``<name>:comments`` that reads each item's comment feed (see
    :func:`digest.sources.registry.comment_blocks`).
    """

    url: str
    timeout: float = Field(default=30.0, gt=0)
    max_bytes: int = Field(default=http.MAX_BYTES, gt=0)
    comment_feeds: bool = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
        return value


@dataclass(frozen=True)
class FeedFetch:
    """What :meth:`FeedSource.fetch` hands to :meth:`FeedSource.parse`.

    ``sent`` is the cursor the request carried: a 304 has no body and may omit the
    validators, so ``parse`` needs the old ones to keep them.
    """

    fetched: http.Fetched
    sent: SourceCursor


class FeedSource(Source):
    """Essays from one RSS, Atom or JSON Feed URL."""

    type_name = "feed"
    config_model = FeedConfig
    config: FeedConfig


    def fetch(self, cursor: SourceCursor, now: datetime) -> FeedFetch:
        """One conditional GET with the cursor's validators; :class:`SourceError` on failure."""
        connect = min(http.DEFAULT_TIMEOUT[0], self.config.timeout)
        with self.http_session() as session:
            fetched = http.fetch(
                session,
                self.config.url,
                etag=cursor.etag,
                last_modified=cursor.last_modified,
                headers={"Accept": ACCEPT},
                timeout=(connect, self.config.timeout),
                max_bytes=self.config.max_bytes,
                sleep=self.sleep,
            )
        return FeedFetch(fetched=fetched, sent=cursor)

    def parse(self, raw: FeedFetch, now: datetime) -> CollectResult:
        """Bytes → essays. Pure. Raises :class:`SourceError` when the body is not a feed."""
        fetched = raw.fetched
        if fetched.not_modified:
            # A 304 should repeat the validators but need not; keep the ones we sent.
            cursor = SourceCursor(
                etag=fetched.etag or raw.sent.etag,
                last_modified=fetched.last_modified or raw.sent.last_modified,
            )
            return CollectResult(
                source=self.name, cursor=cursor, not_modified=True, bytes_read=fetched.wire_bytes
            )
        # A 200 replaces the validators: one the server stopped sending must not linger.
        cursor = SourceCursor(etag=fetched.etag, last_modified=fetched.last_modified)
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        # Errors name the configured URL, which is what the operator can find in config.yaml.
        where = self.config.url
        if fetched.url != where:
            where = f"{where} (redirected to {fetched.url})"
        if _is_json(fetched):
            essays = _parse_json_feed(self.name, fetched, now, where)
        else:
            essays = _parse_xml_feed(self.name, fetched, now, where)
        return CollectResult(
            source=self.name,
            essays=tuple(_unique(essays)),
            cursor=cursor,
            bytes_read=fetched.wire_bytes or len(fetched.body),
        )


# --- detection -------------------------------------------------------------------------------


def _media_type(fetched: http.Fetched) -> str:
    return fetched.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(fetched: http.Fetched) -> bool:
    # Many servers label JSON Feed application/json or even text/plain, so the first
    # non-blank byte decides too. No XML document starts with "{".
    if _media_type(fetched) in JSON_FEED_TYPES:
        return True
    return fetched.body.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")


# --- XML feeds (feedparser) ------------------------------------------------------------------
#
# feedparser is imported by the functions that parse, not with this module: loading a config
# imports every configured source's module for its settings model, and a process that only
# validates the config or sends a digest has no use for the parser.


def _xml_entries(fetched: http.Fetched, where: str) -> tuple[Any, list[Any]]:
    """feedparser's result and its entries; :class:`SourceError` when the body is not a feed."""
    import feedparser
    from feedparser.exceptions import ThingsNobodyCaresAboutButMe

    headers = {"content-location": fetched.url}
    if "content-type" in fetched.headers:
        # feedparser weighs the HTTP charset against the XML declaration (RFC 3023).
        headers["content-type"] = fetched.headers["content-type"]
    # A BytesIO, never the bytes themselves: given bytes, feedparser first tries them as a
    # *file name* and would read a local file whose path a hostile server sent as the body.
    # sanitize_html=False: the renderer sanitizes once with our own allowlist; feedparser's
    # sanitizer is not our defence. Relative-URI resolution stays on: only feedparser knows
    # each element's xml:base, and links in an email must be absolute.
    parsed = feedparser.parse(
        io.BytesIO(fetched.body),
        response_headers=headers,
        sanitize_html=False,
        resolve_relative_uris=True,
    )
    entries: list[Any] = list(parsed.get("entries") or [])
    if not entries:
        # feedparser never raises: it flags bad input with "bozo". With no entries there is
        # nothing to keep, so say why it is not a feed. A recognized feed that is merely empty
        # is fine, even when flagged only for a wrong Content-Type or charset label (feedparser's
        # ThingsNobodyCaresAboutButMe): that flag says nothing about the XML itself.
        version = parsed.get("version")
        problem = parsed.get("bozo_exception") if parsed.get("bozo") else None
        if problem is not None and (
            not version or not isinstance(problem, ThingsNobodyCaresAboutButMe)
        ):
            raise SourceError(f"{where}: not a feed: {problem}")
        if not version:
            what = "empty body" if not fetched.body.strip() else "no RSS, Atom or JSON Feed found"
            raise SourceError(f"{where}: not a feed: {what}")
    return parsed, entries


def _parse_xml_feed(source: str, fetched: http.Fetched, now: datetime, where: str) -> list[Essay]:
    parsed, entries = _xml_entries(fetched, where)
    # bozo *with* entries (a stray "&", a wrong charset label): keep what parsed.
    feed = parsed.get("feed") or {}
    home = _http_url(feed.get("link")) or fetched.url
    feed_author = _names(feed.get("authors")) or _plain(
        _person(feed.get("author_detail"), feed.get("author"))
    )
    # Atom declares each title's type; RSS does not, and feedparser only guesses (it calls
    # "<script>…</script>Hi" plain text because script is not an element it knows), so
    # RSS titles always go through the tag stripper.
    typed_titles = str(parsed.get("version") or "").startswith("atom")
    essays: list[Essay] = []
    for entry in entries[:MAX_ENTRIES]:
        link = _http_url(entry.get("link"))
        title_detail = entry.get("title_detail") or {}
        raw_title = str(entry.get("title") or "")
        if typed_titles and title_detail.get("type") == "text/plain":
            title = _squash(raw_title)
        else:
            title = _plain(raw_title)
        content_html = _entry_html(entry)
        summary_html = _detail_html(entry.get("summary_detail"), entry.get("summary"))
        published = _from_struct(entry.get("published_parsed") or entry.get("updated_parsed"), now)
        essays.append(
            Essay(
                source=source,
                key=_key(entry.get("id"), link, title, published, content_html),
                url=link or home,
                title=title or UNTITLED,
                html=content_html or summary_html,
                summary=_excerpt(_plain(summary_html or content_html)),
                # entry.author is only the *last* <author>; authors has them all.
                author=_names(entry.get("authors"))
                or _plain(entry.get("author") or "")
                or feed_author,
                published=published,
                comments_url=_comments_url(entry, fetched.url),
            )
        )
    return essays


# Media types of a feed that an Atom "replies" link may point to; a "replies" link to an
# HTML page is a place to read comments, not something we can parse.
_FEED_TYPES = frozenset(
    {
        "application/atom+xml",
        "application/rss+xml",
        "application/rdf+xml",
        "application/xml",
        "text/xml",
    }
)


def _comments_url(entry: Mapping[str, Any], base: str) -> str:
    """The item's comment feed as an absolute http(s) URL, or ``""``.

    feedparser lowercases namespaced element names, so both ``wfw:commentRss`` and the
    ``wfw:commentRSS`` spelling (rssboard.org/comment-api) arrive as ``wfw_commentrss``, and
    it maps any prefix bound to the wfw namespace to ``wfw``. It also resolves a relative
    value against xml:base; the join here covers the loose parser, which does not.
    """
    # slash:comments (and RFC 4685's thr:total) count the comments: a feed that says there
    # are none saves us fetching an empty comment feed. When comments arrive, the entry's
    # count changes, the essay is updated, and its comment feed is read again.
    count = str(entry.get("slash_comments") or entry.get("thr_total") or "").strip()
    if count.isascii() and count.isdigit() and int(count) == 0:
        return ""
    url = _http_url(_absolute(base, entry.get("wfw_commentrss")))
    if url:
        return url
    # RFC 4685: <link rel="replies" type="application/atom+xml" href="..."/>. Only a link typed
    # as a feed counts: feedparser reports an untyped link as text/html, and a comments *page*
    # cannot be parsed.
    for link in entry.get("links") or []:
        if not isinstance(link, Mapping) or link.get("rel") != "replies":
            continue
        kind = str(link.get("type") or "").split(";", 1)[0].strip().lower()
        if kind not in _FEED_TYPES:
            continue
        url = _http_url(_absolute(base, link.get("href")))
        if url:
            return url
    return ""


def _entry_html(entry: Mapping[str, Any]) -> str:
    """content:encoded / Atom content, preferring an HTML part over a text one."""
    parts = list(entry.get("content") or [])
    parts.sort(key=lambda part: 0 if "html" in str(part.get("type", "")) else 1)
    for part in parts:
        text = _detail_html(part, part.get("value"))
        if text:
            return text
    return ""


def _detail_html(detail: Mapping[str, Any] | None, value: Any) -> str:
    """A feedparser text construct as HTML: plain text is escaped, HTML kept as given."""
    text = str(value or "")
    if not text.strip():
        return ""
    if detail is not None and detail.get("type") == "text/plain":
        return _text_to_html(text)
    return text


def _from_struct(value: time.struct_time | None, now: datetime) -> datetime | None:
    # feedparser normalizes every date format it knows to a UTC struct_time.
    if value is None:
        return None
    try:
        when = datetime(*value[:6], tzinfo=UTC)
    except (TypeError, ValueError):
        return None
    return _clamp(when, now)


# --- JSON Feed -------------------------------------------------------------------------------


def _parse_json_feed(source: str, fetched: http.Fetched, now: datetime, where: str) -> list[Essay]:
    from feedparser.urls import resolve_relative_uris  # imported on use: see the note at "XML feeds"

    try:
        doc = json.loads(fetched.body)  # bytes: json detects UTF-8/16/32 and a BOM itself
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{where}: not a feed: invalid JSON: {exc}") from exc
    if not isinstance(doc, dict) or "jsonfeed.org/version/" not in str(doc.get("version", "")):
        raise SourceError(f"{where}: not a feed: JSON without a jsonfeed.org version")
    items = doc.get("items")
    if not isinstance(items, list):
        raise SourceError(f"{where}: not a feed: JSON Feed without an items list")
    # JSON Feed defines no base URL; relative URLs are read against where the feed was fetched.
    base = fetched.url
    home = _http_url(_absolute(base, doc.get("home_page_url"))) or base
    feed_author = _json_authors(doc)
    essays: list[Essay] = []
    for item in items[:MAX_ENTRIES]:
        if not isinstance(item, dict):
            continue
        # url is the item's own page; external_url is what it links to (a link-blog post).
        link = _http_url(_absolute(base, item.get("url"))) or _http_url(
            _absolute(base, item.get("external_url"))
        )
        # The spec says titles and summaries are plain text and HTML is not allowed, so markup
        # or entities in one (WordPress's "&#8217;") mean the publisher encoded it as HTML.
        title = _plain(_str(item.get("title")))
        content_html = _str(item.get("content_html"))
        if content_html.strip():
            content_html = str(resolve_relative_uris(content_html, base, "utf-8", "text/html"))
        else:
            content_html = _text_to_html(_str(item.get("content_text")))
        summary = _plain(_str(item.get("summary"))) or _plain(content_html)
        published = _from_iso(item.get("date_published")) or _from_iso(item.get("date_modified"))
        published = _clamp(published, now) if published else None
        # The spec requires a string id; some publishers emit numbers, which are still unique.
        item_id = item.get("id")
        essays.append(
            Essay(
                source=source,
                key=_key(
                    str(item_id) if item_id not in (None, "") else None,
                    link,
                    title,
                    published,
                    content_html,
                ),
                url=link or home,
                title=title or UNTITLED,
                html=content_html,
                summary=_excerpt(summary),
                author=_json_authors(item) or feed_author,
                published=published,
            )
        )
    return essays


def _json_authors(obj: Mapping[str, Any]) -> str:
    # 1.1 has authors[]; 1.0 had a single author object, which 1.1 readers should still read.
    people = obj.get("authors")
    if not isinstance(people, list):
        single = obj.get("author")
        people = [single] if isinstance(single, dict) else []
    names = [_plain(_str(p.get("name"))) for p in people if isinstance(p, dict)]
    return ", ".join(name for name in names if name)


def _from_iso(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None  # one bad date must not lose the item
    # RFC 3339 requires an offset; when a feed leaves it off, UTC is the least surprising guess.
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


# --- shared helpers --------------------------------------------------------------------------


def _key(item_id: Any, link: str, title: str, published: datetime | None, html_text: str) -> str:
    """The item's identity across fetches.

    guid/id first: publishers promise it never changes, even when the URL does. Then the
    absolute link. Items with neither (rare, RSS 0.9x-style) get a hash of title and date:
    what a reader sees as "the same post". The body is left out on purpose because a typo
    fix would change it and resend the essay as new; it is used only when there is no
    title and no date at all.
    """
    if item_id is not None and str(item_id).strip():
        return str(item_id).strip()
    if link:
        return link
    basis = "\x00".join([title, published.isoformat() if published else ""])
    if not basis.strip("\x00"):
        basis = html_text
    return "sha256:" + hashlib.sha256(basis.encode("utf-8")).hexdigest()[:32]


def _clamp(when: datetime, now: datetime) -> datetime:
    # A date far in the future is a broken CMS clock or a placeholder year; left alone it
    # would sort first in every digest forever. A day of grace covers time-zone mistakes.
    return now if when > now + FUTURE_GRACE else when


def _unique(essays: Iterable[Essay]) -> list[Essay]:
    # Feeds sometimes repeat an item; the first (usually newest) copy wins.
    seen: set[str] = set()
    out: list[Essay] = []
    for essay in essays:
        if essay.key not in seen:
            seen.add(essay.key)
            out.append(essay)
    return out


def _absolute(base: str, value: Any) -> str:
    return urljoin(base, value.strip()) if isinstance(value, str) and value.strip() else ""


def _http_url(value: Any) -> str:
    """``value`` if it is an absolute http(s) URL, else ``""``.

    feedparser resolves relative links but passes ``javascript:`` links through untouched,
    and an essay URL goes straight into an email's href.
    """
    if not isinstance(value, str):
        return ""
    value = value.strip()
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else ""


def _names(people: Any) -> str:
    if not isinstance(people, list):
        return ""
    names = [_plain(_person(p, None)) for p in people if isinstance(p, Mapping)]
    return ", ".join(name for name in names if name)


def _person(detail: Any, fallback: Any) -> str:
    # RSS <author> is "email (Name)"; feedparser splits it into author_detail.name/email.
    if isinstance(detail, Mapping) and detail.get("name"):
        return str(detail["name"])
    return str(fallback or "")


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _squash(text: str) -> str:
    """Collapse whitespace and control characters (which must never reach a header) to one space."""
    return _SPACE.sub(" ", text).strip()


class _TextExtractor(HTMLParser):
    """HTML → its text. Drops what a reader never sees; block boundaries become spaces."""

    SKIP = frozenset({"script", "style", "template", "noscript", "head", "title"})
    BLOCK = frozenset(
        {
            "address",
            "article",
            "aside",
            "blockquote",
            "br",
            "dd",
            "div",
            "dl",
            "dt",
            "figcaption",
            "figure",
            "footer",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "header",
            "hr",
            "li",
            "ol",
            "p",
            "pre",
            "section",
            "table",
            "td",
            "th",
            "tr",
            "ul",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def _plain(markup: str) -> str:
    """HTML (or text that may contain some) → one line of plain text."""
    if not markup:
        return ""
    if "<" not in markup and "&" not in markup:
        return _squash(markup)
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return _squash("".join(parser.parts))


def _text_to_html(text: str) -> str:
    """Plain text → paragraphs of escaped HTML (blank lines separate paragraphs)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)


def _excerpt(text: str, limit: int = SUMMARY_CHARS) -> str:
    """At most ``limit`` characters; when cut, cut at a word boundary and add an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    # Cut at the last space unless that loses more than half (one very long "word", a URL).
    cut = cut[:space] if space > limit // 2 else cut[: limit - 1]
    return cut.rstrip(" ,;:.-") + "…"


# --- helpers other sources share -------------------------------------------------------------
# Sources that read HTML or plain text from an API (WordPress, Substack, comment feeds) must
# turn it into titles, excerpts and paragraphs exactly as feeds do; these are the public names.


def plain_text(markup: str) -> str:
    """HTML (or text that may contain some) → one line of plain text, entities decoded."""
    return _plain(markup)


def excerpt(text: str, limit: int = SUMMARY_CHARS) -> str:
    """At most ``limit`` characters, cut at a word boundary with an ellipsis."""
    return _excerpt(text, limit)


def text_to_html(text: str) -> str:
    """Plain text → paragraphs of escaped HTML (blank lines separate paragraphs)."""
    return _text_to_html(text)


def http_url(value: Any) -> str:
    """``value`` if it is an absolute http(s) URL, else ``""``."""
    return _http_url(value)


def absolute_http_url(base: str, value: Any) -> str:
    """``value`` resolved against ``base`` if that is an absolute http(s) URL, else ``""``."""
    return _http_url(_absolute(base, value))


def resolve_links(markup: str, base: str) -> str:
    """Relative ``href``/``src`` attributes in an HTML fragment made absolute against ``base``."""
    if not markup.strip():
        return markup
    from feedparser.urls import resolve_relative_uris

    return str(resolve_relative_uris(markup, base, "utf-8", "text/html"))


def feed_entries(fetched: http.Fetched, where: str) -> list[Any]:
    """The entries of an XML feed (feedparser, no sanitizing, relative links resolved).

    Raises :class:`SourceError` when the body is not a feed; an empty feed is ``[]``.
    """
    return _xml_entries(fetched, where)[1][:MAX_ENTRIES]


def entry_html(entry: Mapping[str, Any]) -> str:
    """A feedparser entry's body as HTML: content (HTML part first), else the summary."""
    return _entry_html(entry) or _detail_html(entry.get("summary_detail"), entry.get("summary"))


def entry_date(entry: Mapping[str, Any], now: datetime) -> datetime | None:
    """A feedparser entry's published (else updated) date, aware UTC, clamped to ``now``."""
    return _from_struct(entry.get("published_parsed") or entry.get("updated_parsed"), now)


def entry_author(entry: Mapping[str, Any]) -> str:
    """A feedparser entry's author names, as plain text."""
    return _names(entry.get("authors")) or _plain(str(entry.get("author") or ""))
