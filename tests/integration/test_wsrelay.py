"""The WebSocket topic relay with device-like clients on loopback: nothing mocked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
import structlog
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from outbox.errors import ConfigurationError
from outbox.wsrelay import RelayServer, main_ws_relay, run_relay
from tests.support.websocket import (
    PATH,
    RELAY_PASSWORD,
    basic_auth,
    device,
    free_port,
    nothing_more,
    receive,
    relay_fixture,  # noqa: F401 - provides the relay fixture
    wait_for_clients,
    wait_until,
)

pytestmark = pytest.mark.integration

COMMAND = '{"command":"send-sms","data":{"receiver":"+6281234567890","message":"Kode 481516"}}'


def handshake_status(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}{path}", additional_headers=headers, open_timeout=5,
                legacy=True)
    response = refused.value.response
    return response.status_code, dict(response.headers.raw_items())


def test_text_frames_go_to_the_other_clients_of_the_topic_only(relay: RelayServer) -> None:
    with device(relay.port, "sms") as sender, device(relay.port, "sms") as first, \
            device(relay.port, "sms") as second, device(relay.port, "mail") as elsewhere:
        wait_for_clients(relay, "sms", listeners=3)
        wait_for_clients(relay, "mail", listeners=1)

        sender.send(COMMAND)
        sender.send("second frame, not even JSON: forwarded as it is ✓")

        expected = [COMMAND.encode(), "second frame, not even JSON: forwarded as it is ✓".encode()]
        assert receive(first, 2) == expected
        assert receive(second, 2) == expected
        assert nothing_more(sender)
        assert nothing_more(elsewhere, wait=0.05)

        first.send("reply")  # every client may talk; the sender is always left out
        assert receive(sender, 1) == [b"reply"]
        assert receive(second, 1) == [b"reply"]
        assert nothing_more(first, wait=0.1)


def test_binary_frames_are_ignored(relay: RelayServer) -> None:
    with device(relay.port, "sms") as sender, device(relay.port, "sms") as phone:
        wait_for_clients(relay, "sms", listeners=2)
        sender.send(b"\x00\x01 binary")
        sender.send(COMMAND)
        assert receive(phone, 1) == [COMMAND.encode()]  # the binary frame never came
        assert nothing_more(phone, wait=0.1)


def test_handshake_needs_a_topic_and_the_credentials(relay: RelayServer) -> None:
    status, _ = handshake_status(relay.port, PATH, basic_auth())
    assert status == 400
    status, _ = handshake_status(relay.port, f"{PATH}?topic=", basic_auth())
    assert status == 400
    status, headers = handshake_status(relay.port, f"{PATH}?topic=sms", {})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic ")
    status, _ = handshake_status(relay.port, f"{PATH}?topic=sms",
                                 basic_auth(password=RELAY_PASSWORD + "x"))
    assert status == 401
    status, _ = handshake_status(relay.port, f"{PATH}?topic=sms",
                                 basic_auth(user="someone", password=RELAY_PASSWORD))
    assert status == 401
    status, _ = handshake_status(relay.port, f"{PATH}?topic=sms", {"Authorization": "Bearer x"})
    assert status == 401
    # Any path will do: the device's path is whatever its configuration says.
    with device(relay.port, "sms"):
        wait_for_clients(relay, "sms", listeners=1)


def test_without_credentials_everyone_is_accepted() -> None:
    with RelayServer("127.0.0.1", 0, None) as open_relay, \
            device(open_relay.port, "sms", headers={}) as anonymous, \
            device(open_relay.port, "sms", headers=basic_auth("any", "thing")) as other:
        wait_for_clients(open_relay, "sms", listeners=2)
        anonymous.send(COMMAND)
        assert receive(other, 1) == [COMMAND.encode()]


def test_publishers_get_listener_counts_instead_of_frames(relay: RelayServer) -> None:
    publisher_headers = {**basic_auth(), "X-Outbox-Role": "publisher"}
    with device(relay.port, "sms", headers=publisher_headers) as publisher:
        assert publisher.response is not None
        assert publisher.response.headers["X-Outbox-Listeners"] == "0"
        assert json.loads(receive(publisher, 1)[0]) == {"listeners": 0}
        with device(relay.port, "sms") as phone:
            assert json.loads(receive(publisher, 1)[0]) == {"listeners": 1}
            publisher.send(COMMAND)
            assert receive(phone, 1) == [COMMAND.encode()]
            phone.send("from the device")
            assert nothing_more(publisher, wait=0.2)  # publishers get no forwarded frames
        assert json.loads(receive(publisher, 1)[0]) == {"listeners": 0}


def test_a_slow_consumer_is_cut_off_without_holding_up_the_others() -> None:
    frames, size = 10_000, 1024
    with RelayServer("127.0.0.1", 0, None, max_buffer=64 * 1024) as small:
        slow_socket = socket.create_connection(("127.0.0.1", small.port))
        # A fixed receive buffer: no autotuning to megabytes that would hide the slowness.
        slow_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with device(small.port, "sms", headers={}) as sender, \
                device(small.port, "sms", headers={}) as fast, \
                device(small.port, "sms", headers={}, sock=slow_socket, max_queue=16) as slow:
            wait_for_clients(small, "sms", listeners=3)
            texts = [f"{i:08d}".ljust(size, ".") for i in range(frames)]
            for text in texts:
                sender.send(text)

            received = receive(fast, frames, timeout=30)
            assert received == [text.encode() for text in texts]
            wait_for_clients(small, "sms", listeners=2)  # the slow one is out

            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    slow.recv(timeout=10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1013


def test_logs_say_who_connected_but_never_what_was_sent(relay: RelayServer) -> None:
    with structlog.testing.capture_logs() as events:
        with device(relay.port, "sms") as sender, device(relay.port, "sms") as phone:
            wait_for_clients(relay, "sms", listeners=2)
            sender.send(COMMAND)
            receive(phone, 1)
        wait_for_clients(relay, "sms", listeners=0)
        wait_until(lambda: sum(e["event"] == "ws.client_disconnected" for e in events) == 2,
                   what="both disconnections logged")
    names = [event["event"] for event in events]
    assert names.count("ws.client_connected") == 2
    assert {event["topic"] for event in events if event["event"].startswith("ws.client")} == {"sms"}
    logged = json.dumps(events, default=str)
    for secret in ("6281234567890", "481516", RELAY_PASSWORD):
        assert secret not in logged


def test_run_relay_serves_until_stop_is_set() -> None:
    port = free_port()
    stop = threading.Event()
    runner = threading.Thread(target=run_relay, args=("127.0.0.1", port, None, stop))
    runner.start()
    try:
        wait_until(lambda: _listening(port), what="the relay to listen")
        with device(port, "sms", headers={}) as sender, device(port, "sms", headers={}) as phone:
            wait_until(lambda: _sent_and_received(sender, phone), what="a forwarded frame")
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    assert not _listening(port)


def test_main_ws_relay_stops_on_sigterm_and_restores_the_handler() -> None:
    port = free_port()
    previous = signal.getsignal(signal.SIGTERM)

    def terminate_when_listening() -> None:
        wait_until(lambda: _listening(port), what="the relay to listen")
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_listening)
    killer.start()
    try:
        assert main_ws_relay("127.0.0.1", port, insecure_no_auth=True) == 0
    finally:
        killer.join(10)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not _listening(port)


def test_main_ws_relay_refuses_anonymous_use_and_a_busy_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigurationError, match="--insecure-no-auth"):
        main_ws_relay("127.0.0.1", free_port())
    with _busy_port() as port:
        assert main_ws_relay("127.0.0.1", port, insecure_no_auth=True) == 1
    assert "cannot listen" in capsys.readouterr().err


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _sent_and_received(sender: ClientConnection, phone: ClientConnection) -> bool:
    sender.send(COMMAND)
    try:
        return phone.recv(timeout=0.2) == COMMAND
    except TimeoutError:
        return False


@contextlib.contextmanager
def _busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port: int = taken.getsockname()[1]
        yield port

