"""send_batches.sent_via and the installation id: what a batch went out through

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

Why: an uncertain batch is resent by itself only through a provider that drops a repeated
batch (Resend's Idempotency-Key), and only if that provider saw the batch under the very same
key. The ledger did not say what a batch went out through, so a batch left uncertain by a
Postmark outage was resent under a Resend key after the operator switched to Resend (Resend
never saw it: a second copy), and so was a batch sent through another Resend account. A claim
now writes ``sent_via``: the provider's name and, for Resend, a hash of its key space (the key
format, this installation, the account). A send resends by itself only the batches claimed
under its own.

Batches claimed before this revision have none: they are never resent by themselves (their
keys were of the format before, without the installation id, so a resend now would be another
request); they wait for the operator (``digest send --resolve-uncertain``), as `digest status`
says.

The installation id (``meta``, ``installation_id``): a random value of this database's own.
Resend's keys carry a hash of it, so that two installations sending through one Resend team
(staging beside production, two newsletters), whose drafts and ledger ids both start at 1,
never send the same key with different bodies (Resend refuses the second: 409). Made here so
that reading it never writes (a dry run writes nothing); a database made otherwise gets one on
first use (Store.installation_id).
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("send_batches") as batch_op:
        batch_op.add_column(sa.Column("sent_via", sa.String(length=64), nullable=True))
    # Kept by a downgrade (meta is key and value): upgrading again keeps the same id, so the
    # keys of batches sent in between stay the same.
    conn = op.get_bind()
    if conn.execute(sa.text("SELECT 1 FROM meta WHERE key = 'installation_id'")).first() is None:
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('installation_id', :v)"),
                     {"v": secrets.token_urlsafe(32)})


def downgrade() -> None:
    with op.batch_alter_table("send_batches") as batch_op:
        batch_op.drop_column("sent_via")
