"""What the operator's console shows and records, as a Python API beside :mod:`outbox.admin`.

The counts per state and route are :func:`outbox.admin.read_status` (``outbox status``):
exact for pending and failed rows, the planner's estimate for sent and expired rows on a
large table. :func:`read_overview` adds the last hour per minute, the delivery lag and failed
and expired rows per route (pending rows per priority, the relays' claims and held ordering
keys come with the status); every statement reads through a partial index
(see :mod:`outbox.dashboard_sql`), so the overview stays fast on a table of millions of rows.

Retrying and discarding go through :func:`act`, which calls :mod:`outbox.admin` and records
who did what to how many rows in ``outbox.audit`` (``outbox failed retry|discard`` records
there too, through :func:`record_action`). Receivers come out masked, reasons
scrubbed of personal data; message texts, subjects and OTP codes never leave the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from outbox import admin
from outbox import dashboard_sql as sql
from outbox.admin import FailedFilter, Status, effective_route
from outbox.logs import get_logger, mask_receiver, scrub_text
from outbox.settings import Settings, pool_members
from outbox.transports import configured_pools

log = get_logger("outbox.dashboard")

#: the chart's span
CHART_MINUTES = 60
#: the delivery lag is taken over the sent rows of this window ...
LAG_WINDOW_SECONDS = 300.0
#: ... at most this many of the newest
LAG_SAMPLE_CAP = 10_000
#: reasons are grouped on their first this many characters
REASON_WIDTH = 120

Action = Literal["retry", "discard"]
ACTIONS: tuple[Action, ...] = ("retry", "discard")


@dataclass(frozen=True)
class MinuteOutcomes:
    minute: datetime
    sent: int
    failed: int
    expired: int

    @property
    def total(self) -> int:
        return self.sent + self.failed + self.expired


@dataclass(frozen=True)
class DeliveryLag:
    """Seconds from a row's creation to the transport's confirmation; None without rows."""

    p50_seconds: float | None
    p99_seconds: float | None
    #: sent rows measured
    sample: int
    window_seconds: float


@dataclass(frozen=True)
class Check:
    """One transport's (or the database's) health, as ``/readyz`` reports it."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class PoolState:
    """A failover pool (``a|b|c``) and which member serves it."""

    pool: str
    members: tuple[str, ...]
    #: the member that delivered the pool's newest row in the window; None: no row yet
    serving: str | None
    #: rows each member delivered in the window
    recent: dict[str, int]
    last_sent_at: datetime | None
    window_seconds: float

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["members"] = list(self.members)
        shown["last_sent_at"] = self.last_sent_at.isoformat() if self.last_sent_at else None
        return shown


def pool_states(pools: Sequence[str], deliveries: Sequence[tuple[str, int, datetime]],
                window_seconds: float) -> tuple[PoolState, ...]:
    """Which member serves each pool: the one that delivered its newest row (pure)."""
    by_member = {member: (int(count), last) for member, count, last in deliveries}
    states = []
    for pool in pools:
        members = pool_members(pool)
        seen = [(by_member[m][1], m) for m in members if m in by_member]
        last, serving = max(seen) if seen else (None, None)
        states.append(PoolState(pool, members, serving,
                                {m: by_member.get(m, (0, None))[0] for m in members}, last,
                                window_seconds))
    return tuple(states)


@dataclass(frozen=True)
class Overview:
    status: Status
    failed_by_route: dict[str, int]
    expired_by_route: dict[str, int]
    per_minute: tuple[MinuteOutcomes, ...]
    lag: DeliveryLag
    health: tuple[Check, ...] = ()
    #: the configured failover pools; empty where there are none
    pools: tuple[PoolState, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status.as_json(),
            "failed_by_route": dict(self.failed_by_route),
            "expired_by_route": dict(self.expired_by_route),
            "per_minute": [{"minute": m.minute.isoformat(), "sent": m.sent, "failed": m.failed,
                            "expired": m.expired} for m in self.per_minute],
            "lag": asdict(self.lag),
            "health": [asdict(check) for check in self.health],
            "pools": [pool.as_json() for pool in self.pools],
        }


