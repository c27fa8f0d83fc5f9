"""The tables. SQLAlchemy Core only; the same schema on SQLite and PostgreSQL.

Changing a table means a new Alembic revision in ``store/migrations/versions``.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _ts(name: str, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


essays = Table(
    "essays",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source", String(100), nullable=False),
    Column("key", String(2000), nullable=False),
    Column("url", Text, nullable=False),
    Column("title", Text, nullable=False),
    Column("author", Text, nullable=False, server_default=""),
    Column("html", Text, nullable=False, server_default=""),
    Column("summary", Text, nullable=False, server_default=""),
    Column("comments_url", Text, nullable=False, server_default=""),
    _ts("published_at"),
    _ts("first_seen_at", nullable=False),
    _ts("updated_at", nullable=False),
    UniqueConstraint("source", "key"),
)

comments = Table(
    "comments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source", String(100), nullable=False),
    Column("key", String(2000), nullable=False),
    Column("essay_id", Integer, ForeignKey("essays.id", ondelete="CASCADE"), nullable=False),
    Column("author", Text, nullable=False, server_default=""),
    Column("html", Text, nullable=False),
    Column("url", Text, nullable=False, server_default=""),
    Column("score", Float, nullable=True),
    Column("upvotes", Integer, nullable=True),
    Column("downvotes", Integer, nullable=True),
    Column("position", Integer, nullable=True),
    Column("parent_key", String(2000), nullable=True),
    _ts("published_at"),
    _ts("first_seen_at", nullable=False),
    _ts("updated_at", nullable=False),
    _ts("deleted_at"),
    UniqueConstraint("source", "key"),
    Index("ix_comments_essay", "essay_id"),
)

source_state = Table(
    "source_state",
    metadata,
    Column("source", String(100), primary_key=True),
    Column("etag", Text, nullable=True),
    Column("last_modified", Text, nullable=True),
    _ts("last_fetch_at"),
    _ts("last_success_at"),
    Column("last_error", Text, nullable=True),
    _ts("last_error_at"),
    Column("essays_seen", Integer, nullable=False, server_default="0"),
    Column("comments_seen", Integer, nullable=False, server_default="0"),
)

drafts = Table(
    "drafts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("period_key", String(64), nullable=False),
    Column("status", String(20), nullable=False),
    Column("subject", Text, nullable=False),
    Column("intro", Text, nullable=False, server_default=""),
    # The frozen content: essays and comments as they were when drafted (JSON).
    Column("snapshot", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    _ts("approved_at"),
    Column("approved_by", Text, nullable=True),
    _ts("send_at"),
    _ts("started_at"),
    _ts("finished_at"),
    Column("note", Text, nullable=True),
    # One live draft per period (rule 3); a rejected draft frees its period for a redraft.
    Index(
        "uq_drafts_live_period",
        "period_key",
        unique=True,
        sqlite_where=text("status NOT IN ('rejected', 'skipped')"),
        postgresql_where=text("status NOT IN ('rejected', 'skipped')"),
    ),
)

draft_items = Table(
    "draft_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("draft_id", Integer, ForeignKey("drafts.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("essay_id", Integer, ForeignKey("essays.id"), nullable=False),
    Column("comment_id", Integer, ForeignKey("comments.id"), nullable=True),
    Index("ix_draft_items_draft", "draft_id"),
)

subscribers = Table(
    "subscribers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),  # stored lower-cased
    Column("name", Text, nullable=False, server_default=""),
    Column("status", String(20), nullable=False),  # active | unsubscribed | bounced | complained
    Column("origin", String(20), nullable=False, server_default="cli"),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    _ts("unsubscribed_at"),
)

send_ledger = Table(
    "send_ledger",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("draft_id", Integer, ForeignKey("drafts.id"), nullable=False),
    Column("subscriber_id", Integer, ForeignKey("subscribers.id"), nullable=False),
    Column("email", String(320), nullable=False),
    # pending → claimed → sent | failed | rejected | invalid | suppressed | uncertain | skipped
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("claim_token", String(64), nullable=True),
    # Which provider call a row went out in: an idempotent provider's resend repeats it exactly.
    Column("batch_key", String(64), nullable=True),
    _ts("claimed_at"),
    _ts("settled_at"),
    Column("provider", String(20), nullable=True),
    Column("provider_message_id", Text, nullable=True),
    Column("error", Text, nullable=True),
    UniqueConstraint("draft_id", "subscriber_id"),
    # Pending rows only: a row leaves the index when claimed, and settling it touches no
    # index at all (migration 0005 says why).
    Index(
        "ix_send_ledger_pending",
        "draft_id",
        "id",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
)

delivery_events = Table(
    "delivery_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("provider", String(20), nullable=False),
    Column("event_id", String(200), nullable=False),
    Column("event_type", String(40), nullable=False),
    Column("email", String(320), nullable=False),
    Column("ledger_id", Integer, nullable=True),
    _ts("occurred_at"),
    _ts("received_at", nullable=False),
    Column("detail", Text, nullable=False, server_default="{}"),
    UniqueConstraint("provider", "event_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("email", String(320), primary_key=True),
    Column("reason", String(40), nullable=False),
    Column("origin", String(40), nullable=False, server_default=""),
    _ts("created_at", nullable=False),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("holder", String(200), nullable=False),
    _ts("expires_at", nullable=False),
)
