"""Failover pools, rate limits per transport, limits per receiver.

* ``outbox.rate_bucket``: one token bucket per rate-limited transport, shared by every
  worker of every relay. A claim takes its tokens with one ``INSERT ... ON CONFLICT DO
  UPDATE ... RETURNING`` (``TAKE_TOKENS`` in outbox/store.py); the row lock it takes lasts
  as long as the short claim transaction.
* ``outbox.receiver_window``: one row per message that took a place in its receiver's
  limit (``OUTBOX_RECEIVER_LIMIT``), keyed by the message and holding only a keyed digest
  of the command and the receiver, never the receiver.
* ``outbox.message.served_by``: which member of a failover pool delivered a sent row (null
  for rows of plain routes). Adding a nullable column without a default rewrites nothing.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE outbox.rate_bucket (
    transport  text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at double precision NOT NULL,
    granted    integer NOT NULL DEFAULT 0
);
COMMENT ON TABLE outbox.rate_bucket IS
    'Token buckets of rate-limited transports (rate= on the URL), shared by every relay.';

CREATE TABLE outbox.receiver_window (
    message_id bigint PRIMARY KEY,
    digest     bytea NOT NULL,
    taken_at   timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT receiver_window_digest_length CHECK (octet_length(digest) = 16)
);
CREATE INDEX receiver_window_digest_taken ON outbox.receiver_window (digest, taken_at);
CREATE INDEX receiver_window_taken ON outbox.receiver_window (taken_at);
COMMENT ON TABLE outbox.receiver_window IS
    'Messages counted against their receiver''s limit: a keyed digest, never the receiver.';

ALTER TABLE outbox.message ADD COLUMN served_by text;
"""

DOWNGRADE = """
ALTER TABLE outbox.message DROP COLUMN served_by;
DROP TABLE outbox.receiver_window;
DROP TABLE outbox.rate_bucket;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
