"""Queries. Every method is one transaction; rows never leave this module, only frozen values.

The send ledger methods implement DESIGN.md rules 1 and 2: a row is claimed in a committed
transaction before the provider call, eligibility is re-checked in the claim itself, and a
row still claimed when a new sender takes the lease becomes ``uncertain``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any, Literal, NamedTuple, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from digest.clock import as_utc
from digest.errors import DraftError, FreezeStopped, StoreError, SubscriberError, TakenOverError
from digest.store import db
from digest.store.schema import (
    comments,
    compiled_drafts,
    delivery_events,
    draft_items,
    drafts,
    essays,
    leases,
    meta,
    reactivations,
    send_ledger,
    source_state,
    subscribers,
    suppressions,
)
from digest.types import (
    CollectResult,
    Comment,
    DeliveryEvent,
    Draft,
    DraftItem,
    Essay,
    RankedComment,
    Recipient,
    SendResult,
    SourceCursor,
)

# Drafts whose essays count as already featured.
FEATURING_STATUSES = ("pending_review", "approved", "sending", "sent")
INELIGIBLE = ("unsubscribed", "bounced", "complained", "removed")
# Seconds between two purges of expired webhook replay keys, per process.
REPLAY_PURGE_EVERY = 60.0
# A collect looks its items up by key this many at a time.
_KEYS_PER_QUERY = 500
# What a collect compares of a stored comment with the one fetched.
_COMMENT_COMPARED = (comments.c.id, comments.c.source, comments.c.key, comments.c.html, comments.c.score,
                     comments.c.author, comments.c.position, comments.c.upvotes, comments.c.downvotes,
                     comments.c.parent_key, comments.c.deleted_at)
_Item = TypeVar("_Item")


# What a webhook request's replay key turned out to be (Store.apply_webhook): the first request
# with this key, a copy of it, or the same key on other content.
ReplaySeen = Literal["new", "duplicate", "conflict"]

# Suppression reason -> the status it gives an active subscriber. A provider's own list (Postmark's
# inactive recipients: a hard bounce or a complaint there) and a mailbox that keeps refusing us
# (the soft-bounce limit) are not the reader's choice: "bounced", as for our own hard bounces.
# Any other reason (an unsubscribe, by link or through a provider) is "unsubscribed".
_SUPPRESSED_STATUS = {"hard_bounce": "bounced", "provider_suppressed": "bounced", "soft_bounce_limit": "bounced",
                      "complaint": "complained"}
# The reasons an operator may lift (Store.reactivate): the bounces. A complaint or an unsubscribe
# was the reader's own choice, and only the reader can subscribe again.
BOUNCE_REASONS = frozenset(reason for reason, status in _SUPPRESSED_STATUS.items() if status == "bounced")
# Event types by which a reader says no. They are stored even when the address is suppressed
# already (for a bounce), where they change nothing else: Store.reactivate reads them.
_REFUSING_EVENTS = ("complaint", "unsubscribe")


def _sendable() -> ColumnElement[bool]:
    """Who a send's audience takes (rule 2): active subscribers whose address is not on the
    suppression list. One clause for the send and for its dry run, so they never disagree."""
    return and_(subscribers.c.status == "active", subscribers.c.email.not_in(select(suppressions.c.email)))


@dataclass(frozen=True)
class CollectStats:
    """What one source's results changed in the store."""

    new_essays: int = 0
    updated_essays: int = 0
    new_comments: int = 0
    updated_comments: int = 0
    deleted_comments: int = 0


@dataclass(frozen=True)
class SourceStatus:
    """A source's fetch history, for ``digest status``."""

    source: str
    last_fetch_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    essays: int
    comments: int


@dataclass(frozen=True)
class Subscriber:
    """A subscriber row as the CLI and web app see it."""

    id: int
    email: str
    name: str
    status: str
    created_at: datetime
    unsubscribed_at: datetime | None


@dataclass(frozen=True)
class DraftSummary:
    """A draft's state without its content, for listings."""

    id: int
    period_key: str
    status: str
    subject: str
    created_at: datetime
    send_at: datetime | None
    essays: int
    comments: int
    note: str | None


@dataclass(frozen=True)
class UncertainMessage:
    """A message whose fate is unknown (rule 1), or that failed, for ``digest status``: what
    the sender met (``error``) and when it recorded that (``at``)."""

    ledger_id: int
    email: str
    error: str
    at: datetime | None
    status: str = "uncertain"


@dataclass(frozen=True)
class ReasonCount:
    """How many of a draft's messages ended in ``status`` with ``error``, the first ``at``."""

    status: str
    error: str
    count: int
    at: datetime | None


@dataclass(frozen=True)
class SendHold:
    """A send paused until the operator acts: failed batches in a row (``batches``), some
    refused for good or made uncertain (``messages`` in them), the last with ``reason`` (the
    provider's error), at ``at``. No scheduled send resumes it (see :meth:`Store.hold_send`)."""

    reason: str
    batches: int
    messages: int
    at: datetime | None


@dataclass(frozen=True)
class SuppressionRules:
    """Which stored delivery events suppress an address (the policy is the pipeline's).

    ``reasons`` maps an event type to the suppression reason it applies at once; soft bounces
    suppress (as ``soft_bounce_limit``) once ``soft_bounce_limit`` of them for one address were
    received within ``soft_bounce_window``.
    """

    reasons: Mapping[str, str]
    soft_bounce_limit: int
    soft_bounce_window: timedelta


@dataclass(frozen=True)
class Reactivated:
    """What :meth:`Store.reactivate` took back: the subscriber's status before (``None``: the
    address was suppressed without being a subscriber) and the suppression it lifted (``reason``
    ``None``: the subscriber was bounced without one), made by ``origin`` at ``suppressed_at``."""

    email: str
    status: str | None
    reason: str | None
    origin: str
    suppressed_at: datetime | None


@dataclass(frozen=True)
class WebhookApplied:
    """What :meth:`Store.apply_webhook` did. ``seen`` is ``"new"`` when the request's events were
    stored and applied now; for a ``"duplicate"`` or a ``"conflict"`` nothing was written.
    ``stored`` and ``duplicates`` count its events new to the store and already there;
    ``suppressed`` lists the addresses its new events suppress, in the order they came."""

    seen: ReplaySeen
    stored: int = 0
    duplicates: int = 0
    suppressed: tuple[str, ...] = ()


class Claimed(NamedTuple):
    """A ledger row claimed for sending, with the recipient as of the claim.

    A named tuple straight from the claim query's row: one is made per message sent.
    """

    ledger_id: int
    subscriber_id: int
    email: str
    name: str

    @property
    def to_email(self) -> str:
        """The address, by the name a provider reading its answer asks for."""
        return self.email

    @property
    def to_name(self) -> str:
        """The name, by the name a provider listing the messages it built asks for."""
        return self.name

    @property
    def recipient(self) -> Recipient:
        return Recipient(self.subscriber_id, self.email, self.name)


class ClaimedBatch(list[Claimed]):
    """The rows one claim holds, in id order, and the ``send_batches`` row that records it.

    ``ranged``: the batch speaks for its rows by their id range (they keep no status of their
    own); otherwise each row says it is claimed, and by this batch. Pass the batch back to
    :meth:`Store.settle`, :meth:`Store.release` and :meth:`Store.mark_uncertain`: with the
    ``token`` it was claimed under, they write only while the batch's record still carries
    that token (see :meth:`Store._hold`).
    """

    def __init__(self, rows: Iterable[Claimed], batch_id: int, *, ranged: bool, token: str = "",
                 skipped: int = 0) -> None:
        super().__init__(rows)
        self.batch_id = batch_id
        self.ranged = ranged
        self.token = token
        # Rows the claim passed over, no longer eligible (rule 2), and recorded as skipped.
        self.skipped = skipped


_FREEZE_STOPPED = "stopped on request while the audience was being frozen"


def _eligible(cursor: Any) -> tuple[list[int], list[Claimed]]:
    """A claim query's rows (``Store._ELIGIBLE``) split: the ledger ids no longer eligible
    (rule 2), and the claimed rows of the others, in order."""
    rows = cursor.fetchall()
    return [r[0] for r in rows if not r[4]], [Claimed(r[0], r[1], r[2], r[3]) for r in rows if r[4]]


class ResendRule(NamedTuple):
    """Which uncertain batches may go out again under their idempotency keys, exactly as they
    went (:meth:`Store.uncertain_batches`): those claimed through ``via`` (the key space of
    the provider sending now: ``send_batches.sent_via``), first sent at or after ``since``
    (the provider still keeps their keys), claimed fewer than ``max_attempts`` times, and
    whose every reader may still be sent to."""

    via: str
    since: datetime | None = None
    max_attempts: int | None = None


# A row's own status as readers see it: queued is pending (to send); sending (its call has
# started, see Store.record_calls) is claimed (in flight).
_AS_READ = {"queued": "pending", "sending": "claimed"}


def _address_lock(email: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for what may suppress an address
    or take it back (its webhook events, its reactivation), one transaction at a time."""
    return int.from_bytes(hashlib.sha256(f"soft-bounce:{email}".encode()).digest()[:8], "big", signed=True)


# The longest claim token ``send_batches.claim_token`` holds (PostgreSQL enforces it).
_TOKEN_LENGTH = 64


def claim_token(holder: str) -> str:
    """The token a claim records on its batch for the sender ``holder`` (its lease holder).

    A holder that fits the column is the token itself, as before: readable (which host and
    process claimed the batch), and the very token a batch claimed by an older version carries.
    A longer one (``host:pid:random`` on a host with a long name, such as EC2's
    ``ip-172-31-122-133.ap-southeast-2.compute.internal``) is a fixed-length hash of it, never
    cut: two holders sharing a prefix must keep two tokens. Nothing reads a host or a pid out
    of a token; it is only compared with the one its sender holds (:meth:`Store._hold`), so the
    same holder must always give the same token, and a token given again is itself.
    """
    if len(holder) <= _TOKEN_LENGTH:
        return holder
    return "sha256:" + hashlib.sha256(holder.encode("utf-8", "surrogatepass")).hexdigest()[:48]


# The longest item key ``essays.key``, ``comments.key`` and ``comments.parent_key`` hold.
_KEY_LENGTH = 2000
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(value: str) -> str:
    """``value`` as both databases can store it: a NUL (which PostgreSQL text cannot hold,
    while SQLite takes it) and a lone surrogate (a JSON escape such as ``\\ud800``, which no
    driver can encode) become U+FFFD, the replacement character. One character for one, so a
    cut before or after is the same cut, and two texts that differed still differ.

    For text from outside that the store keeps: what feeds bring (:meth:`Store.record_collect`)
    and what providers answer (:func:`_provider_error`). A value that could not be written
    would otherwise fail its whole transaction: a source's collect, a batch's verdict.
    """
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = _SURROGATE.sub("\ufffd", value)
    return value


def _provider_error(error: str) -> str:
    """A provider's error (or what the sender says of a call) as a verdict records it: one
    line (an SMTP server's reply of several lines, a provider's message with newlines: `digest
    status` shows it as one), its first 1000 characters, :func:`storable`. A refusal may quote
    what it refused, a NUL included; a verdict that could not be written would leave its batch
    claimed, to come back uncertain."""
    return storable(" ".join(error[:1000].split()))


# The longest provider message id a verdict records. Real ones are far shorter (Postmark's and
# Resend's are UUIDs, SES's about 60 characters, an SMTP Message-ID rarely over 100, at most a
# header line); nothing looks a message up by it (webhooks name the ledger id), so a longer one
# is cut, not hashed.
_MESSAGE_ID_LENGTH = 1000
# What a message id loses: C0 controls (NUL, which PostgreSQL text cannot hold, among them),
# DEL, the C1 controls, and the line and paragraph separators.
_ID_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def storable_message_id(message_id: str | None) -> str | None:
    """A provider's message id as a verdict records it: its control characters removed (a NUL
    among them), its first :data:`_MESSAGE_ID_LENGTH` characters, :func:`storable`; ``None``
    when nothing is left. The id comes from the provider's answer: one that could not be
    written would fail the batch's verdict, and so stop the send (rule 9), for a message the
    provider took. The very same string, no copy, when nothing changes (as a rule)."""
    if message_id is None or (len(message_id) <= _MESSAGE_ID_LENGTH and message_id.isprintable()):
        return message_id  # (isprintable: no control character, no lone surrogate)
    cleaned = storable(_ID_CONTROLS.sub("", message_id)[:_MESSAGE_ID_LENGTH])
    return cleaned or None


_MESSAGE_ID = itemgetter(2)  # SendResult.provider_message_id
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))


def _storable_ids(results: Sequence[SendResult]) -> Sequence[SendResult]:
    """``results`` with every provider message id :func:`storable_message_id`: ``results``
    itself when each is already (as a rule).

    Checked all at once, in C, for the usual answer (ASCII ids, a UUID or the like): one per
    message sent, a check per id took 0.17 microseconds a message, this a third of that."""
    ids = list(filter(None, map(_MESSAGE_ID, results)))
    if not ids:
        return results
    joined = "".join(ids)
    if joined.isascii():  # what is left once the printable characters are deleted: controls
        clean = not joined.encode("ascii").translate(None, _PRINTABLE_ASCII)
    else:
        clean = joined.isprintable()
    if clean and max(map(len, ids)) <= _MESSAGE_ID_LENGTH:
        return results
    return [r if r.provider_message_id is None
            else r._replace(provider_message_id=storable_message_id(r.provider_message_id)) for r in results]


def storable_key(key: str) -> str:
    """An essay's or a comment's key as the store keeps it: :func:`storable`, and one longer
    than the column (an RSS guid of thousands of characters) hashed, never cut: two long keys
    sharing a prefix stay two items, and the same key gives the same stored key every run, so
    the item is found again. A stored key given again is itself (a comment source names its
    essay by the key the store gave it)."""
    key = storable(key)
    if len(key) <= _KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _storable_result(result: CollectResult) -> CollectResult:
    """``result`` with every text the store writes made :func:`storable` and every key
    :func:`storable_key`: one odd item must not fail its source's whole collect on PostgreSQL."""
    return replace(
        result,
        essays=tuple(_cleaned(e, ("key",), ("url", "title", "html", "summary", "author", "comments_url"))
                     for e in result.essays),
        comments=tuple(_cleaned(c, ("essay_key", "key", "parent_key"), ("author", "html", "url"))
                       for c in result.comments),
        covered=tuple((source, storable_key(key)) for source, key in result.covered),
        cursor=_cleaned(result.cursor, (), ("etag", "last_modified")),
        error=result.error and storable(result.error),
        warnings=tuple(storable(w) for w in result.warnings),
    )


