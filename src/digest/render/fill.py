"""A compiled digest and the per-recipient fill-in: everything a send needs from rendering.

:func:`digest.render.compose.compile_draft` renders a draft once (Jinja2 → MJML → HTML) into a
:class:`CompiledEmail`: the HTML and text split into static parts around per-recipient slots.
Sending only fills the slots, so this module imports nothing but the standard library and
``digest.types``/``digest.errors``: a sending process never loads Jinja2, MRML or the HTML
sanitizer. A compiled digest also round-trips through JSON (:meth:`CompiledEmail.to_json`,
:meth:`CompiledEmail.from_json`), so the one the approvers reviewed can be stored with the
draft and sent as it is.
"""

from __future__ import annotations

import html as _html
import json
import re
from dataclasses import dataclass, field
from typing import Any

from digest.errors import RenderError
from digest.types import SLOT_NAMES

__all__ = ["NAME_FALLBACK", "NAME_MAX", "CompiledEmail", "personalize", "slot_values"]

NAME_FALLBACK = "reader"
NAME_MAX = 80
# Bumped whenever the stored JSON of a CompiledEmail changes shape: older rows then no longer
# load and the draft is compiled again.
JSON_FORMAT = 1

# Controls, line/paragraph separators and bidi overrides: none belongs in a greeting.
_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SPACES = re.compile(r"\s+")
_HTTP = ("https://", "http://")


@dataclass(frozen=True)
class CompiledEmail:
    """A digest compiled once, split into static parts around per-recipient slots.

    ``html_parts`` has exactly one more element than ``html_slots``; recipient HTML is
    ``parts[0] + value(slots[0]) + parts[1] + ... + parts[-1]``. The same holds for text.
    """

    subject: str
    preheader: str
    html_parts: tuple[str, ...]
    html_slots: tuple[str, ...]
    text_parts: tuple[str, ...]
    text_slots: tuple[str, ...]
    # Derived in __post_init__: the interleaved parts (slot positions hold "") and, for each
    # slot position, the index of its value in SLOT_NAMES order.
    _html_seq: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _html_fill: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _text_seq: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _text_fill: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Precompute, once, the interleaved list personalize copies and the (position, value
        # index) pairs it fills: per recipient that leaves a list copy, a few stores, a join.
        for parts, slots, kind in (
            (self.html_parts, self.html_slots, "html"),
            (self.text_parts, self.text_slots, "text"),
        ):
            if len(parts) != len(slots) + 1:
                raise ValueError(f"{kind}: need one more part than slots")
            unknown = set(slots) - set(SLOT_NAMES)
            if unknown:
                raise ValueError(f"{kind}: unknown slots {sorted(unknown)}")
            seq: list[str] = [parts[0]]
            fill: list[tuple[int, int]] = []
            for slot, part in zip(slots, parts[1:]):
                fill.append((len(seq), SLOT_NAMES.index(slot)))
                seq.extend(("", part))
            object.__setattr__(self, f"_{kind}_seq", tuple(seq))
            object.__setattr__(self, f"_{kind}_fill", tuple(fill))

    def to_json(self) -> str:
        """This compiled digest as JSON text (see :meth:`from_json`). ASCII only: whatever
        the content holds, any database's text column stores it unchanged."""
        return json.dumps({
            "format": JSON_FORMAT,
            "subject": self.subject,
            "preheader": self.preheader,
            "html_parts": self.html_parts,
            "html_slots": self.html_slots,
            "text_parts": self.text_parts,
            "text_slots": self.text_slots,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CompiledEmail:
        """The compiled digest :meth:`to_json` wrote; ``ValueError`` for anything else
        (damaged text, another format, parts and slots that do not fit together)."""
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise ValueError("not a compiled digest in the current format")

        def string(key: str) -> str:
            value = data.get(key)
            if not isinstance(value, str):
                raise ValueError(f"{key}: expected a string")
            return value

        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key}: expected a list of strings")
            return tuple(value)

        return cls(subject=string("subject"), preheader=string("preheader"),
                   html_parts=strings("html_parts"), html_slots=strings("html_slots"),
                   text_parts=strings("text_parts"), text_slots=strings("text_slots"))


def _is_latin1(value: str) -> bool:
    return value.isascii() or max(value) <= "\xff"


def _clean_name(name: str) -> str:
    if not name.isprintable():  # fast path: most names have nothing to remove
        name = _SPACES.sub(" ", _NAME_JUNK.sub(" ", name))
    name = name.strip()
    return name[:NAME_MAX].rstrip() if len(name) > NAME_MAX else name


def _escape(value: str) -> str:
    # Most values (our signed URLs, ordinary names) contain nothing to escape; five substring
    # scans are cheaper than html.escape's five replaces.
    if "&" in value or "<" in value or ">" in value or '"' in value or "'" in value:
        value = _html.escape(value, quote=True)
    if not value.isascii() and not _is_latin1(value):
        # "李" as "&#26446;": one wide character would widen the whole joined string.
        value = value.encode("latin-1", "xmlcharrefreplace").decode("latin-1")
    return value


def slot_values(*, name: str, unsubscribe_url: str, preferences_url: str
                ) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """One recipient's slot values in ``SLOT_NAMES`` order: (escaped for HTML, for text).

    Providers that personalize server-side put these into their substitution data, so the
    escaping is the same as :func:`personalize` applies.
    """
    if not (unsubscribe_url.startswith(_HTTP) and preferences_url.startswith(_HTTP)):
        raise RenderError("unsubscribe and preferences URLs must be http(s) URLs")
    clean = _clean_name(name) or NAME_FALLBACK
    # Same order as SLOT_NAMES, which the precomputed fill positions index into.
    text = (clean, unsubscribe_url, preferences_url)
    html = (_escape(clean), _escape(unsubscribe_url), _escape(preferences_url))
    # Nothing escaped (the rule: _escape returns a value unchanged as itself): one tuple for
    # both, which the providers then tell apart from two by identity, once per reader.
    if html[0] is clean and html[1] is unsubscribe_url and html[2] is preferences_url:
        return text, text
    return html, text


def personalize(
    compiled: CompiledEmail, *, name: str, unsubscribe_url: str, preferences_url: str
) -> tuple[str, str]:
    """Fill one recipient's values into a compiled digest; returns ``(html, text)``.

    ``name`` loses control characters and is capped at 80 characters; when nothing is left
    the greeting uses ``"reader"``. HTML values are escaped with ``html.escape`` (right for
    text and for the double-quoted attributes MRML writes) and characters beyond Latin-1
    become character references; text values go in as they are.
    The URLs must be http(s) (they are our own signed links); anything else raises
    :class:`RenderError`.
    """
    html_values, text_values = slot_values(name=name, unsubscribe_url=unsubscribe_url,
                                           preferences_url=preferences_url)
    html_seq = list(compiled._html_seq)
    for position, index in compiled._html_fill:
        html_seq[position] = html_values[index]
    text_seq = list(compiled._text_seq)
    for position, index in compiled._text_fill:
        text_seq[position] = text_values[index]
    return "".join(html_seq), "".join(text_seq)
