"""Retention: sent and expired rows go after ``sent_retention``, failed rows after
``failed_retention``; pending rows are never touched.

Rows are deleted oldest first, ``batch_size`` per transaction, each batch locking only the
rows it deletes (``FOR UPDATE SKIP LOCKED``: a row someone else holds is left for the next
run, never waited for). The space they took is reused once autovacuum has been by, so the
table's size levels off at about one retention period of traffic.

One process purges at a time: :func:`purge` first takes a session-level advisory lock on its
connection and returns ``None`` when another relay (or ``outbox purge``) holds it. Relays call
it every ``purge_interval`` from their housekeeping thread; ``outbox purge`` calls it once.

Deleted rows only become reusable space once VACUUM has been by. Autovacuum does that (the
migrations tune it for this table); where it is switched off, for the server or the table,
the purger runs ``VACUUM (ANALYZE) outbox.message`` itself, still under the lock, when dead
rows pass the same 1 % autovacuum would wait for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import psycopg

from outbox import metrics
from outbox import operations_sql as sql
from outbox.logs import get_logger
from outbox.settings import PERSONAL_COMMANDS, Settings

log = get_logger("outbox.retention")

DEFAULT_BATCH_SIZE = 1000
#: Without autovacuum, vacuum once dead rows pass this many plus ...
VACUUM_THRESHOLD = 1000
#: ... this share of the live rows (the autovacuum settings of migration 0003).
VACUUM_SCALE_FACTOR = 0.01


@dataclass(frozen=True)
class PurgeReport:
    sent: int = 0
    expired: int = 0
    failed: int = 0
    #: managed OTP records (outbox.otp) expired longer than the sent retention ago
    otps: int = 0
    #: counted, not deleted
    dry_run: bool = False
    #: stopped early (``on_batch`` returned False); the rest waits for the next run
    interrupted: bool = False

    @property
    def total(self) -> int:
        return self.sent + self.expired + self.failed

    def __add__(self, other: PurgeReport) -> PurgeReport:
        return replace(self, sent=self.sent + other.sent, expired=self.expired + other.expired,
                       failed=self.failed + other.failed, otps=self.otps + other.otps)


#: Called after every batch with the running totals; returning False stops the purge there.
OnBatch = Callable[[PurgeReport], bool | None]


def count_purgeable(connection: psycopg.Connection[Any], settings: Settings) -> PurgeReport:
    """What :func:`purge` would delete now, for ``--dry-run``."""
    with connection.transaction():
        row = connection.execute(sql.COUNT_PURGEABLE, _ages(settings)).fetchone()
    assert row is not None
    return PurgeReport(sent=int(row[0]), expired=int(row[1]), failed=int(row[2]), dry_run=True)


def purge(connection: psycopg.Connection[Any], settings: Settings, *,
          batch_size: int = DEFAULT_BATCH_SIZE, on_batch: OnBatch | None = None,
          ) -> PurgeReport | None:
    """Delete what retention allows, in batches; ``None`` if another process is purging.

    ``connection`` must not be inside a transaction: every batch commits on its own, and the
    advisory lock lives as long as the session (it is released before returning).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("purge() commits batch by batch: give it a connection outside a "
                         "transaction")
    if not _try_lock(connection):
        log.debug("retention.skipped", reason="another process is purging")
        return None
    try:
        with connection.transaction():
            cutoffs = connection.execute(sql.PURGE_CUTOFFS, _ages(settings)).fetchone()
        assert cutoffs is not None
        report = PurgeReport()
        for statement, cutoff in ((sql.PURGE_TERMINAL_BATCH, cutoffs[0]),
                                  (sql.PURGE_FAILED_BATCH, cutoffs[1])):
            report = _purge_older_than(connection, statement, cutoff, batch_size, report,
                                       on_batch)
            if report.interrupted:
                break
        if not report.interrupted:
            report = _purge_otps(connection, cutoffs[0], batch_size, report)
            _purge_receiver_window(connection, settings, batch_size)
        if not report.interrupted:
            vacuum_if_nobody_does(connection)
    finally:
        _unlock(connection)
    if report.total:
        log.info("retention.purged", sent=report.sent, expired=report.expired,
                 failed=report.failed, otps=report.otps, interrupted=report.interrupted)
    return report


