"""Every SQL statement the relay runs, each named for what it does.

Every claim takes row locks first (``claim_locked``). Rows that publish within about a
second stay locked by that one short transaction, which publishes and records them; any more
take a lease before it commits, and are then worked in two short transactions per chunk::

    with store.transaction() as tx:          # 1. claim: lock up to n rows, lease them, commit
        rows = tx.claim_locked(request)
        tx.lease(rows, request)              #    (a rate-limited lane: tx.claim(request))
    ... publish, outside any transaction ...
    with store.transaction() as tx:          # 2. record, only where the row still holds
        tx.mark_sent(ids, claim)              #    this claim
        tx.schedule_retry(rows, claim)
        tx.mark_failed(rows, claim)
        tx.hand_back(rows, claim)             # claimed, not tried: back in its place

The rules that shape the claim, written down once:

- **Lanes.** Every row belongs to the lane of its route, keyed by
  ``outbox.lane_key(route, command)``: its own route trimmed, or ``@command`` when it names
  none. A relay lane (one transport, fan-out or pool) claims only its own keys, through the
  index ``message_claim (lane_key, priority, available_at, id) WHERE state = 'pending'``, so a
  backlog in one lane costs another lane nothing.
- **Priority and aging.** Among due rows, the lowest ``available_at + priority * aging``
  first (priority 0 is the most urgent; ``aging`` is ``OUTBOX_PRIORITY_AGING`` seconds per
  level). The claim reads the first ``n`` rows of each (key, priority) class from the index in
  ``available_at`` order and keeps the best ``n`` overall: within a class that order is the
  rank's, so the best ``n`` are always among them.
- **Ordering keys.** A row with an ``ordering_key`` is claimable only when no pending row
  with the same key and a smaller id exists (leased, waiting to retry or scheduled later):
  rows of one key go out one at a time in id order; other keys are not held back.
- **Leases.** The claim sets ``claimed_by`` (the relay), ``claim`` (a random id per claim)
  and ``available_at = now() + lease``; it returns the row's previous ``available_at`` so
  that rows handed back keep their place. A lease that runs out makes the row due again for
  any relay; a heartbeat extends the leases of claims still being published
  (``extend_leases``). Every record statement matches ``claim``: a relay whose lease ran out
  and was taken over can never overwrite what the new holder recorded.
- ``FOR UPDATE SKIP LOCKED`` keeps concurrent claimers of one lane from waiting on each other;
  the locks last only as long as the claim's own short transaction.

A crash after the claim leaves the rows leased until the lease runs out; then they are
published again (at-least-once). The row id on the wire lets consumers drop the repeat.
"""

# The claim statements are assembled from the constants below when the module loads; every
# value travels as a query parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import orjson
import psycopg
from psycopg.types.json import Jsonb, set_json_loads

CHANNEL = "outbox_message"

#: priorities run from 0 (most urgent) to this
LOWEST_PRIORITY = 9

# The two sources of a claim, the same for both kinds of claim. ``expired``: rows whose lease
# ran out without a record (their relay froze, died or lost the database); they were at the
# head of the queue when they were claimed, so they go first, before the rows ranked by the
# index. ``fresh``: the first rows of each (lane key, priority) class, in the order of the
# index, without a lease; the best of them by rank. Both skip rows another claim is locking.
#
# Both are subqueries in FROM, not WITH queries: Postgres materialises every WITH query that
# locks rows (it counts FOR UPDATE as a side effect), and copying each claimed row, data and
# all, into a tuplestore and out again cost 1.5-2 us a row of a broker's claim (a fifth of
# the claim's time on the server).
_EXPIRED = """
    SELECT m.id, m.command, m.data, m.route, m.attempts, m.created_at, m.expires_at,
           m.available_at, '-infinity'::float8 AS rank
    FROM outbox.message AS m
    WHERE m.state = 'pending' AND m.claim IS NOT NULL AND m.available_at <= now()
      AND outbox.lane_key(m.route, m.command) = ANY(%(keys)s::text[])
      AND m.priority <= %(max_priority)s::int
      AND (m.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM outbox.message AS e
            WHERE e.ordering_key = m.ordering_key AND e.state = 'pending' AND e.id < m.id))
    ORDER BY m.available_at, m.id
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED"""

# One index descent per lane key: a key with no pending row (most of a lane's keys, the
# commands nobody sends without a route) is skipped before its ten priority classes are
# probed. A lateral subquery with LIMIT, not EXISTS: Postgres may turn an EXISTS into a semi
# join over the whole index. For a trickle (a row or two per claim) the claim and next_due
# probed 60 classes each time, most of their cost.
_ANY_PENDING = """
        SELECT 1 FROM outbox.message AS x
        WHERE x.state = 'pending' AND outbox.lane_key(x.route, x.command) = k.key
        LIMIT 1"""

