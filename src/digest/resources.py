"""Files shipped with digest: the default templates and the example config.

In a wheel they live inside the package (``digest/templates``, ``digest/config.example.yaml``,
put there by pyproject's force-include); in a source checkout they sit at the repository root.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE.parent.parent


def path(name: str) -> Path:
    """The shipped file or folder ``name`` (e.g. ``templates``)."""
    inside = _PACKAGE / name
    if inside.exists():
        return inside
    return _REPO_ROOT / name


def read_text(name: str) -> str:
    return path(name).read_text(encoding="utf-8")
