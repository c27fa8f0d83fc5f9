"""Rendering: sanitize source HTML, render Jinja2 → MJML → HTML once per draft, personalize.

The public API is :func:`compile_draft` + :func:`personalize` for the digest, and
:func:`compile_draft_ready` for the approvers' "draft ready" email. See ``compose`` for the
slot mechanism and the template context, ``sanitize`` for the HTML allowlist.
"""

from digest.render.compose import (
    NAME_FALLBACK,
    SLOT_NAMES,
    CommentView,
    CompiledEmail,
    EssayView,
    compile_draft,
    compile_draft_ready,
    personalize,
    slot_values,
)
from digest.render.env import bundled_templates_dir, make_env
from digest.render.sanitize import html_to_text, safe_url, sanitize_html, word_count

__all__ = [
    "NAME_FALLBACK",
    "SLOT_NAMES",
    "CommentView",
    "CompiledEmail",
    "EssayView",
    "bundled_templates_dir",
    "compile_draft",
    "compile_draft_ready",
    "html_to_text",
    "make_env",
    "personalize",
    "safe_url",
    "sanitize_html",
    "slot_values",
    "word_count",
]