_FRESH = """
    SELECT c.id, c.command, c.data, c.route, c.attempts, c.created_at, c.expires_at,
           c.available_at,
           extract(epoch FROM c.available_at) + c.priority * %(aging)s::float8 AS rank
    FROM unnest(%(keys)s::text[]) AS k(key)
    CROSS JOIN LATERAL (""" + _ANY_PENDING + """) AS present
    CROSS JOIN generate_series(0, %(max_priority)s::int) AS p(priority)
    CROSS JOIN LATERAL (
        SELECT m.id, m.command, m.data, m.route, m.attempts, m.created_at, m.expires_at,
               m.available_at, m.priority
        FROM outbox.message AS m
        WHERE m.state = 'pending'
          AND outbox.lane_key(m.route, m.command) = k.key
          AND m.priority = p.priority
          AND m.available_at <= now()
          AND m.claim IS NULL
          AND (m.ordering_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM outbox.message AS e
                WHERE e.ordering_key = m.ordering_key AND e.state = 'pending' AND e.id < m.id))
        ORDER BY m.available_at, m.id
        LIMIT %(limit)s
        FOR UPDATE OF m SKIP LOCKED) AS c"""

# The best ``limit`` rows of both sources, in claim order.
_PICKED = """
    SELECT *
    FROM (""" + _EXPIRED + """
          ) AS expired
    UNION ALL
    SELECT *
    FROM (""" + _FRESH + """
          ) AS fresh
    ORDER BY rank, id
    LIMIT %(limit)s"""

CLAIM = """
WITH picked AS (""" + _PICKED + """
), claimed AS (
    UPDATE outbox.message AS m
    SET available_at = now() + %(lease)s * interval '1 second',
        claimed_by = %(owner)s, claim = %(claim)s
    FROM picked
    -- the id list as well as the join: the primary key finds the rows however the planner
    -- sizes the table (on a small one it would rather scan it whole)
    WHERE m.id = picked.id AND m.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING m.id, m.command, m.data, m.route, m.attempts,
              extract(epoch FROM m.created_at)::float8 AS created_at,
              extract(epoch FROM m.expires_at)::float8 AS expires_at,
              extract(epoch FROM picked.available_at)::float8 AS was_available_at,
              picked.rank
)
SELECT id, command, data, route, attempts, created_at, expires_at, was_available_at
FROM claimed
ORDER BY rank, id
"""

# A lane whose whole claim publishes in about a second (a broker) holds no lease: its rows
# stay locked by this transaction, which claims, publishes and records, then commits. The
# lease's two extra row versions would cost more than that second of locking; a frozen
# relay's locks go with its session, ended by idle_in_transaction_session_timeout (set to
# the claim timeout on relay sessions). Same lanes, rank and ordering keys as CLAIM.
CLAIM_LOCKED = """
SELECT id, command, data, route, attempts,
       extract(epoch FROM created_at)::float8,
       extract(epoch FROM expires_at)::float8,
       extract(epoch FROM available_at)::float8  -- its place, should it take a lease (LEASE)
FROM (""" + _PICKED + """
     ) AS picked
ORDER BY rank, id
"""

# Rows claimed by CLAIM_LOCKED that will not publish within a second (a device, a large
# claim of urgent rows) take a lease before their transaction commits: the same rows, the
# same row version as CLAIM writes, and the rows' places kept by the claim's answer.
LEASE = """
UPDATE outbox.message
SET available_at = now() + %(lease)s * interval '1 second', claimed_by = %(owner)s,
    claim = %(claim)s
WHERE id = ANY(%(ids)s)
"""

# The distinct lane keys of pending rows, one index descent each (a loose index scan): the
# relay learns of routes it was not told about (a typo, spaces, a fan-out nobody configured).
PENDING_LANE_KEYS = """
WITH RECURSIVE k(key) AS (
    SELECT min(outbox.lane_key(route, command)) FROM outbox.message WHERE state = 'pending'
    UNION ALL
    SELECT (SELECT min(outbox.lane_key(m.route, m.command)) FROM outbox.message AS m
            WHERE m.state = 'pending' AND outbox.lane_key(m.route, m.command) > k.key)
    FROM k WHERE k.key IS NOT NULL
)
SELECT key FROM k WHERE key IS NOT NULL
"""

# Seconds until the lane's earliest pending row is due (a lease's expiry included).
# The difference of the epochs, not of the timestamps: a row from before migration 0008 may
# be due at '-infinity', and Postgres cannot subtract infinite timestamps.
NEXT_DUE = """
SELECT extract(epoch FROM min(c.available_at))::float8 - extract(epoch FROM now())::float8
FROM unnest(%(keys)s::text[]) AS k(key)
CROSS JOIN LATERAL (""" + _ANY_PENDING + """) AS present
CROSS JOIN generate_series(0, %(max_priority)s::int) AS p(priority)
CROSS JOIN LATERAL (
    SELECT m.available_at FROM outbox.message AS m
    WHERE m.state = 'pending' AND outbox.lane_key(m.route, m.command) = k.key
      AND m.priority = p.priority
    ORDER BY m.available_at
    LIMIT 1) AS c
"""

# Returns the claims that still hold rows: a claim another relay took over (its lease ran
# out while this one was frozen or cut off) is not extended, and must not be trusted again.
EXTEND_LEASES = """
UPDATE outbox.message SET available_at = now() + %(lease)s * interval '1 second'
WHERE claim = ANY(%(claims)s) AND state = 'pending'
RETURNING claim
"""

# Rows of a locked claim carry no lease: the statement of a plain queue.
MARK_SENT_LOCKED = """
UPDATE outbox.message
SET state = 'sent', sent_at = now(), attempts = attempts + 1, last_error = NULL
WHERE id = ANY(%s)
"""

