"""The WebSocket transport against our relay (and a plain one) on loopback: nothing mocked."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox.commands import (
    SEND_SMS,
    Dialect,
)
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.store import PostgresStore
from outbox.transports import open_transports
from outbox.transports.base import Envelope
from outbox.transports.websocket import CONFIRM_EVERY, WebSocketTransport
from outbox.wsrelay import MAX_FRAME, RelayServer
from tests.support.brokers import COMMANDS, envelope
from tests.support.websocket import (
    RELAY_PASSWORD,
    RELAY_USER,
    breaking_server,
    closing_server,
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


def test_connection_lost_mid_batch_fails_every_unconfirmed_frame_as_transient(
    transports: list[WebSocketTransport],
) -> None:
    # Frames of ~1 KiB so that the batch cannot hide in socket buffers before the break.
    with breaking_server(after=250) as server:
        transport = open_transport(f"ws://127.0.0.1:{server.port}/ws?topic=sms&timeout=5")
        transports.append(transport)
        batch = sms(1, 20_000, padding=1000)

        failures = transport.publish(batch)

        ids = [item.id for item in batch]
        assert failures, "the break went unnoticed"
        first_failed = ids.index(min(failures))
        # Only what a pong confirmed counts as delivered: whole windows between two pings (the
        # server's websockets answers a ping when it parses it, a little ahead of its handler).
        assert first_failed % CONFIRM_EVERY == 0
        assert first_failed < 2_000
        assert sorted(failures) == ids[first_failed:]
        assert all(isinstance(error, TransientPublishError) for error in failures.values())
        assert transport.publish(sms(30_001, 10)) == {}  # a fresh connection


def test_a_close_right_after_the_upgrade_is_refused_credentials(
    transports: list[WebSocketTransport],
) -> None:
    # kamshory/Messenger answers wrong credentials with 101 and then close code 1000.
    with closing_server(after=0) as server:
        transport = open_transport(
            f"ws://otp-pi:wrong-password@127.0.0.1:{server.port}/ws?topic=sms&timeout=5")
        transports.append(transport)
        with pytest.raises(PermanentPublishError, match="refused the credentials") as caught:
            transport.publish(sms(1, 3))
        assert "right after the upgrade" in str(caught.value)
        assert "wrong-password" not in str(caught.value)
        with pytest.raises(PermanentPublishError, match="refused the credentials"):
            transport.check()


def test_a_relay_going_away_right_after_the_upgrade_is_transient(
    transports: list[WebSocketTransport],
) -> None:
    with closing_server(after=0, code=1001) as server:
        transport = open_transport(f"ws://127.0.0.1:{server.port}/ws?topic=sms&timeout=2")
        transports.append(transport)
        with pytest.raises(TransientPublishError, match="1001"):
            transport.publish(sms(1, 3))


def test_an_oversized_row_fails_alone_and_the_connection_stays_up(
    relay: RelayServer, transports: list[WebSocketTransport],
) -> None:
    with device(relay.port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        transport = open_transport(relay_url(relay.port, "sms"))  # max_frame: ws-relay's 1 MiB
        transports.append(transport)
        small = open_transport(relay_url(relay.port, "sms", query="max_frame=4096"))
        transports.append(small)
        batch = sms(1, 3) + sms(4, 1, padding=MAX_FRAME) + sms(5, 2) + sms(7, 1, padding=5000)

        failures = transport.publish(batch)

        assert sorted(failures) == [4]
        assert isinstance(failures[4], PermanentPublishError)
        assert "max_frame=1,048,576" in str(failures[4])
        delivered = [item.body for item in batch if item.id != 4]
        assert receive(phone, 6) == delivered
        wait_for_clients(relay, "sms", listeners=1, publishers=1)  # not dropped

        failures = small.publish(batch)
        assert sorted(failures) == [4, 7]
        assert "max_frame=4,096" in str(failures[7])
        assert receive(phone, 5) == [item.body for item in batch if item.id not in (4, 7)]


def test_a_frame_the_relay_refuses_is_not_taken_for_delivered(
    relay: RelayServer, transports: list[WebSocketTransport],
) -> None:
    # Told a larger limit than the relay has: the relay closes (1009) and nothing after the
    # last pong counts as delivered.
    with device(relay.port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        transport = open_transport(relay_url(relay.port, "sms", query=f"max_frame={4 * MAX_FRAME}"))
        transports.append(transport)
        batch = sms(1, 2) + sms(3, 1, padding=2 * MAX_FRAME) + sms(4, 3)

        failures = transport.publish(batch)

        assert sorted(failures) == [1, 2, 3, 4, 5, 6]
        assert all(isinstance(error, TransientPublishError) for error in failures.values())
        assert "1009" in str(failures[6])
        assert receive(phone, 2) == [item.body for item in batch[:2]]  # read, then cut off
        assert transport.publish(sms(7, 2)) == {}  # a fresh connection


def test_max_frame_must_be_a_size() -> None:
    for value in ("big", "10", "-1"):
        with pytest.raises(ConfigurationError, match="max_frame"):
            open_transport(f"ws://127.0.0.1:{free_port()}/ws?topic=a&max_frame={value}")


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


# -- the whole relay: rows in Postgres, published through a real relay ---------------------


def _relay_rows(url: str, transport_url: str, conn: psycopg.Connection[Any],
                messages: list[str]) -> dict[str, tuple[str, str | None]]:
    with conn.cursor() as cursor:
        for text in messages:
            cursor.execute("INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s)",
                           (Jsonb({"receiver": "+6281234567890", "message": text}),))
    settings = Settings(transports={"default": transport_url})
    transports = open_transports(settings)
    try:
        relay = Relay(PostgresStore(psycopg.connect(url)), transports, settings)
        relay.drain()
        relay.store.close()
    finally:
        for transport in transports.values():
            transport.close()
    return {row[0]: (row[1], row[2]) for row in conn.execute(
        "SELECT data ->> 'message', state, last_error FROM outbox.message")}


def test_relay_sends_what_the_ws_relay_read_and_fails_an_oversized_row_with_its_reason(
    relay: RelayServer, conn: psycopg.Connection[Any], clean_db: str,
) -> None:
    with device(relay.port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=1)
        big = "big " + "x" * 5000
        rows = _relay_rows(clean_db, relay_url(relay.port, "sms", query="max_frame=4096"), conn,
                           ["first", "second", big, "third"])

        assert {text: state for text, (state, _) in rows.items()} == {
            "first": "sent", "second": "sent", big: "failed", "third": "sent"}
        assert "max_frame=4,096" in (rows[big][1] or "")
        frames = [json.loads(frame)["data"]["message"] for frame in receive(phone, 3)]
        assert frames == ["first", "second", "third"]


def test_relay_fails_rows_for_a_ws_relay_that_closes_after_the_upgrade(
    conn: psycopg.Connection[Any], clean_db: str,
) -> None:
    with closing_server(after=0) as server:
        rows = _relay_rows(clean_db, f"ws://otp-pi:wrong@127.0.0.1:{server.port}/ws?topic=sms",
                           conn, ["one", "two"])
    assert {state for state, _ in rows.values()} == {"failed"}
    assert all("refused the credentials" in (error or "") for _, error in rows.values())
