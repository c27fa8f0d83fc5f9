"""SmtpProvider against a real SMTP server (aiosmtpd) on 127.0.0.1: plain, STARTTLS,
implicit TLS with a self-signed certificate made here, AUTH PLAIN and LOGIN, refusals, 421,
and a connection lost in the middle of a message."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import smtplib
import ssl
import threading
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from digest.config import Delivery
from digest.delivery.providers.base import PartialBatchError
from digest.delivery.providers.smtp import SmtpProvider
from digest.errors import AuthError, BlockedError, DeliveryError
from tests.delivery.conftest import MessageFactory

USER, PASSWORD = "digest", "s3cret pass"


# -- a self-signed certificate for 127.0.0.1 ---------------------------------------------------


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "digest test SMTP")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Cert(cert_path, key_path)


# -- the server -------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool

    def parsed(self) -> EmailMessage:
        message = BytesParser(policy=policy.default).parsebytes(self.data)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class Handler:
    """Records accepted messages; refuses, closes or drops on demand."""

    received: list[Received] = field(default_factory=list)
    refuse_rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    mail_replies: dict[int, str] = field(default_factory=dict)  # nth MAIL FROM (1-based) -> reply
    data_replies: dict[str, str] = field(default_factory=dict)  # recipient -> reply after DATA
    drop_after_data: set[str] = field(default_factory=set)  # accept, then cut the connection
    # Accept (record) the message, then answer 250 only once ``released`` is set: a client
    # with a shorter timeout gives up on a message the server queued. ``held`` lists them.
    hold_after_data: set[str] = field(default_factory=set)
    released: threading.Event = field(default_factory=threading.Event)
    held: list[str] = field(default_factory=list)
    mechanisms: list[str] = field(default_factory=list)
    mails: int = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mails += 1
        reply = self.mail_replies.get(self.mails)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        rcpt = envelope.rcpt_tos[0]
        if rcpt in self.data_replies:
            return self.data_replies[rcpt]
        # session.ssl is set by STARTTLS; an implicit-TLS transport carries an ssl_object.
        tls = session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, tls)
        )
        if rcpt in self.drop_after_data:
            server.transport.abort()  # queued, but the client never hears so
        if rcpt in self.hold_after_data:
            self.held.append(rcpt)
            while not self.released.is_set():
                await asyncio.sleep(0.02)
        return "250 2.0.0 Message accepted for delivery"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self.mechanisms.append(mechanism)
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            USER.encode(),
            PASSWORD.encode(),
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


class EphemeralController(Controller):
    """aiosmtpd's Controller on port 0: the port is read back once the server listens."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Server:
    handler: Handler
    controller: EphemeralController

    @property
    def port(self) -> int:
        return int(self.controller.port)


def start(handler: Handler, **kwargs: Any) -> EphemeralController:
    controller = EphemeralController(handler, hostname="127.0.0.1", port=0, **kwargs)
    controller.start()
    return controller


def plain(
    servers: list[EphemeralController], handler: Handler | None = None, **kwargs: Any
) -> Server:
    handler = handler or Handler()
    controller = start(handler, **kwargs)
    servers.append(controller)
    return Server(handler, controller)


def provider(server: Server, **overrides: Any) -> SmtpProvider:
    values: dict[str, Any] = {
        "provider": "smtp",
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "smtp_security": "none",
        "timeout": 5,
    }
    values.update(overrides)
    return SmtpProvider(Delivery(**values))


def assert_digest_message(received: Received, ledger_id: int) -> None:
    message = received.parsed()
    assert message["To"] == f"Reader {ledger_id} <reader{ledger_id}@example.com>"
    assert message["From"] == "Field Notes <digest@news.example.org>"
    assert message["List-Unsubscribe"] == f"<https://news.example.org/u/tok{ledger_id:04d}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert f"Hello reader {ledger_id}" in text.get_content()
    assert f"tok{ledger_id:04d}" in html.get_content()
    assert received.mail_from == "digest@news.example.org"
    assert received.rcpt_tos == [f"reader{ledger_id}@example.com"]


# -- the tests --------------------------------------------------------------------------------


def test_config_needs_a_host_and_pairs_credentials() -> None:
    with pytest.raises(ValueError, match="needs delivery.smtp_host"):
        Delivery(provider="smtp")
    with pytest.raises(ValueError, match="both delivery.username and delivery.password"):
        Delivery(provider="smtp", smtp_host="h", username="u")
    assert Delivery(provider="smtp", smtp_host="h").smtp_port_or_default == 587
    assert Delivery(provider="smtp", smtp_host="h", smtp_security="tls").smtp_port_or_default == 465


