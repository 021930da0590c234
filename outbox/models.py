"""SQLAlchemy definitions of outbox's tables: the target alembic compares the database with.

The migrations are written in plain SQL (they also create functions and triggers, which
SQLAlchemy does not model); ``outbox db check`` and a test make sure the two agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB, TIMESTAMP

SCHEMA = "outbox"
metadata = MetaData(schema=SCHEMA)

STATES = ("pending", "sent", "failed", "expired")

message = Table(
    "message",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("command", Text, nullable=False),
    Column("data", JSONB, nullable=False),
    Column("route", Text),
    Column("dedup_key", Text),
    Column("state", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("available_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    Column("expires_at", TIMESTAMP(timezone=True)),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    Column("sent_at", TIMESTAMP(timezone=True)),
    Column("last_error", Text),
    # 0 most urgent .. 9 least; filled from outbox.default_priority(command) by the trigger
    Column("priority", SmallInteger, nullable=False),
    Column("ordering_key", Text),
    # the lease: which relay holds the row, and under which claim (migration 0007)
    Column("claimed_by", Text),
    Column("claim", BigInteger),
    Column("enqueued_by", Text, comment="The gateway user (outbox gateway) that enqueued the "
           "row; NULL for rows written by SQL."),
    #: the failover pool member that delivered the row (null outside pools)
    Column("served_by", Text),
    # message_state_valid and message_attempts_nonnegative are enforced by the triggers
    # (migration 0006): a CHECK constraint is planned again for every INSERT statement.
    # a salted digest of the key, so that a clash never shows the key (migration 0011)
    Index("message_dedup_key_unique", text("outbox.dedup_digest(dedup_key)"), unique=True,
          postgresql_where=text("dedup_key IS NOT NULL")),
    Index("message_claim", text("outbox.lane_key(route, command)"), "priority", "available_at",
          "id", postgresql_where=text("state = 'pending'")),
    Index("message_ordering", "ordering_key", "id",
          postgresql_where=text("state = 'pending' AND ordering_key IS NOT NULL")),
    Index("message_claimed", "claim",
          postgresql_where=text("state = 'pending' AND claim IS NOT NULL")),
    Index("message_failed_created", "created_at", postgresql_where=text("state = 'failed'")),
    Index("message_terminal_created", "created_at",
          postgresql_where=text("state IN ('sent', 'expired')")),
    Index("message_sent_at", "sent_at", postgresql_where=text("state = 'sent'")),
    Index("message_ended", "state", "available_at", postgresql_include=["route", "command"],
          postgresql_where=text("state IN ('failed', 'expired')")),
    comment="Commands for OTP-Pi devices, written by applications inside their own "
    "transactions and published by the outbox relay.",
)

otp = Table(
    "otp",
    metadata,
    Column("reference", Text, primary_key=True),
    Column("key_id", Text, nullable=False),
    Column("digest", BYTEA, nullable=False),
    Column("message_id", BigInteger, nullable=False),
    Column("expires_at", TIMESTAMP(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    Column("used_at", TIMESTAMP(timezone=True)),
    CheckConstraint("attempts >= 0", name="otp_attempts_nonnegative"),
    CheckConstraint("octet_length(digest) = 32", name="otp_digest_sha256"),
    Index("otp_expires", "expires_at"),
    comment="Managed OTPs: a keyed hash of each code (never the code), its expiry, wrong "
    "attempts and use.",
)

audit = Table(
    "audit",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("filter", JSONB, nullable=False),
    Column("source", Text, nullable=False, server_default=text("'console'")),
    CheckConstraint("action IN ('retry', 'discard')", name="audit_action_known"),
    CheckConstraint("rows >= 0", name="audit_rows_nonnegative"),
    Index("audit_at", "at"),
    comment="Actions taken on outbox rows from the operator's console: who, what, when, "
    "how many.",
)


rate_bucket = Table(
    "rate_bucket",
    metadata,
    Column("transport", Text, primary_key=True),
    Column("tokens", Float(precision=53), nullable=False),
    Column("updated_at", Float(precision=53), nullable=False),
    Column("granted", Integer, nullable=False, server_default=text("0")),
    comment="Token buckets of rate-limited transports (rate= on the URL), shared by every relay.",
)

receiver_window = Table(
    "receiver_window",
    metadata,
    Column("message_id", BigInteger, primary_key=True, autoincrement=False),
    Column("digest", BYTEA, nullable=False),
    Column("taken_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("octet_length(digest) = 16", name="receiver_window_digest_length"),
    Index("receiver_window_digest_taken", "digest", "taken_at"),
    Index("receiver_window_taken", "taken_at"),
    comment="Messages counted against their receiver's limit: a keyed digest, never the "
    "receiver.",
)

__all__ = [
    "SCHEMA",
    "STATES",
    "audit",
    "message",
    "metadata",
    "otp",
    "rate_bucket",
    "receiver_window",
]