# ``served_by``: the failover pool member that delivered these rows (NULL outside pools);
# set in the same row version as the state, so it costs a pool nothing extra. (A separate
# UPDATE per chunk, tried first, made a pool's drain to stdout 5 to 10 times slower: a
# second row version per row, and a join the planner sized from stale statistics.)
MARK_SENT = """
UPDATE outbox.message
SET state = 'sent', sent_at = now(), attempts = attempts + 1, last_error = NULL,
    claimed_by = NULL, claim = NULL, served_by = %s::text
WHERE id = ANY(%s) AND claim IS NOT DISTINCT FROM %s::bigint AND state = 'pending'
"""

MARK_SENT_BLANKING_TEXTS = """
UPDATE outbox.message
SET state = 'sent', sent_at = now(), attempts = attempts + 1, last_error = NULL,
    claimed_by = NULL, claim = NULL, served_by = %s::text, data = data - 'message' - 'subject'
WHERE id = ANY(%s) AND claim IS NOT DISTINCT FROM %s::bigint AND state = 'pending'
"""

SCHEDULE_RETRY = """
UPDATE outbox.message AS m
SET attempts = m.attempts + 1, available_at = to_timestamp(u.at), last_error = u.reason,
    claimed_by = NULL, claim = NULL
FROM unnest(%s::bigint[], %s::float8[], %s::text[]) AS u(id, at, reason)
WHERE m.id = u.id AND m.claim IS NOT DISTINCT FROM %s::bigint AND m.state = 'pending'
"""

MARK_FAILED = """
UPDATE outbox.message AS m
SET state = 'failed', attempts = m.attempts + u.attempted, last_error = u.reason,
    claimed_by = NULL, claim = NULL
FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS u(id, reason, attempted)
WHERE m.id = u.id AND m.claim IS NOT DISTINCT FROM %s::bigint AND m.state = 'pending'
"""

MARK_EXPIRED = """
UPDATE outbox.message AS m
SET state = 'expired', attempts = m.attempts + u.attempted, last_error = u.reason,
    claimed_by = NULL, claim = NULL
FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS u(id, reason, attempted)
WHERE m.id = u.id AND m.claim IS NOT DISTINCT FROM %s::bigint AND m.state = 'pending'
"""

# An expired row is never published again: its texts can go as a sent row's do. A failed
# row keeps them, since `outbox failed retry` may send it after all.
MARK_EXPIRED_BLANKING_TEXTS = """
UPDATE outbox.message AS m
SET state = 'expired', attempts = m.attempts + u.attempted, last_error = u.reason,
    claimed_by = NULL, claim = NULL, data = m.data - 'message' - 'subject'
FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS u(id, reason, attempted)
WHERE m.id = u.id AND m.claim IS NOT DISTINCT FROM %s::bigint AND m.state = 'pending'
"""

# --- rate limits: one token bucket per rate-limited transport (outbox.rate_bucket) ---------

# Refill since the bucket's clock, capped at the burst: ``scheduling.take_tokens`` in SQL,
# written once here and used in every expression of TAKE_TOKENS (each sees the old row).
# The bucket's clock is the server's: relays on several hosts share it.
_REFILLED = """least(%(burst)s::float8,
      b.tokens + greatest(extract(epoch FROM now()) - b.updated_at, 0) * %(rate)s::float8)"""
_GRANTED = f"greatest(0, least(%(want)s::int, floor({_REFILLED} + 1e-9)::int))"

# Takes up to %(want)s tokens in one atomic statement; the first use creates the bucket full.
# The row stays locked until the claim transaction ends, so every worker of every relay
# takes its tokens one after the other: between them they never get more than
# burst + rate * T tokens in any T seconds. Returns the tokens granted and those left.
TAKE_TOKENS = f"""
INSERT INTO outbox.rate_bucket AS b (transport, tokens, updated_at, granted)
VALUES (%(transport)s,
        %(burst)s::float8 - least(%(want)s::int, %(burst)s::int),
        extract(epoch FROM now()),
        least(%(want)s::int, %(burst)s::int))
ON CONFLICT (transport) DO UPDATE
SET granted = {_GRANTED},
    tokens = greatest({_REFILLED} - {_GRANTED}, 0),
    updated_at = greatest(extract(epoch FROM now()), b.updated_at)
RETURNING granted, tokens
"""

# Tokens taken by a claim that found fewer rows than it had tokens for go back (the bucket
# row is already locked by this transaction).
RETURN_TOKENS = """
UPDATE outbox.rate_bucket
SET tokens = least(%(burst)s::float8, tokens + %(count)s)
WHERE transport = %(transport)s
"""

# --- receiver limits (outbox.receiver_window: keyed digests, never the receiver) ---------

# Claims that look at the same receiver take their turns: a transaction-scoped advisory
# lock per receiver digest, taken in key order so that two claims never deadlock.
LOCK_RECEIVERS = """
SELECT count(pg_advisory_xact_lock(key))
FROM (SELECT DISTINCT key FROM unnest(%s::bigint[]) AS key ORDER BY key) AS ordered
"""

