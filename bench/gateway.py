"""``outbox gateway`` under load (issue 15): two rows of ``make bench``.

1. **Sustained**: 1,000 ``send-sms`` requests a second for 30 s from keep-alive clients, paced
   open-loop (each request has its due time; a slow answer delays the next ones on its
   connection, and latency is measured from the due time, so queueing counts). p50 / p99,
   errors (anything but HTTP 200 with ``0000``), and whether every request became a row.
2. **Peak**: 16 keep-alive clients sending back to back for 10 s: accepted requests a second,
   next to the plain single-row INSERT rate (a bare table, one transaction per row, from 16
   connections) measured in the same run, with the ratio.

Requests are what the PHP OTP-Publisher client sends for ``sendSMS()``: Basic auth, a
``Content-Length`` and no ``Content-Type``, a ``data.id`` per request (so each is a keyed,
idempotent insert). The load comes from another process (asyncio on uvloop, a minimal
HTTP/1.1 keep-alive client), so it does not share the gateway's interpreter.

    python -m bench.run --only gateway
    python -m bench.gateway client ...     # the load process (started by the above)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.types.json import Jsonb

from bench.common import LOOPBACK, ROOT, connect, free_port, percentile, progress, reset, sample_data

USER, PASSWORD = "bench", "bench-gateway-password"
PEAK_CLIENTS = 16
SUSTAINED_RATE = 1000.0
SUSTAINED_CONNECTIONS = 32
TARGET_P99 = 0.1


# --- the load process ------------------------------------------------------------------------


def _request(port: int, n: int, auth: str) -> bytes:
    data = {"date_time": int(time.time()), "expiration": int(time.time()) + 600, "id": n,
            **sample_data(n)}
    body = json.dumps({"command": "send-sms", "data": data}, separators=(",", ":")).encode()
    return (f"POST /api/sms HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nAuthorization: {auth}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> bool:
    """One request on a kept-alive connection; True for 200 with 0000."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status == 200 and b'"response_code":"0000"' in body


async def _load(port: int, *, connections: int, seconds: float, rate: float | None,
                first_id: int) -> dict[str, Any]:
    """``rate`` None: closed loop (each client sends when its answer came)."""
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    latencies: list[float] = []
    errors = 0
    sent = 0
    counter = iter(range(first_id, first_id + 10_000_000))
    start = time.perf_counter() + 0.2
    stop_at = start + seconds

    async def client(index: int) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            interval = None if rate is None else connections / rate
            due = start + (0.0 if interval is None else index * interval / connections)
            while True:
                if interval is not None:
                    if due >= stop_at:
                        return
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                elif time.perf_counter() >= stop_at:
                    return
                begun = due if interval is not None else time.perf_counter()
                sent += 1
                try:
                    ok = await _exchange(reader, writer, _request(port, next(counter), auth))
                except (OSError, asyncio.IncompleteReadError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(LOOPBACK, port)
                latencies.append(time.perf_counter() - begun)
                if not ok:
                    errors += 1
                if interval is not None:
                    due += interval
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(connections)))
    took = time.perf_counter() - start
    latencies.sort()
    return {"requests": sent, "errors": errors, "seconds": took, "rate": sent / took,
            "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "max": latencies[-1] if latencies else None}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--first-id", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        pass
    result = asyncio.run(_load(args.port, connections=args.connections, seconds=args.seconds,
                               rate=args.rate, first_id=args.first_id))
    print(json.dumps(result))
    return 0


def _run_client(port: int, **options: Any) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.gateway", "client", "--port", str(port)]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True,
                          timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the ceiling: plain single-row INSERTs from as many connections ------------------------------


def insert_rate(url: str, connections: int, seconds: float) -> float:
    with connect(url) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        conn.execute("DROP TABLE IF EXISTS bench.bare")
        conn.execute("CREATE TABLE bench.bare (id bigint GENERATED ALWAYS AS IDENTITY "
                     "PRIMARY KEY, command text NOT NULL, data jsonb NOT NULL)")
    done = [0] * connections
    stop_at = time.perf_counter() + seconds

    def worker(index: int) -> None:
        with psycopg.connect(url) as conn, conn.cursor() as cur:
            while time.perf_counter() < stop_at:
                cur.execute("INSERT INTO bench.bare (command, data) VALUES (%s, %s)",
                            ("send-sms", Jsonb(sample_data(done[index]))))
                conn.commit()
                done[index] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rate = sum(done) / (time.perf_counter() - started)
    with connect(url) as conn:
        conn.execute("DROP SCHEMA bench CASCADE")
    return rate


# --- the section ----------------------------------------------------------------------------------


class Gateway:
    """``outbox gateway`` in a subprocess on a free port, with a users file of one user."""

    def __init__(self, url: str, log: Path, workers: int) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-bench-gateway-"))
        users = self.directory / "users"
        from outbox.passwords import set_user  # noqa: PLC0415

        set_user(users, USER, PASSWORD)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("OUTBOX_", "PROMETHEUS_")) and key != "DATABASE_URL"}
        env.update(DATABASE_URL=url, OUTBOX_GATEWAY_USERS=str(users), OUTBOX_LOG_LEVEL="warning",
                   OUTBOX_LOG_FORMAT="json", OUTBOX_TRANSPORT="stdout://")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "gateway", "--port", str(self.port),
                 "--workers", str(workers)], env=env, stdout=out, stderr=out, cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{LOOPBACK}:{self.port}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start (see {log})")
            time.sleep(0.2)

    def stop(self) -> int | None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for path in self.directory.iterdir():
            path.unlink()
        self.directory.rmdir()
        return self.process.returncode


