"""Server-side personalization end to end: a reader's comment that quotes a provider's
substitution syntax, or the project's own keys and markers, reaches every reader as written.

A real comment goes through the whole pipeline (the folder source, sanitizing, ranking, the
MJML render, the compiled template, the sender) to the fake SendGrid and Mailgun, which
substitute as the real services do, and to the fake Postmark with server templates, which
renders each message from the stored template with Mustachio's tags. The per-reader values
still arrive: each reader sees their own name and links, and a name quoting the syntax is
substituted for nobody else.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from email.utils import parseaddr
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from digest import pipeline
from digest.delivery.providers import sendgrid
from tests.conftest import FrozenClock, make_settings
from tests.fakes.provider_server import FakeProviderServer, install_mailgun, install_sendgrid

TOKEN = "injection-token"
ZWSP = "\u200b"
DOMAIN = "mg.example.org"
# What a sendgrid key looks like with this nonce; the first nonce the provider draws is it.
TAKEN_NONCE = "0123456789abcdef"
QUOTED = [
    "%recipient.name%",
    "%recipient.digest_name%",
    "%recipient.unsubscribe_url%",
    "%unsubscribe_url%",
    "%recipient%",
    "%recipient_email%",
    "%Recipient_Name%",
    "%recipient_fname% %recipient_lname%",
    "%unsubscribe_email%",
    "{{name}}",
    "{{{unsubscribe}}}",
    "{{{o}}}",
    "{{#each items}}{{/each}}",
    "{{!note}} {{> part}} {{^o}} {{&o}}",
    "{{{{h0}}}}",
    "}} {{",
    "{{{ pm:unsubscribe }}}",  # Postmark's unsubscribe placeholder (full bodies)
    "{{{pm:unsubscribe}}}",
    "{{{",
    "-name-",
    f"-d{TAKEN_NONCE}-name-",
    f"-d{TAKEN_NONCE}-unsubscribe_url-",
    "DIGESTSLOTabcname" + "abc",
]
COMMENT = "Quoting the syntax: " + " and ".join(QUOTED) + "."
READERS = [("ann@example.com", "Ann"), ("eve@example.com", "Eve %recipient.unsubscribe_url% {{name}}"),
           ("bo@example.com", "Bo <b>"), ("cy@example.com", "Cy {{{ pm:unsubscribe }}} {")]
PROVIDERS: dict[str, tuple[dict[str, Any], Any]] = {
    "sendgrid": ({"provider": "sendgrid", "api_key": TOKEN}, install_sendgrid),
    "mailgun": ({"provider": "mailgun", "api_key": TOKEN, "domain": DOMAIN}, lambda srv: install_mailgun(srv, DOMAIN)),
    "postmark-templates": ({"provider": "postmark", "api_key": TOKEN, "postmark_templates": True},
                           lambda srv: None),
    # Full bodies: the fake Postmark replaces its unsubscribe placeholder, as Postmark does.
    "postmark": ({"provider": "postmark", "api_key": TOKEN}, lambda srv: None),
}


def _essay(folder: Path) -> None:
    folder.mkdir()
    (folder / "2026-11-20-on-templates.md").write_text(
        "---\ntitle: On Templates\ndate: 2026-11-20T08:00:00+00:00\nauthor: Mara Ellison\n"
        "summary: Why a template language needs a way to say a thing literally.\n---\n\n"
        "Every template language needs a way to print its own syntax.\n")
    (folder / "2026-11-20-on-templates.comments.yaml").write_text(
        "- id: 1\n  author: Quill\n  date: 2026-11-20T10:00:00+00:00\n  score: 40\n"
        f"  body: |\n    {COMMENT}\n")


@pytest.fixture(params=sorted(PROVIDERS))
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def srv(provider: str) -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=TOKEN) as server:
        PROVIDERS[provider][1](server)
        yield server


def test_quoted_syntax_reaches_every_reader_as_written(tmp_path: Path, provider: str, srv: FakeProviderServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # SendGrid's first nonce is one the content already holds: it must draw another.
    drawn = iter([TAKEN_NONCE, "fedcba9876543210"])
    monkeypatch.setattr(sendgrid, "secrets", SimpleNamespace(token_hex=lambda n: next(drawn)))
    _essay(tmp_path / "essays")
    clock = FrozenClock()
    settings = make_settings(
        tmp_path, sources=[{"name": "essays", "type": "folder", "path": str(tmp_path / "essays")}],
        delivery={**PROVIDERS[provider][0], "base_url": srv.url, "timeout": 5},
        digest={"approval": {"required": False}})
    app = pipeline.App.open(settings, clock)
    try:
        app.store.upsert_subscribers(READERS, "cli", clock())
        pipeline.collect(app)
        outcome = pipeline.make_draft(app)
        assert outcome.draft is not None and outcome.draft.status == "approved"
        (summary,) = pipeline.send(app)
        assert summary.sent == len(READERS) and summary.finished
        assert app.settings.delivery.server_side_personalization
        # One call for the batch (Postmark: after creating the server template, deleted at the end).
        sends = [r for r in srv.requests if r.method == "POST" and r.path != "/templates"]
        assert len(sends) == 1
        if provider == "postmark-templates":
            assert [r.method for r in srv.requests] == ["POST", "POST", "DELETE"]
    finally:
        app.close()

    by_reader = {parseaddr(m.get("to") or m["To"])[1]: {"text": m.get("TextBody"), "html": m.get("HtmlBody"), **m}
                 for m in srv.messages}
    assert sorted(by_reader) == sorted(email for email, _name in READERS)
    for email, name in READERS:
        got = by_reader[email]
        # Mailgun has no escape for its syntax: a zero-width space after the "%" of a variable
        # start keeps it from being one, and the reader sees the same characters.
        text = got["text"].replace(ZWSP, "")
        if provider == "postmark-templates":  # Postmark has a way to say "{{": nothing is added
            assert ZWSP not in got["text"] + got["html"]
        if provider == "postmark":  # the HTML says "{" as &#123; (it renders the same): no mark
            assert ZWSP not in got["HtmlBody"] and "pm.example/unsubscribe" not in got["TextBody"] + got["HtmlBody"]
        page = html.unescape(re.sub(r"<[^>]+>", "", got["html"])).replace(ZWSP, "")
        for quoted in QUOTED:
            assert quoted in text, (email, quoted)
            assert quoted in page, (email, quoted)
        # Each reader's own values, substituted: the name as given, links that are theirs.
        assert name in text and name in page
        assert re.search(r"https://news\.example\.org/u/[0-9a-f]+\.", text)
        others = [n for e, n in READERS if e != email]
        assert all(n not in text for n in others)
    if provider == "sendgrid":
        assert "-dfedcba9876543210-" in srv.requests[-1].body.decode()
