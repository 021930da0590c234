"""A small WebSocket topic relay that OTP-Pi devices can use (PROTOCOL.md section 7).

Clients connect to ``ws://host:port/<any path>?topic=<topic>`` (``wss://`` with
``--certfile``/``--keyfile``) with Basic auth. Each text frame a client sends is forwarded
unchanged to the other clients of the same topic; binary frames are ignored; nothing is
stored, nothing is acknowledged. A handshake without a topic gets HTTP 400, one with wrong or
missing credentials HTTP 401, one for a topic the user has no right to HTTP 403.

Users and their rights come from a users file (:mod:`outbox.passwords`: ``user:argon2-hash``
lines, written by ``outbox ws-relay passwd USER``, which reads the password from standard
input). The third field holds the user's topic rights, ``pub=sms,mail;sub=sms`` (``*``: every
topic): a listener needs ``sub`` on its topic, a publisher (below) ``pub``; a listener
sending a frame to a topic it may not publish to is disconnected (close code 1008, policy
violation) and the frame goes nowhere. ``outbox ws-relay`` refuses to start without a users
file unless ``--insecure-no-auth`` is given. The file is read again when it changes.

Beyond WSMessageBroker, one addition that plain clients never see: a client that sends
``X-Outbox-Role: publisher`` (outbox's WebSocket transport does) is a *publisher*. It gets no
forwarded frames (it would only throw them away), the handshake answers it with
``X-Outbox-Listeners: N`` (the other, non-publisher clients of its topic), and whenever that number
changes it gets a text frame ``{"listeners": N}``. That is what lets ``require_listener=true``
refuse to publish into a topic nobody listens to.

Slow consumers: forwarding uses websockets' :func:`~websockets.asyncio.server.broadcast`, which
writes to every recipient at once without waiting, so one slow client never holds up the sender or
the other clients. It does *not* drop anything: what a client does not read piles up in its write
buffer. So before each frame the relay looks at that buffer; a client with more than
``max_buffer`` bytes waiting is disconnected (close code 1013, try again later) and logged as
``ws.client_too_slow``. Dropping single frames for it instead would leave a device that silently
misses some commands in the middle of a stream; a disconnect is visible to both sides, and the
device reconnects. Either way the relay stores nothing, which is the contract of such a relay.

Events (structlog, ``outbox.wsrelay``): ``ws.relay_listening``, ``ws.client_connected``,
``ws.client_rejected``, ``ws.frame_refused``, ``ws.client_too_slow``, ``ws.client_disconnected``,
``ws.relay_stopped``.
Frame contents are never logged: they hold phone numbers, addresses and texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.asyncio.server import serve as websockets_serve
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.frames import CloseCode
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic
from websockets.http11 import Request, Response

from outbox.errors import ConfigurationError
from outbox.logs import get_logger
from outbox.passwords import UsersFile
from outbox.signals import stop_on_signals
from outbox.transports.websocket import LISTENERS_HEADER, PUBLISHER_ROLE, ROLE_HEADER

log = get_logger("outbox.wsrelay")

#: Bytes waiting for one client beyond which it is disconnected as too slow (~16k commands).
DEFAULT_MAX_BUFFER = 4 * 1024 * 1024
#: Largest frame accepted; commands are well under 1 KiB.
MAX_FRAME = 1024 * 1024
REALM = "outbox ws-relay"


@dataclass(eq=False)
class _Topic:
    listeners: set[ServerConnection] = field(default_factory=set)
    publishers: set[ServerConnection] = field(default_factory=set)


ANY_TOPIC = "*"


@dataclass(frozen=True)
class Rights:
    """The topics a user may publish to and subscribe to (``*``: every topic)."""

    publish: frozenset[str] = frozenset()
    subscribe: frozenset[str] = frozenset()

    def may_publish(self, topic: str) -> bool:
        return topic in self.publish or ANY_TOPIC in self.publish

    def may_subscribe(self, topic: str) -> bool:
        return topic in self.subscribe or ANY_TOPIC in self.subscribe

    def render(self) -> str:
        """The users file's third field: ``pub=a,b;sub=c``."""
        return ";".join(f"{key}={','.join(sorted(topics))}" for key, topics in
                        (("pub", self.publish), ("sub", self.subscribe)) if topics)


EVERYTHING = Rights(frozenset({ANY_TOPIC}), frozenset({ANY_TOPIC}))


