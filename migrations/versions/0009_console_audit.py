"""The operator's console: an audit trail of its actions, and an index for the failed and
expired rows per minute it charts.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Who retried or discarded how many rows, when, and with which filter (the filter as the
# console's form had it: command, route, ages, reason, ids). Never a receiver or a text: a
# filter names rows by their properties, and the reason words are masked before they land.
CREATE_AUDIT = """
CREATE TABLE outbox.audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL,
    rows bigint NOT NULL,
    filter jsonb NOT NULL,
    source text NOT NULL DEFAULT 'console',
    CONSTRAINT audit_action_known CHECK (action IN ('retry', 'discard')),
    CONSTRAINT audit_rows_nonnegative CHECK (rows >= 0)
);
CREATE INDEX audit_at ON outbox.audit (at);
COMMENT ON TABLE outbox.audit IS
    'Actions taken on outbox rows from the operator''s console: who, what, when, how many.';
"""

# The console charts failed and expired rows per minute of the last hour by when their last
# attempt was due, and counts failed rows per route. Without this index the first is a scan
# of every terminal row and the second visits the page of every failed row (spread over the
# whole table: 250 ms for 50,000 of them among 10 million). Partial, so pending and sent
# rows (the many) never enter it; route and command ride along so both are index-only.
# CONCURRENTLY, as message_sent_at in 0003: a live table keeps taking INSERTs meanwhile.
ENDED_INDEX = """
CREATE INDEX CONCURRENTLY IF NOT EXISTS message_ended ON outbox.message (state, available_at)
    INCLUDE (route, command) WHERE state IN ('failed', 'expired')
"""


def upgrade() -> None:
    op.execute(CREATE_AUDIT)
    with op.get_context().autocommit_block():
        op.execute(ENDED_INDEX)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS outbox.message_ended")
    op.execute("DROP TABLE outbox.audit")
