"""``mqtt://`` / ``mqtts://``: an MQTT 3.1.1 broker such as Mosquitto, through paho-mqtt 2.x
(PROTOCOL.md section 6).

URL: ``mqtt://[user:password@]host:port?topic=<topic>[&qos=0|1|2][&client_id=..][&keepalive=60]
[&max_inflight=N]``.

Every message goes to exactly the topic with ``retain=False``, always: a retained command would
run again on every reconnect of the device (a second SMS). QoS 1 (the default) gives a broker
acknowledgement per message; QoS 0 counts a message as delivered once it is written to the socket.

The batch goes out in a window of up to ``max_inflight`` unacknowledged messages (200; 20 at
QoS 2), and ``publish`` returns once every message has its PUBACK (QoS 1) or PUBCOMP (QoS 2),
or once ``timeout`` has passed. paho's network loop runs in the publishing thread (see
``_Session``); Mosquitto completes the QoS 2 handshake for messages beyond its own window
(20 by default) and then drops them, hence the smaller window there.

==========================================  ==========================================
what happens                                outcome for the envelope
==========================================  ==========================================
acknowledged                                delivered
not acknowledged by the deadline            transient; the client is replaced
connection lost before the acknowledgement  transient; the next call reconnects
CONNACK "bad user name or password",        the whole batch: ``PermanentPublishError``
"not authorized", "identifier not valid"
refused, unreachable, server unavailable    the whole batch: ``TransientPublishError``
==========================================  ==========================================

paho's own reconnect loop is off: a lost connection ends the client, and the next call builds
a new one (a few quick tries, tenacity) so that nothing from an abandoned batch is re-sent
behind the relay's back. Between batches nobody reads the socket; ``refresh`` before the next
batch handles what came meanwhile (a connection the broker closed is replaced) and sends the
keepalive PINGREQ when it is due.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from outbox.errors import (
    ConfigurationError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
)
from outbox.transports.base import (
    OUR_QUERY_KEYS,
    Envelope,
    Failures,
    SessionTransport,
    TransportOptions,
)
from outbox.urls import mask_url

DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_QOS: Final = 1
DEFAULT_KEEPALIVE: Final = 60
#: the window at QoS 0 and 1: measured through the relay, 200 and 500 drain alike (18k msg/s),
#: 1,000 a little slower; the smaller the window, the less a lost connection sends twice
MAX_INFLIGHT: Final = 200
#: at QoS 2, Mosquitto's own window (max_inflight_messages, 20 by default) is a hard limit for
#: MQTT 3.1.1 clients: it answers PUBREC and PUBCOMP for messages beyond it and drops them
MAX_INFLIGHT_QOS2: Final = 20
_KNOWN_KEYS: Final = (
    frozenset({"topic", "qos", "client_id", "keepalive", "max_inflight"}) | OUR_QUERY_KEYS
)
#: CONNACK reasons that no retry can fix (3.1.1 return codes 1, 2, 4, 5 and their v5 kin)
_REFUSED: Final = frozenset({
    "Unsupported protocol version",
    "Client identifier not valid",
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
})
_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)  # Linux only
#: Corked while a window is handed over, the socket sends full segments rather than one per
#: message: on loopback each send otherwise runs the broker's side of TCP in our thread.
_CORK: Final[int | None] = getattr(socket, "TCP_CORK", None)  # Linux only
#: how often a wait for acknowledgements looks whether the connection is gone
_WAIT_SLICE: Final = 0.05
#: how long a polite DISCONNECT may take before the socket is shut down
_CLOSE_GRACE: Final = 1.0


class MqttTransport(SessionTransport["_Session"]):
    def __init__(self, name: str, url: str, options: TransportOptions) -> None:
        self.name = name
        self.options = options
        parts = urlsplit(url)
        where = mask_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - _KNOWN_KEYS)
        if unknown:
            raise ConfigurationError(
                f"transport {name!r}: unknown MQTT URL option(s) {', '.join(unknown)} "
                "(expected topic, qos, client_id, keepalive, max_inflight)"
            )
        topic = query.get("topic", "")
        if not topic.strip():
            raise ConfigurationError(
                f"transport {name!r}: {mask_url(url)!r} has no ?topic= (the topic the device "
                "subscribes to)"
            )
        if "+" in topic or "#" in topic or "\0" in topic:
            raise ConfigurationError(
                f"transport {name!r}: topic {topic!r} contains a wildcard or NUL; publish to "
                "exactly the device's topic"
            )
        try:
            qos = int(query.get("qos", DEFAULT_QOS))
            keepalive = int(query.get("keepalive", DEFAULT_KEEPALIVE))
            max_inflight = int(query.get(
                "max_inflight", MAX_INFLIGHT_QOS2 if qos == 2 else MAX_INFLIGHT))
            port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 1883)
        except ValueError as exc:
            raise ConfigurationError(f"transport {name!r}: {where!r}: {exc}") from None
        if qos not in (0, 1, 2):
            raise ConfigurationError(f"transport {name!r}: qos={qos} (expected 0, 1 or 2)")
        if keepalive < 1:
            raise ConfigurationError(f"transport {name!r}: keepalive must be at least 1 second")
        if max_inflight < 1:
            raise ConfigurationError(f"transport {name!r}: max_inflight must be at least 1")
        if not parts.hostname:
            raise ConfigurationError(f"transport {name!r}: {where!r} has no host")
        self.topic = topic
        self.qos = qos
        self._config = _Config(
            host=parts.hostname,
            port=port,
            tls=parts.scheme.lower() == "mqtts",
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            client_id=query.get("client_id", ""),
            keepalive=keepalive,
            max_inflight=max_inflight,
            where=where,
        )
        super().__init__()

    # -- SessionTransport -----------------------------------------------------------------

    def _new_session(self) -> _Session:
        return _Session(self._config, self.qos)

    def _publish_on(self, session: _Session, batch: Sequence[Envelope], deadline: float,
                    ) -> Failures:
        return session.publish(batch, self.topic, self.qos, deadline)


class _Config:
    __slots__ = ("client_id", "host", "keepalive", "max_inflight", "password", "port", "tls",
                 "username", "where")

    def __init__(self, *, host: str, port: int, tls: bool, username: str | None,
                 password: str | None, client_id: str, keepalive: int, max_inflight: int,
                 where: str) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.username = username
        self.password = password
        self.client_id = client_id
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.where = where


class _Session:
    """One paho client whose network loop runs in the publishing thread; replaced whole after
    any failure.

    No network thread: paho's loop is turned (``_loop``) by whoever holds the transport:
    publish, check, and ``refresh`` before each batch, which also sends the keepalive PINGREQ
    when it is due. A thread of its own cost the relay more than half of its MQTT rate: each
    publish had to wake it through a socket pair, each acknowledgement went back through a
    condition variable, and the two threads passed the GIL to and fro (measured through the
    relay: 12.5k msg/s then, 18k now, against a ceiling of 29k).
    """

    def __init__(self, config: _Config, qos: int) -> None:
        self._config = config
        self._connack: ReasonCode | None = None
        #: why the connection ended (or could not start); None while healthy
        self._lost: PublishError | None = None
        #: message id -> envelope, published and waiting for its PUBACK/PUBCOMP (QoS 0: for
        #: its bytes to be written)
        self._outstanding: dict[int, Envelope] = {}
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            client.tls_set_context(ssl.create_default_context())
        # The window is ours (publish below): paho's own limit walks every outstanding message
        # on each acknowledgement, quadratic in the window.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._quickack = qos > 0 and _QUICKACK is not None

    @property
    def healthy(self) -> bool:
        return self._lost is None and self._connack is not None

    def refresh(self) -> None:
        """Read what arrived while idle (a PINGRESP, the broker closing an idle connection)
        and send the keepalive PINGREQ when it is due, without waiting."""
        if self._lost is None and self._connack is not None:
            self._loop(0)

    def open(self, deadline: float) -> None:
        config = self._config
        client = self._client
        client.connect_timeout = max(deadline - time.monotonic(), 0.001)
        try:
            client.connect(config.host, config.port, keepalive=config.keepalive)
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS, timeout
            raise TransientPublishError(
                f"cannot connect to {config.where}: {_reason(exc)}"
            ) from exc
        while self._connack is None and self._lost is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._loop(min(remaining, _WAIT_SLICE))
        connack, lost = self._connack, self._lost
        if connack is None:
            raise lost or TransientPublishError(f"{config.where} sent no CONNACK in time")
        if connack.is_failure:
            self._connack = None
            name = connack.getName()
            error_type = PermanentPublishError if name in _REFUSED else TransientPublishError
            raise error_type(f"{config.where} refused the connection: {name}")

    def publish(self, batch: Sequence[Envelope], topic: str, qos: int,
                deadline: float) -> Failures:
        """Keep up to ``max_inflight`` messages unacknowledged, reading acknowledgements
        whenever the window is full, until all are acknowledged or the deadline passes."""
        publish = self._client.publish
        window = self._config.max_inflight
        outstanding = self._outstanding
        outstanding.clear()
        failures: Failures = {}
        total = len(batch)
        index = 0
        raw = self._client.socket()
        sock = raw if _CORK is not None and isinstance(raw, socket.socket) else None
        while self._lost is None:
            if sock is not None:
                _set_cork(sock, True)
            while index < total and len(outstanding) < window:
                envelope = batch[index]
                index += 1
                info = publish(topic, envelope.body, qos=qos, retain=False)
                if info.rc is not MQTTErrorCode.MQTT_ERR_SUCCESS:
                    # NO_CONN: paho would keep a QoS>0 message for a reconnect we never make
                    error = TransientPublishError(
                        f"cannot publish to {self._config.where}: {mqtt.error_string(info.rc)}")
                    failures[envelope.id] = error
                    self._lost = error
                    break
                if not info.is_published():  # QoS 0 may be written (and done) already
                    outstanding[info.mid] = envelope
            if sock is not None:
                _set_cork(sock, False)  # out they go, in as few segments as they fill
            if self._lost is not None or (index == total and not outstanding):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # start afresh: paho would still deliver these later
                self._lost = TransientPublishError(
                    f"{self._config.where} did not acknowledge within the timeout")
                break
            # With room in the window, only read what is there; when it is full, wait.
            self._loop(0 if index < total and len(outstanding) < window
                       else min(remaining, _WAIT_SLICE))
        if self._lost is not None:
            for envelope in outstanding.values():
                failures[envelope.id] = self._lost
            for envelope in batch[index:]:
                failures.setdefault(envelope.id, self._lost)
        outstanding.clear()
        return failures

    def _loop(self, timeout: float) -> None:
        """One turn of paho's loop, driven from here through its external-loop interface
        (``loop_read``/``loop_write``/``loop_misc``): wait up to ``timeout`` for the socket,
        read, write, keepalive. Callbacks run here, in this thread. Not ``loop()``: that one
        creates a socket pair to wake a network thread, and every publish then writes a byte
        to it (13 % of the relay's time at QoS 1).
        """
        client = self._client
        sock = client.socket()
        if sock is None:
            rc = MQTTErrorCode.MQTT_ERR_NO_CONN
        else:
            if timeout > 0:
                # closed under us (OSError, ValueError): the read below says so
                with contextlib.suppress(OSError, ValueError):
                    select.select([sock], [sock] if client.want_write() else [], [], timeout)
            rc = client.loop_read()
            if rc is MQTTErrorCode.MQTT_ERR_SUCCESS and client.want_write():
                rc = client.loop_write()
            if rc is MQTTErrorCode.MQTT_ERR_SUCCESS:
                rc = client.loop_misc()
        if self._quickack and rc is MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Mosquitto writes PUBACKs with Nagle on (set_tcp_nodelay false): it holds the
            # last ones of a window until we ACK, and Linux delays that ACK by up to 40 ms.
            # Asking for an immediate ACK after each read is worth 3-4x at QoS 1.
            sock = client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]
        if rc is not MQTTErrorCode.MQTT_ERR_SUCCESS and self._lost is None:
            self._lost = TransientPublishError(
                f"connection to {self._config.where} lost ({mqtt.error_string(rc)})")

    # -- paho callbacks (in this thread, from _loop or publish) ---------------------------

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, _flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _properties: Any) -> None:
        self._connack = reason

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any,
                       _flags: mqtt.DisconnectFlags, reason: ReasonCode,
                       _properties: Any) -> None:
        if self._lost is None:
            self._lost = TransientPublishError(
                f"connection to {self._config.where} lost ({reason.getName()})"
            )

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int,
                    _reason: ReasonCode, _properties: Any) -> None:
        self._outstanding.pop(mid, None)

    # -- teardown -----------------------------------------------------------------------

    def dispose(self) -> None:
        """Send DISCONNECT when the connection is up (bounded), then close the socket."""
        client = self._client
        healthy = self.healthy
        if self._lost is None:
            self._lost = TransientPublishError("transport closed")
        if healthy:
            client.disconnect()  # written at once; paho closes the socket once it is out
            deadline = time.monotonic() + _CLOSE_GRACE
            while client.socket() is not None and client.want_write() \
                    and time.monotonic() < deadline:
                self._loop(_WAIT_SLICE)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        # paho's client and this session point at each other: break the cycle so that its
        # sockets close now rather than at the next garbage collection
        client.on_connect = client.on_disconnect = client.on_publish = None
        self._outstanding.clear()


def _set_cork(sock: socket.socket, on: bool) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1 if on else 0)  # type: ignore[arg-type]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


__all__ = ["MqttTransport"]