def parse_rights(field_text: str | None, user: str = "?") -> Rights:
    """``pub=sms,mail;sub=sms`` (either part may be absent; none at all: no rights)."""
    topics: dict[str, set[str]] = {"pub": set(), "sub": set()}
    for part in (field_text or "").split(";"):
        if not part.strip():
            continue
        key, equals, names = part.partition("=")
        key = key.strip().lower()
        if not equals or key not in topics:
            raise ConfigurationError(
                f"ws-relay user {user!r}: rights must read pub=TOPIC,...;sub=TOPIC,... "
                "(* for every topic)")
        topics[key].update(name.strip() for name in names.split(",") if name.strip())
    return Rights(frozenset(topics["pub"]), frozenset(topics["sub"]))


class Authenticator(Protocol):
    """Who may connect, and with which rights (None: refused)."""

    def authenticate(self, user: str, password: str) -> Rights | None: ...


class UsersFileAuthenticator:
    """Users and rights from a users file (argon2id hashes, rights in the third field),
    read again whenever the file changes."""

    def __init__(self, path: str | Path) -> None:
        self._file = UsersFile(path)
        users = self._file.users
        if not users:
            raise ConfigurationError(f"users file {str(path)!r} has no users "
                                     "(add one with `outbox ws-relay passwd USER`)")
        for name, user in users.items():
            parse_rights(user.extra, name)  # a mistake is refused at start, by user name

    def authenticate(self, user: str, password: str) -> Rights | None:
        known = self._file.authenticate(user, password)
        if known is None:
            return None
        try:
            return parse_rights(known.extra, known.name)
        except ConfigurationError:
            return None  # a line edited by hand into nonsense grants nothing


class StaticUsers:
    """Plain user/password pairs with every right: for tests and embedding, never the CLI."""

    def __init__(self, users: Mapping[str, str], rights: Rights = EVERYTHING) -> None:
        self._credentials = [
            (user.encode("utf-8", "surrogateescape"), password.encode("utf-8", "surrogateescape"))
            for user, password in users.items()
        ]
        self._rights = rights

    def authenticate(self, user: str, password: str) -> Rights | None:
        given_user = user.encode("utf-8", "surrogateescape")
        given_password = password.encode("utf-8", "surrogateescape")
        # Every configured pair is compared, in constant time, whatever matches.
        matched = False
        for expected_user, expected_password in self._credentials:
            same_user = hmac.compare_digest(expected_user, given_user)
            same_password = hmac.compare_digest(expected_password, given_password)
            matched |= same_user & same_password
        return self._rights if matched else None


def authenticator(users: Mapping[str, str] | Authenticator | None) -> Authenticator | None:
    if users is None or isinstance(users, Mapping):
        return StaticUsers(users) if users else None
    return users


