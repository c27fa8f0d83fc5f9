"""ResendProvider's template path: the same request as the full-body path, built faster.

The sender hands Resend a template and per-recipient values. The request must stay exactly
what :meth:`ResendProvider.build_request` gives for the expanded messages: the same body byte
for byte and the same Idempotency-Key, because a batch resent after a crash must be a replay
(same key, same body) or Resend refuses it as a conflict.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from digest.config import Delivery
from digest.delivery.providers.base import (
    PreparedCall,
    UncertainDeliveryError,
    expand_template,
    json_escape,
)
from digest.delivery.providers.resend import ResendProvider, _escape_values
from digest.types import TemplateMessage, TemplateRecipient
from tests.delivery.test_provider_contract import make_recipient, make_template
from tests.fakes.provider_server import FakeProviderServer, install_resend

KEY = "re_test_key"

HOSTILE_NAMES = [
    'Zoë "Q" O\'Brien',
    "back\\slash \\\" and \\\\ twice",
    "<script>alert('x')</script> & co",
    "李雷 🦉 Ünïcode",
    "tab\there",
    "\u2028line\u2029separators",
]


def provider(base_url: str = "https://rs.test") -> ResendProvider:
    return ResendProvider(Delivery(provider="resend", api_key=KEY, base_url=base_url))


def hostile_template(**overrides: Any) -> TemplateMessage:
    comment = 'He said "<b>no</b>" \\ then \u00e9\u2014\U0001f989, \x00 and \x0c\r\n\tend'
    template = make_template(comment=comment, subject='Digest: "quotes" \\ é')
    fields: dict[str, Any] = {"reply_to": "Editors <editors@news.example.org>", **overrides}
    return dataclasses.replace(template, **fields)


def hostile_recipients() -> list[TemplateRecipient]:
    recipients = [make_recipient(10 + i, name=name) for i, name in enumerate(HOSTILE_NAMES)]
    recipients.insert(2, make_recipient(99, email="not an address"))  # refused by both paths
    # More headers: one with an injection attempt (cleaned), and one repeated (the full-body
    # path keeps its first place and its last value).
    first = recipients[0]
    recipients[0] = first._replace(headers=(*first.headers, ("X-Digest-Ledger-Id", "9"),
                                            ("X-Campaign", "a\r\nBcc: evil@example.com"),
                                            ("X-Digest-Ledger-Id", "10")))
    return recipients


def both(template: TemplateMessage, recipients: Sequence[TemplateRecipient]
         ) -> tuple[PreparedCall, PreparedCall]:
    p = provider()
    p.installation = "inst"  # both paths put it in the key
    fast = p.build_template_request(template, recipients)
    plain = p.build_request([expand_template(template, r) for r in recipients])
    return fast, plain


def test_resend_takes_templates_but_does_not_personalize_server_side() -> None:
    assert ResendProvider.accepts_templates is True
    assert ResendProvider.personalizes is False


def test_template_body_and_key_equal_the_full_body_path() -> None:
    template, recipients = hostile_template(), hostile_recipients()
    fast, plain = both(template, recipients)
    assert json.loads(fast.body) == json.loads(plain.body)
    assert fast.body == plain.body  # byte for byte: a resend by either path is a replay
    assert fast.headers == plain.headers
    assert fast.headers["Idempotency-Key"].startswith("digest/inst/")
    assert plain.headers["Idempotency-Key"] == fast.headers["Idempotency-Key"]
    assert [m.ledger_id for m in fast.messages] == [m.ledger_id for m in plain.messages]
    assert fast.refused == plain.refused and [r.ledger_id for r in fast.refused] == [99]
    items = json.loads(fast.body)
    assert [item["to"][0].split(" <")[-1] for item in items] == [
        r.to_email + ">" for r in recipients if r.ledger_id != 99
    ]
    assert html.escape(HOSTILE_NAMES[0]) in items[0]["html"] and HOSTILE_NAMES[0] in items[0]["text"]
    assert list(items[0]["headers"].items())[2:] == [
        ("X-Digest-Ledger-Id", "10"),
        ("X-Campaign", "a Bcc: evil@example.com"),
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {"reply_to": None},
        # Empty static parts: a body that comes out empty is left out, as in the full path.
        {"html_parts": ("", ""), "html_slots": ("preferences_url",)},
        {"text_parts": ("",), "text_slots": ()},
        {"text_parts": ("", "", ""), "text_slots": ("name", "name")},
    ],
    ids=["no-reply-to", "html-only-a-slot", "no-text", "text-only-slots"],
)
def test_template_body_equals_the_full_body_path_for_edge_templates(overrides: dict[str, Any]) -> None:
    template = hostile_template(**overrides)
    recipients = [make_recipient(1), make_recipient(2, name=HOSTILE_NAMES[1])]
    # One recipient whose values are all empty, so a template without static text is empty.
    recipients.append(recipients[0]._replace(ledger_id=3, html_values=("", "", ""),
                                             text_values=("", "", ""), headers=()))
    fast, plain = both(template, recipients)
    assert fast.body == plain.body and fast.headers == plain.headers


def test_the_same_batch_built_twice_has_the_same_key_and_body() -> None:
    template = hostile_template()
    first = provider().build_template_request(template, hostile_recipients())
    # Another process after a crash: a new provider, a new (equal) template, rebuilt recipients.
    again = provider().build_template_request(hostile_template(), hostile_recipients())
    assert first.body == again.body and first.headers == again.headers
    # And from the draft's cached skeleton, on the same provider.
    p = provider()
    assert p.build_template_request(template, hostile_recipients()).body == first.body
    assert p.build_template_request(template, hostile_recipients()).body == first.body
    # The key names the batch, not its order; another batch has another key.
    reordered = provider().build_template_request(template, hostile_recipients()[::-1])
    assert reordered.headers["Idempotency-Key"] == first.headers["Idempotency-Key"]
    other = provider().build_template_request(template, hostile_recipients()[:-1])
    assert other.headers["Idempotency-Key"] != first.headers["Idempotency-Key"]


@pytest.mark.parametrize(
    "values",
    [
        ("Reader 1", "https://news.example.org/u/tok", "https://news.example.org/p/tok"),
        ("Zoë 🦉 李雷", "a", ""),
        ('say "hi"', "x", "y"),
        ("back\\slash", "x", "y"),
        ("x", "ctl\x01\x7f\x0c\x1f", "y"),
        ("\u2028\u2029\u00ad", "x", "y"),
        ("lone \ud800 surrogate", "x", "y"),
    ],
)
def test_escape_values_equals_json_escape(values: tuple[str, ...]) -> None:
    assert _escape_values(values) == [json_escape(v) for v in values]


def test_a_recipient_without_a_value_per_slot_is_refused() -> None:
    good, bad = make_recipient(1), make_recipient(2)._replace(html_values=("x",))
    call = provider().build_template_request(make_template(), [good, bad])
    assert [m.ledger_id for m in call.messages] == [1]
    assert [(r.ledger_id, r.status) for r in call.refused] == [(2, "invalid")]


# -- against the fake -----------------------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=KEY) as server:
        install_resend(server)
        yield server


def test_send_template_batch_delivers_the_expanded_messages(srv: FakeProviderServer) -> None:
    template, recipients = hostile_template(), hostile_recipients()
    results = provider(srv.url).send_template_batch(template, recipients)
    assert [(r.ledger_id, r.status) for r in results] == [
        (r.ledger_id, "invalid" if r.ledger_id == 99 else "sent") for r in recipients
    ]
    assert len(srv.requests) == 1
    by_ledger = {m["tags"]["ledger_id"]: m for m in srv.messages}
    for r in recipients:
        if r.ledger_id == 99:
            continue
        got, want = by_ledger[str(r.ledger_id)], expand_template(template, r)
        assert (got["html"], got["text"]) == (want.html, want.text)
        assert got["headers"]["List-Unsubscribe"] == dict(r.headers)["List-Unsubscribe"]


def test_an_uncertain_template_batch_resent_by_either_path_is_a_replay(srv: FakeProviderServer) -> None:
    template, recipients = hostile_template(), hostile_recipients()[:3]
    srv.faults.append(("reset", "after"))  # Resend took the batch, the answer was lost
    with pytest.raises(UncertainDeliveryError):
        provider(srv.url).send_template_batch(template, recipients)
    accepted = list(srv.ledger_ids)
    again = provider(srv.url).send_template_batch(hostile_template(), hostile_recipients()[:3])
    assert [r.status for r in again] == ["sent", "sent", "invalid"]
    full = provider(srv.url).send_batch([expand_template(template, r) for r in recipients])
    assert [r.status for r in full] == ["sent", "sent", "invalid"]
    assert srv.ledger_ids == accepted == [10, 11]  # nothing sent twice, no 409 conflict
    assert len({r.headers["idempotency-key"] for r in srv.requests}) == 1


def test_batch_limit_is_enforced() -> None:
    recipients = [make_recipient(i) for i in range(1, ResendProvider.max_batch + 2)]
    with pytest.raises(ValueError, match="the limit is"):
        provider().send_template_batch(make_template(), recipients)
    assert provider().send_template_batch(make_template(), []) == []