def read_overview(connection: psycopg.Connection[Any], settings: Settings, *,
                  health: Sequence[Check] = (), minutes: int = CHART_MINUTES) -> Overview:
    """Everything the overview page shows but the transports' health (passed in: it comes
    from probing the transports, not from the database)."""
    status = admin.read_status(connection, settings)
    with connection.transaction():
        connection.execute(sql.WITHOUT_JIT)
        ended_rows = connection.execute(sql.ENDED_BY_ROUTE).fetchall()
        per_minute = tuple(
            MinuteOutcomes(minute, int(sent), int(failed), int(expired))
            for minute, sent, failed, expired
            in connection.execute(sql.OUTCOMES_PER_MINUTE, {"minutes": minutes}).fetchall())
        lag = _delivery_lag(connection)
        pools = configured_pools(settings)
        deliveries = connection.execute(sql.RECENT_DELIVERIES_BY_MEMBER, {
            "window": admin.RATE_WINDOW_SECONDS, "cap": admin.RATE_SAMPLE_CAP}).fetchall() \
            if pools else []
    ended: dict[str, dict[str, int]] = {"failed": {}, "expired": {}}
    for route, command, state, count in ended_rows:
        name = effective_route(settings, command, route)
        ended[state][name] = ended[state].get(name, 0) + int(count)
    return Overview(status, dict(sorted(ended["failed"].items())),
                    dict(sorted(ended["expired"].items())), per_minute, lag, tuple(health),
                    pool_states(pools, deliveries, admin.RATE_WINDOW_SECONDS))


def _delivery_lag(connection: psycopg.Connection[Any]) -> DeliveryLag:
    row = connection.execute(sql.DELIVERY_LAG, {"window": LAG_WINDOW_SECONDS,
                                                "cap": LAG_SAMPLE_CAP}).fetchone()
    p50, p99, sample = row if row else (None, None, 0)
    return DeliveryLag(None if p50 is None else round(float(p50), 4),
                       None if p99 is None else round(float(p99), 4), int(sample or 0),
                       LAG_WINDOW_SECONDS)


# --- one row -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowDetail:
    id: int
    command: str
    route: str
    state: str
    #: masked: only the last two characters are shown
    receiver: str | None
    attempts: int
    created_at: datetime
    available_at: datetime
    expires_at: datetime | None
    sent_at: datetime | None
    #: scrubbed of receivers
    last_error: str | None
    dedup_key: str | None
    #: the names of the data fields (never their values)
    fields: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        for name in ("created_at", "available_at", "expires_at", "sent_at"):
            value = getattr(self, name)
            shown[name] = value.isoformat() if value else None
        shown["fields"] = list(self.fields)
        return shown


def read_row(connection: psycopg.Connection[Any], settings: Settings,
             row_id: int) -> RowDetail | None:
    with connection.transaction():
        row = connection.execute(sql.ROW_DETAIL, {"id": row_id}).fetchone()
    if row is None:
        return None
    (row_id, command, route, state, receiver, attempts, created_at, available_at, expires_at,
     sent_at, last_error, dedup_key, fields) = row
    return RowDetail(
        id=int(row_id), command=command, route=effective_route(settings, command, route),
        state=state, receiver=mask_receiver(receiver), attempts=int(attempts),
        created_at=created_at, available_at=available_at, expires_at=expires_at,
        sent_at=sent_at, last_error=None if last_error is None else scrub_text(last_error),
        dedup_key=None if dedup_key is None else scrub_text(dedup_key),
        fields=tuple(fields or ()))


def common_failure_reasons(connection: psycopg.Connection[Any],
                           limit: int = 10) -> list[tuple[str, int]]:
    """The commonest reasons failed rows carry (their first words, masked), most first."""
    with connection.transaction():
        rows = connection.execute(sql.COMMON_FAILURE_REASONS,
                                  {"width": REASON_WIDTH, "limit": limit}).fetchall()
    return [(scrub_text(reason), int(count)) for reason, count in rows]


