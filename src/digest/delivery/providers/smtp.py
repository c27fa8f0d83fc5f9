"""SMTP: one session per batch, one ``send_message`` per message, with TLS and AUTH.

Each batch opens one connection to ``delivery.smtp_host``: implicit TLS (``smtp_security:
tls``, port 465), STARTTLS (``starttls``, port 587; refused if the server does not offer it)
or, for tests only, plain text (``none``). It logs in when ``delivery.username`` is set, sends
every message of the batch (built by :func:`digest.delivery.mime.build_mime`, the same bytes
the outbox writes) with its own envelope, and quits.

Before anything goes out for it, each message is built by
:meth:`~digest.delivery.providers.base.MimeProvider.build_mime_message`, the check a dry run
runs too: an address no header can carry is ``invalid`` without reaching the server, and a
From address that cannot be used stops the batch with a
:class:`~digest.errors.BlockedError`. The session opens for the first message to send, so
neither needs a server.

Replies map to results and errors like this:

* a refused recipient (``RCPT TO`` answered 5xx): ``invalid`` for 501/553 (a malformed or
  disallowed address), ``rejected`` for the rest (550 no such user, 554 ...), unless the reply
  refuses the session rather than the reader: a server that will not relay for us ("554 5.7.1
  Relay access denied") or wants a login first (530, "5.7.0 Authentication required") answers
  every RCPT alike, so that stops the send like refused credentials (a :class:`BlockedError`,
  an :class:`~digest.errors.AuthError` for the login), nobody marked; a 4xx for one
  recipient (greylisting, full mailbox) is ``deferred``: not sent now, the batch goes on, and
  the sender puts it back in the queue for a later attempt;
* content refused after ``DATA`` with 5xx: ``rejected``;
* 421 at any point (the server is closing the connection), any other 4xx for the sender or the
  data, or a connection that fails before the message data went out: a retryable
  :class:`DeliveryError` for that message: nothing of it was accepted;
* the connection lost **while** the message data was being sent or its reply awaited:
  nobody can tell whether the server queued it: that message is uncertain;
* a message the server cannot take as it is (smtplib's ``SMTPNotSupportedError``): a
  permanent :class:`DeliveryError`, that message ``failed``, the batch goes on.

Several messages per session makes a batch several "calls", so the partial-batch rules of
:func:`~digest.delivery.providers.base.send_in_calls` apply: messages accepted before a failure
stay ``sent``; after a retryable failure the rest come back ``deferred`` ("not sent") instead of
an error, because retrying the whole batch would send the accepted ones twice; when the
failure left one message uncertain, :class:`~digest.delivery.providers.base.PartialBatchError`
carries the known results and that message's ledger id. A session the server refuses for
good (a certificate, no STARTTLS, a 5xx greeting) is a :class:`BlockedError`: the send stops
with the batch back in the queue, since no reader of it could be sent anything.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Sequence
from typing import Any, ClassVar

import requests

from digest import clock
from digest.config import Delivery
from digest.delivery.providers.base import (
    BuiltMessage,
    MimeProvider,
    UncertainDeliveryError,
    response_text,
    send_in_calls,
)
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from digest.types import OutgoingMessage, ResultStatus, SendResult

_INVALID_CODES = frozenset({501, 553})  # syntax error in the address; mailbox name not allowed
_CLOSING = 421  # service not available, closing the channel: smtplib closes the socket too
_TLS_HINT = "check delivery.smtp_ca_file, or set delivery.smtp_verify: false for a test server"
# A refusal of the session rather than of the reader, whatever the address: the server will
# not relay for us ("554 5.7.1 <x>: Relay access denied", "550 relaying denied", "relay not
# permitted") or wants a login first (530, "5.7.0 Authentication required"). Each RCPT meets
# it alike, so it stops the send, as refused credentials do; "550 5.1.1 user unknown" and the
# like stay the reader's own.
_RELAY_DENIED_RE = re.compile(
    r"\brelay(ing)?\b[^.;]*?\b(denied|not\s+permitted|not\s+allowed|prohibited|refused|forbidden)\b"
    r"|\b(denied|not\s+permitted|not\s+allowed|prohibited|refused|forbidden)\b[^.;]*?\brelay(ing)?\b"
    r"|\b(unable\s+to|cannot|can't|do\s+not|does\s+not|will\s+not)\s+relay\b",
    re.IGNORECASE,
)
_AUTH_REQUIRED_RE = re.compile(r"\bauthentication\s+(is\s+)?required\b|\bmust\s+authenticate\b", re.IGNORECASE)
_AUTH_REQUIRED = 530  # authentication required (RFC 4954)
_LOGIN_HINT = ("the server wants a login (or TLS) before it relays: set delivery.username and "
               "delivery.password, and check delivery.smtp_security")
_RELAY_HINT = ("the server will not relay for this client: check delivery.smtp_host, delivery.username and "
               "delivery.password, or allow this host to relay on the server")


class _Session(smtplib.SMTP):
    """smtplib.SMTP that remembers whether the message data has started to go out."""

    in_data: bool = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.in_data = True
        return super().data(msg)


class _TlsSession(smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL (implicit TLS) that remembers whether the data has started to go out."""

    in_data: bool = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.in_data = True
        return super().data(msg)


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return response_text(f"{code} {text}".strip())


