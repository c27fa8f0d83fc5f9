"""The send loop: audience, batching, rate limit, concurrency, retries, and the send ledger.

For each batch: claim rows in a committed transaction (rule 1), build one personalized
message per row without recompiling MJML (or, for providers that personalize server-side,
one template plus per-recipient values), hand the batch to the provider, and settle each row
with the provider's verdict. Whatever happens in between is covered:

* a retryable error (network failure before the request went out, 429, a 5xx such as 500
  or 503 that the provider itself answered) is retried with exponential backoff and jitter,
  honouring ``Retry-After`` (capped);
* an error after the provider may have accepted the batch (a read timeout, a reset, an
  unreadable answer, a 502, 504 or 524 from a gateway in front of the provider) marks its rows
  ``uncertain``; they are never resent silently (``digest send --resolve-uncertain``) —
  except through a provider with an idempotency key (Resend), where the same batch is resent
  with the same key and the provider itself drops the duplicate: only a batch claimed through
  the very same key space (:func:`sent_via`), since another provider or account never saw it;
* an auth error releases the batch and stops the send with a clear message;
* a permanent error settles the batch as ``failed`` (in a batch sent as several calls, only
  the messages of the call it answered, unless every call met one);
* too many failed batches in a row (counted for the whole send: every worker, every process)
  pause it: with some of them refused for good, until the operator acts (the scheduled send
  passes it by, see :func:`held_message`); otherwise (uncertain, put back), until the next send;
* a database error stops at once (rule 9): rows left claimed become ``uncertain`` next time.

With ``delivery.concurrency`` above 1, that many workers run this loop side by side; each
claims its own batches, so the ledger keeps them apart.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from digest.config import Settings
from digest.delivery.providers.base import (
    HttpProvider,
    PartialBatchError,
    PreparedCall,
    Provider,
    UncertainDeliveryError,
    call_journal,
)
from digest.delivery.readers import LinkMaker, Readers, list_headers
from digest.errors import AuthError, BlockedError, DeliveryError, FreezeStopped, TakenOverError
from digest.http import backoff_delay
from digest.render import CompiledEmail, personalize, slot_values
from digest.store import Store
from digest.store.store import Claimed, ClaimedBatch, ResendRule, SendHold
from digest.types import (
    SLOT_NAMES,
    Draft,
    OutgoingMessage,
    Recipient,
    SendResult,
    TemplateMessage,
    TemplateRecipient,
)

log = logging.getLogger(__name__)

LEASE_SECONDS = 300
RENEW_EVERY = timedelta(seconds=LEASE_SECONDS / 10)
MAX_BACKOFF = 60.0
IDEMPOTENCY_MARGIN = timedelta(hours=1)
# How many times a later run resends an uncertain batch under its key by itself, keeping its
# draft in sending for it; a batch that is still uncertain then waits for the operator.
AUTO_RESENDS = 2
HOST = socket.gethostname()
# Who takes up a send that stopped or paused, in the messages that say so: the operator's
# next `digest send` (from cron, say), or by itself the send job of `digest serve`.
NEXT_SEND = "the next `digest send` (or the service's next send)"
# What `--resolve-uncertain resend` means for a message that cannot go out again under the key
# it went out with (no key, another provider's or account's, too old): a new request.
MAY_ARRIVE_TWICE = "with resend, any of them that did arrive arrive twice"


def sent_via(provider: Provider) -> str:
    """What a batch goes out through, as its claim records it (``send_batches.sent_via``): the
    provider's name, and for one with idempotency keys the hash of their space
    (:meth:`Provider.key_space`): ``resend:3f0c...``."""
    space = provider.key_space()
    return f"{provider.name}:{space}" if space else provider.name


def resend_rule(provider: Provider, now: datetime) -> ResendRule | None:
    """The uncertain batches a send through ``provider`` resends by itself under their keys
    (``None``: none, the provider has no keys): claimed through its key space, first sent within
    its idempotency window less a margin for clocks and retries, not resent :data:`AUTO_RESENDS`
    times already. ``digest send --resolve-uncertain resend`` leaves the same ones to it."""
    if not getattr(provider, "idempotent", False):
        return None
    window = getattr(provider, "idempotency_window", timedelta(hours=24))
    return ResendRule(sent_via(provider), now - max(timedelta(0), window - IDEMPOTENCY_MARGIN), 1 + AUTO_RESENDS)


def held_message(draft_id: int, hold: SendHold) -> str:
    """Why a send waits for the operator, and what resumes it: for the CLI, the service's log
    and ``digest status`` alike."""
    return (f"paused after {hold.batches} failed batches in a row, {hold.messages} messages in them refused "
            f"for good (the last: {hold.reason or 'no reason recorded'}): no scheduled send resumes it; fix the "
            f"cause, then `digest send --retry-failed --draft {draft_id}` puts the failed messages back in the "
            f"queue and resumes the send (`digest send --draft {draft_id}` resumes it without them)")


def lease_holder() -> str:
    """``host:pid:random``: unique, and tells a later process on this host whether we are alive."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def holder_is_dead(holder: str) -> bool:
    """True for a holder that was a process on this host and is gone (killed, crashed).

    Lets a restart after ``kill -9`` take over at once instead of waiting out the lease;
    holders on other hosts are trusted until their lease expires.
    """
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class SendSummary:
    """What one run of the sender did."""

    draft_id: int
    # Messages this run set out to send (pending when it started, and uncertain ones an
    # idempotent provider resends); 0 when unknown (a dry run).
    total: int = 0
    # What this run did: sent, failed by reason, made uncertain (``done`` adds them up).
    sent: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    uncertain: int = 0
    # Rows a sender that died had in flight, found and marked uncertain as this run started.
    stale: int = 0
    # The draft's uncertain messages when the run ended (this run's, a dead sender's, earlier
    # runs'): they wait for the operator (``digest send --resolve-uncertain``).
    uncertain_total: int = 0
    # Of those, how many the next run resends by itself under their idempotency keys.
    resendable: int = 0
    # Messages still to send when the run ended (a paused or stopped send: the next run's).
    pending: int = 0
    # Messages still claimed when the run ended: a helper process died with them in flight,
    # and the next run marks them uncertain (rule 1; in a batch sent call by call, only those
    # whose call had started: the others go back to the queue).
    in_flight: int = 0
    # Provider calls made again after a rate limit, a 5xx or a network error (the same batch;
    # after a 502, a 504 or a timeout only under an idempotency key).
    retries: int = 0
    # A dry run: the provider calls the send would make.
    calls: int = 0
    skipped: int = 0
    batches: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    # Stopped by a refusal every batch would meet (credentials, account, configuration: a
    # BlockedError), so another draft through the same provider would stop the same way.
    blocked: bool = False
    # Paused until the operator acts (failed batches in a row, see Store.hold_send): the
    # scheduled send passes it by, so it waits for `digest send --draft N` or --retry-failed.
    held: bool = False
    # Nothing for this run to do: another sender has the draft, or finished it meanwhile.
    idle: bool = False
    finished: bool = False
    dry_run: bool = False
    # A dry run that a stop request (Ctrl-C, SIGTERM) ended: its counts cover only the batches
    # built so far, and `digest send --dry-run` exits as a send interrupted does.
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def done(self) -> int:
        """Messages settled so far in this run, whatever their fate (a reader who
        unsubscribed, bounced or complained since the send started is skipped at claim time)."""
        return self.sent + sum(self.failed.values()) + self.uncertain + self.skipped

    @property
    def for_operator(self) -> int:
        """Uncertain messages only the operator can settle (not a dry run's, not those the
        next run resends under their keys by itself)."""
        return 0 if self.dry_run else max(0, self.uncertain_total - self.resendable)

    def uncertain_hint(self) -> str:
        """What to do about :attr:`for_operator`, for the CLI and the service's log alike."""
        return (f"{self.for_operator} messages may or may not have gone out: `digest status` lists them; "
                f"settle them with `digest send --resolve-uncertain resend|mark-sent --draft {self.draft_id}` "
                f"({MAY_ARRIVE_TWICE})")

    def tally(self) -> dict[str, Any]:
        """The counts, as a helper process reports them to the sender it works for."""
        return {"sent": self.sent, "failed": dict(self.failed), "uncertain": self.uncertain,
                "skipped": self.skipped, "batches": self.batches, "retries": self.retries}


