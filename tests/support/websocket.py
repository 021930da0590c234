"""WebSocket test helpers: our relay on a free loopback port, device-like clients, a plain relay.

Everything is real: real sockets on 127.0.0.1, the real websockets library on both ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from urllib.parse import quote

import pytest
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from outbox.settings import Settings
from outbox.transports import transport_options
from outbox.transports.websocket import WebSocketTransport
from outbox.wsrelay import RelayServer

RELAY_USER = "otp-pi"
RELAY_PASSWORD = "s3cret:with colon"
PATH = "/ws"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def basic_auth(user: str = RELAY_USER, password: str = RELAY_PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def relay_url(port: int, topic: str, *, user: str | None = RELAY_USER,
              password: str = RELAY_PASSWORD, query: str = "") -> str:
    """A transport URL, credentials in the userinfo as an operator would write them."""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user is not None else ""
    extra = f"&{query}" if query else ""
    return f"ws://{auth}127.0.0.1:{port}{PATH}?topic={quote(topic, safe='')}{extra}"


def open_transport(url: str, name: str = "ws") -> WebSocketTransport:
    stripped, options = transport_options(url, Settings())
    return WebSocketTransport(name, stripped, options)


@contextlib.contextmanager
def device(port: int, topic: str, *, headers: Mapping[str, str] | None = None,
           sock: socket.socket | None = None,
           max_queue: int | None = None) -> Iterator[ClientConnection]:
    """A client connecting as OTP-Pi does: same path, ``topic`` query, Basic auth.

    By default it buffers whatever arrives (``max_queue=None``) so a test may publish first
    and read afterwards; ``max_queue=16`` makes it stop reading once 16 frames wait.
    """
    url = f"ws://127.0.0.1:{port}{PATH}?topic={quote(topic, safe='')}"
    with connect(url, additional_headers=dict(headers if headers is not None else basic_auth()),
                 compression=None, open_timeout=5, close_timeout=2, max_queue=max_queue,
                 sock=sock) as client:
        yield client


def receive(client: ClientConnection, count: int, timeout: float = 10.0) -> list[bytes]:
    """``count`` frames, each checked to be a text frame, as the bytes of its payload."""
    deadline = time.monotonic() + timeout
    frames: list[bytes] = []
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"received {len(frames)} frames of {count} within {timeout:g} s")
        try:
            frame = client.recv(timeout=remaining)
        except TimeoutError:
            continue
        assert isinstance(frame, str), "a binary frame arrived; the device reads text frames"
        frames.append(frame.encode("utf-8"))
    return frames


def nothing_more(client: ClientConnection, wait: float = 0.3) -> bool:
    """True when no frame arrives within ``wait`` seconds."""
    try:
        client.recv(timeout=wait)
    except TimeoutError:
        return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float = 5.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_clients(relay: RelayServer, topic: str, *, listeners: int,
                     publishers: int | None = None) -> None:
    """Block until the relay has registered the clients (a handshake ends before that)."""
    def registered() -> bool:
        counts = relay.clients(topic)
        return counts[0] == listeners and (publishers is None or counts[1] == publishers)

    wait_until(registered, what=f"{listeners} listener(s) on {topic!r}")


@pytest.fixture(name="relay")
def relay_fixture() -> Iterator[RelayServer]:
    """``relay``: our relay on a free loopback port, with one configured user.

    Import ``relay_fixture`` into a test module to make ``relay`` available there.
    """
    with RelayServer("127.0.0.1", 0, {RELAY_USER: RELAY_PASSWORD}) as server:
        yield server


# -- other servers: a plain relay (WSMessageBroker-like) and a server that breaks -------------


Handler = Callable[[ServerConnection], Awaitable[None]]


class ThreadedServer:
    """A websockets asyncio server with ``handler`` in a background thread."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(5), "test server did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.handler, "127.0.0.1", self.port, compression=None,
                         close_timeout=1) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()


def plain_relay() -> ThreadedServer:
    """What WSMessageBroker does: forward text to the others of the topic; no auth, no extras."""
    topics: dict[str, set[ServerConnection]] = {}

    async def handler(connection: ServerConnection) -> None:
        assert connection.request is not None
        topic = connection.request.path.partition("topic=")[2]
        clients = topics.setdefault(topic, set())
        clients.add(connection)
        try:
            async for message in connection:
                if isinstance(message, str):
                    broadcast([c for c in clients if c is not connection], message)
        except ConnectionClosed:
            pass
        finally:
            clients.discard(connection)

    return ThreadedServer(handler)


def breaking_server(after: int) -> ThreadedServer:
    """Accepts anyone and drops the TCP connection (no close frame) after ``after`` frames."""
    async def handler(connection: ServerConnection) -> None:
        received = 0
        with contextlib.suppress(ConnectionClosed):
            async for _ in connection:
                received += 1
                if received >= after:
                    connection.transport.abort()
                    return

    return ThreadedServer(handler)


def stalled_server() -> ThreadedServer:
    """Accepts anyone, never reads: once 16 frames wait, websockets stops reading the socket."""
    async def handler(connection: ServerConnection) -> None:
        await connection.wait_closed()

    return ThreadedServer(handler)


def closing_server(after: int = 0, code: int = 1000) -> ThreadedServer:
    """Completes the upgrade, reads ``after`` frames, then closes properly with ``code``.

    ``after=0`` is how kamshory/Messenger, the relay the seed recommends, answers wrong
    credentials: 101 Switching Protocols, then close code 1000, never a 401."""
    async def handler(connection: ServerConnection) -> None:
        received = 0
        with contextlib.suppress(ConnectionClosed):
            while received < after:
                await connection.recv()
                received += 1
            await connection.close(code)

    return ThreadedServer(handler)
