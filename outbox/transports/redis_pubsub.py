"""``redis://`` / ``rediss://``: Redis pub/sub through redis-py (PROTOCOL.md section 5).

URL: ``redis://[user:password@]host:port/db?topic=<channel>[&accept_no_subscriber=true]``, plus
any of redis-py's own URL options (``socket_timeout``, ``protocol``, ``client_name``, ...).

A batch is one pipeline of ``PUBLISH <topic> <body>`` (no transaction): one round trip.
Pub/sub keeps nothing, so the only acknowledgement is ``PUBLISH``'s reply, the number of
subscribers that got the message:

==================================  =================================================
reply                               outcome for the envelope
==================================  =================================================
1 or more                           delivered
0                                   transient: nobody subscribed (the device is not
                                    connected), unless ``accept_no_subscriber=true``
NOPERM, auth errors                 permanent (the whole batch when raised at connect)
other error replies                 transient
connection lost, timeout            transient for the whole batch; the next call
                                    reconnects
==================================  =================================================

redis-py's own retries are switched off: they would re-send a whole pipeline after backing off
for seconds. Reconnecting is a few quick tries of ours (tenacity), bounded by ``timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

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
    TransportOptions,
    quick_reconnects,
    url_flag,
)
from outbox.urls import mask_url

_OUR_KEYS: Final = frozenset({"topic", "accept_no_subscriber"}) | OUR_QUERY_KEYS
#: errors after which a retry cannot help: credentials, ACL, a pre-6.0 AUTH mismatch
_REFUSED: Final = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
    redis.exceptions.NoPermissionError,
)


class RedisTransport:
    def __init__(self, name: str, url: str, options: TransportOptions) -> None:
        self.name = name
        self.options = options
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {key: value for key, value in query if key in _OUR_KEYS}
        topic = ours.get("topic", "").strip()
        if not topic:
            raise ConfigurationError(
                f"transport {name!r}: {mask_url(url)!r} has no ?topic= (the channel the device "
                "subscribes to)"
            )
        self.topic = topic
        #: count a PUBLISH that reached nobody as delivered
        self.accept_no_subscriber = url_flag(name, "accept_no_subscriber",
                                             ours.get("accept_no_subscriber"))
        self._topic_bytes = topic.encode()
        rest = [(key, value) for key, value in query if key not in _OUR_KEYS]
        library_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
        self._where = mask_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
        try:
            # options in the URL win over these keyword defaults (redis-py merges them so)
            self._client: redis.Redis = redis.Redis.from_url(
                library_url,
                socket_timeout=options.timeout,
                socket_connect_timeout=options.timeout,
                retry=Retry(NoBackoff(), 0),
            )
            pool = self._client.connection_pool
            # builds a connection object without connecting: an unknown URL option fails here
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"transport {name!r}: {mask_url(url)!r}: {exc}") from None
        #: ping (with retries) before the next publish: first use, or after a connection error
        self._suspect = True
        self._lock = threading.Lock()

    # -- Transport ------------------------------------------------------------------------

    def publish(self, batch: Sequence[Envelope]) -> Failures:
        if not batch:
            return {}
        with self._lock:
            if self._suspect:
                self._connect(time.monotonic() + self.options.timeout)
            replies = self._publish_all(batch)
        return self._failures(batch, replies)

    def check(self) -> None:
        with self._lock:
            self._connect(time.monotonic() + self.options.timeout)

    def close(self) -> None:
        with self._lock:
            self._suspect = True
            self._client.close()

    # -- internals ------------------------------------------------------------------------

    def _publish_all(self, batch: Sequence[Envelope]) -> list[Any]:
        """One write of every PUBLISH, then one reply each, in order (a pipeline).

        The commands are written in RESP by hand, over redis-py's own pooled connection
        (its authentication, TLS, timeouts and reply parser): redis-py's generic pipeline
        packs each command through several layers of argument encoding, about 10 us a
        message, more than the rest of the relay spends on it. The bytes are the same."""
        topic = self._topic_bytes
        head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (len(topic), topic)
        parts: list[bytes] = []
        append = parts.append
        for envelope in batch:
            body = envelope.body
            append(head)
            append(b"$%d\r\n" % len(body))
            append(body)
            append(b"\r\n")
        pool = self._client.connection_pool
        connection: Any = pool.get_connection()  # redis-py leaves its methods untyped
        replies: list[Any] = []
        try:
            connection.send_packed_command([b"".join(parts)])
            read = connection.read_response
            for _ in batch:
                try:
                    replies.append(read())
                except redis.exceptions.ResponseError as exc:  # this PUBLISH's own error reply
                    replies.append(exc)
        except BaseException as exc:
            # the replies still on the wire belong to nobody: the connection goes
            connection.disconnect()
            self._suspect = True
            if isinstance(exc, redis.exceptions.RedisError):
                raise self._error(exc, "cannot publish to") from exc
            raise
        finally:
            pool.release(connection)
        return replies

    def _failures(self, batch: Sequence[Envelope], replies: list[Any]) -> Failures:
        failures: Failures = {}
        accept_nobody = self.accept_no_subscriber
        nobody: TransientPublishError | None = None
        for envelope, reply in zip(batch, replies, strict=True):
            if isinstance(reply, int):
                if reply > 0 or accept_nobody:
                    continue
                if nobody is None:
                    nobody = TransientPublishError(
                        f"no subscriber on the channel {self.topic!r} at {self._where} "
                        "(is the device connected?)"
                    )
                failures[envelope.id] = nobody
            elif isinstance(reply, Exception):
                failures[envelope.id] = self._error(reply, "PUBLISH failed on")
            else:
                failures[envelope.id] = TransientPublishError(
                    f"unexpected PUBLISH reply {type(reply).__name__} from {self._where}"
                )
        return failures

    def _connect(self, deadline: float) -> None:
        """Ping the server, reconnecting with a few quick tries; raise PublishError if it fails."""
        retrying = quick_reconnects(deadline, self.options.timeout)
        for attempt in retrying:
            with attempt:
                try:
                    self._client.ping()
                except redis.exceptions.RedisError as exc:
                    raise self._error(exc, "cannot reach") from exc
        self._suspect = False

    def _error(self, exc: Exception, context: str) -> PublishError:
        if isinstance(exc, _REFUSED):
            return PermanentPublishError(
                f"{context} {self._where}: Redis refused the client ({_reason(exc)}); "
                "check the user, password and ACL"
            )
        if isinstance(exc, redis.exceptions.TimeoutError):
            return TransientPublishError(f"{context} {self._where}: timed out")
        return TransientPublishError(f"{context} {self._where}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


__all__ = ["RedisTransport"]
