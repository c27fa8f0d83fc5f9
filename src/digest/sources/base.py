"""The base class every source implements.

A source is built from its validated config block. ``collect()`` (implemented here) calls
``fetch()`` then ``parse()`` and turns every failure into an error *value* on the
:class:`CollectResult`, so one broken source never stops a run.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator

from digest.errors import DigestError
from digest.http import build_session
from digest.types import CollectResult, Comment, Essay, SourceCursor


def http_base_url(value: str) -> str:
    """A configured http(s) base URL without its trailing slash; ``ValueError`` otherwise."""
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
    return value


def normalize_url(url: str) -> str:
    """A URL as a link compares: no scheme, no ``www.``, no fragment, no trailing slash."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: compare the rest
        port = None
    netloc = f"{host}:{port}" if port and port not in (80, 443) else host
    return netloc + parts.path.rstrip("/") + (f"?{parts.query}" if parts.query else "")


def positive_id(value: Any) -> int | None:
    """A JSON id as a positive int (APIs send numbers or digit strings), else ``None``.
    ``True`` is an int to Python, but never an id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value) or None
    return None


class SourceConfig(BaseModel):
    """Keys every source block has. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: str
    # Comment sources to attach to this source's essays (one mapping or a list of them).
    comments: tuple[dict[str, Any], ...] = ()

    @field_validator("comments", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value


class Source(ABC):
    """One place essays and/or comments come from."""

    type_name: ClassVar[str]
    config_model: ClassVar[type[SourceConfig]] = SourceConfig

    def __init__(self, config: SourceConfig, session: requests.Session | None = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.name = config.name
        self.session = session
        self.sleep = sleep  # the retry back-off's sleep; tests pass a recorder

    @contextmanager
    def http_session(self) -> Iterator[requests.Session]:
        """The shared session when the run gave one, else a fresh one closed afterwards."""
        if self.session is not None:
            yield self.session
            return
        session = build_session()
        try:
            yield session
        finally:
            session.close()

    @abstractmethod
    def fetch(self, cursor: SourceCursor, now: datetime) -> Any:
        """Do the network (or disk) reads; return raw data for :meth:`parse`."""

    @abstractmethod
    def parse(self, raw: Any, now: datetime) -> CollectResult:
        """Turn raw data into essays and comments. Pure: no I/O."""

    def collect(self, cursor: SourceCursor, now: datetime) -> CollectResult:
        """Fetch and parse, returning errors as values."""
        try:
            raw = self.fetch(cursor, now)
            return self.parse(raw, now)
        except DigestError as exc:
            return CollectResult(source=self.name, cursor=cursor, error=str(exc))
        except Exception as exc:  # a bug or odd data in one source must not stop the run
            return CollectResult(source=self.name, cursor=cursor, error=f"{type(exc).__name__}: {exc}")


class SiteConfig(SourceConfig):
    """A site with a JSON API under its address: ``url`` (the site), ``base_url`` (the API
    root, default ``url`` + :attr:`api_path`) and ``timeout``."""

    api_path: ClassVar[str] = ""

    url: str
    base_url: str | None = None
    timeout: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_base_url(value)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return http_base_url(value) if value is not None else None

    @property
    def api_root(self) -> str:
        """The API root that endpoint paths are appended to."""
        return self.base_url or f"{self.url}{self.api_path}"


class CommentSourceConfig(SourceConfig):
    """Keys of a comment source block (under an essay source's ``comments:``).

    ``name`` defaults to ``<essay source>:<type>``; ``lookback_days`` bounds which essays get
    their comments refreshed (older discussions rarely change and cost requests);
    ``max_essays`` caps the essays fetched per run.
    """

    name: str = ""
    lookback_days: float = Field(30, gt=0)
    max_essays: int = Field(30, ge=1)


class CommentSource(Source):
    """Comments for essays that another source collected (Discourse, Reddit, Hacker News ...).

    Implement :meth:`fetch_for` (network) and :meth:`parse_for` (pure) for one essay;
    :meth:`collect_for` (here) runs them over every essay and turns each essay's failure into
    a warning, so one unreachable thread never hides the others.
    """

    config_model: ClassVar[type[SourceConfig]] = CommentSourceConfig
    config: CommentSourceConfig

    def fetch(self, cursor: SourceCursor, now: datetime) -> Any:  # pragma: no cover - not used
        raise NotImplementedError("comment sources collect per essay: use collect_for()")

    def parse(self, raw: Any, now: datetime) -> CollectResult:  # pragma: no cover - not used
        raise NotImplementedError("comment sources collect per essay: use collect_for()")

    @abstractmethod
    def fetch_for(self, essay: Essay, now: datetime) -> Any:
        """Do the network reads for one essay's discussion; return raw data for :meth:`parse_for`."""

    @abstractmethod
    def parse_for(self, essay: Essay, raw: Any, now: datetime) -> list[Comment]:
        """Turn raw data into the essay's comments (their ``essay_key`` is set by the caller). Pure."""

    def collect_for(self, essays: Sequence[Essay], now: datetime) -> CollectResult:
        """Comments for each essay; per-essay failures become warnings, not a stopped run."""
        comments: list[Comment] = []
        covered: list[tuple[str, str]] = []
        warnings: list[str] = []
        for essay in essays:
            try:
                found = self.parse_for(essay, self.fetch_for(essay, now), now)
            except DigestError as exc:
                warnings.append(f"{essay.url}: {exc}")
                continue
            except Exception as exc:  # odd data for one essay must not stop the others
                warnings.append(f"{essay.url}: {type(exc).__name__}: {exc}")
                continue
            comments.extend(replace(c, source=self.name, essay_source=essay.source, essay_key=essay.key)
                            for c in found)
            covered.append((essay.source, essay.key))
        if warnings and not covered and essays:
            return CollectResult(source=self.name, error=_summarize(warnings))
        return CollectResult(source=self.name, comments=tuple(comments), covered=tuple(covered),
                             warnings=tuple(warnings))


def _summarize(messages: Sequence[str], limit: int = 3) -> str:
    text = "; ".join(messages[:limit])
    return text + (f" (+{len(messages) - limit} more)" if len(messages) > limit else "")
