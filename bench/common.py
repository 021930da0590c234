"""What the benchmark and the chaos suite share: scratch databases, backlogs, relay processes,
private brokers, progress lines, and the machine's description.

Every service is on loopback. Addresses come from ``OUTBOX_BENCH_*`` variables (outbox's own
settings ignore that prefix) with the local defaults the test suite uses.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from outbox import db
from outbox.commands import Dialect, encode, wire_payload

ADMIN_URL = os.environ.get("OUTBOX_BENCH_DATABASE_URL",
                           "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("OUTBOX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("OUTBOX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
LOOPBACK = "127.0.0.1"

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: a realistic send-sms: the wire JSON is about 300 bytes, as in PERFORMANCE.md
RECEIVER = "+6281234567890"
TEXT = ("Your verification code for Example Bank is 482913. It expires in 5 minutes. "
        "Never share this code with anyone, including our staff. Ref")


def sample_data(n: int) -> dict[str, Any]:
    return {"receiver": RECEIVER, "message": f"{TEXT} {n:08d}"}


def sample_body(n: int = 1) -> bytes:
    """The exact bytes the relay publishes for row ``n`` (dialect otp-pi)."""
    return encode(wire_payload("send-sms", sample_data(n), message_id=n, dialect=Dialect.OTP_PI,
                               now=time.time(), expires_at=None))


# --- progress -----------------------------------------------------------------------------

_STARTED = time.monotonic()


def progress(message: str) -> None:
    elapsed = int(time.monotonic() - _STARTED)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def now() -> float:
    """A clock every process on this host shares (CLOCK_MONOTONIC is system-wide on Linux)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --- databases ---------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def scratch_database(prefix: str = "outbox_bench", *, migrate: bool = True) -> Iterator[str]:
    """A database of our own next to ``ADMIN_URL``, migrated, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(ADMIN_URL, name)
    try:
        if migrate:
            db.upgrade(url)
        yield url
    finally:
        drop_database(name)


def drop_database(name: str) -> None:
    for _ in range(30):  # Postgres may be restarting (chaos): keep trying for a while
        try:
            with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.OperationalError:
            time.sleep(1)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, **kwargs)


def reset(url: str) -> None:
    """An empty outbox.message with fresh ids, vacuumed: every section starts alike.

    Migrates first: the tree may gain a migration while a long run is under way, and
    ``outbox run`` refuses a database that is behind."""
    db.upgrade(url)
    with connect(url) as conn:
        conn.execute("TRUNCATE outbox.message, outbox.otp RESTART IDENTITY")
        conn.execute("VACUUM ANALYZE outbox.message")


SEED = """
INSERT INTO outbox.message (command, data)
SELECT 'send-sms', jsonb_build_object('receiver', %(receiver)s::text,
                                      'message', %(text)s || ' ' || lpad(g::text, 8, '0'))
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""


def seed(url: str, count: int, *, chunk: int = 100_000, label: str = "") -> None:
    """``count`` pending send-sms rows through the real INSERT (rules and trigger included)."""
    with connect(url) as conn:
        done = 0
        while done < count:
            size = min(chunk, count - done)
            conn.execute(SEED, {"receiver": RECEIVER, "text": TEXT, "first": done + 1,
                                "last": done + size})
            done += size
            if count > chunk:
                progress(f"{label}seeded {done:,}/{count:,} rows")
        conn.execute("VACUUM ANALYZE outbox.message")


def counts(url: str) -> dict[str, int]:
    with connect(url) as conn:
        rows = conn.execute("SELECT state, count(*) FROM outbox.message GROUP BY state").fetchall()
    return {state: int(n) for state, n in rows}


def pending(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute(
        "SELECT count(*) FROM outbox.message WHERE state = 'pending'").fetchone()[0])


