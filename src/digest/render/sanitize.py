"""Untrusted HTML (feed bodies, reader comments) → a strict email-safe fragment, or plain text.

Design rule 4: content is data, never code. Every piece of source HTML goes through
:func:`sanitize_html` once before it reaches a template, and the result is the only HTML from
outside that a template may insert unescaped.

What survives (a deliberately small allowlist):

* text structure: ``p br hr blockquote q pre code ul ol li dl dt dd div span``;
* inline emphasis: ``strong b em i u s del ins mark small sub sup cite kbd abbr``;
* headings ``h1``-``h6``, downgraded to a bold paragraph: a reader's ``<h1>`` inside a comment
  card would otherwise shout at the default 2em in every client;
* links: ``a`` with ``href`` and ``title`` only. Schemes: ``http``, ``https``, ``mailto``.
  Relative links are resolved against ``base_url`` when one is given, else dropped
  (a relative link in an email points nowhere). Every link gets ``rel="noopener noreferrer"``.
* ``abbr`` keeps ``title``.

What never survives: ``script``, ``style``, ``iframe``, ``svg``, ``math``, ``object``,
``embed``, ``template``, ``noscript`` and form controls are removed *with their content*;
every other unknown tag (``form``, ``img``, ``table``, ``mj-*`` ...) is removed but its text
kept. No ``style``, ``class``, ``id`` or ``on*`` attribute survives from the input.

Images are **not** allowed: remote images in a digest body are tracking pixels and broken
layouts waiting to happen, and the digest links to every essay anyway.

nh3 re-serializes the parsed tree, so the output is well-formed: every ``<``, ``>`` and ``&``
in text and in attribute values is escaped, which is what makes the fragment safe to drop
into an ``<mj-text>`` (MRML cannot see a closing ``</mj-text>`` in it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from html import escape as _escape  # as _escape: ``html`` is a parameter name in this module
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import nh3

ALLOWED_TAGS: frozenset[str] = frozenset(
    {
        "p", "br", "hr", "div", "span",
        "a", "strong", "b", "em", "i", "u", "s", "del", "ins", "mark", "small", "sub", "sup",
        "cite", "kbd", "abbr",
        "blockquote", "q", "code", "pre",
        "ul", "ol", "li", "dl", "dt", "dd",
        "h1", "h2", "h3", "h4", "h5", "h6",
    }
)  # fmt: skip

ALLOWED_ATTRIBUTES: Mapping[str, frozenset[str]] = {
    "a": frozenset({"href", "title"}),
    "abbr": frozenset({"title"}),
}

# Removed together with everything inside them: their content is code or chrome, not prose.
DROP_WITH_CONTENT: frozenset[str] = frozenset(
    {
        "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet",
        "svg", "math", "template", "noscript", "noembed", "noframes",
        "textarea", "select", "option", "button", "title", "head", "xmp",
    }
)  # fmt: skip

URL_SCHEMES: frozenset[str] = frozenset({"http", "https", "mailto"})

# nh3 output is normalized (lowercase tags; headings carry no attributes because none are
# allowed; a literal "<h1>" in text is escaped to "&lt;h1&gt;"), so a regex over it is exact.
_HEADING_OPEN = re.compile(r"<h[1-6]>")
_HEADING_CLOSE = re.compile(r"</h[1-6]>")
# C0/C1 controls except tab and newline, plus DEL: they have no business in an email.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WS = re.compile(r"[ \t\r\n\f\v]+")


def http_base(url: str | None) -> str | None:
    """``url`` if it is an absolute http(s) URL with a host, else ``None``."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme.lower() in ("http", "https") and parts.netloc:
        return url.strip()
    return None


