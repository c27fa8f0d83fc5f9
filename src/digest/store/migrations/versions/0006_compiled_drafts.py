"""compiled_drafts: each draft as compiled for sending, under the key of what it was made from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Why: a send used to compile its draft (Jinja2, MJML, the sanitizer) in the sending process,
which then carried those libraries for the whole send. The draft is now compiled when it is
made and stored here; the approvers review that result and the sender loads it. A row is
used only while its render_key matches what the templates and settings give now.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compiled_drafts",
        sa.Column("draft_id", sa.Integer(), nullable=False),
        sa.Column("render_key", sa.String(length=64), nullable=False),
        sa.Column("compiled", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["draft_id"], ["drafts.id"], name=op.f("fk_compiled_drafts_draft_id_drafts"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("draft_id", "render_key", name=op.f("pk_compiled_drafts")),
    )


def downgrade() -> None:
    op.drop_table("compiled_drafts")
