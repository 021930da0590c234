"""The operator's Python API: the outbox's status, and what to do with failed rows.

Every function takes a psycopg 3 connection. Functions that change rows work in batches of
``batch_size`` rows, one transaction each (``connection.transaction()``): on a connection
outside a transaction every batch commits on its own and holds its row locks only that
long; inside a caller's transaction the batches become savepoints and the caller commits.

::

    with psycopg.connect(url, autocommit=True) as connection:
        for row in list_failed(connection, FailedFilter(command="send-sms"), limit=20):
            print(row.id, row.receiver, row.last_error)   # receiver masked: "***90"
        retry_failed(connection, FailedFilter(ids=(41, 42)))

A retried row keeps its id, so a consumer that saw an earlier attempt recognises the repeat;
its attempts start again at 0 and it is due at once. The relays are woken by NOTIFY when
the batch commits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from outbox import operations_sql as sql
from outbox.commands import COMMANDS
from outbox.errors import ConfigurationError
from outbox.logs import get_logger, mask_receiver, scrub_text
from outbox.settings import DEFAULT_TRANSPORT, Settings

log = get_logger("outbox.admin")

STATES = ("pending", "failed", "sent", "expired")

#: Below this many table pages (about 80 MB) sent and expired rows are counted exactly.
EXACT_COUNT_MAX_PAGES = 10_000
#: The send rate is taken over this window ...
RATE_WINDOW_SECONDS = 300.0
#: ... or over the span of this many newest sent rows, whichever is shorter.
RATE_SAMPLE_CAP = 10_000

#: Called after each batch with the number of rows handled so far.
Progress = Callable[[int], None]


# --- routes --------------------------------------------------------------------------------


def effective_route(settings: Settings, command: str, route: str | None) -> str:
    """The route a row goes to, as the relay labels it: ``sms``, ``default``, ``a+b``."""
    try:
        return "+".join(settings.route_for(command, route))
    except ConfigurationError:  # a hand-written route like "+" must not break status
        return route or DEFAULT_TRANSPORT


def commands_routed_to(settings: Settings, route: str) -> list[str]:
    """The commands whose rows without a route of their own go to ``route``."""
    return [command for command in COMMANDS if effective_route(settings, command, None) == route]


# --- status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteBacklog:
    route: str
    pending: int
    #: pending and due now (not waiting for a retry or a scheduled time)
    due: int
    #: pending after at least one failed attempt
    retrying: int
    oldest_pending_age_seconds: float


@dataclass(frozen=True)
class SendRate:
    #: the span the rate was measured over (shorter than asked when many rows were sent)
    window_seconds: float
    sent: int
    per_second: float
    #: of those, the rows a failover pool's member delivered, by member
    by_pool_member: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TableHealth:
    """Whether retention and autovacuum keep the table in shape (statistics, approximate)."""

    total_bytes: int
    live_rows: int
    dead_rows: int
    #: since the last (auto)vacuum; None if it never ran
    vacuumed_seconds_ago: float | None
    #: False: autovacuum is off for the table, and the purging relay vacuums instead
    autovacuum: bool = True


@dataclass(frozen=True)
class RelayClaims:
    """The rows one relay holds leased."""

    relay: str
    rows: int
    #: rows whose lease ran out before the relay recorded them (frozen, crashed, cut off)
    expired: int
    #: how long ago the oldest of those leases ran out (0 when none has)
    expired_for_seconds: float


@dataclass(frozen=True)
class HeldKeys:
    """Ordering keys whose first row waits out a retry, holding back the rows behind it."""

    keys: int
    rows_behind: int


@dataclass(frozen=True)
class Status:
    counts: Mapping[str, int | None]
    #: the states whose count is the planner's estimate, not a count
    estimated: tuple[str, ...]
    routes: tuple[RouteBacklog, ...]
    rate: SendRate
    table: TableHealth
    measured_at: datetime
    #: pending rows by priority (0 most urgent)
    priorities: Mapping[int, int] = field(default_factory=dict)
    claims: tuple[RelayClaims, ...] = ()
    held_keys: HeldKeys = HeldKeys(0, 0)

    @property
    def oldest_pending_age_seconds(self) -> float | None:
        ages = [route.oldest_pending_age_seconds for route in self.routes]
        return max(ages) if ages else None

    def as_json(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "estimated": list(self.estimated),
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds,
            "routes": {route.route: {k: v for k, v in asdict(route).items() if k != "route"}
                       for route in self.routes},
            "rate": asdict(self.rate),
            "table": asdict(self.table),
            "measured_at": self.measured_at.isoformat(),
            "pending_by_priority": {str(p): n for p, n in self.priorities.items()},
            "claims": {c.relay: {"rows": c.rows, "expired": c.expired,
                                 "expired_for_seconds": c.expired_for_seconds}
                       for c in self.claims},
            "held_ordering_keys": asdict(self.held_keys),
        }


def pending_by_route(connection: psycopg.Connection[Any],
                     settings: Settings) -> dict[str, RouteBacklog]:
    """Pending rows per effective route. Reads only pending rows (the claim index)."""
    with connection.transaction():
        rows = connection.execute(sql.PENDING_BY_ROUTE).fetchall()
    merged: dict[str, list[float]] = {}
    for route, command, pending, due, retrying, age in rows:
        totals = merged.setdefault(effective_route(settings, command, route), [0, 0, 0, 0.0])
        totals[0] += pending
        totals[1] += due
        totals[2] += retrying
        totals[3] = max(totals[3], float(age or 0.0))
    return {route: RouteBacklog(route, int(t[0]), int(t[1]), int(t[2]), max(t[3], 0.0))
            for route, t in sorted(merged.items())}


def read_status(connection: psycopg.Connection[Any], settings: Settings) -> Status:
    """Rows per state, pending rows per route and the send rate, without a full count.

    Pending and failed rows are counted exactly through their partial indexes. Sent and
    expired rows are counted exactly while the table is small; beyond that they are the
    planner's estimate (named in ``Status.estimated``), from the statistics autovacuum keeps.
    """
    routes = pending_by_route(connection, settings)
    with connection.transaction():
        failed = _scalar(connection, sql.COUNT_FAILED)
        terminal, estimated = _terminal_counts(connection)
        rate = _send_rate(connection)
        table = _table_health(connection)
        priorities = {int(p): int(n) for p, n in connection.execute(sql.PENDING_BY_PRIORITY)}
        claims = tuple(RelayClaims(str(relay), int(rows), int(expired), max(float(age or 0), 0.0))
                       for relay, rows, expired, age in connection.execute(sql.CLAIMS_BY_RELAY))
        held = connection.execute(sql.HELD_ORDERING_KEYS).fetchone()
        measured_at = connection.execute(sql.SERVER_NOW).fetchone()
    counts: dict[str, int | None] = {
        "pending": sum(route.pending for route in routes.values()),
        "failed": failed,
        **terminal,
    }
    return Status(counts, estimated, tuple(routes.values()), rate, table,
                  measured_at[0] if measured_at else datetime.now(UTC), priorities, claims,
                  HeldKeys(int(held[0]), int(held[1])) if held else HeldKeys(0, 0))


def _terminal_counts(connection: psycopg.Connection[Any]) -> tuple[dict[str, int | None],
                                                                    tuple[str, ...]]:
    row = connection.execute(sql.ESTIMATE_STATES).fetchone()
    assert row is not None
    reltuples, relpages, pages_now, values, freqs = row
    if pages_now <= EXACT_COUNT_MAX_PAGES:
        exact = connection.execute(sql.COUNT_TERMINAL_EXACTLY).fetchone()
        assert exact is not None
        return {"sent": int(exact[0]), "expired": int(exact[1])}, ()
    if reltuples is None or reltuples < 0 or relpages <= 0 or not values:
        # Never analysed: no estimate to give, and a count would read the whole table.
        return {"sent": None, "expired": None}, ("sent", "expired")
    total = reltuples / relpages * pages_now
    frequency = dict(zip(values, freqs, strict=False))
    return ({state: round(total * frequency.get(state, 0.0)) for state in ("sent", "expired")},
            ("sent", "expired"))


def _send_rate(connection: psycopg.Connection[Any]) -> SendRate:
    row = connection.execute(sql.RECENT_SENT, {"window": RATE_WINDOW_SECONDS,
                                               "cap": RATE_SAMPLE_CAP}).fetchone()
    sent = int(row[0]) if row else 0
    window = RATE_WINDOW_SECONDS
    if row and sent >= RATE_SAMPLE_CAP and row[1]:
        window = max(float(row[1]), 0.001)
    members = {str(member): int(count) for member, count in connection.execute(
        sql.RECENT_SENT_BY_MEMBER, {"window": RATE_WINDOW_SECONDS, "cap": RATE_SAMPLE_CAP})}
    return SendRate(round(window, 3), sent, round(sent / window, 3), members)


def _table_health(connection: psycopg.Connection[Any]) -> TableHealth:
    row = connection.execute(sql.TABLE_HEALTH).fetchone()
    if row is None:
        return TableHealth(0, 0, 0, None)
    size, live, dead, vacuumed = row
    autovacuum = connection.execute(sql.AUTOVACUUM_STATE).fetchone()
    return TableHealth(int(size), int(live), int(dead),
                       None if vacuumed is None else round(float(vacuumed), 1),
                       autovacuum=bool(autovacuum[0]) if autovacuum else True)


def _scalar(connection: psycopg.Connection[Any], statement: str,
            params: Mapping[str, Any] | None = None) -> int:
    row = connection.execute(statement, params).fetchone()
    return int(row[0]) if row else 0


# --- failed rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedFilter:
    """Which failed rows: every condition given must hold. No condition: every failed row."""

    ids: tuple[int, ...] = ()
    command: str | None = None
    #: the effective route (a row without one matches its command's configured route)
    route: str | None = None
    #: created more than this many seconds ago
    older_than: float | None = None
    #: created at most this many seconds ago
    newer_than: float | None = None
    #: the last error contains this text (any case)
    reason: str | None = None

    @property
    def is_everything(self) -> bool:
        return not self.ids and self.command is None and self.route is None \
            and self.older_than is None and self.newer_than is None and not self.reason

    def params(self, settings: Settings) -> dict[str, Any]:
        return {
            "ids": list(self.ids) or None,
            "command": self.command,
            "route": self.route,
            "route_commands": commands_routed_to(settings, self.route) if self.route else [],
            "older_than": self.older_than,
            "newer_than": self.newer_than,
            "reason": self.reason or None,
        }


@dataclass(frozen=True)
class FailedRow:
    id: int
    command: str
    route: str
    #: masked: only the last two characters are shown
    receiver: str | None
    attempts: int
    created_at: datetime
    expires_at: datetime | None
    #: the reason, with any receiver quoted in it masked
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["created_at"] = self.created_at.isoformat()
        shown["expires_at"] = self.expires_at.isoformat() if self.expires_at else None
        return shown


def count_failed(connection: psycopg.Connection[Any], where: FailedFilter = FailedFilter(),
                 *, settings: Settings | None = None) -> int:
    settings = settings or Settings()
    with connection.transaction():
        return _scalar(connection, sql.COUNT_FAILED_MATCHING, where.params(settings))


def list_failed(connection: psycopg.Connection[Any], where: FailedFilter = FailedFilter(),
                *, settings: Settings | None = None, limit: int = 100) -> list[FailedRow]:
    """The newest failed rows matching ``where``, receivers masked."""
    settings = settings or Settings()
    with connection.transaction():
        rows = connection.execute(sql.LIST_FAILED,
                                  {**where.params(settings), "limit": limit}).fetchall()
    return [
        FailedRow(id=row_id, command=command, route=effective_route(settings, command, route),
                  receiver=mask_receiver(receiver), attempts=attempts, created_at=created_at,
                  expires_at=expires_at,
                  last_error=scrub_text(last_error) if last_error is not None else None)
        for row_id, command, route, receiver, attempts, created_at, expires_at, last_error
        in rows
    ]


def retry_failed(connection: psycopg.Connection[Any], where: FailedFilter = FailedFilter(),
                 *, settings: Settings | None = None, batch_size: int = 1000,
                 progress: Progress | None = None) -> int:
    """Make the matching failed rows pending again, ids kept, attempts reset; wake the relays.

    Each row is retried at most once per call, even if a relay fails it again meanwhile.
    Returns the number of rows retried.
    """
    retried = _in_batches(connection, sql.RETRY_FAILED_BATCH, where, settings, batch_size,
                          progress, wake=True)
    log.info("failed.retried", rows=retried)
    return retried


def discard_failed(connection: psycopg.Connection[Any], where: FailedFilter = FailedFilter(),
                   *, settings: Settings | None = None, batch_size: int = 1000,
                   progress: Progress | None = None) -> int:
    """Delete the matching failed rows. Returns the number of rows deleted."""
    discarded = _in_batches(connection, sql.DISCARD_FAILED_BATCH, where, settings, batch_size,
                            progress, wake=False)
    log.info("failed.discarded", rows=discarded)
    return discarded


_BEFORE_EVERYTHING = datetime(1, 1, 1, tzinfo=UTC)


def _in_batches(connection: psycopg.Connection[Any], statement: str, where: FailedFilter,
                settings: Settings | None, batch_size: int, progress: Progress | None,
                *, wake: bool) -> int:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    params = {**where.params(settings or Settings()), "limit": batch_size,
              "after_created": _BEFORE_EVERYTHING, "after_id": 0}
    done = 0
    while True:
        with connection.transaction():
            row = connection.execute(statement, params).fetchone()
            if row is None:  # nothing left after the keyset
                break
            changed, params["after_created"], params["after_id"] = row
            if wake and changed:
                connection.execute(sql.WAKE_RELAYS, (sql.CHANNEL,))
        done += int(changed)
        if progress is not None:
            progress(done)
    return done


def parse_ids(values: Iterable[str]) -> tuple[int, ...]:
    """``["3", "5,8"]`` -> ``(3, 5, 8)``; a helper for command lines."""
    ids: list[int] = []
    for value in values:
        for part in (item.strip() for item in value.split(",")):
            if not part:
                continue
            number = int(part) if part.isdigit() else 0
            if number < 1:
                raise ValueError(f"{part!r} is not a row id")
            ids.append(number)
    return tuple(ids)


__all__ = [
    "FailedFilter",
    "FailedRow",
    "RouteBacklog",
    "SendRate",
    "Status",
    "TableHealth",
    "commands_routed_to",
    "count_failed",
    "discard_failed",
    "effective_route",
    "list_failed",
    "parse_ids",
    "pending_by_route",
    "read_status",
    "retry_failed",
]
