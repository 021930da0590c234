"""Managed mode end to end: create-otp rows in Postgres, the relay deriving the code and
publishing the finished text over RabbitMQ, MQTT (and the in-memory transport), a subscriber
reading it like a device would, then validation against ``outbox.otp``."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
import pika
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from outbox import cli, enqueue
from outbox.commands import CreateOtp
from outbox.otp import ManagedOtp, ValidationResult, validate, validate_managed
from outbox.relay import BatchReport, Relay
from outbox.settings import Settings
from outbox.store import PostgresStore
from outbox.testing import MemoryTransport
from outbox.transports import open_transport
from outbox.transports.base import Transport
from tests.support.log_capture import rendered_logs

pytestmark = pytest.mark.integration

SECRET = "eb92cc52a766c500e001d02f1eaa78784da47f8c96b019ce874d3e3c205b4e3c"
MSISDN = "+6281234567890"
PARAMS = ("transfer", "150000", "acct-9", "")
AMQP = "amqp://guest:guest@127.0.0.1:5672"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883


# --- subscribers: what the device would see -------------------------------------------------


class Subscriber:
    """Receives published bodies; ``next()`` waits for the next one."""

    def __init__(self) -> None:
        self.bodies: queue.Queue[bytes] = queue.Queue()

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.bodies.get(timeout=timeout))
        return payload


class MemorySubscriber(Subscriber):
    def __init__(self) -> None:
        super().__init__()
        self.transport = MemoryTransport(fail=self._deliver)

    def _deliver(self, envelope: Any) -> None:
        self.bodies.put(envelope.body)


@pytest.fixture
def rabbitmq_queue() -> Iterator[tuple[str, Subscriber]]:
    """A queue declared with the device's flags, read with auto-ack as the device does."""
    name = f"outbox-test-otp-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP + "/%2F"))
    channel = connection.channel()
    channel.queue_declare(name, durable=False, exclusive=False, auto_delete=False)
    subscriber = Subscriber()
    stop = threading.Event()
    lock = threading.Lock()

    def poll() -> None:
        while not stop.is_set():
            with lock:
                method, _, body = channel.basic_get(name, auto_ack=True)
            if method is None:
                stop.wait(0.02)
            else:
                subscriber.bodies.put(body)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield f"{AMQP}?topic={name}", subscriber
    finally:
        stop.set()
        thread.join(5)
        channel.queue_delete(name)
        connection.close()


@pytest.fixture
def mqtt_topic() -> Iterator[tuple[str, Subscriber]]:
    """A QoS 0, clean-session subscription, as the device makes it."""
    topic = f"outbox-test/otp/{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311, clean_session=True)
    client.on_message = lambda c, u, message: subscriber.bodies.put(message.payload)
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    try:
        client.subscribe(topic, qos=0)
        assert subscribed.wait(5), "the broker did not confirm the subscription"
        yield f"mqtt://{MQTT_HOST}:{MQTT_PORT}?topic={topic}", subscriber
    finally:
        client.disconnect()
        client.loop_stop()


# --- the set-up under test ------------------------------------------------------------------


class Managed:
    def __init__(self, url: str, transport: Transport, subscriber: Subscriber,
                 transport_url: str) -> None:
        self.url = url
        self.transport = transport
        self.subscriber = subscriber
        self.settings = Settings(database_url=url, transports={"default": transport_url},
                                 otp_secret=SECRET, otp_max_attempts=3)

    def create(self, reference: str, *, receiver: str = MSISDN, expires_in: float = 300,
               params: tuple[str, ...] = PARAMS, **extra: Any) -> int:
        command = CreateOtp(receiver=receiver, reference=reference, message="Kode OTP: %s",
                            expiration=time.time() + expires_in, params=params, **extra)
        with psycopg.connect(self.url) as connection:
            return enqueue(connection, command)

    def relay(self) -> BatchReport:
        with psycopg.connect(self.url) as connection:
            relay = Relay(PostgresStore(connection), {"default": self.transport}, self.settings,
                          otp=ManagedOtp.from_settings(self.settings))
            return relay.drain()

    def receive(self) -> tuple[dict[str, Any], str]:
        payload = self.subscriber.next()
        codes = re.findall(r"\d{6}", payload["data"]["message"])
        assert len(codes) == 1, payload
        return payload, codes[0]

    def validate(self, reference: str, code: str, params: tuple[str, ...] = PARAMS,
                 receiver: str = MSISDN) -> ValidationResult:
        return validate(reference, receiver, code, params, settings=self.settings)


@pytest.fixture(params=["memory", "rabbitmq", "mqtt"])
def managed(request: pytest.FixtureRequest, clean_db: str) -> Iterator[Managed]:
    kind = request.param
    if kind == "memory":
        memory = MemorySubscriber()
        yield Managed(clean_db, memory.transport, memory, "memory://")
        return
    transport_url, subscriber = request.getfixturevalue(
        "rabbitmq_queue" if kind == "rabbitmq" else "mqtt_topic")
    transport = open_transport("default", transport_url, Settings())
    try:
        yield Managed(clean_db, transport, subscriber, transport_url)
    finally:
        transport.close()


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


# --- the scenarios ----------------------------------------------------------------------


def test_the_subscriber_receives_the_text_and_the_code_validates_once(managed: Managed) -> None:
    message_id = managed.create("pay-1")
    assert managed.relay().sent == 1
    payload, code = managed.receive()
    assert payload["command"] == "send-sms"
    assert payload["data"]["message"] == f"Kode OTP: {code}"
    assert payload["data"]["receiver"] == MSISDN
    assert payload["data"]["id"] == message_id
    assert payload["data"]["expiration"] > time.time() * 1000  # milliseconds, as the device reads
    first = managed.validate("pay-1", code)
    assert (first.code, first.valid) == ("0000", True)
    assert managed.validate("pay-1", code).code == "1202"


