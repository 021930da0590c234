"""The one small interface every transport implements."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, NamedTuple, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from outbox.commands import Dialect
from outbox.errors import ConfigurationError, PublishError, TransientPublishError
from outbox.scheduling import Rate, default_burst, parse_rate


class OtpMode(StrEnum):
    #: the device draws, stores and verifies the code (REST only: it must answer)
    DEVICE = "device"
    #: the relay draws the code, keeps a keyed hash and sends the finished text
    MANAGED = "managed"


class Envelope(NamedTuple):
    """One message ready for the wire. A NamedTuple: one is built per message, and it builds
    in a third of a frozen dataclass's time."""

    #: the outbox row id; travels as AMQP message_id, HTTP Idempotency-Key, data.id
    id: int
    #: the README name of the command actually published (create-otp may become send-sms)
    command: str
    #: the encoded JSON body, exactly the bytes to send
    body: bytes
    #: 1 for the first try of this row, 2 for its first retry, ...
    attempt: int = 1


#: Failures by envelope id; an id that is absent was delivered (confirmed by the peer).
Failures = dict[int, PublishError]


@runtime_checkable
class Transport(Protocol):
    """Publishes envelopes and says which were not delivered.

    ``publish`` returns only once every envelope of the batch is either confirmed by the
    peer (absent from the result) or failed (present, with a transient or permanent error).
    It may raise a ``PublishError`` for the whole batch instead. Implementations convert
    their library's exceptions into ``PublishError`` subclasses, ``raise ... from exc``.
    """

    name: str
    options: TransportOptions

    def publish(self, batch: Sequence[Envelope]) -> Failures: ...

    def check(self) -> None:
        """Raise ``PublishError`` when the peer cannot be reached; cheap enough for /readyz."""

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """What outbox itself reads from a transport URL's query (the rest goes to the library)."""

    dialect: Dialect = Dialect.OTP_PI
    otp_mode: OtpMode = OtpMode.MANAGED
    timeout: float = 10.0
    #: ``rate=10/m``: the most the peer is sent, across every worker and relay (None: no limit)
    rate: Rate | None = None
    #: ``burst=N``: tokens the rate's bucket holds (see ``scheduling.default_burst``)
    burst: int = 1
    extra: Mapping[str, str] = field(default_factory=dict)


OUR_QUERY_KEYS = frozenset({"dialect", "otp", "timeout", "rate", "burst"})


def split_url(url: str, *, default_otp: OtpMode, timeout: float) -> tuple[str, TransportOptions]:
    """Separate outbox's own query parameters from the URL handed to the library.

    Returns the URL without ``dialect``/``otp``/``timeout``/``rate``/``burst`` and the parsed
    options; every other query parameter is kept in ``options.extra`` *and* in the URL.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {key: value for key, value in query if key in OUR_QUERY_KEYS}
    rest = [(key, value) for key, value in query if key not in OUR_QUERY_KEYS]
    try:
        dialect = Dialect(ours.get("dialect", Dialect.OTP_PI.value))
    except ValueError:
        raise ConfigurationError(
            f"unknown dialect {ours['dialect']!r} (expected otp-pi or readme)"
        ) from None
    try:
        otp_mode = OtpMode(ours.get("otp", default_otp.value))
    except ValueError:
        raise ConfigurationError(f"unknown otp mode {ours['otp']!r} (expected device or managed)") from None
    try:
        timeout = float(ours.get("timeout", timeout))
    except ValueError:
        raise ConfigurationError(f"timeout {ours['timeout']!r} is not a number of seconds") from None
    rate, burst = _rate_and_burst(ours.get("rate"), ours.get("burst"))
    stripped = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
    return stripped, TransportOptions(dialect=dialect, otp_mode=otp_mode, timeout=timeout,
                                      rate=rate, burst=burst, extra=dict(rest))


def _rate_and_burst(rate_text: str | None, burst_text: str | None) -> tuple[Rate | None, int]:
    if rate_text is None:
        if burst_text is not None:
            raise ConfigurationError("burst needs a rate (for example rate=10/m&burst=2)")
        return None, 1
    try:
        rate = parse_rate(rate_text)
    except ValueError as exc:
        raise ConfigurationError(f"rate: {exc}") from None
    if burst_text is None:
        return rate, default_burst(rate)
    try:
        burst = int(burst_text)
    except ValueError:
        burst = 0
    if burst < 1:
        raise ConfigurationError(f"burst {burst_text!r} must be a whole number of messages, at least 1")
    return rate, burst


#: connection attempts inside one publish/check call; durable retries are the relay's job
CONNECT_ATTEMPTS = 3


def quick_reconnects(deadline: float, timeout: float) -> Retrying:
    """Tenacity for short reconnects inside one call: a few tries of transient failures,
    exponential waits (with a little jitter) bounded by the call's ``deadline``."""
    return Retrying(
        retry=retry_if_exception_type(TransientPublishError),
        stop=stop_after_attempt(CONNECT_ATTEMPTS)
        | stop_before_delay(max(deadline - time.monotonic(), 0.0)),
        wait=wait_exponential(multiplier=0.05, max=max(0.05, min(1.0, timeout / 4)))
        + wait_random(0, 0.05),
        reraise=True,
    )


