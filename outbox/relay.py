"""The relay: claim committed rows, publish them, record what happened.

One :class:`Relay` is one worker with its own database connection and its own transport
connections. :class:`RelayService` runs several workers side by side plus one LISTEN
connection that wakes them when an application commits new rows; polling stays as the
fallback. Several processes, on one host or many, share the work through ``SKIP LOCKED``:
Postgres is the only coordinator.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import psycopg
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from outbox import metrics
from outbox.commands import COMMANDS, CREATE_OTP, encode, validate, wire_payload
from outbox.db import connect
from outbox.errors import (
    DatabaseUnavailable,
    InvalidCommand,
    OutboxError,
    PublishError,
    TransientPublishError,
)
from outbox.logs import debug_enabled, get_logger, redact
from outbox.retry import Expire, Fail, Retry, RetryPolicy, decide
from outbox.settings import Settings
from outbox.store import (
    CHANNEL,
    ClaimedRow,
    Outcome,
    PostgresStore,
    Rescheduled,
    Store,
    StoreTransaction,
)
from outbox.transports import Envelope, OtpMode, Transport, open_transports

log = get_logger("outbox.relay")

#: rows made due per statement when a transport is back (all of them go, in such steps)
RELEASE_BATCH = 10_000


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


class _Planned(NamedTuple):
    row: ClaimedRow
    command: str
    #: the transport name(s) it goes to, joined with "+" (the metrics' route label)
    route: str
    expires_at: float | None


class _Route(NamedTuple):
    """Where rows of one (command, row route) go, worked out once per relay."""

    names: tuple[str, ...]
    label: str
    #: the first name that is no configured transport, if any
    missing: str | None


@dataclass
class _Plan:
    by_transport: dict[str, list[Envelope]] = field(default_factory=dict)
    rows: dict[int, _Planned] = field(default_factory=dict)
    failed: list[Outcome] = field(default_factory=list)
    expired: list[Outcome] = field(default_factory=list)
    #: transports that delivered again after a batch they could not deliver at all
    recovered: list[str] = field(default_factory=list)


class Relay:
    """One worker. ``process_batch`` is one claim-publish-record cycle in one transaction."""

    def __init__(
        self,
        store: Store,
        transports: Mapping[str, Transport],
        settings: Settings,
        *,
        otp: OtpIssuer | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.transports = transports
        self.settings = settings
        self.otp = otp
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = RetryPolicy(settings.backoff_base, settings.backoff_max, settings.max_attempts)
        self._routes: dict[tuple[str, str | None], _Route] = {}
        #: transports whose last batch failed as a whole (transiently): unreachable
        self._down: set[str] = set()

    def _route(self, command: str, row_route: str | None) -> _Route:
        route = self._routes.get((command, row_route))
        if route is None:
            names = self.settings.route_for(command, row_route)
            missing = next((name for name in names if name not in self.transports), None)
            route = self._routes[command, row_route] = _Route(names, "+".join(names), missing)
        return route

    def process_batch(self) -> BatchReport:
        with self.store.transaction() as tx:
            rows = tx.claim_batch(self.settings.batch_size)
            if not rows:
                return BatchReport()
            metrics.BATCHES.inc()
            now = self.clock()
            plan = self._plan(tx, rows, now)
            errors = self._publish(plan)
            return self._record(tx, plan, errors, self.clock())

    # -- planning: validate, route, expire, encode ------------------------------------------

    def _plan(self, tx: StoreTransaction, rows: Sequence[ClaimedRow], now: float) -> _Plan:
        plan = _Plan()
        for row in rows:
            try:
                command = validate(row.command, row.data)
            except InvalidCommand as exc:
                plan.failed.append(Outcome(row.id, f"invalid command: {exc.message}", attempted=0))
                continue
            expires_at = row.expires_at
            if expires_at is None and command == CREATE_OTP:
                expires_at = row.created_at + self.settings.otp_ttl
            if expires_at is not None and expires_at <= now:
                plan.expired.append(Outcome(row.id, "expired before it could be published", 0))
                continue
            route = self._route(command, row.route)
            if route.missing is not None:
                plan.failed.append(Outcome(
                    row.id, f"route {route.missing!r} names no configured transport", attempted=0))
                continue
            try:
                envelopes = [(name, self._envelope(tx, row, command, name, now, expires_at))
                             for name in route.names]
            except InvalidCommand as exc:
                plan.failed.append(Outcome(row.id, exc.message, attempted=0))
                continue
            plan.rows[row.id] = _Planned(row, command, route.label, expires_at)
            for name, envelope in envelopes:
                plan.by_transport.setdefault(name, []).append(envelope)
        return plan

    def _envelope(self, tx: StoreTransaction, row: ClaimedRow, command: str, route: str,
                  now: float, expires_at: float | None) -> Envelope:
        transport = self.transports[route]
        data: Mapping[str, Any] = row.data
        wire_command = command
        if command == CREATE_OTP and transport.options.otp_mode is OtpMode.MANAGED:
            if self.otp is None:
                raise InvalidCommand(
                    "otp_not_configured",
                    f"route {route!r} manages OTPs but no OTP secret is configured "
                    "(set OUTBOX_OTP_SECRET, or use otp=device on a REST transport)",
                )
            assert expires_at is not None
            wire_command, data = self.otp.issue(tx, row, expires_at)
        payload = wire_payload(wire_command, data, message_id=row.id,
                               dialect=transport.options.dialect, now=now, expires_at=expires_at)
        return Envelope(row.id, wire_command, encode(payload), attempt=row.attempts + 1)

    # -- a transport back from an outage ---------------------------------------------------

    def _release_retries(self, tx: StoreTransaction, name: str) -> None:
        """``name`` delivers again: the rows that wait out a retry backoff for it go now,
        not minutes later when their timers say (backoff_max is ten minutes by default)."""
        commands = [command for command in COMMANDS
                    if name in self.settings.route_for(command, None)]
        released = 0
        while True:
            count = tx.release_retries(name, commands, RELEASE_BATCH)
            released += count
            if count < RELEASE_BATCH:
                break
        log.info("transport.recovered", route=name, retries_released=released)

    # -- publishing ----------------------------------------------------------------------

    def _publish(self, plan: _Plan) -> dict[int, list[PublishError]]:
        errors: dict[int, list[PublishError]] = {}
        for name, envelopes in plan.by_transport.items():
            transport = self.transports[name]
            started = time.perf_counter()
            try:
                failures = transport.publish(envelopes)
            except PublishError as exc:
                failures = {envelope.id: exc for envelope in envelopes}
            except Exception as exc:  # a bug or an unmapped library error: retry, loudly
                log.exception("transport.unexpected_error", route=name, error=type(exc).__name__)
                unexpected = TransientPublishError(
                    f"unexpected {type(exc).__name__} in transport {name!r}")
                failures = {envelope.id: unexpected for envelope in envelopes}
            metrics.PUBLISH_DURATION.labels(name).observe(time.perf_counter() - started)
            if len(failures) == len(envelopes) and all(e.transient for e in failures.values()):
                self._down.add(name)
            elif name in self._down and len(failures) < len(envelopes):
                self._down.discard(name)
                plan.recovered.append(name)
            for message_id, error in failures.items():
                errors.setdefault(message_id, []).append(error)
        return errors

    # -- recording -----------------------------------------------------------------------

    def _record(self, tx: StoreTransaction, plan: _Plan, errors: dict[int, list[PublishError]],
                now: float) -> BatchReport:
        sent: list[int] = []
        log_sent = debug_enabled()
        retries: list[Rescheduled] = []
        failed = list(plan.failed)
        expired = list(plan.expired)
        outcomes: Counter[tuple[str, str, str]] = Counter()
        #: (command, route) -> lags of the rows sent
        delivered: dict[tuple[str, str], list[float]] = {}
        for message_id, (row, command, route, expires_at) in plan.rows.items():
            row_errors = errors.get(message_id)
            if not row_errors:
                sent.append(message_id)
                delivered.setdefault((command, route), []).append(now - row.created_at)
                if log_sent:
                    log.debug("message.sent", id=message_id, command=command, route=route,
                              attempt=row.attempts + 1)
                continue
            error = next((e for e in row_errors if not e.transient), row_errors[0])
            decision = decide(self.policy, error, attempts=row.attempts + 1, now=now,
                              expires_at=expires_at, rng=self.rng)
            reason = _redacted(decision.reason, plan, message_id)
            if isinstance(decision, Retry):
                retries.append(Rescheduled(message_id, decision.at, reason))
                outcomes[command, route, "retry_scheduled"] += 1
                log.warning("message.retry_scheduled", id=message_id, command=command,
                            route=route, attempt=row.attempts + 1,
                            retry_in=round(decision.at - now, 3), reason=reason)
            elif isinstance(decision, Fail):
                failed.append(Outcome(message_id, reason))
            elif isinstance(decision, Expire):
                expired.append(Outcome(message_id, reason))
        for (command, route), lags in delivered.items():
            outcomes[command, route, "sent"] += len(lags)
            # a clock step backwards must not record a negative lag
            metrics.DELIVERY_LAG.observe_many(route, (lag if lag > 0 else 0.0 for lag in lags))
        for outcome in failed:
            planned = plan.rows.get(outcome.id)
            command, route = (planned.command, planned.route) if planned else ("unknown", "none")
            outcomes[command, route, "failed"] += 1
            log.error("message.failed", id=outcome.id, command=command, reason=outcome.reason)
        for outcome in expired:
            planned = plan.rows.get(outcome.id)
            command, route = (planned.command, planned.route) if planned else ("unknown", "none")
            outcomes[command, route, "expired"] += 1
            log.warning("message.expired", id=outcome.id, reason=outcome.reason)
        tx.mark_sent(sent)
        tx.schedule_retry(retries)
        tx.mark_failed(failed)
        tx.mark_expired(expired)
        for name in plan.recovered:
            self._release_retries(tx, name)
        for (command, route, state), count in outcomes.items():
            metrics.MESSAGES.labels(command, route, state).inc(count)
        claimed = len(plan.rows) + len(plan.failed) + len(plan.expired)
        return BatchReport(claimed=claimed, sent=len(sent), retried=len(retries),
                           failed=len(failed), expired=len(expired))


# --- running workers ----------------------------------------------------------------------


class RelayService:
    """Runs ``settings.workers`` relays in threads, woken by NOTIFY, until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        *,
        transports_factory: Callable[[Settings], Mapping[str, Transport]] = open_transports,
        otp: OtpIssuer | None = None,
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.transports_factory = transports_factory
        self.otp = otp
        self._wake_events: list[threading.Event] = []
        #: monotonic time of the last completed loop turn, for /livez
        self.last_turn = time.monotonic()
        self.errors: list[BaseException] = []

    def run(self, stop: threading.Event) -> None:
        threads = [threading.Thread(target=self._listen, args=(stop,), name="outbox-listen",
                                    daemon=True)]
        for index in range(self.settings.workers):
            wake = threading.Event()
            self._wake_events.append(wake)
            threads.append(threading.Thread(target=self._work, args=(stop, wake),
                                            name=f"outbox-worker-{index}"))
        log.info("relay.started", workers=self.settings.workers,
                 batch_size=self.settings.batch_size, transports=sorted(self.settings.transports))
        for thread in threads:
            thread.start()
        announced = False

        def announce() -> None:
            # Logged here, not in the signal handler: see outbox.signals.
            nonlocal announced
            if stop.is_set() and not announced:
                announced = True
                log.info("relay.stopping", signal=getattr(stop, "signal_name", None))

        try:
            for thread in threads[1:]:
                while thread.is_alive():
                    if stop.is_set():
                        announce()
                        self._wake_all()  # workers idle in wait() see the stop at once
                    thread.join(0.05)
            announce()
        finally:
            stop.set()
            self._wake_all()
            threads[0].join(2)
        log.info("relay.stopped")

    def _wake_all(self) -> None:
        for event in self._wake_events:
            event.set()

    # -- LISTEN --------------------------------------------------------------------------

    def _listen(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                connection = connect(self.database_url, autocommit=True)
            except DatabaseUnavailable:
                stop.wait(1.0)
                continue
            try:
                with connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._wake_all()  # rows may have arrived while we were not listening
                    while not stop.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            self._wake_all()
            except psycopg.Error:
                log.warning("relay.listen_lost")
                stop.wait(0.5)

    # -- one worker ----------------------------------------------------------------------

    def _work(self, stop: threading.Event, wake: threading.Event) -> None:
        transports = self.transports_factory(self.settings)
        relay: Relay | None = None
        try:
            while not stop.is_set():
                if relay is None:
                    relay = self._connect(stop, transports)
                    if relay is None:
                        return
                wake.clear()
                try:
                    report = relay.process_batch()
                    self.last_turn = time.monotonic()
                    if report.claimed >= self.settings.batch_size:
                        continue
                    due = relay.store.next_due()
                except psycopg.OperationalError as exc:
                    log.warning("relay.database_lost", error=str(exc).splitlines()[0] if str(exc) else "")
                    _close_quietly(relay.store)
                    relay = None
                    continue
                timeout = self.settings.poll_interval if due is None else min(
                    self.settings.poll_interval, max(due, 0.0))
                if timeout > 0:
                    wake.wait(timeout)
        except BaseException as exc:
            self.errors.append(exc)
            log.exception("relay.crashed", error=type(exc).__name__)
            stop.set()
            raise
        finally:
            if relay is not None:
                _close_quietly(relay.store)
            for transport in transports.values():
                try:
                    transport.close()
                except Exception:
                    log.warning("transport.close_failed", route=transport.name)

    def _connect(self, stop: threading.Event, transports: Mapping[str, Transport]) -> Relay | None:
        def before_sleep(state: RetryCallState) -> None:
            # Waiting for the database is not being stuck: /livez stays green (/readyz not).
            self.last_turn = time.monotonic()
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
            connection = retrying(connect, self.database_url)
        except DatabaseUnavailable:
            return None  # stop was set while waiting
        # The relay's own commits need not wait for the WAL flush: if the server crashes and
        # loses the last few "sent" marks, those rows are simply published again, which
        # at-least-once delivery allows. Nothing can be lost: the applications' INSERTs keep
        # their own (synchronous) durability. This halves the cost of a batch's commit.
        connection.execute("SET synchronous_commit = off")
        connection.commit()
        store = PostgresStore(connection, blank_texts=self.settings.blank_terminal_texts)
        return Relay(store, transports, self.settings, otp=self.otp)


def _redacted(reason: str, plan: _Plan, message_id: int) -> str:
    """A transport's reason without the row's receiver, texts or OTP code, should it quote
    them: the reason is stored in ``last_error`` and logged. Failure paths only."""
    sent = [envelope.body for envelopes in plan.by_transport.values()
            for envelope in envelopes if envelope.id == message_id]
    return redact(reason, plan.rows[message_id].row.data, *sent)


def _close_quietly(store: Store) -> None:
    with contextlib.suppress(OutboxError, psycopg.Error):
        store.close()


__all__ = ["BatchReport", "OtpIssuer", "Relay", "RelayService"]
