"""Source type name → class, loaded lazily. Adding a source is one line here."""

from __future__ import annotations

import importlib
from typing import Any

import requests

from digest.sources.base import CommentSource, CommentSourceConfig, Source, SourceConfig

SOURCES: dict[str, str] = {
    "folder": "digest.sources.folder:FolderSource",
    "feed": "digest.sources.feed:FeedSource",
    "wordpress": "digest.sources.wordpress:WordPressSource",
    "substack": "digest.sources.substack:SubstackSource",
    "feed_comments": "digest.sources.feed_comments:FeedCommentsSource",
    "discourse": "digest.sources.discourse:DiscourseSource",
    "reddit": "digest.sources.reddit:RedditSource",
    "hackernews": "digest.sources.hackernews:HackerNewsSource",
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


def comment_blocks(block: dict[str, Any]) -> list[dict[str, Any]]:
    """An essay source's ``comments:`` entries, each with its default name filled in.

    A ``feed`` source also gets an implicit ``feed_comments`` entry named ``<name>:comments``
    (reading each item's wfw:commentRss comment feed) unless it sets ``comment_feeds: false``
    or lists a ``feed_comments`` entry of its own, whose settings then win.
    """
    raw = block.get("comments") or []
    entries = [raw] if isinstance(raw, dict) else list(raw)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"comments[{i}]: must be a mapping with a type")
        default = f"{block.get('name')}:{entry.get('type')}" + (f"{i + 1}" if len(entries) > 1 else "")
        out.append({**entry, "name": entry.get("name") or default})
    # pydantic reads a config boolean ("no", "false", 0 ...); read it the same way here. A
    # value that is no boolean counts as true: the feed block's own validation reports it.
    from pydantic import TypeAdapter, ValidationError

    try:
        comment_feeds = TypeAdapter(bool).validate_python(block.get("comment_feeds", True))
    except ValidationError:
        comment_feeds = True
    if (
        block.get("type") == "feed"
        and comment_feeds
        and not any(entry.get("type") == "feed_comments" for entry in out)
    ):
        # On by default: a comment feed needs no account or key, WordPress (and Blogger, among
        # others) links one from every item, and items without one cost no request.
        name = f"{block.get('name')}:comments"
        if any(entry["name"] == name for entry in out):  # an explicit entry took the name
            name = f"{block.get('name')}:feed_comments"
        out.append({"type": "feed_comments", "name": name})
    return out


def validate_source_block(block: dict[str, Any]) -> SourceConfig:
    """Validate one ``sources:`` entry, and its ``comments:`` entries, with their types' models."""
    if "type" not in block:
        raise ValueError("type: required key is missing")
    if "name" not in block:
        raise ValueError("name: required key is missing")
    cls = source_class(str(block["type"]))
    if issubclass(cls, CommentSource):
        raise ValueError(f"type {block['type']!r} provides comments only: put it under an essay "
                         "source's comments: key")
    config = cls.config_model.model_validate(block)
    for i, entry in enumerate(comment_blocks(block)):
        if "type" not in entry or not entry["type"]:
            raise ValueError(f"comments[{i}].type: required key is missing")
        comment_cls = source_class(str(entry["type"]))
        if not issubclass(comment_cls, CommentSource):
            raise ValueError(f"comments[{i}]: type {entry['type']!r} is not a comment source")
        try:
            comment_cls.config_model.model_validate(entry)
        except Exception as exc:
            raise ValueError(f"comments[{i}]: {_first_error(exc)}") from exc
    return config


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return str(exc)


def build_source(block: dict[str, Any], session: requests.Session | None = None) -> Source:
    """Instantiate the source for a validated block."""
    config = validate_source_block(block)
    return source_class(config.type)(config, session)


def build_comment_sources(block: dict[str, Any], session: requests.Session | None = None) -> list[CommentSource]:
    """The comment sources attached to an essay source block."""
    out: list[CommentSource] = []
    for entry in comment_blocks(block):
        cls = source_class(str(entry["type"]))
        assert issubclass(cls, CommentSource)
        config = cls.config_model.model_validate(entry)
        assert isinstance(config, CommentSourceConfig)
        out.append(cls(config, session))
    return out
