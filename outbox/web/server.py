"""Running an outbox web application on uvicorn, with what every such service shares.

* ``workers``: uvicorn's supervisor starts that many processes on one listening socket
  (each imports the app from its factory; options travel in the environment, never argv);
  with more than one, prometheus_client's multiprocess mode makes ``/metrics`` add them up.
* ``certfile``/``keyfile``: TLS by uvicorn itself; without them, plain HTTP (put a TLS proxy
  in front, docs/operations.md).
* SIGTERM/SIGINT: uvicorn stops accepting, finishes the requests in flight (at most
  :data:`GRACEFUL_SECONDS`), runs the app's shutdown and exits 0.
* Logs: uvicorn's own access log is off; the app logs one structlog event per request,
  through the same masking as the relay. uvicorn's lifecycle messages stay at warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from outbox.errors import ConfigurationError
from outbox.logs import get_logger

log = get_logger("outbox.web")

GRACEFUL_SECONDS = 10


def _server_class() -> type[Any]:
    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM/SIGINT it shut down for is a clean exit (0), as
        for the relay: uvicorn re-raises the signal after its graceful shutdown, which makes
        the process look killed to a service manager."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return Server


def serve(factory: str, *, host: str, port: int, workers: int = 1,
          certfile: str | None = None, keyfile: str | None = None,
          worker_options: Mapping[str, Any] | None = None, options_env: str,
          name: str) -> int:
    """Serve the app that ``factory`` (``module:function``, reading its options from the
    environment variable ``options_env``) builds, until SIGTERM; the exit code.

    The app is built here first, so a configuration error stops the command with its own
    message before any worker starts.
    """
    import uvicorn  # noqa: PLC0415 - only the services need it
    from uvicorn.importer import import_from_string  # noqa: PLC0415

    if workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if bool(certfile) != bool(keyfile):
        raise ConfigurationError("TLS needs both --certfile and --keyfile")
    for path in (certfile, keyfile):
        if path and not Path(path).is_file():
            raise ConfigurationError(f"TLS file {path!r} does not exist")
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"port {port} is not a TCP port")
    os.environ[options_env] = json.dumps(dict(worker_options or {}))
    app = import_from_string(factory)()
    metrics_dir = None
    if workers > 1:
        # Set before the workers start: prometheus_client picks its value store at import.
        metrics_dir = tempfile.mkdtemp(prefix=f"outbox-{name}-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.info(f"{name}.listening", host=host, port=port, workers=workers,
             tls=bool(certfile))
    config = uvicorn.Config(
        # One process serves the app built above; several build their own from the factory.
        app if workers == 1 else factory, factory=workers > 1, host=host, port=port,
        workers=workers, ssl_certfile=certfile, ssl_keyfile=keyfile,
        access_log=False, log_config=None, server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SECONDS, lifespan="on",
        # the PHP client and a keep-alive pool both reuse connections
        timeout_keep_alive=30,
    )
    try:
        if workers == 1:
            server = _server_class()(config)
            server.run()
            if not server.started:
                return 1  # uvicorn said why (a taken port, a bad certificate)
        else:
            from uvicorn.supervisors import Multiprocess  # noqa: PLC0415

            Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return 0


__all__ = ["GRACEFUL_SECONDS", "serve"]
