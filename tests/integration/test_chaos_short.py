"""Short versions of ``make chaos`` (bench/chaos.py), so that CI guards the guarantees.

A real ``outbox run`` process publishes to a real broker while a real subscriber records every
message id; the relay is SIGKILLed, or its broker connection is cut, or its (private) broker is
stopped, in the middle of the traffic. The table is the record of what was enqueued: every
committed row must reach the subscriber. Nothing here asserts on timing.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.brokers import (
    AMQP_URL,
    amqp_device,
    close_amqp_connections,
    rabbitmqctl,
    unique_topic,
    wait_until,
    with_query,
)
from tests.support.chaos import (
    DurableMqttSubscriber,
    PrivateMosquitto,
    Producer,
    committed_ids,
    pending_rows,
    relay_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: bounds on waiting for the system to settle; generous, they are not measurements
SETTLE = 90.0


def sent_rows(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute(
        "SELECT count(*) FROM outbox.message WHERE state = 'sent'").fetchone()[0])


def received_ids(device: Any) -> list[int]:
    return [int(message.message_id) for message in list(device.received)]


def test_sigkill_during_a_drain_loses_nothing(clean_db: str, conn: psycopg.Connection[Any],
                                              tmp_path: Path) -> None:
    topic = unique_topic("outbox-chaos")
    kills = 3
    with amqp_device(topic) as device, \
            relay_process(clean_db, with_query(AMQP_URL, topic=topic), tmp_path) as relay:
        producer = Producer(clean_db, total=3000, rate=600)
        producer.start()
        for _ in range(kills):
            # a backlog builds up while the relay restarts; kill it while it drains that
            # backlog (right after it has marked rows sent), so kills land mid-batch
            time.sleep(random.uniform(0.2, 0.6))
            before = sent_rows(conn)
            wait_until(lambda: sent_rows(conn) > before, SETTLE)  # noqa: B023
            time.sleep(random.uniform(0.0, 0.1))
            relay.kill()
            relay.start()
        producer.join(SETTLE)
        assert producer.error is None
        assert wait_until(lambda: pending_rows(conn) == 0, SETTLE), "rows left unsent"
        enqueued = committed_ids(conn)
        assert len(enqueued) == 3000
        assert wait_until(lambda: enqueued <= set(received_ids(device)), SETTLE)
    received = received_ids(device)
    assert set(received) == enqueued  # lost = 0, and nothing that was never enqueued
    # at-least-once: a kill repeats at most the one batch that was in flight
    assert len(received) - len(set(received)) <= kills * relay.batch_size


def test_rabbitmq_closing_the_relay_connection_loses_nothing(
        clean_db: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    rabbitmqctl()  # skips when the broker cannot be told to close a connection
    topic = unique_topic("outbox-chaos")
    with amqp_device(topic) as device, \
            relay_process(clean_db, with_query(AMQP_URL, topic=topic), tmp_path) as relay:
        producer = Producer(clean_db, total=4000, rate=400)
        producer.start()
        closed = 0
        while producer.is_alive() and closed < 3:
            time.sleep(1.0)
            closed += close_amqp_connections(relay.connection_name)
        producer.join(SETTLE)
        assert producer.error is None
        assert wait_until(lambda: pending_rows(conn) == 0, SETTLE), "rows left unsent"
        enqueued = committed_ids(conn)
        assert wait_until(lambda: enqueued <= set(received_ids(device)), SETTLE)
        assert relay.alive(), "the relay must reconnect by itself, not exit"
    assert closed >= 1, "the broker never saw the relay's connection to close it"
    assert set(received_ids(device)) == enqueued


def test_mqtt_broker_stopped_and_started_again_loses_nothing(
        clean_db: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path)
    broker.start()
    topic = "outbox/chaos"
    subscriber = DurableMqttSubscriber(broker.url, topic)
    try:
        with relay_process(clean_db, f"{broker.url}?topic={topic}&qos=1", tmp_path) as relay:
            producer = Producer(clean_db, total=2000, rate=400)
            producer.start()
            time.sleep(1.5)
            broker.stop()
            time.sleep(3.0)
            broker.start()
            producer.join(SETTLE)
            assert producer.error is None
            assert wait_until(lambda: pending_rows(conn) == 0, SETTLE), "rows left unsent"
            enqueued = committed_ids(conn)
            assert wait_until(lambda: enqueued <= subscriber.distinct(), SETTLE)
            assert relay.alive()
        assert subscriber.distinct() == enqueued
    finally:
        subscriber.close()
        broker.stop()
