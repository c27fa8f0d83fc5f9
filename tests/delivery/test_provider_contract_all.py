"""The contract every provider shares, run over every provider in the registry, each through
its real transport.

The HTTP providers talk to the fake provider server (tests/fakes/provider_server.py), built
and read as in test_provider_contract.py; the outbox writes .eml files into a temporary folder,
read back with the stdlib parser; SMTP talks STARTTLS with AUTH to a real aiosmtpd server
(the helpers of test_smtp.py). For each one, a batch of three readers and one address no
provider can carry comes back one result per message, in order, with the message's ledger id:
the readers ``sent``, the bad address ``invalid``, and nothing goes out for it. What each reader
received carries their own List-Unsubscribe, ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` and their own ledger id where the provider keeps it (Postmark
Metadata, SendGrid custom_args, Mailgun ``v:`` variables, SES EmailTags, Resend tags, the
X-Digest-Ledger-Id header for SMTP and the outbox). The providers that personalize
server-side meet the same contract through send_template_batch, read after the fake applied
the substitutions.

What is particular to one provider (how to build it, how to read back what a reader got) is
one row of ADAPTERS. Errors, retries and everything else provider-specific are tested in
test_provider_contract.py, test_smtp.py and test_outbox_provider.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parseaddr
from html import escape
from pathlib import Path
from typing import Any

import pytest

from digest.config import Delivery
from digest.delivery.providers.base import Provider
from digest.delivery.providers.registry import PROVIDERS, build_provider, provider_class
from digest.delivery.readers import list_headers, template_recipients
from digest.store.store import Claimed
from digest.types import OutgoingMessage, SendResult, TemplateRecipient
from tests.delivery import test_smtp
from tests.delivery.conftest import MessageFactory
from tests.delivery.test_provider_contract import SPECS, TOKEN, make_template, provider_for
from tests.delivery.test_smtp import PASSWORD, USER, Cert, EphemeralController, Handler, plain
from tests.delivery.test_smtp import provider as smtp_provider
from tests.fakes.provider_server import FakeProviderServer

# test_smtp's self-signed certificate (a module-scoped fixture), so SMTP runs over STARTTLS
# as it does in production.
cert = test_smtp.cert


# -- the readers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    ledger_id: int
    email: str
    name: str
    unsubscribe_url: str

    @property
    def preferences_url(self) -> str:
        return self.unsubscribe_url.replace("/u/", "/preferences/")


READERS = (
    Reader(101, "ada@example.com", "Ada Lovelace", "https://news.example.org/u/7Qm2xAk"),
    Reader(102, "grace@example.net", "Grace Hopper", "https://news.example.org/u/Lp93bZw"),
    Reader(103, "alan@mail.example.org", "Alan Turing", "https://news.example.org/u/Hc0tVeq"),
)
# An address no provider can put in a header: it must come back invalid, and go nowhere.
NOBODY = Reader(104, "no address", "Nobody", "https://news.example.org/u/Zz11Nnr")
BATCH = (READERS[0], NOBODY, READERS[1], READERS[2])  # the bad one inside, to check the order


def headers_for(reader: Reader) -> tuple[tuple[str, str], ...]:
    """The headers the sender gives each message (test_sender_gives_these_headers holds it to
    that): RFC 8058 one-click unsubscribe, and the ledger id SMTP and the outbox carry."""
    return (
        ("List-Unsubscribe", f"<{reader.unsubscribe_url}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("X-Digest-Ledger-Id", str(reader.ledger_id)),
    )


def message_for(make_message: MessageFactory, reader: Reader) -> OutgoingMessage:
    return make_message(
        reader.ledger_id,
        to_email=reader.email,
        to_name=reader.name,
        html=f"<html><body><p>Hello {escape(reader.name)}</p>"
        f'<a href="{escape(reader.unsubscribe_url)}">Unsubscribe</a></body></html>',
        text=f"Hello {reader.name}\n\nUnsubscribe: {reader.unsubscribe_url}\n",
        headers=headers_for(reader),
    )


def recipient_for(reader: Reader) -> TemplateRecipient:
    """``reader`` as a recipient of :func:`make_template` (values in SLOT_NAMES order)."""
    values = (reader.name, reader.unsubscribe_url, reader.preferences_url)
    return TemplateRecipient(
        ledger_id=reader.ledger_id,
        to_email=reader.email,
        to_name=reader.name,
        html_values=tuple(escape(v) for v in values),
        text_values=values,
        headers=headers_for(reader),
    )


# -- how to reach each provider, and read back what its readers got -------------------------


@dataclass(frozen=True)
class Got:
    """One message as its reader got it, read back from the provider's transport."""

    to: str  # the reader's address
    headers: Mapping[str, str]  # names lower-cased: header names are case-insensitive
    ledger_id: str | None  # as the provider carries it (metadata, tag or header)


