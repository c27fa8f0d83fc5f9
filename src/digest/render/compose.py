"""Draft → email: Jinja → MJML → HTML once per draft, then a cheap fill-in per recipient.

Compiling MJML costs about a millisecond; a send may have 100k recipients. So
:func:`compile_draft` renders and compiles the digest **once** with *slot markers* where the
per-recipient values go, and splits the result at those markers into static parts. Then
:func:`personalize` is a single ``"".join`` over the parts with the escaped values. The
compiled result and the fill-in live in ``digest.render.fill``, which a send loads without
Jinja2, MRML or the sanitizer.

A marker is ``DIGESTSLOT<nonce><slot><nonce>`` with a fresh random nonce per compile: it is
plain ASCII letters and digits, so Jinja's escaping and MRML leave it untouched in text and in
attributes, and no essay or comment can forge one because the nonce does not exist until the
compile starts.

Slots (the same in the HTML and the text part):

* ``name``: the subscriber's name (control characters removed; ``"reader"`` when empty);
* ``unsubscribe_url``: required; a compile fails if the template leaves it out;
* ``preferences_url``.

Template context (for operators writing override templates): ``newsletter`` (``name``,
``postal_address``, ``public_url``, ``public_host``), ``subject``, ``preheader``,
``intro_paragraphs`` (plain text), ``items`` (:class:`EssayView`), ``essay_count``,
``comment_count``, ``slots`` (the markers, by slot name), ``draft_id``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import jinja2
from markupsafe import Markup
from mjml import mjml2html

from digest.config import Newsletter
from digest.errors import RenderError
from digest.render.env import longdate, make_env
from digest.render.fill import NAME_FALLBACK, CompiledEmail, _is_latin1, personalize, slot_values
from digest.render.sanitize import (
    clean_line,
    html_to_text,
    safe_url,
    sanitize_html,
    truncate_text,
)
from digest.types import SLOT_NAMES, Draft, DraftItem, RankedComment

__all__ = [
    "EMAIL_STYLES",
    "NAME_FALLBACK",
    "SLOT_NAMES",
    "CommentView",
    "CompiledEmail",
    "EssayView",
    "compile_draft",
    "compile_draft_ready",
    "personalize",
    "slot_values",
]

REQUIRED_SLOTS: tuple[str, ...] = ("unsubscribe_url",)
PREHEADER_MAX = 140
SUMMARY_MAX = 600  # a feed that puts the whole essay in <summary> gets an excerpt instead
EXCERPT_MAX = 300

DIGEST_HTML = "digest.mjml.j2"
DIGEST_TEXT = "digest.txt.j2"
READY_HTML = "draft_ready.mjml.j2"
READY_TEXT = "draft_ready.txt.j2"

_MONO = "SFMono-Regular, Consolas, 'Liberation Mono', Menlo, monospace"
# Inline styles added to sanitized content (MRML does not inline <style> rules, and many
# clients drop <style> anyway). These are ours; the input's own style attributes never survive.
EMAIL_STYLES: Mapping[str, str] = {
    "p": "margin:0 0 12px;",
    "a": "color:#0b57d0;text-decoration:underline;",
    "blockquote": "margin:0 0 12px;padding:0 0 0 12px;border-left:3px solid #d0d7de;color:#57606a;",
    "pre": (
        f"margin:0 0 12px;padding:8px 12px;background:#eef1f4;border-radius:4px;"
        f"white-space:pre-wrap;word-wrap:break-word;font-family:{_MONO};font-size:14px;"
    ),
    "code": f"font-family:{_MONO};font-size:14px;",
    "ul": "margin:0 0 12px;padding:0 0 0 24px;",
    "ol": "margin:0 0 12px;padding:0 0 0 24px;",
    "hr": "border:0;border-top:1px solid #d0d7de;margin:16px 0;",
}

_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_HTTP = ("https://", "http://")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class CommentView:
    """A comment as templates see it; ``html`` is sanitized (safe to insert), the rest plain."""

    author: str
    html: Markup
    text: str
    url: str
    score: float | None
    words: int
    published: datetime | None
    date: str
    truncated: bool = False
    reply_to_author: str = ""
    reply_to_excerpt: str = ""
    author_reply_author: str = ""
    author_reply_html: Markup = Markup("")
    author_reply_text: str = ""


@dataclass(frozen=True)
class EssayView:
    """An essay as templates see it; ``summary_html`` is sanitized, the rest plain text."""

    index: int
    title: str
    url: str
    author: str
    published: datetime | None
    date: str
    byline: str
    summary_html: Markup
    summary_text: str
    is_new: bool
    comments: tuple[CommentView, ...]


# --------------------------------------------------------------------------- building views


def _http_url(url: str, base: str | None = None) -> str:
    """Only http(s): a "Read the essay" button that opens a mail client would be a surprise."""
    cleaned = safe_url(url, base)
    return cleaned if cleaned.startswith(_HTTP) else ""


def _comment_view(ranked: RankedComment, essay_url: str, tz: tzinfo) -> CommentView:
    comment = ranked.comment
    url = _http_url(comment.url, essay_url)
    # Relative links in a comment are relative to the page it was posted on.
    body = sanitize_html(comment.html, url or essay_url or None, styles=EMAIL_STYLES)
    reply = (sanitize_html(ranked.author_reply_html, url or essay_url or None, styles=EMAIL_STYLES)
             if ranked.author_reply_html else "")
    return CommentView(
        author=clean_line(comment.author) or "A reader",
        html=Markup(body),
        text=html_to_text(body),
        url=url,
        score=comment.score,
        words=ranked.words,
        published=comment.published,
        date=longdate(comment.published, tz),
        truncated=ranked.truncated and bool(url),
        reply_to_author=clean_line(ranked.reply_to_author) or ("A reader" if ranked.reply_to_excerpt else ""),
        reply_to_excerpt=clean_line(ranked.reply_to_excerpt),
        author_reply_author=clean_line(ranked.author_reply_author),
        author_reply_html=Markup(reply),
        author_reply_text=html_to_text(reply) if reply else "",
    )


def _essay_view(index: int, item: DraftItem, tz: tzinfo) -> EssayView:
    essay = item.essay
    url = _http_url(essay.url)
    summary_html = sanitize_html(essay.summary, url or None, styles=EMAIL_STYLES)
    summary_text = html_to_text(summary_html)
    if not summary_text.strip() or len(summary_text) > SUMMARY_MAX:
        # No usable summary: take the opening of the summary or the essay body as plain text.
        source = summary_html if summary_text.strip() else essay.html
        summary_text = truncate_text(html_to_text(source, url or None, links=False), EXCERPT_MAX)
        summary_html = str(Markup('<p style="{}">{}</p>').format(EMAIL_STYLES["p"], summary_text))
        if not summary_text:
            summary_html = ""
    author = clean_line(essay.author)
    date = longdate(essay.published, tz)
    byline = " · ".join(part for part in (f"By {author}" if author else "", date) if part)
    return EssayView(
        index=index,
        title=clean_line(essay.title) or "Untitled",
        url=url,
        author=author,
        published=essay.published,
        date=date,
        byline=byline,
        summary_html=Markup(summary_html),
        summary_text=summary_text,
        is_new=item.is_new,
        comments=tuple(_comment_view(rc, url, tz) for rc in item.comments),
    )


def _newsletter_view(newsletter: Newsletter) -> dict[str, str]:
    public_url = newsletter.public_url
    host = re.sub(r"^https?://", "", public_url).rstrip("/")
    return {
        "name": clean_line(newsletter.name),
        "postal_address": clean_line(newsletter.postal_address),
        "public_url": public_url,
        "public_host": host,
    }


def _intro_paragraphs(intro: str) -> list[str]:
    # The intro is plain text (typed in config or the review page); blank lines split it.
    return [p for p in (clean_line(chunk) for chunk in _PARAGRAPH_BREAK.split(intro)) if p]


def _preheader(intro: list[str], items: list[EssayView]) -> str:
    source = " ".join(intro) or next((i.summary_text for i in items if i.summary_text), "")
    return truncate_text(source, PREHEADER_MAX)


def _base_context(draft: Draft, newsletter: Newsletter) -> dict[str, Any]:
    tz = newsletter.tz
    items = [_essay_view(n, item, tz) for n, item in enumerate(draft.items, start=1)]
    intro = _intro_paragraphs(draft.intro)
    name = clean_line(newsletter.name)
    return {
        "newsletter": _newsletter_view(newsletter),
        "subject": clean_line(draft.subject) or name,
        "preheader": _preheader(intro, items),
        "intro_paragraphs": intro,
        "items": items,
        "essay_count": len(items),
        "comment_count": sum(len(i.comments) for i in items),
        "draft_id": draft.id,
    }


# --------------------------------------------------------------------------- render steps


def _render(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    where = "your templates folder, or remove the override to use the bundled one"
    try:
        template = env.get_template(name)
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {name} not found ({exc.message or exc.name})") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"template {exc.filename or name} line {exc.lineno}: {exc.message}",
            hint=f"fix it in {where}",
        ) from exc
    except jinja2.TemplateError as exc:
        raise RenderError(f"template {name}: {exc}") from exc
    try:
        return template.render(context)
    except jinja2.TemplateSyntaxError as exc:  # an {% include %} of a broken partial
        raise RenderError(
            f"template {exc.filename or exc.name or name} line {exc.lineno}: {exc.message}",
            hint=f"fix it in {where}",
        ) from exc
    except jinja2.TemplateError as exc:
        raise RenderError(
            f"template {template.filename or name}: {exc}", hint=f"fix it in {where}"
        ) from exc
    except Exception as exc:  # operator templates can fail in any way (a bad filter argument ...)
        raise RenderError(
            f"template {template.filename or name} failed: {type(exc).__name__}: {exc}",
            hint=f"fix it in {where}",
        ) from exc


_HEAD = re.compile(r"<mj-head\b.*?</mj-head>", re.DOTALL)
_INLINE_GAP = re.compile(r">[ \t]+<")


def _fix_head_whitespace(source: str) -> str:
    # MRML 6 rejects whitespace without a newline between tags inside <mj-head>
    # ("unexpected token"), e.g. "</mj-attributes>  </mj-head>" — which Jinja's trim_blocks
    # produces after an {% include %} of a partial without a final newline. Head content is
    # tags and escaped text only, so turning such gaps into a newline changes nothing else.
    return _HEAD.sub(lambda m: _INLINE_GAP.sub(">\n<", m.group(0)), source, count=1)


def _compile_mjml(source: str, name: str) -> str:
    source = _fix_head_whitespace(source)
    try:
        # fonts={}: no Google Fonts <link>; the templates use the system font stack.
        return mjml2html(source, disable_comments=False, fonts={})
    except ValueError as exc:
        raise RenderError(
            f"MJML compile of {name} failed: {exc}",
            hint="check the MJML structure of the template (mj-* tags must nest as MJML requires)",
        ) from exc


# Where a character reference would not be decoded: CSS, scripts, comments (MSO conditionals).
_RAW_SEGMENTS = re.compile(r"<style\b.*?</style>|<script\b.*?</script>|<!--.*?-->", re.DOTALL)
NARROW_GROWTH_MAX = 1.10


def _narrow_html(html: str) -> str:
    """``html`` with characters beyond Latin-1 as ``&#NNNN;`` when that costs ≤ 10 % in size.

    Why: CPython stores a string at two bytes per character as soon as it holds one character
    beyond Latin-1 (a curly quote, a dash), which doubles the memory ``personalize`` copies
    per recipient. English and Western European prose has few such characters, so references
    keep the HTML one byte per character at a small size cost. Mostly non-Latin text (Greek,
    Cyrillic, CJK) would grow two to three times, and size matters more (Gmail clips messages
    over 102 KB), so it is left as it is.
    """
    if _is_latin1(html):
        return html
    if any(not _is_latin1(segment) for segment in _RAW_SEGMENTS.findall(html)):
        return html  # e.g. an operator's CSS with non-Latin content: references would break it
    converted = html.encode("latin-1", "xmlcharrefreplace").decode("latin-1")
    if len(converted.encode("utf-8")) > len(html.encode("utf-8")) * NARROW_GROWTH_MAX:
        return html
    return converted


def _tidy_text(text: str) -> str:
    text = _TRAILING_SPACE.sub("\n", text.replace("\r\n", "\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n"


def _split(rendered: str, nonce: str, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pattern = re.compile(f"DIGESTSLOT{nonce}({'|'.join(SLOT_NAMES)}){nonce}")
    pieces = pattern.split(rendered)
    parts, slots = tuple(pieces[0::2]), tuple(pieces[1::2])
    if any(re.search(nonce, part, re.IGNORECASE) for part in parts):
        # A marker was altered on the way (a filter, MRML): refuse rather than leak it.
        raise RenderError(
            f"template {name}: a per-recipient slot marker was altered by the template"
        )
    missing = [slot for slot in REQUIRED_SLOTS if slot not in slots]
    if missing:
        raise RenderError(
            f"template {name} has no {', '.join(missing)}: every digest must carry an unsubscribe link",
            hint="use {{ slots.unsubscribe_url }} in the template",
        )
    return parts, slots


# --------------------------------------------------------------------------- public API


def compile_draft(
    draft: Draft, newsletter: Newsletter, *, templates_dir: str | None = None
) -> CompiledEmail:
    """Render ``draft`` with ``digest.mjml.j2`` and ``digest.txt.j2`` and compile the MJML once.

    All source HTML is sanitized here; titles and names become single plain lines. The result
    holds the HTML and text split around per-recipient slots; fill them with
    :func:`personalize`. Raises :class:`RenderError` for template, MJML or slot problems.
    """
    env = make_env(templates_dir)
    context = _base_context(draft, newsletter)
    nonce = secrets.token_hex(8)
    context["slots"] = {slot: f"DIGESTSLOT{nonce}{slot}{nonce}" for slot in SLOT_NAMES}

    html_out = _narrow_html(_compile_mjml(_render(env, DIGEST_HTML, context), DIGEST_HTML))
    text_out = _tidy_text(_render(env, DIGEST_TEXT, context))
    html_parts, html_slots = _split(html_out, nonce, DIGEST_HTML)
    text_parts, text_slots = _split(text_out, nonce, DIGEST_TEXT)
    return CompiledEmail(
        subject=context["subject"],
        preheader=context["preheader"],
        html_parts=html_parts,
        html_slots=html_slots,
        text_parts=text_parts,
        text_slots=text_slots,
    )


def compile_draft_ready(
    draft: Draft,
    newsletter: Newsletter,
    review_url: str,
    preview_text: str | None = None,
    templates_dir: str | None = None,
) -> tuple[str, str, str]:
    """The "draft ready for review" email to approvers: ``(subject, html, text)``.

    It shows the digest's subject and preview text, lists the essays with their comment
    counts, links to ``review_url`` and names the CLI command that approves the draft.
    """
    review = _http_url(review_url)
    if not review:
        raise RenderError(f"review URL must be an http(s) URL, got {review_url!r}")
    env = make_env(templates_dir)
    context = _base_context(draft, newsletter)
    context["preheader"] = (
        truncate_text(preview_text, PREHEADER_MAX) if preview_text else context["preheader"]
    )
    context["review_url"] = review
    context["approve_command"] = f"digest approve {draft.id if draft.id is not None else '<id>'}"
    context["send_at"] = longdate(draft.send_at, newsletter.tz)
    subject = clean_line(f"Draft ready for review: {context['subject']}")
    context["ready_subject"] = subject
    html_out = _compile_mjml(_render(env, READY_HTML, context), READY_HTML)
    text_out = _tidy_text(_render(env, READY_TEXT, context))
    return subject, html_out, text_out