def wait_until_drained(url: str, total: int, *, timeout: float, label: str,
                       alive: Callable[[], bool] | None = None, every: float = 2.0) -> float:
    """Poll until no row is pending; show progress; return the seconds it took."""
    started = time.monotonic()
    last_report = started
    with connect(url) as conn:
        while True:
            left = pending(conn)
            if left == 0:
                return time.monotonic() - started
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise TimeoutError(f"{label}: {left:,} rows still pending after {timeout:.0f}s")
            if alive is not None and not alive():
                raise RuntimeError(f"{label}: the relay exited with {left:,} rows pending")
            if time.monotonic() - last_report >= every:
                done = total - left
                progress(f"{label}{done:,}/{total:,} sent ({done / max(elapsed, 1e-9):,.0f}/s)")
                last_report = time.monotonic()
            time.sleep(0.2)


def sent_rate(url: str) -> tuple[int, float]:
    """Rows sent and their rate, from the rows' own ``sent_at`` (server clock, no polling)."""
    with connect(url) as conn:
        n, span = conn.execute(
            "SELECT count(*), extract(epoch FROM max(sent_at) - min(sent_at))::float8 "
            "FROM outbox.message WHERE state = 'sent'").fetchone()
    return int(n), (n / span if span else 0.0)


def table_sizes(url: str) -> dict[str, int]:
    with connect(url) as conn:
        table, indexes, total = conn.execute(
            "SELECT pg_table_size('outbox.message'), pg_indexes_size('outbox.message'), "
            "pg_total_relation_size('outbox.message')").fetchone()
    return {"table": int(table), "indexes": int(indexes), "total": int(total)}


def dead_tuples(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables "
                           "WHERE schemaname = 'outbox' AND relname = 'message'").fetchone()
    return int(row[0]) if row else 0


# --- the relay as an operator runs it ------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    batch_size: int = 500
    workers: int = 2

    def describe(self) -> str:
        return f"OUTBOX_BATCH_SIZE={self.batch_size} OUTBOX_WORKERS={self.workers}"


def relay_env(url: str, transport: str, config: RelayConfig, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OUTBOX_") and key != "DATABASE_URL"}
    env.update(DATABASE_URL=url, OUTBOX_TRANSPORT=transport, OUTBOX_LOG_LEVEL="warning",
               OUTBOX_LOG_FORMAT="json", OUTBOX_BATCH_SIZE=str(config.batch_size),
               OUTBOX_WORKERS=str(config.workers))
    env.update(extra)
    return env


class RelayProcess:
    """``outbox run`` in a subprocess; its log (warnings and up) goes to a file."""

    def __init__(self, url: str, transport: str, config: RelayConfig, *, log: Path,
                 stdout: Path | None = None, **extra: str) -> None:
        self.env = relay_env(url, transport, config, **extra)
        self.log_path = log
        self.stdout_path = stdout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            out: Any = subprocess.DEVNULL
            if self.stdout_path is not None:
                out = self.stdout_path.open("ab")
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "outbox.cli", "run"], env=self.env, stdout=out,
                    stderr=log, cwd=ROOT)
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def relays(url: str, transport: str, config: RelayConfig, *, count: int = 1, log: Path,
           stdout: Path | None = None, **extra: str) -> Iterator[list[RelayProcess]]:
    started = [RelayProcess(url, transport, config, log=log, stdout=stdout, **extra).start()
               for _ in range(count)]
    try:
        yield started
    finally:
        for relay in started:
            relay.stop()


# --- helpers for brokers and servers we start ourselves -----------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float, *, open_: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port) == open_:
            return True
        time.sleep(0.1)
    return False


class Mosquitto:
    """A Mosquitto of our own on a free port, so that stopping it disturbs nobody.

    ``max_queued_messages 0`` (no limit) and a wide in-flight window: the stock limit of 1000
    queued QoS 1 messages per client drops messages to a subscriber that falls behind, which
    would count as losses that are not the relay's. Persistence keeps a durable subscriber's
    session across a restart of this broker (the chaos suite stops it on purpose).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-bench-mqtt-"))
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 1000\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "autosave_interval 0\n"
            "log_dest none\n"
            # keep our own user (as root it would switch to one that cannot write here)
            f"user {getpass.getuser()}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        self.process = subprocess.Popen([binary, "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_port(self.port, 10):
            raise RuntimeError("our mosquitto did not start")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def mosquitto_binary() -> str:
    """Mosquitto from PATH or the usual sbin directories (it is a daemon)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    binary = shutil.which("mosquitto", path=search)
    if binary is None:
        raise RuntimeError("mosquitto is not installed")
    return binary