# Places taken in each receiver's window by other messages than those being claimed.
COUNT_RECEIVER_PLACES = """
SELECT q.digest, count(*)::int
FROM unnest(%(digests)s::bytea[], %(windows)s::float8[]) AS q(digest, window_seconds)
JOIN outbox.receiver_window AS w
  ON w.digest = q.digest AND w.taken_at > now() - make_interval(secs => q.window_seconds)
WHERE NOT w.message_id = ANY(%(ids)s::bigint[])
GROUP BY q.digest
"""

# The claimed rows that already hold a place (an earlier attempt took it): a retry is never
# refused by its own earlier attempt.
RECEIVER_PLACES_HELD = """
SELECT message_id FROM outbox.receiver_window WHERE message_id = ANY(%s::bigint[])
"""

TAKE_RECEIVER_PLACES = """
INSERT INTO outbox.receiver_window (message_id, digest)
SELECT * FROM unnest(%s::bigint[], %s::bytea[])
ON CONFLICT (message_id) DO NOTHING
"""

# Claimed but not tried (a stop, a lost lease, a transport that stopped answering): the row
# goes back to where it was in the queue, with its attempts untouched.
HAND_BACK = """
UPDATE outbox.message AS m
SET available_at = to_timestamp(u.was), claimed_by = NULL, claim = NULL
FROM unnest(%s::bigint[], %s::float8[]) AS u(id, was)
WHERE m.id = u.id AND m.claim IS NOT DISTINCT FROM %s::bigint AND m.state = 'pending'
"""

# A transport that was unreachable works again: its rows waiting out their retry backoff (up
# to backoff_max, ten minutes by default) are due now rather than when their timers say.
# Only retries (attempts > 0) that no relay holds: a row an application scheduled for later
# stays scheduled. Lane keys say which rows go to the transport.
RELEASE_RETRIES = """
UPDATE outbox.message AS m SET available_at = now()
WHERE m.id IN (
    SELECT id FROM outbox.message
    WHERE state = 'pending' AND available_at > now() AND attempts > 0 AND claim IS NULL
      AND outbox.lane_key(route, command) = ANY(%(keys)s)
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
"""

# The defaults the schema gives rows inserted without a priority. ``outbox run`` replaces the
# function when its settings name other defaults (OUTBOX_PRIORITY_<COMMAND>); rows already
# in the table keep theirs.
READ_DEFAULT_PRIORITIES = """
SELECT c, outbox.default_priority(c) FROM unnest(%s::text[]) AS c
"""


def define_default_priorities(priorities: dict[str, int]) -> str:
    cases = "\n".join(f"        WHEN '{command}' THEN {int(value)}"
                      for command, value in sorted(priorities.items())
                      if command.replace("-", "").isalpha())
    return f"""
CREATE OR REPLACE FUNCTION outbox.default_priority(command text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (CASE command
{cases}
        ELSE 5 END)::smallint
$$
"""


def apply_default_priorities(connection: psycopg.Connection[Any],
                             priorities: dict[str, int]) -> bool:
    """Make the schema's per-command defaults ``priorities``; True when they changed."""
    with connection.transaction():
        current = dict(connection.execute(READ_DEFAULT_PRIORITIES,
                                          (list(priorities),)).fetchall())
        if all(current.get(command) == value for command, value in priorities.items()):
            return False
        connection.execute(define_default_priorities(priorities).encode())
    return True


INSERT_MESSAGE = """
INSERT INTO outbox.message (command, data, dedup_key, route, available_at, priority,
                            ordering_key, enqueued_by)
VALUES (%s, %s, %s, %s, coalesce(%s, now()), %s, %s, %s)
ON CONFLICT ((outbox.dedup_digest(dedup_key))) WHERE dedup_key IS NOT NULL DO NOTHING
RETURNING id
"""

# Without a dedup key there is nothing to conflict with: a plain INSERT spares the
# speculative insertion ON CONFLICT sets up for every row.
INSERT_MESSAGE_NO_DEDUP = """
INSERT INTO outbox.message (command, data, route, available_at, priority, ordering_key,
                            enqueued_by)
VALUES (%s, %s, %s, coalesce(%s, now()), %s, %s, %s)
RETURNING id
"""

# Through message_dedup_key_unique, which indexes a salted digest of the key (migration
# 0011): a clash never shows the key in the error's DETAIL.
SELECT_ID_BY_DEDUP_KEY = """
SELECT id FROM outbox.message
WHERE outbox.dedup_digest(dedup_key) = outbox.dedup_digest(%(key)s) AND dedup_key = %(key)s
"""

# What the gateway answers a client with, for a row it just enqueued or one a retry with the
# same idempotency key names: the first acceptance, as it was.
SELECT_ACCEPTED = """
SELECT command, data, extract(epoch FROM created_at)::float8, enqueued_by
FROM outbox.message WHERE id = %s
"""

# The configured size limit of data (migration 0013); asked only for data over 1 KiB.
SELECT_DATA_SIZE_LIMIT = "SELECT outbox.message_data_size()"

# --- managed OTPs (outbox.otp: one row per reference, only a keyed hash of the code) ----

FIND_OTP_KEY = """
SELECT key_id FROM outbox.otp WHERE reference = %s AND message_id = %s
"""