@dataclass(frozen=True)
class Harness:
    provider: Provider
    received: Callable[[], list[Got]]


@dataclass(frozen=True)
class Env:
    tmp_path: Path
    cert: Cert


@dataclass(frozen=True)
class Adapter:
    """Opens a provider on its real transport: a context manager that yields a Harness."""

    open: Callable[[Env], AbstractContextManager[Harness]]


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): str(value) for name, value in headers.items()}


def http(name: str, to_of: Callable[[dict[str, Any]], str]) -> Adapter:
    """An HTTP provider against the fake server; what each reader got is one record of
    ``srv.messages``, read with the provider's SPECS row (headers, ledger id) and ``to_of``."""
    spec = SPECS[name]

    def got(record: dict[str, Any]) -> Got:
        address = parseaddr(to_of(record))[1]
        return Got(address, _lower(spec.headers_of(record)), spec.ledger_of(record))

    @contextmanager
    def open_(env: Env) -> Iterator[Harness]:
        with FakeProviderServer(token=TOKEN) as srv:
            spec.install(srv)
            with provider_for(name, srv) as provider:
                yield Harness(provider, lambda: [got(record) for record in srv.messages])

    return Adapter(open_)


def _only(values: Sequence[str]) -> str:
    (value,) = values  # one reader per message
    return value


def _from_mime(message: EmailMessage, to: str) -> Got:
    return Got(to, _lower(dict(message.items())), message["X-Digest-Ledger-Id"])


def _parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


@contextmanager
def _outbox(env: Env) -> Iterator[Harness]:
    root = env.tmp_path / "outbox"

    def received() -> list[Got]:
        messages = [_parse(path.read_bytes()) for path in sorted(root.rglob("*.eml"))]
        return [_from_mime(m, _only([a.addr_spec for a in m["To"].addresses])) for m in messages]

    with build_provider(Delivery(provider="outbox", outbox_dir=str(root))) as provider:
        yield Harness(provider, received)


@contextmanager
def _smtp(env: Env) -> Iterator[Harness]:
    servers: list[EphemeralController] = []
    handler = Handler()
    try:
        server = plain(
            servers,
            handler,
            tls_context=env.cert.server_context(),
            require_starttls=True,
            authenticator=handler.authenticate,
            auth_require_tls=True,
        )
        provider = smtp_provider(
            server,
            smtp_security="starttls",
            smtp_ca_file=str(env.cert.cert),
            username=USER,
            password=PASSWORD,
        )

        def received() -> list[Got]:
            # The envelope recipient is who the message went to, whatever the To header says.
            return [_from_mime(r.parsed(), _only(r.rcpt_tos)) for r in handler.received]

        with provider:
            yield Harness(provider, received)
    finally:
        for controller in servers:
            controller.stop()


ADAPTERS: dict[str, Adapter] = {
    "postmark": http("postmark", lambda record: record["To"]),
    "sendgrid": http("sendgrid", lambda record: record["to"]),
    "mailgun": http("mailgun", lambda record: record["to"]),
    "ses": http("ses", lambda record: record["to"]),
    "resend": http("resend", lambda record: _only(record["to"])),
    "outbox": Adapter(_outbox),
    "smtp": Adapter(_smtp),
}

