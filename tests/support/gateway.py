"""``outbox gateway`` (and ``outbox run``) as subprocesses, the way an operator starts them."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.brokers import free_port

OUTBOX = [sys.executable, "-m", "outbox.cli"]

#: how long a subprocess may take to start on a loaded machine
START_WAIT = 60.0


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OUTBOX_", "PROMETHEUS_")) and key != "DATABASE_URL"}
    env.update(DATABASE_URL=url, OUTBOX_LOG_FORMAT="json", OUTBOX_TRANSPORT="stdout://")
    env.update(extra)
    return env


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        # like the PHP client: TLS without certificate verification
        return httpx.Client(base_url=self.url, timeout=30, verify=False)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _wait_alive(process: subprocess.Popen[bytes], port: int, log: Path,
                scheme: str = "http") -> None:
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited with {process.returncode}: "
                                 f"{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{scheme}://127.0.0.1:{port}/livez", timeout=1,
                         verify=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the gateway did not answer /livez in time")


@contextlib.contextmanager
def gateway(env: dict[str, str], log_dir: Path, *args: str) -> Iterator[RunningGateway]:
    """A gateway on a free port; SIGTERM at the end, which must exit 0."""
    port = free_port()
    scheme = "https" if "--certfile" in args else "http"
    log = log_dir / f"gateway-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*OUTBOX, "gateway", "--port", str(port), *args], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_alive(process, port, log, scheme)
        yield RunningGateway(process, port, log, scheme)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text(errors="replace")[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def relay(env: dict[str, str], log_dir: Path) -> Iterator[Path]:
    """``outbox run`` until the block ends; yields the file its stdout goes to."""
    log = log_dir / f"relay-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*OUTBOX, "run"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_WAIT
        while '"relay.started"' not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the relay did not start"
            time.sleep(0.05)
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


__all__ = ["OUTBOX", "RunningGateway", "basic", "env_for", "gateway", "relay"]
