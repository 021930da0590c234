"""The SQL behind the operator's console (:mod:`outbox.dashboard`), each statement named for
what it does. The counts per state and route are ``outbox status``'s own
(:mod:`outbox.operations_sql`); these add what a page shows beside them.

==============================  ===================================================
index                           read by
==============================  ===================================================
``message_sent_at``             sent rows per minute, delivery lag
``message_ended``               failed and expired rows per minute and per route
``message_failed_created``      the commonest reasons
``audit_at``                    the newest console actions
==============================  ===================================================

None of them reads sent rows beyond the last hour, so a table of millions of sent rows
costs what the last hour's traffic costs.
"""

from __future__ import annotations

# Minutes start at the server's clock, so a browser with a wrong clock still sees the last
# hour. Sent rows count by ``sent_at``. A failed or expired row has no time of its own for
# when it ended: it counts by ``available_at``, when its last attempt was due, which the
# relay reaches within its claim lag (the index ``message_ended`` serves it). The bounds are
# written out rather than computed once in a CTE, so that the planner sees them and
# estimates the rows of the last hour, not a third of the table.
OUTCOMES_PER_MINUTE = """
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
                           date_trunc('minute', now()), interval '1 minute') AS minute
),
sent AS (
    SELECT date_trunc('minute', sent_at) AS minute, count(*)::bigint AS sent
    FROM outbox.message
    WHERE state = 'sent'
      AND sent_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
    GROUP BY 1
),
ended AS (
    SELECT date_trunc('minute', available_at) AS minute,
           count(*) FILTER (WHERE state = 'failed')::bigint AS failed,
           count(*) FILTER (WHERE state = 'expired')::bigint AS expired
    FROM outbox.message
    WHERE state IN ('failed', 'expired')
      AND available_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
      AND available_at <= now()
    GROUP BY 1
)
SELECT minutes.minute, coalesce(sent.sent, 0), coalesce(ended.failed, 0),
       coalesce(ended.expired, 0)
FROM minutes
LEFT JOIN sent USING (minute)
LEFT JOIN ended USING (minute)
ORDER BY minutes.minute
"""

# From creation to the transport's confirmation, as the relay's histogram
# ``outbox_delivery_lag_seconds`` measures it, over the newest sent rows of the window (at
# most %(cap)s of them, as ``outbox status`` bounds its rate).
DELIVERY_LAG = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag)::float8,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag)::float8,
       count(*)::bigint
FROM (SELECT greatest(extract(epoch FROM sent_at - created_at), 0) AS lag
      FROM outbox.message
      WHERE state = 'sent' AND sent_at > now() - make_interval(secs => %(window)s)
      ORDER BY sent_at DESC
      LIMIT %(cap)s) AS recent
"""

# Failed and expired rows by their own route and command (the caller resolves a null route,
# as for pending rows). ``state IN ('failed', 'expired')`` is the predicate of
# ``message_ended`` alone, which carries route and command: an index-only scan. Asked for
# failed rows alone, the planner takes ``message_failed_created`` and visits the page of
# every failed row (spread over the whole table: 250 ms for 50,000 of them among 10 million).
ENDED_BY_ROUTE = """
SELECT route, command, state, count(*)::bigint
FROM outbox.message
WHERE state IN ('failed', 'expired')
GROUP BY route, command, state
"""

# The commonest reasons, cut to the length a filter box shows; the caller masks them.
COMMON_FAILURE_REASONS = """
SELECT left(coalesce(last_error, ''), %(width)s) AS reason, count(*)::bigint
FROM outbox.message
WHERE state = 'failed'
GROUP BY 1
ORDER BY 2 DESC, 1
LIMIT %(limit)s
"""

# Which member of the failover pools delivered the newest sent rows (the same window and cap
# as the send rate), and when each last did: the member that delivered last is the one
# serving now. Rows of plain routes have no served_by.
RECENT_DELIVERIES_BY_MEMBER = """
SELECT served_by, count(*)::bigint, max(sent_at)
FROM (SELECT served_by, sent_at
      FROM outbox.message
      WHERE state = 'sent' AND sent_at > now() - make_interval(secs => %(window)s)
      ORDER BY sent_at DESC
      LIMIT %(cap)s) AS recent
WHERE served_by IS NOT NULL
GROUP BY served_by
"""

# One row in any state, without its texts: only the receiver (masked by the caller) and the
# names of the data fields leave the database.
ROW_DETAIL = """
SELECT id, command, route, state, data ->> 'receiver', attempts, created_at, available_at,
       expires_at, sent_at, last_error, dedup_key,
       ARRAY(SELECT jsonb_object_keys(data) ORDER BY 1)
FROM outbox.message
WHERE id = %(id)s
"""

# Short statements over few rows: compiling them (JIT, on by default for plans that look
# expensive, as a large last hour makes them look) costs more than running them (measured:
# 450 ms of compilation for a 45 ms query on a 10-million-row table).
WITHOUT_JIT = "SET LOCAL jit = off"

# --- the audit trail -----------------------------------------------------------------------

RECORD_ACTION = """
INSERT INTO outbox.audit (actor, action, rows, filter, source)
VALUES (%(actor)s, %(action)s, %(rows)s, %(filter)s, %(source)s)
RETURNING id, at
"""

RECENT_ACTIONS = """
SELECT id, at, actor, action, rows, filter, source
FROM outbox.audit
ORDER BY at DESC, id DESC
LIMIT %(limit)s
"""

FIND_ACTION = """
SELECT id, at, actor, action, rows, filter, source
FROM outbox.audit
WHERE id = %(id)s
"""

__all__ = [
    "COMMON_FAILURE_REASONS",
    "DELIVERY_LAG",
    "ENDED_BY_ROUTE",
        "FIND_ACTION",
    "OUTCOMES_PER_MINUTE",
    "RECENT_ACTIONS",
    "RECENT_DELIVERIES_BY_MEMBER",
    "RECORD_ACTION",
    "ROW_DETAIL",
    "WITHOUT_JIT",
]
