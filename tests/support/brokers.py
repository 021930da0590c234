"""Broker test helpers: service URLs, device-like subscribers, the exact bytes they must receive.

Everything is real: RabbitMQ, Redis and Mosquitto on loopback (``OUTBOX_TEST_AMQP_URL``,
``OUTBOX_TEST_REDIS_URL``, ``OUTBOX_TEST_MQTT_URL``). Each subscriber is set up the way the
OTP-Pi device sets itself up (PROTOCOL.md sections 4 to 6) and records what it receives in a
thread that does nothing else, so a slow test never makes the broker drop messages.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pika
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from outbox.commands import (
    BLOCK_MSISDN,
    SEND_EMAIL,
    SEND_SMS,
    UNBLOCK_MSISDN,
    Dialect,
    encode,
    wire_payload,
)
from outbox.settings import Settings
from outbox.transports import transport_options
from outbox.transports.base import Envelope

AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("OUTBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_URL = os.environ.get("OUTBOX_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")

#: how long a test waits for a broker to hand over what it was sent
DELIVERY_WAIT = 10.0

T = TypeVar("T")


def unique_topic(prefix: str = "outbox-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def with_query(url: str, **params: str) -> str:
    """``url`` with more query parameters (values are used as given)."""
    extra = "&".join(f"{key}={value}" for key, value in params.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


def open_transport(factory: Callable[..., T], url: str, name: str = "test") -> T:
    """Build a transport the way the relay does: outbox's own query keys split off first."""
    stripped, options = transport_options(url, Settings())
    return factory(name, stripped, options)


@contextlib.contextmanager
def transports_opened(factory: Callable[..., T], default_name: str,
                      ) -> Iterator[Callable[..., T]]:
    """An opener for a test's transports that closes them all, even when the test fails."""
    transports: list[T] = []

    def open_(url: str, name: str = default_name) -> T:
        transport = open_transport(factory, url, name)
        transports.append(transport)
        return transport

    try:
        yield open_
    finally:
        for transport in transports:
            transport.close()


