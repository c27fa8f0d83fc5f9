"""Subscribers: add, import, export, remove, reactivate, unsubscribe. Addresses are kept in one form
(:func:`normalize_email`): lower-cased, the domain in Unicode. An address from outside finds its row
through :func:`canonical_email`.

Nothing here ever re-activates an address that unsubscribed or complained: that takes the
subscriber's own new consent, which a CSV file cannot show. An address that bounced comes back
only by :func:`reactivate`, the operator's word that the mailbox takes mail again.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO

from email_validator import EmailNotValidError, validate_email

from digest import tokens
from digest.errors import SubscriberError, TokenError
from digest.store import Store
from digest.store.store import Reactivated, Subscriber

UNSUBSCRIBE = "unsubscribe"
PREFERENCES = "preferences"


def normalize_email(raw: str) -> str:
    """A valid address, lower-cased; ``SubscriberError`` naming the problem otherwise."""
    candidate = raw.strip()
    if not candidate:
        raise SubscriberError("empty address")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in candidate):
        raise SubscriberError(f"{candidate!r}: control characters are not allowed")
    try:
        info = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as exc:
        raise SubscriberError(f"{candidate}: {exc}") from exc
    return info.normalized.lower()


def canonical_email(raw: str) -> str:
    """``raw`` in the form its subscriber is stored in, to look that row up by: what
    :func:`normalize_email` makes of it, else (it is no valid address) the lower-cased text,
    which then finds nothing. Never raises.

    For an address from outside: a provider's webhook, an operator's command. A provider reports
    the domain as it was sent (IDNA-encoded, ``ada@xn--bcher-kva.example``) while the subscriber
    is stored with the Unicode domain (``ada@bücher.example``); upper case and another Unicode
    normalization (a decomposed ``ü``) map to the stored form too.
    """
    if raw.isascii() and "xn--" not in raw.lower():
        # The common case, without email_validator's cost (a webhook batch holds thousands): an
        # ASCII address with no IDNA label is stored as its lower-cased text, and one that is
        # not valid is that text too (tests/test_subscribers.py checks the two agree).
        return raw.strip().lower()
    try:
        return normalize_email(raw)
    except (SubscriberError, ValueError):
        # ValueError as a defence: email_validator reports what it refuses (a lone surrogate
        # too) as EmailNotValidError, but this text comes from anyone. An address refused here
        # was not stored either.
        return raw.strip().lower()


def clean_name(raw: str) -> str:
    """A display name without control characters (they could break headers, rule 5)."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in raw).split())[:200]


@dataclass
class ImportReport:
    """What an import did, with each rejected row's line number and reason."""

    added: int = 0
    updated: int = 0
    duplicates: int = 0
    kept_unsubscribed: list[str] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)


def add(store: Store, email: str, name: str, now: datetime) -> Subscriber:
    """Add one subscriber; refuses to re-activate one who left."""
    address = normalize_email(email)
    existing = store.subscriber_by_email(address)
    if existing is not None and existing.status not in ("active", "removed"):
        raise SubscriberError(f"{address} is {existing.status} and will not be re-added",
                              hint="only the subscriber can subscribe again")
    store.upsert_subscribers([(address, clean_name(name))], "cli", now, reactivate_removed=True)
    result = store.subscriber_by_email(address)
    assert result is not None
    return result


def read_csv(stream: IO[str]) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """Rows of (line, email, name) and invalid rows of (line, reason).

    Accepts a header row (``email,name`` in any order and case) or none; a missing name is empty.
    """
    rows: list[tuple[int, str, str]] = []
    invalid: list[tuple[int, str]] = []
    reader = csv.reader(stream)
    email_col, name_col = 0, 1
    for record in reader:
        line = reader.line_num
        if not record or all(not cell.strip() for cell in record):
            continue
        lowered = [cell.strip().lower() for cell in record]
        if line == 1 and "email" in lowered:
            email_col = lowered.index("email")
            name_col = lowered.index("name") if "name" in lowered else -1
            continue
        raw_email = record[email_col] if email_col < len(record) else ""
        raw_name = record[name_col] if 0 <= name_col < len(record) else ""
        try:
            rows.append((line, normalize_email(raw_email), clean_name(raw_name)))
        except SubscriberError as exc:
            invalid.append((line, str(exc)))
    return rows, invalid


def import_csv(store: Store, stream: IO[str], now: datetime) -> ImportReport:
    """Import a CSV of email,name. Invalid rows are reported, the rest imported."""
    report = ImportReport()
    try:
        rows, report.invalid = read_csv(stream)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise SubscriberError(f"not a readable CSV file: {exc}") from exc
    merged: dict[str, str] = {}
    for _line, email, name in rows:
        if email in merged:
            report.duplicates += 1
            merged[email] = merged[email] or name
        else:
            merged[email] = name
    batch = list(merged.items())
    for start in range(0, len(batch), 1000):
        added, updated, skipped = store.upsert_subscribers(batch[start:start + 1000], "import", now)
        report.added += added
        report.updated += updated
        report.kept_unsubscribed.extend(skipped)
    return report


def export_csv(subscribers: Iterable[Subscriber]) -> Iterator[str]:
    """CSV lines (header first) for a stream of subscribers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["email", "name", "status", "created_at", "unsubscribed_at"])
    yield buffer.getvalue()
    for s in subscribers:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([s.email, s.name, s.status, s.created_at.isoformat(),
                         s.unsubscribed_at.isoformat() if s.unsubscribed_at else ""])
        yield buffer.getvalue()


def remove(store: Store, email: str, now: datetime) -> bool:
    """Stop all mail to an address and forget its name; False if it was not subscribed."""
    existing = store.subscriber_by_email(canonical_email(email))
    if existing is None:
        raise SubscriberError(f"{email.strip()} is not a subscriber")
    return store.set_subscriber_status(existing.id, "removed", now)


def reactivate(store: Store, email: str, now: datetime, *, provider_cleared: bool = False) -> Reactivated:
    """Take back an address suppressed for a bounce (the mailbox was full, the domain is fixed):
    ``SubscriberError`` naming what to do instead if it is not one (see ``Store.reactivate``)."""
    if not email.strip():
        raise SubscriberError("empty address")
    # As stored: the operator may paste the address as a provider's dashboard shows it.
    return store.reactivate(canonical_email(email), now, provider_cleared=provider_cleared)


def token_for(secret: str, purpose: str, subscriber_id: int, email: str) -> str:
    """The opaque token in a subscriber's unsubscribe or preferences link."""
    return tokens.LinkSigner(secret, purpose).sign(subscriber_id, email)


def subscriber_for_token(store: Store, secret: str, purpose: str, token: str) -> Subscriber:
    """The subscriber a token names; ``TokenError`` if it is forged or names nobody."""
    signer = tokens.LinkSigner(secret, purpose)
    found = store.subscriber(signer.subscriber_id(token))
    if found is None or not signer.check(token, found.id, found.email):
        raise TokenError("this link is not valid")
    return found


def unsubscribe(store: Store, subscriber: Subscriber, now: datetime) -> bool:
    """Unsubscribe at once (idempotent): True if this call changed anything. A reader whose
    address bounced is unsubscribed too: their choice then stands when the operator takes
    bounced addresses back (:func:`reactivate`)."""
    if subscriber.status not in ("active", "bounced"):
        return False
    changed = store.set_subscriber_status(subscriber.id, "unsubscribed", now)
    store.suppress(subscriber.email, "unsubscribed", "link", now)
    return changed
