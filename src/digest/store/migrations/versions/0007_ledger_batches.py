"""send_batches and send_cursors: a claim writes one row for its batch, not one per message

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

Why: a claim used to mark each of its rows ``claimed`` (token, time, batch key) and a settle
rewrote each again: two row writes and their index upkeep per message, the largest share of
the send path's cost (8 to 9 µs of one core per message on SQLite, measured in
benchmarks/RESULTS.md), and on SQLite a cost paid while holding the only write lock. A claim
now records the id range it took in ``send_batches`` and moves the draft's cursor in
``send_cursors``; a settle writes the batch's verdict once and only the rows that part from it.
Rule 1 holds as before: the claim is committed before the provider call, a batch still
``claimed`` when a new sender starts becomes ``uncertain`` with every row it covers.

The pending-rows index of 0005 goes: claims read the rowid range above the cursor. Rows put
back in the queue get a status of their own, ``queued``, and a small index. Rows found
``claimed`` here (a sender stopped mid-send before the upgrade) get a batch without a range,
so the next send marks them uncertain as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "send_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("draft_id", sa.Integer(), nullable=False),
        sa.Column("first_id", sa.Integer(), nullable=True),
        sa.Column("last_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider", sa.String(length=20), nullable=True),
        sa.Column("provider_message_id", sa.Text(), nullable=True),
        sa.Column("message_ids", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["draft_id"], ["drafts.id"], name=op.f("fk_send_batches_draft_id_drafts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_batches")),
    )
    op.create_index("ix_send_batches_draft", "send_batches", ["draft_id", "status"])
    op.create_table(
        "send_cursors",
        sa.Column("draft_id", sa.Integer(), nullable=False),
        sa.Column("claimed_through", sa.Integer(), nullable=False),
        sa.Column("first_id", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["draft_id"], ["drafts.id"], name=op.f("fk_send_cursors_draft_id_drafts")),
        sa.PrimaryKeyConstraint("draft_id", name=op.f("pk_send_cursors")),
    )
    with op.batch_alter_table("send_ledger") as batch:
        batch.add_column(sa.Column("batch_id", sa.Integer(), nullable=True))
    op.drop_index("ix_send_ledger_pending", table_name="send_ledger")
    op.create_index("ix_send_ledger_queued", "send_ledger", ["draft_id", "id"],
                    sqlite_where=sa.text("status = 'queued'"), postgresql_where=sa.text("status = 'queued'"))
    op.create_index("ix_send_ledger_batch", "send_ledger", ["batch_id"],
                    sqlite_where=sa.text("batch_id IS NOT NULL"), postgresql_where=sa.text("batch_id IS NOT NULL"))
    # Rows in flight when a sender of the older schema stopped: one rangeless batch per draft,
    # still "claimed", so the next send finds them and marks them uncertain.
    conn = op.get_bind()
    for (draft_id,) in conn.execute(sa.text(
            "SELECT DISTINCT draft_id FROM send_ledger WHERE status = 'claimed'")).all():
        conn.execute(sa.text("INSERT INTO send_batches (draft_id, status, attempts) VALUES (:d, 'claimed', 1)"),
                     {"d": draft_id})
        batch_id = conn.execute(sa.text("SELECT max(id) FROM send_batches WHERE draft_id = :d"),
                                {"d": draft_id}).scalar_one()
        conn.execute(sa.text("UPDATE send_ledger SET batch_id = :b WHERE draft_id = :d AND status = 'claimed'"),
                     {"b": batch_id, "d": draft_id})


def downgrade() -> None:
    # Give every row its effective status back, as the older schema keeps it on the row.
    conn = op.get_bind()
    conn.execute(sa.text(
        "UPDATE send_ledger SET status = (SELECT b.status FROM send_batches b WHERE b.draft_id = "
        "send_ledger.draft_id AND b.first_id IS NOT NULL AND send_ledger.id BETWEEN b.first_id AND b.last_id) "
        "WHERE status = 'pending' AND EXISTS (SELECT 1 FROM send_batches b WHERE b.draft_id = "
        "send_ledger.draft_id AND b.first_id IS NOT NULL AND send_ledger.id BETWEEN b.first_id AND b.last_id)"))
    conn.execute(sa.text("UPDATE send_ledger SET status = 'pending' WHERE status IN ('queued', 'released', "
                         "'requeued')"))
    op.drop_index("ix_send_ledger_batch", table_name="send_ledger")
    op.drop_index("ix_send_ledger_queued", table_name="send_ledger")
    op.create_index("ix_send_ledger_pending", "send_ledger", ["draft_id", "id"],
                    sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))
    with op.batch_alter_table("send_ledger") as batch:
        batch.drop_column("batch_id")
    op.drop_table("send_cursors")
    op.drop_index("ix_send_batches_draft", table_name="send_batches")
    op.drop_table("send_batches")
