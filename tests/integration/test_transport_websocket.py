"""The WebSocket transport against our relay (and a plain one) on loopback: nothing mocked."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from outbox.commands import (
    SEND_SMS,
    Dialect,
)
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.transports.base import Envelope
from outbox.transports.websocket import WebSocketTransport
from outbox.wsrelay import RelayServer
from tests.support.brokers import COMMANDS, envelope
from tests.support.websocket import (
    RELAY_PASSWORD,
    RELAY_USER,
    breaking_server,
    device,
    free_port,
    nothing_more,
    open_transport,
    plain_relay,
    receive,
    relay_fixture,  # noqa: F401 - provides the relay fixture
    relay_url,
    stalled_server,
    wait_for_clients,
    wait_until,
)

pytestmark = pytest.mark.integration

def sms(first: int, count: int, *, padding: int = 0) -> list[Envelope]:
    text = "x" * padding
    return [envelope(i, SEND_SMS, {"receiver": "+628123400000", "message": f"pesan {i} {text}"},
                     Dialect.OTP_PI)
            for i in range(first, first + count)]


@pytest.fixture
def transports() -> Iterator[list[WebSocketTransport]]:
    """Transports opened by a test, closed even when it fails."""
    opened: list[WebSocketTransport] = []
    yield opened
    for transport in opened:
        transport.close()


def test_url_without_topic_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="topic"):
        open_transport(f"ws://u:p@127.0.0.1:{free_port()}/ws")
    with pytest.raises(ConfigurationError, match="require_listener"):
        open_transport(f"ws://127.0.0.1:{free_port()}/ws?topic=a&require_listener=perhaps")


def test_connects_lazily(relay: RelayServer, transports: list[WebSocketTransport]) -> None:
    transport = open_transport(relay_url(relay.port, "sms"))
    transports.append(transport)
    time.sleep(0.1)
    assert relay.clients("sms") == (0, 0)
    transport.check()
    wait_for_clients(relay, "sms", listeners=0, publishers=1)
    transport.check()  # pings the open connection instead of opening another
    assert relay.clients("sms") == (0, 1)


@pytest.mark.parametrize("dialect", list(Dialect), ids=lambda dialect: dialect.value)
def test_device_receives_exactly_the_encoded_commands(
    relay: RelayServer, transports: list[WebSocketTransport], dialect: Dialect
) -> None:
    with device(relay.port, "otp") as phone, device(relay.port, "elsewhere") as stranger:
        wait_for_clients(relay, "otp", listeners=1)
        transport = open_transport(relay_url(relay.port, "otp", query=f"dialect={dialect.value}"))
        transports.append(transport)
        assert transport.options.dialect is dialect
        batch = [envelope(i, command, data, dialect) for i, (command, data) in
                 enumerate(COMMANDS, start=1)]

        assert transport.publish(batch) == {}

        assert receive(phone, len(batch)) == [item.body for item in batch]
        assert nothing_more(phone)
        assert nothing_more(stranger, wait=0.05)
    names = [frame.split(b'"', 4)[3].decode() for frame in (item.body for item in batch)]
    if dialect is Dialect.OTP_PI:
        assert names == ["send-sms", "send-mail", "block-msisdn", "unblock-msisdn"]
    else:
        assert names == ["send-sms", "send-email", "block-msisdn", "unblock-msisdn"]


def test_topic_is_url_encoded(relay: RelayServer, transports: list[WebSocketTransport]) -> None:
    topic = "otp/sms id+1&x=ü"
    with device(relay.port, topic) as phone:
        wait_for_clients(relay, topic, listeners=1)
        transport = open_transport(relay_url(relay.port, topic))
        transports.append(transport)
        batch = sms(1, 3)
        assert transport.publish(batch) == {}
        assert receive(phone, 3) == [item.body for item in batch]


def test_publisher_gets_no_frames_back(relay: RelayServer,
                                       transports: list[WebSocketTransport]) -> None:
    with device(relay.port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        first = open_transport(relay_url(relay.port, "sms"))
        second = open_transport(relay_url(relay.port, "sms"))
        transports += [first, second]
        assert first.publish(sms(1, 50)) == {}
        assert second.publish(sms(51, 50)) == {}
        assert len(receive(phone, 100)) == 100
        phone.send('{"command":"echo","data":{}}')  # the device talking on the topic
        first.check()
        second.check()
    wait_for_clients(relay, "sms", listeners=0, publishers=2)


def test_bad_credentials_are_permanent(relay: RelayServer,
                                       transports: list[WebSocketTransport]) -> None:
    transport = open_transport(relay_url(relay.port, "sms", password="wrong-password"))
    transports.append(transport)
    with pytest.raises(PermanentPublishError, match="refused the credentials") as caught:
        transport.publish(sms(1, 2))
    assert "401" in str(caught.value)
    assert "wrong-password" not in str(caught.value)
    assert f"{RELAY_USER}:***@" in str(caught.value)

    anonymous = open_transport(relay_url(relay.port, "sms", user=None))
    transports.append(anonymous)
    with pytest.raises(PermanentPublishError, match="401"):
        anonymous.check()


def test_unreachable_relay_is_transient(transports: list[WebSocketTransport]) -> None:
    transport = open_transport(relay_url(free_port(), "sms", query="timeout=2"))
    transports.append(transport)
    started = time.monotonic()
    with pytest.raises(TransientPublishError, match="cannot reach") as caught:
        transport.publish(sms(1, 1))
    with pytest.raises(TransientPublishError):
        transport.check()
    assert time.monotonic() - started < 2 * 2 + 1  # a few quick tries, bounded by the timeout
    assert "***" in str(caught.value)
    assert quote(RELAY_PASSWORD, safe="") not in str(caught.value)


def test_reconnects_after_the_relay_restarts(relay: RelayServer,
                                             transports: list[WebSocketTransport]) -> None:
    transport = open_transport(relay_url(relay.port, "sms", query="timeout=2"))
    transports.append(transport)
    port = relay.port
    with device(port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        before = sms(1, 10)
        assert transport.publish(before) == {}
        assert receive(phone, 10) == [item.body for item in before]

    relay.stop()  # closes every connection (1001); the port is free
    during = sms(11, 10)
    with pytest.raises(TransientPublishError):  # the whole batch, none taken for delivered
        transport.publish(during)

    relay.start()
    assert relay.port == port
    with device(port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        assert transport.publish(during) == {}  # the retry of the failed batch
        after = sms(21, 10)
        assert transport.publish(after) == {}
        assert receive(phone, 20) == [item.body for item in during + after]

    relay.stop()  # a restart between two batches is noticed before the next one
    relay.start()
    with device(port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        later = sms(31, 10)
        assert transport.publish(later) == {}
        assert receive(phone, 10) == [item.body for item in later]


def test_connection_lost_mid_batch_fails_the_rest_as_transient(
    transports: list[WebSocketTransport],
) -> None:
    # Frames of ~1 KiB so that the batch cannot hide in socket buffers before the break.
    with breaking_server(after=50) as server:
        transport = open_transport(f"ws://127.0.0.1:{server.port}/ws?topic=sms&timeout=5")
        transports.append(transport)
        batch = sms(1, 20_000, padding=1000)

        failures = transport.publish(batch)

        ids = [item.id for item in batch]
        assert failures, "the break went unnoticed"
        first_failed = ids.index(min(failures))
        assert first_failed >= 50
        assert sorted(failures) == ids[first_failed:]  # the frame in flight and all after it
        assert all(isinstance(error, TransientPublishError) for error in failures.values())
        assert "mid-batch" in str(next(iter(failures.values())))
        assert transport.publish(sms(30_001, 10)) == {}  # a fresh connection


def test_a_relay_that_stops_reading_cannot_hang_a_batch(
    transports: list[WebSocketTransport],
) -> None:
    with stalled_server() as server:
        transport = open_transport(f"ws://127.0.0.1:{server.port}/ws?topic=sms&timeout=1")
        transports.append(transport)
        batch = sms(1, 20_000, padding=1000)  # more than every socket buffer on the way
        started = time.monotonic()

        failures = transport.publish(batch)

        # Each blocked write gives up after the timeout (1 s); a few may each free a little.
        assert time.monotonic() - started < 10
        ids = [item.id for item in batch]
        assert failures
        assert sorted(failures) == ids[ids.index(min(failures)):]
        assert all(isinstance(error, TransientPublishError) for error in failures.values())


def test_two_thousand_messages_arrive_complete_and_in_order(
    relay: RelayServer, transports: list[WebSocketTransport]
) -> None:
    with device(relay.port, "bulk") as phone:
        wait_for_clients(relay, "bulk", listeners=1)
        transport = open_transport(relay_url(relay.port, "bulk"))
        transports.append(transport)
        batches = [sms(first, 200) for first in range(1, 2001, 200)]
        for batch in batches:
            assert transport.publish(batch) == {}
        assert receive(phone, 2000) == [item.body for batch in batches for item in batch]
        assert nothing_more(phone, wait=0.1)


def test_require_listener_follows_the_relay_count(
    relay: RelayServer, transports: list[WebSocketTransport]
) -> None:
    transport = open_transport(relay_url(relay.port, "sms", query="require_listener=true"))
    transports.append(transport)

    failures = transport.publish(sms(1, 3))
    assert sorted(failures) == [1, 2, 3]
    assert all(isinstance(error, TransientPublishError) for error in failures.values())
    assert "nobody listens" in str(failures[1])

    with device(relay.port, "sms") as phone:
        wait_until(lambda: transport.listeners == 1, what="the relay's listener notice")
        batch = sms(4, 3)
        assert transport.publish(batch) == {}
        assert receive(phone, 3) == [item.body for item in batch]
    wait_until(lambda: transport.listeners == 0, what="the relay's listener notice")
    assert sorted(transport.publish(sms(7, 2))) == [7, 8]


def test_plain_relay_discards_other_publishers_frames_and_refuses_require_listener(
    transports: list[WebSocketTransport],
) -> None:
    with plain_relay() as server:
        url = f"ws://127.0.0.1:{server.port}/ws?topic=sms"
        with device(server.port, "sms", headers={}) as phone:
            first, second = open_transport(url), open_transport(url)
            transports += [first, second]
            first.check()
            second.check()
            # A plain relay forwards each publisher's frames to the other publisher too.
            assert first.publish(sms(1, 200)) == {}
            assert second.publish(sms(201, 200)) == {}
            assert len(receive(phone, 400)) == 400
            # Still reading: pongs get through instead of waiting behind unread frames.
            first.check()
            second.check()
            assert first.listeners is None

        strict = open_transport(url + "&require_listener=true")
        transports.append(strict)
        with pytest.raises(PermanentPublishError, match="does not report its listeners"):
            strict.publish(sms(1, 1))


def test_close_sends_a_close_frame(relay: RelayServer) -> None:
    transport = open_transport(relay_url(relay.port, "sms"))
    transport.check()
    wait_for_clients(relay, "sms", listeners=0, publishers=1)
    transport.close()
    wait_for_clients(relay, "sms", listeners=0, publishers=0)
    transport.close()  # idempotent
