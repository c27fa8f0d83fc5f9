"""The C module ``digest._speedups`` writes what the Python builders write, byte for byte.

Each provider that personalizes server-side, and Postmark with full bodies, builds a batch two ways: from
:class:`~digest.delivery.readers.Readers` (plain readers through the C module, the others
through Python) and from a list of :class:`TemplateRecipient` (all through Python). The two
requests must be equal, over plain readers and every kind of reader the C code must leave alone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import pytest

from digest.config import Delivery
from digest.delivery import readers
from digest.delivery.providers.base import PreparedCall
from digest.delivery.providers.registry import build_provider
from digest.delivery.providers.sendgrid import SendGridProvider
from digest.delivery.readers import Readers, speedups_built, template_recipients
from digest.delivery.sender import plain_link_slots
from digest.render.fill import NAME_MAX
from digest.store.store import Claimed
from digest.tokens import LinkSigner, LinkUrls
from digest.types import SLOT_NAMES, TemplateMessage, TemplateRecipient

needs_speedups = pytest.mark.skipif(
    not speedups_built(), reason="digest._speedups is not built: `pip install -e .` with a C compiler builds it")

PUBLIC = "https://news.example.org"
LINKS = LinkSigner("a secret for the links").url_maker(f"{PUBLIC}/u/", f"{PUBLIC}/preferences/")


def test_ci_builds_the_speedups() -> None:
    """CI sets DIGEST_REQUIRE_SPEEDUPS: there the C path must be tested, never skipped."""
    if os.environ.get("DIGEST_REQUIRE_SPEEDUPS"):
        assert speedups_built()
    else:
        assert speedups_built() in (True, False)


@needs_speedups
@pytest.mark.parametrize("key_size", [0, 1, 32, 63, 64])
def test_hmac_is_hmac_sha256(key_size: int) -> None:
    from digest import _speedups  # type: ignore[attr-defined]

    rng = random.Random(key_size)
    key = rng.randbytes(key_size)
    for size in [*range(0, 140), 191, 192, 1000, 4096]:
        message = rng.randbytes(size)
        assert _speedups.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest(), size


@needs_speedups
def test_a_key_over_64_bytes_is_refused() -> None:
    from digest import _speedups  # type: ignore[attr-defined]

    with pytest.raises(ValueError, match="longer than 64"):
        _speedups.hmac_sha256(b"k" * 65, b"x")


# Readers the C code writes itself, and readers it must leave to Python (with why).
PLAIN = [
    (1, 1, "reader@example.org", "Ada Lovelace"),
    (2, 255, "A.B+tag-x_y@Sub.Example.ORG", "Jo_Ann-Smith 3"),
    (3, 2**40, "x@y.z", ""),  # no name: the greeting's fallback, the bare address as To
    (4, 0, "reader4@example.org", "A" * NAME_MAX),
    (2**62, 7, "reader5@example.org", "Two  spaces"),
]
LEFT_TO_PYTHON = [
    (10, 10, "josé@example.org", "José"),  # not ASCII
    (11, 11, "r11@example.org", "José"),
    (12, 12, "r12@example.org", "O'Brien"),  # escaped in HTML
    (13, 13, "r13@example.org", "Smith, Jo"),  # quoted in To
    (14, 14, "r14@example.org", "Dr. Who"),  # "." is an RFC 5322 special
    (15, 15, "r15@example.org", " Leading"),
    (16, 16, "r16@example.org", "Trailing "),
    (17, 17, "r17@example.org", "A" * (NAME_MAX + 1)),  # cut for the greeting
    (18, 18, "r18@example.org", "%recipient.x%"),  # Mailgun's syntax
    (19, 19, "r19@example.org", "{{x}}"),  # Mustachio's
    (20, 20, "r20@example.org", "<b>bold</b>"),
    (21, 21, "r21@example.org", 'Say "hi"'),
    (22, 22, "r22@example.org", "Tab\tName"),
    (23, 23, "r23@example.org", "Line\nBreak"),
    (24, 24, "r24@example.org", "back\\slash"),
    (25, 25, "two@@example.org", "Two Ats"),
    (26, 26, "no-at.example.org", "No At"),
    (27, 27, "@example.org", "Empty Local"),
    (28, 28, "local@", "Empty Domain"),
    (29, 29, "r29@example.org\r\nBcc: x@evil.example", "Injected"),
    (30, 30, "r30 @example.org", "Space In Address"),
    (31, 31, "\"q\"@example.org", "Quoted Local"),
    (32, 32, "r32@exämple.org", "IDN Domain"),
    (2**63, 33, "r33@example.org", "Huge Ledger Id"),
    (34, 2**64, "r34@example.org", "Huge Subscriber Id"),
    (35, 35, "r35@example.org", "\u2028Separator"),
    (36, 36, "r36@example.org", "Zero\u200bWidth"),
    (37, 37, "r37@example.org", "ａｂ"),
]


def _claimed(rows: Sequence[tuple[int, int, str, str]]) -> list[Claimed]:
    return [Claimed(*row) for row in rows]


@needs_speedups
def test_fill_writes_plain_readers_and_leaves_the_others() -> None:
    rows = _claimed(PLAIN + LEFT_TO_PYTHON)
    program = (readers.LEDGER, b"|", readers.EMAIL, b"|", readers.NAME, b"|", readers.RAW_NAME, b"|",
               readers.TO, b"|", readers.UNSUBSCRIBE, b"|", readers.PREFERENCES,
               (b"[", readers.RAW_NAME, b"]"))
    filled = Readers(rows, LINKS).fill(program)
    assert filled is not None
    (pieces,) = filled
    for row, piece in zip(rows, pieces):
        if row in _claimed(LEFT_TO_PYTHON):
            assert piece is None, row
            continue
        ledger_id, subscriber_id, email, name = row
        unsubscribe, preferences = LINKS(subscriber_id, email)
        to = f"{name} <{email}>" if name else email
        expected = (f"{ledger_id}|{email}|{name or 'reader'}|{name}|{to}|{unsubscribe}|{preferences}"
                    + (f"[{name}]" if name else ""))
        assert piece == expected.encode(), row


@needs_speedups
def test_fill_checks_its_program() -> None:
    rows = _claimed(PLAIN)
    for bad in [("text",), (99,), (-1,), ((b"x", 99, b"y"),), ((b"x", readers.NAME),), (2**70,)]:
        with pytest.raises((ValueError, OverflowError)):
            Readers(rows, LINKS).fill(bad)  # type: ignore[arg-type]


@needs_speedups
def test_links_signed_in_c_verify_in_python() -> None:
    signer = LinkSigner("a secret for the links")
    rows = _claimed(PLAIN)
    filled = Readers(rows, LINKS).fill((readers.UNSUBSCRIBE,))
    assert filled is not None
    for row, url in zip(rows, filled[0]):
        assert url is not None
        token = url.decode().rsplit("/", 1)[1]
        assert signer.check(token, row.subscriber_id, row.email)


def test_without_the_module_fill_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_speedups", None)
    assert Readers(_claimed(PLAIN), LINKS).fill((readers.LEDGER,)) is None


@needs_speedups
@pytest.mark.parametrize("public", ["https://news.example.org/a&b", 'https://news.example.org/"q"',
                                    "https://news.example.org/%recipient.x%", "https://news.example.org/caf\u00e9",
                                    "https://news.example.org/{{x}}", "https://news.example.org/a b",
                                    "ftp://news.example.org"])
def test_a_public_url_that_escaping_changes_takes_the_python_path(public: str) -> None:
    links = LinkSigner("a secret for the links").url_maker(f"{public}/u/", f"{public}/preferences/")
    assert Readers(_claimed(PLAIN), links).fill((readers.LEDGER,)) is None
    assert Readers(_claimed(PLAIN), LINKS).fill((readers.LEDGER,)) is not None


def test_links_of_another_kind_take_the_python_path() -> None:
    def links(subscriber_id: int, email: str) -> tuple[str, str]:
        return f"{PUBLIC}/u/{subscriber_id}", f"{PUBLIC}/preferences/{subscriber_id}"

    assert Readers(_claimed(PLAIN), links).fill((readers.LEDGER,)) is None


# -- every server-side provider: the same request both ways ---------------------------------


# The providers that build their requests both ways: those that personalize server-side, and
# Postmark with full bodies (its ``/email/batch`` with each message's bodies spliced).
PROVIDERS = ["postmark-templates", "sendgrid", "mailgun", "postmark"]


@pytest.mark.parametrize(("names", "expected"), [
    ([], []),
    (["", "Ada", "Jo_Ann-Smith 3"], []),
    (["O'Brien", "Ada", "José", "Dr. Who"], [0, 2, 3]),
    (["Ada", "a.b.c.d", "", "x%"], [1, 3]),  # several odd characters in one name: once
    (["Ada", "", "", "."], [3]),
])
def test_odd_names(names: list[str], expected: list[int]) -> None:
    assert readers.odd_names(names) == expected


def test_a_name_that_passes_the_scan_has_the_same_html_and_text_values() -> None:
    """What SendGrid and Mailgun rely on to decide a batch's keys from the odd readers alone:
    every other reader (plain, or left to Python for its address, its ids, or spaces the C code
    does not trim) has the same values for both parts, with nothing to escape in them."""
    batch = Readers(_claimed(PLAIN + LEFT_TO_PYTHON), LINKS)
    odd = batch.odd()
    assert sorted(odd) == [index for index, row in enumerate(PLAIN + LEFT_TO_PYTHON)
                           if any(not (c.isascii() and (c.isalnum() or c in " _-")) for c in row[3])]
    assert odd == {index: batch.recipient(index) for index in odd}
    for index, r in enumerate(template_recipients(batch.rows, LINKS)):
        if index not in odd:
            assert r.html_values == r.text_values, r
            assert not any(c in value for value in r.text_values for c in "%&<>\"'{}"), r


def _template(comment: str = "A {{fine}} essay at 100%recipient.x% -d1234-name-") -> TemplateMessage:
    from html import escape

    return TemplateMessage(
        draft_id=7, from_addr="Field Notes <digest@news.example.org>", subject="Field Notes: {{a}} 50%",
        html_parts=("<p>Hello ", f",</p><p>{escape(comment)}</p><a href=\"", '">Unsubscribe</a> <a href="',
                    '">Preferences</a>'),
        html_slots=("name", "unsubscribe_url", "preferences_url"),
        text_parts=("Hello ", f",\n\n{comment}\n\nUnsubscribe: ", "\nPreferences: ", "\n"),
        text_slots=("name", "unsubscribe_url", "preferences_url"),
        reply_to="Editor <editor@news.example.org>", tag="digest-7",
        plain_slots=plain_link_slots(PUBLIC),
    )


def _settings(provider: str) -> Delivery:
    extra: dict[str, object] = {"domain": "mg.example.org"} if provider == "mailgun" else {}
    if provider == "postmark-templates":
        provider, extra = "postmark", {"postmark_templates": True}
    return Delivery(provider=provider, api_key="key", base_url="http://127.0.0.1:9", **extra)  # type: ignore[arg-type]


Built = tuple[PreparedCall, tuple[object, ...]]


def _build(provider_name: str) -> Callable[[TemplateMessage, Sequence[object]], Built]:
    provider = build_provider(_settings(provider_name))
    if provider_name == "postmark-templates":
        def postmark(template: TemplateMessage, recipients: Sequence[object]) -> tuple[PreparedCall, tuple[int, ...]]:
            call, carried = provider._call(template, recipients)  # type: ignore[attr-defined]
            return call, tuple(r.ledger_id for r in carried)
        return postmark
    if provider_name == "postmark":
        def full_bodies(template: TemplateMessage, recipients: Sequence[object]) -> Built:
            call = provider.build_template_request(template, recipients)  # type: ignore[attr-defined]
            return call, tuple((m.ledger_id, m.to_email, m.to_name) for m in call.messages)
        return full_bodies
    if provider_name == "sendgrid":
        def sendgrid(template: TemplateMessage, recipients: Sequence[object]) -> tuple[PreparedCall, tuple[int, ...]]:
            return provider.build_template_request(template, recipients, nonce="0123456789abcdef")  # type: ignore[attr-defined,no-any-return]
        return sendgrid
    return provider.build_template_request  # type: ignore[attr-defined,no-any-return]


def _body(call: PreparedCall) -> bytes:
    body = call.body if isinstance(call.body, bytes) else b"".join(call.body)  # type: ignore[arg-type]
    if b"--digest-" in body[:20]:  # a multipart body: its boundary is random
        boundary = body[2:body.index(b"\r\n")]
        body = body.replace(boundary, b"BOUNDARY")
    return body


@needs_speedups
@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("mix", ["plain", "left to python", "mixed"])
def test_the_request_is_the_same_both_ways(provider_name: str, mix: str) -> None:
    rng = random.Random(mix)
    rows = {"plain": PLAIN * 3, "left to python": LEFT_TO_PYTHON, "mixed": PLAIN + LEFT_TO_PYTHON + PLAIN}[mix]
    # Every ledger id and address once, in a shuffled order.
    rows = [(index + 1, subscriber, email if index < len(PLAIN) or "@" not in email else f"{index}.{email}", name)
            for index, (_ledger, subscriber, email, name) in enumerate(rng.sample(rows, len(rows)))]
    claimed = _claimed(rows)
    build = _build(provider_name)
    template = _template()
    fast_call, fast_ids = build(template, Readers(claimed, LINKS))
    slow_call, slow_ids = build(template, template_recipients(claimed, LINKS))
    assert _body(fast_call) == _body(slow_call)
    assert fast_ids == slow_ids
    assert fast_call.refused == slow_call.refused
    assert fast_call.headers == slow_call.headers or provider_name == "mailgun"


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_without_the_module_readers_take_the_python_path(provider_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    claimed = _claimed(PLAIN + LEFT_TO_PYTHON)
    build = _build(provider_name)
    template = _template()
    slow_call, slow_ids = build(template, template_recipients(claimed, LINKS))
    monkeypatch.setattr(readers, "_speedups", None)
    call, ids = build(template, Readers(claimed, LINKS))
    assert _body(call) == _body(slow_call) and ids == slow_ids


@needs_speedups
@pytest.mark.parametrize("order", ["plain first", "python first"])
def test_postmark_full_bodies_with_large_shared_parts_are_the_same_both_ways(order: str) -> None:
    """Full bodies share parts long enough to be sent by reference: each plain reader is then
    several runs written in C, with those parts between them. The body is the full-body
    batch of each reader's own message, byte for byte, whichever path writes the first."""
    from digest.delivery.providers.base import expand_template

    long = "An essay paragraph with {{braces}}, 100% & <tags>. " * 80  # ~4 KB once escaped
    base = _template(long)
    template = replace(base, html_parts=(base.html_parts[0] + long, *base.html_parts[1:3], base.html_parts[3] + long),
                       text_parts=(long + base.text_parts[0], *base.text_parts[1:]))
    rows = PLAIN + LEFT_TO_PYTHON[:6] + PLAIN if order == "plain first" else LEFT_TO_PYTHON[:6] + PLAIN
    claimed = _claimed([(index + 1, subscriber, f"{index}.{email}", name)
                        for index, (_ledger, subscriber, email, name) in enumerate(rows)])
    provider = build_provider(_settings("postmark"))
    fast = provider.build_template_request(template, Readers(claimed, LINKS))  # type: ignore[attr-defined]
    recipients = template_recipients(claimed, LINKS)
    slow = provider.build_template_request(template, recipients)  # type: ignore[attr-defined]
    full = provider.build_request([expand_template(template, r) for r in recipients])  # type: ignore[attr-defined]
    assert fast.body == slow.body == full.body
    assert fast.messages == slow.messages
    assert len(provider._skeleton(template).larges) >= 3  # several runs a reader  # type: ignore[attr-defined]