# --- actions and the audit trail ------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    rows: int
    filter: dict[str, Any]
    source: str

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["at"] = self.at.isoformat()
        return shown

    def describe(self) -> str:
        """The filter in words: ``command send-sms, older than 3600 s``."""
        return describe_filter(self.filter)


def filter_record(where: FailedFilter) -> dict[str, Any]:
    """The filter as the audit trail keeps it: only the conditions given, reason masked."""
    record: dict[str, Any] = {}
    if where.ids:
        record["ids"] = list(where.ids)
    for name in ("command", "route", "older_than", "newer_than"):
        value = getattr(where, name)
        if value is not None:
            record[name] = value
    if where.reason:
        record["reason"] = scrub_text(where.reason)
    return record


def describe_filter(record: dict[str, Any]) -> str:
    if not record:
        return "every failed row"
    words = {"command": "command", "route": "route", "older_than": "older than",
             "newer_than": "newer than", "reason": "reason contains"}
    parts = []
    for name, value in record.items():
        if name == "ids":
            ids = [str(item) for item in value]
            parts.append("id " + ", ".join(ids[:10]) + (f" and {len(ids) - 10} more"
                                                        if len(ids) > 10 else ""))
        elif name in ("older_than", "newer_than"):
            parts.append(f"{words[name]} {_age(float(value))}")
        else:
            parts.append(f"{words.get(name, name)} {value}")
    return ", ".join(parts)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def act(connection: psycopg.Connection[Any], settings: Settings, *, actor: str,
        action: Action, where: FailedFilter, source: str = "console") -> AuditEntry:
    """Retry or discard the failed rows matching ``where`` and record it in the audit trail.

    The rows change in batches, each its own transaction (see :mod:`outbox.admin`); the
    record follows with the number of rows actually changed, which may differ from a count
    shown before if relays failed or other operators retried rows meanwhile.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (expected retry or discard)")
    operation = admin.retry_failed if action == "retry" else admin.discard_failed
    changed = operation(connection, where, settings=settings)
    entry = record_action(connection, actor=actor, action=action, where=where, rows=changed,
                          source=source)
    log.info("console.action", action=action, rows=changed, actor=actor, audit_id=entry.id)
    return entry


def record_action(connection: psycopg.Connection[Any], *, actor: str, action: Action,
                  where: FailedFilter, rows: int, source: str) -> AuditEntry:
    """Write one action to the audit trail (``outbox failed retry|discard`` does too)."""
    record = filter_record(where)
    with connection.transaction():
        row = connection.execute(sql.RECORD_ACTION, {
            "actor": actor, "action": action, "rows": rows, "filter": Jsonb(record),
            "source": source}).fetchone()
    assert row is not None
    entry = AuditEntry(int(row[0]), row[1], actor, action, rows, record, source)
    # debug: the operation logged its own event (failed.retried, console.action)
    log.debug("audit.recorded", action=action, rows=rows, actor=actor, source=source,
              audit_id=entry.id)
    return entry


def recent_actions(connection: psycopg.Connection[Any], limit: int = 50) -> list[AuditEntry]:
    with connection.transaction():
        rows = connection.execute(sql.RECENT_ACTIONS, {"limit": limit}).fetchall()
    return [_entry(row) for row in rows]


def find_action(connection: psycopg.Connection[Any], audit_id: int) -> AuditEntry | None:
    with connection.transaction():
        row = connection.execute(sql.FIND_ACTION, {"id": audit_id}).fetchone()
    return None if row is None else _entry(row)


def _entry(row: Sequence[Any]) -> AuditEntry:
    audit_id, at, actor, action, rows, record, source = row
    return AuditEntry(int(audit_id), at, actor, action, int(rows), dict(record or {}), source)


__all__ = [
    "ACTIONS",
    "AuditEntry",
    "Check",
    "DeliveryLag",
    "MinuteOutcomes",
    "Overview",
    "PoolState",
    "RowDetail",
    "act",
    "common_failure_reasons",
    "describe_filter",
    "filter_record",
    "find_action",
    "pool_states",
    "read_overview",
    "read_row",
    "recent_actions",
    "record_action",
]
