"""The base class every source implements.

A source is built from its validated config block. ``collect()`` (implemented here) calls
``fetch()`` then ``parse()`` and turns every failure into an error *value* on the
:class:`CollectResult`, so one broken source never stops a run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any, ClassVar

import requests
from pydantic import BaseModel, ConfigDict

from digest.errors import DigestError
from digest.types import CollectResult, SourceCursor


class SourceConfig(BaseModel):
    """Keys every source block has. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: str


class Source(ABC):
    """One place essays and/or comments come from."""

    type_name: ClassVar[str]
    config_model: ClassVar[type[SourceConfig]] = SourceConfig

    def __init__(self, config: SourceConfig, session: requests.Session | None = None) -> None:
        self.config = config
        self.name = config.name
        self.session = session

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
