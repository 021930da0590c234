"""Every SQL statement the operator tools run, each named for what it does.

The relay's own statements live in :mod:`outbox.store`; these serve ``outbox status``, the
failed-row commands (:mod:`outbox.admin`), retention (:mod:`outbox.retention`), the metrics
sampler and the health checks. Each one reads through a partial index or the statistics, so
none of them gets slower as sent rows pile up:

==============================  ===================================================
index                           read by
==============================  ===================================================
``message_claim``               pending rows per route and priority, oldest pending age
``message_claimed``             rows leased to each relay, leases that ran out
``message_ordering``            ordering keys held back by a retry
``message_failed_created``      failed counts, listing, retry, discard, failed purge
``message_terminal_created``    purge of sent and expired rows
``message_sent_at``             the rate of the last minutes
==============================  ===================================================

Statements that work through many rows take at most ``%(limit)s`` rows per transaction and
walk their index with a keyset (``created_at``, ``id``), so a run never holds more than one
small batch of row locks and never revisits a row.
"""

# Statements are assembled from the constants below when the module loads; every value
# travels as a query parameter.
# ruff: noqa: S608

from __future__ import annotations

CHANNEL = "outbox_message"

# --- status and metrics ------------------------------------------------------------------

# Pending rows by their own route and command: the caller resolves a null route to the
# command's configured one. Reads only pending rows (the claim index).
PENDING_BY_ROUTE = """
SELECT route, command,
       count(*)::bigint,
       count(*) FILTER (WHERE available_at <= now())::bigint,
       count(*) FILTER (WHERE attempts > 0)::bigint,
       extract(epoch FROM now() - min(created_at))::float8
FROM outbox.message
WHERE state = 'pending'
GROUP BY route, command
"""

COUNT_FAILED = "SELECT count(*)::bigint FROM outbox.message WHERE state = 'failed'"

# Pending rows by priority (0 most urgent): reads the pending rows as PENDING_BY_ROUTE does.
PENDING_BY_PRIORITY = """
SELECT priority, count(*)::bigint
FROM outbox.message
WHERE state = 'pending'
GROUP BY priority
ORDER BY priority
"""

# Rows leased to each relay (``claimed_by`` is ``host:pid``), and those whose lease ran out
# without a record: the relay froze, crashed or lost the database, and any relay may take
# them. Reads the small partial index of claimed rows.
CLAIMS_BY_RELAY = """
SELECT claimed_by,
       count(*)::bigint,
       count(*) FILTER (WHERE available_at <= now())::bigint,
       extract(epoch FROM max(now() - available_at))::float8
FROM outbox.message
WHERE state = 'pending' AND claim IS NOT NULL
GROUP BY claimed_by
ORDER BY claimed_by
"""

# Ordering keys whose first pending row waits out a retry, and the rows held behind them.
HELD_ORDERING_KEYS = """
SELECT count(*)::bigint, coalesce(sum(behind), 0)::bigint
FROM (
    SELECT (SELECT count(*) FROM outbox.message AS b
            WHERE b.ordering_key = h.ordering_key AND b.state = 'pending' AND b.id > h.id
           ) AS behind
    FROM outbox.message AS h
    WHERE h.state = 'pending' AND h.ordering_key IS NOT NULL AND h.attempts > 0
      AND h.available_at > now() AND h.claim IS NULL
      AND NOT EXISTS (SELECT 1 FROM outbox.message AS e
                      WHERE e.ordering_key = h.ordering_key AND e.state = 'pending'
                        AND e.id < h.id)
) AS keys
WHERE behind > 0
"""

# The planner's own estimate: rows per page at the last VACUUM/ANALYZE times the pages the
# table has now, split by the state column's most-common-value frequencies. ``relpages``
# sizes the table so that a small one can be counted exactly instead.
ESTIMATE_STATES = """
SELECT c.reltuples::float8,
       c.relpages::bigint,
       (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint,
       s.most_common_vals::text::text[],
       s.most_common_freqs::float8[]
FROM pg_class AS c
LEFT JOIN pg_stats AS s
       ON s.schemaname = 'outbox' AND s.tablename = 'message' AND s.attname = 'state'
WHERE c.oid = 'outbox.message'::regclass
"""

COUNT_TERMINAL_EXACTLY = """
SELECT count(*) FILTER (WHERE state = 'sent')::bigint,
       count(*) FILTER (WHERE state = 'expired')::bigint
FROM outbox.message
WHERE state IN ('sent', 'expired')
"""

