"""outbox.message.enqueued_by: who put a row in the outbox through a network service.

``outbox gateway`` fills it with the authenticated gateway user, so an operator can tell
which client sent a message; rows an application INSERTs itself leave it NULL. A nullable
column without a default is a catalogue change only: no table rewrite, no lock beyond the
moment of the ALTER, and nothing for the INSERT trigger to check.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE outbox.message ADD COLUMN IF NOT EXISTS enqueued_by text")
    op.execute(
        "COMMENT ON COLUMN outbox.message.enqueued_by IS "
        "'The gateway user (outbox gateway) that enqueued the row; NULL for rows written by SQL.'"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE outbox.message DROP COLUMN IF EXISTS enqueued_by")