class SmtpProvider(MimeProvider):
    """Sends through an SMTP server, one session per batch; see the module docstring."""

    name: ClassVar[str] = "smtp"
    max_batch: ClassVar[int] = 100

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        super().__init__(settings, session)
        if not settings.smtp_host:
            raise ConfigError("delivery.smtp_host: provider smtp needs a server")
        self.host = settings.smtp_host
        self.port = settings.smtp_port_or_default
        self.security = settings.smtp_security
        self.timeout = settings.timeout

    # -- the connection -------------------------------------------------------------------------

    def tls_context(self) -> ssl.SSLContext:
        """The client TLS context: system CAs, or ``smtp_ca_file``; no checks if not verifying."""
        context = ssl.create_default_context(cafile=self.settings.smtp_ca_file)
        if not self.settings.smtp_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def connect(self) -> _Session | _TlsSession:
        """An open, secured and logged-in session; errors mapped to :class:`DeliveryError`."""
        where = f"{self.host}:{self.port}"
        conn: _Session | _TlsSession | None = None
        try:
            if self.security == "tls":
                conn = _TlsSession(
                    self.host, self.port, timeout=self.timeout, context=self.tls_context()
                )
            else:
                conn = _Session(self.host, self.port, timeout=self.timeout)
            conn.ehlo()
            if self.security == "starttls":
                if not conn.has_extn("starttls"):
                    # Why refuse rather than go on in clear: the password and every reader's
                    # address would cross the network unencrypted.
                    raise BlockedError(
                        f"smtp: {where} does not offer STARTTLS",
                        hint="use delivery.smtp_security: tls (port 465) if the server wants "
                        "implicit TLS",
                    )
                conn.starttls(context=self.tls_context())
                conn.ehlo()
            if self.settings.username:
                conn.login(self.settings.username, self.settings.password or "")
            return conn
        except Exception as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, DeliveryError):
                raise
            mapped = self._connect_error(exc, where)
            if mapped is None:
                raise
            raise mapped from exc

    def _connect_error(self, exc: Exception, where: str) -> DeliveryError | None:
        what = f"smtp: {type(exc).__name__} connecting to {where}: {exc}"
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return AuthError(
                f"smtp: {where} refused the login: {_reply(exc.smtp_code, exc.smtp_error)}",
                status=exc.smtp_code,
                hint="check delivery.username and delivery.password",
            )
        # Why BlockedError for what follows: the server refuses the session itself, whoever
        # the readers are (a setting, a certificate, a server that will not take our mail), so
        # the send stops with the batch back in the queue instead of failing its readers.
        if isinstance(exc, smtplib.SMTPNotSupportedError):
            return BlockedError(
                what,
                hint="the server offers no AUTH here; it may want TLS first (smtp_security)",
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return BlockedError(what, hint=_TLS_HINT)
        if isinstance(exc, smtplib.SMTPResponseException):
            code = exc.smtp_code
            said = f"smtp: {where} answered {_reply(code, exc.smtp_error)}"
            if 400 <= code < 500:
                return DeliveryError(said, retryable=True, status=code)
            return BlockedError(said, status=code,
                                hint="the server refuses the session: check delivery.smtp_host and its settings")
        if isinstance(exc, ConnectionRefusedError):
            return DeliveryError(f"smtp: {where} refused the connection", retryable=True,
                                 hint="if it persists, check delivery.smtp_host, smtp_port and smtp_security")
        if isinstance(exc, (OSError, smtplib.SMTPException)):
            # Refused, timed out, DNS, TLS handshake cut, server hung up: nothing was sent.
            return DeliveryError(what, retryable=True,
                                 hint="if it persists, check delivery.smtp_host, smtp_port and smtp_security")
        return None  # a bug: let it show

    @staticmethod
    def _quit(conn: smtplib.SMTP) -> None:
        try:
            conn.quit()
        except (smtplib.SMTPException, OSError):
            conn.close()  # the messages already accepted stay accepted

    # -- sending ------------------------------------------------------------------------------

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One session for the batch, one transaction per message; see the module docstring.

        The session opens when the first message to send has been built, so a refused address
        or a bad From (:meth:`build_mime_message`) is found without reaching the server.
        """
        if not messages:
            return []
        self._check_batch(messages)
        now = clock.now()
        session: list[_Session | _TlsSession] = []  # the batch's one session, once opened

        def send_call(ms: Sequence[OutgoingMessage]) -> list[SendResult]:
            built = self.build_mime_message(ms[0], now)
            if isinstance(built, SendResult):
                return [built]
            if not session:
                # A failure here sent nothing of this batch, and stops it (connect raises only
                # errors that stop a batch): send_in_calls raises it as it is.
                session.append(self.connect())
            return [self._send_one(session[0], ms[0], built)]

        try:
            return send_in_calls(self.name, [[m] for m in messages], send_call)
        finally:
            if session:
                self._quit(session[0])

    def _send_one(
        self, conn: _Session | _TlsSession, msg: OutgoingMessage, built: BuiltMessage
    ) -> SendResult:
        mime, from_addr, to_addr = built.mime, built.mail_from, built.rcpt_to
        message_id = str(mime["Message-ID"])
        conn.in_data = False
        try:
            conn.send_message(mime, from_addr=from_addr, to_addrs=[to_addr])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients.get(to_addr, (550, b"refused"))
            reply = _reply(code, text)
            if code == _CLOSING:
                raise self._closing(reply) from exc
            refusal = self._session_refusal(f"smtp: RCPT TO <{to_addr}> refused: {reply}", code, reply)
            if refusal is not None:
                raise refusal from exc
            status: ResultStatus
            if 500 <= code < 600:
                status = "invalid" if code in _INVALID_CODES else "rejected"
            else:
                status = "deferred"  # a temporary refusal of this one address: not sent
            return SendResult(msg.ledger_id, status, None, f"RCPT TO refused: {reply}")
        except smtplib.SMTPSenderRefused as exc:
            reply = _reply(exc.smtp_code, exc.smtp_error)
            if exc.smtp_code == _CLOSING:
                raise self._closing(reply) from exc
            if exc.smtp_code < 500:
                raise DeliveryError(
                    f"smtp: MAIL FROM <{from_addr}> refused for now: {reply}",
                    retryable=True,
                    status=exc.smtp_code,
                ) from exc
            what = f"smtp: MAIL FROM <{from_addr}> refused: {reply}"
            raise self._session_refusal(what, exc.smtp_code, reply) or BlockedError(
                what, status=exc.smtp_code, hint="the server will not send as newsletter.from"
            ) from exc
        except smtplib.SMTPDataError as exc:
            reply = _reply(exc.smtp_code, exc.smtp_error)
            if 500 <= exc.smtp_code < 600:
                return SendResult(msg.ledger_id, "rejected", None, f"DATA refused: {reply}")
            # 421 or another 4xx after DATA: the server answered, and did not take it.
            raise (
                self._closing(reply)
                if exc.smtp_code == _CLOSING
                else DeliveryError(
                    f"smtp: DATA refused for now: {reply}", retryable=True, status=exc.smtp_code
                )
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            # The server lacks what this message needs: no retry changes that. Caught before
            # OSError, which smtplib's errors derive from.
            raise DeliveryError(f"smtp: {type(exc).__name__}: {exc}", retryable=False) from exc
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            if conn.in_data:
                # Why uncertain: the data (or part of it) went out and the final reply never
                # came; the server may have queued the message before the line dropped.
                raise UncertainDeliveryError(
                    f"smtp: connection lost while sending the message to {to_addr}: {exc}; "
                    "the server may have accepted it",
                    retryable=True,
                ) from exc
            raise DeliveryError(
                f"smtp: connection lost before the message to {to_addr} was sent: {exc}",
                retryable=True,
            ) from exc
        except smtplib.SMTPException as exc:
            raise DeliveryError(f"smtp: {type(exc).__name__}: {exc}", retryable=False) from exc
        return SendResult(msg.ledger_id, "sent", message_id)

    def _session_refusal(self, what: str, code: int, reply: str) -> BlockedError | None:
        """The error for a 5xx that refuses the session, not the address it answers (see
        ``_RELAY_DENIED_RE``): an :class:`AuthError` when the server wants a login, a
        :class:`BlockedError` when it will not relay. None for a refusal of that reader alone."""
        if not 500 <= code < 600:
            return None
        if code == _AUTH_REQUIRED or _AUTH_REQUIRED_RE.search(reply):
            hint = ("the server does not take the login given for relaying: check delivery.username and "
                    "delivery.password" if self.settings.username else _LOGIN_HINT)
            return AuthError(what, status=code, hint=hint)
        if _RELAY_DENIED_RE.search(reply):
            return BlockedError(what, status=code, hint=_RELAY_HINT)
        return None

    @staticmethod
    def _closing(reply: str) -> DeliveryError:
        return DeliveryError(
            f"smtp: the server is closing the connection: {reply}", retryable=True, status=_CLOSING
        )

    def check(self) -> str:
        """Connect, secure, log in and quit: proves host, port, TLS and credentials."""
        conn = self.connect()
        self._quit(conn)
        login = f", logged in as {self.settings.username}" if self.settings.username else ""
        return f"smtp: reached {self.host}:{self.port} ({self.security}{login})"