# Takes the reference unless another row's OTP for it is still live (not used, not expired,
# its message not failed or expired). A retry of the same row keeps the attempts and the
# use already made. No row returned: the reference is taken (device code 1201).
ISSUE_OTP = """
INSERT INTO outbox.otp AS o (reference, key_id, digest, message_id, expires_at)
VALUES (%s, %s, %s, %s, to_timestamp(%s))
ON CONFLICT (reference) DO UPDATE
SET key_id = excluded.key_id,
    digest = excluded.digest,
    expires_at = excluded.expires_at,
    attempts = CASE WHEN o.message_id = excluded.message_id THEN o.attempts ELSE 0 END,
    used_at = CASE WHEN o.message_id = excluded.message_id THEN o.used_at END,
    created_at = CASE WHEN o.message_id = excluded.message_id THEN o.created_at ELSE now() END,
    message_id = excluded.message_id
WHERE o.message_id = excluded.message_id
   OR o.used_at IS NOT NULL
   OR o.expires_at <= now()
   OR EXISTS (SELECT 1 FROM outbox.message AS m
              WHERE m.id = o.message_id AND m.state IN ('failed', 'expired'))
RETURNING o.message_id
"""

# FOR UPDATE serialises validations of one reference: of two concurrent right answers, the
# second waits and then reads used_at set by the first.
LOCK_OTP = """
SELECT key_id, digest, attempts, used_at IS NOT NULL, expires_at <= now()
FROM outbox.otp
WHERE reference = %s
FOR UPDATE
"""

MARK_OTP_USED = """
UPDATE outbox.otp SET used_at = now() WHERE reference = %s AND used_at IS NULL
RETURNING reference
"""

COUNT_OTP_FAILURE = """
UPDATE outbox.otp SET attempts = attempts + 1 WHERE reference = %s RETURNING attempts
"""


class Undecodable(NamedTuple):
    """A claimed row's ``data`` that no JSON decoder here can read (the relay fails the row,
    naming ``reason``, instead of the whole claim)."""

    reason: str


def tolerant_json_loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Decode a jsonb value: orjson first (fast), then the standard library for what orjson
    refuses (integers beyond 64 bits), else an ``Undecodable``: a value Postgres stored but
    Python cannot read (nesting deeper than its recursion allows) must fail its own row."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except RecursionError:
        return Undecodable("nested too deeply")
    except ValueError as exc:
        return Undecodable(str(exc).split(":")[0])


class ClaimedRow(NamedTuple):
    """One claimed row. A NamedTuple, not a dataclass: it is built for every row the relay
    claims, and a tuple builds four times faster (1.05 µs against 0.24 µs per row)."""

    id: int
    command: str
    #: the row's data, decoded by ``tolerant_json_loads``: an ``Undecodable`` fails that row
    data: Any
    route: str | None
    #: attempts made before this one
    attempts: int
    created_at: float
    expires_at: float | None
    #: ``available_at`` before the lease: where the row goes back to if it is handed back
    was_available_at: float


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """What one lane asks of the claim."""

    #: the lane keys (``outbox.lane_key(route, command)``) of the rows it publishes
    keys: Sequence[str]
    limit: int
    #: seconds the lease lasts unless extended
    lease: float
    #: the relay, for operators (``host:pid``)
    owner: str
    #: this claim's id: every record statement matches it
    claim: int
    #: seconds of waiting worth one priority level
    aging: float
    #: claim only rows this urgent or more (an express worker's claim)
    max_priority: int = LOWEST_PRIORITY


@dataclass(frozen=True, slots=True)
class Outcome:
    id: int
    reason: str
    #: 1 when the row was offered to a transport in this batch, 0 when it never got that far
    attempted: int = 1


@dataclass(frozen=True, slots=True)
class Rescheduled:
    id: int
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class IssuedOtp:
    """What the database keeps of a managed OTP: never the code."""

    reference: str
    key_id: str
    #: HMAC-SHA-256 of the code bound to reference, receiver and params
    digest: bytes
    message_id: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class StoredOtp:
    key_id: str
    digest: bytes
    #: wrong answers so far
    attempts: int
    used: bool
    expired: bool


@dataclass(frozen=True, slots=True)
class Bucket:
    """A rate-limited transport's token bucket, as TAKE_TOKENS keeps it."""

    transport: str
    #: tokens per second
    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class ReceiverClaim:
    """A claimed row that falls under a receiver limit."""

    id: int
    #: keyed digest of (command, canonical receiver): 16 bytes
    digest: bytes
    window: float


class StoreTransaction(Protocol):
    """``claim`` None in the record statements: rows of a locked claim (no lease)."""

    def claim(self, request: ClaimRequest) -> list[ClaimedRow]: ...
    def claim_locked(self, request: ClaimRequest) -> list[ClaimedRow]:
        """Rows locked for this transaction only: no lease (``request.claim`` unused)."""

    def lease(self, rows: Sequence[ClaimedRow], request: ClaimRequest) -> None:
        """Stamp ``request``'s lease on rows this transaction claimed with ``claim_locked``."""

    def mark_sent(self, ids: Sequence[int], claim: int | None, *,
                  served_by: str | None = None) -> None: ...
    def schedule_retry(self, rows: Sequence[Rescheduled], claim: int | None) -> None: ...
    def mark_failed(self, rows: Sequence[Outcome], claim: int | None) -> None: ...
    def mark_expired(self, rows: Sequence[Outcome], claim: int | None) -> None: ...
    def hand_back(self, rows: Sequence[ClaimedRow], claim: int | None) -> None:
        """Claimed, not tried: back to their place in the queue, attempts untouched."""

    def release_retries(self, keys: Sequence[str], limit: int) -> int:
        """Make up to ``limit`` rows of these lane keys that wait to retry due now; how many."""