def _random_parts(rng: random.Random, slots: int) -> tuple[str, ...]:
    """``slots + 1`` parts of a body: empty, short, or long enough to be sent by reference,
    holding what the escapings and Postmark's braces change (the whole body may be empty)."""
    pieces = ["", "<p>Hi ", '",\n\\ ', "{{x}} 100% & <b>", "caf\u00e9 \u2028"]
    return tuple("".join(rng.choice(pieces) for _ in range(rng.choice([0, 1, 3, 700]))) for _ in range(slots + 1))


@needs_speedups
@pytest.mark.parametrize("seed", range(16))
def test_postmark_full_bodies_random_templates_are_the_same_both_ways(seed: int) -> None:
    """Random templates (any slots, repeated or missing, parts of any size) and random mixes of
    readers: the C runs, the Python path and the full-body batch give the same body."""
    from digest.delivery.providers.base import expand_template

    rng = random.Random(seed)
    html_slots = tuple(rng.choice(SLOT_NAMES) for _ in range(rng.randint(0, 5)))
    text_slots = tuple(rng.choice(SLOT_NAMES) for _ in range(rng.randint(0, 4)))
    template = TemplateMessage(
        draft_id=seed + 1, from_addr="Field Notes <digest@news.example.org>", subject="Notes {{a}}",
        html_parts=_random_parts(rng, len(html_slots)), html_slots=html_slots,
        text_parts=_random_parts(rng, len(text_slots)), text_slots=text_slots,
        reply_to=rng.choice([None, "Editor <editor@news.example.org>"]), tag=rng.choice(["", "digest"]),
        plain_slots=plain_link_slots(PUBLIC))
    rows = [(index + 1, subscriber, f"{index}.{email}", name) for index, (_l, subscriber, email, name)
            in enumerate(rng.choice(PLAIN + LEFT_TO_PYTHON) for _ in range(rng.randint(1, 40)))]
    claimed = _claimed(rows)
    provider = build_provider(_settings("postmark"))
    fast = provider.build_template_request(template, Readers(claimed, LINKS))  # type: ignore[attr-defined]
    recipients = template_recipients(claimed, LINKS)
    slow = provider.build_template_request(template, recipients)  # type: ignore[attr-defined]
    assert fast.body == slow.body
    assert fast.messages == slow.messages and fast.refused == slow.refused
    carried = [r for r in recipients if r.ledger_id in {m.ledger_id for m in slow.messages}]
    assert slow.body == provider.build_request(  # type: ignore[attr-defined]
        [expand_template(template, r) for r in carried]).body