def mosquitto_available() -> bool:
    try:
        mosquitto_binary()
    except RuntimeError:
        return False
    return True


class ChildServer:
    """A Python module of ours run as a subprocess that prints ``ready`` when it listens."""

    def __init__(self, module: str, *args: str) -> None:
        self.args = [sys.executable, "-m", module, *args]
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> ChildServer:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=sys.stderr,
                                        text=True, cwd=ROOT)
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.strip() == "ready":
                return self
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{' '.join(self.args[2:])} did not start")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def module_exists(name: str) -> bool:
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --- statistics ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


# --- the machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command_version(*args: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    info = {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=5) as conn:
            info["postgres"] = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]
    except psycopg.Error:
        info["postgres"] = "unreachable"
    try:
        import pika  # noqa: PLC0415

        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        version_ = connection._impl.server_properties.get("version", "?")
        info["rabbitmq"] = version_.decode() if isinstance(version_, bytes) else str(version_)
        connection.close()
    except Exception:
        info["rabbitmq"] = "unreachable"
    try:
        import redis  # noqa: PLC0415

        info["redis"] = str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
    except Exception:
        info["redis"] = "unreachable"
    if mosquitto_available():
        info["mosquitto"] = _command_version(mosquitto_binary(), "-h").replace(
            "mosquitto version ", "")
    libraries = []
    for package in ("psycopg", "pika", "redis", "paho-mqtt", "httpx", "procrastinate"):
        with contextlib.suppress(PackageNotFoundError):
            libraries.append(f"{package} {version(package)}")
    info["libraries"] = ", ".join(libraries)
    return info


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


class Subscriber(ChildServer):
    """:mod:`bench.subscriber` (or :mod:`bench.httpd`) in a subprocess; ``received()`` after
    ``stop()`` gives what it saw."""

    def __init__(self, kind: str, url: str, topic: str, *, settle: float = 1.0,
                 client_id: str | None = None, durable: bool = False) -> None:
        handle, name = tempfile.mkstemp(prefix="outbox-bench-sub-")
        os.close(handle)
        self.out = Path(name)
        self.status = self.out.with_suffix(".status")
        args = [kind, "--url", url, "--topic", topic, "--out", str(self.out),
                "--settle", str(settle), "--status", str(self.status)]
        if client_id:
            args += ["--client-id", client_id]
        if durable:
            args.append("--durable")
        super().__init__("bench.subscriber", *args)

    def distinct(self) -> int:
        """Distinct ids received so far (from the subscriber's status file)."""
        try:
            return int(self.status.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.distinct() >= count:
                return True
            time.sleep(0.2)
        return False

    def received(self) -> tuple[list[int], list[float], int]:
        from bench.subscriber import read_results  # noqa: PLC0415

        ids, times, unparsed = read_results(self.out)
        self.out.unlink(missing_ok=True)
        self.status.unlink(missing_ok=True)
        self.status.with_suffix(".tmp").unlink(missing_ok=True)
        return list(ids), list(times), unparsed


class HttpDevice(ChildServer):
    """:mod:`bench.httpd` on a free port; with ``record`` it remembers the ids it accepted."""

    def __init__(self, *, record: bool = False) -> None:
        self.port = free_port()
        self.out: Path | None = None
        args = ["--port", str(self.port)]
        if record:
            handle, name = tempfile.mkstemp(prefix="outbox-bench-http-")
            os.close(handle)
            self.out = Path(name)
            args += ["--out", name]
        super().__init__("bench.httpd", *args)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api/sms"

    def received(self) -> list[int]:
        from bench.subscriber import read_results  # noqa: PLC0415

        assert self.out is not None
        ids, _, _ = read_results(self.out)
        self.out.unlink(missing_ok=True)
        return list(ids)