@runtime_checkable
class LimitStoreTransaction(Protocol):
    """The rate- and receiver-limit statements; both store implementations provide them."""

    def take_tokens(self, bucket: Bucket, want: int) -> tuple[int, float]: ...
    def return_tokens(self, bucket: Bucket, count: int) -> None: ...
    def receiver_places(self, claims: Sequence[ReceiverClaim]) -> tuple[dict[bytes, int], set[int]]: ...
    def take_receiver_places(self, claims: Sequence[ReceiverClaim]) -> None: ...


@runtime_checkable
class OtpStoreTransaction(Protocol):
    """The managed-OTP statements; both store implementations provide them."""

    def find_otp_key(self, reference: str, message_id: int) -> str | None:
        """The key id an OTP for ``reference`` was issued under by ``message_id``, if any."""

    def issue_otp(self, otp: IssuedOtp) -> bool:
        """Keep ``otp``; False when another row's OTP for the reference is still live."""

    def lock_otp(self, reference: str) -> StoredOtp | None:
        """The OTP for ``reference``, locked until the transaction ends."""

    def mark_otp_used(self, reference: str) -> bool:
        """Use the OTP up; False if it already was (the lock makes that impossible)."""

    def count_otp_failure(self, reference: str) -> int:
        """Count one wrong answer; return the attempts so far."""


class Store(Protocol):
    def transaction(self) -> Any:
        """A context manager yielding a ``StoreTransaction``; commits on success."""

    def next_due(self, keys: Sequence[str], max_priority: int = LOWEST_PRIORITY) -> float | None:
        """Seconds until the earliest pending row of these lane keys (and at least this
        urgent) is due (<= 0: now); None when none is pending."""

    def extend_leases(self, claims: Sequence[int], lease: float) -> set[int]:
        """Push the leases of these claims ``lease`` seconds ahead; return the claims that
        still held rows."""

    def pending_lane_keys(self) -> list[str]:
        """The distinct lane keys of pending rows."""

    def close(self) -> None: ...


