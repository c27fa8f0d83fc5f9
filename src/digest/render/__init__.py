"""Rendering: sanitize source HTML, render Jinja2 → MJML → HTML once per draft, personalize.

The public API is :func:`compile_draft` + :func:`personalize` for the digest, and
:func:`compile_draft_ready` for the approvers' "draft ready" email. See ``compose`` for the
slot mechanism and the template context, ``sanitize`` for the HTML allowlist, ``fill`` for
the compiled digest and the per-recipient fill-in, ``cache`` for the key a stored compile is
reused under.

Importing this package loads only ``fill``: a sending process fills in a compiled digest and
never needs Jinja2, MRML or the sanitizer. The other names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from digest.render.fill import NAME_FALLBACK, CompiledEmail, personalize, slot_values
from digest.types import SLOT_NAMES

if TYPE_CHECKING:  # the lazily loaded names below, for type checkers
    from digest.render.cache import bundled_templates_dir as bundled_templates_dir
    from digest.render.compose import CommentView as CommentView
    from digest.render.compose import EssayView as EssayView
    from digest.render.compose import compile_draft as compile_draft
    from digest.render.compose import compile_draft_ready as compile_draft_ready
    from digest.render.env import make_env as make_env
    from digest.render.sanitize import html_to_text as html_to_text
    from digest.render.sanitize import safe_url as safe_url
    from digest.render.sanitize import sanitize_html as sanitize_html
    from digest.render.sanitize import word_count as word_count

_LAZY: dict[str, str] = {
    "CommentView": "digest.render.compose",
    "EssayView": "digest.render.compose",
    "compile_draft": "digest.render.compose",
    "compile_draft_ready": "digest.render.compose",
    "bundled_templates_dir": "digest.render.cache",
    "make_env": "digest.render.env",
    "html_to_text": "digest.render.sanitize",
    "safe_url": "digest.render.sanitize",
    "sanitize_html": "digest.render.sanitize",
    "word_count": "digest.render.sanitize",
}


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)


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
