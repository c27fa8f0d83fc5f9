"""Source type name → class, loaded lazily. Adding a source is one line here."""

from __future__ import annotations

import importlib
from typing import Any

import requests

from digest.sources.base import Source, SourceConfig

SOURCES: dict[str, str] = {
    "folder": "digest.sources.folder:FolderSource",
    "feed": "digest.sources.feed:FeedSource",
}


def source_class(type_name: str) -> type[Source]:
    """The class for ``type_name``; ``ValueError`` naming the known types otherwise."""
    try:
        target = SOURCES[type_name]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise ValueError(f"unknown source type {type_name!r} (known: {known})") from None
    module, _, attr = target.partition(":")
    cls: type[Source] = getattr(importlib.import_module(module), attr)
    return cls


def validate_source_block(block: dict[str, Any]) -> SourceConfig:
    """Validate one ``sources:`` entry with its type's own model."""
    if "type" not in block:
        raise ValueError("type: required key is missing")
    if "name" not in block:
        raise ValueError("name: required key is missing")
    return source_class(str(block["type"])).config_model.model_validate(block)


def build_source(block: dict[str, Any], session: requests.Session | None = None) -> Source:
    """Instantiate the source for a validated block."""
    config = validate_source_block(block)
    return source_class(config.type)(config, session)
