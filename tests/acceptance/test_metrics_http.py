"""Metrics and health scraped over HTTP from a running ``outbox run``, as Prometheus and a
container orchestrator would."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.test_cli import OUTBOX, env_for, read_until_event

pytestmark = pytest.mark.acceptance

PHONE = "+6281234567890"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(port: int, name: str, **labels: str) -> float | None:
    return samples(port).get((name, tuple(sorted(labels.items()))))


def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@contextmanager
def relay(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([*OUTBOX, "run"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        read_until_event(process.stdout, "relay.started", timeout=30)
        yield process
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def insert_sms(connection: psycopg.Connection[Any], count: int, *,
               later: bool = False) -> None:
    connection.execute(
        """INSERT INTO outbox.message (command, data, available_at, created_at)
           SELECT 'send-sms', jsonb_build_object('receiver', %s::text, 'message', 'hello ' || n),
                  now() + CASE WHEN %s::boolean THEN interval '1 hour' ELSE interval '0' END,
                  now() - interval '2 minutes'
           FROM generate_series(1, %s) AS n""", (PHONE, later, count))


def test_metrics_livez_and_readyz_from_a_running_relay(clean_db: str,
                                                       conn: psycopg.Connection[Any]) -> None:
    port = free_port()
    env = env_for(clean_db, OUTBOX_TRANSPORT="stdout://", OUTBOX_LOG_FORMAT="json",
                  OUTBOX_METRICS_PORT=str(port), OUTBOX_POLL_INTERVAL="0.2")
    with relay(env):
        status, body = get(port, "/livez")
        assert status == 200 and body.startswith("[+]relay loop ok: last turn "), body
        status, body = get(port, "/readyz")
        assert status == 200, body
        assert "[+]database ok" in body and "[+]transport default ok" in body

        # Every configured series exists at zero from the first scrape.
        assert value(port, "outbox_messages_total", command="create-otp", route="default",
                     outcome="failed") == 0
        assert value(port, "outbox_build_info", version="0.1.0") == 1

        insert_sms(conn, 7)
        wait_for(lambda: value(port, "outbox_messages_total", command="send-sms",
                               route="default", outcome="sent") == 7)
        assert value(port, "outbox_delivery_lag_seconds_count", route="default") == 7
        # created two minutes before delivery: every observation lands above 60 s
        assert value(port, "outbox_delivery_lag_seconds_bucket", route="default",
                     le="60.0") == 0
        assert value(port, "outbox_delivery_lag_seconds_bucket", route="default",
                     le="300.0") == 7
        assert (value(port, "outbox_publish_duration_seconds_count", route="default") or 0) >= 1

        # Rows waiting for later show up in the backlog gauges within a sampling interval.
        insert_sms(conn, 3, later=True)
        wait_for(lambda: value(port, "outbox_pending_messages", route="default") == 3)
        age = value(port, "outbox_oldest_pending_age_seconds", route="default")
        assert age is not None and 110 < age < 300
        conn.execute("UPDATE outbox.message SET state = 'failed' WHERE id = 1")
        wait_for(lambda: value(port, "outbox_failed_messages") == 1)

        everything = get(port, "/metrics")[1]
        assert PHONE[1:] not in everything and "hello" not in everything
        routes = set(re.findall(r'route="([^"]*)"', everything))
        assert routes <= {"default", "unroutable"}  # labels from closed sets only
        assert "_created" not in everything
        assert get(port, "/nowhere")[0] == 404
    with pytest.raises(OSError):  # the port is released at exit
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_readyz_fails_while_a_transport_is_unreachable_and_livez_stays_up(
        clean_db: str) -> None:
    port = free_port()
    env = env_for(clean_db, OUTBOX_TRANSPORT="stdout://", OUTBOX_LOG_FORMAT="json",
                  OUTBOX_METRICS_PORT=str(port),
                  OUTBOX_TRANSPORT_DEVICE="http://pi:device-pass@127.0.0.1:1/api/otp",
                  OUTBOX_ROUTE_BLOCK_MSISDN="device", OUTBOX_PUBLISH_TIMEOUT="1")
    with relay(env):
        status, body = get(port, "/readyz")
        assert status == 503
        assert "[+]database ok" in body
        assert "[-]transport device failed" in body and "device-pass" not in body
        assert body.endswith("not ok\n")
        assert get(port, "/livez")[0] == 200


def test_a_taken_metrics_port_is_a_configuration_error(clean_db: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = env_for(clean_db, OUTBOX_TRANSPORT="stdout://", OUTBOX_METRICS_PORT=str(port))
        result = subprocess.run([*OUTBOX, "run"], env=env, capture_output=True, text=True,
                                timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"outbox: error: cannot serve metrics on 127.0.0.1:{port}")
