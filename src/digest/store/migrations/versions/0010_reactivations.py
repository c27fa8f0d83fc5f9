"""reactivations: the addresses an operator took back after a bounce

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08

Why: `digest subscribers reactivate` lifts a bounce suppression (the mailbox was full, the
domain fixed). The address's soft bounces from before must then not count towards the limit
again, and ``delivery_events`` keeps them (they are the record, and what tells a provider's
late copy of an event from a new one). This table says from when an address's soft bounces
count: one row per address, its latest reactivation, with the suppression it lifted.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reactivations",
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=True),
        sa.Column("suppressed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reactivated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("email", name=op.f("pk_reactivations")),
    )


def downgrade() -> None:
    op.drop_table("reactivations")
