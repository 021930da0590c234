"""``ws://`` / ``wss://``: publish to a WebSocket topic relay (PROTOCOL.md section 7).

The device is a client of a relay such as WSMessageBroker (or :mod:`outbox.wsrelay`); so is
this transport. It connects to the same path with the same ``topic`` query and Basic auth,
sends one text frame per command and keeps the connection for the next batches::

    ws://user:password@relay:8765/ws?topic=sms[&require_listener=true][&max_frame=1048576]

The relay acknowledges no command, so delivery is confirmed with the protocol's own echo: a
ping after every ``CONFIRM_EVERY`` frames and after the last frame of a batch. A relay answers
a ping only once it has read every frame before it, so a pong confirms those frames; the
frames after the last pong are *not delivered* when the connection closes or stalls before it
(transient: they are sent again, and consumers drop repeats by ``data.id``). Nothing written
into a socket buffer that nobody read is taken for delivered.

A relay that completes the upgrade and then closes the connection before answering the first
ping (kamshory/Messenger answers wrong credentials that way, never with 401: PROTOCOL.md
section 10) is reported as refused credentials, permanently.

``max_frame`` (bytes, default 1 MiB: what ``outbox ws-relay`` accepts) is the largest frame
the relay takes; a body larger than that fails by itself, permanently and with its reason,
instead of making the relay drop the connection under the rest of the batch.

What this cannot see: a topic nobody listens to (the relay drops the frame; a pong says the
relay read it, not that a device got it). A plain WSMessageBroker says nothing
about its listeners. :mod:`outbox.wsrelay` does, to clients that announce themselves as
  publishers (``X-Outbox-Role: publisher``): it answers the handshake with
  ``X-Outbox-Listeners: N`` and then sends such a publisher ``{"listeners": N}`` each time the
  number of non-publisher clients on its topic changes. ``require_listener=true`` uses that to
  fail envelopes as transient while nobody listens; against a relay that does not report
  listeners it fails permanently instead of silently pretending to know.

=====================================  ==========================================
what happened                          outcome
=====================================  ==========================================
frame followed by a ping the relay     delivered
answered (pong)
connection lost or closed mid-batch    the frames after the last pong: transient
no pong within ``timeout``             connection dropped; the frames after the
                                       last pong: transient
a write blocked for ``timeout``        connection dropped; the frames after the
(the relay stopped reading)            last pong: transient
upgraded, then closed before the       permanent: credentials refused
first pong
body larger than ``max_frame``         permanent, that row only
handshake refused with 401 or 403      permanent: credentials refused
other 4xx in the handshake             permanent (wrong path, missing topic)
408, 429, 5xx in the handshake         transient
refused, timed out, reset              transient (after a few quick reconnects)
no listener (``require_listener``)     transient
body not ASCII                         permanent (outbox.commands.encode never
                                       makes one)
=====================================  ==========================================
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import Event, State
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from outbox.errors import (
    ConfigurationError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
)
from outbox.transports.base import Envelope, Failures, TransportOptions, quick_reconnects, url_flag
from outbox.urls import mask_url

#: Request header by which a publisher asks our relay for listener counts (and not for frames).
ROLE_HEADER = "X-Outbox-Role"
PUBLISHER_ROLE = "publisher"
#: Response header by which our relay says it reports listeners, with the count at handshake.
LISTENERS_HEADER = "X-Outbox-Listeners"

_TRANSIENT_STATUSES = frozenset({408, 425, 429})

#: Frames between two confirming pings: a lost connection costs at most this many repeats
#: beyond the frames the relay had not yet read, and a pong per 100 frames costs nothing
#: measurable.
CONFIRM_EVERY = 100
#: What ``outbox ws-relay`` accepts in one frame (and the transport's default ``max_frame``).
DEFAULT_MAX_FRAME = 1024 * 1024
#: Close codes of a relay that refuses a client it let through the upgrade: a plain "normal
#: closure" (kamshory/Messenger) or "policy violation". Anything else (going away, too big,
#: overloaded, no close frame) says nothing about the credentials.
_REFUSING = frozenset({1000, 1008})
#: 1009: a frame was larger than the relay takes
_TOO_BIG = 1009
_OUR_QUERY = ("topic", "require_listener", "max_frame")


class _Ping(NamedTuple):
    sequence: int
    answered: threading.Event
    #: the frames this ping confirms
    ids: list[int]


class PublisherConnection(ClientConnection):
    """A client connection that never queues what it receives.

    Nobody reads from a publisher's connection. On a plain relay every other publisher's frames
    on the topic arrive here too; queued, they would fill the receive buffer after 16 frames,
    stop the reading thread and with it pongs and close frames, and the keepalive would then
    kill a healthy connection. So data frames are dropped on arrival, except the listener
    notices of a relay that announced it sends them.
    """

    #: listeners on the topic as last reported; ``None``: the relay does not report them
    listeners: int | None = None
    #: the sequence number of the last confirming ping we sent / the peer answered
    pinged: int = 0
    confirmed: int = 0
    #: the sequence number of the ping that showed the relay accepted us
    accepted: int = 0

    def confirm(self) -> tuple[int, threading.Event]:
        """Send a confirming ping; return its sequence number and the event set by its pong
        (or by the connection closing: compare ``confirmed`` with the number)."""
        self.pinged += 1
        return self.pinged, self.ping(struct.pack("!Q", self.pinged), ack_on_close=True)

    def acknowledge_pings(self, data: bytes) -> None:
        # A pong answers its ping and every ping before it (RFC 6455 allows answering only
        # the latest); our confirming pings carry increasing 8-byte sequence numbers.
        with self.protocol_mutex:
            answered: list[bytes] = []
            if data in self.pending_pings:
                for key in self.pending_pings:
                    answered.append(key)
                    if key == data:
                        break
        sequences = [struct.unpack("!Q", key)[0] for key in answered if len(key) == 8]
        if sequences:  # before the waiter is woken
            self.confirmed = max(self.confirmed, *sequences)
        super().acknowledge_pings(data)

    def process_event(self, event: Event) -> None:
        if self.response is None:  # the handshake response
            super().process_event(event)
            if self.response is not None:
                self.listeners = _parse_count(self.response.headers.get(LISTENERS_HEADER))
            return
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            if self.listeners is not None and event.opcode is Opcode.TEXT and event.fin:
                self._read_notice(bytes(event.data))
            return
        super().process_event(event)

    def _read_notice(self, data: bytes) -> None:
        try:
            notice = json.loads(data)
        except ValueError:
            return
        if isinstance(notice, dict):
            count = notice.get("listeners")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                self.listeners = count


class WebSocketTransport:
    def __init__(self, name: str, url: str, options: TransportOptions) -> None:
        self.name = name
        self.options = options
        self._where = mask_url(url)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("ws", "wss"):
            raise ConfigurationError(f"transport {name!r}: {self._where!r} is not a ws:// URL")
        try:
            host = parts.hostname
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"transport {name!r}: {self._where!r}: {exc}") from None
        if not host:
            raise ConfigurationError(f"transport {name!r}: {self._where!r} has no host")

        query = parse_qsl(parts.query, keep_blank_values=True)
        topics = [value for key, value in query if key == "topic"]
        if not topics or not topics[-1]:
            raise ConfigurationError(
                f"transport {name!r}: {self._where!r} has no ?topic= "
                "(the relay forwards frames to the clients of a topic)"
            )
        self.topic = topics[-1]
        flags = [value for key, value in query if key == "require_listener"]
        self.require_listener = url_flag(name, "require_listener", flags[-1] if flags else None)
        self.max_frame = _max_frame(name, [value for key, value in query if key == "max_frame"])

        self._headers = {ROLE_HEADER: PUBLISHER_ROLE}
        if parts.username is not None:
            user = unquote(parts.username)
            if ":" in user:
                raise ConfigurationError(f"transport {name!r}: a user name cannot contain ':'")
            secret = f"{user}:{unquote(parts.password or '')}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")

        # The relay reads the topic from the query; it is percent-encoded (never '+') so that
        # every parser, PHP's and Java's included, reads back the same string.
        rest = [(key, value) for key, value in query if key not in _OUR_QUERY]
        netloc = f"[{host}]" if ":" in host else host
        if port is not None:
            netloc = f"{netloc}:{port}"
        wire_query = "topic=" + quote(self.topic, safe="")
        if rest:
            wire_query += "&" + urlencode(rest)
        self.url = urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", wire_query, ""))
        try:
            parse_uri(self.url)  # websockets parses it on connect; fail at start-up instead
        except InvalidURI as exc:
            raise ConfigurationError(f"transport {name!r}: {self._where!r}: {exc}") from None

        self._connection: PublisherConnection | None = None
        # The relay loop may share a transport between threads; one batch at a time.
        self._lock = threading.Lock()

    # -- Transport ------------------------------------------------------------------------

    def publish(self, batch: Sequence[Envelope]) -> Failures:
        if not batch:
            return {}
        with self._lock:
            connection = self._open()
            failures: Failures = {}
            #: the frames written since the last confirming ping, and the pings sent
            written: list[int] = []
            pings: list[_Ping] = []
            lost = False
            for index, envelope in enumerate(batch):
                if self.require_listener and not connection.listeners:
                    error = TransientPublishError(
                        f"nobody listens on topic {self.topic!r} at {self._where}"
                    )
                    failures.update((rest.id, error) for rest in batch[index:])
                    break
                refused = self._refuse(envelope.body)
                if refused is not None:
                    failures[envelope.id] = refused
                    continue
                try:
                    # An ASCII body is valid UTF-8: sent as it is in a text frame, with no
                    # decode and re-encode (the frame is the same as for the str).
                    connection.send(envelope.body, text=True)
                    written.append(envelope.id)
                    if len(written) >= CONFIRM_EVERY:
                        pings.append(_Ping(*connection.confirm(), written))
                        written = []
                except ConnectionClosed as exc:
                    lost = True
                    error = TransientPublishError(
                        f"connection to {self._where} lost mid-batch ({_closed_reason(exc)}); "
                        "this frame and the following ones were not sent"
                    )
                    error.__cause__ = exc
                    failures.update((rest.id, error) for rest in batch[index:])
                    break
            if written and not lost:
                try:
                    pings.append(_Ping(*connection.confirm(), written))
                    written = []
                except ConnectionClosed:
                    lost = True
            if pings or written:
                self._await_confirmation(connection, pings, written, failures)
            elif lost:
                self._discard()
            return failures
    def _refuse(self, body: bytes) -> PermanentPublishError | None:
        if len(body) > self.max_frame:
            return PermanentPublishError(
                f"the body is {len(body):,} bytes, more than {self._where} takes in one frame "
                f"(max_frame={self.max_frame:,}); the connection stays up for the other rows"
            )
        if not body.isascii():
            return PermanentPublishError(
                "body is not ASCII JSON (the device decodes it with its own charset)"
            )
        return None

    def _await_confirmation(self, connection: PublisherConnection, pings: list[_Ping],
                            unpinged: list[int], failures: Failures) -> None:
        """Wait for the pong of the last ping; the frames no pong covered are not delivered.

        ``unpinged``: frames written after the last ping (the connection was lost first)."""
        if pings and not unpinged:
            pings[-1].answered.wait(self.options.timeout)
            if connection.confirmed >= pings[-1].sequence:
                return
        received = connection.protocol.close_rcvd
        error: PublishError
        if (received is not None and received.code in _REFUSING
                and connection.confirmed <= connection.accepted):
            # a fresh connection closed before it confirmed one frame: as after the upgrade
            error = self._refused_after_upgrade(received.code)
        else:
            reason = (f"no pong within {self.options.timeout:g} s"
                      if connection.state is State.OPEN and not unpinged
                      else _closed_reason_of(connection))
            if received is not None and received.code == _TOO_BIG:
                reason += "; set max_frame on the transport URL to the relay's frame limit"
            error = TransientPublishError(
                f"{self._where} did not confirm reading these frames ({reason}); "
                "taken as not delivered"
            )
        self._discard()
        unconfirmed = [ids for ping in pings if ping.sequence > connection.confirmed
                       for ids in ping.ids]
        failures.update((message_id, error) for message_id in unconfirmed + unpinged
                        if message_id not in failures)

    def check(self) -> None:
        with self._lock:
            connection = self._connection
            if connection is None or connection.state is not State.OPEN:
                self._open()
                return
            try:
                pong = connection.ping(ack_on_close=True)
            except ConnectionClosed as exc:
                self._discard()
                raise TransientPublishError(
                    f"connection to {self._where} lost ({_closed_reason(exc)})"
                ) from exc
            if not pong.wait(self.options.timeout) or connection.state is not State.OPEN:
                self._discard()
                raise TransientPublishError(
                    f"{self._where} did not answer a ping within {self.options.timeout:g} s"
                )

    def close(self) -> None:
        with self._lock:
            self._discard()

    # -- connection -----------------------------------------------------------------------

    @property
    def listeners(self) -> int | None:
        """Listeners on the topic as the relay last reported; ``None`` when it does not."""
        connection = self._connection
        return None if connection is None else connection.listeners

    def _open(self) -> PublisherConnection:
        """The open connection, after a few quick reconnects if it dropped."""
        connection = self._connection
        if connection is not None and connection.state is State.OPEN:
            return connection
        self._discard()
        deadline = time.monotonic() + self.options.timeout
        retrying = quick_reconnects(deadline, self.options.timeout)
        connection = retrying(self._connect, deadline)
        self._await_acceptance(connection)
        if self.require_listener and connection.listeners is None:
            connection.close()
            raise PermanentPublishError(
                f"{self._where} does not report its listeners (a plain relay such as "
                "WSMessageBroker cannot): require_listener needs outbox ws-relay"
            )
        self._connection = connection
        return connection

    def _await_acceptance(self, connection: PublisherConnection) -> None:
        """A first ping: a relay that upgraded and then closes before answering it refused
        us (kamshory/Messenger's way of saying "wrong credentials"; it never answers 401)."""
        try:
            sequence, answered = connection.confirm()
        except ConnectionClosed as exc:
            connection.close()
            raise self._refused_after_upgrade(exc.rcvd.code if exc.rcvd else None) from exc
        answered.wait(self.options.timeout)
        if connection.confirmed >= sequence:
            connection.accepted = sequence
            return
        received = connection.protocol.close_rcvd
        connection.close()
        if received is None and connection.state is State.OPEN:
            raise TransientPublishError(
                f"{self._where} did not answer a ping within {self.options.timeout:g} s "
                "of the upgrade"
            )
        raise self._refused_after_upgrade(received.code if received else None)

    def _refused_after_upgrade(self, code: int | None) -> PublishError:
        if code not in _REFUSING:
            return TransientPublishError(
                f"{self._where} closed the connection right after the upgrade "
                f"({'close code ' + str(code) if code else 'no close frame'})"
            )
        return PermanentPublishError(
            f"{self._where} refused the credentials: it closed the connection right after "
            f"the upgrade (close code {code}), as WebSocket relays that never answer 401 do"
        )

    def _connect(self, deadline: float) -> PublisherConnection:
        timeout = max(deadline - time.monotonic(), 0.1)
        try:
            connection = connect(
                self.url,
                additional_headers=self._headers,
                user_agent_header="outbox-relay",
                # Commands are a few hundred bytes: deflate would cost more CPU than it saves.
                compression=None,
                open_timeout=timeout,
                close_timeout=self.options.timeout,
                create_connection=PublisherConnection,
                legacy=True,  # a long-lived connection, closed by close()
            )
        except InvalidStatus as exc:
            raise _handshake_error(self._where, exc.response.status_code) from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise TransientPublishError(f"cannot reach {self._where}: {_reason(exc)}") from exc
        assert isinstance(connection, PublisherConnection)
        with contextlib.suppress(OSError):  # closed by the relay already: the ping says why
            _bound_writes(connection.socket, self.options.timeout)
        return connection

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()  # sends a close frame when still open; no-op otherwise


def _bound_writes(sock: socket.socket, timeout: float) -> None:
    """Make a write to a relay that stopped reading fail after ``timeout`` instead of hanging.

    A kernel send timeout (``SO_SNDTIMEO``) on the blocking socket costs nothing per frame;
    ``settimeout()`` would make Python poll before every send, which measurably slows a batch
    (websockets itself switches to ``settimeout()`` only while closing). A blocked send then
    fails with ``EAGAIN``, which websockets turns into ``ConnectionClosed``.
    """
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        seconds = int(timeout)
        timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    else:
        sock.settimeout(timeout)


def _handshake_error(where: str, status: int) -> PublishError:
    if status in (401, 403):
        return PermanentPublishError(f"{where} refused the credentials (HTTP {status})")
    if status in _TRANSIENT_STATUSES or status >= 500:
        return TransientPublishError(f"{where} refused the connection (HTTP {status})")
    return PermanentPublishError(f"{where} refused the WebSocket handshake (HTTP {status})")


def _max_frame(name: str, values: list[str]) -> int:
    if not values:
        return DEFAULT_MAX_FRAME
    try:
        size = int(values[-1].strip())
    except ValueError:
        size = 0
    if size < 1024:
        raise ConfigurationError(
            f"transport {name!r}: max_frame={values[-1]!r} (expected the relay's frame limit "
            "in bytes, at least 1024)"
        )
    return size


def _closed_reason_of(connection: PublisherConnection) -> str:
    received = connection.protocol.close_rcvd
    if received is None:
        return "connection closed without a close frame"
    return f"closed with code {received.code}" + (f" {received.reason!r}" if received.reason else "")


def _parse_count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        count = int(value.strip())
    except ValueError:
        return None
    return count if count >= 0 else None


def _closed_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "no close frame"
    return f"close code {frame.code}" + (f" {frame.reason!r}" if frame.reason else "")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["CONFIRM_EVERY", "DEFAULT_MAX_FRAME", "LISTENERS_HEADER", "PUBLISHER_ROLE",
           "ROLE_HEADER", "PublisherConnection", "WebSocketTransport"]