# -- Mailgun: what a batch decides, from the readers left to Python alone -------------------


def _mailgun_both_ways(rows: Sequence[tuple[int, int, str, str]], links: readers.LinkMaker = LINKS
                       ) -> tuple[PreparedCall, tuple[int, ...], dict[str, object]]:
    """The Mailgun request for ``rows`` built both ways (asserted equal), and the fast one's
    recipient-variables."""
    import json

    build = _build("mailgun")
    claimed = _claimed(rows)
    fast_call, fast_ids = build(_template(), Readers(claimed, links))
    slow_call, slow_ids = build(_template(), template_recipients(claimed, links))
    assert _body(fast_call) == _body(slow_call)
    assert (fast_ids, fast_call.refused) == (slow_ids, slow_call.refused)
    body = _body(fast_call)
    marker = b'name="recipient-variables"\r\n\r\n'
    start = body.index(marker) + len(marker)
    variables = json.loads(body[start:body.index(b"\r\n--BOUNDARY", start)])
    return fast_call, fast_ids, variables


@pytest.fixture
def only_some_in_python(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The indexes of the readers made in Python; a whole Readers made in Python fails."""
    made: list[int] = []
    recipient = Readers.recipient

    def one(self: Readers, index: int) -> object:
        made.append(index)
        return recipient(self, index)

    def every(self: Readers) -> object:
        raise AssertionError("the whole batch was made in Python")

    monkeypatch.setattr(Readers, "recipient", one)
    monkeypatch.setattr(Readers, "recipients", every)
    return made


@needs_speedups
def test_mailgun_refuses_an_address_twice_across_both_ways(only_some_in_python: list[int]) -> None:
    rows = [
        (1, 1, "reader@example.org", "Ada"),
        (2, 2, " Reader@Example.ORG", "Ada"),  # the same address once cleaned: not plain
        (3, 3, "second@example.org", "O'Brien"),
        (4, 4, "SECOND@example.org", "Bo"),  # plain, after a reader in Python
        (5, 5, "x@@example.org", "Bad"),  # invalid: refused, and its address is not taken
        (6, 6, "third@example.org", "Cy"),
        (7, 7, "third@example.org", "Cy"),  # plain twice
    ]
    call, ids, variables = _mailgun_both_ways(rows)
    assert ids == (1, 3, 6)
    assert [(r.ledger_id, r.status) for r in call.refused] == [(2, "failed"), (4, "failed"), (5, "invalid"),
                                                              (7, "failed")]
    assert list(variables) == ["reader@example.org", "second@example.org", "third@example.org"]
    assert sorted(only_some_in_python) == [1, 2, 4]  # the readers the C code left alone, once each


@needs_speedups
@pytest.mark.parametrize("odd", [
    (9, 9, "obrien@example.org", "O'Brien"),  # escaped in HTML only
    (9, 9, "pct@example.org", "%recipient.x%"),  # neutralized each its own way
    (9, 9, "bad@@example.org", "O'Brien"),  # refused, yet it counts, as in the Python path
])
def test_mailgun_one_reader_in_python_splits_the_name(odd: tuple[int, int, str, str],
                                                      only_some_in_python: list[int]) -> None:
    rows = [*PLAIN[:2], odd, *PLAIN[2:]]
    call, _ids, variables = _mailgun_both_ways(rows)
    assert only_some_in_python == [2]
    entry = variables[PLAIN[0][2]]
    assert isinstance(entry, dict)
    assert entry["digest_html_name"] == entry["digest_text_name"] == PLAIN[0][3]
    assert "digest_name" not in entry and entry["digest_unsubscribe_url"]
    body = _body(call)
    assert b"%recipient.digest_html_name%" in body and b"%recipient.digest_text_name%" in body
    if odd[3].startswith("%"):
        pct = variables[odd[2]]
        assert isinstance(pct, dict)
        assert pct["digest_html_name"] == "&#37;recipient.x%" and pct["digest_text_name"] == "%\u200brecipient.x%"


@needs_speedups
def test_mailgun_plain_readers_share_the_name(only_some_in_python: list[int]) -> None:
    rows = [*PLAIN, (9, 9, "r9 @example.org", "Plain Name"), (10, 10, "r10@example.org", " Space")]
    call, ids, variables = _mailgun_both_ways(rows)
    assert sorted(only_some_in_python) == [5, 6]
    assert call.refused[0].ledger_id == 9 and 10 in ids
    entry = variables[PLAIN[0][2]]
    assert isinstance(entry, dict) and entry["digest_name"] == PLAIN[0][3]
    assert set(entry) == {"ledger_id", "h:List-Unsubscribe", "h:X-Digest-Ledger-Id",
                          "digest_name", "digest_unsubscribe_url", "digest_preferences_url"}
    # The same for every reader: one plain field for the call, not in each reader's entry.
    assert b'name="h:List-Unsubscribe-Post"\r\n\r\nList-Unsubscribe=One-Click\r\n' in _body(call)


@needs_speedups
def test_mailgun_a_reader_in_python_with_another_one_click_takes_the_python_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The C code writes List-Unsubscribe-Post once for the call, as every reader has it: a
    reader made in Python with another value (template_recipients never makes one) sends the
    batch down the Python path rather than giving it the others' value."""
    recipient = Readers.recipient

    def other_one_click(self: Readers, index: int) -> object:
        r = recipient(self, index)
        return r._replace(headers=tuple((n, "other" if n == "List-Unsubscribe-Post" else v) for n, v in r.headers))

    def whole_batch(self: Readers) -> object:
        made.append(len(self.rows))
        return template_recipients(self.rows, self.links)

    made: list[int] = []
    monkeypatch.setattr(Readers, "recipient", other_one_click)
    monkeypatch.setattr(Readers, "recipients", whole_batch)
    _mailgun_both_ways([*PLAIN, LEFT_TO_PYTHON[2]])  # Readers.recipients: every value as it should be
    assert made  # the whole batch was made in Python


@needs_speedups
def test_mailgun_without_anyone_to_send_to() -> None:
    call, ids, variables = _mailgun_both_ways([(1, 1, "x@@example.org", "Ada"), (2, 2, "no-at.example.org", "Bo")])
    assert ids == () and variables == {} and len(call.refused) == 2
    assert b'name="h:List-Unsubscribe' not in _body(call)


@needs_speedups
@pytest.mark.parametrize("prefix", [f"{PUBLIC}/u?a=1&b=", f"{PUBLIC}/%7Eme/u/", f"{PUBLIC}/caf\u00e9/u/"])
@pytest.mark.parametrize("rows", [PLAIN, PLAIN + LEFT_TO_PYTHON[:3]])
def test_mailgun_links_an_escaping_changes_take_the_python_path(prefix: str, rows: list[tuple[int, int, str, str]]
                                                                ) -> None:
    links = LinkSigner("a secret for the links").url_maker(prefix, f"{PUBLIC}/preferences/")
    _mailgun_both_ways(rows, links)


@needs_speedups
def test_mailgun_template_sender_builds_without_making_every_reader(only_some_in_python: list[int]) -> None:
    provider = build_provider(_settings("mailgun"))
    rows = _claimed([*PLAIN, LEFT_TO_PYTHON[2]])
    send = provider.template_sender(_template(), Readers(rows, LINKS))
    assert callable(send) and only_some_in_python == [len(PLAIN)]


@needs_speedups
@pytest.mark.parametrize("seed", range(20))
def test_mailgun_random_batches_are_the_same_both_ways(seed: int) -> None:
    """Random mixes of plain readers and the others, addresses repeated as they are, in
    another case or padded (then cleaned to the same address), in any order."""
    rng = random.Random(seed)
    rows = []
    for ledger_id in range(1, rng.randint(1, 60)):
        _ledger, subscriber, email, name = rng.choice(PLAIN + LEFT_TO_PYTHON)
        if rng.random() < 0.6:
            email = f"{rng.randint(0, 20)}.{email}"
        email = rng.choice([email, email, email.upper(), f" {email}"])
        rows.append((ledger_id, subscriber, email, name))
    _mailgun_both_ways(rows)


# -- SendGrid: what its batch decides across the readers of both paths ------------------------


def _sendgrid_both_ways(rows: Sequence[tuple[int, int, str, str]], template: TemplateMessage | None = None,
                        links: LinkUrls = LINKS) -> tuple[PreparedCall, tuple[int, ...]]:
    """SendGrid's request for ``rows`` from a Readers batch, checked equal to the one from a
    list of recipients (body, carried ids and refusals)."""
    build = _build("sendgrid")
    template = template or _template()
    claimed = _claimed(rows)
    fast_call, fast_ids = build(template, Readers(claimed, links))
    slow_call, slow_ids = build(template, template_recipients(claimed, links))
    assert _body(fast_call) == _body(slow_call)
    assert (fast_ids, fast_call.refused) == (slow_ids, slow_call.refused)
    return fast_call, fast_ids


def _fills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The readers each :meth:`Readers.fill` call wrote in C, call by call."""
    calls: list[int] = []
    fill = Readers.fill

    def counted(self: Readers, *programs: tuple[readers.Step, ...]) -> tuple[list[bytes | None], ...] | None:
        filled: tuple[list[bytes | None], ...] | None = fill(self, *programs)
        if filled is not None:
            calls.append(sum(piece is not None for piece in filled[0]))
        return filled

    monkeypatch.setattr(Readers, "fill", counted)
    return calls


@needs_speedups
def test_sendgrid_refuses_the_same_address_twice_across_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    fills = _fills(monkeypatch)
    rows = [
        (1, 1, "dup@example.org", "Plain First"),  # plain: carried
        (2, 2, "DUP@example.org", "José"),  # left to Python: the same address
        (3, 3, " Dup@Example.org", "Leading Space"),  # left to Python (the space): the same once cleaned
        (4, 4, "other@example.org", "Zoë"),  # left to Python: carried
        (5, 5, "Other@Example.ORG", "Plain Second"),  # plain: the same as the one before
        (6, 6, "third@example.org", "Plain Third"),
        (7, 7, "third@example.org", "Plain Third"),  # plain twice
        (8, 8, "no-at.example.org", "Plain Invalid"),  # left to Python: invalid
    ]
    call, ids = _sendgrid_both_ways(rows)
    assert fills == [4]
    assert ids == (1, 4, 6)
    assert [(r.ledger_id, r.status) for r in call.refused] == [
        (2, "failed"), (3, "failed"), (5, "failed"), (7, "failed"), (8, "invalid")]


@needs_speedups
def test_sendgrid_splits_a_key_when_a_reader_left_to_python_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fills = _fills(monkeypatch)
    # O'Brien's name is escaped for HTML: the name gets an HTML key and a text key, for everyone.
    call, ids = _sendgrid_both_ways([*PLAIN, (12, 12, "r12@example.org", "O'Brien"), (50, 50, "x@example.org", "Ed")])
    assert b"-d0123456789abcdef-h-name-" in _body(call) and b"-d0123456789abcdef-name-" not in _body(call)
    assert b"-d0123456789abcdef-unsubscribe_url-" in _body(call)  # the links stay shared
    assert fills == [6]  # written once, with the split keys decided from O'Brien before
    assert ids == (1, 2, 3, 4, 2**62, 12, 50)


SPLIT = [*PLAIN, (12, 12, "r12@example.org", "O'Brien")]  # O'Brien splits the name's key
ALIKE = [*PLAIN, (11, 11, "r11@example.org", "José")]  # José is odd, but splits nothing


@needs_speedups
@pytest.mark.parametrize("batches", [
    [PLAIN, SPLIT],  # odd names after a batch of plain names
    [SPLIT, PLAIN],  # and the reverse
    [ALIKE, SPLIT, SPLIT, ALIKE, PLAIN, SPLIT, PLAIN, ALIKE],
])
def test_sendgrid_writes_each_batch_once_whatever_came_before(
        batches: list[list[tuple[int, int, str, str]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """One provider, batch after batch: each batch's keys are its own (nothing is kept from the
    batch before), its plain readers are written by one fill, and its body is the Python path's."""
    fills = _fills(monkeypatch)
    provider = SendGridProvider(_settings("sendgrid"))
    template = _template()
    build = partial(provider.build_template_request, template, nonce="0123456789abcdef")
    for rows in batches:
        fills.clear()
        claimed = _claimed(rows)
        fast_call, fast_ids = build(Readers(claimed, LINKS))
        slow_call, slow_ids = _build("sendgrid")(template, template_recipients(claimed, LINKS))
        assert (_body(fast_call), fast_ids, fast_call.refused) == (_body(slow_call), slow_ids, slow_call.refused)
        assert fills == [len(PLAIN)]
        assert (b"-d0123456789abcdef-h-name-" in _body(fast_call)) == (rows is SPLIT)
    assert not hasattr(provider, "_split")