def rows(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.message").fetchone()
    return int(row[0]) if row else 0


def run(url: str, log: Path, *, quick: bool = False, workers: int = 2) -> dict[str, Any]:
    sustained_seconds = 5.0 if quick else 30.0
    peak_seconds = 3.0 if quick else 10.0
    reset(url)
    gateway = Gateway(url, log, workers)
    try:
        # warm up: the password check (argon2, once per worker) and the pools' connections
        _run_client(gateway.port, connections=PEAK_CLIENTS, seconds=1.0, first_id=1)
        reset(url)
        progress(f"gateway: {SUSTAINED_RATE:,.0f} req/s for {sustained_seconds:.0f} s "
                 f"({SUSTAINED_CONNECTIONS} keep-alive connections, {workers} workers)")
        sustained = _run_client(gateway.port, connections=SUSTAINED_CONNECTIONS,
                                seconds=sustained_seconds, rate=SUSTAINED_RATE,
                                first_id=10_000_000)
        sustained["rows"] = rows(url)
        sustained["every_request_a_row"] = sustained["rows"] == sustained["requests"]
        sustained["target_rate"] = SUSTAINED_RATE
        progress(f"gateway: sustained {sustained['rate']:,.0f} req/s, p50 "
                 f"{sustained['p50'] * 1000:.1f} ms, p99 {sustained['p99'] * 1000:.1f} ms, "
                 f"{sustained['errors']} errors, {sustained['rows']:,} rows")
        peaks: list[dict[str, Any]] = []
        for pair in range(3 if not quick else 1):
            # the ceiling and the gateway back to back, three times: the median pair counts
            reset(url)
            ceiling = insert_rate(url, PEAK_CLIENTS, peak_seconds)
            peak = _run_client(gateway.port, connections=PEAK_CLIENTS, seconds=peak_seconds,
                               first_id=20_000_000 + pair * 1_000_000)
            peak["rows"] = rows(url)
            peak["insert_rate"] = ceiling
            peak["ratio"] = peak["rate"] / ceiling
            peaks.append(peak)
            progress(f"gateway: peak {peak['rate']:,.0f} req/s ({peak['errors']} errors), plain "
                     f"INSERT {ceiling:,.0f}/s, {peak['ratio']:.0%}")
        peak = sorted(peaks, key=lambda item: item["ratio"])[len(peaks) // 2]
        peak["pairs"] = [{"gateway": p["rate"], "insert": p["insert_rate"], "ratio": p["ratio"]}
                         for p in peaks]
    finally:
        exit_code = gateway.stop()
    reset(url)
    return {"workers": workers, "sustained": sustained, "peak": peak,
            "clean_exit": exit_code == 0}


def table_rows(result: dict[str, Any]) -> list[str]:
    """The section's lines in bench.run's results table."""
    if "sustained" not in result:
        return [f"| 8 | gateway | not run: {result.get('error')} | | | | |"]
    held, peak = result["sustained"], result["peak"]
    ok = (held["errors"] == 0 and held["every_request_a_row"]
          and held["rate"] >= 0.98 * held["target_rate"])
    return [
        f"| 8 | gateway, {held['target_rate']:,.0f} send-sms/s for {held['seconds']:.0f} s "
        f"({result['workers']} workers) | p50 {held['p50'] * 1000:.1f} ms, p99 "
        f"{held['p99'] * 1000:.1f} ms, {held['errors']} errors, {held['rows']:,} rows of "
        f"{held['requests']:,} | {held['rate']:,.0f} req/s held | | 0 errors, every request "
        f"a row | {'met' if ok else 'missed'} |",
        f"| 8 | gateway peak, {PEAK_CLIENTS} keep-alive clients | {peak['rate']:,.0f} req/s "
        f"({peak['errors']} errors) | plain single-row INSERT, {PEAK_CLIENTS} connections "
        f"{peak['insert_rate']:,.0f}/s | {peak['ratio']:.0%} | — | |",
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        sys.exit(client_main(sys.argv[2:]))
    raise SystemExit("usage: python -m bench.run --only gateway")
