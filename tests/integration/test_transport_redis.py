"""The Redis pub/sub transport against the real server on loopback, with a subscribed device."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from outbox.commands import Dialect
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.transports.redis_pubsub import RedisTransport
from tests.support.brokers import (
    REDIS_URL,
    cuttable_link,
    every_command,
    kill_redis_clients,
    open_transport,
    redis_device,
    sms,
    through,
    transports_opened,
    unique_topic,
    wait_until,
    with_query,
)

pytestmark = pytest.mark.integration

Opener = Callable[..., RedisTransport]


@pytest.fixture
def topic() -> str:
    return unique_topic()


@pytest.fixture
def opened() -> Iterator[Opener]:
    """Opens transports for a test and closes them even when it fails."""
    with transports_opened(RedisTransport, "redis-test") as open_:
        yield open_


@pytest.mark.parametrize("dialect", [Dialect.OTP_PI, Dialect.README])
def test_the_subscriber_receives_exactly_the_encoded_commands(
        dialect: Dialect, topic: str, opened: Opener) -> None:
    batch = every_command(dialect)
    with redis_device(topic) as device:
        transport = opened(with_query(REDIS_URL, topic=topic, dialect=dialect.value))
        assert transport.options.dialect is dialect
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) == len(batch))
    assert device.received == [e.body for e in batch]


def test_no_subscriber_is_transient(topic: str, opened: Opener) -> None:
    transport = opened(with_query(REDIS_URL, topic=topic))
    failures = transport.publish(sms(1, 3))
    assert set(failures) == {1, 2, 3}
    assert all(isinstance(error, TransientPublishError) for error in failures.values())
    assert "no subscriber on the channel" in str(failures[1])


def test_accept_no_subscriber_counts_nobody_as_delivered(topic: str, opened: Opener) -> None:
    transport = opened(with_query(REDIS_URL, topic=topic, accept_no_subscriber="true"))
    assert transport.publish(sms(1, 3)) == {}


def test_a_batch_of_two_thousand_arrives_complete(topic: str, opened: Opener) -> None:
    batch = sms(1, 2000)
    with redis_device(topic) as device:
        transport = opened(with_query(REDIS_URL, topic=topic))
        assert transport.publish(batch) == {}
        assert wait_until(lambda: len(device.received) >= len(batch))
    assert device.received == [e.body for e in batch]


def test_a_killed_connection_is_replaced(topic: str, opened: Opener) -> None:
    name = f"outbox-test-{uuid.uuid4().hex[:8]}"
    with redis_device(topic) as device:
        transport = opened(with_query(REDIS_URL, topic=topic, client_name=name))
        assert transport.publish(sms(1, 100)) == {}
        assert kill_redis_clients(name) == 1
        assert transport.publish(sms(101, 100)) == {}
        assert wait_until(lambda: len(device.received) == 200)
    assert device.received == [e.body for e in sms(1, 200)]


def test_a_connection_lost_mid_batch_fails_the_batch_and_recovers(
        topic: str, opened: Opener) -> None:
    with redis_device(topic) as device, cuttable_link(REDIS_URL, 6379) as link:
        transport = opened(with_query(through(link, REDIS_URL), topic=topic, timeout="5"))
        assert transport.publish(sms(1, 10)) == {}
        link.hold_replies()
        threading.Timer(0.3, link.cut).start()
        started = time.monotonic()
        with pytest.raises(TransientPublishError):
            transport.publish(sms(11, 50))
        assert time.monotonic() - started < 3, "the loss must end the wait, not the timeout"
        link.release_replies()
        assert transport.publish(sms(11, 50)) == {}
        # the lost batch may have reached the server before the cut: at least once
        assert wait_until(lambda: set(device.received) >= {e.body for e in sms(1, 60)})


def test_wrong_credentials_are_permanent(topic: str, opened: Opener) -> None:
    password = "not-the-password-7Q"
    transport = opened(with_query(REDIS_URL.replace("redis://", f"redis://nobody:{password}@"),
                                  topic=topic))
    with pytest.raises(PermanentPublishError, match="refused") as raised:
        transport.publish(sms(1, 1))
    assert password not in str(raised.value)
    assert isinstance(raised.value.__cause__, redis.exceptions.AuthenticationError)
    with pytest.raises(PermanentPublishError):
        transport.check()


def test_a_password_the_server_does_not_want_is_permanent_over_resp2(
        topic: str, opened: Opener) -> None:
    """A server without ``requirepass`` answers ``AUTH <password>`` with an error.

    Over RESP3 (redis-py's default) the client sends ``HELLO 3 AUTH default <password>``
    instead, which a passwordless default user accepts: nothing to refuse there.
    """
    server: redis.Redis[bytes] = redis.Redis.from_url(REDIS_URL)
    try:
        requirepass = server.config_get("requirepass").get("requirepass")
    finally:
        server.close()
    if requirepass:
        pytest.skip("the test server has a password")
    url = REDIS_URL.replace("redis://", "redis://:not-the-password-7Q@")
    transport = opened(with_query(url, topic=topic, protocol="2"))
    with pytest.raises(PermanentPublishError, match="without any password configured"):
        transport.publish(sms(1, 1))


def test_unreachable_server_is_transient(topic: str, opened: Opener) -> None:
    transport = opened(f"redis://127.0.0.1:1/0?topic={topic}&timeout=2")
    with pytest.raises(TransientPublishError, match=r"127\.0\.0\.1:1\b"):
        transport.publish(sms(1, 1))
    with pytest.raises(TransientPublishError):
        transport.check()


def test_check_pings(topic: str, opened: Opener) -> None:
    opened(with_query(REDIS_URL, topic=topic)).check()


def test_the_url_needs_a_topic() -> None:
    with pytest.raises(ConfigurationError, match="topic"):
        open_transport(RedisTransport, REDIS_URL)
    with pytest.raises(ConfigurationError, match="accept_no_subscriber"):
        open_transport(RedisTransport, with_query(REDIS_URL, topic="t",
                                                  accept_no_subscriber="maybe"))
    with pytest.raises(ConfigurationError, match="bogus"):
        open_transport(RedisTransport, with_query(REDIS_URL, topic="t", bogus="1"))