def safe_url(url: str | None, base_url: str | None = None) -> str:
    """An http(s) or mailto URL fit for an ``href``, or ``""`` when it is anything else.

    Used for URLs that come as plain values (an essay's link, a comment's permalink) rather
    than inside HTML. Relative URLs are resolved against ``base_url`` when it is http(s).
    """
    if not url:
        return ""
    # Browsers ignore tabs and newlines inside URLs ("java\tscript:"), so remove them first.
    cleaned = _CONTROL.sub("", url).replace("\t", "").replace("\n", "").strip()
    if not cleaned:
        return ""
    try:
        parts = urlsplit(cleaned)
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return cleaned if parts.netloc else ""
    if scheme == "mailto":
        return cleaned
    if scheme:
        return ""
    base = http_base(base_url)
    if base is None:
        return ""
    joined = urljoin(base, cleaned)
    return joined if http_base(joined) else ""


@lru_cache(maxsize=256)
def _cleaner(base_url: str | None, styles: tuple[tuple[str, str], ...]) -> nh3.Cleaner:
    # One Cleaner per (base, styles): building one parses the options in Rust, and a digest
    # sanitizes many comments against the same few bases.
    relative: nh3.UrlRelative = ("rewrite_with_base", base_url) if base_url else "deny"
    return nh3.Cleaner(
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(DROP_WITH_CONTENT),
        attributes={tag: set(attrs) for tag, attrs in ALLOWED_ATTRIBUTES.items()},
        strip_comments=True,
        link_rel="noopener noreferrer",
        url_schemes=set(URL_SCHEMES),
        url_relative=relative,
        set_tag_attribute_values={tag: {"style": css} for tag, css in styles} or None,
    )


def sanitize_html(
    html: str,
    base_url: str | None = None,
    *,
    styles: Mapping[str, str] | None = None,
) -> str:
    """Reduce untrusted ``html`` to the strict email allowlist described in the module doc.

    ``base_url`` resolves relative links (it must be an absolute http(s) URL; anything else
    counts as no base, and relative links are then dropped). ``styles`` maps an allowed tag to
    an inline ``style`` we add ourselves (email clients ignore most ``<style>`` blocks); the
    input's own ``style`` attributes are always removed. Headings become ``<p><strong>``.
    """
    if not html:
        return ""
    html = _CONTROL.sub("", html)
    style_items = tuple(sorted((styles or {}).items()))
    for tag, _ in style_items:
        if tag not in ALLOWED_TAGS:
            raise ValueError(f"cannot style <{tag}>: it is not in the allowlist")
    cleaned = _cleaner(http_base(base_url), style_items).clean(html)
    p_style = dict(style_items).get("p")
    # The heading's replacement paragraph gets the same added style as every other <p>.
    p_open = f'<p style="{_escape_attr(p_style)}"><strong>' if p_style else "<p><strong>"
    cleaned = _HEADING_OPEN.sub(p_open, cleaned)
    return _HEADING_CLOSE.sub("</strong></p>", cleaned)


def _escape_attr(value: str) -> str:
    return (
        value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )


def clean_line(value: str) -> str:
    """One line of plain text: control characters removed, whitespace runs collapsed.

    For titles, author names and subjects, which end up in headers (rule 5), headings and
    single text lines.
    """
    return _WS.sub(" ", _CONTROL.sub("", value)).strip()


def truncate_text(text: str, limit: int, ellipsis: str = "…") -> str:
    """``text`` cut at a word boundary so that the result, ellipsis included, fits ``limit``."""
    text = clean_line(text)
    if len(text) <= limit:
        return text
    cut = text[: max(0, limit - len(ellipsis))]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-–—") + ellipsis


# ----------------------------------------------------------------------------- plain text

_BLOCK_TAGS = frozenset(
    {"p", "div", "blockquote", "pre", "ul", "ol", "li", "dl", "dt", "dd", "hr",
     "h1", "h2", "h3", "h4", "h5", "h6", "table", "tr", "section", "article", "header",
     "footer", "figure", "figcaption", "address", "aside", "main", "nav", "form", "details",
     "summary"}
)  # fmt: skip
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "area", "col", "source"})


class _Block:
    """One paragraph of output: its text and where it sits (quote depth, list nesting)."""

    __slots__ = ("in_list", "indent", "marker", "quote", "text", "tight")

    def __init__(
        self, quote: int, indent: int, marker: str, text: str, tight: bool, in_list: bool
    ) -> None:
        self.quote = quote
        self.indent = indent
        self.marker = marker
        self.text = text
        self.tight = tight  # a list item's first paragraph: no blank line before it in a list
        self.in_list = in_list


