"""``ws://`` / ``wss://``: publish to a WebSocket topic relay (PROTOCOL.md section 7).

The device is a client of a relay such as WSMessageBroker (or :mod:`outbox.wsrelay`); so is
this transport. It connects to the same path with the same ``topic`` query and Basic auth,
sends one text frame per command and keeps the connection for the next batches::

    ws://user:password@relay:8765/ws?topic=sms[&require_listener=true]

The relay acknowledges nothing, so a frame counts as delivered once it is written to the
socket. Two losses this cannot see by itself:

* frames written just before the relay went away (they sat in a socket buffer that nobody
  read): the relay and the device hold nothing to compare with, so this is the one silent loss
  of this transport, bounded by the socket buffer;
* a topic nobody listens to: the relay drops the frame. A plain WSMessageBroker says nothing
  about its listeners. :mod:`outbox.wsrelay` does, to clients that announce themselves as
  publishers (``X-Outbox-Role: publisher``): it answers the handshake with
  ``X-Outbox-Listeners: N`` and then sends such a publisher ``{"listeners": N}`` each time the
  number of non-publisher clients on its topic changes. ``require_listener=true`` uses that to
  fail envelopes as transient while nobody listens; against a relay that does not report
  listeners it fails permanently instead of silently pretending to know.

=====================================  ==========================================
what happened                          outcome
=====================================  ==========================================
frame written to the socket            delivered
connection lost mid-batch              the frame in flight and the rest: transient
a write blocked for ``timeout``        connection dropped; that frame and the rest:
(the relay stopped reading)            transient
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
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
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

        self._headers = {ROLE_HEADER: PUBLISHER_ROLE}
        if parts.username is not None:
            user = unquote(parts.username)
            if ":" in user:
                raise ConfigurationError(f"transport {name!r}: a user name cannot contain ':'")
            secret = f"{user}:{unquote(parts.password or '')}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")

        # The relay reads the topic from the query; it is percent-encoded (never '+') so that
        # every parser, PHP's and Java's included, reads back the same string.
        rest = [(key, value) for key, value in query if key not in ("topic", "require_listener")]
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
            for index, envelope in enumerate(batch):
                if self.require_listener and not connection.listeners:
                    error = TransientPublishError(
                        f"nobody listens on topic {self.topic!r} at {self._where}"
                    )
                    failures.update((rest.id, error) for rest in batch[index:])
                    break
                if not envelope.body.isascii():
                    failures[envelope.id] = PermanentPublishError(
                        "body is not ASCII JSON (the device decodes it with its own charset)"
                    )
                    continue
                try:
                    # An ASCII body is valid UTF-8: sent as it is in a text frame, with no
                    # decode and re-encode (the frame is the same as for the str).
                    connection.send(envelope.body, text=True)
                except ConnectionClosed as exc:
                    self._discard()
                    lost = TransientPublishError(
                        f"connection to {self._where} lost mid-batch ({_closed_reason(exc)}); "
                        "this frame and the following ones were not sent"
                    )
                    lost.__cause__ = exc
                    failures.update((rest.id, lost) for rest in batch[index:])
                    break
            return failures

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
        if self.require_listener and connection.listeners is None:
            connection.close()
            raise PermanentPublishError(
                f"{self._where} does not report its listeners (a plain relay such as "
                "WSMessageBroker cannot): require_listener needs outbox ws-relay"
            )
        self._connection = connection
        return connection

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


__all__ = ["LISTENERS_HEADER", "PUBLISHER_ROLE", "ROLE_HEADER", "PublisherConnection",
           "WebSocketTransport"]
