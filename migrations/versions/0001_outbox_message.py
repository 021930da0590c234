"""The outbox.message table, its rules, the enqueue function and the NOTIFY trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Every rule raises check_violation (SQLSTATE 23514) with a named constraint, the same name
# outbox.commands uses for InvalidCommand.rule, and a message that names the problem without
# echoing the receiver or the text (they are personal data and end up in application logs).
UPGRADE = r"""
CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE outbox.message (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command       text        NOT NULL,
    data          jsonb       NOT NULL,
    route         text,
    dedup_key     text,
    state         text        NOT NULL DEFAULT 'pending',
    attempts      integer     NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    last_error    text,
    CONSTRAINT message_state_valid CHECK (state IN ('pending', 'sent', 'failed', 'expired')),
    CONSTRAINT message_attempts_nonnegative CHECK (attempts >= 0)
);

COMMENT ON TABLE outbox.message IS
    'Commands for OTP-Pi devices, written by applications inside their own transactions and published by the outbox relay.';

-- A duplicate enqueue is refused by name while the first row is kept.
CREATE UNIQUE INDEX message_dedup_key_unique ON outbox.message (dedup_key)
    WHERE dedup_key IS NOT NULL;

-- Exactly what the claim reads: pending rows in (available_at, id) order.
CREATE INDEX message_pending_claim ON outbox.message (available_at, id)
    WHERE state = 'pending';

-- Operators look at failed rows by age; retention walks terminal rows by age.
CREATE INDEX message_failed_created ON outbox.message (created_at) WHERE state = 'failed';
CREATE INDEX message_terminal_created ON outbox.message (created_at)
    WHERE state IN ('sent', 'expired');

CREATE FUNCTION outbox.refuse(rule text, message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        CONSTRAINT = rule,
        MESSAGE = 'outbox.message: ' || message,
        TABLE = 'message',
        SCHEMA = 'outbox';
END
$$;

CREATE FUNCTION outbox.check_message() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cmd        text := lower(btrim(NEW.command));
    receiver   jsonb;
    rcv        text;
    msg        text;
    rest       text;
    expiration jsonb;
    exp_secs   double precision;
    is_msisdn  boolean;
    is_email   boolean;
BEGIN
    IF NEW.data IS NULL OR jsonb_typeof(NEW.data) <> 'object' THEN
        PERFORM outbox.refuse('message_data_object', 'data must be a JSON object');
    END IF;

    receiver := NEW.data -> 'receiver';
    IF cmd = 'send-message' THEN
        cmd := CASE WHEN jsonb_typeof(receiver) = 'string' AND strpos(receiver #>> '{}', '@') > 0
                    THEN 'send-email' ELSE 'send-sms' END;
    ELSIF cmd = 'send-mail' THEN
        cmd := 'send-email';
    ELSIF cmd = 'request-otp' THEN
        cmd := 'create-otp';
    ELSIF cmd IN ('validate-otp', 'verify-otp') THEN
        PERFORM outbox.refuse('message_command_synchronous',
            format('command "%s" is synchronous and cannot go through the outbox: use outbox.otp.validate() or `outbox otp validate`', cmd));
    ELSIF cmd IS NULL OR cmd NOT IN ('send-sms', 'send-email', 'block-msisdn', 'unblock-msisdn', 'create-otp') THEN
        PERFORM outbox.refuse('message_command_known',
            format('unknown command "%s" (expected one of: send-sms, send-email, block-msisdn, unblock-msisdn, create-otp)',
                   left(coalesce(cmd, ''), 40)));
    END IF;
    NEW.command := cmd;

    IF jsonb_typeof(receiver) IS DISTINCT FROM 'string' OR btrim(receiver #>> '{}') = '' THEN
        PERFORM outbox.refuse('message_receiver_present', format('%s needs a non-empty data.receiver', cmd));
    END IF;
    rcv := btrim(receiver #>> '{}');
    is_msisdn := rcv ~ '^\+?[0-9]{3,15}$';
    is_email := rcv ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$';
    IF cmd = 'send-email' AND NOT is_email THEN
        PERFORM outbox.refuse('message_receiver_email', 'send-email receiver is not an e-mail address');
    ELSIF cmd = 'create-otp' AND NOT (is_email OR is_msisdn) THEN
        PERFORM outbox.refuse('message_receiver_otp',
            'create-otp receiver must be an MSISDN (digits, optional leading +) or an e-mail address');
    ELSIF cmd IN ('send-sms', 'block-msisdn', 'unblock-msisdn') AND NOT is_msisdn THEN
        PERFORM outbox.refuse('message_receiver_msisdn',
            format('%s receiver is not an MSISDN (3 to 15 digits with an optional leading +)', cmd));
    END IF;

    IF cmd IN ('send-sms', 'send-email', 'create-otp') THEN
        IF jsonb_typeof(NEW.data -> 'message') IS DISTINCT FROM 'string'
           OR btrim(NEW.data ->> 'message') = '' THEN
            PERFORM outbox.refuse('message_text_present', format('%s needs a non-empty data.message', cmd));
        END IF;
    END IF;

    IF cmd = 'create-otp' THEN
        msg := NEW.data ->> 'message';
        rest := replace(msg, '%%', '');
        IF (length(rest) - length(replace(rest, '%s', ''))) / 2 <> 1
           OR strpos(replace(rest, '%s', ''), '%') > 0 THEN
            PERFORM outbox.refuse('message_otp_template',
                'create-otp message must contain exactly one "%s" for the code (write a literal percent sign as "%%")');
        END IF;
        IF jsonb_typeof(NEW.data -> 'reference') IS DISTINCT FROM 'string'
               AND jsonb_typeof(NEW.data -> 'reference') IS DISTINCT FROM 'number'
           OR btrim(NEW.data ->> 'reference') = '' THEN
            PERFORM outbox.refuse('message_otp_reference', 'create-otp needs a non-empty data.reference');
        END IF;
    END IF;

    expiration := NEW.data -> 'expiration';
    IF expiration IS NOT NULL AND jsonb_typeof(expiration) <> 'null' THEN
        BEGIN
            exp_secs := (expiration #>> '{}')::double precision;
        EXCEPTION WHEN invalid_text_representation THEN
            exp_secs := NULL;
        END;
        IF jsonb_typeof(expiration) NOT IN ('number', 'string') OR exp_secs IS NULL
           OR exp_secs IN ('NaN', 'Infinity', '-Infinity') THEN
            PERFORM outbox.refuse('message_expiration_number', 'expiration must be a number of Unix seconds');
        END IF;
        IF exp_secs >= 100000000000 THEN
            PERFORM outbox.refuse('message_expiration_seconds',
                'expiration must be Unix seconds; the value looks like milliseconds');
        END IF;
        IF TG_OP = 'INSERT' AND exp_secs <= extract(epoch FROM clock_timestamp()) THEN
            PERFORM outbox.refuse('message_expiration_future', 'expiration is already in the past');
        END IF;
        NEW.expires_at := to_timestamp(exp_secs);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER message_check BEFORE INSERT OR UPDATE OF command, data ON outbox.message
    FOR EACH ROW EXECUTE FUNCTION outbox.check_message();

-- One NOTIFY per inserting statement; Postgres delivers it at commit and folds repeats
-- within a transaction, so a rolled-back transaction wakes nobody.
CREATE FUNCTION outbox.notify_relay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_message', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER message_notify AFTER INSERT ON outbox.message
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay();

-- The friendly entry for any language. Returns the id of the new row or, when dedup_key is
-- already taken, the id of the row that holds it.
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

DOWNGRADE = """
DROP SCHEMA outbox CASCADE;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