class PostgresTransaction:
    def __init__(self, connection: psycopg.Connection[Any], *, blank_texts: bool) -> None:
        self._cursor = connection.cursor()
        self._blank_texts = blank_texts

    def claim(self, request: ClaimRequest) -> list[ClaimedRow]:
        # a slow lane's claim: decode every row on its own (an Undecodable fails that row)
        with self._cursor.connection.cursor() as cursor:
            set_json_loads(tolerant_json_loads, cursor)
            cursor.execute(CLAIM, {
                "keys": list(request.keys), "limit": request.limit, "lease": request.lease,
                "owner": request.owner, "claim": request.claim, "aging": request.aging,
                "max_priority": request.max_priority})
            return list(map(ClaimedRow._make, cursor.fetchall()))

    def claim_locked(self, request: ClaimRequest) -> list[ClaimedRow]:
        params = {"keys": list(request.keys), "limit": request.limit, "aging": request.aging,
                  "max_priority": request.max_priority}
        self._cursor.execute(CLAIM_LOCKED, params)
        try:
            # the broker's hot path: orjson straight from the driver, no Python per value
            return list(map(ClaimedRow._make, self._cursor.fetchall()))
        except ValueError:
            pass
        # A value in the batch that orjson refuses: the same claim again (this transaction
        # holds those rows' locks, so the same rows come back), decoded row by row.
        with self._cursor.connection.cursor() as cursor:
            set_json_loads(tolerant_json_loads, cursor)
            cursor.execute(CLAIM_LOCKED, params)
            return list(map(ClaimedRow._make, cursor.fetchall()))

    def lease(self, rows: Sequence[ClaimedRow], request: ClaimRequest) -> None:
        self._cursor.execute(LEASE, {"ids": [row.id for row in rows], "lease": request.lease,
                                     "owner": request.owner, "claim": request.claim})

    def mark_sent(self, ids: Sequence[int], claim: int | None, *,
                  served_by: str | None = None) -> None:
        """``served_by``: the pool member that delivered them (None outside pools)."""
        if ids and claim is None and served_by is None and not self._blank_texts:
            self._cursor.execute(MARK_SENT_LOCKED, (list(ids),))
        elif ids:
            self._cursor.execute(MARK_SENT_BLANKING_TEXTS if self._blank_texts else MARK_SENT,
                                 (served_by, list(ids), claim))

    def schedule_retry(self, rows: Sequence[Rescheduled], claim: int | None) -> None:
        if rows:
            self._cursor.execute(SCHEDULE_RETRY, ([r.id for r in rows], [r.at for r in rows],
                                                  [r.reason[:2000] for r in rows], claim))

    def mark_failed(self, rows: Sequence[Outcome], claim: int | None) -> None:
        if rows:
            self._cursor.execute(MARK_FAILED, (*_outcome_columns(rows), claim))

    def mark_expired(self, rows: Sequence[Outcome], claim: int | None) -> None:
        if rows:
            self._cursor.execute(MARK_EXPIRED_BLANKING_TEXTS if self._blank_texts
                                 else MARK_EXPIRED, (*_outcome_columns(rows), claim))

    def hand_back(self, rows: Sequence[ClaimedRow], claim: int | None) -> None:
        if rows:
            self._cursor.execute(HAND_BACK, ([r.id for r in rows],
                                             [r.was_available_at for r in rows], claim))

    def release_retries(self, keys: Sequence[str], limit: int) -> int:
        self._cursor.execute(RELEASE_RETRIES, {"keys": list(keys), "limit": limit})
        return self._cursor.rowcount

    def find_otp_key(self, reference: str, message_id: int) -> str | None:
        self._cursor.execute(FIND_OTP_KEY, (reference, message_id))
        row = self._cursor.fetchone()
        return None if row is None else str(row[0])

    def issue_otp(self, otp: IssuedOtp) -> bool:
        self._cursor.execute(ISSUE_OTP, (otp.reference, otp.key_id, otp.digest, otp.message_id,
                                         otp.expires_at))
        return self._cursor.fetchone() is not None

    def lock_otp(self, reference: str) -> StoredOtp | None:
        self._cursor.execute(LOCK_OTP, (reference,))
        row = self._cursor.fetchone()
        if row is None:
            return None
        key_id, digest, attempts, used, expired = row
        return StoredOtp(str(key_id), bytes(digest), int(attempts), bool(used), bool(expired))

    def mark_otp_used(self, reference: str) -> bool:
        self._cursor.execute(MARK_OTP_USED, (reference,))
        return self._cursor.fetchone() is not None

    def count_otp_failure(self, reference: str) -> int:
        self._cursor.execute(COUNT_OTP_FAILURE, (reference,))
        row = self._cursor.fetchone()
        return 0 if row is None else int(row[0])

    # -- rate limits -------------------------------------------------------------------------

    def take_tokens(self, bucket: Bucket, want: int) -> tuple[int, float]:
        """Up to ``want`` tokens from ``bucket``: (granted, tokens left). The bucket stays
        locked until this transaction ends."""
        self._cursor.execute(TAKE_TOKENS, {"transport": bucket.transport, "rate": bucket.rate,
                                           "burst": bucket.burst, "want": want})
        row = self._cursor.fetchone()
        assert row is not None
        return int(row[0]), float(row[1])

    def return_tokens(self, bucket: Bucket, count: int) -> None:
        if count > 0:
            self._cursor.execute(RETURN_TOKENS, {"transport": bucket.transport,
                                                 "burst": bucket.burst, "count": count})

    # -- receiver limits ---------------------------------------------------------------------

    def receiver_places(self, claims: Sequence[ReceiverClaim]) -> tuple[dict[bytes, int], set[int]]:
        """Lock the claims' receivers (until this transaction ends) and read their windows:
        places taken by other messages per digest, and the claims that hold a place."""
        if not claims:
            return {}, set()
        ids = [claim.id for claim in claims]
        keys = [int.from_bytes(claim.digest[:8], "big", signed=True) for claim in claims]
        self._cursor.execute(LOCK_RECEIVERS, (keys,))
        windows: dict[bytes, float] = {}
        for claim in claims:
            windows[claim.digest] = max(windows.get(claim.digest, 0.0), claim.window)
        self._cursor.execute(COUNT_RECEIVER_PLACES, {
            "digests": list(windows), "windows": list(windows.values()), "ids": ids})
        taken = {bytes(digest): int(count) for digest, count in self._cursor.fetchall()}
        self._cursor.execute(RECEIVER_PLACES_HELD, (ids,))
        held = {int(row[0]) for row in self._cursor.fetchall()}
        return taken, held

    def take_receiver_places(self, claims: Sequence[ReceiverClaim]) -> None:
        if claims:
            self._cursor.execute(TAKE_RECEIVER_PLACES, ([c.id for c in claims],
                                                        [c.digest for c in claims]))

    @property
    def connection(self) -> psycopg.Connection[Any]:
        return self._cursor.connection


def _outcome_columns(rows: Sequence[Outcome]) -> tuple[list[int], list[str], list[int]]:
    return [r.id for r in rows], [r.reason[:2000] for r in rows], [r.attempted for r in rows]


class PostgresStore:
    """The relay's view of ``outbox.message`` through one psycopg connection."""

    def __init__(self, connection: psycopg.Connection[Any], *, blank_texts: bool = False) -> None:
        self.connection = connection
        self._blank_texts = blank_texts
        # Every claimed row's jsonb is decoded: orjson does it ~6x faster than json.loads.
        # Set on this connection only: the application's own psycopg use keeps its
        # configuration. A value orjson refuses is decoded again, row by row (claim_locked).
        set_json_loads(orjson.loads, connection)

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        with self.connection.transaction():
            yield PostgresTransaction(self.connection, blank_texts=self._blank_texts)

    def next_due(self, keys: Sequence[str], max_priority: int = LOWEST_PRIORITY) -> float | None:
        with self.connection.transaction():
            row = self.connection.execute(NEXT_DUE, {"keys": list(keys),
                                                     "max_priority": max_priority}).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def extend_leases(self, claims: Sequence[int], lease: float) -> set[int]:
        with self.connection.transaction():
            cursor = self.connection.execute(EXTEND_LEASES, {"claims": list(claims),
                                                             "lease": lease})
            return {int(row[0]) for row in cursor.fetchall()}

    def pending_lane_keys(self) -> list[str]:
        with self.connection.transaction():
            return [str(row[0]) for row in self.connection.execute(PENDING_LANE_KEYS)]

    def close(self) -> None:
        self.connection.close()