def test_plain_batch_one_session(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers)
    messages = [make_message(i, message_id=f"<digest.7.{i}@news.example.org>") for i in (1, 2, 3)]
    results = provider(server).send_batch(messages)
    assert [(r.ledger_id, r.status, r.provider_message_id) for r in results] == [
        (i, "sent", f"<digest.7.{i}@news.example.org>") for i in (1, 2, 3)
    ]
    assert len(server.handler.received) == 3
    for i, received in zip((1, 2, 3), server.handler.received):
        assert_digest_message(received, i)
        assert received.parsed()["Message-ID"] == f"<digest.7.{i}@news.example.org>"
    assert server.handler.mails == 3


def test_starttls_with_a_ca_file_and_auth_plain(
    servers: list[EphemeralController], cert: Cert, make_message: MessageFactory
) -> None:
    handler = Handler()
    server = plain(
        servers,
        handler,
        tls_context=cert.server_context(),
        require_starttls=True,
        authenticator=handler.authenticate,
        auth_require_tls=True,
        auth_exclude_mechanism=["LOGIN"],
    )
    p = provider(
        server,
        smtp_security="starttls",
        smtp_ca_file=str(cert.cert),
        username=USER,
        password=PASSWORD,
    )
    results = p.send_batch([make_message(1), make_message(2)])
    assert [r.status for r in results] == ["sent", "sent"]
    assert handler.mechanisms == ["PLAIN"]
    assert all(r.tls for r in handler.received)
    assert_digest_message(handler.received[1], 2)


def test_starttls_unverified_and_auth_login(
    servers: list[EphemeralController], cert: Cert, make_message: MessageFactory
) -> None:
    handler = Handler()
    server = plain(
        servers,
        handler,
        tls_context=cert.server_context(),
        require_starttls=True,
        authenticator=handler.authenticate,
        auth_exclude_mechanism=["PLAIN"],
    )
    p = provider(
        server, smtp_security="starttls", smtp_verify=False, username=USER, password=PASSWORD
    )
    assert [r.status for r in p.send_batch([make_message(1)])] == ["sent"]
    assert handler.mechanisms == ["LOGIN"]


def test_implicit_tls(
    servers: list[EphemeralController], cert: Cert, make_message: MessageFactory
) -> None:
    handler = Handler()
    # auth_require_tls=False: aiosmtpd only counts STARTTLS as TLS for AUTH; this
    # connection is TLS from the first byte (handler.received[0].tls checks it).
    server = plain(
        servers,
        handler,
        ssl_context=cert.server_context(),
        authenticator=handler.authenticate,
        auth_require_tls=False,
    )
    p = provider(
        server, smtp_security="tls", smtp_ca_file=str(cert.cert), username=USER, password=PASSWORD
    )
    assert [r.status for r in p.send_batch([make_message(1)])] == ["sent"]
    assert handler.received[0].tls
    assert_digest_message(handler.received[0], 1)
    assert p.check() == f"smtp: reached 127.0.0.1:{server.port} (tls, logged in as {USER})"


def test_an_untrusted_certificate_is_refused(
    servers: list[EphemeralController], cert: Cert, make_message: MessageFactory
) -> None:
    server = plain(servers, ssl_context=cert.server_context())
    with pytest.raises(BlockedError) as info:  # stops the send, fails no reader
        provider(server, smtp_security="tls").send_batch([make_message(1)])
    assert not info.value.retryable and "smtp_ca_file" in (info.value.hint or "")
    assert server.handler.received == []


def test_starttls_required_but_not_offered(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers)
    with pytest.raises(BlockedError, match="does not offer STARTTLS") as info:
        provider(server, smtp_security="starttls").send_batch([make_message(1)])
    assert not info.value.retryable  # the send stops, the batch back in the queue


