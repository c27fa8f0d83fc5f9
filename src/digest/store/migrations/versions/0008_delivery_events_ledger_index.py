"""delivery_events: an index on ledger_id

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Why: `digest status` shows each draft's provider events (delivered, bounced, complained),
found through the ledger rows the events name. Without the index that is a scan of every
event ever received, for every status.
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_delivery_events_ledger", "delivery_events", ["ledger_id"])


def downgrade() -> None:
    op.drop_index("ix_delivery_events_ledger", table_name="delivery_events")
