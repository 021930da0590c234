"""Nothing lost or stuck on bad input: what a plain INSERT or UPDATE can put in a row is
refused at the door, by name, without echoing the receiver or the text.

New rules (SQLSTATE 23514, or 23502 for a NULL, with a constraint name as before):

* ``message_<column>_not_null`` for a NULL in each NOT NULL column (``command``, ``data``,
  ``state``, ``attempts``, ``available_at``, ``created_at``): Postgres' own not-null error
  quotes the whole row ("Failing row contains (...)"), receiver and text included;
* ``message_data_size``: ``data`` longer, as JSON text (``data::text``), than
  ``outbox.message_data_size()`` bytes (64 KiB unless changed with
  ``outbox.set_message_data_size(n)``). A document far over the limit is refused on its stored
  size alone, before anything reads it;
* ``message_data_depth``: containers nested 64 levels deep or more (JSON decoders, the relay's
  included, give up beyond a few hundred);
* ``message_data_number``: a number that would not come back the same from a JSON round trip:
  an integer beyond a signed 64 bit integer, a fraction with more digits than a double keeps, a
  non-zero number under 1e-300;
* ``message_<column>_range`` for ``available_at``, ``created_at``, ``expires_at``, ``sent_at``:
  finite and from 1970 to the year 9999, on INSERT and on every UPDATE, so no row can be pending
  forever ('infinity') or unreadable by a client (year 10000 and beyond);
* ``message_dedup_key_empty``: an empty ``dedup_key``, as the Python helper already said;
* ``message_state_new``: an INSERT of a row that is not pending (a "failed" row without a
  reason, a "sent" row nothing sent);
* ``message_attempts_range``: more than a million attempts written by an INSERT or an
  operator's UPDATE (the relay adds one per try, and 2147483647 + 1 overflowed its UPDATE;
  its own increments of one stay allowed, two billion tries away from an overflow).

One receiver rule, one canonical form: ``outbox.canonical_receiver(text)`` trims the same
whitespace the Python helper trims (``outbox.commands.WHITESPACE``: every character for which
Python's ``str.isspace()`` is true, spelled out), the rules read the trimmed receiver, and the
trimmed receiver is what the row stores (and the relay publishes). Message texts and OTP
references are trimmed with the same set to decide whether they are empty. Numbers written as
strings in ``expiration`` are read in plain decimal notation only (no hexadecimal, no ``inf``),
as the helper reads them, and too large a value is a named error, not an overflow.

Pending rows already in the table are brought within the rules (times out of range made due
now, or expired, or never expiring; attempts capped at a million; an empty dedup key NULL):
the relay's own arithmetic on them cannot fail.

Cost: the usual row still takes the one-expression fast path, now with its size, its
top-level values (strings only: no number and no nesting to look into), its time columns and
its dedup key in the same expression.

It keeps what 0007 added: a row without a priority takes its command's default, and
block-msisdn / unblock-msisdn take the ordering key ``msisdn:<number without +>``, now built
from the canonical receiver, so a block and an unblock of one number always share one key.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

#: outbox.commands.WHITESPACE, frozen here (a test keeps the two equal)
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
              "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
#: the set as an E'' literal (btrim) and as regex escapes (bracket expressions)
WS_LITERAL = "E'" + "".join(f"\\u{ord(c):04x}" for c in WHITESPACE) + "'"
WS_CLASS = "".join(f"\\u{ord(c):04x}" for c in WHITESPACE)
MSISDN = r"^\+?[0-9]{3,15}$"
EMAIL = f"^[^@{WS_CLASS}]+@[^@{WS_CLASS}]+\\.[^@{WS_CLASS}]+$"
NUMBER_TEXT = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$"
STATES = "('pending', 'sent', 'failed', 'expired')"
LOW = "'1970-01-01 00:00:00+00'::timestamptz"
HIGH = "'10000-01-01 00:00:00+00'::timestamptz"


def in_range(column: str) -> str:
    return f"({column} >= {LOW} AND {column} < {HIGH})"


FUNCTIONS = r"""
-- The configured size limit; outbox.set_message_data_size() redefines it. IMMUTABLE and in
-- SQL: the planner folds it into the trigger's expressions, so reading it costs nothing.
CREATE OR REPLACE FUNCTION outbox.message_data_size() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 65536 $$;

