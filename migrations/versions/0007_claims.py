"""Claims: leases, lanes, priorities and ordering keys.

Four columns and the indexes that serve the claim:

- ``priority`` (0 most urgent .. 9 least). A row inserted without one takes its command's
  default from ``outbox.default_priority(command)``: create-otp 0, block-msisdn and
  unblock-msisdn 2, send-sms and send-email 5 (``outbox run`` replaces the function when the
  settings name other defaults). The claim takes rows in the order of
  ``available_at + priority * OUTBOX_PRIORITY_AGING``: waiting ages a row, so a bulk row never
  waits more than its priority's worth of aging behind a stream of urgent ones.
- ``ordering_key``: rows with the same key go out one after another in id order; a row
  waiting (for a retry, a lease or its own schedule) holds back only the later rows of its
  key. block-msisdn and unblock-msisdn default to ``msisdn:<number without +>``; an empty
  key means none.
- ``claimed_by`` and ``claim``: a lease. A relay claims rows in a short transaction that sets
  ``claimed_by`` (``host:pid``), a random ``claim`` id and ``available_at`` to the lease's
  expiry, and commits; it publishes outside any transaction and records each outcome only
  where the row still holds its claim. A lease that runs out makes the row due again, so a
  frozen, killed or cut-off relay strands nothing for longer than ``OUTBOX_CLAIM_TIMEOUT``.

The claim index leads with the row's lane key, ``outbox.lane_key(route, command)`` (its
route, or ``@command`` when it names none), so each lane (one transport, fan-out or pool)
reads only its own rows however large another lane's backlog; then priority and due time.
It replaces ``message_pending_claim``: one index less to maintain on every INSERT.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

STATES = "('pending', 'sent', 'failed', 'expired')"

DEFAULT_PRIORITIES = {
    "create-otp": 0,
    "block-msisdn": 2,
    "unblock-msisdn": 2,
    "send-sms": 5,
    "send-email": 5,
}


def default_priority_function(priorities: dict[str, int]) -> str:
    """The SQL that (re)defines ``outbox.default_priority``; ``outbox run`` uses it too."""
    cases = "\n".join(f"        WHEN '{command}' THEN {int(value)}"
                      for command, value in sorted(priorities.items()))
    return f"""
