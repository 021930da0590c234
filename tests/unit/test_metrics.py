"""The batch histogram must expose exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import math
import random
import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from outbox.metrics import BatchHistogram

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_the_exposition_matches_a_histogram_fed_one_value_at_a_time() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("lag_seconds", "Lag.", "route", BUCKETS, registry=ours)
    single = Histogram("lag_seconds", "Lag.", ["route"], buckets=BUCKETS, registry=theirs)
    rng = random.Random(7)
    # on the bounds themselves (le is inclusive), below the first, above the last
    values = {"sms": [0.0, 0.001, 0.01, 0.1, 1.0, 10.0, 10.5, 1e6,
                      *(rng.expovariate(3) for _ in range(500))],
              "mail": [rng.uniform(0, 20) for _ in range(100)]}
    for route, observations in values.items():
        for start in range(0, len(observations), 64):
            batch.observe_many(route, observations[start:start + 64])
        for observation in observations:
            single.labels(route).observe(observation)
    batch.labels("otp")  # a series at zero, as a child created without observations
    single.labels("otp")
    mine, reference = exposition(ours), exposition(theirs)
    assert [line for line in mine if "_sum" not in line] == \
        [line for line in reference if "_sum" not in line]
    # the sums differ only in the order of the float additions
    assert [line.split()[0] for line in mine if "_sum" in line] == \
        [line.split()[0] for line in reference if "_sum" in line]
    for route in values:
        assert math.isclose(ours.get_sample_value("lag_seconds_sum", {"route": route}) or -1,
                            theirs.get_sample_value("lag_seconds_sum", {"route": route}) or -2)


def test_concurrent_batches_are_all_counted() -> None:
    registry = CollectorRegistry()
    batch = BatchHistogram("lag_seconds", "Lag.", "route", BUCKETS, registry=registry)

    def feed() -> None:
        for _ in range(200):
            batch.observe_many("sms", [0.005] * 10)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.get_sample_value("lag_seconds_count", {"route": "sms"}) == 8000
    assert registry.get_sample_value("lag_seconds_bucket", {"route": "sms", "le": "0.001"}) == 0
    assert registry.get_sample_value("lag_seconds_bucket", {"route": "sms", "le": "0.01"}) == 8000
