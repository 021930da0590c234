"""Prometheus metrics. Labels come only from closed sets: command, route (a configured
transport name), outcome. Never a receiver, a text or an id."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from outbox import __version__

# The ``*_created`` series (a timestamp per counter child) double what every scrape carries
# and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream


class BatchHistogram:
    """A histogram with one label that takes a whole batch of observations per call.

    prometheus_client's ``Histogram.observe`` takes one value under a lock, 0.8 µs a value:
    once per message, that was a tenth of the relay's own CPU. The exposition is the same
    (``_bucket`` with ``le``, ``_count``, ``_sum``); ``labels(value)`` creates a series at
    zero, as a Histogram's child does.
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float],
                 registry: CollectorRegistry = REGISTRY) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._bounds = tuple(float(bound) for bound in buckets)
        self._lock = threading.Lock()
        #: label value -> per-bucket counts (not cumulative; the last is +Inf) and the sum
        self._series: dict[str, tuple[list[int], list[float]]] = {}
        registry.register(self)

    def labels(self, value: str) -> None:
        with self._lock:
            self._series.setdefault(value, ([0] * (len(self._bounds) + 1), [0.0]))

    def observe_many(self, value: str, observations: Iterable[float]) -> None:
        bounds = self._bounds
        counts = [0] * (len(bounds) + 1)
        total = 0.0
        for observation in observations:
            counts[bisect_left(bounds, observation)] += 1  # le: value <= bound
            total += observation
        with self._lock:
            series = self._series.get(value)
            if series is None:
                series = self._series[value] = ([0] * len(counts), [0.0])
            kept = series[0]
            for index, count in enumerate(counts):
                kept[index] += count
            series[1][0] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        with self._lock:
            snapshot = [(value, list(counts), sums[0])
                        for value, (counts, sums) in self._series.items()]
        for value, counts, total in snapshot:
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, count in zip((*map(floatToGoString, self._bounds), "+Inf"), counts,
                                    strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([value], buckets, total)
        yield family


MESSAGES = Counter(
    "outbox_messages",
    "Messages that reached an outcome, by command, route and outcome "
    "(sent, retry_scheduled, failed, expired).",
    ["command", "route", "outcome"],
)
PUBLISH_DURATION = Histogram(
    "outbox_publish_duration_seconds",
    "Time one transport took to publish and confirm one batch.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DELIVERY_LAG = BatchHistogram(
    "outbox_delivery_lag_seconds",
    "From the row's creation to the transport's confirmation.",
    "route",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
             300, 1800, 3600),
)
PENDING = Gauge("outbox_pending_messages", "Pending rows, by route.", ["route"])
OLDEST_PENDING_AGE = Gauge(
    "outbox_oldest_pending_age_seconds", "Age of the oldest pending row, by route.", ["route"]
)
BATCHES = Counter("outbox_batches", "Batches claimed by this process.")
FAILED = Gauge("outbox_failed_messages",
               "Failed rows kept for inspection (outbox failed list), all routes.")
PURGED = Counter("outbox_purged_messages", "Rows deleted by retention, by state.", ["state"])
PURGED_OTPS = Counter("outbox_purged_otps", "Managed OTP records deleted by retention.")
POOL_DELIVERIES = Counter(
    "outbox_pool_deliveries",
    "Messages a failover pool's member delivered, by pool (route label) and member.",
    ["pool", "member"],
)
POOL_MEMBER_UP = Gauge(
    "outbox_pool_member_up",
    "1 while a failover pool counts the member as up, 0 while it is down.",
    ["pool", "member"],
)
RATE_LIMITED = Counter(
    "outbox_rate_limited_claims",
    "Claims that found a transport's token bucket empty and waited, by route.",
    ["route"],
)
BUILD_INFO = Info("outbox_build", "Version of the outbox relay.")
BUILD_INFO.info({"version": __version__})

__all__ = [
    "BATCHES",
    "BUILD_INFO",
    "DELIVERY_LAG",
    "FAILED",
    "MESSAGES",
    "OLDEST_PENDING_AGE",
    "PENDING",
    "POOL_DELIVERIES",
    "POOL_MEMBER_UP",
    "PUBLISH_DURATION",
    "PURGED",
    "PURGED_OTPS",
    "RATE_LIMITED",
    "BatchHistogram",
]