class Session(Protocol):
    """One live connection of a transport (with its channel, loop, ...)."""

    @property
    def healthy(self) -> bool: ...

    def open(self, deadline: float) -> None: ...

    def refresh(self) -> None:
        """Handle what arrived while idle (a close from the peer, heartbeats), without waiting."""

    def dispose(self) -> None: ...


SessionT = TypeVar("SessionT", bound=Session)


class SessionTransport(Generic[SessionT]):
    """The lifecycle shared by transports that hold one connection: opened lazily on the first
    publish or check, a few quick reconnects when it is gone, dropped when a batch left it
    unhealthy, one caller at a time. Subclasses say how to make a session and publish on it."""

    options: TransportOptions

    def __init__(self) -> None:
        self._session: SessionT | None = None
        self._lock = threading.Lock()

    def _new_session(self) -> SessionT:
        raise NotImplementedError

    def _publish_on(self, session: SessionT, batch: Sequence[Envelope], deadline: float,
                    ) -> Failures:
        raise NotImplementedError

    def publish(self, batch: Sequence[Envelope]) -> Failures:
        if not batch:
            return {}
        with self._lock:
            deadline = time.monotonic() + self.options.timeout
            session = self._ready(deadline)
            try:
                return self._publish_on(session, batch, deadline)
            finally:
                if not session.healthy:
                    self._drop()

    def check(self) -> None:
        with self._lock:
            self._ready(time.monotonic() + self.options.timeout)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _ready(self, deadline: float) -> SessionT:
        """An open session, reconnecting (a few quick tries) when there is none."""
        session = self._session
        if session is not None:
            session.refresh()
            if session.healthy:
                return session
            self._drop()
        for attempt in quick_reconnects(deadline, self.options.timeout):
            with attempt:
                session = self._new_session()
                try:
                    session.open(deadline)
                except BaseException:
                    session.dispose()
                    raise
        assert session is not None
        self._session = session
        return session

    def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.dispose()


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def url_flag(transport: str, key: str, value: str | None) -> bool:
    """A true/false URL query option, refused by name when it is neither."""
    flag = (value or "").strip().lower()
    if flag not in _TRUE | _FALSE:
        raise ConfigurationError(f"transport {transport!r}: {key}={flag!r} (expected true or false)")
    return flag in _TRUE


__all__ = [
    "CONNECT_ATTEMPTS",
    "Envelope",
    "Failures",
    "OtpMode",
    "Session",
    "SessionTransport",
    "Transport",
    "TransportOptions",
    "quick_reconnects",
    "split_url",
    "url_flag",
]