CREATE OR REPLACE FUNCTION outbox.set_message_data_size(bytes integer) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF bytes IS NULL OR bytes < 1024 OR bytes > 67108864 THEN
        RAISE EXCEPTION 'message_data_size must be from 1024 bytes to 64 MiB'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION outbox.message_data_size() RETURNS integer '
                   'LANGUAGE sql IMMUTABLE AS $f$ SELECT %s $f$', bytes);
    RETURN bytes;
END
$$;

CREATE OR REPLACE FUNCTION outbox.canonical_receiver(receiver text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT btrim(receiver, {ws}) $$;

CREATE OR REPLACE FUNCTION outbox.refuse_null(rule text, column_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'not_null_violation',
        CONSTRAINT = rule,
        COLUMN = column_name,
        MESSAGE = format('outbox.message: %s must not be NULL', column_name),
        TABLE = 'message',
        SCHEMA = 'outbox';
END
$$;

-- Whether every fraction in d comes back the same from a double (a decoder's float): parsed,
-- written in the shortest form that reads back (extra_float_digits = 1, set here so that a
-- session's own setting cannot change the verdict) and compared as decimals.
CREATE OR REPLACE FUNCTION outbox.fractions_survive_doubles(d jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE SET extra_float_digits = 1 AS $$
    SELECT coalesce(bool_and(n::numeric = (n::numeric::float8)::text::numeric), true)
    FROM jsonb_path_query(d, 'strict $.** ? (@.type() == "number" && @.floor() != @)') AS n
$$;

CREATE OR REPLACE FUNCTION outbox.rule_message(rule text, cmd text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE rule
        WHEN 'message_data_object' THEN 'data must be a JSON object'
        WHEN 'message_data_size' THEN
            format('data is longer than the %s bytes a message may hold (as JSON text)',
                   outbox.message_data_size())
        WHEN 'message_data_depth' THEN 'data nests containers 64 levels deep or more'
        WHEN 'message_data_number' THEN
            'data holds a number that would not come back the same from JSON (beyond a signed 64-bit integer, more digits than a double keeps, or under 1e-300)'
        WHEN 'message_receiver_present' THEN format('%s needs a non-empty data.receiver', cmd)
        WHEN 'message_receiver_email' THEN 'send-email receiver is not an e-mail address'
        WHEN 'message_receiver_otp' THEN
            'create-otp receiver must be an MSISDN (digits, optional leading +) or an e-mail address'
        WHEN 'message_receiver_msisdn' THEN
            format('%s receiver is not an MSISDN (3 to 15 digits with an optional leading +)', cmd)
        WHEN 'message_text_present' THEN format('%s needs a non-empty data.message', cmd)
        WHEN 'message_otp_template' THEN
            'create-otp message must contain exactly one "%s" for the code (write a literal percent sign as "%%")'
        WHEN 'message_otp_reference' THEN 'create-otp needs a non-empty data.reference'
        WHEN 'message_expiration_number' THEN 'expiration must be a number of Unix seconds'
        WHEN 'message_expiration_seconds' THEN
            'expiration must be Unix seconds; the value looks like milliseconds'
        WHEN 'message_expiration_future' THEN 'expiration is already in the past'
        WHEN 'message_state_valid' THEN 'state must be one of pending, sent, failed, expired'
        WHEN 'message_state_new' THEN
            'a new row is pending: only the relay, or an operator''s UPDATE, ends a row'
        WHEN 'message_attempts_nonnegative' THEN 'attempts must not be negative'
        WHEN 'message_attempts_range' THEN 'attempts must be at most 1000000'
        WHEN 'message_available_at_range' THEN 'available_at must be a time from 1970 to the year 9999'
        WHEN 'message_created_at_range' THEN 'created_at must be a time from 1970 to the year 9999'
        WHEN 'message_expires_at_range' THEN 'expires_at must be a time from 1970 to the year 9999'
        WHEN 'message_sent_at_range' THEN 'sent_at must be a time from 1970 to the year 9999'
        WHEN 'message_dedup_key_empty' THEN 'dedup_key must be NULL or non-empty'
        WHEN 'message_priority_range' THEN 'priority must be a whole number from 0 (most urgent) to 9'
    END
$$;

-- The rules on the columns other than command and data, for INSERTs and UPDATEs alike; NULL
-- when the row passes. Not-null rules first: they raise a different SQLSTATE.
CREATE OR REPLACE FUNCTION outbox.row_rule(m outbox.message) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(
        CASE WHEN m.command IS NULL THEN 'message_command_not_null' END,
        CASE WHEN m.data IS NULL THEN 'message_data_not_null' END,
        CASE WHEN m.state IS NULL THEN 'message_state_not_null' END,
        CASE WHEN m.attempts IS NULL THEN 'message_attempts_not_null' END,
        CASE WHEN m.available_at IS NULL THEN 'message_available_at_not_null' END,
        CASE WHEN m.created_at IS NULL THEN 'message_created_at_not_null' END,
        CASE WHEN m.priority IS NULL THEN 'message_priority_not_null' END,
        CASE WHEN m.state NOT IN {states} THEN 'message_state_valid' END,
        CASE WHEN m.attempts < 0 THEN 'message_attempts_nonnegative' END,
        CASE WHEN m.attempts > 1000000 THEN 'message_attempts_range' END,
        CASE WHEN m.priority NOT BETWEEN 0 AND 9 THEN 'message_priority_range' END,
        CASE WHEN NOT {available_at} THEN 'message_available_at_range' END,
        CASE WHEN NOT {created_at} THEN 'message_created_at_range' END,
        CASE WHEN NOT {expires_at} THEN 'message_expires_at_range' END,
        CASE WHEN NOT {sent_at} THEN 'message_sent_at_range' END,
        CASE WHEN m.dedup_key = '' THEN 'message_dedup_key_empty' END)
$$;

CREATE OR REPLACE FUNCTION outbox.refuse_rule(rule text, cmd text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF rule LIKE '%\_not\_null' THEN
        PERFORM outbox.refuse_null(rule, substr(rule, 9, length(rule) - 17));
    END IF;
    PERFORM outbox.refuse(rule, outbox.rule_message(rule, cmd));
END
$$;
""".replace("{ws}", WS_LITERAL).replace("{states}", STATES).replace(
    "{available_at}", in_range("m.available_at")).replace(
    "{created_at}", in_range("m.created_at")).replace(
    "{expires_at}", in_range("m.expires_at")).replace(
    "{sent_at}", in_range("m.sent_at"))

CHECK_FUNCTION = r"""
CREATE OR REPLACE FUNCTION outbox.check_message() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The usual row in one expression: the INSERT of a plain send-sms that passes every rule
    -- (the rules of check_message_fully for it, restated): a receiver already in its
    -- canonical form, only strings at the top level (no number, no nesting to look into; in
    -- lax mode an array's elements are looked at, so only [] and lists of strings pass),
    -- well under the size limit (data::text is never more than six times the stored size),
    -- sane times, no empty dedup key. PL/pgSQL prepares each expression again in every
    -- transaction: with one row per transaction the full path costs 14 µs more.
    IF TG_OP = 'INSERT' AND NEW.command = 'send-sms' AND NEW.state = 'pending'
       AND NEW.attempts BETWEEN 0 AND 1000000
       AND jsonb_typeof(NEW.data -> 'receiver') = 'string'
       AND (NEW.data ->> 'receiver') ~ '{msisdn}'
       AND jsonb_typeof(NEW.data -> 'message') = 'string'
       AND btrim(NEW.data ->> 'message', {ws}) <> ''
       AND NOT NEW.data ? 'expiration'
       AND pg_column_size(NEW.data) * 6 <= outbox.message_data_size()
       AND NOT jsonb_path_exists(NEW.data, 'lax $.* ? (@.type() != "string" && @.type() != "boolean" && @.type() != "null")', '{}', true)
       AND {available_at} AND {created_at}
       AND NEW.expires_at IS NULL AND NEW.sent_at IS NULL
       AND (NEW.dedup_key IS NULL OR NEW.dedup_key <> '')
       AND (NEW.priority IS NULL OR NEW.priority BETWEEN 0 AND 9)
       AND NEW.ordering_key IS NULL THEN
        IF NEW.priority IS NULL THEN
            NEW.priority := outbox.default_priority('send-sms');
        END IF;
        IF pg_notify('outbox_message', '') IS NULL THEN
            NULL;
        END IF;
        RETURN NEW;
    END IF;
    RETURN outbox.check_message_fully(NEW, TG_OP);
END
$$;

CREATE OR REPLACE FUNCTION outbox.check_message_fully(NEW outbox.message, op text) RETURNS outbox.message
LANGUAGE plpgsql AS $$
DECLARE
    d        jsonb := NEW.data;
    cmd      text := NEW.command;
    rcv      text;
    rule     text;
    exp_num  numeric;
BEGIN
    IF cmd IS NULL THEN
        PERFORM outbox.refuse_null('message_command_not_null', 'command');
    END IF;
    IF cmd NOT IN ('send-sms', 'send-email', 'block-msisdn', 'unblock-msisdn', 'create-otp') THEN
        cmd := outbox.canonical_command(cmd, d);
        NEW.command := cmd;
    END IF;
    IF d IS NULL THEN
        PERFORM outbox.refuse_null('message_data_not_null', 'data');
    END IF;

    -- data as a whole: its type, then its size, cheaply first (a document stored in over
    -- eight times the limit is over the limit as text: jsonb's binary form is never more than
    -- about five times its text), its depth, its exact size, its numbers.
    rule := coalesce(
        CASE WHEN jsonb_typeof(d) <> 'object' THEN 'message_data_object' END,
        CASE WHEN pg_column_size(d) > 8 * outbox.message_data_size() THEN 'message_data_size' END,
        CASE WHEN jsonb_path_exists(d, 'strict $.**{64}') THEN 'message_data_depth' END,
        CASE WHEN octet_length(d::text) > outbox.message_data_size() THEN 'message_data_size' END,
        CASE WHEN jsonb_path_exists(d, 'strict $.** ? (@.type() == "number" && (@ > 9223372036854775807 || @ < -9223372036854775808 || (@ != 0 && @ < 1e-300 && @ > -1e-300)))')
                  OR (jsonb_path_exists(d, 'strict $.** ? (@.type() == "number" && @.floor() != @)')
                      AND NOT outbox.fractions_survive_doubles(d))
             THEN 'message_data_number' END);
    IF rule IS NOT NULL THEN
        PERFORM outbox.refuse(rule, outbox.rule_message(rule, cmd));
    END IF;

    -- Every command rule in one expression: each PL/pgSQL statement costs, a CASE inside one
    -- does not. The first rule that fails names the error. The receiver is read trimmed.
    rcv := CASE WHEN jsonb_typeof(d -> 'receiver') = 'string'
                THEN outbox.canonical_receiver(d ->> 'receiver') END;
    rule := coalesce(
        CASE WHEN rcv IS NULL OR rcv = '' THEN 'message_receiver_present' END,
        CASE cmd
            WHEN 'send-email' THEN
                CASE WHEN rcv !~ '{email}' THEN 'message_receiver_email' END
            WHEN 'create-otp' THEN
                CASE WHEN rcv !~ '{msisdn}' AND rcv !~ '{email}' THEN 'message_receiver_otp' END
            ELSE
                CASE WHEN rcv !~ '{msisdn}' THEN 'message_receiver_msisdn' END
        END,
        CASE WHEN cmd IN ('send-sms', 'send-email', 'create-otp')
                  AND (jsonb_typeof(d -> 'message') IS DISTINCT FROM 'string'
                       OR btrim(d ->> 'message', {ws}) = '')
             THEN 'message_text_present' END,
        CASE WHEN cmd = 'create-otp'
                  AND ((length(replace(d ->> 'message', '%%', ''))
                        - length(replace(replace(d ->> 'message', '%%', ''), '%s', ''))) / 2 <> 1
                       OR strpos(replace(replace(d ->> 'message', '%%', ''), '%s', ''), '%') > 0)
             THEN 'message_otp_template' END,
        CASE WHEN cmd = 'create-otp'
                  AND (coalesce(jsonb_typeof(d -> 'reference'), 'null') NOT IN ('string', 'number')
                       OR btrim(d ->> 'reference', {ws}) = '')
             THEN 'message_otp_reference' END);
    IF rule IS NOT NULL THEN
        PERFORM outbox.refuse(rule, outbox.rule_message(rule, cmd));
    END IF;

    IF coalesce(jsonb_typeof(d -> 'expiration'), 'null') <> 'null' THEN
        -- Read as an exact decimal: a string only in plain notation (the exponent has at most
        -- three digits, so the cast cannot overflow), a number as it is.
        exp_num := CASE jsonb_typeof(d -> 'expiration')
            WHEN 'number' THEN (d -> 'expiration')::numeric
            WHEN 'string' THEN CASE WHEN btrim(d ->> 'expiration', {ws}) ~ '{number_text}'
                                    THEN btrim(d ->> 'expiration', {ws})::numeric END
        END;
        rule := CASE
            WHEN exp_num IS NULL THEN 'message_expiration_number'
            WHEN exp_num >= 100000000000 THEN 'message_expiration_seconds'
            WHEN op = 'INSERT' AND exp_num <= extract(epoch FROM clock_timestamp())
                THEN 'message_expiration_future'
        END;
        IF rule IS NOT NULL THEN
            PERFORM outbox.refuse(rule, outbox.rule_message(rule, cmd));
        END IF;
        NEW.expires_at := CASE WHEN exp_num < 0 THEN '-infinity'::timestamptz
                               ELSE to_timestamp(exp_num::float8) END;
    END IF;

    -- A priority left out takes the command's default (migration 0007), before the rules
    -- on the other columns look at it.
    IF NEW.priority IS NULL THEN
        NEW.priority := outbox.default_priority(cmd);
    END IF;
    rule := coalesce(outbox.row_rule(NEW),
                     CASE WHEN op = 'INSERT' AND NEW.state <> 'pending' THEN 'message_state_new' END);
    IF rule IS NOT NULL THEN
        PERFORM outbox.refuse_rule(rule, cmd);
    END IF;
    IF rcv IS DISTINCT FROM d ->> 'receiver' THEN
        NEW.data := jsonb_set(d, '{receiver}', to_jsonb(rcv));
    END IF;
    IF NEW.ordering_key IS NULL AND cmd IN ('block-msisdn', 'unblock-msisdn') THEN
        NEW.ordering_key := 'msisdn:' || ltrim(rcv, '+');
    ELSIF btrim(NEW.ordering_key) = '' THEN
        NEW.ordering_key := NULL;
    END IF;

    IF op = 'INSERT' THEN
        -- A condition is evaluated as a simple expression; PERFORM would plan and run a query.
        -- Postgres folds the identical notifications of a transaction and sends them at
        -- commit, so a rolled-back INSERT wakes nobody.
        IF pg_notify('outbox_message', '') IS NULL THEN
            NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
""".replace("{ws}", WS_LITERAL).replace("{msisdn}", MSISDN).replace("{email}", EMAIL).replace(
    "{number_text}", NUMBER_TEXT).replace("{available_at}", in_range("NEW.available_at")).replace(
    "{created_at}", in_range("NEW.created_at"))

# Every UPDATE (the relay's, an operator's) pays the WHEN clause only, unless a value it
# writes is wrong. Only the columns an UPDATE changes are judged: a row from before this
# migration may hold an infinite time or an empty dedup key, and the relay must still be able
# to claim it and end it.
def _unchanged_or(column: str, condition: str) -> str:
    return f"(NEW.{column} IS NOT DISTINCT FROM OLD.{column} OR {condition})"


def guard_trigger(term: Callable[[str, str], str]) -> str:
    """The guard trigger, each column's rule joined with "unchanged" by ``term`` (0014
    writes the same rules in a cheaper order)."""
    return f"""CREATE TRIGGER message_state_guard BEFORE UPDATE ON outbox.message
    FOR EACH ROW WHEN (({term("command", "NEW.command IS NOT NULL")}
                        AND {term("data", "NEW.data IS NOT NULL")}
                        AND {term("state", f"NEW.state IN {STATES}")}
                        -- over a million only by the relay's own increments of one
                        AND {term("attempts", "NEW.attempts BETWEEN 0 AND 1000000 OR NEW.attempts BETWEEN 0 AND OLD.attempts + 1")}
                        AND {term("priority", "NEW.priority BETWEEN 0 AND 9")}
                        AND {term("available_at", in_range("NEW.available_at"))}
                        AND {term("created_at", in_range("NEW.created_at"))}
                        AND {term("expires_at", "NEW.expires_at IS NULL OR " + in_range("NEW.expires_at"))}
                        AND {term("sent_at", "NEW.sent_at IS NULL OR " + in_range("NEW.sent_at"))}
                        AND {term("dedup_key", "NEW.dedup_key <> ''")}) IS NOT TRUE)
    EXECUTE FUNCTION outbox.check_message_state();
"""


ROW_GUARD = f"""
DROP TRIGGER message_state_guard ON outbox.message;

CREATE OR REPLACE FUNCTION outbox.check_message_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    m outbox.message := NEW;
BEGIN
    -- what the UPDATE left as it was is not its fault: judged as fine
    IF m.command IS NOT DISTINCT FROM OLD.command THEN m.command := 'send-sms'; END IF;
    IF m.data IS NOT DISTINCT FROM OLD.data THEN m.data := '{{}}'; END IF;
    IF m.state IS NOT DISTINCT FROM OLD.state THEN m.state := 'pending'; END IF;
    IF m.attempts IS NOT DISTINCT FROM OLD.attempts THEN m.attempts := 0; END IF;
    IF m.priority IS NOT DISTINCT FROM OLD.priority THEN m.priority := 5; END IF;
    IF m.available_at IS NOT DISTINCT FROM OLD.available_at THEN m.available_at := now(); END IF;
    IF m.created_at IS NOT DISTINCT FROM OLD.created_at THEN m.created_at := now(); END IF;
    IF m.expires_at IS NOT DISTINCT FROM OLD.expires_at THEN m.expires_at := NULL; END IF;
    IF m.sent_at IS NOT DISTINCT FROM OLD.sent_at THEN m.sent_at := NULL; END IF;
    IF m.dedup_key IS NOT DISTINCT FROM OLD.dedup_key THEN m.dedup_key := NULL; END IF;
    IF m.attempts > 1000000 AND m.attempts <= OLD.attempts + 1 THEN
        m.attempts := 0;  -- the relay's own increment
    END IF;
    PERFORM outbox.refuse_rule(outbox.row_rule(m), NEW.command);
    RETURN NEW;
END
$$;

{guard_trigger(_unchanged_or)}"""

# Pending rows written before this migration are brought within the new rules, so that the
# relay's own arithmetic on them (attempts + 1, the time until the next row is due) cannot
# fail: a time out of range becomes due now (available_at, created_at), expired at once or
# never (expires_at before 1970 / after 9999), attempts are capped, an empty dedup key is none.
REPAIR = f"""
UPDATE outbox.message SET
    available_at = CASE WHEN {in_range("available_at")} THEN available_at ELSE now() END,
    created_at = CASE WHEN {in_range("created_at")} THEN created_at ELSE now() END,
    expires_at = CASE WHEN expires_at IS NULL OR {in_range("expires_at")} THEN expires_at
                      WHEN expires_at < {LOW} THEN {LOW} END,
    attempts = least(attempts, 1000000),
    dedup_key = nullif(dedup_key, '')
WHERE state = 'pending'
  AND (NOT {in_range("available_at")} OR NOT {in_range("created_at")}
       OR NOT coalesce({in_range("expires_at")}, true) OR attempts > 1000000 OR dedup_key = '');
"""  # noqa: S608 - built from this module's constants

UPGRADE = FUNCTIONS + CHECK_FUNCTION + REPAIR + ROW_GUARD


def downgrade_sql() -> str:
    previous = importlib.import_module("outbox.migrations.versions.0007_claims")
    return (
        previous.RULE_MESSAGE_EXTRA
        + previous._check_functions()
        + previous.STATE_GUARD
        + """
DROP FUNCTION outbox.refuse_rule(text, text);
DROP FUNCTION outbox.row_rule(outbox.message);
DROP FUNCTION outbox.fractions_survive_doubles(jsonb);
DROP FUNCTION outbox.refuse_null(text, text);
DROP FUNCTION outbox.canonical_receiver(text);
DROP FUNCTION outbox.set_message_data_size(integer);
DROP FUNCTION outbox.message_data_size();
""")


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(downgrade_sql())