def wait_until(predicate: Callable[[], bool], timeout: float = DELIVERY_WAIT,
               interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- what the device must receive --------------------------------------------------------

NOW = 1_767_225_600.0
#: the four commands a broker transport carries as plain messages, README names
COMMANDS: list[tuple[str, dict[str, Any]]] = [
    (SEND_SMS, {"receiver": "+6281234567890", "message": "Kode Anda 481516, jangan dibagikan ✓"}),
    (SEND_EMAIL, {"receiver": "budi@example.com", "subject": "Kode masuk",
                  "message": "Kode Anda 234200 — berlaku 5 menit"}),
    (BLOCK_MSISDN, {"receiver": "+6281200000001"}),
    (UNBLOCK_MSISDN, {"receiver": "6281200000002"}),
]


def envelope(message_id: int, command: str, data: dict[str, Any], dialect: Dialect) -> Envelope:
    expires_at = NOW + 300 if command in (SEND_SMS, SEND_EMAIL) else None
    payload = wire_payload(command, data, message_id=message_id, dialect=dialect, now=NOW,
                           expires_at=expires_at)
    return Envelope(message_id, command, encode(payload))


def every_command(dialect: Dialect, first_id: int = 1) -> list[Envelope]:
    return [envelope(first_id + index, command, data, dialect)
            for index, (command, data) in enumerate(COMMANDS)]


def sms(first: int, count: int) -> list[Envelope]:
    return [envelope(i, SEND_SMS, {"receiver": "+628123400000", "message": f"pesan {i}"},
                     Dialect.OTP_PI)
            for i in range(first, first + count)]


# --- RabbitMQ ----------------------------------------------------------------------------


@dataclass
class AmqpMessage:
    body: bytes
    content_type: str | None
    message_id: str | None
    routing_key: str


@dataclass
class AmqpDevice:
    """Consumes the topic's queue as OTP-Pi does: declared non-durable, auto-ack."""

    url: str
    topic: str
    received: list[AmqpMessage] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
        except BaseException as exc:
            self._error.append(exc)
            self._ready.set()
            raise
        try:
            channel = connection.channel()
            channel.queue_declare(self.topic, durable=False, exclusive=False, auto_delete=False,
                                  arguments=None)

            def on_message(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
                self.received.append(AmqpMessage(body, properties.content_type,
                                                 properties.message_id, method.routing_key))

            channel.basic_consume(self.topic, on_message, auto_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.05)
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def amqp_device(topic: str, url: str = AMQP_URL) -> Iterator[AmqpDevice]:
    device = AmqpDevice(url, topic)
    thread = threading.Thread(target=device.run, name=f"amqp-device-{topic}", daemon=True)
    thread.start()
    try:
        assert device._ready.wait(DELIVERY_WAIT), "the AMQP device did not start"
        if device._error:
            pytest.fail(f"the tests need RabbitMQ at {url}: {device._error[0]!r}")
        yield device
    finally:
        device.stop()
        thread.join(DELIVERY_WAIT)
        delete_queue(topic, url)


def delete_queue(topic: str, url: str = AMQP_URL) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(topic)
    finally:
        connection.close()


def queue_exists(topic: str, url: str = AMQP_URL) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(topic, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    finally:
        if connection.is_open:
            connection.close()
    return True


def rabbitmqctl() -> str:
    """The path of rabbitmqctl when it can talk to the local node, else skip the test."""
    path = shutil.which("rabbitmqctl")
    if path is None:
        pytest.skip("rabbitmqctl is not installed: cannot make the broker close a connection")
    probe = subprocess.run([path, "-q", "status"], capture_output=True, text=True,
                           timeout=60, check=False)
    if probe.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot reach the node: {probe.stderr.strip()[:200]}")
    return path


def close_amqp_connections(connection_name: str) -> int:
    """Make the broker close every connection named ``connection_name``; return how many."""
    ctl = rabbitmqctl()
    # the table format prints pids the way close_connection takes them (the JSON one does not)
    listing = subprocess.run(
        [ctl, "-q", "--no-table-headers", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, timeout=60, check=True)
    closed = 0
    for line in listing.stdout.splitlines():
        pid, _, properties = line.partition("\t")
        if f'"{connection_name}"' in properties:
            subprocess.run([ctl, "-q", "close_connection", pid, "test: cut"],
                           capture_output=True, text=True, timeout=60, check=True)
            closed += 1
    return closed


# --- Redis -------------------------------------------------------------------------------


class RedisDevice:
    """SUBSCRIBEs to the channel, as OTP-Pi builds before 2021-10-27 do."""

    def __init__(self, url: str, topic: str) -> None:
        self.received: list[bytes] = []
        self._client: redis.Redis[bytes] = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(topic)
        # the subscribe confirmation: from here on PUBLISH counts this subscriber
        confirmation = self._pubsub.get_message(timeout=DELIVERY_WAIT)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"redis-device-{topic}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.05)
            if message is not None and message["type"] == "message":
                self.received.append(message["data"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(DELIVERY_WAIT)
        self._pubsub.close()
        self._client.close()


@contextlib.contextmanager
def redis_device(topic: str, url: str = REDIS_URL) -> Iterator[RedisDevice]:
    try:
        device = RedisDevice(url, topic)
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"the tests need Redis at {url}: {exc}")
    try:
        yield device
    finally:
        device.close()


def kill_redis_clients(name: str, url: str = REDIS_URL) -> int:
    """``CLIENT KILL`` every connection named ``name`` from a second client; return how many."""
    admin: redis.Redis[bytes] = redis.Redis.from_url(url)
    try:
        killed = 0
        for client in admin.client_list():
            if client.get("name") == name:
                admin.client_kill_filter(_id=client["id"])
                killed += 1
        return killed
    finally:
        admin.close()


# --- MQTT --------------------------------------------------------------------------------


@dataclass
class MqttReceived:
    payload: bytes
    retain: bool
    topic: str


class MqttDevice:
    """Subscribes at QoS 0 with a clean session, as OTP-Pi does; paho's thread only appends."""

    def __init__(self, url: str, topic: str) -> None:
        self.received: list[MqttReceived] = []
        parts = urlsplit(url)
        self._subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, clean_session=True,
                             protocol=MQTTProtocolVersion.MQTTv311)
        if parts.username:
            client.username_pw_set(parts.username, parts.password)

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe(topic, qos=0)

        def on_subscribe(*_: Any) -> None:
            self._subscribed.set()

        def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            self.received.append(MqttReceived(bytes(message.payload), bool(message.retain),
                                              message.topic))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(DELIVERY_WAIT):
            self.close()
            pytest.fail(f"could not subscribe to {topic!r} at {url}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextlib.contextmanager
def mqtt_device(topic: str, url: str = MQTT_URL) -> Iterator[MqttDevice]:
    try:
        device = MqttDevice(url, topic)
    except OSError as exc:
        pytest.fail(f"the tests need an MQTT broker at {url}: {exc}")
    try:
        yield device
    finally:
        device.close()


@contextlib.contextmanager
def mosquitto_with_password(directory: Path, user: str, password: str) -> Iterator[int]:
    """A second Mosquitto on a free loopback port that refuses anonymous and wrong logins."""
    mosquitto = shutil.which("mosquitto")
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto is None or mosquitto_passwd is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed to test refused MQTT credentials")
    password_file = directory / "passwd"
    subprocess.run([mosquitto_passwd, "-b", "-c", str(password_file), user, password],
                   check=True, capture_output=True, timeout=30)
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {password_file}\n"
        "persistence false\n"
        # keep the privileges we have (as root it would switch to a user that cannot read
        # a pytest temporary directory)
        f"user {getpass.getuser()}\n"
    )
    log = (directory / "mosquitto.log").open("wb")
    process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=log)
    try:
        if not wait_until(lambda: _listening(port) or process.poll() is not None, 10):
            pytest.fail("the second mosquitto did not start listening")
        if process.poll() is not None:
            pytest.fail(f"the second mosquitto exited: "
                        f"{(directory / 'mosquitto.log').read_text()[-500:]}")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- a TCP link that a test can freeze and cut ---------------------------------------------


class CuttableLink:
    """A loopback TCP forwarder to a real broker, to lose a connection at a chosen moment.

    ``hold_replies()`` stops forwarding what the broker sends (confirms, PUBACKs, replies stay
    in the broker's socket); ``cut()`` then shuts every current connection down, as a network
    failure would. New connections are accepted and forwarded normally.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._holding = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="cuttable-link", daemon=True)
        self._acceptor.start()

    def hold_replies(self) -> None:
        self._holding.set()

    def release_replies(self) -> None:
        self._holding.clear()

    def cut(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for pair in links:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self.cut()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._links.append((client, upstream))
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                sources = [client] if self._holding.is_set() else [client, upstream]
                readable, _, _ = select.select(sources, [], [], 0.02)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


@contextlib.contextmanager
def cuttable_link(url: str, default_port: int) -> Iterator[CuttableLink]:
    parts = urlsplit(url)
    link = CuttableLink(parts.hostname or "127.0.0.1", parts.port or default_port)
    try:
        yield link
    finally:
        link.close()


def through(link: CuttableLink, url: str) -> str:
    """``url`` pointed at ``link`` instead of the broker."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{link.port}"
    netloc_new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    return parts._replace(netloc=netloc_new).geturl()
