"""The relay process's background chores, on one database connection of their own.

* Every few seconds (when metrics are served) it samples the backlog into the gauges
  ``outbox_pending_messages{route}``, ``outbox_oldest_pending_age_seconds{route}`` and
  ``outbox_failed_messages``. The queries read only pending and failed rows through their
  partial indexes; if one still takes long (a huge backlog), sampling slows down so that it
  never costs more than about 5 % of one database backend.
* Every ``purge_interval`` it runs retention (:func:`outbox.retention.purge`): one relay at a
  time across all hosts, through an advisory lock. ``purge_interval = 0`` leaves retention to
  ``outbox purge`` run from cron or a timer.

A database outage here never stops the relay: the thread logs, waits and reconnects.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox import admin, metrics
from outbox import operations_sql as sql
from outbox.commands import COMMANDS
from outbox.db import connect
from outbox.errors import ConfigurationError, DatabaseUnavailable
from outbox.logs import get_logger
from outbox.retention import PurgeReport, purge
from outbox.settings import Settings, route_names

log = get_logger("outbox.housekeeping")

#: Seconds between two samples of the backlog gauges, at the least.
SAMPLE_INTERVAL = 5.0
#: A sample may cost at most this share of the time between samples.
SAMPLE_DUTY = 0.05
#: The route label of pending rows whose route names no configured transport.
UNROUTABLE = "unroutable"


def route_labels(settings: Settings) -> set[str]:
    """The closed set of route labels: each command's route and each transport."""
    labels = {admin.effective_route(settings, command, None) for command in COMMANDS}
    return labels | set(settings.transports) | {UNROUTABLE}


def route_label(settings: Settings, route: str) -> str:
    """``route`` if it is made of configured transports, else ``unroutable``."""
    try:
        names = route_names(route)
    except ConfigurationError:
        return UNROUTABLE
    return route if all(name in settings.transports for name in names) else UNROUTABLE


class BacklogSampler:
    """Sets the backlog gauges from one cheap look at pending and failed rows."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._labels = route_labels(settings)

    def sample(self, connection: psycopg.Connection[Any]) -> None:
        pending: dict[str, int] = dict.fromkeys(self._labels, 0)
        oldest: dict[str, float] = dict.fromkeys(self._labels, 0.0)
        for backlog in admin.pending_by_route(connection, self.settings).values():
            label = route_label(self.settings, backlog.route)
            pending[label] = pending.get(label, 0) + backlog.pending
            oldest[label] = max(oldest.get(label, 0.0), backlog.oldest_pending_age_seconds)
        with connection.transaction():
            row = connection.execute(sql.COUNT_FAILED).fetchone()
        for label, rows in pending.items():
            metrics.PENDING.labels(label).set(rows)
            metrics.OLDEST_PENDING_AGE.labels(label).set(oldest[label])
        metrics.FAILED.set(int(row[0]) if row else 0)
        self._labels |= pending.keys()  # a fan-out route seen once is reset to 0 later


class Housekeeper:
    """Runs the sampler and retention until ``stop`` is set (a thread's target)."""

    def __init__(self, settings: Settings, database_url: str, *, sample_metrics: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.database_url = database_url
        self.sampler = BacklogSampler(settings) if sample_metrics else None
        self.purges = settings.purge_interval > 0
        self.clock = clock
        self._next_sample = 0.0
        self._sample_interval = SAMPLE_INTERVAL
        # Relays started together (a deployment) should not all try to purge at once.
        self._next_purge = clock() + random.uniform(0, min(settings.purge_interval, 10.0))

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="outbox-housekeeping",
                                  daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        if self.sampler is None and not self.purges:
            return
        connection: psycopg.Connection[Any] | None = None
        while not stop.is_set():
            try:
                if connection is None:
                    connection = connect(self.database_url, autocommit=True)
                self._turn(connection, stop)
            except (DatabaseUnavailable, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning("housekeeping.database_lost", error=_first_line(exc))
                _close(connection)
                connection = None
                stop.wait(2.0)
            except Exception as exc:  # a bug must not take the relay down with it
                log.exception("housekeeping.failed", error=type(exc).__name__)
                _close(connection)
                connection = None
                stop.wait(self.settings.purge_interval or SAMPLE_INTERVAL)
        _close(connection)

    def _turn(self, connection: psycopg.Connection[Any], stop: threading.Event) -> None:
        self._sample_if_due(connection)
        if self.purges and self.clock() >= self._next_purge:
            def between_batches(report: PurgeReport) -> bool:
                self._sample_if_due(connection)
                return not stop.is_set()

            purge(connection, self.settings, on_batch=between_batches)
            self._next_purge = self.clock() + self.settings.purge_interval
        due = [self._next_purge] if self.purges else []
        if self.sampler is not None:
            due.append(self._next_sample)
        stop.wait(max(min(due) - self.clock(), 0.05))

    def _sample_if_due(self, connection: psycopg.Connection[Any]) -> None:
        if self.sampler is None or self.clock() < self._next_sample:
            return
        started = self.clock()
        self.sampler.sample(connection)
        took = self.clock() - started
        self._sample_interval = max(SAMPLE_INTERVAL, took / SAMPLE_DUTY)
        self._next_sample = self.clock() + self._sample_interval


def _close(connection: psycopg.Connection[Any] | None) -> None:
    if connection is not None:
        with contextlib.suppress(psycopg.Error):
            connection.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["SAMPLE_INTERVAL", "UNROUTABLE", "BacklogSampler", "Housekeeper", "route_label",
           "route_labels"]