# The newest sent rows within the window, at most %(cap)s of them: the cost is bounded
# however fast the relay sends. When the cap is reached the rate is taken over the shorter
# span those rows cover.
RECENT_SENT = """
SELECT count(*)::bigint, extract(epoch FROM now() - min(sent_at))::float8
FROM (SELECT sent_at
      FROM outbox.message
      WHERE state = 'sent' AND sent_at > now() - make_interval(secs => %(window)s)
      ORDER BY sent_at DESC
      LIMIT %(cap)s) AS recent
"""

# Which failover-pool member delivered the same newest sent rows (rows of plain routes
# have no served_by and are left out).
RECENT_SENT_BY_MEMBER = """
SELECT served_by, count(*)::bigint
FROM (SELECT served_by
      FROM outbox.message
      WHERE state = 'sent' AND sent_at > now() - make_interval(secs => %(window)s)
      ORDER BY sent_at DESC
      LIMIT %(cap)s) AS recent
WHERE served_by IS NOT NULL
GROUP BY served_by
ORDER BY served_by
"""

SERVER_NOW = "SELECT now()"

# Size and dead rows from the statistics collector: is autovacuum keeping up?
TABLE_HEALTH = """
SELECT pg_total_relation_size(s.relid)::bigint,
       s.n_live_tup::bigint,
       s.n_dead_tup::bigint,
       extract(epoch FROM now() - greatest(s.last_vacuum, s.last_autovacuum))::float8
FROM pg_stat_user_tables AS s
WHERE s.relid = 'outbox.message'::regclass
"""

# --- failed rows -------------------------------------------------------------------------

# One filter for every failed-row statement. A null parameter switches its condition off.
# ``route`` matches a row's effective route: its own, or for a row without one, the route
# its command is configured to (``route_commands``: the commands that resolve to it).
_FAILED_MATCH = """
state = 'failed'
AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
AND (%(command)s::text IS NULL OR command = %(command)s::text)
AND (%(route)s::text IS NULL
     OR route = %(route)s::text
     OR (route IS NULL AND command = ANY(%(route_commands)s::text[])))
AND (%(older_than)s::float8 IS NULL
     OR created_at < now() - make_interval(secs => %(older_than)s::float8))
AND (%(newer_than)s::float8 IS NULL
     OR created_at >= now() - make_interval(secs => %(newer_than)s::float8))
AND (%(reason)s::text IS NULL OR strpos(lower(last_error), lower(%(reason)s::text)) > 0)
"""

COUNT_FAILED_MATCHING = f"SELECT count(*)::bigint FROM outbox.message WHERE {_FAILED_MATCH}"

