"""The RabbitMQ transport against the real broker on loopback, with a device-like consumer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pika
import pytest

from outbox.commands import Dialect
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.transports.base import Envelope
from outbox.transports.rabbitmq import RabbitMqTransport
from tests.support.brokers import (
    AMQP_URL,
    amqp_device,
    close_amqp_connections,
    cuttable_link,
    delete_queue,
    every_command,
    open_transport,
    queue_exists,
    sms,
    through,
    transports_opened,
    unique_topic,
    wait_until,
    with_query,
)

pytestmark = pytest.mark.integration

Opener = Callable[..., RabbitMqTransport]


@pytest.fixture
def topic() -> str:
    return unique_topic()


@pytest.fixture
def opened() -> Iterator[Opener]:
    """Opens transports for a test and closes them even when it fails."""
    with transports_opened(RabbitMqTransport, "amqp-test") as open_:
        yield open_


@pytest.mark.parametrize("dialect", [Dialect.OTP_PI, Dialect.README])
def test_the_device_receives_exactly_the_encoded_commands(
        dialect: Dialect, topic: str, opened: Opener) -> None:
    batch = every_command(dialect)
    with amqp_device(topic) as device:
        transport = opened(with_query(AMQP_URL, topic=topic, dialect=dialect.value))
        assert transport.options.dialect is dialect
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) == len(batch))
    assert [message.body for message in device.received] == [e.body for e in batch]
    assert [message.message_id for message in device.received] == [str(e.id) for e in batch]
    assert {message.content_type for message in device.received} == {"application/json"}
    assert {message.routing_key for message in device.received} == {topic}


def test_no_queue_means_unroutable_and_transient(topic: str, opened: Opener) -> None:
    transport = opened(with_query(AMQP_URL, topic=topic))
    batch = sms(1, 3)
    failures = transport.publish(batch)
    assert set(failures) == {1, 2, 3}
    assert all(isinstance(error, TransientPublishError) for error in failures.values())
    assert "unroutable" in str(failures[1])
    # the same connection goes on: once the device is there, the messages arrive
    with amqp_device(topic) as device:
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) == 3)


def test_a_batch_of_two_thousand_arrives_complete(topic: str, opened: Opener) -> None:
    batch = sms(1, 2000)
    with amqp_device(topic) as device:
        transport = opened(with_query(AMQP_URL, topic=topic))
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) >= len(batch))
    assert [message.body for message in device.received] == [e.body for e in batch]


def test_messages_larger_than_a_frame_arrive_whole(topic: str, opened: Opener) -> None:
    """A body over the negotiated frame size (128 KiB by default) is split into several
    body frames on the wire and arrives as one message, its properties intact."""
    bodies = [b'{"command":"send-sms","data":{"message":"' + bytes([65 + n]) * size + b'"}}'
              for n, size in enumerate((10, 131_072 - 8, 131_072, 400_000))]
    batch = [Envelope(n + 1, "send-sms", body, 1) for n, body in enumerate(bodies)]
    with amqp_device(topic) as device:
        transport = opened(with_query(AMQP_URL, topic=topic))
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) == len(batch))
    assert [m.body for m in device.received] == bodies
    assert [m.message_id for m in device.received] == ["1", "2", "3", "4"]
    assert {m.content_type for m in device.received} == {"application/json"}


def test_a_connection_closed_by_the_broker_is_replaced(topic: str, opened: Opener) -> None:
    name = f"cut-{topic}"
    with amqp_device(topic) as device:
        transport = opened(with_query(AMQP_URL, topic=topic), name=name)
        assert transport.publish(sms(1, 100)) == {}
        assert close_amqp_connections(f"outbox {name}") == 1
        # the broker's Connection.Close is read before anything is published on it
        assert transport.publish(sms(101, 100)) == {}
        assert wait_until(lambda: len(device.received) == 200)
    assert [m.message_id for m in device.received] == [str(i) for i in range(1, 201)]


def test_a_connection_lost_mid_batch_fails_the_unconfirmed_and_recovers(
        topic: str, opened: Opener) -> None:
    with amqp_device(topic) as device, cuttable_link(AMQP_URL, 5672) as link:
        transport = opened(with_query(through(link, AMQP_URL), topic=topic, timeout="5"))
        assert transport.publish(sms(1, 10)) == {}
        link.hold_replies()  # the broker's confirms stay in its socket
        threading.Timer(0.3, link.cut).start()
        started = time.monotonic()
        failures = transport.publish(sms(11, 50))
        assert time.monotonic() - started < 3, "the loss must end the wait, not the timeout"
        assert set(failures) == set(range(11, 61))
        assert all(isinstance(error, TransientPublishError) for error in failures.values())
        assert "connection lost" in str(failures[11])
        link.release_replies()
        assert transport.publish(sms(11, 50)) == {}  # a new connection
        assert wait_until(lambda: {m.message_id for m in device.received}
                          >= {str(i) for i in range(1, 61)})


def test_wrong_password_is_a_clear_permanent_error(topic: str, opened: Opener) -> None:
    password = "not-the-password-7Q"
    url = AMQP_URL.replace("guest:guest@", f"guest:{password}@")
    assert url != AMQP_URL, "OUTBOX_TEST_AMQP_URL must carry guest:guest credentials"
    transport = opened(with_query(url, topic=topic))
    with pytest.raises(PermanentPublishError, match="refused the credentials") as raised:
        transport.publish(sms(1, 1))
    assert password not in str(raised.value)
    assert isinstance(raised.value.__cause__, pika.exceptions.AMQPConnectionError)
    with pytest.raises(PermanentPublishError):
        transport.check()


def test_unreachable_broker_is_transient(topic: str, opened: Opener) -> None:
    transport = opened(f"amqp://guest:guest@127.0.0.1:1/%2F?topic={topic}&timeout=2")
    with pytest.raises(TransientPublishError, match=r"127\.0\.0\.1:1\b"):
        transport.publish(sms(1, 1))
    with pytest.raises(TransientPublishError):
        transport.check()


def test_check_connects(topic: str, opened: Opener) -> None:
    transport = opened(with_query(AMQP_URL, topic=topic))
    transport.check()
    transport.check()


def test_declare_device_uses_exactly_the_device_flags(topic: str, opened: Opener) -> None:
    transport = opened(with_query(AMQP_URL, topic=topic, declare="device"))
    try:
        assert transport.publish(sms(1, 2)) == {}  # the queue now exists and holds them
        # the device declares the same queue afterwards: no 406
        with amqp_device(topic) as device:
            assert wait_until(lambda: len(device.received) == 2)
    finally:
        if queue_exists(topic):
            delete_queue(topic)


def test_declare_device_refuses_a_queue_with_other_flags(topic: str, opened: Opener) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    connection.channel().queue_declare(topic, durable=True)
    connection.close()
    try:
        transport = opened(with_query(AMQP_URL, topic=topic, declare="device"))
        with pytest.raises(PermanentPublishError, match="other flags"):
            transport.publish(sms(1, 1))
    finally:
        delete_queue(topic)


def test_declare_passive_fails_transiently_without_the_queue(topic: str, opened: Opener) -> None:
    transport = opened(with_query(AMQP_URL, topic=topic, declare="passive"))
    with pytest.raises(TransientPublishError, match="does not exist"):
        transport.publish(sms(1, 1))
    assert not queue_exists(topic), "a passive declare must never create the queue"
    with amqp_device(topic) as device:
        assert transport.publish(sms(2, 1)) == {}
        assert wait_until(lambda: len(device.received) == 1)


def test_the_url_needs_a_topic() -> None:
    with pytest.raises(ConfigurationError, match="topic"):
        open_transport(RabbitMqTransport, AMQP_URL)
    with pytest.raises(ConfigurationError, match="declare"):
        open_transport(RabbitMqTransport, with_query(AMQP_URL, topic="t", declare="durable"))
    with pytest.raises(ConfigurationError, match="bogus"):
        open_transport(RabbitMqTransport, with_query(AMQP_URL, topic="t", bogus="1"))


def test_an_empty_batch_needs_no_broker() -> None:
    transport = open_transport(RabbitMqTransport, "amqp://127.0.0.1:1/?topic=t")
    assert transport.publish([]) == {}
    transport.close()