class FailureStreak:
    """Failed batches in a row, for the whole send: every worker counts each of its batches
    here, and with ``delivery.processes`` so does every process (the counts are then in
    shared memory, :meth:`shared`). A batch that goes out resets it; the batch that makes it
    reach the limit trips it, once, whatever the batches in flight then do.

    Counts: the batches in a row; of them, those the provider refused for good, and their
    messages (the others were made uncertain, or put back whole, the provider saying "later");
    and whether it has tripped.
    """

    def __init__(self, counts: Any = None) -> None:
        self.counts = counts if counts is not None else [0, 0, 0, 0]
        self._lock = counts.get_lock() if counts is not None else threading.Lock()

    @property
    def tripped(self) -> bool:
        return bool(self.counts[3])

    @staticmethod
    def shared(ctx: Any) -> Any:
        """Counts a helper process can share (given to it when it starts)."""
        return ctx.Array("i", 4)

    def add(self, outcome: str, refused: int, limit: int) -> tuple[int, tuple[int, int] | None]:
        """Count a batch's outcome (:meth:`Sender._deliver`'s), ``refused`` its messages the
        provider refused for good; returns the batches now in a row and, when this batch trips
        the limit, the refused batches and messages among them."""
        with self._lock:
            c = self.counts
            if outcome in ("ok", "deferred"):
                c[0] = c[1] = c[2] = 0
            elif outcome in ("failed", "back"):
                c[0] += 1
                if refused:
                    c[1] += 1
                    c[2] += refused
                if not c[3] and c[0] >= limit:
                    c[3] = 1
                    return int(c[0]), (int(c[1]), int(c[2]))
            return int(c[0]), None


class BatchJournal:
    """A claimed batch's :class:`~digest.delivery.providers.base.CallJournal`: a provider that
    sends the batch as several calls (SES, SMTP, full bodies through SendGrid or Mailgun) marks
    each call's rows in the ledger before the call starts, and records the answered ones with
    the next mark. A kill -9 then leaves uncertain only the calls that were in flight (and any
    answered since the last mark); the rest go back to the queue.

    Calls that start while a record is being written share the next one (a group commit): with
    ``delivery.concurrency`` calls in flight, a record can cover several starts, and each call
    waits only until its own rows are durably marked. Once a record has failed, no other call
    of the batch starts: each is refused with that error.

    One journal serves every attempt at the batch; :attr:`answered` keeps the last verdict the
    provider gave each message, for the batch's verdict when it is given up.
    """

    def __init__(self, store: Store, batch: ClaimedBatch, draft_id: int, provider: str,
                 now: Callable[[], datetime]) -> None:
        self.store = store
        self.batch = batch
        self.draft_id = draft_id
        self.provider = provider
        self.now = now
        self._done: list[SendResult] = []
        self._starting: list[int] = []
        self._cond = threading.Condition()
        self._writing = False
        self._queued = 0  # the record now being gathered (starts waiting for it)
        self._written = -1  # the last record written
        self._failures: dict[int, BaseException] = {}  # records that failed, by number
        self._broken: BaseException | None = None  # the first failure: no call starts after it
        self.answered: dict[int, SendResult] = {}

    def starting(self, ledger_ids: Sequence[int]) -> None:
        self._record(ledger_ids)

    def finished(self, results: Sequence[SendResult]) -> None:
        with self._cond:
            self._done.extend(results)
            for r in results:
                if r.status == "deferred":
                    self.answered.pop(r.ledger_id, None)
                else:
                    self.answered[r.ledger_id] = r

    def flush(self) -> None:
        """Record the answers kept so far (before waiting to retry the batch)."""
        if self._done:
            self._record(())

    def _record(self, ledger_ids: Sequence[int]) -> None:
        with self._cond:
            self._starting.extend(ledger_ids)
            mine = self._queued
            while self._writing and self._written < mine:
                self._cond.wait()
            if self._written >= mine:  # another thread's record took these ids too
                if mine in self._failures:
                    raise self._failures[mine]
                return
            if self._broken is not None:
                raise self._broken
            # This thread writes record ``mine``: every start gathered so far; later arrivals
            # gather for the next one.
            self._writing = True
            self._queued += 1
            starting, self._starting = self._starting, []
            done, self._done = self._done, []
        failed: BaseException | None = None
        try:
            self.store.record_calls(self.batch, self.draft_id, starting, done, self.provider, self.now())
        except BaseException as exc:
            failed = exc
            raise
        finally:
            with self._cond:
                if failed is not None:
                    self._done[:0] = done  # not recorded: the batch's verdict still has them
                    self._failures[mine] = failed
                    self._broken = self._broken or failed
                self._written = mine
                self._writing = False
                self._cond.notify_all()