_Value = TypeVar("_Value", Essay, Comment, SourceCursor)


def _cleaned(value: _Value, keys: Sequence[str], texts: Sequence[str]) -> _Value:
    """``value`` with its fields ``keys`` made :func:`storable_key` and ``texts`` :func:`storable`
    (those that are ``None`` stay so): the very same value, no copy, when nothing changes (as a rule)."""
    changes: dict[str, Any] = {}
    for names, clean in ((keys, storable_key), (texts, storable)):
        for name in names:
            was = getattr(value, name)
            if was is not None and (cleaned := clean(was)) is not was:
                changes[name] = cleaned
    return replace(value, **changes) if changes else value


def _dt(value: Any) -> datetime | None:
    return as_utc(value) if isinstance(value, datetime) else None


# -- snapshot (de)serialization: the frozen content of a draft ---------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _from_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def snapshot_json(items: Sequence[DraftItem]) -> str:
    """The canonical JSON of a draft's items (sorted keys: equal content, equal text)."""
    out = []
    for item in items:
        essay = asdict(item.essay)
        essay["published"] = _iso(item.essay.published)
        comment_rows = []
        for rc in item.comments:
            row = asdict(rc)
            row["comment"]["published"] = _iso(rc.comment.published)
            comment_rows.append(row)
        out.append({"essay": essay, "comments": comment_rows, "is_new": item.is_new})
    return json.dumps(out, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def items_from_snapshot(text: str) -> tuple[DraftItem, ...]:
    """Inverse of :func:`snapshot_json`."""
    items = []
    for row in json.loads(text):
        e = dict(row["essay"])
        e["published"] = _from_iso(e["published"])
        ranked = []
        for rc in row["comments"]:
            c = dict(rc["comment"])
            c["published"] = _from_iso(c["published"])
            ranked.append(RankedComment(**{**rc, "comment": Comment(**c)}))
        items.append(DraftItem(Essay(**e), tuple(ranked), row.get("is_new", True)))
    return tuple(items)


def content_hash(subject: str, intro: str, snapshot: str) -> str:
    """What approval binds to: any change to subject, intro or items changes the hash."""
    h = hashlib.sha256()
    for part in (subject, intro, snapshot):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class Store:
    """The database behind digest. Build with :func:`open_store`."""

    #: How often (seconds) a freeze asks whether to stop (:meth:`start_send`).
    STOP_POLL = 0.05

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._bind_time: Callable[[Any], Any] | None = None
        self._parse_time: Callable[[Any], Any] | None = None
        # SQLite's writers take turns (threads and sender processes alike), instead of
        # sleeping in steps of milliseconds whenever they meet (db.WriterTurn).
        self._turn: db.WriterTurn | contextlib.nullcontext[None] = (
            db.writer_turn(engine) or contextlib.nullcontext())
        # The driver's own errors: the send path's raw statements (Store._raw) meet them
        # without SQLAlchemy's wrapping ("database is locked", a full disk, a lost server).
        dbapi = getattr(engine.dialect, "loaded_dbapi", None) or engine.dialect.dbapi
        self._driver_error: type[Exception] = getattr(dbapi, "Error", SQLAlchemyError)
        self._driver_integrity: type[Exception] = getattr(dbapi, "IntegrityError", IntegrityError)

    @contextmanager
    def _tx(self, *, wait_for_disk: bool = True) -> Iterator[Connection]:
        """One transaction, committed on leaving the block.

        ``wait_for_disk=False`` is for a verdict written after the provider answered (settle,
        release, mark uncertain): its commit returns once the database has the change, without
        waiting for the disk to confirm it (SQLite: ``synchronous=NORMAL`` for this commit, no
        WAL fsync; PostgreSQL: ``synchronous_commit = off`` for this transaction). Why that
        keeps rule 1: the log is written in order, and the next commit that waits for the
        disk (the next claim, which precedes any call) makes everything before it durable as
        well. A killed process loses nothing; a power cut can lose only the last verdicts,
        whose rows are then still claimed, and so come back uncertain, never pending. Each
        batch pays one disk flush instead of two, and a flush is time the database's lock is
        held while every other sender waits.
        """
        with self._translated():
            if wait_for_disk:
                with self._turn, self.engine.begin() as conn:
                    yield conn
            elif self.dialect == "sqlite":
                with self._turn, self.engine.connect() as conn:
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    # Outside a transaction (the driver begins one before the first write):
                    # SQLite does not change how a transaction commits once it has begun.
                    raw.execute("PRAGMA synchronous=NORMAL")
                    try:
                        with conn.begin():
                            yield conn
                    finally:
                        try:
                            raw.execute("PRAGMA synchronous=FULL")
                        except BaseException:
                            conn.invalidate()  # never back in the pool without its FULL
                            raise
            else:
                with self._turn, self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    yield conn

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection, outside any transaction and without the writers' turn: a read on it
        waits for no writer (SQLite's WAL; on PostgreSQL it is rolled back at the end), and a
        write takes the turn itself (:meth:`_claim_range`)."""
        with self._translated(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """The database's errors, each as one line: a :class:`StoreError`."""
        try:
            yield
        except (IntegrityError, DraftError):
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc.__class__.__name__}: {exc}".splitlines()[0]) from exc
        except Exception as exc:
            # One line for the operator and a clean stop (rule 9), whichever way the statement
            # went to the database. (A raw statement's unique-key conflict stays itself: the
            # callers that expect one catch it.)
            if isinstance(exc, self._driver_error) and not isinstance(exc, self._driver_integrity):
                raise StoreError(f"database error: {exc.__class__.__name__}: {exc}".splitlines()[0]) from exc
            raise

    def close(self) -> None:
        self.engine.dispose()

    # -- meta -------------------------------------------------------------------------------

    def secret(self, name: str = "secret_key") -> str:
        """A random secret generated on first use and kept in the database."""
        with self._tx() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == name)).scalar()
            if value is not None:
                return str(value)
        candidate = secrets.token_urlsafe(32)
        try:
            with self._tx() as conn:
                conn.execute(insert(meta).values(key=name, value=candidate))
            return candidate
        except IntegrityError:  # another process created it first
            with self._tx() as conn:
                return str(conn.execute(select(meta.c.value).where(meta.c.key == name)).scalar_one())

    def installation_id(self) -> str:
        """This database's own random id (``meta``, made by migration 0011; else on first use):
        what tells its provider requests from another installation's on the same account."""
        return self.secret("installation_id")

    # When a scheduled use case last ran, under ``last_run:<name>``: `digest serve` compares it
    # with the schedule at start to catch up a run it missed while it was not running. Kept as
    # fixed-width UTC text, whose text order is time order, so a record only moves forward.

    _RUN_PREFIX = "last_run:"

    def record_run(self, name: str, at: datetime) -> None:
        """Record that ``name`` ran at ``at`` (unless a later run is recorded already)."""
        key, value = f"{self._RUN_PREFIX}{name}", as_utc(at).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
        try:
            with self._tx() as conn:
                if conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar() is None:
                    conn.execute(insert(meta).values(key=key, value=value))
                    return
        except IntegrityError:
            pass  # another process recorded its run first: keep the later of the two
        with self._tx() as conn:
            conn.execute(update(meta).where(and_(meta.c.key == key, meta.c.value < value)).values(value=value))

    def last_run(self, name: str) -> datetime | None:
        """When ``name`` last ran, as :meth:`record_run` recorded it; ``None`` if never."""
        with self._tx() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == f"{self._RUN_PREFIX}{name}")).scalar()
        return datetime.fromisoformat(value) if value is not None else None

    # What a provider keeps for a draft's send (Postmark's server templates), by name, under
    # ``provider_object:<draft id>:<name>`` with the provider's name as the value: recorded
    # before the provider makes it, so that the sender that finishes the draft removes every
    # one this database's sends made, and nothing another installation made.

    _OBJECT_PREFIX = "provider_object:"

    def record_provider_objects(self, draft_id: int, provider: str, names: Sequence[str]) -> None:
        """Record that ``provider`` may keep objects called ``names`` for the draft's send
        (again: nothing; by several processes at once: one record)."""
        for name in names:
            key = f"{self._OBJECT_PREFIX}{draft_id}:{name}"
            try:
                with self._tx() as conn:
                    if conn.execute(select(meta.c.key).where(meta.c.key == key)).first() is None:
                        conn.execute(insert(meta).values(key=key, value=provider))
            except IntegrityError:
                pass  # another process recorded it first

    def provider_objects(self, draft_id: int, provider: str) -> list[str]:
        """The names :meth:`record_provider_objects` recorded for the draft and ``provider``,
        in name order."""
        prefix = f"{self._OBJECT_PREFIX}{draft_id}:"
        with self._tx() as conn:
            keys = conn.execute(select(meta.c.key).where(meta.c.key.startswith(prefix, autoescape=True),
                                                         meta.c.value == provider).order_by(meta.c.key)).scalars()
            return [key[len(prefix):] for key in keys]

    def forget_provider_objects(self, draft_id: int, provider: str, names: Sequence[str]) -> None:
        """The provider let go of ``names``: their records go."""
        keys = [f"{self._OBJECT_PREFIX}{draft_id}:{name}" for name in names]
        if keys:
            with self._tx() as conn:
                conn.execute(delete(meta).where(meta.c.key.in_(keys), meta.c.value == provider))

    # A send paused until the operator acts (Sender: failed batches in a row), under
    # ``send_hold:<draft id>`` as JSON: the scheduled send job passes the draft by; `digest send
    # --draft N` and `digest send --retry-failed` lift it. No schema change: like the draft's
    # other stops, it lives beside the ledger, and only while the draft is being sent.

    _HOLD_PREFIX = "send_hold:"

    def hold_send(self, draft_id: int, hold: SendHold) -> None:
        """Record that the draft's send waits for the operator (replacing an earlier record)."""
        key = f"{self._HOLD_PREFIX}{draft_id}"
        value = json.dumps({"reason": hold.reason[:1000], "batches": hold.batches, "messages": hold.messages,
                            "at": as_utc(hold.at).isoformat() if hold.at is not None else None})
        with self._tx() as conn:
            conn.execute(self._insert(meta).values(key=key, value=value).on_conflict_do_update(
                index_elements=[meta.c.key], set_={"value": value}))

    def send_hold(self, draft_id: int) -> SendHold | None:
        """Why the draft's send waits for the operator, if it does."""
        with self._tx() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == f"{self._HOLD_PREFIX}{draft_id}")).scalar()
        if value is None:
            return None
        held = json.loads(value)
        return SendHold(str(held.get("reason") or ""), int(held.get("batches") or 0), int(held.get("messages") or 0),
                        datetime.fromisoformat(held["at"]) if held.get("at") else None)

    def lift_send_hold(self, draft_id: int) -> bool:
        """The operator resumes the send (or it finished): True if it was waiting."""
        with self._tx() as conn:
            return bool(conn.execute(delete(meta).where(meta.c.key == f"{self._HOLD_PREFIX}{draft_id}")).rowcount)

    # -- sources ----------------------------------------------------------------------------

    def cursor(self, source: str) -> SourceCursor:
        with self._tx() as conn:
            row = conn.execute(select(source_state).where(source_state.c.source == source)).first()
        if row is None:
            return SourceCursor()
        return SourceCursor(etag=row.etag, last_modified=row.last_modified)

    def record_collect(self, result: CollectResult, now: datetime) -> CollectStats:
        """Upsert a source's essays and comments and its fetch state, in one transaction.

        Two collects of one source may run at once (two `digest serve` processes starting
        together, a cron `digest collect` overlapping the service's). No write here fails on
        a row the other inserted first: such a row is taken as found, so an item counts as
        new only for the collect that inserted it, and as updated only where what this one
        fetched differs from what is stored.

        Keys and text are stored as :func:`storable_key` and :func:`storable` make them, the
        same way each run (so what comes back is compared with what was stored of it).
        """
        result = _storable_result(result)
        with self._tx() as conn:
            self._touch_source(conn, result, now)
            if result.error or result.not_modified:
                return CollectStats()
            stats = self._upsert_essays(conn, result, now)
            cstats = self._upsert_comments(conn, result, now)
            counts = {
                "essays_seen": select(func.count()).select_from(essays)
                .where(essays.c.source == result.source).scalar_subquery(),
                "comments_seen": select(func.count()).select_from(comments)
                .where(and_(comments.c.source == result.source, comments.c.deleted_at.is_(None)))
                .scalar_subquery(),
            }
            conn.execute(update(source_state).where(source_state.c.source == result.source).values(**counts))
        return CollectStats(stats[0], stats[1], *cstats)

    def _touch_source(self, conn: Connection, result: CollectResult, now: datetime) -> None:
        values: dict[str, Any] = {"last_fetch_at": now}
        if result.error:
            values.update(last_error=result.error[:2000], last_error_at=now)
        else:
            warning = "; ".join(result.warnings)[:2000] or None
            values.update(last_success_at=now, last_error=warning, last_error_at=now if warning else None,
                          etag=result.cursor.etag, last_modified=result.cursor.last_modified)
        # One statement, not a read then an insert: the other collect may be inserting the row
        # too. The row written stays locked until this collect commits, so a second collect of
        # the source waits here for the first to finish (SQLite: for its one writer at a time).
        stmt = self._insert(source_state).values(source=result.source, **values)
        conn.execute(stmt.on_conflict_do_update(index_elements=[source_state.c.source], set_=values))

    def _insert(self, table: Table) -> Any:
        """``INSERT INTO table`` that takes ``ON CONFLICT`` clauses, in this database's dialect
        (whose module the engine has loaded already)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as postgresql_insert

            return postgresql_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def _upsert_essays(self, conn: Connection, result: CollectResult, now: datetime) -> tuple[int, int]:
        fetched = {(e.source, e.key): e for e in result.essays}  # an essay listed twice: its last copy

        def values(essay: Essay) -> dict[str, Any]:
            return {"url": essay.url, "title": essay.title, "author": essay.author, "html": essay.html,
                    "summary": essay.summary, "published_at": essay.published,
                    "comments_url": essay.comments_url}

        found, new = self._insert_missing(conn, essays, tuple(essays.c), fetched, values, now)
        changes = []
        for k, essay in fetched.items():
            row = found.get(k)
            if row is not None and (any(getattr(row, c) != v for c, v in values(essay).items()
                                        if c != "published_at") or _dt(row.published_at) != essay.published):
                changes.append({"row_id": row.id, "updated_at": now, **values(essay)})
        self._update_rows(conn, essays, changes)
        return new, len(changes)

    def _upsert_comments(self, conn: Connection, result: CollectResult, now: datetime) -> tuple[int, int, int]:
        deleted = 0
        essay_ids: dict[tuple[str, str], int | None] = {}
        seen_by_essay: dict[int, set[str]] = {}
        # Essays whose full comment list we hold: comments of theirs missing now were deleted.
        # A source that lists essays and their comments together covers each essay it lists.
        covered = list(result.covered) or [(e.source, e.key) for e in result.essays]
        for source, key in covered:
            seen_by_essay.setdefault(self._essay_id(conn, essay_ids, source, key) or -1, set())
        fetched: dict[tuple[str, str], tuple[int, Comment]] = {}  # a comment listed twice: its last copy
        for c in result.comments:
            essay_id = self._essay_id(conn, essay_ids, c.essay_source or c.source, c.essay_key)
            if essay_id is None:
                continue  # a comment on an essay we do not have: nothing to attach it to
            if essay_id in seen_by_essay:  # only essays whose whole list we hold
                seen_by_essay[essay_id].add(c.key)
            fetched[(c.source, c.key)] = (essay_id, c)

        def values(item: tuple[int, Comment]) -> dict[str, Any]:
            essay_id, c = item
            return {"essay_id": essay_id, "author": c.author, "html": c.html, "url": c.url,
                    "score": c.score, "position": c.position, "parent_key": c.parent_key,
                    "upvotes": c.upvotes, "downvotes": c.downvotes,
                    "published_at": c.published, "deleted_at": None}

        found, new = self._insert_missing(conn, comments, _COMMENT_COMPARED, fetched, values, now)
        changes = []
        for k, (essay_id, c) in fetched.items():
            row = found.get(k)
            if row is not None and (row.html, row.score, row.author, row.position, row.upvotes, row.downvotes,
                                    row.parent_key, row.deleted_at) != (
                c.html, c.score, c.author, c.position, c.upvotes, c.downvotes, c.parent_key, None
            ):
                changes.append({"row_id": row.id, "updated_at": now, **values((essay_id, c))})
        self._update_rows(conn, comments, changes)
        for essay_id, keys in seen_by_essay.items():
            if essay_id < 0:
                continue
            gone = and_(comments.c.essay_id == essay_id, comments.c.source == result.source,
                        comments.c.deleted_at.is_(None))
            if keys:
                gone = and_(gone, comments.c.key.not_in(keys))
            stmt = update(comments).where(gone).values(deleted_at=now, updated_at=now)
            deleted += conn.execute(stmt).rowcount or 0
        return new, len(changes), deleted

    def _insert_missing(self, conn: Connection, table: Table, columns: Sequence[ColumnElement[Any]],
                        fetched: Mapping[tuple[str, str], _Item], values: Callable[[_Item], dict[str, Any]],
                        now: datetime) -> tuple[dict[tuple[str, str], Any], int]:
        """Insert the fetched items (by source and key) that ``table`` (essays or comments) does
        not hold yet; returns the rows it held (their ``columns``), to compare with what was
        fetched, and how many items were inserted.

        Another collect may insert an item after this one looked for it: the insert skips that
        item (PostgreSQL first waits for the other to commit), and its row is read back with
        the others held. So the item counts as new once, for the collect that inserted it.
        """
        found = self._rows_by_key(conn, table, columns, list(fetched))
        # Sorted, as the updates are by row id: two collects at once lock rows in one order.
        missing = sorted(k for k in fetched if k not in found)
        if not missing:
            return found, 0
        stmt = (self._insert(table).on_conflict_do_nothing(index_elements=[table.c.source, table.c.key])
                .returning(table.c.source, table.c.key))
        rows = [{"source": source, "key": key, "first_seen_at": now, "updated_at": now,
                 **values(fetched[(source, key)])} for source, key in missing]
        inserted = {(r.source, r.key) for r in conn.execute(stmt, rows)}
        found.update(self._rows_by_key(conn, table, columns, [k for k in missing if k not in inserted]))
        return found, len(inserted)

    @staticmethod
    def _rows_by_key(conn: Connection, table: Table, columns: Sequence[ColumnElement[Any]],
                     keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """The rows of ``table`` with these (source, key)s, by (source, key): a few hundred
        keys per query, not a query per key."""
        by_source: dict[str, list[str]] = {}
        for source, key in keys:
            by_source.setdefault(source, []).append(key)
        found: dict[tuple[str, str], Any] = {}
        for source, names in by_source.items():
            for i in range(0, len(names), _KEYS_PER_QUERY):
                stmt = select(*columns).where(and_(table.c.source == source,
                                                   table.c.key.in_(names[i:i + _KEYS_PER_QUERY])))
                found.update(((row.source, row.key), row) for row in conn.execute(stmt))
        return found

    @staticmethod
    def _update_rows(conn: Connection, table: Table, changes: list[dict[str, Any]]) -> None:
        """Set each change's columns on the row ``row_id`` names: one statement for them all,
        in row order (two writers at once lock rows in one order)."""
        if changes:
            conn.execute(update(table).where(table.c.id == bindparam("row_id")),
                         sorted(changes, key=itemgetter("row_id")))

    @staticmethod
    def _essay_id(conn: Connection, cache: dict[tuple[str, str], int | None], source: str, key: str) -> int | None:
        if (source, key) not in cache:
            cache[(source, key)] = conn.execute(
                select(essays.c.id).where(and_(essays.c.source == source, essays.c.key == key))
            ).scalar()
        return cache[(source, key)]

    def recent_essays(self, source: str, since: datetime, limit: int) -> list[Essay]:
        """A source's essays published (or first seen) since ``since``, newest first."""
        stmt = (
            select(essays).where(and_(essays.c.source == source, or_(
                essays.c.published_at >= since,
                and_(essays.c.published_at.is_(None), essays.c.first_seen_at >= since))))
            .order_by(essays.c.published_at.desc().nulls_last(), essays.c.id.desc()).limit(limit)
        )
        with self._tx() as conn:
            rows = conn.execute(stmt).all()
        return [Essay(r.source, r.key, r.url, r.title, r.html, r.summary, r.author, _dt(r.published_at),
                      r.comments_url)
                for r in rows]

    def source_statuses(self) -> list[SourceStatus]:
        with self._tx() as conn:
            rows = conn.execute(select(source_state).order_by(source_state.c.source)).all()
        return [SourceStatus(r.source, _dt(r.last_fetch_at), _dt(r.last_success_at), r.last_error,
                             _dt(r.last_error_at), r.essays_seen, r.comments_seen) for r in rows]

    # -- drafting ---------------------------------------------------------------------------

    def last_sent_at(self) -> datetime | None:
        with self._tx() as conn:
            value = conn.execute(
                select(func.max(drafts.c.started_at)).where(drafts.c.status.in_(("sending", "sent")))
            ).scalar()
        return _dt(value)

    def candidate_essays(self, since: datetime | None, limit: int) -> list[tuple[int, Essay]]:
        """Essays no live draft has featured, newest first; with ``since``, only those after it."""
        featured = (
            select(draft_items.c.essay_id)
            .join(drafts, drafts.c.id == draft_items.c.draft_id)
            .where(drafts.c.status.in_(FEATURING_STATUSES))
        )
        stmt = select(essays).where(essays.c.id.not_in(featured))
        if since is not None:
            stmt = stmt.where(or_(essays.c.published_at > since,
                                  and_(essays.c.published_at.is_(None), essays.c.first_seen_at > since)))
        stmt = stmt.order_by(essays.c.published_at.desc().nulls_last(), essays.c.id.desc()).limit(limit)
        with self._tx() as conn:
            rows = conn.execute(stmt).all()
        return [(r.id, Essay(r.source, r.key, r.url, r.title, r.html, r.summary, r.author, _dt(r.published_at),
                      r.comments_url))
                for r in rows]

    def comments_for(self, essay_ids: Sequence[int]) -> dict[int, list[tuple[int, Comment]]]:
        """Live (not deleted) comments of these essays, by essay id."""
        out: dict[int, list[tuple[int, Comment]]] = {i: [] for i in essay_ids}
        if not essay_ids:
            return out
        stmt = (
            select(comments, essays.c.key.label("essay_key"), essays.c.source.label("essay_source"))
            .join(essays, essays.c.id == comments.c.essay_id)
            .where(and_(comments.c.essay_id.in_(essay_ids), comments.c.deleted_at.is_(None)))
            .order_by(comments.c.id)
        )
        with self._tx() as conn:
            for r in conn.execute(stmt):
                out[r.essay_id].append((r.id, Comment(
                    source=r.source, essay_key=r.essay_key, key=r.key, author=r.author, html=r.html,
                    url=r.url, score=r.score, published=_dt(r.published_at), parent_key=r.parent_key,
                    position=r.position, upvotes=r.upvotes, downvotes=r.downvotes,
                    essay_source=r.essay_source if r.essay_source != r.source else None,
                )))
        return out

    def create_draft(self, draft: Draft, refs: Sequence[tuple[int, int | None]], now: datetime,
                     status: str = "pending_review") -> tuple[Draft, bool]:
        """Insert a draft and its item references; returns (draft with id and hash, created).

        If a live draft already holds the period (rule 3), that one is returned, uncreated.
        """
        snap = snapshot_json(draft.items)
        digest_hash = content_hash(draft.subject, draft.intro, snap)
        try:
            with self._tx() as conn:
                draft_id = conn.execute(
                    insert(drafts).values(period_key=draft.period_key, status=status, subject=draft.subject,
                                          intro=draft.intro, snapshot=snap, content_hash=digest_hash,
                                          created_at=now, updated_at=now)
                    .returning(drafts.c.id)
                ).scalar_one()
                if refs:
                    conn.execute(insert(draft_items), [
                        {"draft_id": draft_id, "position": i, "essay_id": e, "comment_id": c}
                        for i, (e, c) in enumerate(refs)
                    ])
        except IntegrityError:
            existing = self.live_draft_for_period(draft.period_key)
            if existing is None:
                raise
            return existing, False
        return self.get_draft(draft_id), True

    def live_draft_for_period(self, period_key: str) -> Draft | None:
        with self._tx() as conn:
            draft_id = conn.execute(
                select(drafts.c.id).where(and_(drafts.c.period_key == period_key,
                                               drafts.c.status.not_in(("rejected", "skipped"))))
            ).scalar()
        return self.get_draft(draft_id) if draft_id is not None else None

    def get_draft(self, draft_id: int) -> Draft:
        with self._tx() as conn:
            row = conn.execute(select(drafts).where(drafts.c.id == draft_id)).first()
        if row is None:
            raise DraftError(f"no draft with id {draft_id}", hint="`digest drafts` lists them")
        return Draft(period_key=row.period_key, subject=row.subject, intro=row.intro,
                     items=items_from_snapshot(row.snapshot), id=row.id, status=row.status,
                     created_at=_dt(row.created_at), send_at=_dt(row.send_at), content_hash=row.content_hash)

    def list_drafts(self, limit: int | None = 50) -> list[DraftSummary]:
        with self._tx() as conn:
            rows = conn.execute(select(drafts).order_by(drafts.c.id.desc()).limit(limit)).all()
        out = []
        for r in rows:
            items = json.loads(r.snapshot)
            out.append(DraftSummary(r.id, r.period_key, r.status, r.subject, as_utc(r.created_at),
                                    _dt(r.send_at), len(items), sum(len(i["comments"]) for i in items), r.note))
        return out

    def transition(self, draft_id: int, from_statuses: Iterable[str], to_status: str, now: datetime,
                   **values: Any) -> Draft:
        """Move a draft between states atomically; ``DraftError`` if it is not in ``from_statuses``."""
        allowed = tuple(from_statuses)
        with self._tx() as conn:
            changed = conn.execute(
                update(drafts).where(and_(drafts.c.id == draft_id, drafts.c.status.in_(allowed)))
                .values(status=to_status, updated_at=now, **values)
            ).rowcount
        if not changed:
            current = self.get_draft(draft_id)  # raises if missing
            raise DraftError(f"draft {draft_id} is {current.status}; it must be {' or '.join(allowed)} "
                             f"to become {to_status}")
        return self.get_draft(draft_id)

    def due_drafts(self, now: datetime) -> list[int]:
        """Approved drafts whose send time has come, and sends left unfinished."""
        with self._tx() as conn:
            rows = conn.execute(
                select(drafts.c.id).where(or_(
                    and_(drafts.c.status == "approved",
                         or_(drafts.c.send_at.is_(None), drafts.c.send_at <= now)),
                    drafts.c.status == "sending",
                )).order_by(drafts.c.id)
            ).all()
        return [r.id for r in rows]

    def pending_review_before(self, created_before: datetime) -> list[int]:
        with self._tx() as conn:
            rows = conn.execute(select(drafts.c.id).where(and_(
                drafts.c.status == "pending_review", drafts.c.created_at <= created_before))).all()
        return [r.id for r in rows]

    # -- subscribers ------------------------------------------------------------------------

    def subscriber_by_email(self, email: str) -> Subscriber | None:
        with self._tx() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.email == email.lower())).first()
        return self._subscriber(row) if row else None

    def subscriber(self, subscriber_id: int) -> Subscriber | None:
        with self._tx() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).first()
        return self._subscriber(row) if row else None

    @staticmethod
    def _subscriber(row: Any) -> Subscriber:
        return Subscriber(row.id, row.email, row.name, row.status, as_utc(row.created_at),
                          _dt(row.unsubscribed_at))

    def upsert_subscribers(self, rows: Sequence[tuple[str, str]], origin: str, now: datetime,
                           reactivate_removed: bool = False) -> tuple[int, int, list[str]]:
        """Add (email, name) rows. Returns (added, updated, skipped emails).

        An address that unsubscribed, bounced or complained is never re-activated here. An
        address given twice counts once, with the last name given for it. Addresses are looked
        up a few hundred per query and the new ones inserted in one statement, skipping any
        another process (an import, the subscribe form) inserted meanwhile: that one is then
        treated as found.
        """
        wanted: dict[str, str] = {}
        for email, name in rows:
            email = email.lower()
            wanted[email] = name or wanted.get(email, "")
        added = updated = 0
        skipped: list[str] = []
        columns = (subscribers.c.id, subscribers.c.email, subscribers.c.name, subscribers.c.status)
        with self._tx() as conn:
            # In one order whatever the file's: two imports at once then take their row locks
            # in the same order (PostgreSQL), rather than each wait for the other's.
            emails = sorted(wanted)
            for i in range(0, len(emails), _KEYS_PER_QUERY):
                chunk = emails[i:i + _KEYS_PER_QUERY]
                found = {r.email: r for r in conn.execute(select(*columns).where(subscribers.c.email.in_(chunk)))}
                missing = [e for e in chunk if e not in found]
                if missing:
                    stmt = (self._insert(subscribers).on_conflict_do_nothing(index_elements=[subscribers.c.email])
                            .returning(subscribers.c.email))
                    inserted = {r.email for r in conn.execute(stmt, [
                        {"email": e, "name": wanted[e], "status": "active", "origin": origin, "created_at": now,
                         "updated_at": now} for e in missing])}
                    added += len(inserted)
                    late = [e for e in missing if e not in inserted]
                    if late:
                        found.update((r.email, r) for r in conn.execute(
                            select(*columns).where(subscribers.c.email.in_(late))))
                back: list[dict[str, Any]] = []
                renamed: list[dict[str, Any]] = []
                for email, row in found.items():
                    name = wanted[email]
                    if row.status == "removed" and reactivate_removed:
                        back.append({"row_id": row.id, "status": "active", "name": name, "updated_at": now,
                                     "unsubscribed_at": None})
                    elif row.status != "active":
                        skipped.append(email)
                    elif name and name != row.name:
                        renamed.append({"row_id": row.id, "name": name, "updated_at": now})
                changed = [change["row_id"] for change in (*back, *renamed)]
                if changed:
                    # Their rows locked first, in address order (PostgreSQL; the updates below go
                    # by id): the order in which a webhook's suppressions take them
                    # (_apply_events), so the two wait for each other rather than deadlock.
                    conn.execute(select(subscribers.c.id).where(subscribers.c.id.in_(changed))
                                 .order_by(subscribers.c.email).with_for_update())
                self._update_rows(conn, subscribers, back)
                self._update_rows(conn, subscribers, renamed)
                added += len(back)
                updated += len(renamed)
        return added, updated, skipped

    def list_subscribers(self, status: str | None = None) -> Iterator[Subscriber]:
        """Stream subscribers in id order (never all in memory at once)."""
        return self._stream_subscribers(*([subscribers.c.status == status] if status else []))

    def audience(self) -> Iterator[Subscriber]:
        """The subscribers a send starting now would freeze as its audience (:meth:`start_send`),
        streamed in id order: what ``digest send --dry-run`` goes through."""
        return self._stream_subscribers(_sendable())

    def remaining(self, draft_id: int, page: int = 1000) -> Iterator[tuple[Claimed, bool]] | None:
        """What a send of a draft whose audience is frozen has left, as a claim would find it:
        each row not yet claimed (above the cursor) or back in the queue, with whether its
        address may still be sent to (rule 2); streamed in ledger order. ``None`` when the
        draft has no ledger rows yet (its send has not started: see :meth:`audience`).

        For ``digest send --dry-run`` of a send that stopped or paused; it writes nothing.
        """
        with self._tx() as conn:
            if self._raw(conn, self._sql("SELECT 1 FROM send_ledger WHERE draft_id = {p} LIMIT 1"),
                         (draft_id,)).fetchone() is None:
                return None
            cursor = self._raw(conn, self._sql("SELECT claimed_through FROM send_cursors WHERE draft_id = {p}"),
                               (draft_id,)).fetchone()
        # Without a cursor (a send started before migration 0007) every row has its own status.
        through = int(cursor[0]) if cursor else 0
        sql = self._sql(self._ELIGIBLE + "WHERE l.draft_id = {p} AND l.id > {p} AND "
                        "((l.id > {p} AND l.status = 'pending') OR l.status = 'queued') ORDER BY l.id LIMIT {p}")

        def rows() -> Iterator[tuple[Claimed, bool]]:
            last = 0
            while True:
                with self._tx() as conn:
                    found = self._raw(conn, sql, (draft_id, last, through, page)).fetchall()
                for r in found:
                    yield Claimed(r[0], r[1], r[2], r[3]), bool(r[4])
                if len(found) < page:
                    return
                last = found[-1][0]

        return rows()

    def _stream_subscribers(self, *conditions: ColumnElement[bool]) -> Iterator[Subscriber]:
        """The subscribers matching ``conditions`` in id order, a thousand rows per read."""
        last = 0
        while True:
            stmt = (select(subscribers).where(subscribers.c.id > last, *conditions)
                    .order_by(subscribers.c.id).limit(1000))
            with self._tx() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            for r in rows:
                yield self._subscriber(r)
            last = rows[-1].id

    def set_subscriber_status(self, subscriber_id: int, status: str, now: datetime) -> bool:
        """Set status; returns False when it already had it (so callers stay idempotent)."""
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if status in INELIGIBLE:
            values["unsubscribed_at"] = now
        if status == "removed":
            values["name"] = ""
        with self._tx() as conn:
            changed = conn.execute(update(subscribers).where(and_(
                subscribers.c.id == subscriber_id, subscribers.c.status != status)).values(**values)).rowcount
        return bool(changed)

    def count_subscribers(self) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(select(subscribers.c.status, func.count()).group_by(subscribers.c.status)).all()
        return {r[0]: r[1] for r in rows}

    def suppress(self, email: str, reason: str, origin: str, now: datetime) -> None:
        """Add an address to the suppression list (idempotent) and mark its subscriber."""
        with self._tx() as conn:
            self._suppress(conn, email.lower(), reason, origin, now)

    def _suppress(self, conn: Connection, email: str, reason: str, origin: str, now: datetime) -> None:
        # One statement, not a read then an insert: two events for one address (a bounce and
        # the provider's own suppression notice) may arrive at the same moment.
        conn.execute(self._insert(suppressions).values(email=email, reason=reason, origin=origin, created_at=now)
                     .on_conflict_do_nothing(index_elements=[suppressions.c.email]))
        conn.execute(update(subscribers).where(and_(subscribers.c.email == email, subscribers.c.status == "active"))
                     .values(status=_SUPPRESSED_STATUS.get(reason, "unsubscribed"), updated_at=now,
                             unsubscribed_at=now))

    def reactivate(self, email: str, now: datetime, *, provider_cleared: bool = False) -> Reactivated:
        """Take an address back after a bounce, in one transaction: its suppression lifted, its
        subscriber (if it has one) active again, and its soft bounces counted from ``now`` on.

        ``SubscriberError``, and nothing written, for an address that is neither a subscriber
        nor suppressed, one active and not suppressed, one removed, and one whose reader said
        no: unsubscribed or complained, by its status, its suppression's reason, or an event
        received since its last reactivation (a complaint arriving while it was suppressed for
        a bounce changed neither). An address the provider itself refused (``provider_suppressed``)
        only with ``provider_cleared``: the provider's own list may hold it for a complaint,
        which only the provider can tell.
        """
        email = email.strip().lower()
        with self._tx() as conn:
            if self.dialect == "postgresql":
                # A webhook takes the same lock before it suppresses the address (_apply_events):
                # a complaint being applied now is read below, or applied after this commits.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _address_lock(email)})
            # First, and a write: on SQLite the transaction holds the write lock from here, so
            # what it reads below stays so until it commits. A refusal raises: all rolled back.
            lifted = conn.execute(delete(suppressions).where(suppressions.c.email == email).returning(
                suppressions.c.reason, suppressions.c.origin, suppressions.c.created_at)).first()
            # Locked on PostgreSQL: an unsubscribe by link meanwhile waits, and applies after this.
            sub = conn.execute(select(subscribers.c.id, subscribers.c.status, subscribers.c.unsubscribed_at)
                               .where(subscribers.c.email == email).with_for_update()).first()
            status = None if sub is None else str(sub.status)
            reason = None if lifted is None else str(lifted.reason)
            self._refuse_reactivation(conn, email, status, reason)
            if lifted is not None and reason == "provider_suppressed" and not provider_cleared:
                by = lifted.origin or "the provider"
                raise SubscriberError(f"{email} was refused by {by}, whose list may hold it for a complaint",
                                      hint=f"check {by}'s suppression list; if it was a bounce, take the address "
                                           "off there, then run again with --provider-cleared")
            if lifted is not None:
                suppressed_at = _dt(lifted.created_at)
            else:  # a subscriber bounced without a suppression
                suppressed_at = None if sub is None else _dt(sub.unsubscribed_at)
            values = {"reason": reason, "suppressed_at": suppressed_at, "reactivated_at": now}
            conn.execute(self._insert(reactivations).values(email=email, **values)
                         .on_conflict_do_update(index_elements=[reactivations.c.email], set_=values))
            if sub is not None and status != "active":
                conn.execute(update(subscribers).where(subscribers.c.id == sub.id)
                             .values(status="active", updated_at=now, unsubscribed_at=None))
        return Reactivated(email, status, reason, "" if lifted is None else str(lifted.origin), suppressed_at)

    @staticmethod
    def _refuse_reactivation(conn: Connection, email: str, status: str | None, reason: str | None) -> None:
        """Raise ``SubscriberError`` unless :meth:`reactivate` may take ``email`` back, given its
        subscriber's ``status`` and its suppression's ``reason`` (``None``: there is none)."""
        if status is None and reason is None:
            raise SubscriberError(f"{email} is neither a subscriber nor suppressed",
                                  hint="check the address: `digest subscribers list` lists them")
        said_no = status if status in ("unsubscribed", "complained") else None
        if said_no is None and reason is not None and reason not in BOUNCE_REASONS:
            said_no = _SUPPRESSED_STATUS.get(reason, "unsubscribed")
        if said_no is not None:
            raise SubscriberError(f"{email} is {said_no} and will not be reactivated",
                                  hint="only the reader can subscribe again")
        if status == "removed":
            then = ", then reactivate it" if reason else ""
            raise SubscriberError(f"{email} was removed and will not be reactivated",
                                  hint=f"`digest subscribers add` takes it back{then}")
        if status == "active" and reason is None:
            raise SubscriberError(f"{email} is active and not suppressed", hint="there is nothing to reactivate")
        since = conn.execute(select(reactivations.c.reactivated_at).where(reactivations.c.email == email)).scalar()
        said = [delivery_events.c.email == email, delivery_events.c.event_type.in_(_REFUSING_EVENTS)]
        if since is not None:
            said.append(delivery_events.c.received_at > as_utc(since))
        event = conn.execute(select(delivery_events.c.event_type, delivery_events.c.received_at).where(*said)
                             .order_by(delivery_events.c.received_at.desc()).limit(1)).first()
        if event is not None:
            what = "complained" if event.event_type == "complaint" else "unsubscribed"
            raise SubscriberError(f"{email} bounced but {what} on {as_utc(event.received_at):%Y-%m-%d} "
                                  "and will not be reactivated",
                                  hint="only the reader can subscribe again")

    def record_event(self, event: DeliveryEvent, now: datetime) -> bool:
        """Store a provider event once, without applying it; returns False for a replay of one
        already stored. Webhooks go through :meth:`apply_webhook`, which applies what it stores."""
        try:
            with self._tx() as conn:
                conn.execute(insert(delivery_events).values(
                    provider=event.provider, event_id=event.event_id, event_type=event.event_type,
                    email=event.email.lower(), ledger_id=event.ledger_id, occurred_at=event.occurred_at,
                    received_at=now, detail=json.dumps(event.detail, sort_keys=True)))
        except IntegrityError:
            return False
        return True

    def draft_event_counts(self, draft_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """Per draft, how many provider events of each type name one of its messages."""
        if not draft_ids:
            return {}
        marks = ",".join(["{p}"] * len(draft_ids))
        with self._tx() as conn:
            rows = self._raw(conn, self._sql(
                "SELECT l.draft_id, e.event_type, COUNT(*) FROM delivery_events e "
                f"JOIN send_ledger l ON l.id = e.ledger_id WHERE l.draft_id IN ({marks}) "
                "GROUP BY l.draft_id, e.event_type"), tuple(draft_ids)).fetchall()
        out: dict[int, dict[str, int]] = {}
        for draft_id, event_type, n in rows:
            out.setdefault(int(draft_id), {})[event_type] = int(n)
        return out

    def event_counts(self) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(select(delivery_events.c.event_type, func.count())
                                .group_by(delivery_events.c.event_type)).all()
        return {r[0]: r[1] for r in rows}

    # -- provider webhooks (DESIGN.md rule 7) -------------------------------------------------
    #
    # One rule: what is recorded was applied. A webhook request's replay key, its events and
    # their effects (suppressions, subscriber statuses) are written in one transaction, so a
    # remembered key means its events were applied, and a stored event means its effect was.
    # Both memories then only ever say "already done": a copy of a request (the same key) is
    # answered without touching its events, and an event stored before (the same provider
    # event id arriving under another key: SendGrid signs each retry anew, SES may publish one
    # event to two topics, Postmark has no key at all) is stored and applied once. Nothing is
    # applied again, so a reader re-activated after a bounce is not suppressed again by a late
    # copy of it. If applying fails, the whole transaction rolls back, key included, and the
    # provider's retry applies the request.
    #
    # Replay keys are kept in ``meta`` under a prefix, without a schema change: the primary key
    # makes "first one wins" atomic across processes (a second copy waits for the first one's
    # transaction, then finds its key or, if it rolled back, takes it), and expired keys are
    # purged at most once a minute per process. The value is the expiry (fixed width, so text
    # order is time order), then a space and the content hash if there is one.

    _REPLAY_PREFIX = "webhook-replay:"

    def _replay_meta_key(self, provider: str, key: str) -> str:
        # Hashed: provider keys (Mailgun tokens, Svix ids) are long and caller-chosen.
        return f"{self._REPLAY_PREFIX}{provider[:20]}:{hashlib.sha256(key.encode('utf-8')).hexdigest()[:60]}"

    _next_replay_purge = 0.0  # time.monotonic() after which the next key purges the expired ones

    def apply_webhook(self, provider: str, events: Sequence[DeliveryEvent], now: datetime, rules: SuppressionRules,
                      *, replay_key: str | None = None, keep_until: datetime | None = None,
                      content_hash: str = "") -> WebhookApplied:
        """Record one webhook request and apply its events, in one transaction.

        With a ``replay_key`` (remembered until ``keep_until``), a key already remembered is
        ``"duplicate"`` if it came with the same ``content_hash`` (a copy of that request) and
        ``"conflict"`` if with another (the same key on different content); either way nothing
        is written. Otherwise each event is stored once by its provider id, and only the events
        new to the store are applied by ``rules``.
        """
        if replay_key is not None and time.monotonic() >= self._next_replay_purge:
            # Expired keys go at most once a minute per process, in a transaction of their own:
            # the purge reads every key remembered (a send's worth of delivery events), too much
            # for every webhook, and it must not hold those rows while the events are applied.
            cutoff = f"{int(as_utc(now).timestamp()):012d}"
            with self._tx() as conn:
                conn.execute(delete(meta).where(and_(
                    meta.c.key.startswith(self._REPLAY_PREFIX, autoescape=True), meta.c.value < cutoff)))
            self._next_replay_purge = time.monotonic() + REPLAY_PURGE_EVERY
        with self._tx() as conn:
            if replay_key is not None:
                # First, and a write: the transaction's first lock is the key's (SQLite), and a
                # copy arriving meanwhile waits here until this transaction ends (PostgreSQL).
                seen = self._take_replay_key(conn, provider, replay_key, now, keep_until or now, content_hash)
                if seen != "new":
                    return WebhookApplied(seen, duplicates=len(events))
            return self._apply_events(conn, provider, events, now, rules)

    def _take_replay_key(self, conn: Connection, provider: str, key: str, now: datetime, keep_until: datetime,
                         content_hash: str) -> ReplaySeen:
        expires = f"{int(as_utc(keep_until).timestamp()):012d}"
        cutoff = f"{int(as_utc(now).timestamp()):012d}"
        meta_key = self._replay_meta_key(provider, key)
        value = f"{expires} {content_hash}" if content_hash else expires
        insert_key = self._insert(meta).values(key=meta_key, value=value).on_conflict_do_nothing(
            index_elements=[meta.c.key]).returning(meta.c.key)
        for _ in range(3):
            if conn.execute(insert_key).first() is not None:
                return "new"
            held = conn.execute(select(meta.c.value).where(meta.c.key == meta_key)).scalar_one_or_none()
            if held is None:
                continue  # purged in between: take it
            if held.partition(" ")[0] < cutoff:
                # Expired, not yet purged: forgotten, as if the purge had run.
                if conn.execute(update(meta).where(and_(meta.c.key == meta_key, meta.c.value == held))
                                .values(value=value)).rowcount:
                    return "new"
                continue  # another request took it meanwhile: see what it holds now
            return "duplicate" if held.partition(" ")[2] == content_hash else "conflict"
        raise StoreError("webhook replay memory: the key kept changing hands")

    def _apply_events(self, conn: Connection, provider: str, events: Sequence[DeliveryEvent], now: datetime,
                      rules: SuppressionRules) -> WebhookApplied:
        # Rows are written in one order whatever the request's (events by id, then addresses
        # sorted): two requests sharing events or addresses then wait for each other on
        # PostgreSQL rather than deadlock.
        insert_event = self._insert(delivery_events).on_conflict_do_nothing(
            index_elements=[delivery_events.c.provider, delivery_events.c.event_id]).returning(delivery_events.c.id)
        new: set[int] = set()  # positions in ``events`` of the events new to the store
        for i in sorted(range(len(events)), key=lambda i: events[i].event_id):
            event = events[i]
            if conn.execute(insert_event.values(
                    provider=event.provider, event_id=event.event_id, event_type=event.event_type,
                    email=event.email.strip().lower(), ledger_id=event.ledger_id, occurred_at=event.occurred_at,
                    received_at=now, detail=json.dumps(event.detail, sort_keys=True))).first() is not None:
                new.add(i)
        # Each address's first reason, in the request's order; soft bounces count once all of
        # this request's are stored.
        reasons: dict[str, str] = {}
        soft: list[str] = []
        for i, event in enumerate(events):
            email = event.email.strip().lower()
            if i not in new or not email:
                continue
            reason = rules.reasons.get(event.event_type)
            if reason is not None:
                reasons.setdefault(email, reason)
            elif event.event_type == "soft_bounce" and email not in soft:
                soft.append(email)
        since = now - rules.soft_bounce_window
        soft = [email for email in soft if email not in reasons]
        if self.dialect == "postgresql":
            # Two requests bringing the bounces that reach the limit at once would each count
            # its own uncommitted event only, and neither would suppress; a reactivation
            # deciding on an address while a complaint for it is being applied would take the
            # reader back against it. One at a time per address, until commit: the second
            # counts, suppresses or decides after the first committed (each statement reads
            # what is committed when it starts). SQLite has one writer anyway.
            for email in sorted({*reasons, *soft}):
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _address_lock(email)})
        # An address taken back after a bounce counts its soft bounces from then on.
        taken_back = {r.email: as_utc(r.reactivated_at) for r in conn.execute(
            select(reactivations.c.email, reactivations.c.reactivated_at).where(reactivations.c.email.in_(soft)))
        } if soft else {}
        for email in soft:
            counted = [delivery_events.c.email == email, delivery_events.c.event_type == "soft_bounce",
                       delivery_events.c.received_at >= since]
            if email in taken_back:
                counted.append(delivery_events.c.received_at > taken_back[email])
            if conn.execute(select(func.count()).select_from(delivery_events).where(
                    and_(*counted))).scalar_one() >= rules.soft_bounce_limit:
                reasons[email] = "soft_bounce_limit"
        for email in sorted(reasons):
            self._suppress(conn, email, reasons[email], provider, now)
        return WebhookApplied("new", stored=len(new), duplicates=len(events) - len(new), suppressed=tuple(reasons))

    # -- the send ledger ---------------------------------------------------------------------
    #
    # How a row's fate is recorded (schema.py, migration 0007): a claim takes the next rows of
    # the draft by id above its cursor and records the range in one ``send_batches`` row; the
    # rows themselves keep their own status ``pending``, which then means "as the batch says".
    # Rows that part from their batch get a status of their own. Readers go through
    # ledger_counts and ledger_rows, which put the two together.

    def start_send(self, draft_id: int, now: datetime, should_stop: Callable[[], bool] | None = None) -> int:
        """approved → sending, freezing the audience as ledger rows, in one transaction.

        Returns how many rows the audience has. A draft already ``sending`` is left alone.
        While the audience is written (about a second for a million), ``should_stop`` is asked
        every :attr:`STOP_POLL` seconds; once it says yes, the statement is cut short and the whole transaction
        rolled back: :class:`FreezeStopped`, the draft still approved, nothing frozen.
        """
        with self._tx() as conn:
            changed = conn.execute(
                update(drafts).where(and_(drafts.c.id == draft_id, drafts.c.status == "approved"))
                .values(status="sending", started_at=now, updated_at=now)
            ).rowcount
            if changed:
                audience = select(
                    literal(draft_id, Integer), subscribers.c.id, subscribers.c.email, literal("pending", String),
                ).where(_sendable())
                highest = "SELECT COALESCE(MAX(id), 0) FROM send_ledger"
                before = self._raw(conn, highest).fetchone()[0] if self.dialect == "sqlite" else None
                with self._stoppable(conn, should_stop):
                    frozen = conn.execute(insert(send_ledger).from_select(
                        ["draft_id", "subscriber_id", "email", "status"], audience)).rowcount
                if before is not None and frozen >= 0:
                    # SQLite's one writer numbered the rows on from the highest id: the cursor's
                    # bounds without counting the rows again (a fifth of the freeze's time).
                    bounds = (before + 1, self._raw(conn, highest).fetchone()[0], frozen)
                    return self._ensure_cursor(conn, draft_id, bounds)
            total = self._ensure_cursor(conn, draft_id)
        return total

    @contextmanager
    def _stoppable(self, conn: Connection, should_stop: Callable[[], bool] | None) -> Iterator[None]:
        """Run the block's statement on ``conn`` so that a yes from ``should_stop`` cuts it
        short: a watcher asks every :attr:`STOP_POLL` seconds and, once told to stop, interrupts the statement
        (SQLite) or cancels it (PostgreSQL) until the block ends, then :class:`FreezeStopped`,
        whether or not the statement had finished. The watcher has ended before the block's
        caller goes on."""
        if should_stop is None:
            yield
            return
        raw: Any = conn.connection.driver_connection
        cut = raw.interrupt if self.dialect == "sqlite" else raw.cancel
        done, stopped = threading.Event(), threading.Event()

        def watch() -> None:
            while not done.wait(self.STOP_POLL):
                if stopped.is_set() or should_stop():
                    stopped.set()
                    cut()  # again until the statement ends: one sent before it began does nothing

        watcher = threading.Thread(target=watch, name="freeze-stop", daemon=True)
        watcher.start()
        try:
            yield
        except Exception as exc:
            if stopped.is_set():
                raise FreezeStopped(_FREEZE_STOPPED) from exc
            raise
        finally:
            done.set()
            watcher.join()
        if stopped.is_set():  # told to stop as the statement ended: undone all the same, and no
            # later statement of the transaction runs where a cancel sent late could reach it
            raise FreezeStopped(_FREEZE_STOPPED)

    def _ensure_cursor(self, conn: Connection, draft_id: int,
                       bounds: tuple[int, int, int] | None = None) -> int:
        """Give the draft its claim cursor (before its first row) unless it has one; returns
        how many ledger rows the draft has (a resumed send reads it from the cursor).
        ``bounds``: (first id, last id, count) of its rows when the caller knows them, else
        they are read."""
        known = self._raw(conn, self._sql("SELECT total FROM send_cursors WHERE draft_id = {p}"),
                          (draft_id,)).fetchone()
        if known is not None:
            return int(known[0])
        first, last, total = bounds or self._raw(conn, self._sql(
            "SELECT COALESCE(MIN(id), 1), COALESCE(MAX(id), 0), COUNT(*) FROM send_ledger "
            "WHERE draft_id = {p}"), (draft_id,)).fetchone()
        self._raw(conn, self._sql(
            "INSERT INTO send_cursors (draft_id, claimed_through, first_id, last_id, total) "
            "VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (draft_id) DO NOTHING"),
            (draft_id, first - 1, first, last, total))
        return int(total)

    def _lock_cursor(self, conn: Connection, draft_id: int) -> tuple[int, int]:
        """(claimed_through, last_id) of the draft's cursor, locked until the transaction ends:
        claims take turns here. (On SQLite this statement takes the write lock, so nothing
        read after it can change before the claim commits.)"""
        sql = self._sql("UPDATE send_cursors SET claimed_through = claimed_through WHERE draft_id = {p} "
                        "RETURNING claimed_through, last_id")
        row = self._raw(conn, sql, (draft_id,)).fetchone()
        if row is None:  # a send started before this schema: make its cursor now
            self._ensure_cursor(conn, draft_id)
            row = self._raw(conn, sql, (draft_id,)).fetchone()
        return int(row[0]), int(row[1])

    def mark_stale_claims_uncertain(self, draft_id: int, now: datetime) -> int:
        """Batches (and rows) still ``claimed`` from a sender that died: their fate is unknown
        (rule 1). Returns how many messages that makes uncertain."""
        error = "the sender stopped while this message was in flight"
        when = self._when(now)
        with self._tx() as conn:
            # The batches first, then their rows: the order in which a sender's verdict takes
            # them (Store._hold), so the two never wait for each other on PostgreSQL. The token
            # goes: a verdict the stopped sender may still write comes too late.
            n = self._stale_calls(conn, draft_id, when)
            stale = self._raw(conn, self._sql(
                "UPDATE send_batches SET status = 'uncertain', settled_at = {p}, error = {p}, claim_token = NULL "
                "WHERE draft_id = {p} AND status = 'claimed' RETURNING id, first_id, last_id"),
                (when, error, draft_id)).fetchall()
            for batch_id, first, last in stale:
                if first is None:
                    n += self._raw(conn, self._sql(
                        "UPDATE send_ledger SET status = 'uncertain', settled_at = {p}, error = {p} "
                        "WHERE batch_id = {p} AND status = 'claimed'"), (when, error, batch_id)).rowcount or 0
                else:
                    n += self._covered(conn, draft_id, first, last)
        return n

    def _stale_calls(self, conn: Connection, draft_id: int, when: Any) -> int:
        """Batches a stopped sender was sending call by call (:meth:`record_calls`): only the
        rows whose call had started are uncertain; those whose call never started go back to
        the queue (the provider never had them). Returns how many are uncertain."""
        batches = self._raw(conn, self._sql(
            "UPDATE send_batches SET status = 'uncertain', settled_at = {p}, claim_token = NULL "
            "WHERE draft_id = {p} AND status = 'calls' RETURNING id"), (when, draft_id)).fetchall()
        n = 0
        for (batch_id,) in batches:
            in_flight = self._raw(conn, self._sql(
                "UPDATE send_ledger SET status = 'uncertain', settled_at = {p}, error = {p} "
                "WHERE batch_id = {p} AND status = 'sending'"),
                (when, "the sender stopped while this message's call was in flight", batch_id)).rowcount or 0
            self._raw(conn, self._sql(
                "UPDATE send_ledger SET status = 'queued', error = {p} WHERE batch_id = {p} AND status = 'claimed'"),
                ("not sent: the sender stopped before this message's call", batch_id))
            if not in_flight:  # nothing of it may have gone out unrecorded
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'released', error = NULL "
                                          "WHERE id = {p}"), (batch_id,))
            else:
                self._raw(conn, self._sql("UPDATE send_batches SET error = {p} WHERE id = {p}"),
                          (f"the sender stopped with {in_flight} message(s) of it in flight", batch_id))
            n += in_flight
        return n

    def _uncertain_ranges(self, conn: Connection, draft_id: int) -> list[tuple[int, int, int]]:
        """(batch id, first id, last id) of the draft's uncertain ranged batches, in order."""
        return [tuple(r) for r in self._raw(conn, self._sql(
            "SELECT id, first_id, last_id FROM send_batches WHERE draft_id = {p} AND status = 'uncertain' "
            "AND first_id IS NOT NULL ORDER BY id"), (draft_id,)).fetchall()]

    def _covered(self, conn: Connection, draft_id: int, first: int, last: int) -> int:
        """How many rows a ranged batch speaks for: those in its range without their own status."""
        return int(self._raw(conn, self._sql(
            "SELECT COUNT(*) FROM send_ledger WHERE id BETWEEN {p} AND {p} AND +draft_id = {p} "
            "AND status = 'pending'"), (first, last, draft_id)).fetchone()[0])

    # The claim queries, in raw SQL: they run once per batch for every message sent, and
    # building them and their thousand-row results through SQLAlchemy's expression layer cost
    # several times what the database needs to run them. Same text on both databases but the
    # placeholder. The fifth column says whether the address may still be sent to (rule 2).
    _MAY_SEND = ("CASE WHEN s.status = 'active' AND NOT EXISTS "
                 "(SELECT 1 FROM suppressions x WHERE x.email = l.email) THEN 1 ELSE 0 END")
    _ELIGIBLE = (
        f"SELECT l.id, l.subscriber_id, s.email, s.name, {_MAY_SEND} "
        "FROM send_ledger l JOIN subscribers s ON s.id = l.subscriber_id "
    )
    # The next rows above the cursor: a range of the table's primary key, read in order.
    _CLAIM_SQL = _ELIGIBLE + (
        "WHERE l.id > {p} AND l.id <= {p} AND +l.draft_id = {p} AND l.status = 'pending' ORDER BY l.id LIMIT {p}")
    _QUEUED_SQL = _ELIGIBLE + "WHERE l.draft_id = {p} AND l.status = 'queued' ORDER BY l.id LIMIT {p}"

    def _sql(self, text: str) -> str:
        return text.format(p="?" if self.engine.dialect.paramstyle == "qmark" else "%s")

    @staticmethod
    def _raw(conn: Connection, sql: str, params: Sequence[Any] = (), many: bool = False) -> Any:
        """Run ``sql`` on the driver's own cursor inside ``conn``'s transaction.

        For the per-message statements of the send path: SQLAlchemy's result wrapping costs
        several microseconds per row, more than the database itself needs for the row.
        """
        cursor = conn.connection.cursor()
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return cursor

    def _when(self, now: datetime) -> Any:
        """``now`` as the driver takes it for our timestamp columns (raw SQL)."""
        if self._bind_time is None:
            dialect = self.engine.dialect
            process = send_ledger.c.settled_at.type.dialect_impl(dialect).bind_processor(dialect)
            self._bind_time = process or (lambda value: value)
        return self._bind_time(now)

    def _read_time(self, value: Any) -> datetime | None:
        """A timestamp column's value as raw SQL returns it (text, on SQLite), as a datetime:
        the reverse of :meth:`_when`."""
        if self._parse_time is None:
            dialect = self.engine.dialect
            process = send_ledger.c.settled_at.type.dialect_impl(dialect).result_processor(dialect, None)
            self._parse_time = process or (lambda value: value)
        return _dt(self._parse_time(value))

    def _ids_clause(self, column: str, ids: Sequence[int]) -> tuple[str, list[Any]]:
        """``column IN (...)`` for ``ids``: one array parameter on PostgreSQL."""
        if self.dialect == "postgresql":
            return f"{column} = ANY(%s)", [list(ids)]
        return f"{column} IN ({','.join('?' * len(ids))})", list(ids)

    def _new_batch(self, conn: Connection, draft_id: int, token: str, when: Any,
                   first: int | None = None, last: int | None = None, via: str | None = None) -> int:
        return int(self._raw(conn, self._sql(
            "INSERT INTO send_batches (draft_id, first_id, last_id, status, claim_token, attempts, claimed_at, "
            "sent_via) VALUES ({p}, {p}, {p}, 'claimed', {p}, 1, {p}, {p}) RETURNING id"),
            (draft_id, first, last, token, when, via)).fetchone()[0])

    def _claim_rows(self, conn: Connection, draft_id: int, ids: Sequence[int], token: str, when: Any,
                    via: str | None = None) -> int:
        """A batch without a range for ``ids``: each row says it is claimed, and by which batch."""
        batch_id = self._new_batch(conn, draft_id, token, when, via=via)
        where, params = self._ids_clause("id", ids)
        self._raw(conn, self._sql("UPDATE send_ledger SET status = 'claimed', batch_id = {p}, "
                                  f"attempts = attempts + 1 WHERE {where}"), (batch_id, *params))
        return batch_id

    def _skip(self, conn: Connection, ids: Sequence[int], when: Any) -> None:
        """Rule 2: rows whose address may no longer be sent to, found by a claim."""
        if ids:
            where, params = self._ids_clause("id", ids)
            self._raw(conn, self._sql(
                "UPDATE send_ledger SET status = 'skipped', settled_at = {p}, "
                f"error = 'no longer eligible at claim time' WHERE {where}"), (when, *params))

    def claim_batch(self, draft_id: int, size: int, token: str, now: datetime,
                    via: str | None = None) -> ClaimedBatch:
        """Claim up to ``size`` rows, skipping (rule 2) those no longer eligible; an empty
        batch when none is left. ``via``: what the batch goes out through (``sent_via``);
        ``token``: the claiming sender's lease holder (the batch records :func:`claim_token` of it).

        The next ``size`` ids above the draft's cursor come first, as a range, in two steps.
        The claim itself is a short write (the cursor moves past the range, and one
        ``send_batches`` row records it, whatever the batch's size), committed to disk. Then
        the range's rows and whether each may still be sent to are read, outside the
        database's write lock: on SQLite a reader waits for no writer, so the other senders
        write while this one reads its rows. A row no longer eligible is then recorded as
        skipped before anything is sent. (A sender killed between the two steps leaves the
        range claimed, so uncertain at the next start, its ineligible readers too: nothing of
        it was sent, and the operator resolves it like any batch in flight. A claim that fails
        between them puts the range back in the queue.)

        Rows put back in the queue (deferred by the provider, released by a stopped send,
        resent by the operator) come once the range is done, one by one: a message the
        provider defers again and again then holds up nobody else. Eligibility is read for
        the claimed rows only, so each claim costs the same with a thousand rows left or a
        million.
        """
        when, token = self._when(now), claim_token(token)
        skipped = 0
        select_sql = self._sql(self._CLAIM_SQL)
        # One connection for the claim's write and its read: a claim costs no more checkouts
        # and round trips to the database than when it was one transaction.
        with self._connection() as conn:
            while True:  # until this claim holds a row, or no row is left
                claimed_range = self._claim_range(conn, draft_id, size, token, when, via)
                if claimed_range is None:
                    break
                batch_id, through, window = claimed_range
                batch = ClaimedBatch((), batch_id, ranged=True, token=token)
                try:
                    # The range's ids: a window that bounds the read whatever plan the database
                    # picks. It holds fewer rows where some have a status of their own already
                    # (or, on PostgreSQL, another draft froze its audience at the same moment
                    # and took some of the ids).
                    passed, claimed = _eligible(self._raw(conn, select_sql, (through, window, draft_id, size)))
                    if passed or not claimed:
                        with self._tx() as other:
                            self._hold(other, batch)
                            self._skip(other, passed, when)
                            if not claimed:  # the batch holds nobody: no record of it
                                self._raw(other, self._sql("DELETE FROM send_batches WHERE id = {p}"),
                                          (batch_id,))
                except TakenOverError:
                    raise
                except BaseException:
                    self._give_back(draft_id, batch, through, window, when)
                    raise
                skipped += len(passed)
                if claimed:
                    batch.extend(claimed)
                    batch.skipped = skipped
                    return batch
        return self._claim_queued(draft_id, size, token, when, via, skipped)

    def _claim_range(self, conn: Connection, draft_id: int, size: int, token: str, when: Any,
                     via: str | None) -> tuple[int, int, int] | None:
        """The claim's write, a transaction of its own on ``conn`` (outside any): the next
        ``size`` ids above the draft's cursor, recorded as a batch; (batch id, the cursor
        before, the range's last id), or ``None`` once the cursor has passed the audience."""
        with self._turn, conn.begin():
            through, last = self._lock_cursor(conn, draft_id)
            if through >= last:
                return None
            window = min(last, through + size)
            self._raw(conn, self._sql("UPDATE send_cursors SET claimed_through = {p} WHERE draft_id = {p}"),
                      (window, draft_id))
            batch_id = self._new_batch(conn, draft_id, token, when, through + 1, window, via)
        return batch_id, through, window

    def _claim_queued(self, draft_id: int, size: int, token: str, when: Any, via: str | None,
                      skipped: int) -> ClaimedBatch:
        """Rows put back in the queue, claimed one by one (each says it is claimed, and by
        which batch), in one transaction that also reads their eligibility: few, and rarely
        any. ``skipped``: how many the claim skipped in ranges before."""
        queued_sql = self._sql(self._QUEUED_SQL)
        with self._tx() as conn:
            self._lock_cursor(conn, draft_id)  # claims take turns here
            while True:
                passed, claimed = _eligible(self._raw(conn, queued_sql, (draft_id, size)))
                if not passed and not claimed:
                    return ClaimedBatch((), 0, ranged=True, skipped=skipped)
                self._skip(conn, passed, when)
                skipped += len(passed)
                if claimed:
                    batch_id = self._claim_rows(conn, draft_id, [c.ledger_id for c in claimed], token, when, via)
                    return ClaimedBatch(claimed, batch_id, ranged=False, token=token, skipped=skipped)

    def _give_back(self, draft_id: int, batch: ClaimedBatch, through: int, window: int, when: Any) -> None:
        """A claimed range the claim could not finish (the read failed, a stop came): back in
        the queue, nothing of it sent, while the batch is still this sender's. If even that
        fails, the range stays claimed and comes back uncertain: never sent twice."""
        error = "not sent: the claim did not finish"
        try:
            with self._tx(wait_for_disk=False) as conn:
                self._hold(conn, batch)
                self._raw(conn, self._sql(
                    "UPDATE send_ledger SET status = 'queued', error = {p}, batch_id = {p} WHERE id > {p} "
                    "AND id <= {p} AND +draft_id = {p} AND status = 'pending'"),
                    (error, batch.batch_id, through, window, draft_id))
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'released', error = {p}, "
                                          "settled_at = {p} WHERE id = {p}"), (error, when, batch.batch_id))
        except Exception:  # noqa: BLE001 - the claim's own error is the one to report
            pass

    def uncertain_batches(self, draft_id: int, token: str, now: datetime,
                          since: datetime | None = None, *, via: str, peek: bool = False,
                          max_attempts: int | None = None) -> list[ClaimedBatch]:
        """Claim the uncertain messages again, grouped exactly as they went out (for an
        idempotent provider's resend: the same batch again is the same request).

        Only batches claimed through ``via`` (``send_batches.sent_via``: the same provider,
        the same key space; a batch another provider or account took, or claimed before
        migration 0011, was never seen under the key it would get now), first sent at or after
        ``since`` (the provider keeps its idempotency keys for a while only: an older batch
        sent again could be delivered twice), and only those whose every message may still be
        sent (rule 2: a batch without the reader who has unsubscribed since would be another
        request, which the provider would not recognise). The others stay uncertain, for the
        operator (``digest send --resolve-uncertain``).
        A batch keeps the time it was first sent, however often it is claimed again.
        With ``peek`` nothing is claimed: the batches a call would take (batch ids of 0 for
        rows uncertain on their own). ``max_attempts`` leaves out the batches (rows) claimed
        that many times already.
        """
        rule = ResendRule(via, since, max_attempts)
        when, token = self._when(now), claim_token(token)
        out: list[ClaimedBatch] = []
        with self._tx() as conn:
            ranged, groups = self._resendable(conn, draft_id, rule)
            for batch_id, rows in ranged:
                out.append(ClaimedBatch(rows, batch_id, ranged=True, token="" if peek else token))
            if ranged and not peek:
                where, params = self._ids_clause("id", [batch_id for batch_id, _rows in ranged])
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'claimed', claim_token = {p}, "
                                          f"attempts = attempts + 1 WHERE {where}"), (token, *params))
            for _batch_id, first_sent, members in groups:
                batch_id = 0 if peek else self._claim_rows(conn, draft_id, [c.ledger_id for c in members], token,
                                                           first_sent or when, via)
                out.append(ClaimedBatch(members, batch_id, ranged=False, token="" if peek else token))
        return out

    def _resendable(self, conn: Connection, draft_id: int, rule: ResendRule
                    ) -> tuple[list[tuple[int, list[Claimed]]], list[tuple[int, Any, list[Claimed]]]]:
        """The uncertain batches ``rule`` lets go out again as they went (see
        :meth:`uncertain_batches`): ranged ones as (batch id, rows), and groups of rows
        uncertain on their own as (their batch's id, when it first went, rows)."""
        tries = rule.max_attempts if rule.max_attempts is not None else 1 << 30
        # Whether a batch first went at or after ``since``: a column of the queries below.
        fresh_params: tuple[Any, ...] = () if rule.since is None else (self._when(rule.since),)

        def fresh(column: str) -> str:
            return "1" if rule.since is None else f"CASE WHEN {column} >= {{p}} THEN 1 ELSE 0 END"

        ranged_out: list[tuple[int, list[Claimed]]] = []
        ranged = self._raw(conn, self._sql(
            f"SELECT id, first_id, last_id, {fresh('claimed_at')}, attempts FROM send_batches "
            "WHERE draft_id = {p} AND status = 'uncertain' AND first_id IS NOT NULL AND sent_via = {p} ORDER BY id"),
            (*fresh_params, draft_id, rule.via)).fetchall()
        for batch_id, first, last, is_fresh, attempts in ranged:
            if not is_fresh or (attempts or 0) >= tries:
                continue
            rows = self._raw(conn, self._sql(
                self._ELIGIBLE + "WHERE l.id BETWEEN {p} AND {p} AND +l.draft_id = {p} "
                "AND l.status = 'pending' ORDER BY l.id"), (first, last, draft_id)).fetchall()
            if rows and all(r[4] for r in rows):
                ranged_out.append((batch_id, [Claimed(r[0], r[1], r[2], r[3]) for r in rows]))
        # Rows uncertain on their own: grouped by their batch, with the time that batch first
        # went. (Rows from before migration 0007 have no batch, so nothing says what they
        # went through: they wait for the operator.)
        first_sent = "COALESCE(b.claimed_at, l.claimed_at)"
        rows = self._raw(conn, self._sql(
            f"SELECT l.id, l.subscriber_id, s.email, s.name, {self._MAY_SEND}, l.batch_id, "
            f"{first_sent}, {fresh(first_sent)}, l.attempts "
            "FROM send_ledger l JOIN subscribers s ON s.id = l.subscriber_id "
            "JOIN send_batches b ON b.id = l.batch_id "
            "WHERE l.draft_id = {p} AND l.status = 'uncertain' AND b.sent_via = {p} ORDER BY l.batch_id, l.id"),
            (*fresh_params, draft_id, rule.via)).fetchall()
        groups: dict[int, list[Any]] = {}
        for r in rows:
            groups.setdefault(r[5], []).append(r)
        groups_out: list[tuple[int, Any, list[Claimed]]] = []
        for batch_id, members in groups.items():
            # A row's own attempts count its claims one by one; its first send, in a batch
            # by range, is not among them.
            if not all(r[4] and r[7] and (r[8] or 0) + 1 < tries for r in members):
                continue
            groups_out.append((batch_id, members[0][6], [Claimed(r[0], r[1], r[2], r[3]) for r in members]))
        return ranged_out, groups_out

    def _hold(self, conn: Connection, batch: ClaimedBatch | None) -> None:
        """Go on only while ``batch``'s record still carries the token it was claimed under.

        Another sender that took this one for dead (its lease holder gone, say a parent killed
        while a helper process still had a batch out) marks the batch uncertain and clears the
        token, or claims it again under its own. A late verdict from the first sender must not
        then put the batch back in the queue of a draft already finished, or overwrite what the
        other recorded: :class:`TakenOverError` instead, which stops this sender. The statement
        is a write, so that it is the transaction's first lock (SQLite) and holds the batch's
        row until the verdict commits (PostgreSQL).
        """
        if batch is None or not batch.token:
            return
        held = self._raw(conn, self._sql("UPDATE send_batches SET claim_token = claim_token "
                                         "WHERE id = {p} AND claim_token = {p}"),
                         (batch.batch_id, batch.token)).rowcount
        if not held:
            raise TakenOverError(f"batch {batch.batch_id} was taken over by another sender, which took this one "
                                 "for stopped; this sender stops and leaves the batch as that one recorded it")

    # A batch whose rows carry their own verdicts: its record says it is done (unless the
    # batch was already put back or made uncertain as a whole).
    _CLOSE_BATCH = ("UPDATE send_batches SET status = 'settled', provider = {p}, settled_at = {p} "
                    "WHERE id = {p} AND status IN ('claimed', 'calls')")

    def settle(self, results: Sequence[SendResult], provider: str, now: datetime,
               batch: ClaimedBatch | None = None) -> None:
        """Record each message's fate. Failing here stops the send (rule 9).

        With the ranged ``batch`` the results belong to, the verdict most of them share is
        written once, on the batch, and only the rows that differ get their own; ``results``
        must then cover every row of the batch that has no status of its own yet (record the
        uncertain and the released first). Otherwise each row is written: rows that share
        their whole verdict in one statement, rows with their own message ids in one
        ``executemany``.
        """
        results = _storable_ids(results)
        settled = self._when(now)
        if not results:
            if batch is not None:
                # Every row of the batch has a verdict of its own already (uncertain, back in
                # the queue): its record is closed, not left looking in flight.
                with self._tx(wait_for_disk=False) as conn:
                    self._hold(conn, batch)
                    self._raw(conn, self._sql(self._CLOSE_BATCH), (provider, settled, batch.batch_id))
            return
        if batch is not None and batch.ranged:
            self._settle_ranged(results, provider, settled, batch)
            return
        shared: dict[tuple[str, str | None, str | None], list[int]] = {}
        singles: list[tuple[Any, ...]] = []
        first_id = results[0].provider_message_id
        uniform_ids = all(r.provider_message_id == first_id for r in results)
        for r in results:
            error = (r.error or None) and _provider_error(r.error)
            if uniform_ids:
                shared.setdefault((r.status, r.provider_message_id, error), []).append(r.ledger_id)
            else:
                singles.append((r.status, provider, r.provider_message_id, error, settled, r.ledger_id))
        head = ("UPDATE send_ledger SET status = {p}, provider = {p}, provider_message_id = {p}, "
                "error = {p}, settled_at = {p} WHERE ")
        with self._tx(wait_for_disk=False) as conn:
            self._hold(conn, batch)
            for (status, message_id, error), ids in shared.items():
                where, params = self._ids_clause("id", ids)
                self._raw(conn, self._sql(head) + where, (status, provider, message_id, error, settled, *params))
            if singles:
                self._raw(conn, self._sql(head + "id = {p}"), singles, many=True)
            if batch is not None:
                self._raw(conn, self._sql(self._CLOSE_BATCH), (provider, settled, batch.batch_id))

    def _settle_ranged(self, results: Sequence[SendResult], provider: str, settled: Any,
                       batch: ClaimedBatch) -> None:
        batch_id = batch.batch_id
        status, error = results[0].status, results[0].error
        if all(r.status == status and r.error == error for r in results):  # as a rule
            alike, apart = results, []
        else:
            (status, error), _n = Counter((r.status, r.error) for r in results).most_common(1)[0]
            alike = [r for r in results if r.status == status and r.error == error]
            apart = [(r.status, provider, r.provider_message_id, (r.error or None) and _provider_error(r.error),
                      settled, batch_id, r.ledger_id) for r in results if r.status != status or r.error != error]
        error = (error or None) and _provider_error(error)
        ids = {r.provider_message_id for r in alike}
        message_id = message_ids = None
        if len(ids) == 1:
            message_id = ids.pop()
        else:  # one per message (Postmark, SES, Resend): kept together, on the batch
            message_ids = json.dumps({r.ledger_id: r.provider_message_id for r in alike if r.provider_message_id},
                                     separators=(",", ":"))
        with self._tx(wait_for_disk=False) as conn:
            self._hold(conn, batch)
            if apart:
                self._raw(conn, self._sql(
                    "UPDATE send_ledger SET status = {p}, provider = {p}, provider_message_id = {p}, error = {p}, "
                    "settled_at = {p}, batch_id = {p} WHERE id = {p}"), apart, many=True)
            self._raw(conn, self._sql(
                "UPDATE send_batches SET status = {p}, provider = {p}, provider_message_id = {p}, "
                "message_ids = {p}, error = {p}, settled_at = {p} WHERE id = {p}"),
                (status, provider, message_id, message_ids, error, settled, batch_id))

    def release(self, ledger_ids: Sequence[int], error: str, now: datetime,
                batch: ClaimedBatch | None = None) -> None:
        """Put claimed rows back in the queue: the provider certainly did not take them. When
        they are the whole ``batch``, the batch says so too."""
        if not ledger_ids:
            return
        where, params = self._ids_clause("id", ledger_ids)
        batch_id = batch.batch_id if batch is not None else None
        error = _provider_error(error)
        with self._tx(wait_for_disk=False) as conn:
            self._hold(conn, batch)
            self._raw(conn, self._sql(
                "UPDATE send_ledger SET status = 'queued', error = {p}, batch_id = COALESCE({p}, batch_id) "
                f"WHERE {where} AND status IN ('claimed', 'sending', 'pending')"), (error, batch_id, *params))
            if batch is not None and set(ledger_ids) >= {c.ledger_id for c in batch}:
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'released', error = {p}, "
                                          "settled_at = {p} WHERE id = {p}"),
                          (error, self._when(now), batch.batch_id))

    def mark_uncertain(self, ledger_ids: Sequence[int], error: str, now: datetime,
                       batch: ClaimedBatch | None = None) -> None:
        """The provider may or may not have taken these messages. For a whole ranged
        ``batch``, one write on the batch; otherwise each row."""
        if not ledger_ids:
            return
        when, error = self._when(now), _provider_error(error)
        with self._tx(wait_for_disk=False) as conn:
            self._hold(conn, batch)
            if batch is not None and batch.ranged and set(ledger_ids) >= {c.ledger_id for c in batch}:
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'uncertain', error = {p}, "
                                          "settled_at = {p} WHERE id = {p}"), (error, when, batch.batch_id))
                return
            where, params = self._ids_clause("id", ledger_ids)
            batch_id = batch.batch_id if batch is not None else None
            self._raw(conn, self._sql(
                "UPDATE send_ledger SET status = 'uncertain', error = {p}, settled_at = {p}, "
                f"batch_id = COALESCE({{p}}, batch_id) WHERE {where}"), (error, when, batch_id, *params))
            if batch is not None and not batch.ranged and set(ledger_ids) >= {c.ledger_id for c in batch}:
                # The batch's record says so too (it is not still in flight).
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'uncertain', error = {p}, "
                                          "settled_at = {p} WHERE id = {p} AND status IN ('claimed', 'calls')"),
                          (error, when, batch.batch_id))

    def record_calls(self, batch: ClaimedBatch, draft_id: int, starting: Sequence[int],
                     done: Sequence[SendResult], provider: str, now: datetime) -> None:
        """A batch sent as several calls, recorded as it goes, in one transaction: the rows of
        calls answered since the last record (``done``) get their verdicts, and those of the
        call about to start (``starting``) are marked ``sending``.

        The first record turns the batch into one whose rows each have a status of their own
        (``claimed``: not started yet; the batch's record says ``calls``), so that a sender
        killed in the middle leaves uncertain only the rows marked ``sending``
        (:meth:`mark_stale_claims_uncertain`). A ``deferred`` result (certainly not sent) puts
        its row back to ``claimed``. The batch's verdict (:meth:`settle` and the rest) still
        comes after its last call, covering every row.
        """
        done = _storable_ids(done)
        settled = self._when(now)
        with self._tx() as conn:
            self._hold(conn, batch)
            if batch.ranged:  # the first record: its rows take a status of their own
                where, params = self._ids_clause("id", [c.ledger_id for c in batch])
                self._raw(conn, self._sql(f"UPDATE send_ledger SET status = 'claimed', batch_id = {{p}} "
                                          f"WHERE {where} AND +draft_id = {{p}} AND status = 'pending'"),
                          (batch.batch_id, *params, draft_id))
            self._raw(conn, self._sql("UPDATE send_batches SET status = 'calls' WHERE id = {p} AND status = 'claimed'"),
                      (batch.batch_id,))
            back = [(r.ledger_id,) for r in done if r.status == "deferred"]
            if back:
                self._raw(conn, self._sql("UPDATE send_ledger SET status = 'claimed' WHERE id = {p} "
                                          "AND status = 'sending'"), back, many=True)
            known = [(r.status, provider, r.provider_message_id, (r.error or None) and _provider_error(r.error),
                      settled, r.ledger_id) for r in done if r.status != "deferred"]
            if known:
                self._raw(conn, self._sql("UPDATE send_ledger SET status = {p}, provider = {p}, "
                                          "provider_message_id = {p}, error = {p}, settled_at = {p} WHERE id = {p}"),
                          known, many=True)
            if starting:
                where, params = self._ids_clause("id", starting)
                self._raw(conn, self._sql(f"UPDATE send_ledger SET status = 'sending' WHERE {where}"), params)
        batch.ranged = False

    def unclaim_uncertain(self, batch: ClaimedBatch) -> None:
        """Put a batch :meth:`uncertain_batches` claimed, but that was not sent, back as it was:
        uncertain, with its error, its time and its count of attempts."""
        with self._tx() as conn:
            self._hold(conn, batch)
            if batch.ranged:
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'uncertain', attempts = attempts - 1 "
                                          "WHERE id = {p} AND status = 'claimed'"), (batch.batch_id,))
                return
            self._raw(conn, self._sql("UPDATE send_ledger SET status = 'uncertain', attempts = attempts - 1 "
                                      "WHERE batch_id = {p} AND status = 'claimed'"), (batch.batch_id,))
            self._raw(conn, self._sql("UPDATE send_batches SET status = 'uncertain' WHERE id = {p} "
                                      "AND status = 'claimed'"), (batch.batch_id,))

    def resolve_uncertain(self, draft_id: int, how: str, now: datetime, keep: ResendRule | None = None) -> int:
        """``resend``: back in the queue; ``mark-sent``: count them as delivered. Returns how
        many messages that was.

        ``keep`` (with ``resend``): the batches it lets go out again under their idempotency
        keys (:meth:`uncertain_batches`) stay uncertain, as they are, for the next send to
        resend exactly as they went; only the others go back in the queue, where they are
        claimed in new batches (under new keys). The draft is then sending again too."""
        error = f"uncertain, resolved by {how}"
        when = self._when(now)
        resend = how == "resend"
        with self._tx() as conn:
            kept_batches: list[int] = []
            kept_rows: list[int] = []
            if resend and keep is not None:
                ranged, groups = self._resendable(conn, draft_id, keep)
                kept_batches = [batch_id for batch_id, _rows in ranged]
                for batch_id, _first_sent, members in groups:
                    kept_batches.append(batch_id)
                    kept_rows += [c.ledger_id for c in members]
            kept = set(kept_batches)
            n = 0
            for batch_id, first, last in self._uncertain_ranges(conn, draft_id):
                if batch_id in kept:
                    continue
                if resend:  # its rows go back one by one: the batch no longer speaks for them
                    n += self._raw(conn, self._sql(
                        "UPDATE send_ledger SET status = 'queued', error = {p}, batch_id = {p} WHERE id BETWEEN "
                        "{p} AND {p} AND +draft_id = {p} AND status = 'pending'"),
                        (error, batch_id, first, last, draft_id)).rowcount or 0
                else:
                    n += self._covered(conn, draft_id, first, last)
            but_batches, batch_params = self._not_in("id", kept_batches)
            self._raw(conn, self._sql(
                "UPDATE send_batches SET status = {p}, error = {p}, settled_at = {p}, claim_token = NULL "
                "WHERE draft_id = {p} AND status = 'uncertain'") + but_batches,
                ("requeued" if resend else "sent", error, when, draft_id, *batch_params))
            but_rows, row_params = self._not_in("id", kept_rows)
            n += self._raw(conn, self._sql(
                "UPDATE send_ledger SET status = {p}, error = {p}, settled_at = {p} WHERE draft_id = {p} "
                "AND status = 'uncertain'") + but_rows,
                ("queued" if resend else "sent", error, when, draft_id, *row_params)).rowcount or 0
            if (n or kept) and resend:
                conn.execute(update(drafts).where(and_(drafts.c.id == draft_id, drafts.c.status == "sent"))
                             .values(status="sending", finished_at=None, updated_at=now))
        return n

    def _not_in(self, column: str, ids: Sequence[int]) -> tuple[str, list[Any]]:
        """`` AND NOT (column IN ids)`` to add to a WHERE, and its parameters ("" for none)."""
        if not ids:
            return "", []
        where, params = self._ids_clause(column, ids)
        return f" AND NOT ({where})", params

    def requeue_failed(self, draft_id: int, now: datetime, matching: str | None = None) -> int:
        """Put the draft's ``failed`` messages back in the queue (the operator fixed what the
        provider refused), or only those whose error contains ``matching`` (any case); the send
        then resumes (its hold lifted, a finished draft sending again). Returns how many.

        Only ``failed``: ``rejected``, ``invalid``, ``suppressed`` and ``skipped`` are verdicts on
        the reader. Each goes back once, as a row of its own (``queued``), so the next claims
        take it once; eligibility is read again then (rule 2). A failed ranged batch no longer
        speaks for its rows: they go back one by one, and its record says ``requeued``.
        """
        needle = (matching or "").lower()
        error = "failed, put back in the queue by `digest send --retry-failed`"
        when = self._when(now)
        with self._tx() as conn:
            n = 0
            for batch_id, first, last, was in self._raw(conn, self._sql(
                    "SELECT id, first_id, last_id, error FROM send_batches WHERE draft_id = {p} "
                    "AND status = 'failed' AND first_id IS NOT NULL ORDER BY id"), (draft_id,)).fetchall():
                if needle not in (was or "").lower():
                    continue
                n += self._raw(conn, self._sql(
                    "UPDATE send_ledger SET status = 'queued', error = {p}, batch_id = {p} WHERE id BETWEEN "
                    "{p} AND {p} AND +draft_id = {p} AND status = 'pending'"),
                    (error, batch_id, first, last, draft_id)).rowcount or 0
                self._raw(conn, self._sql("UPDATE send_batches SET status = 'requeued', settled_at = {p}, "
                                          "claim_token = NULL WHERE id = {p}"), (when, batch_id))
            for (was,) in self._raw(conn, self._sql(
                    "SELECT DISTINCT error FROM send_ledger WHERE draft_id = {p} AND status = 'failed'"),
                    (draft_id,)).fetchall():
                if needle not in (was or "").lower():
                    continue
                same = "error IS NULL" if was is None else "error = {p}"
                n += self._raw(conn, self._sql(
                    "UPDATE send_ledger SET status = 'queued', error = {p}, settled_at = {p} WHERE draft_id = {p} "
                    f"AND status = 'failed' AND {same}"),
                    (error, when, draft_id, *(() if was is None else (was,)))).rowcount or 0
            if n:
                conn.execute(delete(meta).where(meta.c.key == f"{self._HOLD_PREFIX}{draft_id}"))
                conn.execute(update(drafts).where(and_(drafts.c.id == draft_id, drafts.c.status == "sent"))
                             .values(status="sending", finished_at=None, updated_at=now))
        return n

    def pending_count(self, draft_id: int) -> int:
        """Messages of a draft still to send: the rows above its cursor and the queued ones."""
        with self._tx() as conn:
            row = self._raw(conn, self._sql(
                "SELECT claimed_through, last_id FROM send_cursors WHERE draft_id = {p}"), (draft_id,)).fetchone()
            n = 0
            if row is not None:
                n = self._raw(conn, self._sql(
                    "SELECT COUNT(*) FROM send_ledger WHERE id > {p} AND id <= {p} AND +draft_id = {p} "
                    "AND status = 'pending'"), (row[0], row[1], draft_id)).fetchone()[0]
            return int(n) + int(self._raw(conn, self._sql(
                "SELECT COUNT(*) FROM send_ledger WHERE draft_id = {p} AND status = 'queued'"),
                (draft_id,)).fetchone()[0])

    # A row's status as a reader sees it: its own, unless that is still "pending" and a ranged
    # batch speaks for it; "queued" is pending too.
    def ledger_counts(self, draft_id: int) -> dict[str, int]:
        """How many of a draft's messages are in each status."""
        with self._tx() as conn:
            cursor = self._raw(conn, self._sql(
                "SELECT first_id, last_id, total FROM send_cursors WHERE draft_id = {p}"), (draft_id,)).fetchone()
            if cursor is None:  # a send from before migration 0007: every row says
                own = self._raw(conn, self._sql(
                    "SELECT status, COUNT(*) FROM send_ledger WHERE draft_id = {p} GROUP BY status"),
                    (draft_id,)).fetchall()
            else:
                # The rows with a status of their own, read along the draft's id range; the
                # others are pending or their batch's.
                first, last, total = cursor
                own = self._raw(conn, self._sql(
                    "SELECT status, COUNT(*) FROM send_ledger WHERE id BETWEEN {p} AND {p} AND +draft_id = {p} "
                    "AND status <> 'pending' GROUP BY status"), (first, last, draft_id)).fetchall()
                own.append(("pending", total - sum(n for _status, n in own)))
            # Per batch, a count over its own id range (a join over ranges can make a
            # database read the whole ledger once per batch).
            by_batch = self._raw(conn, self._sql(
                "SELECT b.status, (SELECT COUNT(*) FROM send_ledger l WHERE l.id BETWEEN b.first_id AND b.last_id "
                "AND +l.draft_id = b.draft_id AND l.status = 'pending') FROM send_batches b "
                "WHERE b.draft_id = {p} AND b.first_id IS NOT NULL"), (draft_id,)).fetchall()
        counts: Counter[str] = Counter()
        for status, n in own:
            counts[_AS_READ.get(status, status)] += n
        for status, n in by_batch:
            counts["pending"] -= n
            counts[status] += n
        return {status: n for status, n in counts.items() if n}

    def drafts_with_ledger(self) -> list[int]:
        with self._tx() as conn:
            rows = conn.execute(select(send_ledger.c.draft_id).distinct().order_by(send_ledger.c.draft_id)).all()
        return [r[0] for r in rows]

    def ledger_rows(self, draft_id: int) -> list[tuple[int, str, str]]:
        """(ledger id, email, status) for every row of a draft, in id order (tests and status)."""
        with self._tx() as conn:
            rows = self._raw(conn, self._sql(
                "SELECT id, email, status FROM send_ledger WHERE draft_id = {p} ORDER BY id"), (draft_id,)).fetchall()
            ranges = self._raw(conn, self._sql(
                "SELECT first_id, last_id, status FROM send_batches WHERE draft_id = {p} AND first_id IS NOT NULL "
                "ORDER BY first_id"), (draft_id,)).fetchall()
        starts = [r[0] for r in ranges]
        out = []
        for ledger_id, email, status in rows:
            if status == "pending":
                i = bisect.bisect_right(starts, ledger_id) - 1
                if i >= 0 and ledger_id <= ranges[i][1]:
                    status = ranges[i][2]
            else:
                status = _AS_READ.get(status, status)
            out.append((ledger_id, email, status))
        return out

    # -- leases (rule 3: two `digest serve` processes never send the same draft at once) -----

    def acquire_lease(self, name: str, holder: str, now: datetime, until: datetime,
                      holder_is_dead: Callable[[str], bool] = lambda _holder: False) -> bool:
        """Take or renew the lease ``name`` until ``until``; False while another live holder has it.

        A lease whose time ran out, or whose holder ``holder_is_dead`` says is gone (a process
        on this host that no longer exists), can be taken over.
        """
        try:
            with self._tx() as conn:
                row = conn.execute(select(leases).where(leases.c.name == name)).first()
                if row is None:
                    conn.execute(insert(leases).values(name=name, holder=holder, expires_at=until))
                    return True
                if row.holder == holder:  # a renewal: ours whatever another thread of ours wrote
                    changed = conn.execute(update(leases).where(and_(
                        leases.c.name == name, leases.c.holder == holder)).values(expires_at=until)).rowcount
                    return bool(changed)
                if as_utc(row.expires_at) <= now or holder_is_dead(row.holder):
                    changed = conn.execute(update(leases).where(and_(
                        leases.c.name == name, leases.c.holder == row.holder,
                        leases.c.expires_at == row.expires_at)).values(holder=holder, expires_at=until)).rowcount
                    return bool(changed)
                return False
        except IntegrityError:
            return False

    def lease(self, name: str) -> tuple[str, datetime | None] | None:
        """The lease ``name``'s holder and until when, if anyone holds or held it."""
        with self._tx() as conn:
            row = conn.execute(select(leases.c.holder, leases.c.expires_at).where(leases.c.name == name)).first()
        return None if row is None else (str(row.holder), _dt(row.expires_at))

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute(delete(leases).where(and_(leases.c.name == name, leases.c.holder == holder)))

    # -- compiled drafts (the render cache: digest.render.cache) ---------------------------

    def compiled_draft(self, draft_id: int, render_key: str) -> str | None:
        """The compiled draft stored under ``render_key`` (JSON text), or ``None``."""
        with self._tx() as conn:
            value = conn.execute(select(compiled_drafts.c.compiled).where(and_(
                compiled_drafts.c.draft_id == draft_id, compiled_drafts.c.render_key == render_key))).scalar()
        return None if value is None else str(value)

    def save_compiled_draft(self, draft_id: int, render_key: str, compiled: str, now: datetime) -> None:
        """Store a draft's compiled form under ``render_key``, replacing those under other keys
        (made from templates or settings since changed). Another process storing the same key
        at the same moment is not an error: both stored the same thing."""
        try:
            with self._tx() as conn:
                conn.execute(delete(compiled_drafts).where(compiled_drafts.c.draft_id == draft_id))
                conn.execute(insert(compiled_drafts).values(draft_id=draft_id, render_key=render_key,
                                                            compiled=compiled, created_at=now))
        except IntegrityError:
            pass

    # -- what `digest status` lists of a send -------------------------------------------------

    def stopped_on(self, draft_id: int) -> tuple[str, datetime | None] | None:
        """Why a draft's send stopped, when its last batch was put back in the queue whole (a
        refusal every batch would meet, or failures to the end): that batch's error and time.
        ``None`` when the last batch went out, or there is none.

        For ``digest status``: a send that ``digest serve`` keeps trying shows why it waits.
        """
        with self._tx() as conn:
            row = self._raw(conn, self._sql(
                "SELECT status, error, settled_at FROM send_batches WHERE draft_id = {p} ORDER BY id DESC LIMIT 1"),
                (draft_id,)).fetchone()
        if row is None or row[0] != "released":
            return None
        return str(row[1] or ""), self._read_time(row[2])

    def uncertain_messages(self, draft_id: int, limit: int = 20) -> list[UncertainMessage]:
        """The first ``limit`` messages of a draft whose fate is unknown, in ledger order
        (see :meth:`messages_in`)."""
        return self.messages_in(draft_id, ("uncertain",), limit)

    def messages_in(self, draft_id: int, statuses: Sequence[str], limit: int = 20) -> list[UncertainMessage]:
        """The first ``limit`` messages of a draft in any of ``statuses``, in ledger order.

        Read as :meth:`ledger_counts` counts them (which gives how many there are in all):
        rows with such a status of their own, and the rows a ranged batch with such a verdict
        speaks for (their own status still ``pending``), which carry the batch's error and time.
        """
        if limit <= 0 or not statuses:
            return []
        marks = ",".join(["{p}"] * len(statuses))
        with self._tx() as conn:
            found = self._raw(conn, self._sql(
                "SELECT id, email, error, settled_at, status FROM send_ledger WHERE draft_id = {p} "
                f"AND status IN ({marks}) ORDER BY id LIMIT {{p}}"), (draft_id, *statuses, limit)).fetchall()
            # Ranges never overlap, so in range order the first ``limit`` rows found are the
            # first ``limit`` in ledger order.
            batches = self._raw(conn, self._sql(
                "SELECT first_id, last_id, error, settled_at, status FROM send_batches WHERE draft_id = {p} "
                f"AND status IN ({marks}) AND first_id IS NOT NULL ORDER BY first_id"),
                (draft_id, *statuses)).fetchall()
            in_batches: list[tuple[Any, ...]] = []
            for first, last, error, when, status in batches:
                if len(in_batches) >= limit:
                    break
                rows = self._raw(conn, self._sql(
                    "SELECT id, email FROM send_ledger WHERE id BETWEEN {p} AND {p} AND +draft_id = {p} "
                    "AND status = 'pending' ORDER BY id LIMIT {p}"),
                    (first, last, draft_id, limit - len(in_batches))).fetchall()
                in_batches += [(ledger_id, email, error, when, status) for ledger_id, email in rows]
        first_rows = sorted([*found, *in_batches], key=lambda r: int(r[0]))[:limit]
        return [UncertainMessage(int(ledger_id), email, error or "", self._read_time(when), status)
                for ledger_id, email, error, when, status in first_rows]

    def reasons(self, draft_id: int, statuses: Sequence[str]) -> list[ReasonCount]:
        """How many of a draft's messages are in each of ``statuses``, by status and error
        (rows of their own and the rows ranged batches speak for), most first."""
        if not statuses:
            return []
        marks = ",".join(["{p}"] * len(statuses))
        groups: dict[tuple[str, str], list[Any]] = {}

        def add(status: str, error: str | None, when: Any, n: int) -> None:
            at = self._read_time(when)
            group = groups.setdefault((status, error or ""), [0, at])
            group[0] += n
            if at is not None and (group[1] is None or at < group[1]):
                group[1] = at

        with self._tx() as conn:
            for status, error, when, n in self._raw(conn, self._sql(
                    "SELECT status, error, MIN(settled_at), COUNT(*) FROM send_ledger WHERE draft_id = {p} "
                    f"AND status IN ({marks}) GROUP BY status, error"), (draft_id, *statuses)).fetchall():
                add(status, error, when, int(n))
            for first, last, error, when, status in self._raw(conn, self._sql(
                    "SELECT first_id, last_id, error, settled_at, status FROM send_batches WHERE draft_id = {p} "
                    f"AND status IN ({marks}) AND first_id IS NOT NULL"), (draft_id, *statuses)).fetchall():
                add(status, error, when, self._covered(conn, draft_id, first, last))
        out = [ReasonCount(status, error, n, at) for (status, error), (n, at) in groups.items() if n]
        return sorted(out, key=lambda r: (-r.count, r.status, r.error))


def open_store(url: str) -> Store:
    """Open (and on first use create) the database at ``url``."""
    engine = db.make_engine(url)
    db.ensure_schema(engine)
    return Store(engine)
