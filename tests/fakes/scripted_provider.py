"""A provider that records what it is given and fails on a script: a fake, not a mock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from digest.config import Delivery
from digest.delivery.providers.base import Provider
from digest.types import OutgoingMessage, SendResult

Step = Callable[[Sequence[OutgoingMessage]], list[SendResult] | None]


class ScriptedProvider(Provider):
    """Each call pops the next step of ``script`` (an exception to raise, or a function that
    may return results); with no step left, every message is accepted."""

    name: ClassVar[str] = "scripted"
    max_batch: ClassVar[int] = 2

    def __init__(self, script: list[BaseException | Step] | None = None) -> None:
        super().__init__(Delivery())
        self.script = list(script or [])
        self.calls: list[list[OutgoingMessage]] = []
        self.delivered: list[OutgoingMessage] = []

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls.append(list(messages))
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            results = step(messages)
            if results is not None:
                self.delivered.extend(m for m, r in zip(messages, results, strict=True) if r.status == "sent")
                return results
        self.delivered.extend(messages)
        return [SendResult(m.ledger_id, "sent", f"id-{m.ledger_id}") for m in messages]

    def check(self) -> str:
        return "scripted"