def test_an_email_receiver_gets_send_mail_with_the_subject(managed: Managed) -> None:
    managed.create("mail-1", receiver="someone@example.com", subject="Your code", params=())
    managed.relay()
    payload, code = managed.receive()
    assert (payload["command"], payload["data"]["subject"]) == ("send-mail", "Your code")
    assert managed.validate("mail-1", code, (), receiver="someone@example.com").valid


@pytest.mark.parametrize("change", ["param1", "param2", "param3", "param4", "receiver"])
def test_a_changed_param_or_receiver_is_invalid(managed: Managed, change: str) -> None:
    managed.create("pay-2")
    managed.relay()
    _, code = managed.receive()
    params, receiver = list(PARAMS), MSISDN
    if change == "receiver":
        receiver = "+6281234567891"
    else:
        params[int(change[-1]) - 1] += "x"
    assert managed.validate("pay-2", code, tuple(params), receiver).code == "1202"
    assert managed.validate("pay-2", code).code == "0000"


def test_an_expired_otp(managed: Managed) -> None:
    managed.create("pay-3", expires_in=2)
    managed.relay()
    _, code = managed.receive()
    with psycopg.connect(managed.url) as connection:
        found = connection.execute(
            "SELECT extract(epoch FROM expires_at) FROM outbox.otp WHERE reference = 'pay-3'"
        ).fetchone()
    assert found is not None
    time.sleep(max(0.0, float(found[0]) - time.time()) + 0.1)
    assert managed.validate("pay-3", code).code == "1203"


def test_locked_after_the_attempt_limit(managed: Managed) -> None:
    managed.create("pay-4")
    managed.relay()
    _, code = managed.receive()
    answers = [managed.validate("pay-4", wrong(code)) for _ in range(3)]
    assert [a.code for a in answers] == ["1202"] * 3
    assert [a.attempts_left for a in answers] == [2, 1, 0]
    assert managed.validate("pay-4", code).code == "1204"
    with psycopg.connect(managed.url) as connection:
        assert connection.execute(
            "SELECT attempts, used_at FROM outbox.otp WHERE reference = 'pay-4'"
        ).fetchone() == (3, None)


def test_two_concurrent_right_answers_exactly_one_succeeds(managed: Managed) -> None:
    references = [f"race-{n}" for n in range(5)]
    for reference in references:
        managed.create(reference)
    assert managed.relay().sent == len(references)
    codes = {}
    for _ in references:
        payload, code = managed.receive()
        with psycopg.connect(managed.url) as connection:
            found = connection.execute("SELECT reference FROM outbox.otp WHERE message_id = %s",
                                       (payload["data"]["id"],)).fetchone()
        assert found is not None
        codes[found[0]] = code

    def contender(reference: str, barrier: threading.Barrier) -> str:
        with psycopg.connect(managed.url, autocommit=True) as connection:
            connection.execute("SELECT 1")
            barrier.wait(5)
            return validate_managed(connection, reference, MSISDN, codes[reference], PARAMS,
                                    settings=managed.settings).code

    with ThreadPoolExecutor(max_workers=2) as pool:
        for reference in references:
            barrier = threading.Barrier(2)
            futures = [pool.submit(contender, reference, barrier) for _ in range(2)]
            results = sorted(future.result() for future in futures)
            assert results == ["0000", "1202"], reference


def test_a_duplicate_reference_fails_the_second_row_and_a_retry_keeps_the_code(
        managed: Managed) -> None:
    managed.create("pay-5")
    duplicate = managed.create("pay-5")
    report = managed.relay()
    assert (report.sent, report.failed) == (1, 1)
    with psycopg.connect(managed.url) as connection:
        state, reason = connection.execute(
            "SELECT state, last_error FROM outbox.message WHERE id = %s", (duplicate,)).fetchone()
    assert state == "failed"
    assert "1201" in reason
    _, code = managed.receive()
    assert managed.validate("pay-5", code).valid


def test_the_cli_validates_managed_otps(clean_db: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    memory = MemorySubscriber()
    managed = Managed(clean_db, memory.transport, memory, "memory://")
    managed.create("cli-1", params=("a",))
    managed.relay()
    _, code = managed.receive()
    monkeypatch.setenv("DATABASE_URL", managed.url)
    monkeypatch.setenv("OUTBOX_TRANSPORT", "memory://")
    monkeypatch.setenv("OUTBOX_OTP_SECRET", SECRET)
    base = ["otp", "validate", "--reference", "cli-1", "--receiver", MSISDN, "--param", "a"]
    with rendered_logs():
        statuses = [cli.main([*base, "--otp", wrong(code)]), cli.main([*base, "--otp", code]),
                    cli.main([*base, "--otp", code])]
    assert statuses == [1, 0, 1]
    out = [line.split()[0] for line in capsys.readouterr().out.splitlines()
           if '"event"' not in line]
    assert out == ["1202", "0000", "1202"]


def test_the_cli_without_a_secret_is_a_configuration_error(
        clean_db: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", clean_db)
    monkeypatch.setenv("OUTBOX_TRANSPORT", "memory://")
    monkeypatch.delenv("OUTBOX_OTP_SECRET", raising=False)
    with rendered_logs():
        status = cli.main(["otp", "validate", "--reference", "r", "--receiver", MSISDN,
                           "--otp", "123456"])
    assert status == 2
    assert "OUTBOX_OTP_SECRET" in capsys.readouterr().err
