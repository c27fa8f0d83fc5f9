"""Every provider's events name the bare address, however the provider echoes the To.

Our messages go to ``"Reader Name <address>"``, and providers report the recipient as they were
given it; an event for ``"Ada Quill <ada@example.com>"`` must suppress ``ada@example.com``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from digest.web.webhooks import address, handler

DATA = Path(__file__).resolve().parent.parent / "data" / "webhooks"


def _ses_named(raw: bytes, bare: str, named: str) -> bytes:
    envelope = json.loads(raw)
    message = json.loads(envelope["Message"])
    message["mail"]["destination"] = [named if d == bare else d for d in message["mail"]["destination"]]
    envelope["Message"] = json.dumps(message)
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(("provider", "fixture", "bare", "event_type"), [
    ("resend", "bounced.json", "ada@example.com", "hard_bounce"),
    ("resend", "complained.json", "ben@example.org", "complaint"),
    ("sendgrid", "hard_bounce.json", "ada@example.com", "hard_bounce"),
    ("mailgun", "failed_permanent.json", "ada@example.com", "hard_bounce"),
    ("postmark", "subscription_change.json", "chloe@example.net", "unsubscribe"),
    ("ses", "subscription_unsubscribe.json", "chloe@example.net", "unsubscribe"),
])
def test_a_named_recipient_is_reported_as_its_address(provider: str, fixture: str, bare: str,
                                                      event_type: str) -> None:
    raw = (DATA / provider / fixture).read_bytes()
    named = f"Reader Q. Name <{bare.upper()}>"
    if provider == "ses":
        changed = _ses_named(raw, bare, named)
    else:
        changed = raw.replace(f'"{bare}"'.encode(), json.dumps(named).encode())
    assert changed != raw
    (before,) = [e for e in handler(provider).parse(raw) if e.event_type == event_type]
    (after,) = [e for e in handler(provider).parse(changed) if e.event_type == event_type]
    assert before.email == after.email == bare


def test_address_takes_the_address_out_of_a_mailbox() -> None:
    assert address('"Quill, Ada" <Ada@Example.com>') == "ada@example.com"
    assert address("  ben@example.org ") == "ben@example.org"
    assert address(None) == address(42) == address("") == ""