def test_wrong_password_is_an_auth_error(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    handler = Handler()
    server = plain(servers, handler, authenticator=handler.authenticate, auth_require_tls=False)
    p = provider(server, username=USER, password="wrong")
    with pytest.raises(AuthError) as info:
        p.send_batch([make_message(1)])
    assert info.value.status == 535
    with pytest.raises(AuthError):
        p.check()
    assert handler.received == []


def test_refused_recipients_are_results(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    handler = Handler(
        refuse_rcpt={
            "reader2@example.com": "550 5.1.1 No such user",
            "reader3@example.com": "553 5.1.3 Mailbox name not allowed",
            "reader4@example.com": "450 4.2.0 Greylisted, try later",
        }
    )
    server = plain(servers, handler)
    messages = [make_message(i) for i in (1, 2, 3, 4, 5)] + [make_message(6, to_email="no address")]
    results = provider(server).send_batch(messages)
    assert [r.status for r in results] == [
        "sent",
        "rejected",
        "invalid",
        "deferred",
        "sent",
        "invalid",
    ]
    assert results[1].error == "RCPT TO refused: 550 5.1.1 No such user"
    assert [r.rcpt_tos for r in handler.received] == [
        ["reader1@example.com"],
        ["reader5@example.com"],
    ]


@pytest.mark.parametrize(
    ("reply", "kind", "hint"),
    [
        ("554 5.7.1 <{}>: Relay access denied", BlockedError, "relay"),  # Postfix
        ("550 5.7.1 Relaying denied", BlockedError, "relay"),
        ("550 relay not permitted", BlockedError, "relay"),
        ("550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain", BlockedError, "relay"),  # Exchange
        ("530 5.7.0 Authentication required", AuthError, "delivery.username"),
        ("530 5.7.0 Must issue a STARTTLS command first", AuthError, "smtp_security"),
    ],
)
def test_a_relay_refusing_us_stops_the_send_instead_of_rejecting_readers(
    servers: list[EphemeralController], make_message: MessageFactory, reply: str,
    kind: type[BlockedError], hint: str
) -> None:
    # What a relay answers every RCPT when it will not relay for this client: the session's
    # refusal, not the reader's; nothing sent, no reader marked, the batch back in the queue.
    handler = Handler(refuse_rcpt={f"reader{i}@example.com": reply.format(f"reader{i}@example.com")
                                   for i in (1, 2, 3)})
    server = plain(servers, handler)
    with pytest.raises(BlockedError) as info:
        provider(server).send_batch([make_message(i) for i in (1, 2, 3)])
    assert type(info.value) is kind and hint in (info.value.hint or "")
    assert info.value.status == int(reply[:3]) and "RCPT TO <reader1@example.com> refused" in str(info.value)
    assert handler.received == []


def test_relaying_denied_after_accepted_messages_keeps_them_sent(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    # A relay that takes its own domain's readers and refuses to relay the others: the one
    # accepted stays sent (never sent again); the rest go back to the queue, nobody rejected.
    handler = Handler(refuse_rcpt={"reader2@example.com": "554 5.7.1 <reader2@example.com>: Relay access denied"})
    server = plain(servers, handler)
    results = provider(server).send_batch([make_message(i) for i in (1, 2, 3)])
    assert [r.status for r in results] == ["sent", "deferred", "deferred"]
    assert "Relay access denied" in (results[1].error or "")
    assert [r.rcpt_tos for r in handler.received] == [["reader1@example.com"]]


def test_a_mail_from_wanting_a_login_is_an_auth_error(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers, Handler(mail_replies={1: "530 5.7.0 Authentication required"}))
    with pytest.raises(AuthError) as info:
        provider(server).send_batch([make_message(1)])
    assert "delivery.username" in (info.value.hint or "") and info.value.status == 530


def test_content_refused_after_data(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    handler = Handler(data_replies={"reader2@example.com": "554 5.7.1 Message looks like spam"})
    server = plain(servers, handler)
    results = provider(server).send_batch([make_message(1), make_message(2), make_message(3)])
    assert [r.status for r in results] == ["sent", "rejected", "sent"]


def test_421_on_the_first_message_is_retryable(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers, Handler(mail_replies={1: "421 4.3.2 Service shutting down"}))
    with pytest.raises(DeliveryError) as info:
        provider(server).send_batch([make_message(1), make_message(2)])
    assert info.value.retryable and info.value.status == 421


def test_421_mid_batch_keeps_the_sent_ones(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers, Handler(mail_replies={2: "421 4.7.0 Too many messages, closing"}))
    results = provider(server).send_batch([make_message(i) for i in (1, 2, 3)])
    assert [r.status for r in results] == ["sent", "deferred", "deferred"]
    assert all("not sent" in (r.error or "") and "421" in (r.error or "") for r in results[1:])
    assert len(server.handler.received) == 1


def test_temporary_sender_refusal_is_retryable(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers, Handler(mail_replies={1: "451 4.3.0 Try again later"}))
    with pytest.raises(DeliveryError) as info:
        provider(server).send_batch([make_message(1)])
    assert info.value.retryable and info.value.status == 451


def test_permanent_sender_refusal(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(
        servers, Handler(mail_replies={1: "550 5.7.1 Not allowed to send as this address"})
    )
    with pytest.raises(DeliveryError) as info:
        provider(server).send_batch([make_message(1)])
    assert not info.value.retryable and "newsletter.from" in (info.value.hint or "")


def test_a_permanent_error_for_one_message_fails_it_alone_and_a_refused_session_fails_the_batch(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    """smtplib refuses the first message for good (a feature the server lacks for it): that
    message fails and the session goes on with the others. A session the server will not
    give (STARTTLS not offered) stops the batch at once, after one connection, failing nobody."""
    server = plain(servers)
    p = provider(server)
    opened: list[Any] = []
    connect = p.connect

    def connect_once() -> Any:
        conn = connect()
        opened.append(conn)
        send_message = conn.send_message

        def refusing(msg: Any, from_addr: Any = None, to_addrs: Any = None, **kw: Any) -> Any:
            if to_addrs == ["reader1@example.com"]:
                raise smtplib.SMTPNotSupportedError("the server does not support what this message needs")
            return send_message(msg, from_addr=from_addr, to_addrs=to_addrs, **kw)

        conn.send_message = refusing
        return conn

    p.connect = connect_once  # type: ignore[method-assign]
    results = p.send_batch([make_message(i) for i in (1, 2, 3)])
    assert [(r.ledger_id, r.status) for r in results] == [(1, "failed"), (2, "sent"), (3, "sent")]
    assert "SMTPNotSupportedError" in (results[0].error or "")
    assert [r.rcpt_tos for r in server.handler.received] == [["reader2@example.com"], ["reader3@example.com"]]
    assert len(opened) == 1

    refused = provider(server, smtp_security="starttls")
    attempts: list[int] = []
    starttls_connect = refused.connect

    def counted() -> Any:
        attempts.append(1)
        return starttls_connect()

    refused.connect = counted  # type: ignore[method-assign]
    with pytest.raises(BlockedError, match="does not offer STARTTLS"):
        refused.send_batch([make_message(i) for i in (4, 5, 6)])
    assert len(attempts) == 1
    assert len(server.handler.received) == 2


def test_connection_lost_during_data_is_uncertain_for_that_message(
    servers: list[EphemeralController], make_message: MessageFactory
) -> None:
    server = plain(servers, Handler(drop_after_data={"reader2@example.com"}))
    with pytest.raises(PartialBatchError) as info:
        provider(server).send_batch([make_message(i) for i in (1, 2, 3)])
    err = info.value
    assert err.uncertain == (2,)
    assert [(r.ledger_id, r.status) for r in err.results] == [(1, "sent"), (3, "deferred")]
    # And the server had indeed queued message 2: resending it blindly would duplicate it.
    assert [r.rcpt_tos[0] for r in server.handler.received] == [
        "reader1@example.com",
        "reader2@example.com",
    ]


def unreachable() -> tuple[SmtpProvider, int]:
    """A provider for a port nothing listens on (bound once, then let go), and that port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return SmtpProvider(Delivery(provider="smtp", smtp_host="127.0.0.1", smtp_port=port, smtp_security="none",
                                 timeout=2)), port


def test_nothing_listening_is_retryable(make_message: MessageFactory) -> None:
    p, port = unreachable()
    with pytest.raises(DeliveryError) as info:
        p.send_batch([make_message(1)])
    assert info.value.retryable
    # One line naming the server and the keys to check, no exception class names.
    assert str(info.value) == (f"smtp: 127.0.0.1:{port} refused the connection "
                               "(if it persists, check delivery.smtp_host, smtp_port and smtp_security)")


def test_refusals_and_a_bad_from_need_no_server(make_message: MessageFactory) -> None:
    """Each message is built before the session opens (build_mime_message, the check a dry run
    runs too): refused addresses and a bad From are found with nothing listening."""
    p, _port = unreachable()
    refused = [make_message(1, to_email="no address"), make_message(2, to_email="x@y@example.com")]
    results = p.send_batch(refused)
    assert [r.status for r in results] == ["invalid", "invalid"]
    assert p.refusals(refused) == results  # what a dry run reports, reasons included
    bad_from = [make_message(i, from_addr="Field Notes <digest@>") for i in (1, 2)]
    with pytest.raises(BlockedError) as info:
        p.send_batch(bad_from)
    assert str(info.value) == (
        "smtp: bad From address: not an email address: 'Field Notes <digest@>' "
        "(check newsletter.from)"
    )
    with pytest.raises(BlockedError, match="bad From address"):
        p.refusals(bad_from)


def test_check_without_login(servers: list[EphemeralController]) -> None:
    server = plain(servers)
    assert provider(server).check() == f"smtp: reached 127.0.0.1:{server.port} (none)"
    assert server.handler.received == []
