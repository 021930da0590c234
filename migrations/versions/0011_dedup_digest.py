"""Dedup keys are compared through a digest: no error the schema raises echoes a key.

A unique index on ``dedup_key`` itself makes every clash report it in clear in the error's
DETAIL (``Key (dedup_key)=(otp-+6281234567890)``), which reaches the application's logs and
the server log. Keys are often built from a receiver or an order, so
``message_dedup_key_unique`` now indexes ``outbox.dedup_digest(dedup_key)``: SHA-256 of the key
after a salt drawn at random when this migration ran, written into the function's body
(so the function is truly immutable and survives a dump and restore). A clash now shows a
digest that a log reader cannot turn back into a key by trying every phone number, since the
salt is only in the database, where the key itself is anyway.

The index keeps its name (applications may catch ``message_dedup_key_unique``); it is built
under another name, concurrently, then takes the old one's place. ``outbox.enqueue()`` (as
0007 left it, with ``priority`` and ``ordering_key``) and the Python helper infer the new
index in their ``ON CONFLICT`` and look an existing key up through it. An application's
Python helper of an older version names the old index in its ``ON CONFLICT`` and fails once
this migration ran: upgrade the applications' ``outbox`` package with it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import secrets

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def digest_function(salt: str) -> str:
    # SHA-256 of the salt and the key's bytes (UTF-8 in a UTF-8 database). Not through
    # convert_to(), which is only STABLE: a body that is not immutable throughout keeps the
    # planner from inlining the function, and every INSERT then pays a SQL function call
    # (3-4 us against 0.6-1.3 us inlined). The cast to bytea reads backslashes as escapes,
    # so each one is doubled first: the bytes are exactly the key's. STRICT: a NULL key
    # stays NULL (and out of the partial index).
    return rf"""
CREATE FUNCTION outbox.dedup_digest(key text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sha256(('{salt}' || replace(key, '\', '\\'))::bytea)
$$;
COMMENT ON FUNCTION outbox.dedup_digest(text) IS
    'SHA-256 of a salted dedup key: what message_dedup_key_unique compares, so that a clash '
    'never shows the key';
"""


ENQUEUE = """
CREATE OR REPLACE FUNCTION outbox.enqueue(
    command      text,
    data         jsonb,
    dedup_key    text        DEFAULT NULL,
    route        text        DEFAULT NULL,
    available_at timestamptz DEFAULT NULL,
    priority     smallint    DEFAULT NULL,
    ordering_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO outbox.message AS m (command, data, dedup_key, route, available_at, priority,
                                     ordering_key)
    VALUES (enqueue.command, enqueue.data, enqueue.dedup_key, enqueue.route,
            coalesce(enqueue.available_at, now()), enqueue.priority, enqueue.ordering_key)
    ON CONFLICT ((outbox.dedup_digest(dedup_key))) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING m.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT m.id INTO new_id FROM outbox.message AS m
        WHERE outbox.dedup_digest(m.dedup_key) = outbox.dedup_digest(enqueue.dedup_key)
          AND m.dedup_key = enqueue.dedup_key;
    END IF;
    RETURN new_id;
END
$$;
"""

ENQUEUE_0007 = """
CREATE OR REPLACE FUNCTION outbox.enqueue(
    command      text,
    data         jsonb,
    dedup_key    text        DEFAULT NULL,
    route        text        DEFAULT NULL,
    available_at timestamptz DEFAULT NULL,
    priority     smallint    DEFAULT NULL,
    ordering_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO outbox.message AS m (command, data, dedup_key, route, available_at, priority,
                                     ordering_key)
    VALUES (enqueue.command, enqueue.data, enqueue.dedup_key, enqueue.route,
            coalesce(enqueue.available_at, now()), enqueue.priority, enqueue.ordering_key)
    ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING m.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT m.id INTO new_id FROM outbox.message AS m WHERE m.dedup_key = enqueue.dedup_key;
    END IF;
    RETURN new_id;
END
$$;
"""

INDEXES = [
    """CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS message_dedup_digest_unique
           ON outbox.message (outbox.dedup_digest(dedup_key)) WHERE dedup_key IS NOT NULL""",
    "DROP INDEX CONCURRENTLY IF EXISTS outbox.message_dedup_key_unique",
    "ALTER INDEX outbox.message_dedup_digest_unique RENAME TO message_dedup_key_unique",
]

DOWNGRADE_INDEXES = [
    """CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS message_dedup_key_plain
           ON outbox.message (dedup_key) WHERE dedup_key IS NOT NULL""",
    "DROP INDEX CONCURRENTLY IF EXISTS outbox.message_dedup_key_unique",
    "ALTER INDEX outbox.message_dedup_key_plain RENAME TO message_dedup_key_unique",
]


def upgrade() -> None:
    op.execute(digest_function(secrets.token_hex(16)))
    with op.get_context().autocommit_block():
        op.execute(INDEXES[0])
        # Between the two indexes: either ON CONFLICT finds its index at every moment.
        op.execute(ENQUEUE)
        for statement in INDEXES[1:]:
            op.execute(statement)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for statement in DOWNGRADE_INDEXES:
            op.execute(statement)
    op.execute(ENQUEUE_0007)
    op.execute("DROP FUNCTION outbox.dedup_digest(text)")