ALL = sorted(PROVIDERS)
PERSONALIZING = [name for name in ALL if provider_class(name).personalizes]


def test_every_registered_provider_has_an_adapter() -> None:
    # A provider added to the registry without a row in ADAPTERS fails here: add one.
    assert sorted(ADAPTERS) == ALL
    assert {"postmark", "sendgrid", "mailgun", "ses", "resend", "smtp", "outbox"} <= set(ALL)
    assert PERSONALIZING == ["mailgun", "sendgrid"]


def test_sender_gives_these_headers() -> None:
    # The contract below feeds providers the headers the sender builds, full bodies and
    # templates alike: SMTP and the outbox find the ledger id nowhere else.
    reader = READERS[0]
    assert list_headers(reader.ledger_id, reader.unsubscribe_url) == headers_for(reader)
    (recipient,) = template_recipients(
        [Claimed(reader.ledger_id, 9, reader.email, reader.name)],
        lambda subscriber_id, email: (reader.unsubscribe_url, reader.preferences_url),
    )
    assert recipient.headers == headers_for(reader)


# -- the contract ---------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, cert: Cert) -> Env:
    return Env(tmp_path, cert)


def assert_meets_the_contract(results: list[SendResult], received: list[Got]) -> None:
    """One result per message of BATCH, in order; every reader got exactly one message with
    their own one-click headers and ledger id; nothing went to NOBODY."""
    assert [r.ledger_id for r in results] == [reader.ledger_id for reader in BATCH]
    assert [r.status for r in results] == ["sent", "invalid", "sent", "sent"]
    assert all(r.provider_message_id for r in results if r.status == "sent")
    invalid = results[1]
    assert invalid.error and NOBODY.email in invalid.error

    assert sorted(got.to for got in received) == sorted(reader.email for reader in READERS)
    assert str(NOBODY.ledger_id) not in {got.ledger_id for got in received}
    by_address = {got.to: got for got in received}
    for reader in READERS:
        got = by_address[reader.email]
        assert (
            got.headers.get("list-unsubscribe"),
            got.headers.get("list-unsubscribe-post"),
            got.ledger_id,
        ) == (f"<{reader.unsubscribe_url}>", "List-Unsubscribe=One-Click", str(reader.ledger_id))


@pytest.mark.parametrize("name", ALL)
def test_batch_meets_the_contract(name: str, env: Env, make_message: MessageFactory) -> None:
    with ADAPTERS[name].open(env) as harness:
        # The registry's own class, not a lookalike the adapter built.
        assert type(harness.provider) is provider_class(name)
        results = harness.provider.send_batch([message_for(make_message, r) for r in BATCH])
        assert_meets_the_contract(results, harness.received())


@pytest.mark.parametrize("name", PERSONALIZING)
def test_template_batch_meets_the_contract(name: str, env: Env) -> None:
    # The provider fills in each reader's values, headers included: what the fake recorded is
    # what each reader got after the substitutions.
    with ADAPTERS[name].open(env) as harness:
        results = harness.provider.send_template_batch(
            make_template(), [recipient_for(r) for r in BATCH]
        )
        assert_meets_the_contract(results, harness.received())


def test_postmark_with_server_templates_meets_the_contract() -> None:
    # The opt-in variant (delivery.postmark_templates): each message rendered by the fake
    # from the server template and the reader's model.
    with FakeProviderServer(token=TOKEN) as srv:
        settings = Delivery(provider="postmark", api_key=TOKEN, base_url=srv.url, timeout=5,
                            postmark_templates=True)
        with build_provider(settings) as provider:
            assert provider.personalizes and type(provider) is not provider_class("postmark")
            results = provider.send_template_batch(make_template(), [recipient_for(r) for r in BATCH])
        spec = SPECS["postmark"]
        received = [Got(parseaddr(rec["To"])[1], _lower(spec.headers_of(rec)), spec.ledger_of(rec))
                    for rec in srv.messages]
        assert_meets_the_contract(results, received)