LIST_FAILED = f"""
SELECT id, command, route, data ->> 'receiver', attempts, created_at, expires_at, last_error
FROM outbox.message
WHERE {_FAILED_MATCH}
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

# The next batch after the keyset (after_created, after_id), locked; rows another session
# holds are skipped rather than waited for.
_PICK_FAILED_BATCH = f"""
picked AS (
    SELECT id, created_at
    FROM outbox.message
    WHERE {_FAILED_MATCH}
      AND created_at >= %(after_created)s::timestamptz
      AND (created_at > %(after_created)s::timestamptz OR id > %(after_id)s::bigint)
    ORDER BY created_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
"""

_BATCH_RESULT = """
SELECT (SELECT count(*) FROM done)::bigint, last.created_at, last.id
FROM (SELECT created_at, id FROM picked ORDER BY created_at DESC, id DESC LIMIT 1) AS last
"""

# Back to pending with a fresh start: attempts 0, due now. The id stays, so consumers that
# saw an earlier attempt still recognise the repeat.
RETRY_FAILED_BATCH = f"""
WITH {_PICK_FAILED_BATCH},
done AS (
    UPDATE outbox.message AS m
    SET state = 'pending', attempts = 0, available_at = now(), last_error = NULL
    FROM picked
    WHERE m.id = picked.id
    RETURNING m.id
)
{_BATCH_RESULT}
"""

DISCARD_FAILED_BATCH = f"""
WITH {_PICK_FAILED_BATCH},
done AS (
    DELETE FROM outbox.message AS m
    USING picked
    WHERE m.id = picked.id
    RETURNING m.id
)
{_BATCH_RESULT}
"""

# Wakes the relays (their LISTEN) when the transaction commits, as an INSERT does.
WAKE_RELAYS = "SELECT pg_notify(%s, '')"

# --- retention ---------------------------------------------------------------------------

# One relay at a time purges: the others find the lock taken and skip their turn. A session
# lock on the purging connection, released at the end of the run or when it drops.
TRY_RETENTION_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('outbox.retention', 0))"
RELEASE_RETENTION_LOCK = "SELECT pg_advisory_unlock(hashtextextended('outbox.retention', 0))"

# Rows older than %(cutoff)s in the given terminal states, oldest first, from the keyset on.
# The keyset lets each batch start where the last one stopped instead of stepping again over
# the index entries of rows just deleted (dead until VACUUM comes by).
_PURGE_BATCH = """
WITH picked AS (
    SELECT id, created_at
    FROM outbox.message
    WHERE {states}
      AND created_at < %(cutoff)s::timestamptz
      AND created_at >= %(after_created)s::timestamptz
    ORDER BY created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
done AS (
    DELETE FROM outbox.message AS m
    USING picked
    WHERE m.id = picked.id
    RETURNING m.state
)
SELECT (SELECT count(*) FILTER (WHERE state = 'sent') FROM done)::bigint,
       (SELECT count(*) FILTER (WHERE state = 'expired') FROM done)::bigint,
       (SELECT count(*) FILTER (WHERE state = 'failed') FROM done)::bigint,
       (SELECT max(created_at) FROM picked)
"""

PURGE_TERMINAL_BATCH = _PURGE_BATCH.format(states="state IN ('sent', 'expired')")

# Managed OTPs that expired longer than the sent retention ago: no validation can succeed any
# more (it answered 1203 "expired"; once purged it answers 1202 "unknown reference").
PURGE_OTP_BATCH = """
WITH picked AS (
    SELECT reference
    FROM outbox.otp
    WHERE expires_at < %(cutoff)s::timestamptz
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox.otp AS o
USING picked
WHERE o.reference = picked.reference
"""
PURGE_FAILED_BATCH = _PURGE_BATCH.format(states="state = 'failed'")

# Places in receivers' limit windows (outbox.receiver_window) older than every window: they
# count for nothing any more.
PURGE_RECEIVER_WINDOW_BATCH = """
DELETE FROM outbox.receiver_window AS w
USING (SELECT message_id FROM outbox.receiver_window
       WHERE taken_at < now() - make_interval(secs => %(keep)s)
       ORDER BY taken_at
       LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED) AS picked
WHERE w.message_id = picked.message_id
"""

# Whether autovacuum looks after the table (the server setting and the table's own), and how
# many dead rows it carries: when nobody vacuums, the purger does (see outbox.retention).
AUTOVACUUM_STATE = """
SELECT current_setting('autovacuum')::boolean
       AND coalesce((SELECT option_value FROM pg_options_to_table(c.reloptions)
                     WHERE option_name = 'autovacuum_enabled'), 'true')::boolean,
       s.n_live_tup::bigint,
       s.n_dead_tup::bigint
FROM pg_class AS c
JOIN pg_stat_user_tables AS s ON s.relid = c.oid
WHERE c.oid = 'outbox.message'::regclass
"""

# Not FULL: it takes no lock that blocks reads or writes, and makes the dead rows' space
# reusable rather than returning it to the operating system.
VACUUM_TABLE = "VACUUM (ANALYZE) outbox.message"

# What a purge would remove, for ``--dry-run``.
COUNT_PURGEABLE = """
SELECT count(*) FILTER (WHERE state = 'sent'
                          AND created_at < now() - make_interval(secs => %(sent)s))::bigint,
       count(*) FILTER (WHERE state = 'expired'
                          AND created_at < now() - make_interval(secs => %(sent)s))::bigint,
       count(*) FILTER (WHERE state = 'failed'
                          AND created_at < now() - make_interval(secs => %(failed)s))::bigint
FROM outbox.message
WHERE (state IN ('sent', 'expired') AND created_at < now() - make_interval(secs => %(sent)s))
   OR (state = 'failed' AND created_at < now() - make_interval(secs => %(failed)s))
"""

PURGE_CUTOFFS = """
SELECT now() - make_interval(secs => %(sent)s), now() - make_interval(secs => %(failed)s)
"""

# --- health ------------------------------------------------------------------------------

PING = "SELECT 1"

__all__ = [
    "AUTOVACUUM_STATE",
    "CHANNEL",
    "COUNT_FAILED",
    "COUNT_FAILED_MATCHING",
    "COUNT_PURGEABLE",
    "COUNT_TERMINAL_EXACTLY",
    "DISCARD_FAILED_BATCH",
    "ESTIMATE_STATES",
    "LIST_FAILED",
    "PENDING_BY_ROUTE",
    "PING",
    "PURGE_CUTOFFS",
    "PURGE_FAILED_BATCH",
    "PURGE_OTP_BATCH",
    "PURGE_RECEIVER_WINDOW_BATCH",
    "PURGE_TERMINAL_BATCH",
    "RECENT_SENT",
    "RECENT_SENT_BY_MEMBER",
    "RELEASE_RETENTION_LOCK",
    "RETRY_FAILED_BATCH",
    "SERVER_NOW",
    "TABLE_HEALTH",
    "TRY_RETENTION_LOCK",
    "VACUUM_TABLE",
    "WAKE_RELAYS",
]
