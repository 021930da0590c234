"""Metrics and health over HTTP, and the one-shot probe behind ``outbox check``.

One small threaded HTTP server on ``metrics_host:metrics_port`` answers:

``/metrics``
    Prometheus exposition (text or OpenMetrics, as the scraper asks).
``/livez``
    200 while the relay loop is turning: some worker finished a turn (a batch, an empty poll
    or a reconnect attempt) within :func:`liveness_window`. 503 means stuck: restart it.
``/readyz``
    200 when the database answers and every transport's ``check()`` passes, else 503 with
    one line per failed check. Cached for :data:`READINESS_CACHE_SECONDS` so frequent probes
    and scrapes stay cheap.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from outbox import db, metrics
from outbox import operations_sql as sql
from outbox.commands import COMMANDS
from outbox.errors import ConfigurationError, DatabaseUnavailable, PublishError
from outbox.logs import get_logger, scrub_text
from outbox.settings import Settings
from outbox.transports import Transport, open_transport, open_transports
from outbox.urls import mask_url

log = get_logger("outbox.health")

READINESS_CACHE_SECONDS = 2.0
DATABASE_CHECK_TIMEOUT = 3

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def liveness_window(settings: Settings) -> float:
    """How long a worker may go without a step: idle steps come every ``poll_interval``; a
    busy one publishes a chunk of about a second's work, but one request may wait on a slow
    transport for its whole timeout (a REST device's is a minute), twice to be safe."""
    from outbox.transports import transport_options  # noqa: PLC0415 - imports settings

    timeouts = [settings.publish_timeout]
    for url in settings.transports.values():
        with contextlib.suppress(ConfigurationError):
            timeouts.append(transport_options(url, settings)[1].timeout)
    return 10 * settings.poll_interval + 2 * max(timeouts)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    #: what ``outbox check`` exits with when this is the first failure
    exit_code: int = EXIT_OK

    def line(self) -> str:
        return f"[{'+' if self.ok else '-'}]{self.name} {'ok' if self.ok else 'failed'}: " \
               f"{self.detail}"


# --- checks ------------------------------------------------------------------------------


def check_transport(transport: Transport) -> CheckResult:
    name = f"transport {transport.name}"
    try:
        transport.check()
    except PublishError as exc:
        code = EXIT_UNREACHABLE if exc.transient else EXIT_USAGE
        return CheckResult(name, False, scrub_text(str(exc)), code)
    except Exception as exc:  # a transport bug: report it, do not crash the probe
        log.exception("health.check_crashed", route=transport.name, error=type(exc).__name__)
        return CheckResult(name, False, f"check() raised {type(exc).__name__}", EXIT_FAILURE)
    return CheckResult(name, True, "reachable")


def probe(settings: Settings, database_url: str) -> list[CheckResult]:
    """Everything ``outbox check`` looks at, once: the database and its schema, then every
    transport (opened, checked, closed)."""
    results = [_probe_database(database_url)]
    for name, url in settings.transports.items():
        try:
            transport = open_transport(name, url, settings)
        except ConfigurationError as exc:
            results.append(CheckResult(f"transport {name}", False, str(exc), EXIT_USAGE))
            continue
        try:
            result = check_transport(transport)
        finally:
            transport.close()
        results.append(CheckResult(result.name, result.ok,
                                   f"{mask_url(url)}" if result.ok else result.detail,
                                   result.exit_code))
    return results


def _probe_database(database_url: str) -> CheckResult:
    where = mask_url(database_url)
    try:
        with db.connect(database_url, connect_timeout=DATABASE_CHECK_TIMEOUT) as connection:
            connection.execute(sql.PING)
    except DatabaseUnavailable as exc:
        return CheckResult("database", False, str(exc), EXIT_UNREACHABLE)
    problems = db.check(database_url)
    if problems:
        return CheckResult("database", False, "; ".join(problems), EXIT_FAILURE)
    return CheckResult("database", True, f"{where} (schema {db.head_revision()})")


class Readiness:
    """The /readyz verdict, computed at most every ``cache_seconds``."""

    def __init__(self, settings: Settings, database_url: str, *,
                 transports_factory: Callable[[Settings], Mapping[str, Transport]] =
                 open_transports,
                 cache_seconds: float = READINESS_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.database_url = database_url
        self.transports_factory = transports_factory
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[CheckResult]] | None = None
        self._connection: psycopg.Connection[Any] | None = None
        self._transports: Mapping[str, Transport] | None = None

    def results(self) -> list[CheckResult]:
        with self._lock:  # concurrent probes share one evaluation
            now = self.clock()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, [self._database(), *self._check_transports()])
            return self._cached[1]

    def _database(self) -> CheckResult:
        try:
            if self._connection is None or self._connection.closed:
                self._connection = db.connect(self.database_url, autocommit=True,
                                              connect_timeout=DATABASE_CHECK_TIMEOUT)
            self._connection.execute(sql.PING)
        except (DatabaseUnavailable, psycopg.Error) as exc:
            self._drop_connection()
            return CheckResult("database", False, str(exc).strip().splitlines()[0]
                               if str(exc).strip() else type(exc).__name__, EXIT_UNREACHABLE)
        return CheckResult("database", True, "reachable")

    def _check_transports(self) -> list[CheckResult]:
        if self._transports is None:
            self._transports = self.transports_factory(self.settings)
        return [check_transport(transport) for transport in self._transports.values()]

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(psycopg.Error):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop_connection()
            for transport in (self._transports or {}).values():
                try:
                    transport.close()
                except Exception:  # closing is best effort at shutdown
                    log.warning("transport.close_failed", route=transport.name)
            self._transports = None


