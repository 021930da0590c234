"""Prometheus metrics. Labels come only from closed sets: command, route (a configured
transport name), outcome. Never a receiver, a text or an id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, disable_created_metrics

from outbox import __version__

# The ``*_created`` series (a timestamp per counter child) double what every scrape carries
# and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

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
DELIVERY_LAG = Histogram(
    "outbox_delivery_lag_seconds",
    "From the row's creation to the transport's confirmation.",
    ["route"],
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
    "PUBLISH_DURATION",
    "PURGED",
    "PURGED_OTPS",
]
