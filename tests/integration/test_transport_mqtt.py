"""The MQTT transport against the real Mosquitto on loopback, with a device-like subscriber."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from outbox.commands import Dialect
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.transports.mqtt import MqttTransport
from tests.support.brokers import (
    MQTT_URL,
    cuttable_link,
    every_command,
    mosquitto_with_password,
    mqtt_device,
    open_transport,
    sms,
    through,
    transports_opened,
    unique_topic,
    wait_until,
    with_query,
)

pytestmark = pytest.mark.integration

Opener = Callable[..., MqttTransport]


@pytest.fixture
def topic() -> str:
    return "outbox/test/" + unique_topic("t")


@pytest.fixture
def opened() -> Iterator[Opener]:
    """Opens transports for a test and closes them even when it fails."""
    with transports_opened(MqttTransport, "mqtt-test") as open_:
        yield open_


@pytest.mark.parametrize("dialect", [Dialect.OTP_PI, Dialect.README])
def test_the_subscriber_receives_exactly_the_encoded_commands(
        dialect: Dialect, topic: str, opened: Opener) -> None:
    batch = every_command(dialect)
    with mqtt_device(topic) as device:
        transport = opened(with_query(MQTT_URL, topic=topic, dialect=dialect.value))
        assert transport.options.dialect is dialect
        assert transport.qos == 1
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) == len(batch))
    assert [message.payload for message in device.received] == [e.body for e in batch]
    assert {message.topic for message in device.received} == {topic}
    assert not any(message.retain for message in device.received)


def test_nothing_is_retained(topic: str, opened: Opener) -> None:
    """A retained command would be delivered again to every new subscription."""
    transport = opened(with_query(MQTT_URL, topic=topic))
    assert transport.publish(sms(1, 2)) == {}
    with mqtt_device(topic) as late_subscriber:
        time.sleep(0.3)
        assert late_subscriber.received == []


@pytest.mark.parametrize("qos", ["0", "2"])
def test_other_qos_levels_deliver(qos: str, topic: str, opened: Opener) -> None:
    # more than Mosquitto's default window of 20: at QoS 2 it would drop what exceeds it
    batch = sms(1, 60)
    with mqtt_device(topic) as device:
        transport = opened(with_query(MQTT_URL, topic=topic, qos=qos))
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) >= len(batch))
        time.sleep(0.1)
    assert [message.payload for message in device.received] == [e.body for e in batch]


def test_a_batch_of_two_thousand_arrives_complete(topic: str, opened: Opener) -> None:
    batch = sms(1, 2000)
    with mqtt_device(topic) as device:
        transport = opened(with_query(MQTT_URL, topic=topic))
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) >= len(batch))
    assert [message.payload for message in device.received] == [e.body for e in batch]


def test_a_connection_lost_mid_batch_fails_the_unacknowledged_and_recovers(
        topic: str, opened: Opener) -> None:
    with mqtt_device(topic) as device, cuttable_link(MQTT_URL, 1883) as link:
        transport = opened(with_query(through(link, MQTT_URL), topic=topic, timeout="5"))
        assert transport.publish(sms(1, 10)) == {}
        link.hold_replies()  # the PUBACKs stay in the broker's socket
        threading.Timer(0.3, link.cut).start()
        started = time.monotonic()
        failures = transport.publish(sms(11, 50))
        assert time.monotonic() - started < 3, "the loss must end the wait, not the timeout"
        assert set(failures) == set(range(11, 61))
        assert all(isinstance(error, TransientPublishError) for error in failures.values())
        link.release_replies()
        assert transport.publish(sms(11, 50)) == {}  # a new connection
        expected = {e.body for e in sms(1, 60)}
        assert wait_until(lambda: {m.payload for m in device.received} >= expected)


def test_a_connection_cut_between_batches_is_replaced(topic: str, opened: Opener) -> None:
    with mqtt_device(topic) as device, cuttable_link(MQTT_URL, 1883) as link:
        transport = opened(with_query(through(link, MQTT_URL), topic=topic))
        assert transport.publish(sms(1, 10)) == {}
        link.cut()
        time.sleep(0.2)  # the end of the stream is there to read before the next batch
        assert transport.publish(sms(11, 10)) == {}
        assert wait_until(lambda: len(device.received) == 20)


def test_a_connection_the_broker_closed_while_idle_is_replaced(topic: str,
                                                              opened: Opener) -> None:
    # keepalive=1: Mosquitto drops a client that stays silent for 1.5 s; between batches
    # nobody reads the socket, so the next publish must notice and start afresh.
    with mqtt_device(topic) as device:
        transport = opened(with_query(MQTT_URL, topic=topic, keepalive="1"))
        assert transport.publish(sms(1, 5)) == {}
        time.sleep(2.5)
        assert transport.publish(sms(6, 5)) == {}
        assert wait_until(lambda: len(device.received) == 10)


def test_a_check_while_idle_sends_the_keepalive(topic: str, opened: Opener) -> None:
    with mqtt_device(topic) as device:
        transport = opened(with_query(MQTT_URL, topic=topic, keepalive="1"))
        transport.check()
        session = transport._session  # the same connection throughout
        for _ in range(6):  # 3 s of checks, each under the broker's 1.5 s limit
            time.sleep(0.5)
            transport.check()
        assert transport._session is session
        assert transport.publish(sms(1, 3)) == {}
        assert transport._session is session
        assert wait_until(lambda: len(device.received) == 3)


def test_refused_credentials_are_permanent(tmp_path: Path, topic: str, opened: Opener) -> None:
    password = "s3cret-for-the-test"
    with mosquitto_with_password(tmp_path, "outbox", password) as port:
        wrong = opened(f"mqtt://outbox:not-the-password-7Q@127.0.0.1:{port}?topic={topic}")
        with pytest.raises(PermanentPublishError, match="refused the connection") as raised:
            wrong.publish(sms(1, 1))
        assert "not-the-password-7Q" not in str(raised.value)
        with pytest.raises(PermanentPublishError):
            wrong.check()
        anonymous = opened(f"mqtt://127.0.0.1:{port}?topic={topic}")
        with pytest.raises(PermanentPublishError):
            anonymous.publish(sms(1, 1))
        right = opened(f"mqtt://outbox:{password}@127.0.0.1:{port}?topic={topic}")
        with mqtt_device(topic, f"mqtt://outbox:{password}@127.0.0.1:{port}") as device:
            assert right.publish(sms(1, 3)) == {}
            assert wait_until(lambda: len(device.received) == 3)


def test_unreachable_broker_is_transient(topic: str, opened: Opener) -> None:
    transport = opened(f"mqtt://127.0.0.1:1?topic={topic}&timeout=2")
    with pytest.raises(TransientPublishError, match=r"127\.0\.0\.1:1\b"):
        transport.publish(sms(1, 1))
    with pytest.raises(TransientPublishError):
        transport.check()


def test_check_connects(topic: str, opened: Opener) -> None:
    transport = opened(with_query(MQTT_URL, topic=topic))
    transport.check()
    transport.check()


def test_the_url_is_checked_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="topic"):
        open_transport(MqttTransport, MQTT_URL)
    with pytest.raises(ConfigurationError, match="wildcard"):
        open_transport(MqttTransport, with_query(MQTT_URL, topic="otp/%23"))
    with pytest.raises(ConfigurationError, match="qos"):
        open_transport(MqttTransport, with_query(MQTT_URL, topic="t", qos="3"))
    with pytest.raises(ConfigurationError, match="retain"):
        open_transport(MqttTransport, with_query(MQTT_URL, topic="t", retain="true"))
