"""Helpers for the short chaos tests: the relay as a real ``outbox run`` process that a test can
SIGKILL, an application committing rows at a steady pace, and a Mosquitto of the test's own
that it can stop and start again with a durable subscriber's session intact."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from outbox.producer import enqueue
from tests.support.brokers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


class Relay:
    """``outbox run`` in a subprocess with one transport under a name of our choosing.

    The transport's name becomes its RabbitMQ connection name (``outbox <name>``), which lets
    a test ask the broker to close exactly this relay's connection.
    """

    def __init__(self, database_url: str, transport_url: str, *, log: Path,
                 batch_size: int = 100, env: dict[str, str] | None = None,
                 route_all: bool = False) -> None:
        self.name = f"chaos{uuid.uuid4().hex[:8]}"
        self.log = log
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("OUTBOX_") and key != "DATABASE_URL"}
        self.env.update({
            "DATABASE_URL": database_url,
            f"OUTBOX_TRANSPORT_{self.name.upper()}": transport_url,
            "OUTBOX_ROUTE_SEND_SMS": self.name,
            # the other commands need somewhere to go; these tests only send SMS
            "OUTBOX_TRANSPORT": "stdout://",
            "OUTBOX_BATCH_SIZE": str(batch_size),
            "OUTBOX_WORKERS": "1",
            "OUTBOX_LOG_LEVEL": "warning",
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_POLL_INTERVAL": "0.5",
            # a SIGKILLed relay's leased rows come back within seconds, not half a minute
            "OUTBOX_CLAIM_TIMEOUT": "5s",
        })
        if route_all:  # every command to the transport under test, not only send-sms
            self.env["OUTBOX_TRANSPORT"] = transport_url
            del self.env[f"OUTBOX_TRANSPORT_{self.name.upper()}"]
            del self.env["OUTBOX_ROUTE_SEND_SMS"]
        self.env.update(env or {})
        self.batch_size = batch_size
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def connection_name(self) -> str:
        return f"outbox {self.name}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "outbox.cli", "run"],
                                            env=self.env, stdout=log, stderr=log, cwd=ROOT)
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def freeze(self) -> None:
        """SIGSTOP: the process holds whatever it holds and answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return self.process.returncode


@contextlib.contextmanager
def relay_process(database_url: str, transport_url: str, tmp_path: Path,
                  **kwargs: Any) -> Iterator[Relay]:
    relay = Relay(database_url, transport_url, log=tmp_path / "relay.log", **kwargs)
    relay.start()
    try:
        yield relay
    except BaseException:
        # pytest shows a failed test's output: the relay's own account of what happened
        lines = relay.log.read_text(errors="replace").splitlines() if relay.log.exists() else []
        print(f"--- last lines of the relay's log ({relay.log}):", *lines[-40:], sep="\n")
        raise
    finally:
        relay.stop()


class Producer(threading.Thread):
    """An application: ``per_tx`` send-sms rows per transaction, ``total`` rows at ``rate``/s."""

    def __init__(self, database_url: str, *, total: int, rate: float, per_tx: int = 10) -> None:
        super().__init__(daemon=True, name="chaos-producer")
        self.database_url = database_url
        self.total = total
        self.rate = rate
        self.per_tx = per_tx
        self.committed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.database_url) as conn:
                started = time.monotonic()
                while self.committed < self.total:
                    delay = started + self.committed / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    for n in range(self.committed, min(self.committed + self.per_tx, self.total)):
                        enqueue(conn, "send-sms", {"receiver": "+6281234567890",
                                                   "message": f"Kode Anda {n:06d}"})
                    conn.commit()
                    self.committed = min(self.committed + self.per_tx, self.total)
        except BaseException as exc:
            self.error = exc
            raise


def committed_ids(conn: psycopg.Connection[Any]) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM outbox.message")}


def pending_rows(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute(
        "SELECT count(*) FROM outbox.message WHERE state <> 'sent'").fetchone()[0])


# --- a Mosquitto of our own, stopped and started by the test ---------------------------------


class PrivateMosquitto:
    """Mosquitto on a free port with persistence in ``directory``: a subscriber's durable
    session (subscription and queued QoS 1 messages) survives a stop and a start."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("mosquitto", path=os.pathsep.join(
            [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
        if binary is None:
            pytest.skip("mosquitto is not installed")
        self.binary = binary
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "max_queued_messages 0\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            "autosave_interval 0\n"
            f"user {getpass.getuser()}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._listening, 10):
            pytest.fail("our mosquitto did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # saves the persistence file on the way out
            self.process.wait(10)

    def _listening(self) -> bool:
        import socket  # noqa: PLC0415

        with socket.socket() as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0


class DurableMqttSubscriber:
    """QoS 1 with a persistent session: nothing published while it reconnects is dropped for
    it, so whatever it misses is the publisher's loss, not the subscriber's."""

    def __init__(self, url: str, topic: str) -> None:
        self.ids: list[int] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        parts = urlsplit(url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-{uuid.uuid4().hex[:8]}",
                             clean_session=False, protocol=MQTTProtocolVersion.MQTTv311)
        client.reconnect_delay_set(min_delay=1, max_delay=1)

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe(topic, qos=1)

        def on_subscribe(*_: Any) -> None:
            self._subscribed.set()

        def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            import json  # noqa: PLC0415

            with self._lock:
                self.ids.append(int(json.loads(message.payload)["data"]["id"]))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=5)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(10):
            self.close()
            pytest.fail(f"could not subscribe to {topic!r} at {url}")

    def distinct(self) -> set[int]:
        with self._lock:
            return set(self.ids)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