class TokenBucket:
    """At most ``rate`` acquisitions per second, bursts up to ``burst``. Thread-safe.

    The burst is one by default, and the bucket starts with one token: calls are spaced
    ``1 / rate`` apart from the first. A full bucket at the start (or after a quiet spell)
    would let twice the rate through in the first second, in every sending process: Resend's
    2 calls a second would be 4, and answered with 429s."""

    def __init__(self, rate: float, burst: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.capacity = burst
        self.tokens = min(1.0, burst)
        self.clock = clock
        self.sleep = sleep
        self.last = clock()
        self._lock = threading.Lock()

    def acquire(self, stopping: Callable[[], bool] | None = None) -> bool:
        """Take a token, waiting for one; with ``stopping``, the wait is in slices of at most
        0.2 s and ends, taking nothing, once it returns True: then False."""
        while True:
            with self._lock:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1 - 1e-9:  # tolerance: float sums of waits land a hair under 1
                    self.tokens = max(0.0, self.tokens - 1)
                    return True
                wait = (1 - self.tokens) / self.rate
            if stopping is None:
                self.sleep(wait)
                continue
            if stopping():
                return False
            self.sleep(min(wait, 0.2))


def retry_wait(attempt: int, retry_after: float | None) -> float:
    """Seconds to wait after failed attempt ``attempt``: :func:`~digest.http.backoff_delay`
    (the provider's ``Retry-After`` honoured up to the 300 s its parser allows: the wait renews
    the lease, and a stop request ends it), with jitter that only lengthens it, so that the
    retries of several workers spread out and none comes before the provider said."""
    return backoff_delay(attempt, retry_after, cap=MAX_BACKOFF) * random.uniform(1.0, 1.25)


def _domain(from_addr: str) -> str:
    return from_addr.rpartition("@")[2].strip("> ") or "digest.local"


def message_id(draft_id: int, ledger_id: int, email: str, domain: str) -> str:
    """A Message-ID that is the same every time the same message is built (idempotent resends)."""
    tag = hashlib.sha256(f"{draft_id}:{ledger_id}:{email}".encode()).hexdigest()[:16]
    return f"<digest.{draft_id}.{ledger_id}.{tag}@{domain}>"


def build_message(draft: Draft, compiled: CompiledEmail, settings: Settings, ledger_id: int,
                  recipient: Recipient, links: tuple[str, str]) -> OutgoingMessage:
    """One recipient's message: personalized body, one-click unsubscribe headers (RFC 8058)."""
    unsubscribe_url, preferences_url = links
    html, text = personalize(compiled, name=recipient.name, unsubscribe_url=unsubscribe_url,
                             preferences_url=preferences_url)
    assert draft.id is not None
    return OutgoingMessage(
        ledger_id=ledger_id,
        draft_id=draft.id,
        to_email=recipient.email,
        to_name=recipient.name,
        from_addr=settings.newsletter.from_,
        subject=compiled.subject,
        html=html,
        text=text,
        headers=list_headers(ledger_id, unsubscribe_url),
        reply_to=settings.newsletter.reply_to,
        message_id=message_id(draft.id, ledger_id, recipient.email, _domain(settings.newsletter.from_)),
        tag=f"digest-{draft.id}",
    )


def template_message(draft: Draft, compiled: CompiledEmail, settings: Settings) -> TemplateMessage:
    """What every recipient shares, for providers that personalize server-side."""
    assert draft.id is not None
    return TemplateMessage(
        draft_id=draft.id, from_addr=settings.newsletter.from_, subject=compiled.subject,
        html_parts=compiled.html_parts, html_slots=compiled.html_slots,
        text_parts=compiled.text_parts, text_slots=compiled.text_slots,
        reply_to=settings.newsletter.reply_to, tag=f"digest-{draft.id}",
        plain_slots=plain_link_slots(settings.newsletter.public_url),
    )


def plain_link_slots(public_url: str) -> frozenset[str]:
    """The link slots whose HTML value is their text value for every reader: a link is the
    public URL's prefix and a token of letters, digits, ``-``, ``_`` and ``.``, which nothing
    escapes, so it is the prefix that decides. (Providers still compare the two values of
    each reader, so a link that broke this would be refused, not sent wrong.)"""
    probe = "0.aZ-_9"
    unsubscribe, preferences = f"{public_url}/u/{probe}", f"{public_url}/preferences/{probe}"
    html, text = slot_values(name="", unsubscribe_url=unsubscribe, preferences_url=preferences)
    return frozenset(slot for slot, h, t in zip(SLOT_NAMES, html, text, strict=True)
                     if slot != "name" and h == t)


_ARENAS_SHARED = False
_M_ARENA_MAX = -8  # glibc's mallopt() parameter number


def share_malloc_arena() -> None:
    """Have this process's threads allocate from one malloc arena (glibc; elsewhere, nothing).

    glibc gives each thread that allocates an arena of its own and keeps what a thread freed
    for that thread's next allocations. The sender's workers each build a batch's request
    (a megabyte and more, for a moment) in turn, so each arena grows to a batch's size: four
    workers sending a million SendGrid recipients peaked about 7 MB higher than with one
    shared arena, at the same rate. Sharing costs little: the interpreter lock already lets
    only one thread at a time allocate Python objects. Called by :meth:`Sender.work` before
    its threads start, in every process of a send (``delivery.processes`` too), when the
    provider personalizes server-side.
    """
    global _ARENAS_SHARED
    if _ARENAS_SHARED:
        return
    _ARENAS_SHARED = True
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (musl, macOS): its allocator, its rules
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_ARENA_MAX, 1)


def share_of(settings: Settings) -> Settings:
    """The settings one of ``delivery.processes`` sender processes runs with: its share of
    the rate, and no processes of its own."""
    delivery = settings.delivery
    if delivery.processes == 1:
        return settings
    share = delivery.model_copy(update={"rate_per_second": delivery.rate_per_second / delivery.processes,
                                        "processes": 1})
    return settings.model_copy(update={"delivery": share})


def _helper_main(settings: Settings, draft_id: int, parent: int, stop: Any, go: Any, conn: Any,
                 streak: Any = None) -> None:
    """One helper process of a send (``delivery.processes``): workers claiming from the same
    ledger as the parent, which holds the lease. Reports its summary through ``conn``.

    Started while the parent freezes the audience: it gets ready (imports, database, the
    compiled draft) meanwhile, then waits for ``go`` before its first claim.
    Stops after the batch in flight when the parent says so or is gone (killed: its rows in
    flight stay claimed, and the next send marks them uncertain, as for any crash).
    """
    import signal

    from digest import pipeline  # here, not at the top: pipeline imports this module

    # The parent stops its helpers (``stop``, or by being gone). A Ctrl-C on the terminal, or
    # systemd's SIGTERM to the whole service, reaches every process: it must not cut a helper's
    # batch in flight (its readers would become uncertain) before the parent asks it to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def orphaned() -> bool:
        return os.getppid() != parent

    report: dict[str, Any] = {}
    try:
        app = pipeline.App.open(settings)
        try:
            draft = app.store.get_draft(draft_id)
            def progress(summary: SendSummary, size: int) -> None:  # called under the sender's lock
                conn.send({**summary.tally(), "size": size})

            sender = Sender(app.store, app.provider, settings, draft, pipeline.compile_for(app, draft),
                            app.link_pair, now=app.now, should_stop=orphaned, on_batch=progress)
            sender._peers = stop  # its own halt (refused credentials ...) stops the others too
            sender._streak = FailureStreak(streak)  # failed batches in a row, counted with the others
            while not go.wait(0.2):
                if stop.is_set() or orphaned():
                    break
            summary = sender.work() if go.is_set() else SendSummary(draft_id)
            report = {**summary.tally(), "final": True, "stopped": sender._stop, "blocked": sender._blocked}
        finally:
            app.close()
    except BaseException as exc:  # reported, so the parent stops the send with the reason
        report = {"error": f"{type(exc).__name__}: {exc}", "final": True}
    try:
        conn.send(report)
    except OSError:  # the parent is gone (killed): nobody to tell, and nothing to say on stderr
        pass