@needs_speedups
def test_sendgrid_a_reader_the_scan_missed_takes_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a reader whose values differ ever pass the scan (it cannot: see Readers.odd), the
    batch is written in Python with keys decided from every reader: never a wrong body."""
    fills = _fills(monkeypatch)
    monkeypatch.setattr(Readers, "odd", lambda self: {})
    call, _ids = _sendgrid_both_ways(SPLIT)
    assert b"-d0123456789abcdef-h-name-" in _body(call)
    assert fills == [len(PLAIN)]  # the one fill, its pieces unused


@needs_speedups
def test_sendgrid_shares_the_keys_when_no_reader_needs_them_split(monkeypatch: pytest.MonkeyPatch) -> None:
    fills = _fills(monkeypatch)
    # José is left to Python, but nothing escapes his name: one key for both parts.
    call, _ids = _sendgrid_both_ways([*PLAIN, (11, 11, "r11@example.org", "José")])
    assert b"-d0123456789abcdef-name-" in _body(call) and b"-h-name-" not in _body(call)
    assert fills == [5]


@needs_speedups
@pytest.mark.parametrize("slots", ["none", "html only", "text name only"])
def test_sendgrid_templates_with_fewer_slots(slots: str) -> None:
    base = _template()
    template = {
        "none": replace(base, html_parts=("<p>Hi</p>",), html_slots=(), text_parts=("Hi",), text_slots=()),
        "html only": replace(base, text_parts=("Hi",), text_slots=()),
        "text name only": replace(base, html_parts=("<p>Hi</p>",), html_slots=(), text_parts=("Hi ", "!"),
                                  text_slots=("name",)),
    }[slots]
    call, _ids = _sendgrid_both_ways(PLAIN + LEFT_TO_PYTHON, template)
    assert (b'"substitutions"' in _body(call)) == (slots != "none")


@needs_speedups
@pytest.mark.parametrize("public", ["https://news.example.org/a&b", 'https://news.example.org/"x"',
                                    "https://news.example.org/<x>", "https://news.example.org/a\\b",
                                    "https://例え.jp", "https://news.example.org/%20x"])
def test_sendgrid_links_the_c_module_cannot_write_as_they_are(public: str) -> None:
    """The C module writes the link prefixes as they are: a public URL that some escaping
    changes takes the Python path, and one that none does gives the same bytes either way."""
    links = LinkSigner("a secret for the links").url_maker(f"{public}/u/", f"{public}/preferences/")
    _sendgrid_both_ways(PLAIN + LEFT_TO_PYTHON[:5], links=links)


@needs_speedups
def test_sendgrid_never_makes_every_reader_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    def all_of_them(self: Readers) -> list[object]:
        raise AssertionError("every reader made in Python")

    template = _template()
    claimed = _claimed(PLAIN + LEFT_TO_PYTHON)
    expected = _build("sendgrid")(template, template_recipients(claimed, LINKS))
    monkeypatch.setattr(Readers, "recipients", all_of_them)
    provider = SendGridProvider(_settings("sendgrid"))
    batch = Readers(claimed, LINKS)
    assert provider.template_sender(template, batch) is not None  # builds the request
    call, ids = provider.build_template_request(template, batch, nonce="0123456789abcdef")
    assert (_body(call), ids) == (_body(expected[0]), expected[1])


# -- SendGrid: List-Unsubscribe-Post once for the call ----------------------------------------

_ONE_CLICK = ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")


@pytest.mark.parametrize("c_module", [pytest.param(True, marks=needs_speedups), False])
def test_sendgrid_one_click_is_once_for_the_call(c_module: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reader has List-Unsubscribe-Post with its one value: both ways, it is written once,
    in the message-level headers, and in no personalization; each keeps their own
    List-Unsubscribe and X-Digest-Ledger-Id. The C module writes the plain readers' bytes."""
    import json

    fills = _fills(monkeypatch)
    if not c_module:
        monkeypatch.setattr(readers, "_speedups", None)
    call, ids = _sendgrid_both_ways(PLAIN + LEFT_TO_PYTHON)
    assert fills == ([len(PLAIN)] if c_module else [])
    body = _body(call)
    assert body.count(b'"List-Unsubscribe-Post"') == 1
    data = json.loads(body)
    assert data["headers"] == dict([_ONE_CLICK])
    assert len(data["personalizations"]) == len(ids) > len(PLAIN)
    for p in data["personalizations"]:
        ledger_id = p["custom_args"]["ledger_id"]
        assert list(p["headers"]) == ["List-Unsubscribe", "X-Digest-Ledger-Id"]
        assert p["headers"]["X-Digest-Ledger-Id"] == ledger_id
        assert p["headers"]["List-Unsubscribe"].startswith(f"<{PUBLIC}/u/")


