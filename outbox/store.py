"""Every SQL statement the relay runs, each named for what it does.

The relay works in one transaction per batch::

    with store.transaction() as tx:
        rows = tx.claim_batch(200)          # FOR UPDATE SKIP LOCKED
        ... publish ...
        tx.mark_sent(ids)
        tx.schedule_retry(...)
        tx.mark_failed(...)
        tx.mark_expired(...)
    # commit: the rows' new states become visible and their locks are released

A crash anywhere before the commit rolls the whole batch back: its rows are pending again and
another relay (or this one, restarted) publishes them again. That is the at-least-once
guarantee; the row id on the wire lets consumers drop the repeat.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import orjson
import psycopg
from psycopg.types.json import Jsonb, set_json_loads

CHANNEL = "outbox_message"

CLAIM_BATCH = """
SELECT id, command, data, route, attempts,
       extract(epoch FROM created_at)::float8,
       extract(epoch FROM expires_at)::float8
FROM outbox.message
WHERE state = 'pending' AND available_at <= now()
ORDER BY available_at, id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

MARK_SENT = """
UPDATE outbox.message
SET state = 'sent', sent_at = now(), attempts = attempts + 1, last_error = NULL
WHERE id = ANY(%s)
"""

MARK_SENT_BLANKING_TEXTS = """
UPDATE outbox.message
SET state = 'sent', sent_at = now(), attempts = attempts + 1, last_error = NULL,
    data = data - 'message' - 'subject'
WHERE id = ANY(%s)
"""

SCHEDULE_RETRY = """
UPDATE outbox.message AS m
SET attempts = m.attempts + 1, available_at = to_timestamp(u.at), last_error = u.reason
FROM unnest(%s::bigint[], %s::float8[], %s::text[]) AS u(id, at, reason)
WHERE m.id = u.id
"""

MARK_FAILED = """
UPDATE outbox.message AS m
SET state = 'failed', attempts = m.attempts + u.attempted, last_error = u.reason
FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS u(id, reason, attempted)
WHERE m.id = u.id
"""

MARK_EXPIRED = """
UPDATE outbox.message AS m
SET state = 'expired', attempts = m.attempts + u.attempted, last_error = u.reason
FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS u(id, reason, attempted)
WHERE m.id = u.id
"""

# An expired row is never published again: its texts can go as a sent row's do. A failed
# row keeps them, since `outbox failed retry` may send it after all.
MARK_EXPIRED_BLANKING_TEXTS = """
UPDATE outbox.message AS m
SET state = 'expired', attempts = m.attempts + u.attempted, last_error = u.reason,
    data = m.data - 'message' - 'subject'
FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS u(id, reason, attempted)
WHERE m.id = u.id
"""

# A transport that was unreachable works again: its rows waiting out their retry backoff (up
# to backoff_max, ten minutes by default) are due now rather than when their timers say.
# Only retries (attempts > 0): a row an application scheduled for later stays scheduled. A
# row goes to the transport by its own route ("a", "a+b") or, without one, by its command.
RELEASE_RETRIES = """
UPDATE outbox.message AS m SET available_at = now()
WHERE m.id IN (
    SELECT id FROM outbox.message
    WHERE state = 'pending' AND available_at > now() AND attempts > 0
      AND CASE WHEN coalesce(btrim(route), '') = '' THEN command = ANY(%(commands)s)
               ELSE %(name)s IN (SELECT btrim(part)
                                 FROM unnest(string_to_array(route, '+')) AS part) END
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
"""

NEXT_DUE = """
SELECT extract(epoch FROM min(available_at) - now())::float8
FROM outbox.message
WHERE state = 'pending'
"""

INSERT_MESSAGE = """
INSERT INTO outbox.message (command, data, dedup_key, route, available_at)
VALUES (%s, %s, %s, %s, coalesce(%s, now()))
ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
RETURNING id
"""

# Without a dedup key there is nothing to conflict with: a plain INSERT spares the
# speculative insertion ON CONFLICT sets up for every row.
INSERT_MESSAGE_NO_DEDUP = """
INSERT INTO outbox.message (command, data, route, available_at)
VALUES (%s, %s, %s, coalesce(%s, now()))
RETURNING id
"""

