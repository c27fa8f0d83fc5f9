"""Frozen values that cross stage boundaries.

Rows and dicts stay inside ``digest.store``; every other module speaks in these types.
This module imports nothing else from ``digest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

DraftStatus = Literal["pending_review", "approved", "sending", "sent", "rejected", "skipped", "failed"]
LedgerStatus = Literal[
    "pending", "claimed", "sent", "failed", "rejected", "invalid", "suppressed", "uncertain", "skipped"
]
#: A provider's verdict on one message. ``deferred``: not sent this time, for a reason that may
#: pass (a rate limit, maintenance, a temporary refusal of the address, a call that never
#: went out): the sender puts it back in the queue. The ledger never stores it as such.
ResultStatus = Literal["sent", "rejected", "invalid", "suppressed", "failed", "deferred"]

#: The per-recipient slots of a compiled digest, in the order slot values are given.
SLOT_NAMES: tuple[str, ...] = ("name", "unsubscribe_url", "preferences_url")


@dataclass(frozen=True)
class Essay:
    """One essay as a source reports it. ``key`` is stable across fetches (guid, else link)."""

    source: str
    key: str
    url: str
    title: str
    html: str = ""
    summary: str = ""
    author: str = ""
    published: datetime | None = None
    # Where the essay's own comment feed is (RSS wfw:commentRss), when it has one.
    comments_url: str = ""


@dataclass(frozen=True)
class Comment:
    """One reader comment on an essay.

    ``score`` is the source's own rating (likes, points, reactions); ``None`` means the source
    has none or hides it. ``position`` is the source's display order when it has no score.
    """

    source: str
    essay_key: str
    key: str
    author: str
    html: str
    url: str = ""
    score: float | None = None
    published: datetime | None = None
    parent_key: str | None = None
    position: int | None = None
    # The source the essay came from, when comments come from elsewhere (Discourse for a feed).
    essay_source: str | None = None
    # Up and down votes, where the source tells them apart (for the Wilson lower bound).
    upvotes: int | None = None
    downvotes: int | None = None


@dataclass(frozen=True)
class SourceCursor:
    """What a source remembers between fetches (conditional GET validators)."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class CollectResult:
    """The outcome of collecting one source: items, the new cursor, or an error as a value."""

    source: str
    essays: tuple[Essay, ...] = ()
    comments: tuple[Comment, ...] = ()
    cursor: SourceCursor = SourceCursor()
    not_modified: bool = False
    error: str | None = None
    bytes_read: int = 0
    # Essays (source, key) whose complete comment list this result holds: comments of theirs
    # that are missing now were deleted at the source.
    covered: tuple[tuple[str, str], ...] = ()
    # Problems that did not stop the result (one essay's comments failed, the rest arrived).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RankedComment:
    """A comment chosen for a digest, with the score it was ranked by."""

    comment: Comment
    rank_score: float
    words: int
    # The comment's html is cut at a sentence boundary; its ``url`` has the rest.
    truncated: bool = False
    # A reply shows a short quote of what it answers.
    reply_to_author: str = ""
    reply_to_excerpt: str = ""
    # The essay author's own reply to this comment, shown beneath it as context.
    author_reply_author: str = ""
    author_reply_html: str = ""


@dataclass(frozen=True)
class DraftItem:
    """One essay in a digest and the comments picked for it."""

    essay: Essay
    comments: tuple[RankedComment, ...] = ()
    is_new: bool = True


@dataclass(frozen=True)
class Draft:
    """A composed digest. Once approved its content never changes."""

    period_key: str
    subject: str
    intro: str
    items: tuple[DraftItem, ...]
    id: int | None = None
    status: DraftStatus = "pending_review"
    created_at: datetime | None = None
    send_at: datetime | None = None
    content_hash: str = ""


@dataclass(frozen=True)
class Recipient:
    """A subscriber as the sender sees one at claim time."""

    subscriber_id: int
    email: str
    name: str = ""


@dataclass(frozen=True)
class RenderedEmail:
    """A draft compiled once; ``personalize`` fills in the per-recipient parts."""

    subject: str
    html: str
    text: str
    preheader: str = ""


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for one recipient, ready for a provider."""

    ledger_id: int
    draft_id: int
    to_email: str
    to_name: str
    from_addr: str
    subject: str
    html: str
    text: str
    headers: tuple[tuple[str, str], ...] = ()
    reply_to: str | None = None
    message_id: str = ""
    tag: str = "digest"


class SendResult(NamedTuple):
    """The provider's verdict on one message.

    A named tuple rather than a frozen dataclass: one is made for every message sent, and a
    tuple is built in a third of the time. Equally immutable.
    """

    ledger_id: int
    status: ResultStatus
    provider_message_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class DeliveryEvent:
    """Something a provider reported back about a message (bounce, complaint, delivery ...)."""

    provider: str
    event_id: str
    event_type: str
    email: str
    occurred_at: datetime | None = None
    ledger_id: int | None = None
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplateMessage:
    """What every recipient of one batch shares, for providers that personalize server-side.

    The bodies are templates split once into static parts and named slots
    (``parts[0] slot[0] parts[1] ... parts[-1]``); the provider joins them with its own
    substitution syntax. Static parts are content, so a provider must make sure nothing in
    them is read as its substitution syntax (a comment may contain ``%recipient.x%``).
    """

    draft_id: int
    from_addr: str
    subject: str
    html_parts: tuple[str, ...]
    html_slots: tuple[str, ...]
    text_parts: tuple[str, ...]
    text_slots: tuple[str, ...]
    reply_to: str | None = None
    tag: str = "digest"
    #: Slots whose value is the same escaped for HTML as for text for every reader of the
    #: draft (the signed links, when the public URL holds nothing HTML escapes): a provider
    #: whose template is fixed for the whole send may give each such slot one value, not two.
    plain_slots: frozenset[str] = frozenset()


class TemplateRecipient(NamedTuple):
    """One recipient of a template batch, with slot values already escaped for each part.

    ``html_values`` and ``text_values`` hold one value per name in
    :data:`digest.render.SLOT_NAMES`, in that order (``TemplateMessage.html_slots`` names the
    slot of each gap). A named tuple: one is made per recipient on the send path.
    """

    ledger_id: int
    to_email: str
    to_name: str
    html_values: tuple[str, ...]
    text_values: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()
    message_id: str = ""
