"""outbox.otp: managed OTPs, kept as a keyed hash, one row per reference.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The relay writes a row when it publishes a create-otp in managed mode; validation reads and
# updates it. The clear code is never stored: ``digest`` is HMAC-SHA-256 under a secret that
# lives in the relay's settings (``key_id`` names which one, for rotation), over the code bound
# to the reference, the receiver and param1..param4.
UPGRADE = r"""
CREATE TABLE outbox.otp (
    reference   text        PRIMARY KEY,
    key_id      text        NOT NULL,
    digest      bytea       NOT NULL,
    message_id  bigint      NOT NULL,
    expires_at  timestamptz NOT NULL,
    attempts    integer     NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    used_at     timestamptz,
    CONSTRAINT otp_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT otp_digest_sha256 CHECK (octet_length(digest) = 32)
);

COMMENT ON TABLE outbox.otp IS
    'Managed OTPs: a keyed hash of each code (never the code), its expiry, wrong attempts and use.';
"""

DOWNGRADE = """
DROP TABLE outbox.otp;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
