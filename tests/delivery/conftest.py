"""Fixtures for the delivery tests: message factory, settings, the fake provider server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from digest.config import Delivery
from digest.types import OutgoingMessage
from tests.fakes.provider_server import FakeProviderServer

DATA = Path(__file__).resolve().parents[1] / "data" / "postmark"
TOKEN = "test-server-token"

MessageFactory = Callable[..., OutgoingMessage]


def load_payload(name: str) -> Any:
    """A saved Postmark payload from tests/data/postmark."""
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def payload_bytes(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.fixture
def make_message() -> MessageFactory:
    """Build an OutgoingMessage; keyword arguments override the defaults."""

    def make(ledger_id: int = 1, **overrides: Any) -> OutgoingMessage:
        token = f"tok{ledger_id:04d}"
        fields: dict[str, Any] = {
            "ledger_id": ledger_id,
            "draft_id": 7,
            "to_email": f"reader{ledger_id}@example.com",
            "to_name": f"Reader {ledger_id}",
            "from_addr": "Field Notes <digest@news.example.org>",
            "subject": "Field Notes Digest: The slow build",
            "html": f"<html><body><p>Hello reader {ledger_id}</p>"
            f'<a href="https://news.example.org/u/{token}">Unsubscribe</a></body></html>',
            "text": f"Hello reader {ledger_id}\n\n"
            f"Unsubscribe: https://news.example.org/u/{token}\n",
            "headers": (
                ("List-Unsubscribe", f"<https://news.example.org/u/{token}>"),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ),
        }
        fields.update(overrides)
        return OutgoingMessage(**fields)

    return make


@pytest.fixture
def postmark_settings() -> Delivery:
    return Delivery(provider="postmark", api_key=TOKEN, base_url="https://pm.test", timeout=5)


@pytest.fixture
def fake_provider() -> Iterator[FakeProviderServer]:
    """A running fake provider server that accepts ``TOKEN``."""
    with FakeProviderServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """The SMTP servers (aiosmtpd controllers) a test starts; each is stopped after it."""
    started: list[Any] = []
    yield started
    for controller in started:
        controller.stop()