class _TextMaker(HTMLParser):
    """Walks sanitized HTML and collects paragraphs as :class:`_Block` values.

    It only ever sees nh3 output, so it can assume balanced tags from the allowlist; it still
    copes with anything (unknown tags are ignored, stray end tags are harmless).
    """

    def __init__(self, *, links: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.with_links = links
        self.blocks: list[_Block] = []
        self.buf: list[str] = []
        self.quote = 0
        self.pre = 0
        self.lists: list[list[int]] = []  # one [counter] per open list; counter < 0 for <ul>
        self.item_marker: str | None = None  # the "- " or "3. " waiting for the item's text
        self.in_item = False
        self.list_start = False
        self.links: list[tuple[str, int]] = []  # (href, len(buf) at <a>)

    # -- helpers

    def flush(self) -> None:
        raw = "".join(self.buf)
        self.buf.clear()
        if self.pre:
            lines = [line.rstrip() for line in raw.split("\n")]
            while lines and not lines[0].strip():
                lines.pop(0)
            while lines and not lines[-1].strip():
                lines.pop()
        else:
            lines = [_WS.sub(" ", line).strip() for line in raw.split("\n")]
            lines = [line for line in lines if line]
        if not lines:
            return
        indent = max(0, len(self.lists) - 1) * 2
        if self.item_marker is not None:
            marker, tight = self.item_marker, not self.list_start
            self.item_marker = None
            self.list_start = False
        elif self.in_item:
            marker, tight = "", False
            indent += 2
        else:
            marker, tight = "", False
        block = _Block(self.quote, indent, marker, "\n".join(lines), tight, bool(self.lists))
        self.blocks.append(block)

    # -- HTMLParser hooks

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.buf.append("\n")
            return
        if tag == "a":
            href = next((v for k, v in attrs if k == "href" and v), "")
            self.links.append((href, len(self.buf)))
            return
        if tag not in _BLOCK_TAGS:
            return
        self.flush()
        if tag == "blockquote":
            self.quote += 1
        elif tag == "pre":
            self.pre += 1
        elif tag in ("ul", "ol"):
            # A new top-level list is set off from whatever came before, even another list.
            self.list_start = not self.lists
            self.lists.append([0 if tag == "ol" else -1])
        elif tag == "li":
            counter = self.lists[-1] if self.lists else [-1]
            if counter[0] >= 0:
                counter[0] += 1
                self.item_marker = f"{counter[0]}. "
            else:
                self.item_marker = "- "
            self.in_item = True
        elif tag == "hr":
            self.blocks.append(_Block(self.quote, 0, "", "----", False, False))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            if not self.links:
                return
            href, start = self.links.pop()
            if not self.with_links or not href:
                return
            text = _WS.sub(" ", "".join(self.buf[start:])).strip()
            shown = href.removeprefix("mailto:")
            if not text:
                self.buf.append(shown)
            elif text != shown and text != href:
                self.buf.append(f" ({href})")
            return
        if tag not in _BLOCK_TAGS or tag in _VOID_TAGS:
            return
        self.flush()
        if tag == "blockquote":
            self.quote = max(0, self.quote - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self.in_item = False
            self.item_marker = None
        elif tag == "li":
            self.in_item = False
            self.item_marker = None

    def handle_data(self, data: str) -> None:
        data = _CONTROL.sub("", data)
        if not self.pre:
            data = _WS.sub(" ", data)
        self.buf.append(data)

    def result(self) -> str:
        self.flush()
        out: list[str] = []
        previous: _Block | None = None
        for block in self.blocks:
            if previous is not None:
                if block.tight and previous.in_list and previous.quote == block.quote:
                    out.append("\n")
                else:
                    # The blank line between two paragraphs of one quote keeps its ">".
                    shared = min(previous.quote, block.quote)
                    out.append("\n" + ("> " * shared).rstrip() + "\n")
            lead = " " * block.indent + block.marker
            hang = " " * (block.indent + len(block.marker))
            quote = "> " * block.quote
            lines = block.text.split("\n")
            rendered = [lead + lines[0]] + [hang + line if line else line for line in lines[1:]]
            if quote:
                # Blank separator lines inside a quote keep their ">" so the quote stays whole.
                rendered = [(quote + line).rstrip() for line in rendered]
            out.append("\n".join(rendered))
            previous = block
        return "".join(out)


def html_to_text(html: str, base_url: str | None = None, *, links: bool = True) -> str:
    """Readable plain text from untrusted ``html`` (sanitized first, so hostile input is fine).

    Paragraphs are separated by blank lines, ``<br>`` becomes a newline, list items start
    with ``- `` or ``1. ``, blockquotes are prefixed with ``> ``, and links read
    ``text (https://url)`` unless the text already is the URL (``links=False`` leaves link
    targets out, for excerpts).
    """
    if not html:
        return ""
    maker = _TextMaker(links=links)
    maker.feed(sanitize_html(html, base_url))
    maker.close()
    return maker.result()


_WORD = re.compile(r"\w+(?:['’.-]\w+)*")


def word_count(html: str) -> int:
    """How many words a reader sees in ``html`` (link targets and markup don't count)."""
    if not html:
        return 0
    return len(_WORD.findall(html_to_text(html, links=False)))


# ----------------------------------------------------------------------------- truncation


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


class _Truncator(HTMLParser):
    """Copies HTML until ``limit`` words of text have passed, then stops at a sentence end."""

    def __init__(self, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.limit = limit
        self.words = 0
        self.out: list[str] = []
        self.open: list[str] = []
        self.done = False
        # (index in out, depth of open tags, words so far) after the last sentence end seen
        self.last_sentence: tuple[int, list[str], int] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.done:
            return
        rendered = "".join(f' {k}="{_escape(v or "", quote=True)}"' for k, v in attrs)
        self.out.append(f"<{tag}{rendered}>")
        if tag not in _VOID_TAGS:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS and self.open and self.open[-1] == tag:
            self.open.pop()
            self.out.append(f"</{tag}>")

    def handle_endtag(self, tag: str) -> None:
        if self.done or tag not in self.open:
            return
        while self.open:
            top = self.open.pop()
            self.out.append(f"</{top}>")
            if top == tag:
                break
        if tag in _BLOCK_TAGS and self.words >= self.limit:
            self.done = True  # a block ended past the limit: a natural place to stop

    def handle_data(self, data: str) -> None:
        if self.done:
            return
        pos = 0
        for match in re.finditer(r"\S+", data):
            self.words += 1
            end = match.end()
            if _SENTENCE_END.match(data, end - 1) or _SENTENCE_END.search(match.group()[-3:]):
                piece = _escape(data[pos:end], quote=False)
                self.out.append(piece)
                pos = end
                self.last_sentence = (len(self.out), list(self.open), self.words)
                if self.words >= self.limit:
                    self.done = True
                    return
            elif self.words >= self.limit * 1.25:
                self.done = True
                if self.last_sentence is not None and self.last_sentence[2] >= self.limit // 2:
                    return  # end at the last full sentence rather than mid-sentence
                # No sentence end in sight: cut at this word.
                self.out.append(_escape(data[pos:end], quote=False) + "…")
                self.last_sentence = None
                return
        self.out.append(_escape(data[pos:], quote=False))


def truncate_html(fragment: str, max_words: int) -> tuple[str, bool]:
    """``fragment`` cut to about ``max_words`` words at a sentence boundary; (html, was_cut).

    The cut falls at the first sentence end at or after ``max_words`` words (or, when none
    comes within a quarter more, at a word, with an ellipsis); open tags are closed.
    """
    if word_count(fragment) <= max_words:
        return fragment, False
    parser = _Truncator(max_words)
    parser.feed(fragment)
    parser.close()
    if not parser.done:
        return fragment, False
    out = parser.out
    open_tags = parser.open
    if parser.last_sentence is not None:
        index, open_tags, _ = parser.last_sentence
        out = out[:index]
    closing = "".join(f"</{tag}>" for tag in reversed(open_tags))
    return "".join(out) + closing, True
