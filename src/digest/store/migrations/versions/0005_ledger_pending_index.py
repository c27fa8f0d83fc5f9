"""send_ledger: index only the pending rows, not every row's status

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26

Why: every message sent changes its row's status twice (pending → claimed → sent). An index
on (draft_id, status) is rewritten both times; a partial index of pending rows is touched once,
when the row is claimed. The claim query (the next pending rows of a draft, in id order) reads
this index; counting a draft's rows by status reads the draft's rows instead, once per send.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_send_ledger_draft_status", table_name="send_ledger")
    op.create_index(
        "ix_send_ledger_pending",
        "send_ledger",
        ["draft_id", "id"],
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_send_ledger_pending", table_name="send_ledger")
    op.create_index("ix_send_ledger_draft_status", "send_ledger", ["draft_id", "status"])