_BEFORE_EVERYTHING = datetime(1, 1, 1, tzinfo=UTC)

#: places in receivers' limit windows are kept at least this long (a relay whose settings
#: name a longer window than the purging relay's still finds its places)
RECEIVER_WINDOW_KEEP = 86400.0


def _purge_receiver_window(connection: psycopg.Connection[Any], settings: Settings,
                           batch_size: int) -> None:
    windows = [limit.period for command in PERSONAL_COMMANDS
               if (limit := settings.receiver_limit_for(command)) is not None]
    keep = max([RECEIVER_WINDOW_KEEP, *windows])
    while True:
        with connection.transaction():
            deleted = connection.execute(sql.PURGE_RECEIVER_WINDOW_BATCH,
                                         {"keep": keep, "limit": batch_size}).rowcount
        if deleted < batch_size:
            return


def _purge_older_than(connection: psycopg.Connection[Any], statement: str, cutoff: datetime,
                      batch_size: int, report: PurgeReport,
                      on_batch: OnBatch | None) -> PurgeReport:
    params = {"cutoff": cutoff, "after_created": _BEFORE_EVERYTHING, "limit": batch_size}
    while True:
        with connection.transaction():
            row = connection.execute(statement, params).fetchone()
        assert row is not None
        sent, expired, failed, last_created = row
        if last_created is None:  # nothing older than the cutoff is left
            return report
        params["after_created"] = last_created
        batch = PurgeReport(sent=int(sent), expired=int(expired), failed=int(failed))
        for state in ("sent", "expired", "failed"):
            if getattr(batch, state):
                metrics.PURGED.labels(state).inc(getattr(batch, state))
        report = report + batch
        if on_batch is not None and on_batch(report) is False:
            return replace(report, interrupted=True)


def _purge_otps(connection: psycopg.Connection[Any], cutoff: datetime, batch_size: int,
                report: PurgeReport) -> PurgeReport:
    while True:
        with connection.transaction():
            deleted = connection.execute(sql.PURGE_OTP_BATCH,
                                         {"cutoff": cutoff, "limit": batch_size}).rowcount
        if deleted > 0:
            metrics.PURGED_OTPS.inc(deleted)
            report = replace(report, otps=report.otps + deleted)
        if deleted < batch_size:
            return report


def vacuum_if_nobody_does(connection: psycopg.Connection[Any]) -> bool:
    """VACUUM the table when autovacuum is off and dead rows pass its threshold; True if it
    did. Only on an autocommit connection: VACUUM cannot run inside a transaction."""
    if not connection.autocommit:
        return False
    row = connection.execute(sql.AUTOVACUUM_STATE).fetchone()
    if row is None:
        return False
    autovacuum, live, dead = row
    if autovacuum or dead <= VACUUM_THRESHOLD + VACUUM_SCALE_FACTOR * live:
        return False
    started = time.monotonic()
    connection.execute(sql.VACUUM_TABLE)
    log.info("retention.vacuumed", dead_rows=int(dead), live_rows=int(live),
             seconds=round(time.monotonic() - started, 3), reason="autovacuum is off")
    return True


def _ages(settings: Settings) -> dict[str, float]:
    return {"sent": settings.sent_retention, "failed": settings.failed_retention}


def _try_lock(connection: psycopg.Connection[Any]) -> bool:
    with connection.transaction():
        row = connection.execute(sql.TRY_RETENTION_LOCK).fetchone()
    return bool(row and row[0])


def _unlock(connection: psycopg.Connection[Any]) -> None:
    if connection.closed:
        return  # the lock went with the session
    try:
        with connection.transaction():
            connection.execute(sql.RELEASE_RETENTION_LOCK)
    except psycopg.OperationalError:
        pass  # the connection broke: the server dropped the session and its lock


__all__ = ["DEFAULT_BATCH_SIZE", "OnBatch", "PurgeReport", "count_purgeable", "purge",
           "vacuum_if_nobody_does"]
