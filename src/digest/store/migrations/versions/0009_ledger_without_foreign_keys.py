"""send_ledger: no foreign keys to drafts and subscribers

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Why: freezing a send's audience inserts one ledger row per reader in one statement, and each
row's two foreign keys were checked one row at a time. On PostgreSQL that is a trigger per key
per row, each looking up and share-locking its parent: 65% of the freeze (1.48 s of 2.29 s for
200,000 readers, EXPLAIN ANALYZE in benchmarks/RESULTS.md), so a million readers waited about
15 s before the first message. The checks confirmed what the statement guarantees: every row's
draft is the one the same transaction moves to ``sending``, and its subscriber the row it was
just read from. Nothing in digest deletes a draft or a subscriber, and a ledger row is a record
of what was sent to whom that keeps its own copy of the address. SQLite's freeze already ran
on a connection that skipped these checks; with them gone, both databases do the same thing.

The unique key on (draft, subscriber), which keeps a reader from getting two rows in a send
(rule 1), stays. On SQLite the table is copied to drop the keys (seconds for a million rows).
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_KEYS = (
    ("fk_send_ledger_draft_id_drafts", "drafts", "draft_id"),
    ("fk_send_ledger_subscriber_id_subscribers", "subscribers", "subscriber_id"),
)


def upgrade() -> None:
    with op.batch_alter_table("send_ledger") as batch:
        for name, _parent, _column in _KEYS:
            batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("send_ledger") as batch:
        for name, parent, column in _KEYS:
            batch.create_foreign_key(name, parent, [column], ["id"])
