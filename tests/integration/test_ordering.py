"""Urgent first, and in order per receiver, across relays, workers and broker trouble.

Bounds on waiting are generous: they are not measurements.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox.relay import RelayService
from outbox.settings import Settings
from outbox.testing import MemoryTransport
from tests.support.brokers import (
    AMQP_URL,
    amqp_device,
    close_amqp_connections,
    rabbitmqctl,
    unique_topic,
    with_query,
)
from tests.support.chaos import Relay as RelayProcess

pytestmark = pytest.mark.integration

SETTLE = 120.0


def wait_until(condition: Any, timeout: float = SETTLE) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pending(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM outbox.message WHERE state = 'pending'"
                            ).fetchone()[0])  # type: ignore[index]


class Paced(MemoryTransport):
    """Takes ``seconds`` per envelope: long enough for claims to overlap."""

    def __init__(self, seconds: float) -> None:
        super().__init__("default")
        self.seconds = seconds

    def publish(self, batch: Any) -> Any:
        time.sleep(self.seconds * len(batch))
        return super().publish(batch)


def test_with_two_relays_no_urgent_row_waits_behind_a_bulk_row_due_later(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    transport = Paced(0.002)  # shared: one record of the order in which rows went out
    settings = Settings(transports={"default": "memory://"}, batch_size=50, poll_interval=0.2)
    services = [RelayService(settings, clean_db, transports_factory=lambda s: {"default": transport})
                for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=service.run, args=(stop,), daemon=True)
               for service in services]
    conn.execute("""INSERT INTO outbox.message (command, data)
                    SELECT 'send-sms', jsonb_build_object('receiver', '+628123' || g, 'message', 'bulk')
                    FROM generate_series(1, 600) AS g""")
    for thread in threads:
        thread.start()
    urgent: list[int] = []
    try:
        for n in range(20):
            time.sleep(0.05)
            conn.execute("""INSERT INTO outbox.message (command, data)
                            SELECT 'send-sms', jsonb_build_object('receiver', '+628124' || g,
                                                                  'message', 'bulk later')
                            FROM generate_series(1, 20) AS g""")
            row = conn.execute(  # as urgent as an OTP
                "INSERT INTO outbox.message (command, data, priority) VALUES ('send-sms', %s, 0) "
                "RETURNING id", (Jsonb({"receiver": "+628125", "message": f"urgent {n}"}),)
            ).fetchone()
            assert row is not None
            urgent.append(int(row[0]))
        assert wait_until(lambda: pending(conn) == 0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(SETTLE)
    created = dict(conn.execute("SELECT id, created_at FROM outbox.message").fetchall())
    order = [envelope.id for envelope in transport.delivered]
    position = {message_id: index for index, message_id in reversed(list(enumerate(order)))}
    for otp in urgent:
        overtaken_by = [m for m in order[:position[otp]]
                        if m not in urgent and created[m] > created[otp]]
        # a claim already in flight when the OTP committed may hold older bulk rows, never
        # a bulk row committed after it
        assert overtaken_by == [], f"OTP {otp} waited behind bulk rows due later"
    assert not any(service.errors for service in services)


@pytest.mark.slow
def test_block_and_unblock_stay_in_order_over_rabbitmq_through_connection_cuts(
        conn: psycopg.Connection[Any], clean_db: str, tmp_path: Path) -> None:
    """30 numbers x 6 block/unblock commands, 2 relay processes of 2 workers, and the
    broker closing the relays' connections in the middle: every number's commands reach
    the consumer in the order they were committed, and each number ends as its last says."""
    rabbitmqctl()  # skips when the broker cannot be told to close a connection
    topic = unique_topic("outbox-order")
    numbers = [f"+62815{n:06d}" for n in range(30)]
    last: dict[str, str] = {}
    committed: dict[str, list[int]] = {number: [] for number in numbers}

    def produce() -> None:  # six rounds, while the broker cuts the relays' connections
        with psycopg.connect(clean_db, autocommit=True) as producer:
            for round_ in range(6):
                for number in numbers:
                    command = "block-msisdn" if round_ % 2 == 0 else "unblock-msisdn"
                    row = producer.execute(
                        "INSERT INTO outbox.message (command, data) VALUES (%s, %s) "
                        "RETURNING id", (command, Jsonb({"receiver": number}))).fetchone()
                    assert row is not None
                    committed[number].append(int(row[0]))
                    last[number] = command
                time.sleep(1.0)

    env = {"OUTBOX_WORKERS": "2", "OUTBOX_BACKOFF_BASE": "50ms", "OUTBOX_BACKOFF_MAX": "1s",
           "OUTBOX_BATCH_SIZE": "20"}
    url = with_query(AMQP_URL, topic=topic)
    with amqp_device(topic) as device:
        relays = [RelayProcess(clean_db, url, log=tmp_path / f"r{n}.log", env=env)
                  for n in range(2)]
        for relay in relays:  # block and unblock go to the transport the broker can cut
            relay.env["OUTBOX_ROUTE_BLOCK_MSISDN"] = relay.name
            relay.env["OUTBOX_ROUTE_UNBLOCK_MSISDN"] = relay.name
            relay.start()
        producer = threading.Thread(target=produce, daemon=True)
        try:
            time.sleep(2.0)  # both relays up and connected
            producer.start()
            cuts = 0
            while producer.is_alive():
                time.sleep(0.5)
                cuts += sum(close_amqp_connections(relay.connection_name) for relay in relays)
            producer.join(SETTLE)
            assert wait_until(lambda: pending(conn) == 0), "rows left unsent"
            assert wait_until(lambda: len({m.message_id for m in device.received}) >= 180)
        finally:
            for relay in relays:
                assert relay.stop() == 0
    assert cuts >= 1, "the broker never saw a relay's connection to close it"
    arrivals: dict[str, list[int]] = {number: [] for number in numbers}
    final: dict[str, str] = {}
    for message in device.received:
        body = json.loads(message.body)
        number = body["data"]["receiver"]
        arrivals[number].append(int(message.message_id))
        final[number] = body["command"]
    for number in numbers:
        seen = arrivals[number]
        # at least once: a repeat may follow its own first copy, never a later command
        assert seen == sorted(seen), f"{number}: out of order {seen}"
        assert sorted(set(seen)) == committed[number]
    assert final == last