CREATE OR REPLACE FUNCTION outbox.default_priority(command text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (CASE command
{cases}
        ELSE 5 END)::smallint
$$;
"""


LANE_KEY = """
CREATE FUNCTION outbox.lane_key(route text, command text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN route IS NULL OR btrim(route) = '' THEN '@' || command ELSE btrim(route) END
$$;
"""

RULE_MESSAGE_EXTRA = """
CREATE OR REPLACE FUNCTION outbox.rule_message(rule text, cmd text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE rule
        WHEN 'message_priority_range' THEN 'priority must be a whole number from 0 (most urgent) to 9'
        ELSE outbox.rule_message_0006(rule, cmd)
    END
$$;
"""


def _check_functions() -> str:
    previous = importlib.import_module("outbox.migrations.versions.0006_checks_in_trigger")
    body: str = previous.CHECK_FUNCTION
    # The fast path: a plain send-sms also needs an acceptable priority (or none) and takes
    # its default in the same pass.
    body = body.replace(
        "       AND NOT NEW.data ? 'expiration' THEN\n",
        "       AND NOT NEW.data ? 'expiration'\n"
        "       AND (NEW.priority IS NULL OR NEW.priority BETWEEN 0 AND 9)\n"
        "       AND NEW.ordering_key IS NULL THEN\n"
        "        IF NEW.priority IS NULL THEN\n"
        "            NEW.priority := outbox.default_priority('send-sms');\n"
        "        END IF;\n",
    )
    body = body.replace(
        "        CASE WHEN NEW.attempts < 0 THEN 'message_attempts_nonnegative' END);",
        "        CASE WHEN NEW.attempts < 0 THEN 'message_attempts_nonnegative' END,\n"
        "        CASE WHEN NEW.priority NOT BETWEEN 0 AND 9 THEN 'message_priority_range' END);",
    )
    body = body.replace(
        "    IF op = 'INSERT' THEN\n        -- A condition",
        "    IF NEW.priority IS NULL THEN\n"
        "        NEW.priority := outbox.default_priority(cmd);\n"
        "    END IF;\n"
        "    IF NEW.ordering_key IS NULL AND cmd IN ('block-msisdn', 'unblock-msisdn') THEN\n"
        "        NEW.ordering_key := 'msisdn:' || ltrim(btrim(d ->> 'receiver'), '+');\n"
        "    ELSIF btrim(NEW.ordering_key) = '' THEN\n"
        "        NEW.ordering_key := NULL;\n"
        "    END IF;\n\n"
        "    IF op = 'INSERT' THEN\n        -- A condition",
    )
    body = body.replace("CREATE FUNCTION outbox.check_message_fully",
                        "CREATE OR REPLACE FUNCTION outbox.check_message_fully")
    for marker in ("outbox.default_priority('send-sms')", "message_priority_range",
                   "NEW.ordering_key := 'msisdn:'"):
        assert marker in body, marker  # the 0006 text changed under us
    return body


# An operator's UPDATE of priority is checked like one of state or attempts: the WHEN clause
# is all the relay's own UPDATEs pay.
STATE_GUARD = f"""
DROP TRIGGER message_state_guard ON outbox.message;

CREATE OR REPLACE FUNCTION outbox.check_message_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    rule text := CASE WHEN NEW.state IS NULL OR NEW.state NOT IN {STATES} THEN 'message_state_valid'
                      WHEN NEW.attempts IS NULL OR NEW.attempts < 0 THEN 'message_attempts_nonnegative'
                      ELSE 'message_priority_range' END;
BEGIN
    PERFORM outbox.refuse(rule, outbox.rule_message(rule, NEW.command));
    RETURN NEW;
END
$$;

CREATE TRIGGER message_state_guard BEFORE UPDATE OF state, attempts, priority ON outbox.message
    FOR EACH ROW WHEN (NEW.state NOT IN {STATES} OR NEW.attempts < 0
                       OR NOT coalesce(NEW.priority BETWEEN 0 AND 9, false))
    EXECUTE FUNCTION outbox.check_message_state();
"""

ENQUEUE = """
DROP FUNCTION outbox.enqueue(text, jsonb, text, text, timestamptz);

-- The friendly entry for any language. Returns the id of the new row or, when dedup_key is
-- already taken, the id of the row that holds it.
CREATE FUNCTION outbox.enqueue(
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

ENQUEUE_0001 = """
DROP FUNCTION outbox.enqueue(text, jsonb, text, text, timestamptz, smallint, text);

CREATE FUNCTION outbox.enqueue(
    command      text,
    data         jsonb,
    dedup_key    text        DEFAULT NULL,
    route        text        DEFAULT NULL,
    available_at timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO outbox.message AS m (command, data, dedup_key, route, available_at)
    VALUES (enqueue.command, enqueue.data, enqueue.dedup_key, enqueue.route,
            coalesce(enqueue.available_at, now()))
    ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING m.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT m.id INTO new_id FROM outbox.message AS m WHERE m.dedup_key = enqueue.dedup_key;
    END IF;
    RETURN new_id;
END
$$;
"""

# ADD COLUMN ... NOT NULL DEFAULT is instant (the value is kept in the catalogue for the rows
# that exist); dropping the default afterwards leaves the trigger to fill it per command.
# Only pending rows are given their command's default: the others are never claimed again.
COLUMNS = """
ALTER TABLE outbox.message
    ADD COLUMN priority smallint NOT NULL DEFAULT 5,
    ADD COLUMN ordering_key text,
    ADD COLUMN claimed_by text,
    ADD COLUMN claim bigint;
ALTER TABLE outbox.message ALTER COLUMN priority DROP DEFAULT;
ALTER FUNCTION outbox.rule_message(text, text) RENAME TO rule_message_0006;
"""

BACKFILL = """
UPDATE outbox.message SET priority = outbox.default_priority(command) WHERE state = 'pending';
UPDATE outbox.message SET ordering_key = 'msisdn:' || ltrim(btrim(data ->> 'receiver'), '+')
WHERE state = 'pending' AND command IN ('block-msisdn', 'unblock-msisdn')
  AND jsonb_typeof(data -> 'receiver') = 'string';
"""

INDEXES = [
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS message_claim ON outbox.message
           (outbox.lane_key(route, command), priority, available_at, id)
           WHERE state = 'pending'""",
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS message_ordering ON outbox.message
           (ordering_key, id) WHERE state = 'pending' AND ordering_key IS NOT NULL""",
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS message_claimed ON outbox.message (claim)
           WHERE state = 'pending' AND claim IS NOT NULL""",
    "DROP INDEX CONCURRENTLY IF EXISTS outbox.message_pending_claim",
]

DOWNGRADE_INDEXES = [
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS message_pending_claim ON outbox.message
           (available_at, id) WHERE state = 'pending'""",
    "DROP INDEX CONCURRENTLY IF EXISTS outbox.message_claimed",
    "DROP INDEX CONCURRENTLY IF EXISTS outbox.message_ordering",
    "DROP INDEX CONCURRENTLY IF EXISTS outbox.message_claim",
]


def _previous_state_guard() -> str:
    return f"""
DROP TRIGGER message_state_guard ON outbox.message;
CREATE OR REPLACE FUNCTION outbox.check_message_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    rule text := CASE WHEN NEW.state NOT IN {STATES} THEN 'message_state_valid'
                      ELSE 'message_attempts_nonnegative' END;
BEGIN
    PERFORM outbox.refuse(rule, outbox.rule_message(rule, NEW.command));
    RETURN NEW;
END
$$;
CREATE TRIGGER message_state_guard BEFORE UPDATE OF state, attempts ON outbox.message
    FOR EACH ROW WHEN (NEW.state NOT IN {STATES} OR NEW.attempts < 0)
    EXECUTE FUNCTION outbox.check_message_state();
"""


def upgrade() -> None:
    op.execute(COLUMNS)
    op.execute(default_priority_function(DEFAULT_PRIORITIES))
    op.execute(LANE_KEY)
    op.execute(RULE_MESSAGE_EXTRA)
    op.execute(_check_functions())
    op.execute(STATE_GUARD)
    op.execute(ENQUEUE)
    op.execute(BACKFILL)
    with op.get_context().autocommit_block():
        for statement in INDEXES:
            op.execute(statement)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for statement in DOWNGRADE_INDEXES:
            op.execute(statement)
    previous = importlib.import_module("outbox.migrations.versions.0006_checks_in_trigger")
    op.execute(ENQUEUE_0001)
    op.execute(_previous_state_guard())
    op.execute(previous.CHECK_FUNCTION.replace(
        "CREATE FUNCTION outbox.check_message_fully",
        "CREATE OR REPLACE FUNCTION outbox.check_message_fully"))
    op.execute("DROP FUNCTION outbox.rule_message(text, text)")
    op.execute("ALTER FUNCTION outbox.rule_message_0006(text, text) RENAME TO rule_message")
    op.execute("DROP FUNCTION outbox.lane_key(text, text)")
    op.execute("""
ALTER TABLE outbox.message DROP COLUMN claim, DROP COLUMN claimed_by,
                           DROP COLUMN ordering_key, DROP COLUMN priority;
DROP FUNCTION outbox.default_priority(text);
""")
