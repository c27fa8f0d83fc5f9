"""The draft state machine and approval tokens.

::

    pending_review ──approve──► approved ──send starts──► sending ──all settled──► sent
          │  └──deadline (on_deadline: skip)──► skipped
          └──reject──► rejected

Every move is one conditional UPDATE (``Store.transition``), so two approvers clicking at
once, or an approval racing a deadline, can never both win. What is approved is the
frozen snapshot stored with the draft; approval tokens are bound to its content hash.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from digest import tokens
from digest.config import Settings, parse_duration
from digest.errors import DraftError, TokenError
from digest.store import Store
from digest.types import Draft

APPROVE = "approve"
TOKEN_MAX_AGE = 7 * 86400


def approve(store: Store, draft_id: int, now: datetime, *, at: datetime | None = None,
            by: str = "cli") -> Draft:
    """pending_review → approved, sending at ``at`` (or at the next send run)."""
    if at is not None and at.tzinfo is None:
        raise DraftError("the approval time needs a timezone")
    # In UTC, as every time the store keeps: SQLite drops an offset without converting, so a
    # local 03:43 in New York was read back as 03:43 UTC and sent hours early.
    return store.transition(draft_id, ("pending_review",), "approved", now,
                            approved_at=now, approved_by=by[:200], send_at=at and at.astimezone(UTC))


def reject(store: Store, draft_id: int, now: datetime, *, reason: str = "", by: str = "cli") -> Draft:
    """pending_review or approved (not yet sending) → rejected; its essays return to the pool."""
    note = f"rejected by {by}" + (f": {reason}" if reason else "")
    return store.transition(draft_id, ("pending_review", "approved"), "rejected", now, note=note[:1000])


def past_deadline(store: Store, settings: Settings, now: datetime) -> list[int]:
    """Drafts left unreviewed past ``approval.deadline``: what :func:`apply_deadlines` acts on."""
    deadline = timedelta(seconds=parse_duration(settings.digest.approval.deadline))
    return store.pending_review_before(now - deadline)


def apply_deadlines(store: Store, settings: Settings, now: datetime) -> list[tuple[int, str]]:
    """Drafts left unreviewed past ``approval.deadline`` are skipped or approved, as configured."""
    done: list[tuple[int, str]] = []
    for draft_id in past_deadline(store, settings, now):
        try:
            if settings.digest.approval.on_deadline == "approve":
                approve(store, draft_id, now, by="deadline")
                done.append((draft_id, "approved"))
            else:
                store.transition(draft_id, ("pending_review",), "skipped", now,
                                 note="not reviewed before the approval deadline")
                done.append((draft_id, "skipped"))
        except DraftError:
            continue  # someone acted on it meanwhile; their action stands
    return done


def approval_token(secret: str, draft: Draft) -> str:
    """A signed link token for approving exactly this content."""
    return tokens.sign(secret, APPROVE, [draft.id, draft.content_hash])


def check_approval_token(secret: str, token: str, draft: Draft) -> None:
    """``TokenError`` unless the token approves this draft's current content."""
    payload = tokens.verify(secret, APPROVE, token, max_age=TOKEN_MAX_AGE)
    if payload != [draft.id, draft.content_hash]:
        raise TokenError("this approval link is for different content; review the draft again")
    if draft.status != "pending_review":
        raise TokenError(f"this draft is already {draft.status}")