@pytest.mark.parametrize("c_module", [pytest.param(True, marks=needs_speedups), False])
@pytest.mark.parametrize("other", [None, "List-Unsubscribe=Something-Else"])
def test_sendgrid_a_reader_with_another_one_click_keeps_it_per_personalization(
        c_module: bool, other: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """One reader (made in Python: template_recipients never makes one) without the header, or
    with another value: no message-level header, every reader's own value in their
    personalization, the same bytes both ways. The C module wrote the plain readers without
    it, so the batch is written in Python."""
    import json

    odd_id = LEFT_TO_PYTHON[2][0]  # O'Brien, whom the C code leaves to Python

    def changed(r: TemplateRecipient) -> TemplateRecipient:
        if r.ledger_id != odd_id:
            return r
        return r._replace(headers=tuple((n, other if n == _ONE_CLICK[0] else v) for n, v in r.headers
                                        if other is not None or n != _ONE_CLICK[0]))

    made: list[int] = []
    recipient, recipients = Readers.recipient, Readers.recipients

    def one(self: Readers, index: int) -> TemplateRecipient:
        return changed(recipient(self, index))

    def every(self: Readers) -> list[TemplateRecipient]:
        made.append(len(self.rows))
        return [changed(r) for r in recipients(self)]

    if not c_module:
        monkeypatch.setattr(readers, "_speedups", None)
    claimed = _claimed([*PLAIN, LEFT_TO_PYTHON[2]])
    slow_call, slow_ids = _build("sendgrid")(_template(), [changed(r) for r in template_recipients(claimed, LINKS)])
    monkeypatch.setattr(Readers, "recipient", one)
    monkeypatch.setattr(Readers, "recipients", every)
    fast_call, fast_ids = _build("sendgrid")(_template(), Readers(claimed, LINKS))
    assert (_body(fast_call), fast_ids, fast_call.refused) == (_body(slow_call), slow_ids, slow_call.refused)
    assert made  # the whole batch made in Python
    data = json.loads(_body(fast_call))
    assert "headers" not in data
    for p in data["personalizations"]:
        ledger_id = int(p["custom_args"]["ledger_id"])
        expected = other if ledger_id == odd_id else _ONE_CLICK[1]
        assert p["headers"].get(_ONE_CLICK[0]) == expected
        assert p["headers"]["X-Digest-Ledger-Id"] == str(ledger_id)
        assert p["headers"]["List-Unsubscribe"].startswith(f"<{PUBLIC}/u/")
