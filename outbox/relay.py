"""The relay: claim committed rows, publish them, record what happened.

Work is split into **lanes**, one per effective route (a transport, a fan-out ``a+b``, ...):
each lane claims only its own rows and runs in its own worker threads, with their own
database and transport connections, so a slow device never delays a broker's rows.

One :class:`Relay` is one worker of one lane. A turn (:meth:`Relay.process_batch`) is:

1. **claim** in a short transaction: lock as many rows as the lane can publish in half the
   claim timeout at its observed pace (:mod:`outbox.scheduling`), plan them (validate,
   route, expire, draw managed OTPs) and record at once the rows that cannot go. Rows that
   publish within about a second are published and recorded in that same transaction;
   any more take a lease before it commits, and go on as follows;
2. **publish** outside any transaction, in chunks of about a second of work, checking
   before each chunk that the lease still leaves time for it and that no stop was asked;
3. **record** each chunk in its own short transaction, touching only rows that still hold
   this claim; rows not tried go back to their place, attempts untouched.

:class:`RelayService` runs the lanes, one LISTEN connection that wakes them, a heartbeat that
extends the leases of claims being published (a relay that freezes or loses the database
stops extending them, and its rows become due again for any relay within
``OUTBOX_CLAIM_TIMEOUT``), and the discovery of lane keys it was not told about.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import psycopg
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from outbox import metrics
from outbox.commands import COMMANDS, CREATE_OTP, encode, validate, wire_payload
from outbox.db import connect
from outbox.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidCommand,
    NotTried,
    OutboxError,
    PublishError,
    TransientPublishError,
    Unreachable,
)
from outbox.limits import ReceiverLimiter, buckets_for
from outbox.logs import debug_enabled, get_logger, redact
from outbox.retry import Expire, Fail, Retry, RetryPolicy, decide
from outbox.scheduling import (
    CHUNK_BUDGET,
    Pace,
    backoff_after_outage,
    chunk_size,
    claim_size,
    lease_allows,
    lease_free,
    lease_margin,
    next_token_in,
)
from outbox.settings import Settings, is_pool, pool_members, route_names
from outbox.store import (
    CHANNEL,
    LOWEST_PRIORITY,
    Bucket,
    ClaimedRow,
    ClaimRequest,
    LimitStoreTransaction,
    Outcome,
    PostgresStore,
    Rescheduled,
    Store,
    StoreTransaction,
    Undecodable,
)
from outbox.transports import Envelope, OtpMode, Transport, open_target

log = get_logger("outbox.relay")

#: rows made due per statement when a transport is back (all of them go, in such steps)
RELEASE_BATCH = 10_000
#: the label of the lane that fails rows whose route names no configured transport
UNROUTABLE = "(unroutable)"
#: seconds between two looks for lane keys the relay was not told about
DISCOVERY_INTERVAL = 2.0
#: the interpreter's thread switch interval while the relay runs (see RelayService.run)
SWITCH_INTERVAL = 0.001
#: how much nicer than the express workers the bulk workers run (Linux: per thread)
BULK_NICENESS = 5


class OtpIssuer(Protocol):
    """Managed OTPs: turns a create-otp row into the finished send-sms / send-email."""

    def issue(self, tx: StoreTransaction, row: ClaimedRow, expires_at: float) -> tuple[str, dict[str, Any]]:
        """Return (command, data) to publish; raise ``InvalidCommand`` to fail the row."""


@dataclass
class BatchReport:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0
    #: claimed but not tried: handed back (a stop, a lease running out, a peer gone)
    handed_back: int = 0
    #: the claim took as many rows as it asked for: more may be waiting
    full: bool = False
    #: seconds until the lane's rate limit grants its next token (0: not waiting for one)
    token_wait: float = 0.0

    def add(self, other: BatchReport) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.expired += other.expired
        self.handed_back += other.handed_back


# --- lanes --------------------------------------------------------------------------------


@dataclass
class Lane:
    """The rows of one effective route: which lane keys they carry, where they go."""

    label: str
    #: transport names (empty for the unroutable lane)
    names: tuple[str, ...]
    keys: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def key_list(self) -> list[str]:
        with self._lock:
            return sorted(self.keys)

    def add_key(self, key: str) -> bool:
        with self._lock:
            if key in self.keys:
                return False
            self.keys.add(key)
            return True


def resolve_key(settings: Settings, key: str) -> tuple[str, tuple[str, ...]]:
    """The lane label and transport names of a lane key; (UNROUTABLE, ()) when its route
    does not parse or names a transport that is not configured."""
    try:
        if key.startswith("@"):
            command = key[1:]
            if command not in COMMANDS:
                return UNROUTABLE, ()
            names = settings.route_for(command, None)
        else:
            names = route_names(key)
    except ConfigurationError:
        return UNROUTABLE, ()
    if any(member not in settings.transports for name in names for member in pool_members(name)):
        return UNROUTABLE, ()
    return "+".join(names), names


def configured_lanes(settings: Settings) -> dict[str, Lane]:
    """The lanes a relay knows from its settings alone, with their lane keys: every command
    without a route of its own, every transport named alone, every configured route."""
    lanes: dict[str, Lane] = {}
    keys = [f"@{command}" for command in COMMANDS]
    keys += list(settings.transports)
    keys += list(settings.routes.values())
    for key in keys:
        add_key(lanes, settings, key)
    return lanes


def add_key(lanes: dict[str, Lane], settings: Settings, key: str) -> Lane | None:
    """File ``key`` under its lane (created if new); the lane when it was created."""
    label, names = resolve_key(settings, key)
    created = label not in lanes
    lane = lanes.setdefault(label, Lane(label, names))
    # exactly what outbox.lane_key() makes of a route: btrim(), which takes spaces only; a
    # key trimmed of a tab as well matched no row, and the row stayed pending for ever
    lane.add_key(key.strip(" ") if not key.startswith("@") else key)
    return lane if created else None


# --- leases -------------------------------------------------------------------------------


class LeaseBook:
    """The claims this process is publishing, with the monotonic time each lease runs out.

    Workers add a claim once it is committed and remove it when it is recorded; the heartbeat
    extends every claim in the book and moves its deadline on only after the database took
    the extension. A deadline is always earlier than the lease in the database: it counts
    from a moment before the statement was sent."""

    def __init__(self) -> None:
        self._deadlines: dict[int, float] = {}
        self._lock = threading.Lock()

    def add(self, claim: int, deadline: float) -> None:
        with self._lock:
            self._deadlines[claim] = deadline

    def remove(self, claim: int) -> None:
        with self._lock:
            self._deadlines.pop(claim, None)

    def deadline(self, claim: int) -> float:
        with self._lock:
            return self._deadlines.get(claim, float("-inf"))

    def claims(self) -> list[int]:
        with self._lock:
            return list(self._deadlines)

    def renewed(self, claims: Iterable[int], deadline: float) -> None:
        with self._lock:
            for claim in claims:
                if claim in self._deadlines:
                    self._deadlines[claim] = max(self._deadlines[claim], deadline)


# --- one worker ----------------------------------------------------------------------------


class _Planned(NamedTuple):
    row: ClaimedRow
    command: str
    #: the decoded data (the row's own; the wire data may differ: managed OTPs)
    data: Any
    #: the lane label (the metrics' route label)
    route: str
    expires_at: float | None
    #: per transport name: (wire command, wire data)
    wires: tuple[tuple[str, str, Mapping[str, Any]], ...]
    #: the envelopes built when it was planned, one per wire (``date_time`` = then)
    envelopes: tuple[Envelope, ...]
    #: when those bodies were encoded (the relay's clock)
    encoded_at: float


class _Expired(Outcome):
    """An outcome of planning that ends the row ``expired`` rather than ``failed``."""


class _Route(NamedTuple):
    """Where rows of one (command, row route) go, worked out once per relay."""

    names: tuple[str, ...]
    label: str
    #: why rows of this route cannot go, if they cannot
    problem: str | None


class Relay:
    """One worker of one lane. ``process_batch`` is one claim-publish-record turn."""

    def __init__(
        self,
        store: Store,
        transports: Mapping[str, Transport],
        settings: Settings,
        *,
        lane: Lane | None = None,
        owner: str | None = None,
        leases: LeaseBook | None = None,
        otp: OtpIssuer | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        stopping: Callable[[], bool] = lambda: False,
        max_priority: int = LOWEST_PRIORITY,
    ) -> None:
        """``max_priority`` below 9: an express worker, which claims only rows that urgent."""
        self.store = store
        self.max_priority = max_priority
        self.transports = transports
        self.settings = settings
        self.lane = lane or _single_lane(settings, transports)
        self.owner = owner or relay_identity()
        self.leases = leases or LeaseBook()
        self.otp = otp
        self.clock = clock
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.stopping = stopping
        self.policy = RetryPolicy(settings.backoff_base, settings.backoff_max, settings.max_attempts)
        self.pace = Pace()
        self._routes: dict[tuple[str, str | None], _Route] = {}
        #: chunks in a row that the lane's transport could not deliver at all
        self.outage = 0
        limiter = ReceiverLimiter(settings)
        self.receivers = limiter if limiter.active else None
        #: per pool of the lane, the rate-limited member whose tokens the current claim took
        self._through: dict[str, str] = {}

    def _route(self, command: str, row_route: str | None) -> _Route:
        route = self._routes.get((command, row_route))
        if route is None:
            try:
                names = self.settings.route_for(command, row_route.strip() if row_route else None)
            except ConfigurationError:
                route = _Route((), "none", f"route {row_route!r} is not a route (name a "
                               "configured transport, or several joined with '+')")
            else:
                missing = next((name for name in names if name not in self.transports), None)
                problem = (None if missing is None
                           else f"route {missing!r} names no configured transport")
                route = _Route(names, "+".join(names), problem)
            self._routes[command, row_route] = route
        return route

    def drain(self, *, max_turns: int = 10_000) -> BatchReport:
        """Turns until a claim finds nothing due: what ``outbox run`` does between two
        NOTIFYs, for tests and scripts. The report adds up the turns."""
        total = BatchReport()
        for _ in range(max_turns):
            report = self.process_batch()
            if not report.claimed:
                break
            total.claimed += report.claimed
            total.add(report)
        return total

    def process_batch(self) -> BatchReport:
        limit = claim_size(self.pace, claim_timeout=self.settings.claim_timeout,
                           batch_size=self.settings.batch_size)
        buckets = self._buckets()
        # A rate-limited lane always takes a lease: its bucket's row lock must last only as
        # long as the claim, not the publish.
        if not buckets:
            return self._process_locked(limit)
        claim = self.rng.getrandbits(63) or 1
        request = ClaimRequest(keys=self.lane.key_list(), limit=limit,
                               lease=self.settings.claim_timeout, owner=self.owner, claim=claim,
                               aging=self.settings.priority_aging, max_priority=self.max_priority)
        started = self.monotonic()
        with self.store.transaction() as tx:
            if buckets:
                assert isinstance(tx, LimitStoreTransaction)
                limit, wait = self._take_tokens(tx, buckets, limit)
                if not limit:
                    metrics.RATE_LIMITED.labels(self.lane.label).inc()
                    return BatchReport(token_wait=wait)
                request = replace(request, limit=limit)
            rows = tx.claim(request)
            if buckets:  # tokens the claim found no rows for go back
                assert isinstance(tx, LimitStoreTransaction)
                for bucket in buckets:
                    tx.return_tokens(bucket, limit - len(rows))
            if not rows:
                return BatchReport()
            metrics.BATCHES.inc()
            planned, report = self._plan(tx, rows, self.clock(), claim)
        self.leases.add(claim, started + self.settings.claim_timeout)
        try:
            report.add(self._publish_all(planned, claim))
        finally:
            self.leases.remove(claim)
        report.claimed = len(rows)
        report.full = len(rows) >= limit
        return report

    # -- rate limits ------------------------------------------------------------------------

    def _buckets(self) -> list[Bucket]:
        """The token buckets this claim draws from: each rate-limited transport of the lane
        (for a pool, its member serving now, which the pool is then told to publish through)."""
        self._through = {}
        buckets: list[Bucket] = []
        for name in self.lane.names:
            transport = self.transports.get(name)
            if transport is None:
                continue
            for bucket in buckets_for(transport):
                buckets.append(bucket)
                if is_pool(name):
                    self._through[name] = bucket.transport
        return buckets

    def _take_tokens(self, tx: LimitStoreTransaction, buckets: Sequence[Bucket],
                     want: int) -> tuple[int, float]:
        """Up to ``want`` tokens from every bucket (a fan-out needs one from each): the rows
        the claim may take, and the seconds until the next token when it may take none."""
        grants = [tx.take_tokens(bucket, want) for bucket in buckets]
        granted = min(count for count, _ in grants)
        for bucket, (count, _) in zip(buckets, grants, strict=True):
            tx.return_tokens(bucket, count - granted)  # a fan-out: the others' extra tokens
        if granted:
            return granted, 0.0
        wait = max(next_token_in(left, rate=bucket.rate)
                   for bucket, (_, left) in zip(buckets, grants, strict=True))
        return 0, wait

    def outage_pause(self) -> float:
        """Seconds to wait before the next claim after chunks the lane's transport could not
        deliver at all; a pool says when it next probes a member, and that is sooner."""
        pause = backoff_after_outage(self.outage)
        if not pause:
            return 0.0
        for name in self.lane.names:
            retry_after = getattr(self.transports.get(name), "retry_after", None)
            if callable(retry_after):
                pause = min(pause, float(retry_after()))
        return pause

    def _process_locked(self, limit: int) -> BatchReport:
        """Claim with row locks; then, by what was claimed and the lane's pace:

        * rows that publish within about a second (a broker's batch, an OTP or two) keep
          their locks: this one transaction claims, publishes and records them, no lease
          written (its two row versions would cost more than that second of locking);
        * any more (a device, a lane whose pace is not known yet) take a lease before the
          transaction commits, and are published outside it, chunk by chunk.

        Deciding on the rows claimed rather than on the claim's limit keeps an urgent lane,
        which claims a row or two at a time, on the short path however slow its pace."""
        request = ClaimRequest(keys=self.lane.key_list(), limit=limit,
                               lease=self.settings.claim_timeout, owner=self.owner, claim=0,
                               aging=self.settings.priority_aging, max_priority=self.max_priority)
        leased: int | None = None
        started = 0.0
        with self.store.transaction() as tx:
            rows = tx.claim_locked(request)
            if not rows:
                return BatchReport()
            metrics.BATCHES.inc()
            if not lease_free(self.pace, len(rows)):
                leased = self.rng.getrandbits(63) or 1
                started = self.monotonic()
                tx.lease(rows, replace(request, claim=leased))
                planned, report = self._plan(tx, rows, self.clock(), leased)
            else:
                planned, report = self._plan(tx, rows, self.clock(), None)
                if planned and not self.stopping():  # stopping: the commit lets the rows go as they were
                    published = time.perf_counter()
                    chunk_report, down, not_tried = self._publish_chunk(
                        planned, None, tx=tx, prebuilt=_envelopes(planned))
                    self.pace.observe(len(planned) - len(not_tried),
                                      time.perf_counter() - published)
                    report.add(chunk_report)
                    self.outage = self.outage + 1 if down else 0
        if leased is not None:
            # the deadline counts from before the lease was written: earlier than the database's
            self.leases.add(leased, started + self.settings.claim_timeout)
            try:
                report.add(self._publish_all(planned, leased))
            finally:
                self.leases.remove(leased)
        report.claimed = len(rows)
        report.full = len(rows) >= limit
        return report

    # -- planning: decode, validate, route, expire, draw OTPs -------------------------------

    def _plan(self, tx: StoreTransaction, rows: Sequence[ClaimedRow], now: float,
              claim: int | None) -> tuple[list[_Planned], BatchReport]:
        planned: list[_Planned] = []
        failed: list[Outcome] = []
        expired: list[Outcome] = []
        for row in rows:
            try:
                outcome = self._plan_row(tx, row, now)
            except Exception as exc:  # one row's surprise must not stop the rows behind it
                log.exception("message.unplannable", id=row.id, error=type(exc).__name__)
                outcome = Outcome(row.id, f"cannot be planned: {type(exc).__name__}", attempted=0)
            if isinstance(outcome, _Planned):
                planned.append(outcome)
            elif isinstance(outcome, _Expired):
                expired.append(outcome)
            else:
                failed.append(outcome)
        if self.receivers is not None and planned:
            assert isinstance(tx, LimitStoreTransaction)
            refused = self.receivers.screen(tx, [(p.row.id, p.command, p.data) for p in planned])
            if refused:
                failed.extend(Outcome(row_id, reason, attempted=0)
                              for row_id, reason in refused.items())
                planned = [p for p in planned if p.row.id not in refused]
        commands = {row.id: row.command for row in rows} if failed or expired else {}
        for outcome in failed:
            metrics.MESSAGES.labels(commands.get(outcome.id, "unknown"), "none", "failed").inc()
            log.error("message.failed", id=outcome.id, command=commands.get(outcome.id),
                      reason=outcome.reason)
        for outcome in expired:
            metrics.MESSAGES.labels(commands.get(outcome.id, "unknown"), "none", "expired").inc()
            log.warning("message.expired", id=outcome.id, reason=outcome.reason)
        tx.mark_failed(failed, claim)
        tx.mark_expired(expired, claim)
        return planned, BatchReport(failed=len(failed), expired=len(expired))

    def _plan_row(self, tx: StoreTransaction, row: ClaimedRow,  # noqa: PLR0911 - one per rule
                  now: float) -> _Planned | Outcome:
        data = row.data
        if type(data) is Undecodable:
            return Outcome(row.id, f"invalid command: data cannot be decoded ({data.reason})", 0)
        try:
            command = validate(row.command, data)
        except InvalidCommand as exc:
            return Outcome(row.id, f"invalid command: {exc.message}", attempted=0)
        expires_at = row.expires_at
        if expires_at is None and command == CREATE_OTP:
            expires_at = row.created_at + self.settings.otp_ttl
        if expires_at is not None and not expires_at > now:  # NaN too
            return _Expired(row.id, "expired before it could be published", 0)
        route = self._route(command, row.route)
        if route.problem is not None:
            return Outcome(row.id, route.problem, attempted=0)
        try:
            # encoded now: what cannot be encoded fails here, and a claim published within
            # a second (a broker's) sends these very bytes
            if len(route.names) == 1:  # the usual row, without the generic loops
                wire = self._wire(tx, row, command, data, route.names[0], expires_at)
                wires: tuple[tuple[str, str, Mapping[str, Any]], ...] = (wire,)
                envelopes: tuple[Envelope, ...] = (Envelope(
                    row.id, wire[1], self._encode(row, *wire, now, expires_at), row.attempts + 1),)
            else:
                wires = tuple(self._wire(tx, row, command, data, name, expires_at)
                              for name in route.names)
                envelopes = tuple(Envelope(row.id, wire[1], self._encode(row, *wire, now, expires_at),
                                           row.attempts + 1) for wire in wires)
        except InvalidCommand as exc:
            return Outcome(row.id, exc.message, attempted=0)
        except (TypeError, ValueError, OverflowError) as exc:
            return Outcome(row.id, f"invalid command: data cannot be encoded ({type(exc).__name__})",
                           attempted=0)
        return _Planned(row, command, data, route.label, expires_at, wires, envelopes, now)

    def _wire(self, tx: StoreTransaction, row: ClaimedRow, command: str, data: Any, name: str,
              expires_at: float | None) -> tuple[str, str, Mapping[str, Any]]:
        if command != CREATE_OTP:
            return name, command, data
        transport = self.transports[name]
        if is_pool(name) and transport.options.otp_mode is OtpMode.DEVICE:
            raise InvalidCommand(
                "otp_device_pool",
                f"pool {name!r} cannot keep device-mode OTPs (the code would live on whichever "
                "device served); set otp=managed on its members")
        if transport.options.otp_mode is OtpMode.MANAGED:
            if self.otp is None:
                raise InvalidCommand(
                    "otp_not_configured",
                    f"route {name!r} manages OTPs but no OTP secret is configured "
                    "(set OUTBOX_OTP_SECRET, or use otp=device on a REST transport)",
                )
            assert expires_at is not None
            wire_command, wire_data = self.otp.issue(tx, row._replace(data=data), expires_at)
            return name, wire_command, wire_data
        return name, command, data

    def _encode(self, row: ClaimedRow, name: str, command: str, data: Mapping[str, Any],
                now: float, expires_at: float | None) -> bytes:
        payload = wire_payload(command, data, message_id=row.id,
                               dialect=self.transports[name].options.dialect, now=now,
                               expires_at=expires_at)
        return encode(payload)

    # -- publishing, chunk by chunk ---------------------------------------------------------

    def _publish_all(self, planned: list[_Planned], claim: int) -> BatchReport:
        report = BatchReport()
        margin = lease_margin(self.settings.claim_timeout)
        remaining = planned
        done = 0
        while remaining:
            # What the pace now says this claim can finish in its budget; the rest goes back
            # at once, for any relay to take (the first claim of a lane is a guess).
            budget = claim_size(self.pace, claim_timeout=self.settings.claim_timeout,
                                batch_size=self.settings.batch_size)
            if done and len(remaining) > budget - done:
                keep = max(0, budget - done)
                self._hand_back([p.row for p in remaining[keep:]], claim, "over_budget")
                report.handed_back += len(remaining) - keep
                remaining = remaining[:keep]
                if not remaining:
                    break
            count = chunk_size(self.pace, remaining=len(remaining))
            reason = None
            if self.stopping():
                reason = "stopping"
            elif not lease_allows(now=self.monotonic(), deadline=self.leases.deadline(claim),
                                  rows=count, pace=self.pace, margin=margin):
                reason = "lease_running_out"
            if reason is not None:
                self._hand_back([p.row for p in remaining], claim, reason)
                report.handed_back += len(remaining)
                break
            chunk, remaining = remaining[:count], remaining[count:]
            started = time.perf_counter()
            chunk_report, down, not_tried = self._publish_chunk(chunk, claim)
            self.pace.observe(len(chunk) - len(not_tried), time.perf_counter() - started)
            done += len(chunk)
            report.add(chunk_report)
            if down:
                self.outage += 1
                rest = [p.row for p in remaining]
                self._hand_back(rest, claim, "transport_unreachable")
                report.handed_back += len(rest)
                break
            self.outage = 0
        return report

    def _publish_chunk(self, chunk: list[_Planned], claim: int | None, *,
                       tx: StoreTransaction | None = None,
                       prebuilt: dict[str, list[Envelope]] | None = None,
                       ) -> tuple[BatchReport, bool, list[ClaimedRow]]:
        """Publish one chunk and record it; (report, transport down, rows handed back).
        ``prebuilt``: the envelopes of a chunk published the moment it was planned."""
        now = self.clock()
        expired: list[Outcome] = []
        live: list[_Planned] = chunk if prebuilt is not None else []
        by_transport: dict[str, list[Envelope]] = prebuilt if prebuilt is not None else {}
        for planned in chunk if prebuilt is None else ():
            row = planned.row
            if planned.expires_at is not None and not planned.expires_at > now:
                expired.append(Outcome(row.id, "expired before it could be published", 0))
                continue
            live.append(planned)
            # A body encoded more than a chunk ago gets a fresh date_time: a device allows
            # an SMS only so long after it (30 s by default)
            fresh = now - planned.encoded_at <= CHUNK_BUDGET
            for wire, envelope in zip(planned.wires, planned.envelopes, strict=True):
                if not fresh:
                    envelope = envelope._replace(  # noqa: PLW2901 - a fresh copy of it
                        body=self._encode(row, *wire, now, planned.expires_at))
                by_transport.setdefault(wire[0], []).append(envelope)
        errors: dict[int, list[PublishError]] = {}
        down = False
        recovered = False
        served: dict[int, str] = {}
        for name, envelopes in by_transport.items():
            failures, raised = self._publish_to(name, envelopes)
            member = getattr(failures, "served_by", None)
            if member is not None:
                served.update((envelope.id, member) for envelope in envelopes
                              if envelope.id not in failures)
            if failures and len(failures) == len(envelopes) and _transport_down(
                    list(failures.values()), raised=raised):
                down = True
            elif len(failures) < len(envelopes) and self.outage:
                recovered = True
            for message_id, error in failures.items():
                errors.setdefault(message_id, []).append(error)
        not_tried = [p.row for p in live
                     if (row_errors := errors.get(p.row.id))
                     and all(isinstance(e, NotTried) for e in row_errors)] if errors else []
        report = self._record(live, errors, by_transport, expired, not_tried, claim,
                              recovered=recovered, tx=tx, served=served)
        return report, down, not_tried

    def _publish_to(self, name: str, envelopes: list[Envelope]
                    ) -> tuple[dict[int, PublishError], bool]:
        """The failures by row id, and whether the transport raised for the whole chunk."""
        transport = self.transports[name]
        started = time.perf_counter()
        raised = True
        try:
            through = self._through.get(name)
            if through is not None:
                failures = transport.publish(envelopes, through=through)  # type: ignore[call-arg]
            else:
                failures = transport.publish(envelopes)
            raised = False
        except PublishError as exc:
            failures = {envelope.id: exc for envelope in envelopes}
        except Exception as exc:  # a bug or an unmapped library error: retry, loudly
            log.exception("transport.unexpected_error", route=name, error=type(exc).__name__)
            unexpected = TransientPublishError(
                f"unexpected {type(exc).__name__} in transport {name!r}")
            failures = {envelope.id: unexpected for envelope in envelopes}
        metrics.PUBLISH_DURATION.labels(name).observe(time.perf_counter() - started)
        return failures, raised

    def _hand_back(self, rows: Sequence[ClaimedRow], claim: int, reason: str) -> None:
        if not rows:
            return
        with self.store.transaction() as tx:
            tx.hand_back(rows, claim)
        log.info("claim.handed_back", lane=self.lane.label, rows=len(rows), reason=reason)

    # -- recording -----------------------------------------------------------------------

    def _record(self, live: list[_Planned], errors: dict[int, list[PublishError]],
                sent_as: dict[str, list[Envelope]], expired: list[Outcome],
                not_tried: list[ClaimedRow], claim: int | None, *, recovered: bool,
                tx: StoreTransaction | None = None,
                served: Mapping[int, str] | None = None) -> BatchReport:
        now = self.clock()
        sent: list[int] = []
        log_sent = debug_enabled()
        retries: list[Rescheduled] = []
        failed: list[Outcome] = []
        handed = {row.id for row in not_tried}
        outcomes: Counter[tuple[str, str, str]] = Counter()
        delivered: dict[tuple[str, str], list[float]] = {}
        for planned in live:
            row, command, route = planned.row, planned.command, planned.route
            if row.id in handed:
                continue
            row_errors = errors.get(row.id)
            if not row_errors:
                sent.append(row.id)
                delivered.setdefault((command, route), []).append(now - row.created_at)
                if log_sent:
                    log.debug("message.sent", id=row.id, command=command, route=route,
                              attempt=row.attempts + 1)
                continue
            error = next((e for e in row_errors if not e.transient), row_errors[0])
            decision = decide(self.policy, error, attempts=row.attempts + 1, now=now,
                              expires_at=planned.expires_at, rng=self.rng)
            reason = redact(decision.reason, planned.data,
                            *(e.body for envelopes in sent_as.values() for e in envelopes
                              if e.id == row.id))
            if isinstance(decision, Retry):
                retries.append(Rescheduled(row.id, decision.at, reason))
                outcomes[command, route, "retry_scheduled"] += 1
                log.warning("message.retry_scheduled", id=row.id, command=command,
                            route=route, attempt=row.attempts + 1,
                            retry_in=round(decision.at - now, 3), reason=reason)
            elif isinstance(decision, Fail):
                failed.append(Outcome(row.id, reason))
                outcomes[command, route, "failed"] += 1
                log.error("message.failed", id=row.id, command=command, reason=reason)
            elif isinstance(decision, Expire):
                expired.append(Outcome(row.id, reason))
        for (command, route), lags in delivered.items():
            outcomes[command, route, "sent"] += len(lags)
            # a clock step backwards must not record a negative lag
            metrics.DELIVERY_LAG.observe_many(route, (lag if lag > 0 else 0.0 for lag in lags))
        commands = {p.row.id: (p.command, p.route) for p in live} if expired else {}
        for outcome in expired:
            command, route = commands.get(outcome.id, ("unknown", "none"))
            outcomes[command, route, "expired"] += 1
            log.warning("message.expired", id=outcome.id, reason=outcome.reason)
        with contextlib.ExitStack() as stack:
            if tx is None:
                tx = stack.enter_context(self.store.transaction())
            self._write_outcomes(tx, claim, sent=sent, retries=retries, failed=failed,
                                 expired=expired, not_tried=not_tried, recovered=recovered,
                                 served=served or {})
        for (command, route, state), count in outcomes.items():
            metrics.MESSAGES.labels(command, route, state).inc(count)
        return BatchReport(sent=len(sent), retried=len(retries), failed=len(failed),
                           expired=len(expired), handed_back=len(not_tried))

    def _write_outcomes(self, tx: StoreTransaction, claim: int | None, *, sent: list[int],
                        retries: list[Rescheduled], failed: list[Outcome],
                        expired: list[Outcome], not_tried: list[ClaimedRow],
                        recovered: bool, served: Mapping[int, str]) -> None:
        # Rows a pool delivered are marked with the member that delivered them.
        by_member: dict[str | None, list[int]] = {}
        for row_id in sent:
            by_member.setdefault(served.get(row_id), []).append(row_id)
        for member, ids in by_member.items():
            tx.mark_sent(ids, claim, served_by=member)
        tx.schedule_retry(retries, claim)
        tx.mark_failed(failed, claim)
        tx.mark_expired(expired, claim)
        if claim is not None:  # a locked row not tried is still where it was
            tx.hand_back(not_tried, claim)
        if recovered:
            self._release_retries(tx)

    def _release_retries(self, tx: StoreTransaction) -> None:
        """The lane delivers again: its rows that wait out a retry backoff go now, not
        minutes later when their timers say (backoff_max is ten minutes by default)."""
        keys = self.lane.key_list()
        released = 0
        while True:
            count = tx.release_retries(keys, RELEASE_BATCH)
            released += count
            if count < RELEASE_BATCH:
                break
        log.info("transport.recovered", route=self.lane.label, retries_released=released)


def _envelopes(planned: Sequence[_Planned]) -> dict[str, list[Envelope]]:
    """The envelopes of rows published the moment they were planned, by transport."""
    names = {item.wires[0][0] for item in planned}
    if len(names) == 1 and all(len(item.wires) == 1 for item in planned):  # one transport
        return {names.pop(): [item.envelopes[0] for item in planned]}
    by_transport: dict[str, list[Envelope]] = {}
    for item in planned:
        for wire, envelope in zip(item.wires, item.envelopes, strict=True):
            by_transport.setdefault(wire[0], []).append(envelope)
    return by_transport


def _transport_down(errors: list[PublishError], *, raised: bool) -> bool:
    """Whether a chunk that failed as a whole says the transport itself is down (rather than
    each message having its own transient trouble, like a device's 1101 for one row)."""
    if not all(error.transient for error in errors):
        return False
    return raised or len(errors) > 1 or all(isinstance(e, Unreachable) for e in errors)


def relay_identity() -> str:
    """How this relay process names itself in ``claimed_by`` and ``application_name``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _single_lane(settings: Settings, transports: Mapping[str, Transport]) -> Lane:
    """Every key of every configured lane: one worker that publishes everything (tests)."""
    lane = Lane("*", tuple(transports))
    for configured in configured_lanes(settings).values():
        for key in configured.key_list():
            lane.add_key(key)
    return lane


# --- running workers ----------------------------------------------------------------------


class RelayService:
    """Runs the lanes (``settings.workers`` threads each), woken by NOTIFY, until ``stop``."""

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        *,
        transports_factory: Callable[[Settings], Mapping[str, Transport]] | None = None,
        otp: OtpIssuer | None = None,
    ) -> None:
        """``transports_factory`` (tests) returns every transport; each lane keeps its own.
        By default a lane opens only the transports it publishes to."""
        self.settings = settings
        self.database_url = database_url
        self._factory = transports_factory
        self.otp = otp
        self.owner = relay_identity()
        self.leases = LeaseBook()
        self.lanes: dict[str, Lane] = {}
        self._wake_events: list[threading.Event] = []
        #: the express workers' events: a NOTIFY of an urgent row wakes only them
        self._express_events: list[threading.Event] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: monotonic time of each worker's last completed step, for /livez
        self._turns: dict[str, float] = {}
        self.errors: list[BaseException] = []

    @property
    def last_turn(self) -> float:
        """The oldest of the workers' last steps: /livez fails if any worker is stuck."""
        with self._lock:
            return min(self._turns.values(), default=time.monotonic())

    def _turned(self, worker: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._turns[worker] = now

    def run(self, stop: threading.Event) -> None:
        # Workers share one interpreter: a waiting thread gets the GIL back only when the
        # running one yields it, at the latest after the switch interval (5 ms by default).
        # An urgent lane's claim, publish and record take a dozen round trips, each waiting
        # for the GIL behind bulk workers: 1 ms keeps an OTP's path to its broker short.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.lanes = configured_lanes(self.settings)
        helpers = [
            threading.Thread(target=self._listen, args=(stop,), name="outbox-listen", daemon=True),
            threading.Thread(target=self._heartbeat, args=(stop,), name="outbox-heartbeat",
                             daemon=True),
            threading.Thread(target=self._discover, args=(stop,), name="outbox-lanes",
                             daemon=True),
        ]
        for lane in self.lanes.values():
            self._start_lane(lane, stop)
        log.info("relay.started", workers=self.settings.workers,
                 batch_size=self.settings.batch_size, transports=sorted(self.settings.transports),
                 lanes=sorted(self.lanes), claim_timeout=self.settings.claim_timeout)
        for thread in helpers:
            thread.start()
        announced = False

        def announce() -> None:
            # Logged here, not in the signal handler: see outbox.signals.
            nonlocal announced
            if stop.is_set() and not announced:
                announced = True
                log.info("relay.stopping", signal=getattr(stop, "signal_name", None))

        try:
            while True:
                with self._lock:
                    alive = [thread for thread in self._threads if thread.is_alive()]
                if not alive:
                    break
                if stop.is_set():
                    announce()
                    self._wake_all()  # workers idle in wait() see the stop at once
                alive[0].join(0.05)
            announce()
        finally:
            stop.set()
            self._wake_all()
            for thread in helpers:
                thread.join(2)
        log.info("relay.stopped")

    def _start_lane(self, lane: Lane, stop: threading.Event) -> None:
        """``workers`` threads for every row of the lane, and one express thread for the
        urgent ones: an OTP never waits for a bulk claim in flight (a device's request,
        or a broker's batch) to finish before it is claimed."""
        workers = [(f"outbox-{lane.label}-{index}", LOWEST_PRIORITY)
                   for index in range(self.settings.workers)]
        if self.settings.express_priority >= 0:
            workers.append((f"outbox-{lane.label}-express", self.settings.express_priority))
        for name, max_priority in workers:
            wake = threading.Event()
            thread = threading.Thread(target=self._work,
                                      args=(stop, wake, lane, name, max_priority), name=name)
            with self._lock:
                self._wake_events.append(wake)
                if max_priority < LOWEST_PRIORITY:
                    self._express_events.append(wake)
                self._threads.append(thread)
                self._turns[name] = time.monotonic()
            thread.start()

    def _wake_all(self) -> None:
        with self._lock:
            events = list(self._wake_events)
        for event in events:
            event.set()

    def _wake_for(self, payload: str) -> None:
        """Wake the workers a new row's NOTIFY concerns. Since migration 0015 the payload is
        the row's priority: a row the express workers claim wakes only them (the bulk workers
        of an idle lane would each run a claim for it and slow the one that wins), a less
        urgent row only the bulk workers (an express worker cannot claim it); a payload that
        is not a priority, an empty one included (an older schema), wakes everybody."""
        if not (len(payload) == 1 and payload.isdigit()):
            self._wake_all()
            return
        urgent = int(payload) <= self.settings.express_priority
        with self._lock:
            express = set(self._express_events)
            events = [event for event in self._wake_events if (event in express) is urgent]
        for event in events or self._wake_events:
            event.set()

    # -- LISTEN --------------------------------------------------------------------------

    def _listen(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                connection = self._connect_once(autocommit=True)
            except DatabaseUnavailable:
                stop.wait(1.0)
                continue
            try:
                with connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._wake_all()  # rows may have arrived while we were not listening
                    while not stop.is_set():
                        for notify in connection.notifies(timeout=0.5, stop_after=1):
                            self._wake_for(notify.payload)
            except psycopg.Error:
                log.warning("relay.listen_lost")
                stop.wait(0.5)

    # -- leases --------------------------------------------------------------------------

    def _heartbeat(self, stop: threading.Event) -> None:
        """Extend the leases of the claims being published, a third of the timeout apart."""
        interval = self.settings.claim_timeout / 3
        store: PostgresStore | None = None
        while not stop.wait(interval):
            claims = self.leases.claims()
            if not claims:
                continue
            started = time.monotonic()
            try:
                if store is None:
                    store = PostgresStore(self._connect_once(autocommit=False))
                held = store.extend_leases(claims, self.settings.claim_timeout)
            except (DatabaseUnavailable, psycopg.Error) as exc:
                log.warning("lease.extend_failed", claims=len(claims), error=type(exc).__name__)
                if store is not None:
                    _close_quietly(store)
                store = None
                continue
            # a claim that held nothing any more was taken over (or is fully recorded): its
            # deadline stays, and the worker hands nothing more of it to the transport
            self.leases.renewed(held, started + self.settings.claim_timeout)
        if store is not None:
            _close_quietly(store)

    # -- lanes nobody configured -----------------------------------------------------------

    def _discover(self, stop: threading.Event) -> None:
        """Look for lane keys of pending rows that no lane claims: a route written with
        spaces, a fan-out nobody configured, a route to no transport (those rows fail)."""
        store: PostgresStore | None = None
        while not stop.wait(max(DISCOVERY_INTERVAL, self.settings.poll_interval)):
            try:
                if store is None:
                    store = PostgresStore(self._connect_once(autocommit=False))
                keys = store.pending_lane_keys()
            except (DatabaseUnavailable, psycopg.Error):
                if store is not None:
                    _close_quietly(store)
                store = None
                continue
            known = {key for lane in self.lanes.values() for key in lane.key_list()}
            found = [key for key in keys if key not in known]
            for key in found:
                created = add_key(self.lanes, self.settings, key)
                log.info("lane.key_found", key_lane=resolve_key(self.settings, key)[0],
                         new_lane=created is not None)
                if created is not None and not stop.is_set():
                    self._start_lane(created, stop)
            if found:  # an existing lane has a key more: its idle workers claim it now
                self._wake_all()
        if store is not None:
            _close_quietly(store)

    # -- one worker ----------------------------------------------------------------------

    def _work(self, stop: threading.Event, wake: threading.Event, lane: Lane, worker: str,
              max_priority: int = LOWEST_PRIORITY) -> None:
        transports: Mapping[str, Transport] = {}
        relay: Relay | None = None
        _yield_to_urgent_threads(max_priority)
        try:
            # inside the try: a lane that cannot open its transports stops the service,
            # instead of leaving the other lanes running with an error nobody reports
            transports = self._open_transports(lane)
            _warm_up(transports, worker, max_priority)
            while not stop.is_set():
                if relay is None:
                    relay = self._connect(stop, transports, lane, worker, max_priority)
                    if relay is None:
                        return
                wake.clear()
                try:
                    report = relay.process_batch()
                    self._turned(worker)
                    # The rate's next token, or the transport's recovery: a NOTIFY must not
                    # wake us before either is due.
                    pause = report.token_wait or relay.outage_pause()
                    if pause:
                        stop.wait(pause)
                        continue
                    if report.full or (report.handed_back and not stop.is_set()):
                        continue
                    due = relay.store.next_due(lane.key_list(), max_priority)
                except psycopg.OperationalError as exc:
                    log.warning("relay.database_lost",
                                error=str(exc).splitlines()[0] if str(exc) else "")
                    _close_quietly(relay.store)
                    relay = None
                    continue
                timeout = self.settings.poll_interval if due is None else min(
                    self.settings.poll_interval, max(due, 0.0))
                if timeout > 0:
                    wake.wait(timeout)
                self._turned(worker)
        except BaseException as exc:
            self.errors.append(exc)
            log.exception("relay.crashed", error=type(exc).__name__)
            stop.set()
            raise
        finally:
            with self._lock:
                self._turns.pop(worker, None)
            if relay is not None:
                _close_quietly(relay.store)
            for transport in transports.values():
                try:
                    transport.close()
                except Exception:
                    log.warning("transport.close_failed", route=transport.name)

    def _open_transports(self, lane: Lane) -> Mapping[str, Transport]:
        if self._factory is None:
            return _open_named(self.settings, lane.names)
        return {name: transport for name, transport in self._factory(self.settings).items()
                if name in lane.names}

    def _connect_once(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        return connect(self.database_url, autocommit=autocommit,
                       application_name=f"outbox relay {self.owner}",
                       keepalive_timeout=self.settings.claim_timeout / 2)

    def _connect(self, stop: threading.Event, transports: Mapping[str, Transport], lane: Lane,
                 worker: str, max_priority: int = LOWEST_PRIORITY) -> Relay | None:
        def before_sleep(state: RetryCallState) -> None:
            # Waiting for the database is not being stuck: /livez stays green (/readyz not).
            self._turned(worker)
            log.warning("relay.database_unavailable", attempt=state.attempt_number)

        def nap(seconds: float) -> None:
            stop.wait(seconds)  # a stop request ends the wait at once

        retrying = Retrying(
            retry=retry_if_exception_type(DatabaseUnavailable),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            stop=lambda state: stop.is_set(),
            sleep=nap,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            connection = retrying(self._connect_once, autocommit=False)
        except DatabaseUnavailable:
            return None  # stop was set while waiting
        # The relay's own commits need not wait for the WAL flush: if the server crashes and
        # loses the last few "sent" marks, those rows are simply published again, which
        # at-least-once delivery allows. Nothing can be lost: the applications' INSERTs keep
        # their own (synchronous) durability. This halves the cost of a commit.
        # A relay never idles inside a transaction; should it freeze in one, the server ends
        # the session and its row locks go with it.
        connection.execute("SET synchronous_commit = off")
        # The claim's plan is cheap to run but estimated dear (a LIMIT over a lateral join):
        # above jit_above_cost Postgres would spend 50-70 ms compiling it for every batch.
        connection.execute("SET jit = off")
        # psycopg prepares a statement the fifth time a connection runs it; Postgres then
        # plans it again for every execution unless a generic plan looks as cheap, and for
        # the claim (a lateral join over the lane's keys and priorities) it never does: 1.5-2
        # ms of planning for every claim of a trickle, more than running it. The claim's
        # generic plan has the custom plan's shape (an index scan per lane key and priority;
        # checked with EXPLAIN EXECUTE at 100,000 rows), so it is planned once per connection.
        connection.execute("SET plan_cache_mode = force_generic_plan")
        connection.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
            (f"{int(self.settings.claim_timeout * 1000)}ms",))
        connection.commit()
        store = PostgresStore(connection, blank_texts=self.settings.blank_terminal_texts)
        return Relay(store, transports, self.settings, lane=lane, owner=self.owner,
                     leases=self.leases, otp=self.otp, stopping=stop.is_set,
                     max_priority=max_priority)


def _yield_to_urgent_threads(max_priority: int) -> None:
    """Run a bulk worker thread (one that claims every priority) at a lower CPU priority
    than the express workers and
    the LISTEN thread: on a saturated machine an OTP's dozen round trips then wait for the
    CPU behind nothing but their own. Raising one's own niceness needs no privilege; where
    the platform has no per-thread priority, nothing changes."""
    if max_priority < LOWEST_PRIORITY:
        return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICENESS)


def _warm_up(transports: Mapping[str, Transport], worker: str, max_priority: int) -> None:
    """Connect an express worker's transports now, in the background: the first OTP of a
    lane otherwise waits for the broker's connection and handshake (80-130 ms measured),
    behind nothing else. A failure is only logged: the first publish reconnects and
    reports it. In a thread of its own, so that a stop is never held up by a slow peer."""
    if max_priority >= LOWEST_PRIORITY:
        return  # a bulk worker: its first claim may as well connect

    def connect() -> None:
        for transport in transports.values():
            try:
                transport.check()
            except Exception as exc:  # the publish path reports and retries it
                log.info("transport.warm_up_failed", route=transport.name,
                         error=type(exc).__name__)

    threading.Thread(target=connect, name=f"{worker}-warm-up", daemon=True).start()


def _open_named(settings: Settings, names: Sequence[str]) -> dict[str, Transport]:
    """The lane's transports: each target, a pool built of fresh instances of its members."""
    opened: dict[str, Transport] = {}
    try:
        for name in names:
            opened[name] = open_target(name, settings)
    except BaseException:
        for transport in opened.values():
            transport.close()
        raise
    return opened


def _close_quietly(store: Store) -> None:
    with contextlib.suppress(OutboxError, psycopg.Error):
        store.close()


__all__ = [
    "UNROUTABLE",
    "BatchReport",
    "Lane",
    "LeaseBook",
    "OtpIssuer",
    "Relay",
    "RelayService",
    "configured_lanes",
    "relay_identity",
    "resolve_key",
]
