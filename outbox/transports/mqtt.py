"""``mqtt://`` / ``mqtts://``: an MQTT 3.1.1 broker such as Mosquitto, through paho-mqtt 2.x
(PROTOCOL.md section 6).

URL: ``mqtt://[user:password@]host:port?topic=<topic>[&qos=0|1|2][&client_id=..][&keepalive=60]
[&max_inflight=N]``.

Every message goes to exactly the topic with ``retain=False``, always: a retained command would
run again on every reconnect of the device (a second SMS). QoS 1 (the default) gives a broker
acknowledgement per message; QoS 0 counts a message as delivered once it is written to the socket.

The whole batch is handed to paho, whose network thread (``loop_start``) writes it, then
``publish`` waits, bounded by ``timeout``, for every PUBACK (QoS 1) or PUBCOMP (QoS 2).
paho's in-flight window is 50 (measured faster than 1,000: paho scans every outstanding
message on each acknowledgement) and its queue is unbounded. At QoS 2 the window stays at 20
unless ``max_inflight`` says otherwise: Mosquitto completes the QoS 2 handshake for messages
beyond its own window (20 by default) and then drops them.

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
behind the relay's back.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
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
from outbox.settings import mask_url
from outbox.transports.base import (
    OUR_QUERY_KEYS,
    Envelope,
    Failures,
    SessionTransport,
    TransportOptions,
)

DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_QOS: Final = 1
DEFAULT_KEEPALIVE: Final = 60
#: paho's in-flight window at QoS 0 and 1. paho walks every outstanding message on each
#: PUBACK, so a large window costs quadratic CPU per batch: measured through the relay,
#: 5.1-5.7k msg/s with 1,000, 6.5-6.7k with 50. It cannot change on an open connection, so a
#: larger batch goes in waves.
MAX_INFLIGHT: Final = 50
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
    """One paho client and its network thread; replaced whole after any failure."""

    def __init__(self, config: _Config, qos: int) -> None:
        self._config = config
        self._cond = threading.Condition(threading.Lock())
        self._connack: ReasonCode | None = None
        #: why the connection ended (or could not start); None while healthy
        self._lost: PublishError | None = None
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
        client.max_inflight_messages_set(config.max_inflight)
        client.max_queued_messages_set(0)  # unbounded: the batch is bounded by the relay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        if qos > 0 and _QUICKACK is not None:
            # no on_publish otherwise: any callback there slows paho's network thread by a
            # third; completion is read from each message's MQTTMessageInfo instead
            client.on_publish = self._on_puback
        self._client = client
        self._started = False
        self._disconnected = False

    @property
    def healthy(self) -> bool:
        return self._lost is None and self._connack is not None

    def refresh(self) -> None:
        """Nothing to do: paho's network thread reads while we are idle."""

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
        client.loop_start()
        self._started = True
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None or self._lost is not None,
                                timeout=max(deadline - time.monotonic(), 0.0))
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
        client = self._client
        failures: Failures = {}
        sent: list[tuple[Envelope, mqtt.MQTTMessageInfo]] = []
        publish = client.publish
        for envelope in batch:
            info = publish(topic, envelope.body, qos=qos, retain=False)
            if info.rc is MQTTErrorCode.MQTT_ERR_SUCCESS:
                sent.append((envelope, info))
            else:
                # NO_CONN: paho would keep a QoS>0 message for a reconnect that we never make
                error = TransientPublishError(
                    f"cannot publish to {self._config.where}: {mqtt.error_string(info.rc)}"
                )
                failures[envelope.id] = error
                if self._lost is None:
                    self._lost = error
        for index, (_envelope, info) in enumerate(sent):
            if not self._wait_for(info, deadline):
                lost = self._lost or TransientPublishError(
                    f"{self._config.where} did not acknowledge within the timeout"
                )
                self._lost = lost  # start afresh: paho would still deliver these later
                for late, late_info in sent[index:]:
                    if not late_info.is_published():
                        failures[late.id] = lost
                break
        return failures

    def _wait_for(self, info: mqtt.MQTTMessageInfo, deadline: float) -> bool:
        """Whether ``info`` got its acknowledgement (PUBACK/PUBCOMP; QoS 0: written) in time.

        Waits in short slices so that a lost connection ends the wait early: paho does not
        wake the waiters of messages it will never send.
        """
        while not info.is_published():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._lost is not None:
                return False
            info.wait_for_publish(min(remaining, _WAIT_SLICE))
        return True

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, _flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _properties: Any) -> None:
        with self._cond:
            self._connack = reason
            self._cond.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any,
                       _flags: mqtt.DisconnectFlags, reason: ReasonCode,
                       _properties: Any) -> None:
        with self._cond:
            self._disconnected = True
            if self._lost is None:
                self._lost = TransientPublishError(
                    f"connection to {self._config.where} lost ({reason.getName()})"
                )
            self._cond.notify_all()

    def _on_puback(self, client: mqtt.Client, _userdata: Any, _mid: int,
                   _reason: ReasonCode, _properties: Any) -> None:
        # Mosquitto writes PUBACKs with Nagle on (set_tcp_nodelay false): it holds the last
        # ones of a batch until we ACK, and Linux delays that ACK by up to 40 ms, once per
        # batch. Asking for an immediate ACK after each PUBACK read is worth 3-4x at QoS 1.
        sock = client.socket()
        if _QUICKACK is not None and isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    # -- teardown -----------------------------------------------------------------------

    def dispose(self) -> None:
        """Send DISCONNECT, stop the network thread; shut the socket if the broker is stuck."""
        client = self._client
        if self._lost is None:
            self._lost = TransientPublishError("transport closed")
        if not self._started:
            client.disconnect()  # closes a socket connect() may have opened
            return
        client.disconnect()
        with self._cond:
            gone = self._cond.wait_for(lambda: self._disconnected or client.socket() is None,
                                       timeout=_CLOSE_GRACE)
        sock = client.socket()
        if not gone and isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the network thread sees EOF and exits
        client.loop_stop()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


__all__ = ["MqttTransport"]
