"""The Jinja2 environment for email templates.

Lookup order, file by file: the operator's ``templates:`` folder (if any), then the bundled
templates. An override folder may therefore hold just ``digest.mjml.j2`` and inherit the rest.

Escaping: autoescape is ON for every template except plain-text ones (``*.txt.j2``,
``*.txt``). Jinja's ``select_autoescape`` only knows html/htm/xml by extension, so
``*.mjml.j2`` would silently be unescaped with it; we decide by name ourselves and default to
escaping. Undefined variables raise (``StrictUndefined``) so a typo in an override template
fails the compile instead of mailing a blank.

Templates are operator-owned and trusted; user content only ever arrives as *values* in the
render context, never as template source.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, tzinfo
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.loaders import split_template_path

from digest.errors import RenderError
from digest.render.cache import bundled_templates_dir

__all__ = ["bundled_templates_dir", "longdate", "make_env", "quote_lines"]

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def longdate(value: datetime | None, tz: tzinfo | None = None) -> str:
    """``3 November 2026`` (English month names, whatever the process locale); ``""`` for None.

    An aware ``value`` is first converted to ``tz`` (the newsletter's time zone) so the date
    is the one the readers live in.
    """
    if value is None:
        return ""
    if tz is not None and value.tzinfo is not None:
        value = value.astimezone(tz)
    return f"{value.day} {_MONTHS[value.month - 1]} {value.year}"


def quote_lines(text: str, prefix: str = "> ") -> str:
    """Prefix every line of ``text`` (plain-text quoting); blank lines keep a bare ``>``."""
    return "\n".join((prefix + line) if line else prefix.rstrip() for line in text.split("\n"))


class _LayeredLoader(jinja2.BaseLoader):
    """Folders in priority order; the first that has a template wins (like ChoiceLoader).

    Unlike ChoiceLoader, a template found in a later folder stays up to date only while no
    earlier folder has gained a file of that name: an operator who *adds* an override while
    ``digest serve`` runs gets it on the next render, not after a restart.
    """

    def __init__(self, folders: list[str]) -> None:
        self.folders = folders
        self.loaders = [jinja2.FileSystemLoader(folder, encoding="utf-8") for folder in folders]

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        for i, loader in enumerate(self.loaders):
            try:
                source, filename, uptodate = loader.get_source(environment, template)
            except jinja2.TemplateNotFound:
                continue
            pieces = split_template_path(template)
            shadows = [os.path.join(folder, *pieces) for folder in self.folders[:i]]

            def check(
                uptodate: Callable[[], bool] | None = uptodate, shadows: list[str] = shadows
            ) -> bool:
                fresh = uptodate() if uptodate is not None else True
                return fresh and not any(os.path.isfile(path) for path in shadows)

            return source, filename, check
        raise jinja2.TemplateNotFound(template)

    def list_templates(self) -> list[str]:
        names: set[str] = set()
        for loader in self.loaders:
            names.update(loader.list_templates())
        return sorted(names)


def _autoescape(name: str | None) -> bool:
    # Escape unless the template is known to be plain text: forgetting to escape HTML is a
    # security bug, escaping plain text by mistake is only a visible one.
    return not (name or "").endswith((".txt.j2", ".txt"))


def make_env(templates_dir: str | os.PathLike[str] | None = None) -> jinja2.Environment:
    """A Jinja2 environment that looks in ``templates_dir`` first, then the bundled templates.

    Environments are cached per folder (they cache compiled templates); ``auto_reload``
    stays on, so an operator who edits an override while ``digest serve`` runs sees the change.
    Raises :class:`RenderError` when ``templates_dir`` is given but is not a folder.
    """
    override = None
    if templates_dir:
        folder = Path(templates_dir).expanduser().resolve()
        if not folder.is_dir():
            raise RenderError(
                f"templates folder {folder} does not exist or is not a folder",
                hint="fix the `templates:` setting or remove it to use the bundled templates",
            )
        override = str(folder)
    return _make_env(override)


@lru_cache(maxsize=16)
def _make_env(override: str | None) -> jinja2.Environment:
    folders = [override] if override is not None else []
    folders.append(str(bundled_templates_dir()))
    env = jinja2.Environment(
        loader=_LayeredLoader(folders),
        autoescape=_autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=True,
    )
    env.filters["longdate"] = longdate
    env.filters["quote_lines"] = quote_lines
    return env