def insert_message(
    cursor: Any,
    command: str,
    data: Any,
    *,
    dedup_key: str | None,
    route: str | None,
    available_at: Any,
    priority: int | None = None,
    ordering_key: str | None = None,
    enqueued_by: str | None = None,
    encoded: str | None = None,
) -> int:
    """INSERT one row through a DB-API cursor; with a used ``dedup_key``, the existing id.
    ``priority`` and ``ordering_key`` left None take the command's defaults. ``encoded``:
    ``data`` already as JSON text (the helper measured it), sent as it is."""
    value = Jsonb(data) if encoded is None else Jsonb(encoded, dumps=str)
    if dedup_key is None:
        cursor.execute(INSERT_MESSAGE_NO_DEDUP, (command, value, route, available_at,
                                                 priority, ordering_key, enqueued_by))
    else:
        cursor.execute(INSERT_MESSAGE, (command, value, dedup_key, route, available_at,
                                        priority, ordering_key, enqueued_by))
    row = cursor.fetchone()
    if row is None:
        cursor.execute(SELECT_ID_BY_DEDUP_KEY, {"key": dedup_key})
        row = cursor.fetchone()
    return int(row[0])


# --- outbox gateway: a create-otp for a reference with a live OTP answers 1201 at once ------

# Serialises the gateway's create-otps of one reference for the rest of the transaction, so
# that two at once cannot both find the reference free.
LOCK_OTP_REFERENCE = "SELECT pg_advisory_xact_lock(hashtextextended('outbox.otp:' || %s, 0))"

# Live: a managed OTP not used, not expired, whose message neither failed nor expired (as
# ISSUE_OTP decides), or a create-otp row for the reference still waiting to be relayed.
LIVE_OTP_REFERENCE = """
SELECT EXISTS (
    SELECT 1 FROM outbox.otp AS o
    WHERE o.reference = %(reference)s AND o.used_at IS NULL AND o.expires_at > now()
      AND NOT EXISTS (SELECT 1 FROM outbox.message AS m
                      WHERE m.id = o.message_id AND m.state IN ('failed', 'expired'))
) OR EXISTS (
    SELECT 1 FROM outbox.message AS m
    WHERE m.state = 'pending' AND m.command = 'create-otp'
      AND btrim(m.data ->> 'reference') = %(reference)s
      AND (m.expires_at IS NULL OR m.expires_at > now())
)
"""


def lock_otp_reference(cursor: Any, reference: str) -> None:
    cursor.execute(LOCK_OTP_REFERENCE, (reference,))


def otp_reference_is_live(cursor: Any, reference: str) -> bool:
    cursor.execute(LIVE_OTP_REFERENCE, {"reference": reference})
    row = cursor.fetchone()
    return bool(row[0])


def find_message_by_dedup_key(cursor: Any, dedup_key: str) -> int | None:
    cursor.execute(SELECT_ID_BY_DEDUP_KEY, {"key": dedup_key})
    row = cursor.fetchone()
    return None if row is None else int(row[0])


class AcceptedMessage(NamedTuple):
    command: str
    data: dict[str, Any]
    created_at: float
    enqueued_by: str | None


SELECT_ACCEPTED_MANY = """
SELECT id, command, data, extract(epoch FROM created_at)::float8, enqueued_by
FROM outbox.message WHERE id = ANY(%s)
"""


def read_accepted_many(cursor: Any, message_ids: Sequence[int]) -> dict[int, AcceptedMessage]:
    """:func:`read_accepted` for many rows in one statement (a gateway batch)."""
    if not message_ids:
        return {}
    cursor.execute(SELECT_ACCEPTED_MANY, (list(message_ids),))
    return {int(row[0]): AcceptedMessage(row[1], row[2], row[3], row[4])
            for row in cursor.fetchall()}


def read_accepted(cursor: Any, message_id: int) -> AcceptedMessage | None:
    """The command, data, creation time and enqueuer of row ``message_id`` (None once purged)."""
    cursor.execute(SELECT_ACCEPTED, (message_id,))
    row = cursor.fetchone()
    return None if row is None else AcceptedMessage(row[0], row[1], row[2], row[3])


__all__ = [
    "CHANNEL",
    "LOWEST_PRIORITY",
    "AcceptedMessage",
    "Bucket",
    "ClaimRequest",
    "ClaimedRow",
    "IssuedOtp",
    "LimitStoreTransaction",
    "OtpStoreTransaction",
    "Outcome",
    "PostgresStore",
    "PostgresTransaction",
    "ReceiverClaim",
    "Rescheduled",
    "Store",
    "StoreTransaction",
    "StoredOtp",
    "Undecodable",
    "apply_default_priorities",
    "find_message_by_dedup_key",
    "insert_message",
    "lock_otp_reference",
    "otp_reference_is_live",
    "read_accepted",
    "read_accepted_many",
    "tolerant_json_loads",
]
