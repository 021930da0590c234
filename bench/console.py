"""The console's overview on a 10-million-row table: how long its data takes.

    python -m bench.run --only console        # or: python -m bench.console [--rows N]

A private database gets ``rows`` rows built by ``generate_series`` (triggers off for the
load: the rows are valid, and checking each one would take the load from a minute to ten):
97 % sent over the last 7 days (one retention period, as the relay's purge leaves it), 2 %
expired, 0.5 % failed (spread over the week, the worst case for reading them), and a backlog
of 0.5 % pending rows created in the last ten minutes; then VACUUM ANALYZE, as autovacuum
would leave the table.
Timed, each the median of ``ROUNDS`` after one warm-up: ``admin.read_status`` (what
``outbox status`` reads, the reference), ``dashboard.read_overview`` (everything the overview
shows but the transports' health, which is probed apart) and ``GET /api/overview`` over HTTP
from a real console. Not a test: figures only, with the ratio to ``outbox status``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import connect, progress, scratch_database

ROWS = 10_000_000
ROUNDS = 7

LOAD = """
SET session_replication_role = replica;
INSERT INTO outbox.message (command, data, route, state, attempts, created_at, available_at,
                            sent_at, expires_at, last_error, priority)
SELECT CASE WHEN n % 7 = 0 THEN 'send-email' ELSE 'send-sms' END,
       jsonb_build_object('receiver', '+62812' || lpad(n::text, 8, '0'),
                          'message', 'Your code is ' || (n % 1000000)::text),
       CASE WHEN n % 3 = 0 THEN 'sms' END,
       kind, CASE kind WHEN 'sent' THEN 1 ELSE 12 END,
       at - interval '1 second', at,
       CASE kind WHEN 'sent' THEN at + make_interval(secs => (n % 50) / 100.0) END,
       CASE kind WHEN 'expired' THEN at END,
       CASE kind WHEN 'failed' THEN 'device answered 1101 (modem busy)'
                 WHEN 'expired' THEN 'expired before it could be sent' END,
       outbox.default_priority(CASE WHEN n % 7 = 0 THEN 'send-email' ELSE 'send-sms' END)
FROM (SELECT n,
             CASE WHEN n % 200 = 0 THEN 'failed' WHEN n % 100 IN (2, 3) THEN 'expired'
                  ELSE 'sent' END AS kind,
             now() - make_interval(secs => 7 * 86400.0 * (1 - n::float8 / %(rows)s)) AS at
      FROM generate_series(1, %(rows)s - %(rows)s / 200) AS n) AS generated;
-- The backlog: the newest rows, as a relay that fell behind for ten minutes leaves them.
INSERT INTO outbox.message (command, data, route, attempts, created_at, available_at,
                            priority)
SELECT 'send-sms', jsonb_build_object('receiver', '+62813' || lpad(n::text, 8, '0'),
                                      'message', 'Your code is ' || (n % 1000000)::text),
       CASE WHEN n % 3 = 0 THEN 'sms' END, n % 3,
       now() - make_interval(secs => 600.0 * (1 - n::float8 / (%(rows)s / 200))),
       now() + make_interval(secs => n % 120 - 60), (n % 10)::smallint
FROM generate_series(1, %(rows)s / 200) AS n;
RESET session_replication_role;
"""


def build(url: str, rows: int) -> dict[str, Any]:
    started = time.monotonic()
    with connect(url) as conn:
        conn.execute(LOAD.replace("%(rows)s", str(int(rows))))
        loaded = time.monotonic()
        conn.execute("VACUUM (ANALYZE) outbox.message")
        size = conn.execute("SELECT pg_total_relation_size('outbox.message')").fetchone()
    return {"rows": rows, "load_seconds": round(loaded - started, 1),
            "vacuum_seconds": round(time.monotonic() - loaded, 1),
            "total_bytes": int(size[0]) if size else 0}


def median_ms(call: Any, rounds: int) -> dict[str, float]:
    call()  # warm-up: the first round reads the pages into the cache
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}


def run(rows: int = ROWS, rounds: int = ROUNDS) -> dict[str, Any]:
    from outbox import admin, dashboard  # noqa: PLC0415
    from outbox.settings import Settings  # noqa: PLC0415
    from tests.support.console import OPERATOR, serve_console, write_users  # noqa: PLC0415

    with scratch_database("outbox_bench_console") as url:
        progress(f"console: building {rows:,} rows")
        built = build(url, rows)
        progress(f"console: built in {built['load_seconds']} s + VACUUM "
                 f"{built['vacuum_seconds']} s, {built['total_bytes'] / 2**30:.2f} GiB")
        settings = Settings(database_url=url, transports={"default": "stdout://",
                                                          "sms": "stdout://"})
        with psycopg.connect(url, autocommit=True) as conn:
            status = median_ms(lambda: admin.read_status(conn, settings), rounds)
            overview = median_ms(lambda: dashboard.read_overview(conn, settings), rounds)
            shown = dashboard.read_overview(conn, settings)
        with tempfile.TemporaryDirectory() as scratch:
            users = write_users(Path(scratch) / "users")
            with serve_console(url, users, settings=settings) as console, \
                    httpx.Client(base_url=console, auth=OPERATOR, timeout=60) as http:
                endpoint = median_ms(lambda: http.get("/api/overview").raise_for_status(),
                                     rounds)
    result = {
        **built, "rounds": rounds,
        "status": status, "overview": overview, "endpoint": endpoint,
        "overview_to_status": round(overview["median_ms"] / max(status["median_ms"], 0.001), 2),
        "counts": dict(shown.status.counts), "estimated": list(shown.status.estimated),
        "last_hour": sum(minute.total for minute in shown.per_minute),
    }
    progress(f"console: outbox status {status['median_ms']} ms, overview data "
             f"{overview['median_ms']} ms ({result['overview_to_status']}x), "
             f"GET /api/overview {endpoint['median_ms']} ms")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    result = run(args.rows, args.rounds)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