SELECT_ID_BY_DEDUP_KEY = "SELECT id FROM outbox.message WHERE dedup_key = %s"

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


class ClaimedRow(NamedTuple):
    """One claimed row. A NamedTuple, not a dataclass: it is built for every row the relay
    claims, and a tuple builds four times faster (1.05 µs against 0.24 µs per row)."""

    id: int
    command: str
    data: Any
    route: str | None
    #: attempts made before this one
    attempts: int
    created_at: float
    expires_at: float | None


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


class StoreTransaction(Protocol):
    def claim_batch(self, limit: int) -> list[ClaimedRow]: ...
    def mark_sent(self, ids: Sequence[int]) -> None: ...
    def schedule_retry(self, rows: Sequence[Rescheduled]) -> None: ...
    def mark_failed(self, rows: Sequence[Outcome]) -> None: ...
    def mark_expired(self, rows: Sequence[Outcome]) -> None: ...
    def release_retries(self, transport: str, commands: Sequence[str], limit: int) -> int:
        """Make up to ``limit`` rows waiting to retry on ``transport`` due now; return how many.
        ``commands`` are those whose rows go to it when they name no route."""


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

    def next_due(self) -> float | None:
        """Seconds until the earliest pending row is due (<= 0: now), None when none is pending."""

    def close(self) -> None: ...


class PostgresTransaction:
    def __init__(self, connection: psycopg.Connection[Any], *, blank_texts: bool) -> None:
        self._cursor = connection.cursor()
        self._blank_texts = blank_texts

    def claim_batch(self, limit: int) -> list[ClaimedRow]:
        self._cursor.execute(CLAIM_BATCH, (limit,))
        return list(map(ClaimedRow._make, self._cursor.fetchall()))

    def mark_sent(self, ids: Sequence[int]) -> None:
        if ids:
            self._cursor.execute(MARK_SENT_BLANKING_TEXTS if self._blank_texts else MARK_SENT,
                                 (list(ids),))

    def schedule_retry(self, rows: Sequence[Rescheduled]) -> None:
        if rows:
            self._cursor.execute(SCHEDULE_RETRY, ([r.id for r in rows], [r.at for r in rows],
                                                  [r.reason[:2000] for r in rows]))

    def mark_failed(self, rows: Sequence[Outcome]) -> None:
        if rows:
            self._cursor.execute(MARK_FAILED, _outcome_columns(rows))

    def mark_expired(self, rows: Sequence[Outcome]) -> None:
        if rows:
            self._cursor.execute(MARK_EXPIRED_BLANKING_TEXTS if self._blank_texts
                                 else MARK_EXPIRED, _outcome_columns(rows))

    def release_retries(self, transport: str, commands: Sequence[str], limit: int) -> int:
        self._cursor.execute(RELEASE_RETRIES,
                             {"name": transport, "commands": list(commands), "limit": limit})
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
        # The claim decodes every row's jsonb: orjson does it ~6x faster than json.loads.
        # Set on this connection only, never globally: the application's own psycopg use
        # keeps its configuration.
        set_json_loads(orjson.loads, connection)

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        with self.connection.transaction():
            yield PostgresTransaction(self.connection, blank_texts=self._blank_texts)

    def next_due(self) -> float | None:
        with self.connection.transaction():
            row = self.connection.execute(NEXT_DUE).fetchone()
        return None if row is None or row[0] is None else float(row[0])

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
) -> int:
    """INSERT one row through a DB-API cursor; with a used ``dedup_key``, the existing id."""
    if dedup_key is None:
        cursor.execute(INSERT_MESSAGE_NO_DEDUP, (command, Jsonb(data), route, available_at))
    else:
        cursor.execute(INSERT_MESSAGE, (command, Jsonb(data), dedup_key, route, available_at))
    row = cursor.fetchone()
    if row is None:
        cursor.execute(SELECT_ID_BY_DEDUP_KEY, (dedup_key,))
        row = cursor.fetchone()
    return int(row[0])


__all__ = [
    "CHANNEL",
    "ClaimedRow",
    "IssuedOtp",
    "OtpStoreTransaction",
    "Outcome",
    "PostgresStore",
    "PostgresTransaction",
    "Rescheduled",
    "Store",
    "StoreTransaction",
    "StoredOtp",
    "insert_message",
]
