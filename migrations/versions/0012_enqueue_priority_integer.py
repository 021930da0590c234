"""outbox.enqueue(..., priority => 1) as any SQL client writes it.

0007 declared ``priority smallint``: a plain integer literal (``priority => 1``) found no
function to call, since Postgres does not cast an integer argument down to smallint for
overload resolution; only ``1::smallint`` worked. The argument is an integer now, checked
against the same rule as the column (``message_priority_range``, 0 to 9) before the INSERT,
so an out-of-range value is refused by name rather than as a smallint overflow.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = """
DROP FUNCTION outbox.enqueue(text, jsonb, text, text, timestamptz, smallint, text);

-- The friendly entry for any language. Returns the id of the new row or, when dedup_key is
-- already taken, the id of the row that holds it.
CREATE FUNCTION outbox.enqueue(
    command      text,
    data         jsonb,
    dedup_key    text        DEFAULT NULL,
    route        text        DEFAULT NULL,
    available_at timestamptz DEFAULT NULL,
    priority     integer     DEFAULT NULL,
    ordering_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF enqueue.priority IS NOT NULL AND enqueue.priority NOT BETWEEN 0 AND 9 THEN
        PERFORM outbox.refuse('message_priority_range',
                              outbox.rule_message('message_priority_range', enqueue.command));
    END IF;
    INSERT INTO outbox.message AS m (command, data, dedup_key, route, available_at, priority,
                                     ordering_key)
    VALUES (enqueue.command, enqueue.data, enqueue.dedup_key, enqueue.route,
            coalesce(enqueue.available_at, now()), enqueue.priority::smallint,
            enqueue.ordering_key)
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


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    previous = importlib.import_module("outbox.migrations.versions.0011_dedup_digest")
    op.execute("DROP FUNCTION outbox.enqueue(text, jsonb, text, text, timestamptz, integer, text)")
    op.execute(previous.ENQUEUE.replace("CREATE OR REPLACE FUNCTION", "CREATE FUNCTION", 1))
