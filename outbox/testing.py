"""In-memory parts for tests: a transport that records what it was given, and a store that
behaves like ``outbox.message`` without a database.

Users test their own code with ``MemoryTransport`` (``OUTBOX_TRANSPORT=memory://``); our unit
tests drive the relay loop with both.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from outbox.commands import validate
from outbox.errors import PublishError
from outbox.scheduling import take_tokens
from outbox.settings import DEFAULT_PRIORITIES
from outbox.store import (
    Bucket,
    ClaimedRow,
    ClaimRequest,
    IssuedOtp,
    Outcome,
    ReceiverClaim,
    Rescheduled,
    StoredOtp,
)
from outbox.transports.base import Envelope, Failures, TransportOptions


def lane_key(route: str | None, command: str) -> str:
    """``outbox.lane_key(route, command)``: the row's route trimmed, or ``@command``."""
    return f"@{command}" if route is None or not route.strip() else route.strip()


class MemoryTransport:
    """Records every envelope it delivers; ``fail`` decides per envelope what goes wrong.

    ``fail(envelope)`` returns ``None`` (delivered) or the ``PublishError`` to report.
    """

    def __init__(self, name: str = "default", url: str = "memory://",
                 options: TransportOptions | None = None,
                 *, fail: Callable[[Envelope], PublishError | None] | None = None) -> None:
        self.name = name
        self.options = options or TransportOptions()
        self.fail = fail
        self.delivered: list[Envelope] = []
        self.attempts: list[Envelope] = []
        self.closed = False
        self._lock = threading.Lock()

    def publish(self, batch: Sequence[Envelope]) -> Failures:
        failures: Failures = {}
        with self._lock:
            for envelope in batch:
                self.attempts.append(envelope)
                error = self.fail(envelope) if self.fail else None
                if error is None:
                    self.delivered.append(envelope)
                else:
                    failures[envelope.id] = error
        return failures

    def check(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    @property
    def bodies(self) -> list[bytes]:
        return [envelope.body for envelope in self.delivered]


@dataclass
class MemoryRow:
    id: int
    command: str
    data: Any
    route: str | None = None
    dedup_key: str | None = None
    state: str = "pending"
    attempts: int = 0
    available_at: float = 0.0
    expires_at: float | None = None
    created_at: float = 0.0
    sent_at: float | None = None
    last_error: str | None = None
    priority: int = 5
    ordering_key: str | None = None
    claimed_by: str | None = None
    claim: int | None = None
    served_by: str | None = None


@dataclass
class MemoryOtp:
    """A row of ``outbox.otp``."""

    reference: str
    key_id: str
    digest: bytes
    message_id: int
    expires_at: float
    attempts: int = 0
    created_at: float = 0.0
    used_at: float | None = None


@dataclass
class MemoryStore:
    """``outbox.message`` in a dict, with the claim's ordering and one lock for isolation.

    ``validate_on_insert=False`` lets a test put rows in that the database would refuse,
    to exercise the relay's own defences.
    """

    clock: Callable[[], float] = time.time
    rows: dict[int, MemoryRow] = field(default_factory=dict)
    validate_on_insert: bool = True
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _claimed: set[int] = field(default_factory=set)
    #: ``outbox.otp`` by reference
    otps: dict[str, MemoryOtp] = field(default_factory=dict)
    #: ``outbox.rate_bucket``: transport -> (tokens, updated_at)
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: ``outbox.receiver_window``: message id -> (digest, taken_at)
    receiver_window: dict[int, tuple[bytes, float]] = field(default_factory=dict)

    def insert(self, command: str, data: Any, *, route: str | None = None,
               dedup_key: str | None = None, available_at: float | None = None,
               expires_at: float | None = None, created_at: float | None = None,
               priority: int | None = None, ordering_key: str | None = None) -> int:
        now = self.clock()
        if self.validate_on_insert:
            command = validate(command, data, now=now)
        if dedup_key is not None:
            for row in self.rows.values():
                if row.dedup_key == dedup_key:
                    return row.id
        if expires_at is None and isinstance(data, dict) and data.get("expiration") is not None:
            expires_at = float(data["expiration"])
        if priority is None:
            priority = DEFAULT_PRIORITIES.get(command, 5)
        if ordering_key is None and command in ("block-msisdn", "unblock-msisdn") \
                and isinstance(data, dict) and isinstance(data.get("receiver"), str):
            ordering_key = "msisdn:" + data["receiver"].strip().lstrip("+")
        row = MemoryRow(next(self._ids), command, data, route, dedup_key,
                        available_at=now if available_at is None else available_at,
                        expires_at=expires_at, created_at=now if created_at is None else created_at,
                        priority=priority, ordering_key=ordering_key or None)
        self.rows[row.id] = row
        return row.id

    @contextmanager
    def transaction(self) -> Iterator[_MemoryTransaction]:
        with self._lock:
            tx = _MemoryTransaction(self)
            snapshot = {key: MemoryRow(**vars(row)) for key, row in self.rows.items()}
            otps = {key: MemoryOtp(**vars(otp)) for key, otp in self.otps.items()}
            try:
                yield tx
            except BaseException:
                self.rows, self.otps = snapshot, otps
                raise

    def next_due(self, keys: Sequence[str], max_priority: int = 9) -> float | None:
        wanted = set(keys)
        pending = [row.available_at for row in self.rows.values()
                   if row.state == "pending" and row.priority <= max_priority
                   and lane_key(row.route, row.command) in wanted]
        return min(pending) - self.clock() if pending else None

    def extend_leases(self, claims: Sequence[int], lease: float) -> set[int]:
        with self._lock:
            rows = [row for row in self.rows.values()
                    if row.state == "pending" and row.claim in set(claims)]
            for row in rows:
                row.available_at = self.clock() + lease
            return {row.claim for row in rows if row.claim is not None}

    def pending_lane_keys(self) -> list[str]:
        return sorted({lane_key(row.route, row.command) for row in self.rows.values()
                       if row.state == "pending"})

    def close(self) -> None:
        return None

    def by_state(self, state: str) -> list[MemoryRow]:
        return [row for row in self.rows.values() if row.state == state]


class _MemoryTransaction:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def claim(self, request: ClaimRequest) -> list[ClaimedRow]:
        """The rules of ``outbox.store.CLAIM``: lane keys, rank by priority and aging,
        ordering keys, a lease."""
        now = self.store.clock()
        keys = set(request.keys)
        pending = [row for row in self.store.rows.values() if row.state == "pending"]
        blocked: set[int] = set()
        first_of_key: dict[str, int] = {}
        for row in sorted(pending, key=lambda r: r.id):
            if row.ordering_key is not None:
                if row.ordering_key in first_of_key:
                    blocked.add(row.id)
                else:
                    first_of_key[row.ordering_key] = row.id
        due = sorted((row for row in pending
                      if row.available_at <= now and row.id not in blocked
                      and row.priority <= request.max_priority
                      and lane_key(row.route, row.command) in keys),
                     # a lease that ran out first: it was at the head when it was claimed
                     key=lambda row: (row.claim is None,
                                      row.available_at + row.priority * request.aging, row.id))
        claimed = []
        for row in due[:request.limit]:
            claimed.append(ClaimedRow(row.id, row.command, row.data, row.route,
                                      row.attempts, row.created_at, row.expires_at,
                                      row.available_at))
            row.available_at = now + request.lease
            row.claimed_by, row.claim = request.owner, request.claim
        return claimed

    def claim_locked(self, request: ClaimRequest) -> list[ClaimedRow]:
        """Like ``claim`` but without a lease: the store's lock is the transaction's."""
        rows = self.claim(request)
        for claimed in rows:
            row = self.store.rows[claimed.id]
            row.available_at, row.claimed_by, row.claim = claimed.was_available_at, None, None
        return rows

    def lease(self, rows: Sequence[ClaimedRow], request: ClaimRequest) -> None:
        now = self.store.clock()
        for claimed in rows:
            row = self.store.rows[claimed.id]
            row.available_at = now + request.lease
            row.claimed_by, row.claim = request.owner, request.claim

    def _held(self, ids: Sequence[int], claim: int | None) -> list[MemoryRow]:
        return [row for message_id in ids
                if (row := self.store.rows[message_id]).claim == claim and row.state == "pending"]

    def mark_sent(self, ids: Sequence[int], claim: int | None, *,
                  served_by: str | None = None) -> None:
        for row in self._held(ids, claim):
            row.state, row.sent_at, row.last_error = "sent", self.store.clock(), None
            row.attempts += 1
            row.claimed_by = row.claim = None
            row.served_by = served_by

    def schedule_retry(self, rows: Sequence[Rescheduled], claim: int | None) -> None:
        at = {item.id: item for item in rows}
        for row in self._held(list(at), claim):
            row.attempts += 1
            row.available_at, row.last_error = at[row.id].at, at[row.id].reason
            row.claimed_by = row.claim = None

    def mark_failed(self, rows: Sequence[Outcome], claim: int | None) -> None:
        self._finish(rows, "failed", claim)

    def take_tokens(self, bucket: Bucket, want: int) -> tuple[int, float]:
        tokens, updated = self.store.buckets.get(bucket.transport, (float(bucket.burst),
                                                                    self.store.clock()))
        grant = take_tokens(tokens, updated, self.store.clock(), rate=bucket.rate,
                            burst=bucket.burst, want=want)
        self.store.buckets[bucket.transport] = (grant.tokens, grant.updated_at)
        return grant.granted, grant.tokens

    def return_tokens(self, bucket: Bucket, count: int) -> None:
        tokens, updated = self.store.buckets[bucket.transport]
        self.store.buckets[bucket.transport] = (min(float(bucket.burst), tokens + count), updated)

    def receiver_places(self, claims: Sequence[ReceiverClaim]) -> tuple[dict[bytes, int], set[int]]:
        now = self.store.clock()
        ids = {claim.id for claim in claims}
        windows = {claim.digest: claim.window for claim in claims}
        taken: dict[bytes, int] = {}
        for message_id, (digest, at) in self.store.receiver_window.items():
            if digest in windows and at > now - windows[digest] and message_id not in ids:
                taken[digest] = taken.get(digest, 0) + 1
        return taken, ids & set(self.store.receiver_window)

    def take_receiver_places(self, claims: Sequence[ReceiverClaim]) -> None:
        for claim in claims:
            self.store.receiver_window.setdefault(claim.id, (claim.digest, self.store.clock()))

    def mark_expired(self, rows: Sequence[Outcome], claim: int | None) -> None:
        self._finish(rows, "expired", claim)

    def hand_back(self, rows: Sequence[ClaimedRow], claim: int | None) -> None:
        was = {row.id: row.was_available_at for row in rows}
        for row in self._held(list(was), claim):
            row.available_at = was[row.id]
            row.claimed_by = row.claim = None

    def release_retries(self, keys: Sequence[str], limit: int) -> int:
        now = self.store.clock()
        wanted = set(keys)
        waiting = sorted((row for row in self.store.rows.values()
                          if row.state == "pending" and row.available_at > now
                          and row.attempts > 0 and row.claim is None
                          and lane_key(row.route, row.command) in wanted),
                         key=lambda row: (row.available_at, row.id))[:limit]
        for row in waiting:
            row.available_at = now
        return len(waiting)

    def _finish(self, rows: Sequence[Outcome], state: str, claim: int | None) -> None:
        outcomes = {item.id: item for item in rows}
        for row in self._held(list(outcomes), claim):
            item = outcomes[row.id]
            row.state, row.last_error = state, item.reason
            row.attempts += item.attempted
            row.claimed_by = row.claim = None

    # -- managed OTPs: the same rules as the statements in outbox.store -------------------

    def find_otp_key(self, reference: str, message_id: int) -> str | None:
        otp = self.store.otps.get(reference)
        return otp.key_id if otp is not None and otp.message_id == message_id else None

    def issue_otp(self, otp: IssuedOtp) -> bool:
        now = self.store.clock()
        existing = self.store.otps.get(otp.reference)
        if existing is not None and existing.message_id == otp.message_id:
            existing.key_id, existing.digest = otp.key_id, otp.digest
            existing.expires_at = otp.expires_at
            return True
        if existing is not None and existing.used_at is None and existing.expires_at > now:
            issuer = self.store.rows.get(existing.message_id)
            if issuer is None or issuer.state not in ("failed", "expired"):
                return False
        self.store.otps[otp.reference] = MemoryOtp(
            otp.reference, otp.key_id, otp.digest, otp.message_id, otp.expires_at, created_at=now)
        return True

    def lock_otp(self, reference: str) -> StoredOtp | None:
        otp = self.store.otps.get(reference)
        if otp is None:
            return None
        return StoredOtp(otp.key_id, otp.digest, otp.attempts, otp.used_at is not None,
                         otp.expires_at <= self.store.clock())

    def mark_otp_used(self, reference: str) -> bool:
        otp = self.store.otps.get(reference)
        if otp is None or otp.used_at is not None:
            return False
        otp.used_at = self.store.clock()
        return True

    def count_otp_failure(self, reference: str) -> int:
        otp = self.store.otps.get(reference)
        if otp is None:
            return 0
        otp.attempts += 1
        return otp.attempts


__all__ = ["MemoryOtp", "MemoryRow", "MemoryStore", "MemoryTransport"]