class Sender:
    """Sends one draft through one provider, resumably."""

    def __init__(
        self,
        store: Store,
        provider: Provider,
        settings: Settings,
        draft: Draft,
        compiled: CompiledEmail,
        links: LinkMaker,
        *,
        now: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
        on_batch: Callable[[SendSummary, int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        max_consecutive_failures: int = 3,
        resume: bool = False,
    ) -> None:
        assert draft.id is not None
        self.store = store
        self.provider = provider
        self.settings = settings
        self.draft = draft
        self.compiled = compiled
        self.links = links
        self.now = now
        self.sleep = sleep
        self.on_batch = on_batch
        self.should_stop = should_stop
        self.max_consecutive_failures = max_consecutive_failures
        # The operator resumes a send paused for them (`digest send --draft N`): the scheduled
        # send does not.
        self.resume = resume
        self._streak = FailureStreak()
        self._failure = threading.local()  # each worker's last failed batch: why (its error)
        self.holder = lease_holder()
        size = settings.delivery.batch_size or provider.max_batch
        self.batch_size = max(1, min(size, provider.max_batch))
        self.processes = settings.delivery.processes
        # Each process of a send takes its share of the rate. Its waits are real whatever
        # ``sleep`` is (a test's, which records the retry waits instead of sleeping them): a
        # rate is about real time, and a wait that took none would only spin until it passed.
        self.bucket = TokenBucket(settings.delivery.rate_per_second / self.processes)
        self._peers: Any = None  # with helper processes: the event that stops them all
        self._go: Any = None  # ... and the one that lets them claim, once the audience is frozen
        self.concurrency = max(1, int(getattr(settings.delivery, "concurrency", 1) or 1))
        self.idempotent = bool(getattr(provider, "idempotent", False))
        self.via = sent_via(provider)
        # Providers that take a template and per-recipient values (server-side substitution,
        # or a client-side build that encodes the shared parts once) get one; others get
        # finished messages.
        server_side = bool(getattr(provider, "personalizes", False))
        use_template = bool(getattr(provider, "accepts_templates", False)) or (
            server_side and settings.delivery.server_side_personalization)
        self.template = template_message(draft, compiled, settings) if use_template else None
        self.server_side = self.template is not None and server_side
        if self.template is None and getattr(provider, "parallel_calls", False):
            self.concurrency = 1  # the provider runs delivery.concurrency calls inside each batch
            if not settings.delivery.batch_size:
                # A batch of one call per message is about a second of calls at the rate
                # limit, not the provider's limit (50 for SES at 14 a second, 1000 full bodies
                # for SendGrid at 50): a stop (Ctrl-C, the service's shutdown) waits for the
                # batch in flight, and 50 SES calls are 3.5 s. (A kill -9 costs no more with a
                # larger batch: its calls are recorded one by one, see BatchJournal.)
                per_second = math.ceil(settings.delivery.rate_per_second / self.processes)
                self.batch_size = min(self.batch_size, max(settings.delivery.concurrency, per_second))
        self.domain = _domain(settings.newsletter.from_)
        self._lock = threading.Lock()
        # One worker at a time prepares or builds a batch: the interpreter runs one thread at
        # a time anyway, and a batch is at its largest while it is being built (a megabyte
        # and more for a SendGrid batch of 1000), so several built side by side would only
        # add up in memory.
        self._building = threading.Lock()
        self._stop: str | None = None
        self._renewed: datetime | None = None
        self._lease: str | None = None  # the draft's lease, held by run() (helpers hold none)

    # -- dry run -----------------------------------------------------------------------------

    def dry_run(self) -> SendSummary:
        """Render and batch everything a send starting now would, and build each batch's
        request as it would; send nothing and write nothing.

        The audience is the one :meth:`Store.start_send` would freeze (active, not suppressed),
        streamed, so a dry run of a million readers holds one batch at a time; for a send that
        has started (stopped, paused), what it has left (:meth:`Store.remaining`), with the
        readers a claim would now skip counted as ``skipped``. ``sent`` counts the messages the
        provider would be handed, ``failed`` those it would refuse before sending (an address
        no header can carry), by reason. A problem with every batch (a bad newsletter.from) is
        raised as the provider gives it, for the CLI to print.
        """
        summary = SendSummary(self.draft.id or 0, dry_run=True)
        if self._held(summary):  # what the send would do: pass it by
            return summary
        started = time.perf_counter()
        left = self.store.remaining(summary.draft_id)
        readers: Iterator[tuple[Claimed, bool]] = left if left is not None else (
            (Claimed(-(n + 1), sub.id, sub.email, sub.name), True) for n, sub in enumerate(self.store.audience()))
        batch: list[Claimed] = []
        for row, may_send in readers:
            if not may_send:
                summary.skipped += 1
                continue
            batch.append(row)
            if len(batch) >= self.batch_size:
                self._dry_batch(summary, batch)
                batch = []
                if self.should_stop():
                    break
        else:
            if batch:
                self._dry_batch(summary, batch)
        if self.should_stop():  # Ctrl-C (or SIGTERM) while it ran: the counts so far, said to be partial
            summary.stopped = "dry run interrupted (stopped on request): the counts cover the batches built so far"
            summary.interrupted = True
        summary.seconds = time.perf_counter() - started
        return summary

    def _dry_batch(self, summary: SendSummary, batch: Sequence[Claimed]) -> None:
        """One batch of a dry run: prepared and built as a send would, counted, let go."""
        refused = self._build_only(self._prepare(batch))
        summary.batches += 1
        # Provider calls the send would make for it (paced by delivery.rate_per_second): one
        # per batch, or one per message for providers that send a batch as several calls.
        per_message = self.template is None and self.provider.parallel_calls
        summary.calls += len(batch) - len(refused) if per_message else 1
        summary.sent += len(batch) - len(refused)
        for r in refused:  # the reasons a send would record for them
            summary.failed[r.status if r.status != "failed" else _reason(r.error or "failed")] += 1
        if self.on_batch:  # progress, as for a send: a dry run of a large list takes a while
            self.on_batch(summary, len(batch))

    def _build_only(self, prepared: list[OutgoingMessage] | Sequence[TemplateRecipient]) -> list[SendResult]:
        """Build the provider's request(s) for a prepared batch, as :meth:`_ready` and the
        provider's send would, without any I/O; returns the results of the messages left out
        of them (``PreparedCall.refused``).

        The pure build steps: ``build_template_request`` for a template batch, ``build_request``
        for full bodies (one request per message for providers that make a call per message,
        as SES does and SendGrid and Mailgun do with full bodies, each reader's body being
        their own), each checked against the provider's size limit. Without one, a template
        goes through ``template_sender``, which by contract builds but sends nothing until
        called; full bodies go through :meth:`Provider.refusals` (SMTP and the outbox build
        each message there exactly as their send does).
        """
        provider = self.provider
        calls: Iterable[PreparedCall]
        if self.template is not None:
            build_template = getattr(provider, "build_template_request", None)
            if build_template is None:
                provider.template_sender(self.template, prepared)  # type: ignore[arg-type]
                return []
            built = build_template(self.template, prepared)
            # SendGrid and Mailgun give the call and the ledger ids it carries.
            calls = [built[0] if isinstance(built, tuple) else built]
        else:
            build = getattr(provider, "build_request", None)
            if build is None:
                return provider.refusals(prepared)  # type: ignore[arg-type]
            # One at a time: a batch of full bodies built at once is tens of megabytes.
            calls = (build([m]) for m in prepared) if provider.parallel_calls else [build(prepared)]
        refused: list[SendResult] = []
        for call in calls:
            if isinstance(provider, HttpProvider):
                provider.check_size(call)
            refused += call.refused
        return refused

    # -- the real thing ----------------------------------------------------------------------

    def run(self) -> SendSummary:
        """Send every pending row of the draft; safe to call again after any failure."""
        draft_id = self.draft.id
        assert draft_id is not None
        summary = SendSummary(draft_id)
        current = self.store.get_draft(draft_id).status
        if current not in ("approved", "sending"):
            summary.stopped = f"draft {draft_id} is {current}; nothing to send"
            summary.idle = True
            return summary
        started = time.perf_counter()
        lease = f"send:{draft_id}"
        if not self.store.acquire_lease(lease, self.holder, self.now(),
                                        self.now() + timedelta(seconds=LEASE_SECONDS), holder_is_dead):
            summary.stopped = "another sender is working on this draft"
            summary.idle = True
            return summary
        self._renewed = self.now()
        self._lease = lease
        # Read under the lease: a sender pausing it has let go of it. A send that waits for the
        # operator still resends its uncertain batches under their keys, if the provider has
        # them: that reaches nobody new, and past the key window they would need the operator.
        held = self._held(summary)
        if held and not (self.idempotent and self._uncertain_batches(peek=True)):
            self.store.release_lease(lease, self.holder)
            return summary
        # Everything alive now (imports, config, the compiled draft) outlives the send: keep
        # the cycle collector from walking it again at every collection of the send's
        # short-lived objects (about a tenth of the send's time otherwise).
        gc.freeze()
        helpers: list[Any] = []
        done = False
        try:
            if self.should_stop():  # asked to stop before it started: nothing frozen, nothing claimed
                self._halt(f"stopped on request before the send started; {NEXT_SEND} starts it")
                summary.stopped = self._stop
                return summary  # (the lease is let go below)
            # Helper processes start first, so they get ready while the audience is frozen.
            helpers = self._start_helpers(summary) if self.processes > 1 and not held else []
            # Read again under the lease: another sender may have finished the draft between
            # the first read and taking the lease. And whether this run freezes the audience,
            # and so has every row still to send (counting them is a tenth of a second for a
            # million).
            current = self.store.get_draft(draft_id).status
            if current not in ("approved", "sending"):
                summary.stopped = f"draft {draft_id} is {current}; nothing to send"
                summary.idle = True
                return summary  # (the lease is let go below)
            fresh = current == "approved"
            try:
                frozen = self.store.start_send(draft_id, self.now(), self.should_stop)
            except FreezeStopped as exc:  # rolled back: the draft is as it was, nothing frozen or claimed
                self._halt(f"{exc}; {NEXT_SEND} starts it")
                summary.stopped = self._stop
                return summary  # (the lease is let go below)
            stale = summary.stale = self.store.mark_stale_claims_uncertain(draft_id, self.now())
            if stale:
                log.warning("draft %s: %d messages were in flight when a sender stopped; marked uncertain",
                            draft_id, stale)
            if self.idempotent:
                # The provider drops a repeated batch itself (same key, same body within its
                # window), so uncertain batches are resent at once, each exactly as it was:
                # those claimed through this very key space (not another provider's, another
                # account's, nor one claimed before the ledger recorded it: the provider never
                # saw them under the key they would get now), first sent within the window
                # (less an hour, for clocks and retries), whose readers may all still be sent
                # to (resend_rule). The rest wait for the operator.
                again = self._uncertain_batches(peek=False)
                summary.total = sum(map(len, again))
                for n, batch in enumerate(again):
                    if self._stop is None and self.should_stop():
                        self._halt(f"stopped on request; {NEXT_SEND} resumes it")
                    if self._stop is not None:
                        # Claimed for resending but not sent: uncertain again, as they were.
                        for rest in again[n:]:
                            self.store.unclaim_uncertain(rest)
                        break
                    self._send_one(summary, batch, lease, maybe_sent=True)
            summary.total += frozen if fresh else self.store.pending_count(draft_id)
            if helpers and not self._stop:
                self._go.set()
            if not held:  # (held: no new batch until the operator resumes the send)
                self.work(summary, lease)
            done = self._exception is None
        finally:
            try:
                if helpers:
                    if not self._go.is_set():  # stopped, or failed, before the ledger was ready
                        self._halt(self._stop or "stopped before the send started")
                    self._join_helpers(helpers, lease)
            except BaseException:
                done = False
                if self._peers is not None:
                    self._peers.set()  # the helpers stop, whatever failed here
                raise
            finally:
                gc.unfreeze()
                if not done:  # failed: no verdict on the draft (else that comes first, below)
                    self.store.release_lease(lease, self.holder)
            summary.seconds = time.perf_counter() - started
        if self._exception is not None:
            raise self._exception
        try:  # the verdict on the draft, still holding the lease: no other sender is in it
            self._conclude(summary, draft_id)
            if summary.finished:
                self._template_done()
        finally:
            self.store.release_lease(lease, self.holder)
        return summary

    def _held(self, summary: SendSummary) -> bool:
        """A send paused for the operator (:class:`FailureStreak`): True, with ``summary``
        saying so, unless this sender resumes it (``resume``: the hold is lifted)."""
        draft_id = summary.draft_id
        hold = self.store.send_hold(draft_id)
        if hold is None:
            return False
        if self.resume:
            if not summary.dry_run:
                self.store.lift_send_hold(draft_id)
                log.info("draft %s: resumed by the operator after %s", draft_id, held_message(draft_id, hold))
            return False
        counts = self.store.ledger_counts(draft_id)
        summary.stopped = held_message(draft_id, hold)
        summary.held = True
        summary.pending = counts.get("pending", 0)
        summary.uncertain_total = counts.get("uncertain", 0)
        summary.in_flight = counts.get("claimed", 0)
        return True

    def _template_ready(self) -> None:
        """Before any batch is claimed, the provider makes ready what it keeps for the template
        (Postmark creates its server template): a kill -9 during that call then leaves no batch
        uncertain. Best effort: on failure the first batch's call does it again, with its
        retries and its error handling (a refused token stops the send there)."""
        if not self.server_side or self.template is None:
            return
        # Recorded before the provider makes it: the sender that finishes the draft removes it,
        # whatever happens in between (see _template_done).
        self.store.record_provider_objects(self.draft.id or 0, self.provider.name,
                                           self.provider.template_names(self.template))
        if self._stop is not None:
            return
        try:
            self.provider.template_ready(self.template)
        except Exception as exc:  # noqa: BLE001 (the first batch meets it again and handles it)
            log.info("draft %s: the provider's template is not ready yet (%s); the first batch tries again",
                     self.draft.id, exc)

    def _template_done(self) -> None:
        """The draft is sent: the provider lets go of what it keeps for the template (Postmark
        deletes the server template it created) and of what the draft's earlier sends recorded
        (a template made under another alias). A failure is logged; the send stands."""
        if not self.server_side or self.template is None:
            return
        draft_id, name = self.draft.id or 0, self.provider.name
        try:
            recorded = self.store.provider_objects(draft_id, name)
            self.provider.template_done(self.template, recorded)
            self.store.forget_provider_objects(draft_id, name, recorded)
        except Exception as exc:  # noqa: BLE001 (whatever it is, the send has succeeded)
            # A DigestError's text carries its hint already.
            log.warning("draft %s: sent, but the provider's template was not cleaned up: %s", self.draft.id, exc)

    def _conclude(self, summary: SendSummary, draft_id: int) -> None:
        """The run's end: the draft's counts, and the draft finished when every message has
        its fate (whatever stopped the run: a pause that left nothing to send, a stop request
        after the last batch), unless batches wait for an automatic resend."""
        summary.stopped = self._stop
        summary.blocked = self._blocked
        counts = self.store.ledger_counts(draft_id)
        summary.uncertain_total = counts.get("uncertain", 0)
        summary.pending = counts.get("pending", 0)
        summary.in_flight = counts.get("claimed", 0)
        if self.idempotent and summary.uncertain_total:
            # Batches the next run resends under their keys by itself (see above): the draft
            # stays in sending for it (``digest serve`` runs it on its schedule). Not a batch
            # sent AUTO_RESENDS times already: what keeps failing waits for the operator.
            summary.resendable = sum(map(len, self._uncertain_batches(peek=True)))
        if not counts.get("pending") and not counts.get("claimed") and not summary.resendable:
            self.store.transition(draft_id, ("sending",), "sent", self.now(), finished_at=self.now())
            self.store.lift_send_hold(draft_id)  # paused with nothing left: nothing waits
            summary.finished = True
            summary.stopped = None
        elif summary.resendable and summary.stopped is None:
            summary.stopped = (f"{summary.resendable} uncertain messages wait to be sent again under the "
                               f"same idempotency keys ({self.provider.name} delivers each once): "
                               f"{NEXT_SEND} does it")
        # Paused for the operator, here or by a helper process (its reason came with its report).
        # That is what the run says, whatever else stopped it meanwhile (a stop request while
        # the batch that paused it was in flight): the next scheduled send will not resume it.
        hold = None if summary.finished else self.store.send_hold(draft_id)
        summary.held = hold is not None
        if hold is not None:
            summary.stopped = held_message(draft_id, hold)

    def _uncertain_batches(self, *, peek: bool) -> list[ClaimedBatch]:
        """The uncertain batches this send resends under their keys (:func:`resend_rule`),
        claimed for it (or with ``peek``, only found)."""
        rule = resend_rule(self.provider, self.now())
        if rule is None:
            return []
        return self.store.uncertain_batches(self.draft.id or 0, self.holder, self.now(), rule.since, via=rule.via,
                                            peek=peek, max_attempts=rule.max_attempts)

    _exception: BaseException | None = None
    _blocked = False

    def work(self, summary: SendSummary | None = None, lease: str | None = None) -> SendSummary:
        """Run ``delivery.concurrency`` workers until no pending row is left or the send stops.

        ``lease`` is renewed as batches go; a helper process (which does not hold it) passes none.
        """
        summary = summary or SendSummary(self.draft.id or 0)
        self._template_ready()
        if self.concurrency == 1:
            self._worker(summary, lease)
        else:
            # Here, where the threads start, so that helper processes share it too. Only for
            # server-side personalization: there a batch is a few small buffers, while a
            # full-body batch (megabytes) would be returned to the system and faulted in again
            # for every batch from one arena (Resend measured 10-25% slower that way), and
            # full bodies have twice the memory budget.
            if self.server_side:
                share_malloc_arena()
            workers = [threading.Thread(target=self._worker, args=(summary, lease), name=f"send-{i}")
                       for i in range(self.concurrency)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        return summary

    def _start_helpers(self, summary: SendSummary) -> list[Any]:
        """Start ``delivery.processes - 1`` helper processes on this draft, and the thread that
        adds their progress and their final reports to ``summary``."""
        import multiprocessing

        # spawn, not fork: this process has threads (workers, the web server) and open
        # database connections that a forked child must not share.
        ctx = multiprocessing.get_context("spawn")
        self._peers = ctx.Event()
        self._go = ctx.Event()
        streak = FailureStreak.shared(ctx)
        self._streak = FailureStreak(streak)  # before any worker starts (work() comes after)
        settings = share_of(self.settings)
        helpers = []
        for _ in range(self.processes - 1):
            mine, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_helper_main, daemon=True,
                               args=(settings, self.draft.id, os.getpid(), self._peers, self._go, theirs, streak))
            proc.start()
            theirs.close()
            helpers.append((proc, mine))
        listener = threading.Thread(target=self._listen, args=(helpers, summary), name="send-helpers",
                                    daemon=True)
        listener.start()
        return [listener, *(proc for proc, _conn in helpers)]

    def _join_helpers(self, helpers: list[Any], lease: str) -> None:
        """Wait until every helper process has reported, keeping the lease and passing on a stop."""
        listener = helpers[0]
        while listener.is_alive():
            if self._stop is not None or self.should_stop():
                self._peers.set()
            listener.join(0.5)
            self._renew(lease)
        for proc in helpers[1:]:
            proc.join(5)

    def _listen(self, helpers: list[tuple[Any, Any]], summary: SendSummary) -> None:
        """Add each helper's progress to ``summary`` as it comes (so progress covers every
        process), then its final report. A helper that stops the send (refused credentials, a
        database error) or dies stops it here too."""
        from multiprocessing.connection import Connection, wait

        procs = {conn: proc for proc, conn in helpers}
        seen: dict[Any, dict[str, Any]] = {conn: SendSummary(0).tally() for conn in procs}
        while procs:
            ready: list[Connection] = wait(list(procs))  # type: ignore[assignment]  # procs' own
            for conn in ready:
                report: dict[str, Any]
                try:
                    report = conn.recv()
                except EOFError:
                    proc = procs[conn]
                    proc.join(5)
                    report = {"error": f"a helper process died (exit code {proc.exitcode})", "final": True}
                if "error" in report:
                    self._halt(f"stopped: {report['error']}; {NEXT_SEND} resumes it")
                else:
                    self._add(summary, seen[conn], report)
                    seen[conn] = report
                    reason = report.get("stopped")
                    if report.get("blocked"):
                        self._blocked = True
                    if reason and not reason.startswith("stopped on request"):
                        self._halt(reason)
                if report.get("final"):
                    del procs[conn]

    def _add(self, summary: SendSummary, before: dict[str, Any], now: dict[str, Any]) -> None:
        """Add what a helper did between two of its reports to ``summary``."""
        with self._lock:
            summary.sent += now["sent"] - before["sent"]
            summary.failed.update(now["failed"])
            summary.failed.subtract(before["failed"])
            summary.failed = +summary.failed  # drop reasons that came to zero
            summary.uncertain += now["uncertain"] - before["uncertain"]
            summary.skipped += now["skipped"] - before["skipped"]
            batches = now["batches"] - before["batches"]
            summary.batches += batches
            summary.retries += now["retries"] - before["retries"]
            if self.on_batch and "size" in now:
                self.on_batch(summary, now["size"])

    def _halt(self, reason: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever the provider's message held
        with self._lock:
            if self._stop is None:
                self._stop = reason
        if self._peers is not None:
            self._peers.set()  # the helper processes stop after their batch in flight

    def _worker(self, summary: SendSummary, lease: str | None) -> None:
        draft_id = self.draft.id
        assert draft_id is not None
        try:
            # (A pause another process tripped stops this one at once, before its halt arrives.)
            while self._stop is None and not (self._peers is not None and self._peers.is_set()) \
                    and not self._streak.tripped:
                if self.should_stop():
                    self._halt(f"stopped on request after the batch in flight; {NEXT_SEND} resumes it")
                    return
                # The rate limit's wait comes before the claim: rows claimed and then held
                # through the wait would be uncertain after a kill -9, though they never left.
                self.bucket.acquire(self._stopping)
                if self._stop is not None or self.should_stop() or self._streak.tripped:
                    continue  # (the loop's checks end it)
                claimed = self.store.claim_batch(draft_id, self.batch_size, self.holder, self.now(), self.via)
                if claimed.skipped:  # readers who unsubscribed, bounced or complained since the start
                    with self._lock:
                        summary.skipped += claimed.skipped
                if not claimed:
                    return
                if self._stop is not None or self._streak.tripped:
                    # Another worker stopped the send while this one claimed: never sent, so
                    # back in the queue (with the reason the send stopped).
                    self.store.release([c.ledger_id for c in claimed], self._stop or "the send paused after failed "
                                       "batches in a row", self.now(), claimed)
                    return
                self._failure.error, self._failure.refused = None, 0
                outcome = self._send_one(summary, claimed, lease, paced=True)
                del claimed  # not kept while the next batch is claimed
                # Counted for the whole send: eight workers failing a batch each are eight
                # failed batches in a row, not one each.
                consecutive_failures, tripped = self._streak.add(outcome, self._failure.refused,
                                                                 self.max_consecutive_failures)
                if tripped is not None:
                    self._paused(consecutive_failures, *tripped)
                if outcome in ("back", "deferred") and self._stop is None:
                    # The provider said "later" (a rate limit, maintenance): a moment before the
                    # next batch. The deferred messages come again once the range is done.
                    self._pause(min(MAX_BACKOFF, 0.5 * 2 ** consecutive_failures) * random.uniform(1.0, 1.25))
                if self.should_stop():
                    self._halt(f"stopped on request after the batch in flight; {NEXT_SEND} resumes it")
        except BaseException as exc:  # a store failure (rule 9) or a bug: stop every worker
            with self._lock:
                if self._exception is None:
                    self._exception = exc
            self._halt(f"stopped: {exc}")

    def _paused(self, batches: int, refused: int, messages: int) -> None:
        """Too many failed batches in a row: the send pauses. When the provider refused some
        of them for good, every further batch would likely be refused the same way (a setting
        it rejects, a body it finds too large) and its readers failed for good, so the send
        waits for the operator: recorded in the store (it outlives this process), the
        scheduled send passes it by. Batches put back whole (the provider said "later") or
        left uncertain (resent under their keys, or settled by the operator) lose nobody for
        good: the next send resumes, as it always has."""
        if not refused:
            self._halt(f"paused after {batches} failed batches in a row; {NEXT_SEND} resumes it")
            return
        draft_id = self.draft.id or 0
        hold = SendHold(self._failure.error or "", batches, messages, self.now())
        self._halt(held_message(draft_id, hold))  # first: the other processes stop meanwhile
        self.store.hold_send(draft_id, hold)

    def _send_one(self, summary: SendSummary, claimed: Sequence[Claimed], lease: str | None,
                  maybe_sent: bool = False, paced: bool = False) -> str:
        outcome = self._deliver(claimed, summary, maybe_sent, paced)
        with self._lock:
            summary.batches += 1
        if self.on_batch:
            with self._lock:
                self.on_batch(summary, len(claimed))
        self._renew(lease)
        return outcome

    def _renew(self, lease: str | None) -> None:
        """Renew the lease well before it runs out, but not after every batch: a thousand
        batches a minute need not be a thousand lease writes."""
        now = self.now()
        if lease is None:
            return
        with self._lock:  # one worker renews; the others go on
            if self._renewed is not None and now - self._renewed < RENEW_EVERY:
                return
            self._renewed = now
        if not self.store.acquire_lease(lease, self.holder, now, now + timedelta(seconds=LEASE_SECONDS)):
            # It ran out (a very long retry) and another sender took it: two senders must not
            # work on one draft (its batches are fenced too, see Store._hold).
            raise TakenOverError(f"the lease on draft {self.draft.id} was taken over by another sender; "
                                 "this one stops")

    def _prepare(self, claimed: Sequence[Claimed]) -> list[OutgoingMessage] | Sequence[TemplateRecipient]:
        links = self.links
        if self.template is not None:
            return Readers(claimed, links)
        return [build_message(self.draft, self.compiled, self.settings, c.ledger_id, c.recipient,
                              links(c.subscriber_id, c.email)) for c in claimed]

    def _call(self, prepared: list[OutgoingMessage] | Sequence[TemplateRecipient]) -> list[SendResult]:
        return self._ready(prepared)()

    def _ready(self, prepared: list[OutgoingMessage] | Sequence[TemplateRecipient]) -> Callable[[], list[SendResult]]:
        """The batch as the provider sends it: a function that sends it, and sends the same
        batch again when called again. A template batch is built now (see
        :meth:`Provider.template_sender`)."""
        if self.template is not None:
            return self.provider.template_sender(self.template, prepared)  # type: ignore[arg-type]
        return partial(self.provider.send_batch, prepared)  # type: ignore[arg-type]

    def _deliver(self, claimed: Sequence[Claimed], summary: SendSummary, maybe_sent: bool = False,
                 paced: bool = False) -> str:
        """Send one claimed batch, retrying as the provider's answers allow, and record its fate.

        ``maybe_sent``: an earlier attempt at this very batch may have been delivered (it is
        being resent under an idempotency key). It is set too when an attempt here ends that
        way and the batch is tried again. Then no later failure can put the batch back in the
        queue or call it failed: it becomes uncertain, keeping the time it first went out.
        """
        ids = [c.ledger_id for c in claimed]
        # The claim's record in the ledger, handed back with every verdict on its rows.
        batch = claimed if isinstance(claimed, ClaimedBatch) else None
        name = self.provider.name
        # The first attempt's token comes before the batch is prepared (``paced``: before it
        # was claimed), so that no worker waits for the rate limit while holding the lock on
        # building.
        if not paced:
            self.bucket.acquire()
        building = self._building
        building.acquire()
        held = True
        try:
            prepared: list[OutgoingMessage] | Sequence[TemplateRecipient] | None = self._prepare(claimed)
            send: Callable[[], list[SendResult]] | None = None
            journal: BatchJournal | None = None
            attempt = 0
            while True:
                attempt += 1
                if attempt > 1 and not self.bucket.acquire(self._stopping):
                    # Stopped while waiting for the rate limit's turn: as for a stop during
                    # the retry's wait (see _pause).
                    self._waited_until_asked()
                    reason = self._stop or "stopped with the send's other processes"
                    self._give_up(ids, DeliveryError(reason), batch, summary, maybe_sent, journal, claimed)
                    return "stop"
                try:
                    if send is None:
                        assert prepared is not None
                        if not held:
                            building.acquire()
                            held = True
                        try:
                            send = self._ready(prepared)
                        finally:
                            building.release()
                            held = False
                        # A retry sends this built batch again: the same recipients, the same
                        # body. The values it was built from need not wait with it for the answer.
                        prepared = None
                    if journal is None and batch is not None:
                        journal = BatchJournal(self.store, batch, self.draft.id or 0, name, self.now)
                    entered = call_journal.set(journal)
                    try:
                        results = send()
                    finally:
                        call_journal.reset(entered)
                    # Answered: the built batch (its body) need not wait for the ledger's turn.
                    send = None
                except PartialBatchError as exc:
                    # Several calls, some answered: only the calls that may have gone out are
                    # uncertain. They are recorded first, so that the batch's verdict then
                    # covers the rest, and a crash in between leaves the rest uncertain, not sent.
                    # Each message with its own call's failure (calls in flight fail apart).
                    for reason, group in exc.uncertain_by_reason():
                        self.store.mark_uncertain(group, reason, self.now(), batch)
                    known = [r for r in exc.results if r.ledger_id not in set(exc.uncertain)]
                    self._settle_known(known, claimed, summary)
                    with self._lock:
                        summary.uncertain += len(exc.uncertain)
                    self._failure.error = str(exc)
                    return "failed"
                except UncertainDeliveryError as exc:
                    if self.idempotent and exc.retryable and attempt <= self.settings.delivery.max_retries:
                        # Same batch, same body, same idempotency key: the provider sends it once.
                        # A gateway's 502, 504 ... may say when to come back (Retry-After).
                        maybe_sent = True
                        self._count_retry(summary)
                        if not self._pause(retry_wait(attempt, exc.retry_after)):
                            self._give_up(ids, exc, batch, summary, maybe_sent, journal, claimed)  # uncertain
                            return "stop"
                        continue
                    # The provider may have taken the batch: resending could double-send (rule 1).
                    self.store.mark_uncertain(ids, str(exc), self.now(), batch)
                    with self._lock:
                        summary.uncertain += len(ids)
                    self._failure.error = str(exc)
                    return "failed"
                except BlockedError as exc:
                    # No reader is at fault: the send stops until the operator has fixed the
                    # cause. This attempt sent nothing, so the batch goes back to the queue,
                    # whole (unless an earlier one may have gone out: then it is uncertain).
                    self._blocked = True
                    # The error names the setting to fix (its hint: the API key, SES's AWS keys,
                    # SMTP's login, the From address ...).
                    what = str(exc)
                    if isinstance(exc, AuthError) and not exc.hint:
                        what = f"{name} refused the credentials: {exc} (check the provider's keys under delivery:)"
                    # Halted before the batch goes back: no other worker may claim it again.
                    self._halt(f"{what}; fix it, then {NEXT_SEND} resumes (the service reads a changed config "
                               f"when restarted): {self._fate(ids, maybe_sent)}")
                    self._give_up(ids, exc, batch, summary, maybe_sent, journal, claimed)
                    return "stop"
                except DeliveryError as exc:
                    if exc.retryable and attempt <= self.settings.delivery.max_retries:
                        self._count_retry(summary)
                        if journal is not None:
                            journal.flush()  # the calls that failed are not in flight while it waits
                        if not self._pause(retry_wait(attempt, exc.retry_after)):
                            # Not sent: back in the queue, under the reason the send stopped.
                            reason = self._stop or f"stopped with the send's other processes (last try: {exc})"
                            self._give_up(ids, DeliveryError(reason), batch, summary, maybe_sent, journal, claimed)
                            return "stop"
                        continue
                    if exc.retryable:
                        self._halt(f"{name} kept failing ({exc}); paused: {self._fate(ids, maybe_sent)}; "
                                   f"{NEXT_SEND} resumes it")
                        self._give_up(ids, exc, batch, summary, maybe_sent, journal, claimed)
                        return "stop"
                    self._failure.error = str(exc)
                    if maybe_sent:
                        self._give_up(ids, exc, batch, summary, maybe_sent, journal, claimed)
                        return "failed"
                    self._failure.refused = len(ids)
                    # Failed, but for the messages whose own calls were answered (a batch of
                    # several calls, every one refused): those keep their verdicts, each its
                    # own call's error. Counted as a failed batch: a refusal of every call is
                    # what a bad setting looks like, and such batches in a row pause the send.
                    answered = journal.answered if journal is not None else {}
                    self._settle_known([*(SendResult(i, "failed", None, str(exc)) for i in ids if i not in answered),
                                        *answered.values()], claimed, summary)
                    return "failed"
                released = self._settle(results, claimed, summary)
                if not released:
                    return "ok"
                self._failure.error = next((r.error for r in results if r.status == "deferred" and r.error), None)
                # Messages handed back (deferred) wait a little before they are asked again. A
                # batch of which nothing was taken counts as failed, so a provider that keeps
                # deferring the same messages pauses the send instead of being asked forever.
                return "deferred" if any(r.status == "sent" for r in results) else "back"
        finally:
            if held:
                building.release()

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before a retry; False (the send halted) when it is asked to stop
        meanwhile, or another worker stopped it: a Retry-After of a minute does not hold up a
        Ctrl-C. With a ``sleep`` of its own (tests), that sleep, then the same check."""
        def asked() -> bool:  # here, or by the parent of a helper process (or a helper, to it)
            return self.should_stop() or (self._peers is not None and self._peers.is_set())

        # The lease is renewed while waiting too: a Retry-After of a minute, five times over,
        # outlasts it, and another `digest serve` would take the draft over meanwhile (rule 3).
        if self.sleep is time.sleep:
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0 and self._stop is None and not asked():
                time.sleep(min(left, 0.2))
                self._renew(self._lease)
        else:
            self.sleep(seconds)
            self._renew(self._lease)
        self._waited_until_asked()
        return self._stop is None and not asked()

    def _waited_until_asked(self) -> None:
        """After a wait to retry a batch: asked here to stop, the reason is this process's to
        give. Stopped by another process of the send (a helper's refused credentials, say), that
        process gives it, not this one."""
        if self._stop is None and self.should_stop():
            self._halt(f"stopped on request while waiting to retry a batch; {NEXT_SEND} resumes it")

    def _stopping(self) -> bool:
        """Whether the send is stopping: a wait for the rate limit's turn ends at once (at a
        slow rate it can be many seconds, and a Ctrl-C must not wait for it)."""
        return (self._stop is not None or self.should_stop() or self._streak.tripped
                or (self._peers is not None and self._peers.is_set()))

    def _count_retry(self, summary: SendSummary) -> None:
        with self._lock:
            summary.retries += 1

    def _give_up(self, ids: list[int], exc: DeliveryError, batch: ClaimedBatch | None, summary: SendSummary,
                 maybe_sent: bool, journal: BatchJournal | None = None,
                 claimed: Sequence[Claimed] = ()) -> None:
        """Stop trying a batch this attempt did not send: back in the queue, or uncertain when an
        earlier attempt may have delivered it (rule 1: a queued row would go out again, under
        another key or after the provider forgot this one). :meth:`_fate` says which.

        Messages of a batch of several calls whose own calls the provider answered (refused
        them: a call accepted would have ended the batch otherwise) keep those verdicts, and
        count in the summary; an address the provider suppresses is suppressed here too."""
        answered = journal.answered if journal is not None else {}
        rest = [i for i in ids if i not in answered]
        if not maybe_sent:
            self.store.release(rest, str(exc), self.now(), batch)
        else:
            self.store.mark_uncertain(rest, f"{exc}; an earlier attempt may have been delivered", self.now(), batch)
            with self._lock:
                summary.uncertain += len(rest)
        if answered:  # after the rest: this verdict closes the batch
            self._settle_known(list(answered.values()), claimed, summary)

    @staticmethod
    def _fate(ids: Sequence[int], maybe_sent: bool) -> str:
        """What :meth:`_give_up` does with a batch, for the operator."""
        if not maybe_sent:
            return "nothing was lost, the batch is back in the queue"
        return (f"{len(ids)} messages an earlier attempt may have delivered are uncertain "
                "(`digest status` lists them)")

    def _settle(self, results: Sequence[SendResult], claimed: Sequence[Claimed], summary: SendSummary) -> int:
        if len(results) == len(claimed) and [r.ledger_id for r in results] == [c[0] for c in claimed]:
            complete = results  # one per message, in order: the usual answer
        else:
            by_id = {r.ledger_id: r for r in results}
            complete = [by_id.get(c.ledger_id) or SendResult(c.ledger_id, "failed", None,
                                                             "the provider returned no result for it")
                        for c in claimed]
        return self._settle_known(complete, claimed, summary)

    def _settle_known(self, complete: Sequence[SendResult], claimed: Sequence[Claimed],
                      summary: SendSummary) -> int:
        """Record results; a ``deferred`` one was not sent this time, so it goes back to the
        queue. Returns how many went back. (Each pass over the results is one comprehension
        where it can be: this runs for every message.)"""
        statuses = [r.status for r in complete]
        sent = statuses.count("sent")
        retry = [r for r in complete if r.status == "deferred"] if sent != len(statuses) else []
        if retry:
            back = {r.ledger_id for r in retry}
            complete = [r for r in complete if r.ledger_id not in back]
        batch = claimed if isinstance(claimed, ClaimedBatch) else None
        if retry:  # first: the batch's verdict (below) is for the rows without one of their own
            self.store.release(list(back), retry[0].error or "not sent: the provider will take it later",
                               self.now(), batch)
        self.store.settle(complete, self.provider.name, self.now(), batch)
        others = [r for r in complete if r.status != "sent"] if sent != len(statuses) else []
        with self._lock:
            summary.sent += sent
            for r in others:
                summary.failed[r.status if r.status != "failed" else _reason(r.error or "failed")] += 1
        suppressed = [r.ledger_id for r in others if r.status == "suppressed"]
        if suppressed:
            emails = {c.ledger_id: c.email for c in claimed}
            for ledger_id in suppressed:
                # The provider will not deliver to this address (earlier bounce or complaint):
                # stop trying here too, for every future digest.
                self.store.suppress(emails[ledger_id], "provider_suppressed", self.provider.name, self.now())
        return len(retry)


def _reason(error: str) -> str:
    """A failure's key in the summary: its first part ("HTTP 400"), without the provider's
    name that some errors start with ("sendgrid: HTTP 400: ..." counted as "sendgrid")."""
    head, sep, rest = error.partition(":")
    if sep and head.isalpha() and head.islower() and rest.strip():
        head = rest.strip().split(":", 1)[0]
    return head[:60] or "failed"