class Relay:
    """The relay's state and its websockets hooks (one per listening server)."""

    def __init__(self, users: Mapping[str, str] | Authenticator | None, *,
                 max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        #: None: every client is accepted with every right (``--insecure-no-auth``)
        self._auth = authenticator(users)
        self.max_buffer = max_buffer
        self._topics: dict[str, _Topic] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._rights: dict[ServerConnection, Rights] = {}

    @property
    def authenticates(self) -> bool:
        return self._auth is not None

    def clients(self, topic: str) -> tuple[int, int]:
        """``(listeners, publishers)`` connected to ``topic`` (call it in the relay's loop)."""
        found = self._topics.get(topic)
        return (len(found.listeners), len(found.publishers)) if found else (0, 0)

    # -- handshake ------------------------------------------------------------------------

    async def process_request(self, connection: ServerConnection,
                              request: Request) -> Response | None:
        rights = await self._authorized(request.headers.get("Authorization"))
        if rights is None:
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "Invalid credentials\n")
            response.headers["WWW-Authenticate"] = build_www_authenticate_basic(REALM)
            _log_rejected(connection, 401, "credentials")
            return response
        topic = topic_of(request.path)
        if topic is None:
            _log_rejected(connection, 400, "no_topic")
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "Missing ?topic=\n")
        publisher = _is_publisher(request)
        if not (rights.may_publish(topic) if publisher else rights.may_subscribe(topic)):
            _log_rejected(connection, 403, "no_publish_right" if publisher else "no_subscribe_right")
            return connection.respond(http.HTTPStatus.FORBIDDEN,
                                      "No right to this topic\n")
        self._rights[connection] = rights
        return None

    def process_response(self, connection: ServerConnection, request: Request,
                         response: Response) -> None:
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            self._rights.pop(connection, None)
        if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS and _is_publisher(request):
            topic = self._topics.get(topic_of(request.path) or "")
            response.headers[LISTENERS_HEADER] = str(len(topic.listeners) if topic else 0)

    async def _authorized(self, header: str | None) -> Rights | None:
        if self._auth is None:
            return EVERYTHING
        if header is None:
            return None
        try:
            user, password = parse_authorization_basic(header)
        except InvalidHeader:
            return None
        # argon2 takes tens of milliseconds on purpose: never in the event loop.
        return await asyncio.to_thread(self._auth.authenticate, user, password)

    # -- connections ----------------------------------------------------------------------

    async def handle(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None  # the handshake succeeded
        name = topic_of(request.path)
        assert name is not None  # process_request refused the handshake otherwise
        publisher = _is_publisher(request)
        topic = self._topics.setdefault(name, _Topic())
        (topic.publishers if publisher else topic.listeners).add(connection)
        role = PUBLISHER_ROLE if publisher else "listener"
        log.info("ws.client_connected", topic=name, role=role, peer=_peer(connection),
                 listeners=len(topic.listeners), publishers=len(topic.publishers))
        if publisher:
            # The count may have changed between the handshake response and now.
            self._notify([connection], len(topic.listeners))
        else:
            self._notify(topic.publishers, len(topic.listeners))
        frames = 0
        may_publish = self._rights.get(connection, EVERYTHING).may_publish(name)
        try:
            async for message in connection:
                if not isinstance(message, str):  # binary frames are not commands
                    continue
                if not may_publish:
                    log.warning("ws.frame_refused", topic=name, peer=_peer(connection),
                                reason="no_publish_right")
                    await connection.close(CloseCode.POLICY_VIOLATION, "no right to publish")
                    break
                frames += 1
                self._forward(topic, connection, message)
        except ConnectionClosed:
            pass  # an abnormal close is still just a client leaving
        finally:
            self._rights.pop(connection, None)
            self._leave(name, topic, connection, publisher)
            log.info("ws.client_disconnected", topic=name, role=role, peer=_peer(connection),
                     close_code=connection.close_code, frames=frames)

    def _leave(self, name: str, topic: _Topic, connection: ServerConnection,
               publisher: bool) -> None:
        if publisher:
            topic.publishers.discard(connection)
        elif connection in topic.listeners:
            topic.listeners.discard(connection)
            self._notify(topic.publishers, len(topic.listeners))
        if not topic.listeners and not topic.publishers and self._topics.get(name) is topic:
            del self._topics[name]

    def _forward(self, topic: _Topic, sender: ServerConnection, message: str) -> None:
        # A copy: _keeps_up() takes a slow client out of the set.
        recipients = [client for client in list(topic.listeners)
                      if client is not sender and self._keeps_up(topic, client)]
        broadcast(recipients, message)

    def _notify(self, publishers: set[ServerConnection] | list[ServerConnection],
                listeners: int) -> None:
        if publishers:
            broadcast(list(publishers), json.dumps({"listeners": listeners}))

    def _keeps_up(self, topic: _Topic, client: ServerConnection) -> bool:
        waiting = client.transport.get_write_buffer_size()
        if waiting <= self.max_buffer:
            return True
        # Out of the topic at once so no other frame is queued behind the close frame.
        topic.listeners.discard(client)
        self._notify(topic.publishers, len(topic.listeners))
        log.warning("ws.client_too_slow", peer=_peer(client), buffered_bytes=waiting)
        task = asyncio.get_running_loop().create_task(
            client.close(CloseCode.TRY_AGAIN_LATER, "consumer too slow"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return False


def topic_of(path: str) -> str | None:
    """The ``topic`` query parameter of a request path, or ``None`` when absent or empty."""
    values = [value for key, value in parse_qsl(urlsplit(path).query, keep_blank_values=True)
              if key == "topic"]
    return values[-1] if values and values[-1] else None


def _is_publisher(request: Request) -> bool:
    return request.headers.get(ROLE_HEADER, "").strip().lower() == PUBLISHER_ROLE


def _peer(connection: ServerConnection) -> str:
    try:
        address = connection.remote_address
    except (AttributeError, OSError):
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def _log_rejected(connection: ServerConnection, status: int, reason: str) -> None:
    log.info("ws.client_rejected", peer=_peer(connection), status=status, reason=reason)


# -- running it ------------------------------------------------------------------------


Users = Mapping[str, str] | Authenticator | None


async def serve(host: str, port: int, users: Users, *,
                ready: Callable[[int], object] | None = None,
                max_buffer: int = DEFAULT_MAX_BUFFER,
                tls: ssl.SSLContext | None = None) -> None:
    """Run the relay until cancelled; ``ready`` is called with the bound port once listening.

    ``users``: an :class:`Authenticator` (a users file), or a mapping of user names to plain
    passwords with every right; ``None`` or empty accepts every client. On
    cancellation open connections are closed with code 1001 (going away).
    """
    await serve_relay(Relay(users, max_buffer=max_buffer), host, port, ready=ready, tls=tls)


async def serve_relay(relay: Relay, host: str, port: int, *,
                      ready: Callable[[int], object] | None = None,
                      tls: ssl.SSLContext | None = None) -> None:
    """:func:`serve` with a :class:`Relay` of the caller's (to look at its clients)."""
    async with websockets_serve(
        relay.handle, host, port,
        process_request=relay.process_request,
        process_response=relay.process_response,
        compression=None,  # a LAN relay of small frames: deflate costs more than it saves
        max_size=MAX_FRAME,
        server_header=None,
        ssl=tls,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        log.info("ws.relay_listening", host=host, port=bound, auth=relay.authenticates,
                 tls=tls is not None)
        if ready is not None:
            ready(bound)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            log.info("ws.relay_stopped", port=bound, clients=len(server.connections))


class RelayServer:
    """The relay in a background thread, for tests and for :func:`run_relay`.

    ``start()`` returns once the port is listening (``.port`` is then the bound port, useful
    with port 0); ``stop()`` closes every connection and the port. Usable as a context manager.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 users: Users = None, *,
                 max_buffer: int = DEFAULT_MAX_BUFFER,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.users: Users = dict(users) if isinstance(users, Mapping) else users
        self.tls = tls
        self.max_buffer = max_buffer
        self._relay = Relay(self.users, max_buffer=max_buffer)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> RelayServer:
        if self._thread is not None:
            raise RuntimeError("relay server already started")
        self._relay = Relay(self.users, max_buffer=self.max_buffer)  # a restart starts afresh
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="outbox-wsrelay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"ws relay did not start listening within {timeout:g} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"ws relay did not stop within {timeout:g} s")
        self._thread = None

    def clients(self, topic: str) -> tuple[int, int]:
        """``(listeners, publishers)`` registered on ``topic`` right now."""
        loop = self._loop
        if self._thread is None or loop is None:
            return (0, 0)

        async def count() -> tuple[int, int]:
            return self._relay.clients(topic)

        return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=5)

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # handed to start(); after start() only a bug lands here
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

        def on_ready(port: int) -> None:
            self.port = port
            self._ready.set()

        serving = asyncio.create_task(serve_relay(self._relay, self.host, self.port,
                                                  ready=on_ready, tls=self.tls))
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving  # re-raises a bind error from serve()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping


def run_relay(host: str, port: int, users: Users, stop: threading.Event, *,
              tls: ssl.SSLContext | None = None) -> None:
    """Serve until ``stop`` is set (blocks the calling thread)."""
    server = RelayServer(host, port, users, tls=tls).start()
    try:
        stop.wait()
    finally:
        server.stop()


def tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The server's TLS context for ``wss://`` (None without a certificate)."""
    if certfile is None:
        if keyfile is not None:
            raise ConfigurationError("ws-relay --keyfile needs --certfile (the certificate)")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"ws-relay: cannot read {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            "ws-relay: --certfile/--keyfile are not a certificate and its private key in PEM "
            f"({getattr(exc, 'reason', None) or type(exc).__name__})") from None
    return context


def main_ws_relay(host: str, port: int, *, users_file: str | None = None,
                  insecure_no_auth: bool = False, certfile: str | None = None,
                  keyfile: str | None = None) -> int:
    """``outbox ws-relay``: serve until SIGTERM or SIGINT, then return 0.

    Raises :class:`ConfigurationError` without a users file (unless ``insecure_no_auth``),
    for a users file that cannot be read or holds no users, and for a certificate that cannot
    be loaded; returns 1 (with a one-line cause on standard error) when the port cannot be
    bound.
    """
    if users_file is not None and insecure_no_auth:
        raise ConfigurationError("ws-relay: --users and --insecure-no-auth contradict each other")
    if users_file is None and not insecure_no_auth:
        raise ConfigurationError(
            "ws-relay refuses anonymous clients: give --users FILE (or OUTBOX_WS_RELAY_USERS; "
            "add users with `outbox ws-relay passwd USER`), or --insecure-no-auth")
    tls = tls_context(certfile, keyfile)
    users = UsersFileAuthenticator(users_file) if users_file is not None else None
    if users is None:
        log.warning("ws.relay_insecure", note="--insecure-no-auth: every client may publish "
                    "and subscribe to every topic")
    with stop_on_signals() as stop:
        try:
            run_relay(host, port, users, stop, tls=tls)
        except OSError as exc:
            print(f"outbox: error: cannot listen on {host}:{port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    return 0


__all__ = [
    "DEFAULT_MAX_BUFFER",
    "EVERYTHING",
    "Authenticator",
    "Relay",
    "RelayServer",
    "Rights",
    "StaticUsers",
    "UsersFileAuthenticator",
    "main_ws_relay",
    "parse_rights",
    "run_relay",
    "serve",
    "serve_relay",
    "tls_context",
    "topic_of",
]