class Liveness:
    """/livez: whether ``last_turn()`` (a monotonic time) is recent enough."""

    def __init__(self, last_turn: Callable[[], float], window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.last_turn = last_turn
        self.window = window
        self.clock = clock

    def result(self) -> CheckResult:
        age = self.clock() - self.last_turn()
        detail = f"last turn {age:.1f}s ago (limit {self.window:.0f}s)"
        return CheckResult("relay loop", age <= self.window, detail)


# --- the HTTP server ------------------------------------------------------------------------

#: the outcomes the relay counts in ``outbox_messages_total``
OUTCOMES = ("sent", "retry_scheduled", "failed", "expired")


def prime_metrics(settings: Settings) -> None:
    """Create every configured label combination at zero, so that ``rate()`` and alerts see
    a series from the first scrape instead of from the first event."""
    from outbox.admin import effective_route  # noqa: PLC0415 - admin is heavier than we need

    for command in COMMANDS:
        route = effective_route(settings, command, None)
        metrics.DELIVERY_LAG.labels(route)
        for outcome in OUTCOMES:
            metrics.MESSAGES.labels(command, route, outcome)
    for name in settings.transports:
        metrics.PUBLISH_DURATION.labels(name)
    for state in ("sent", "expired", "failed"):
        metrics.PURGED.labels(state)


def serve(settings: Settings, database_url: str, last_turn: Callable[[], float]) -> HealthServer:
    """Start /metrics, /livez and /readyz on ``metrics_host:metrics_port``."""
    assert settings.metrics_port is not None
    prime_metrics(settings)
    server = HealthServer(settings.metrics_host, settings.metrics_port,
                          liveness=Liveness(last_turn, liveness_window(settings)),
                          readiness=Readiness(settings, database_url))
    server.start()
    return server



class HealthServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on one port, served from daemon threads."""

    def __init__(self, host: str, port: int, *, liveness: Liveness,
                 readiness: Readiness) -> None:
        self.liveness = liveness
        self.readiness = readiness
        handler = type("Handler", (_Handler,), {"health": self})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="outbox-http", daemon=True)
        self._thread.start()
        log.info("metrics.listening", host=self.host, port=self.port,
                 paths=["/metrics", "/livez", "/readyz"])

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        self.readiness.close()


class _Handler(BaseHTTPRequestHandler):
    health: HealthServer
    server_version = "outbox"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(REGISTRY), content_type)
        elif path == "/livez":
            self._verdict([self.health.liveness.result()])
        elif path == "/readyz":
            self._verdict(self.health.readiness.results())
        elif path == "/":
            self._reply(200, b"outbox relay: /metrics /livez /readyz\n")
        else:
            self._reply(404, b"not found\n")

    def _verdict(self, results: list[CheckResult]) -> None:
        ok = all(result.ok for result in results)
        body = "".join(result.line() + "\n" for result in results)
        self._reply(200 if ok else 503, (body + ("ok\n" if ok else "not ok\n")).encode())

    def _reply(self, status: int, body: bytes,
               content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line each."""


__all__ = [
    "READINESS_CACHE_SECONDS",
    "CheckResult",
    "HealthServer",
    "Liveness",
    "Readiness",
    "check_transport",
    "liveness_window",
    "prime_metrics",
    "probe",
    "serve",
]
