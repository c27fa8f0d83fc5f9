"""What a compiled digest depends on, worked out without loading the renderer.

A draft is compiled when it is made and the result is stored with it, so the approvers review
exactly what will be sent and a sending process loads it instead of compiling again (and so
never imports Jinja2, MRML or the sanitizer). The stored result is used only while its key
is unchanged: :func:`render_key` covers everything the compiled HTML and text are made of,
so a change to the templates, the newsletter settings, digest or a rendering library after
the draft was made means the draft is compiled afresh, as if nothing had been stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from datetime import date, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digest import __version__
from digest.types import Draft

if TYPE_CHECKING:
    from digest.config import Newsletter

__all__ = ["bundled_templates_dir", "render_key"]

# The libraries whose output ends up in a compiled digest.
RENDER_LIBRARIES = ("jinja2", "markupsafe", "mjml-python", "nh3")
# The modules that turn a draft into a compiled digest: an in-place update of digest that
# changes any of them (without a new version number) must not reuse what an older one made.
_RENDER_MODULES = ("compose.py", "env.py", "fill.py", "sanitize.py")


def bundled_templates_dir() -> Path:
    """The folder holding the default templates.

    In a wheel, pyproject force-includes the repository's ``templates/`` as
    ``digest/templates``; in an editable install the package has no such folder and the
    templates sit at the repository root, three levels above this file's package.
    """
    try:
        packaged = resources.files("digest") / "templates"
        if isinstance(packaged, Path) and packaged.is_dir():
            return packaged
    except (ModuleNotFoundError, OSError):  # pragma: no cover - only odd import setups
        pass
    return Path(__file__).resolve().parents[3] / "templates"


@lru_cache(maxsize=1)
def _software() -> str:
    """digest's version, the rendering libraries' versions and the render code, as one hash."""
    from importlib import metadata

    h = hashlib.sha256(f"digest {__version__}\0".encode())
    for name in RENDER_LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "?"
        h.update(f"{name} {version}\0".encode())
    here = Path(__file__).resolve().parent
    for module in _RENDER_MODULES:
        try:
            h.update((here / module).read_bytes())
        except OSError:  # installed without sources: the version numbers above must do
            h.update(b"-")
        h.update(b"\0")
    return h.hexdigest()


def _jsonable(value: Any) -> str:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"cannot key a {type(value).__name__}")


def _draft_content(draft: Draft) -> bytes:
    # What compile_draft reads from a draft: its id (shown in the template context), subject,
    # intro and frozen items. Not its status or times, which change as it is approved and sent.
    content = [draft.id, draft.subject, draft.intro, [asdict(item) for item in draft.items]]
    return json.dumps(content, sort_keys=True, ensure_ascii=False, default=_jsonable).encode("utf-8", "surrogatepass")


def _hash_folder(h: Any, folder: Path) -> None:
    """Every file under ``folder`` (but hidden folders such as ``.git``), by relative path."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            data = path.read_bytes()
            h.update(f"{path.relative_to(folder).as_posix()}\0{len(data)}\0".encode("utf-8", "surrogateescape"))
            h.update(data)


def render_key(draft: Draft, newsletter: Newsletter, templates_dir: str | os.PathLike[str] | None) -> str | None:
    """A key for ``draft`` compiled with these settings and templates, as it would be now.

    ``templates_dir`` is the operator's override folder (looked in before the bundled
    templates). ``None`` when no key can be made (the folder is missing or a file in it
    cannot be read): the draft is then compiled, which reports the problem as before.
    """
    h = hashlib.sha256(b"digest compiled draft 1\0")
    h.update(_software().encode())
    h.update(_draft_content(draft))
    h.update(b"\0")
    h.update(json.dumps(newsletter.model_dump(mode="json"), sort_keys=True).encode())
    folders = [bundled_templates_dir()]
    if templates_dir:
        override = Path(templates_dir).expanduser().resolve()
        if not override.is_dir():
            return None
        folders.insert(0, override)
    try:
        for n, folder in enumerate(folders):
            h.update(f"\0templates {n} {len(folders)}\0".encode())
            _hash_folder(h, folder)
    except OSError:
        return None
    return h.hexdigest()
