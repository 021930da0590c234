"""``make bench``: the relay against the physical limits of this machine and against a peer.

    python -m bench.run [--quick] [--only SECTION[,SECTION...]]

Sections (issue 7): ``enqueue``, ``throughput`` (``throughput:amqp`` and so on for one
transport), ``latency``, ``scaling``, ``peer``, ``long``. Everything runs in one go, side by
side, because on a shared machine only ratios within one run mean something. The relay runs
as real ``outbox run`` processes. Progress goes to stderr; the results go to
``bench/results/latest.json`` and, for a full run of every section, to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench import ceilings
from bench.common import (
    AMQP_URL,
    LOOPBACK,
    REDIS_URL,
    RESULTS,
    ROOT,
    HttpDevice,
    Mosquitto,
    RelayConfig,
    Subscriber,
    connect,
    machine,
    module_exists,
    mosquitto_available,
    now,
    percentile,
    progress,
    relays,
    reset,
    sample_data,
    scratch_database,
    seed,
    sent_rate,
    table_sizes,
    wait_until_drained,
    write_json,
)

SECTIONS = ("enqueue", "throughput", "latency", "scaling", "peer", "long", "priorities",
            "console", "limits", "gateway")
TRANSPORTS = ("amqp", "redis", "mqtt", "http", "stdout")
#: the transport module each section needs: a section runs once its module exists
MODULES = {"amqp": "outbox.transports.rabbitmq", "redis": "outbox.transports.redis_pubsub",
           "mqtt": "outbox.transports.mqtt", "http": "outbox.transports.http",
           "stdout": "outbox.transports.stdout"}
#: the relay as benchmarked; the defaults (batch 200, one worker) get one RabbitMQ row too
CONFIG = RelayConfig(batch_size=2000, workers=2)
DEFAULTS = RelayConfig(batch_size=200, workers=1)
QUEUE = "outbox-bench"
#: ceiling-then-relay pairs per broker throughput; the median pair is reported
PAIRS = 3


@dataclass(frozen=True)
class Sizes:
    enqueue_single: int
    enqueue_batches: int
    backlog: int
    ceiling: int
    http_ceiling: int
    latency_seconds: float
    peer_backlog: int
    peer_window: float
    long_rows: int
    #: the console's overview is timed on a table this big
    console_rows: int = 10_000_000


FULL = Sizes(enqueue_single=3000, enqueue_batches=300, backlog=100_000, ceiling=50_000,
             http_ceiling=10_000, latency_seconds=30.0, peer_backlog=100_000, peer_window=60.0,
             long_rows=1_000_000)
QUICK = Sizes(enqueue_single=300, enqueue_batches=30, backlog=10_000, ceiling=10_000,
              http_ceiling=2_000, latency_seconds=5.0, peer_backlog=5_000, peer_window=10.0,
              long_rows=50_000, console_rows=500_000)


class Bench:
    def __init__(self, sizes: Sizes, url: str, logs: Path) -> None:
        self.sizes = sizes
        self.url = url
        self.logs = logs
        self.results: dict[str, Any] = {}
        #: sections' details asked for with --only section:detail
        self.only: dict[str, set[str]] = {}

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # -- availability -----------------------------------------------------------------------

    @staticmethod
    def available(transport: str) -> str | None:
        """None when the transport can be benchmarked, else why not."""
        if not module_exists(MODULES[transport]):
            return f"{MODULES[transport]} does not exist yet"
        if transport == "amqp":
            try:
                import pika  # noqa: PLC0415

                pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
            except Exception as exc:
                return f"RabbitMQ unreachable: {type(exc).__name__}"
        if transport == "redis":
            try:
                import redis  # noqa: PLC0415

                redis.Redis.from_url(REDIS_URL).ping()
            except Exception as exc:
                return f"Redis unreachable: {type(exc).__name__}"
        if transport == "mqtt" and not mosquitto_available():
            return "mosquitto is not installed"
        return None

    # -- 1. enqueue cost --------------------------------------------------------------------

    def enqueue(self) -> dict[str, Any]:
        from outbox.producer import enqueue  # noqa: PLC0415

        with connect(self.url) as conn:
            conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
            conn.execute("DROP TABLE IF EXISTS bench.bare")
            conn.execute("CREATE TABLE bench.bare (id bigint GENERATED ALWAYS AS IDENTITY "
                         "PRIMARY KEY, command text NOT NULL, data jsonb NOT NULL)")
        data = sample_data(1)

        def bare(cur: psycopg.Cursor[Any], conn: psycopg.Connection[Any]) -> None:
            cur.execute("INSERT INTO bench.bare (command, data) VALUES (%s, %s)",
                        ("send-sms", Jsonb(data)))

        def outbox_insert(cur: psycopg.Cursor[Any], conn: psycopg.Connection[Any]) -> None:
            cur.execute("INSERT INTO outbox.message (command, data) VALUES (%s, %s)",
                        ("send-sms", Jsonb(data)))

        def outbox_function(cur: psycopg.Cursor[Any], conn: psycopg.Connection[Any]) -> None:
            cur.execute("SELECT outbox.enqueue(%s, %s)", ("send-sms", Jsonb(data)))

        def helper(cur: psycopg.Cursor[Any], conn: psycopg.Connection[Any]) -> None:
            enqueue(cur, "send-sms", data)

        variants: dict[str, Callable[[psycopg.Cursor[Any], psycopg.Connection[Any]], None]] = {
            "plain INSERT into a bare table": bare,
            "INSERT INTO outbox.message": outbox_insert,
            "SELECT outbox.enqueue(...)": outbox_function,
            "outbox.enqueue() (Python helper)": helper,
        }
        result: dict[str, Any] = {}
        # Many short rounds, each running every variant back to back in a rotating order; the
        # ratio reported is the median of the rounds' ratios. A burst of noise from a
        # neighbour then spoils a round, not the figure (a ratio of sums moved by 15 %
        # between runs).
        rounds = 15
        names = list(variants)
        for per_tx, transactions in ((1, self.sizes.enqueue_single),
                                     (100, self.sizes.enqueue_batches)):
            per_round = max(transactions // rounds, 1)
            spent: dict[str, list[float]] = {name: [] for name in names}
            with psycopg.connect(self.url) as conn:
                for round_ in range(rounds):
                    for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                        insert = variants[name]
                        with conn.cursor() as cur:
                            started = time.perf_counter()
                            for _ in range(per_round):
                                for _ in range(per_tx):
                                    insert(cur, conn)
                                conn.commit()
                            spent[name].append(time.perf_counter() - started)
                    if round_ % 5 == 4:
                        progress(f"enqueue {per_tx}/tx: round {round_ + 1}/{rounds}")
            rows = per_round * per_tx
            bare = spent["plain INSERT into a bare table"]
            result[f"{per_tx}_per_tx"] = {
                name: {"rows": rows * rounds,
                       "us_per_row": statistics.median(spent[name]) / rows * 1e6,
                       "rows_per_s": rows / statistics.median(spent[name]),
                       "ratio_to_plain": statistics.median(
                           mine / theirs for mine, theirs in zip(spent[name], bare, strict=True)),
                       "round_ratios": [round(mine / theirs, 3)
                                        for mine, theirs in zip(spent[name], bare, strict=True)]}
                for name in names}
        reset(self.url)
        with connect(self.url) as conn:
            conn.execute("DROP SCHEMA bench CASCADE")
        return result

    def limits(self) -> dict[str, Any]:
        """Receiver limits: the INSERT cost at the door, the drain cost in the relay."""
        from bench.pools import receiver_limit_cost  # noqa: PLC0415

        return receiver_limit_cost(self.url, self.logs)

    # -- 2. throughput --------------------------------------------------------------------

    def drain(self, label: str, transport_url: str, *, processes: int = 1,
              config: RelayConfig = CONFIG, stdout: Path | None = None,
              rows: int | None = None) -> dict[str, Any]:
        """Seed a backlog, drain it with ``outbox run``, return the rate from ``sent_at``."""
        count = rows or self.sizes.backlog
        for attempt in (1, 2):
            reset(self.url)
            seed(self.url, count, label=f"{label}: ")
            progress(f"{label}: draining {count:,} rows ({processes} x outbox run, "
                     f"{config.describe()})")
            try:
                with relays(self.url, transport_url, config, count=processes,
                            log=self.log(label), stdout=stdout) as running:
                    took = wait_until_drained(
                        self.url, count, timeout=600, label=f"{label}: ",
                        alive=lambda: all(relay.alive() for relay in running))
                break
            except RuntimeError:
                # A relay that exits is a failure, but in a tree others are editing it may be
                # a half-written module: one more try, then give up (see the section's log).
                if attempt == 2:
                    raise
                progress(f"{label}: a relay exited (see {self.log(label).name}); once more")
        sent, rate = sent_rate(self.url)
        progress(f"{label}: {sent:,} sent at {rate:,.0f}/s (wall {took:.1f}s)")
        return {"rows": count, "sent": sent, "rate": rate, "wall_seconds": took,
                "processes": processes, "batch_size": config.batch_size,
                "workers": config.workers}

    def paired(self, label: str, ceiling: Callable[[], float], drain: Callable[[], dict[str, Any]],
               ) -> tuple[dict[str, Any], float, list[dict[str, float]]]:
        """Ceiling then relay, ``PAIRS`` times; the pair with the median ratio is reported.

        Each ratio compares two measurements taken a minute apart at most, so a noisy
        neighbour that slows one pair does not decide the figure (single pairs moved by ten
        points between runs).
        """
        pairs: list[tuple[float, dict[str, Any], float]] = []
        for index in range(PAIRS):
            top = ceiling()
            relay = drain()
            pairs.append((relay["rate"] / top, relay, top))
            progress(f"{label}: pair {index + 1}/{PAIRS}: relay {relay['rate']:,.0f}/s, "
                     f"ceiling {top:,.0f}/s, {relay['rate'] / top:.0%}")
        _, relay, top = sorted(pairs, key=lambda pair: pair[0])[len(pairs) // 2]
        return relay, top, [{"relay": r["rate"], "ceiling": c, "ratio": q} for q, r, c in pairs]

    def throughput(self, only: set[str]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for transport in TRANSPORTS:
            if only and transport not in only:
                continue
            missing = self.available(transport)
            if missing:
                progress(f"throughput {transport}: skipped ({missing})")
                result[transport] = {"skipped": missing}
                continue
            try:
                result[transport] = getattr(self, f"throughput_{transport}")()
            except Exception as exc:
                traceback.print_exc()
                result[transport] = {"error": f"{type(exc).__name__}: {exc}"}
        return result

    def throughput_amqp(self) -> dict[str, Any]:
        with amqp_queue(QUEUE) as queue:
            progress("throughput amqp: references (pika BlockingConnection, no confirms / a "
                     "confirm per message)")
            blocking = ceilings.amqp_no_confirm_blocking(queue.name, self.sizes.ceiling)
            confirm_each = ceilings.amqp_confirm_each(queue.name, min(self.sizes.ceiling, 5000))
            progress(f"throughput amqp: BlockingConnection {blocking:,.0f}/s, a confirm each "
                     f"{confirm_each:,.0f}/s")

            def drain() -> dict[str, Any]:
                relay = self.drain("throughput-amqp", amqp_url(queue.name))
                relay["in_queue"] = queue.depth()
                queue.purge()
                return relay

            relay, no_confirm, pairs = self.paired(
                "throughput amqp",
                lambda: ceilings.amqp_no_confirm(queue.name, self.sizes.ceiling), drain)
            with purging(queue):
                defaults = self.drain("throughput-amqp-defaults", amqp_url(queue.name),
                                      config=DEFAULTS)
        return {"relay": relay, "ceiling": no_confirm, "pairs": pairs,
                "ceiling_label": "pika SelectConnection, no confirms",
                "reference": {"pika BlockingConnection, no confirms": blocking,
                              "pika BlockingConnection, a confirm per message": confirm_each,
                              f"outbox run with the defaults ({DEFAULTS.describe()})":
                                  defaults["rate"]},
                "relay_defaults": defaults,
                "ratio": relay["rate"] / no_confirm, "target": 0.5}

    def throughput_redis(self) -> dict[str, Any]:
        channel = f"outbox-bench-{uuid.uuid4().hex[:6]}"
        progress("throughput redis: reference (redis-py PUBLISH one by one)")
        single = ceilings.redis_one_by_one(channel, min(self.sizes.ceiling, 10_000))
        progress(f"throughput redis: one by one {single:,.0f}/s")
        # no subscriber, as in the ceiling: PUBLISH's count is 0, accepted on purpose
        url = f"{REDIS_URL}?topic={channel}&accept_no_subscriber=true"
        relay, pipelined, pairs = self.paired(
            "throughput redis",
            lambda: ceilings.redis_pipelined(channel, self.sizes.ceiling * 2),
            lambda: self.drain("throughput-redis", url))
        return {"relay": relay, "ceiling": pipelined, "pairs": pairs,
                "ceiling_label": "redis-py, PUBLISH pipelined by 100",
                "reference": {"redis-py, PUBLISH one by one": single},
                "ratio": relay["rate"] / pipelined, "target": 0.35}

    def throughput_mqtt(self) -> dict[str, Any]:
        with Mosquitto() as broker:
            topic = "outbox/bench"
            progress("throughput mqtt: reference (paho QoS 1 with loop_start)")
            threaded = ceilings.mqtt_qos(LOOPBACK, broker.port, topic, self.sizes.ceiling // 2,
                                         qos=1, network_thread=True)
            progress(f"throughput mqtt: with loop_start {threaded:,.0f}/s")
            relay, qos1, pairs = self.paired(
                "throughput mqtt",
                lambda: ceilings.mqtt_qos(LOOPBACK, broker.port, topic, self.sizes.ceiling,
                                          qos=1),
                lambda: self.drain("throughput-mqtt", f"{broker.url}?topic={topic}&qos=1"))
        return {"relay": relay, "ceiling": qos1, "pairs": pairs,
                "ceiling_label": "paho QoS 1, every PUBACK, loop in the publishing thread",
                "reference": {"paho QoS 1 with its network thread (loop_start)": threaded},
                "ratio": relay["rate"] / qos1, "target": 0.6}

    def throughput_http(self) -> dict[str, Any]:
        with HttpDevice() as device:
            progress("throughput http: ceiling (httpx, one keep-alive connection, POST by POST)")
            ceiling = ceilings.http_sequential(device.url, self.sizes.http_ceiling)
            progress(f"throughput http: {ceiling:,.0f}/s")
            relay = self.drain("throughput-http", device.url)
        return {"relay": relay, "ceiling": ceiling,
                "ceiling_label": "httpx, sequential POSTs, keep-alive",
                "ratio": relay["rate"] / ceiling, "target": None}

    def throughput_stdout(self) -> dict[str, Any]:
        relay = self.drain("throughput-stdout", "stdout://", stdout=Path(os.devnull))
        return {"relay": relay, "ceiling": None, "ratio": None, "target": None}

    # -- 3. latency -----------------------------------------------------------------------

    def latency(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for transport in ("amqp", "mqtt"):
            missing = self.available(transport)
            if missing:
                progress(f"latency {transport}: skipped ({missing})")
                result[transport] = {"skipped": missing}
                continue
            try:
                if transport == "amqp":
                    with amqp_queue(QUEUE) as queue:
                        result[transport] = self.latency_run(
                            "amqp", amqp_url(queue.name),
                            Subscriber("amqp", AMQP_URL, queue.name))
                else:
                    with Mosquitto() as broker:
                        topic = "outbox/latency"
                        result[transport] = self.latency_run(
                            "mqtt", f"{broker.url}?topic={topic}&qos=1",
                            Subscriber("mqtt", broker.url, topic,
                                       client_id=f"bench-{uuid.uuid4().hex[:8]}"))
            except Exception as exc:
                traceback.print_exc()
                result[transport] = {"error": f"{type(exc).__name__}: {exc}"}
        return result

    def latency_run(self, name: str, transport_url: str, subscriber: Subscriber) -> dict[str, Any]:
        reset(self.url)
        rate = 1000.0
        seconds = self.sizes.latency_seconds
        with subscriber, relays(self.url, transport_url, CONFIG,
                                log=self.log(f"latency-{name}")) as running:
            time.sleep(2.0)  # the relay is connected and idle, waiting for NOTIFY
            progress(f"latency {name}: {rate:,.0f} msg/s for {seconds:.0f}s, one per transaction")
            committed, took = produce_steadily(self.url, rate, seconds,
                                               label=f"latency {name}: ")
            wait_until_drained(self.url, len(committed), timeout=120, label=f"latency {name}: ",
                               alive=running[0].alive)
            time.sleep(1.0)
        ids, arrivals, _ = subscriber.received()
        arrived = dict(zip(ids, arrivals, strict=True))
        latencies = sorted((arrived[i] - t) * 1000 for i, t in committed.items() if i in arrived)
        missing = sum(1 for i in committed if i not in arrived)
        summary = {
            "messages": len(committed), "received": len(latencies), "missing": missing,
            "offered_rate": len(committed) / took,
            "p50_ms": percentile(latencies, 0.50), "p95_ms": percentile(latencies, 0.95),
            "p99_ms": percentile(latencies, 0.99), "max_ms": latencies[-1] if latencies else None,
        }
        progress(f"latency {name}: p50 {summary['p50_ms']:.1f} ms, p95 {summary['p95_ms']:.1f}, "
                 f"p99 {summary['p99_ms']:.1f}, max {summary['max_ms']:.1f}; "
                 f"{missing} missing")
        return summary

    # -- 4. scaling -------------------------------------------------------------------------

    def scaling(self) -> dict[str, Any]:
        missing = self.available("amqp")
        if missing:
            return {"skipped": missing}
        with amqp_queue(QUEUE) as queue, purging(queue):
            one = self.drain("scaling-1", amqp_url(queue.name), processes=1)
            two = self.drain("scaling-2", amqp_url(queue.name), processes=2)
        return {"one": one, "two": two, "ratio": two["rate"] / one["rate"]}

    # -- 5. the peer ------------------------------------------------------------------------

    def peer(self) -> dict[str, Any]:
        missing = self.available("amqp")
        if missing:
            return {"skipped": missing}
        with scratch_database("outbox_bench_peer", migrate=False) as peer_url, \
                amqp_queue(QUEUE) as queue, purging(queue):
            env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
            env.update(OUTBOX_BENCH_PEER_DATABASE_URL=peer_url, OUTBOX_BENCH_PEER_QUEUE=queue.name,
                       PYTHONPATH=str(ROOT))
            procrastinate = [sys.executable, "-m", "procrastinate", "--app=bench.peer.app"]
            subprocess.run([*procrastinate, "schema", "--apply"], env=env, check=True,
                           capture_output=True)
            count = self.sizes.peer_backlog
            progress(f"peer: deferring {count:,} procrastinate jobs")
            subprocess.run([sys.executable, "-c", DEFER_JOBS, str(count)], env=env, check=True,
                           cwd=ROOT)
            window = self.sizes.peer_window
            progress(f"peer: procrastinate worker for {window:.0f}s "
                     "(a pika confirm per job, as a team would write it)")
            with self.log("peer").open("ab") as log:
                worker = subprocess.Popen([*procrastinate, "--log-level", "warning", "worker",
                                           "--concurrency", "1"], env=env, stdout=log,
                                          stderr=log, cwd=ROOT)
                try:
                    time.sleep(3.0)  # start-up, first jobs
                    with connect(peer_url) as conn:
                        first = done_jobs(conn)
                        started = time.monotonic()
                        while time.monotonic() - started < window:
                            time.sleep(min(10.0, window - (time.monotonic() - started)))
                            progress(f"peer: {done_jobs(conn) - first:,} jobs in "
                                     f"{time.monotonic() - started:.0f}s")
                        last = done_jobs(conn)
                        elapsed = time.monotonic() - started
                        failed = conn.execute("SELECT count(*) FROM procrastinate_jobs "
                                              "WHERE status = 'failed'").fetchone()[0]
                finally:
                    worker.terminate()
                    try:
                        worker.wait(30)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait()
        rate = (last - first) / elapsed
        progress(f"peer: procrastinate {rate:,.0f} jobs/s ({failed} failed)")
        return {"backlog": count, "window_seconds": elapsed, "jobs": last - first,
                "rate": rate, "failed": int(failed), "concurrency": 1}

    # -- 6. the long drain ------------------------------------------------------------------

    def console(self) -> dict[str, Any]:
        """The console's overview data on a 10-million-row table (bench/console.py)."""
        from bench import console  # noqa: PLC0415

        return console.run(rows=self.sizes.console_rows)

    def gateway(self) -> dict[str, Any]:
        from bench import gateway  # noqa: PLC0415 - its own module (issue 15)

        return gateway.run(self.url, self.log("gateway"), quick=self.sizes is QUICK)

    def priorities(self) -> dict[str, Any]:
        """Issue 11's rows (bench/priorities.py): an OTP behind a long bulk backlog, the
        drain with priorities and keys against the drain without, the claim's cost, aging."""
        from bench import priorities  # noqa: PLC0415

        parts = self.only.get("priorities") or {"otp", "keys", "explain", "aging"}
        return priorities.run(self.url, self.logs, rows=self.sizes.long_rows,
                              quick=self.sizes.long_rows < FULL.long_rows,
                              parts=frozenset(parts))

    def long(self) -> dict[str, Any]:
        missing = self.available("amqp")
        if missing:
            return {"skipped": missing}
        count = self.sizes.long_rows
        reset(self.url)
        seed(self.url, count, label="long: ")
        before = table_sizes(self.url)
        with amqp_queue(QUEUE) as queue:
            progress(f"long: draining {count:,} rows to RabbitMQ")
            with purging(queue), relays(self.url, amqp_url(queue.name), CONFIG,
                                        log=self.log("long")) as running:
                took = wait_until_drained(self.url, count, timeout=1800, label="long: ",
                                          alive=running[0].alive, every=10.0)
        with connect(self.url) as conn:
            t0, t10, t90, t100 = conn.execute(
                "SELECT extract(epoch FROM min(sent_at)), "
                "extract(epoch FROM percentile_disc(0.1) WITHIN GROUP (ORDER BY sent_at)), "
                "extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY sent_at)), "
                "extract(epoch FROM max(sent_at)) FROM outbox.message WHERE state = 'sent'"
            ).fetchone()
        first = 0.1 * count / max(float(t10 - t0), 1e-9)
        last = 0.1 * count / max(float(t100 - t90), 1e-9)
        after_drain = table_sizes(self.url)
        retention = run_retention(self.url)
        after_retention = table_sizes(self.url)
        progress(f"long: first tenth {first:,.0f}/s, last tenth {last:,.0f}/s; sizes "
                 f"{mb(before['total'])} -> {mb(after_drain['total'])} -> "
                 f"{mb(after_retention['total'])} ({retention['how']})")
        return {"rows": count, "wall_seconds": took, "overall_rate": count / took,
                "first_tenth_rate": first, "last_tenth_rate": last, "ratio": last / first,
                "sizes_before_drain": before, "sizes_after_drain": after_drain,
                "sizes_after_retention": after_retention, "retention": retention}


# --- helpers --------------------------------------------------------------------------------


DEFER_JOBS = """
import sys
from bench.common import sample_body
from bench.peer import app, publish_command
count = int(sys.argv[1])
body = sample_body().decode()
with app.open():
    for first in range(0, count, 5000):
        publish_command.batch_defer(*[{"body": body, "message_id": n + 1}
                                      for n in range(first, min(first + 5000, count))])
"""


def done_jobs(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM procrastinate_jobs "
                            "WHERE status IN ('succeeded', 'failed')").fetchone()[0])


def amqp_url(queue: str) -> str:
    return f"{AMQP_URL}?topic={queue}"


class AmqpQueue:
    """A queue declared with the device's flags, for the relay to publish into."""

    def __init__(self, name: str) -> None:
        import pika  # noqa: PLC0415

        self.name = name
        self._connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self._channel = self._connection.channel()
        self._channel.queue_declare(name, durable=False, exclusive=False, auto_delete=False)
        self._channel.queue_purge(name)
        self._lock = threading.Lock()

    def depth(self) -> int:
        with self._lock:
            return int(self._channel.queue_declare(self.name, passive=True).method.message_count)

    def purge(self) -> None:
        with self._lock:
            self._channel.queue_purge(self.name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.purge()
            self._channel.queue_delete(self.name)
        with contextlib.suppress(Exception):
            self._connection.close()


@contextlib.contextmanager
def amqp_queue(name: str) -> Iterator[AmqpQueue]:
    queue = AmqpQueue(name)
    try:
        yield queue
    finally:
        queue.close()


@contextlib.contextmanager
def purging(queue: AmqpQueue, every: float = 2.0) -> Iterator[None]:
    """Empty the queue every few seconds: millions of messages must not pile up in the broker,
    and a consumer would compete with the relay for the two cores."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                queue.purge()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def produce_steadily(url: str, rate: float, seconds: float, *, label: str,
                     connections: int = 4) -> tuple[dict[int, float], float]:
    """One ``enqueue`` per transaction at ``rate``/s overall, from ``connections`` application
    connections taking turns (one connection cannot commit 1,000 times a second here).

    Returns the commit time of every id and the seconds the production really took.
    """
    from outbox.producer import enqueue  # noqa: PLC0415

    total = int(rate * seconds)
    committed: list[dict[int, float]] = [{} for _ in range(connections)]
    errors: list[BaseException] = []
    started = now() + 0.2

    def produce(lane: int) -> None:
        try:
            with psycopg.connect(url) as conn:
                for n in range(lane, total, connections):
                    delay = started + n / rate - now()
                    if delay > 0:
                        time.sleep(delay)
                    message_id = enqueue(conn, "send-sms", sample_data(n))
                    conn.commit()
                    committed[lane][message_id] = now()
                    if lane == 0 and n and n % int(rate * 10) < connections:
                        progress(f"{label}{n:,}/{total:,} committed")
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=produce, args=(lane,), daemon=True)
               for lane in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    merged = {key: value for lane in committed for key, value in lane.items()}
    return merged, max(merged.values()) - started


def run_retention(url: str) -> dict[str, Any]:
    """``outbox purge`` when it exists (retention 1 s for sent rows); otherwise what it would
    do by hand (DELETE the sent rows), noted as such. A plain VACUUM follows either way."""
    probe = subprocess.run([sys.executable, "-m", "outbox.cli", "purge", "--help"],
                           capture_output=True, text=True, check=False, cwd=ROOT)
    started = time.monotonic()
    if probe.returncode == 0:
        env = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOX_")}
        env.update(DATABASE_URL=url, OUTBOX_SENT_RETENTION="1s", OUTBOX_LOG_LEVEL="warning")
        time.sleep(1.5)  # every row was sent more than the retention ago
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "outbox.cli", "purge"], env=env,
                              capture_output=True, text=True, check=False, cwd=ROOT)
        how = "`outbox purge` (sent retention 1 s), then VACUUM"
        if done.returncode != 0:
            how += f": exit {done.returncode}: {done.stderr.strip()[:200]}"
    else:
        with connect(url) as conn:
            conn.execute("DELETE FROM outbox.message WHERE state = 'sent'")
        how = "DELETE of the sent rows by hand (`outbox purge` does not exist yet), then VACUUM"
    purge_seconds = time.monotonic() - started
    with connect(url) as conn:
        conn.execute("VACUUM outbox.message")
    return {"how": how, "seconds": purge_seconds, "vacuum": "plain VACUUM"}


def mb(size: int) -> str:
    return f"{size / 1048576:,.1f} MB"


# --- the report -------------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}/s"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def table(results: dict[str, Any]) -> list[str]:
    rows = ["| # | measurement | result | against | ratio | target | |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    enq = results.get("enqueue", {})
    for per_tx in ("1_per_tx", "100_per_tx"):
        block = enq.get(per_tx)
        if not block:
            continue
        base = block["plain INSERT into a bare table"]
        label = per_tx.replace("_per_tx", " row/tx" if per_tx == "1_per_tx" else " rows/tx")
        for name, value in block.items():
            if name.startswith("plain"):
                continue
            ratio = value["ratio_to_plain"]
            rows.append(f"| 1 | enqueue, {label}: {name} | {value['us_per_row']:.0f} µs/row | "
                        f"plain INSERT {base['us_per_row']:.0f} µs/row | {ratio:.2f}x | "
                        f"≤ 1.25x | {verdict(ratio <= 1.25)} |")
    for transport, value in results.get("throughput", {}).items():
        if "relay" not in value:
            why = value.get("skipped") or value.get("error")
            rows.append(f"| 2 | relay throughput, {transport} | not run: {why} | | | | |")
            continue
        relay = value["relay"]
        target = value.get("target")
        ratio = value.get("ratio")
        against = (f"{value['ceiling_label']} {fmt_rate(value['ceiling'])}"
                   if value.get("ceiling") else "—")
        rows.append(
            f"| 2 | relay throughput, {transport}, {relay['rows']:,} rows | "
            f"{fmt_rate(relay['rate'])} | {against} | "
            f"{'—' if ratio is None else f'{ratio:.0%}'} | "
            f"{'—' if target is None else f'≥ {target:.0%}'} | "
            f"{verdict(None if target is None or ratio is None else ratio >= target)} |")
        for ref, rate in value.get("reference", {}).items():
            rows.append(f"| 2 | reference: {ref} | {fmt_rate(rate)} | | | | |")
    for transport, value in results.get("latency", {}).items():
        if "p50_ms" not in value:
            why = value.get("skipped") or value.get("error")
            rows.append(f"| 3 | latency, {transport} | not run: {why} | | | | |")
            continue
        ok = value["p50_ms"] < 5 and value["p99_ms"] < 50
        rows.append(
            f"| 3 | commit → subscriber, {transport}, {value['offered_rate']:,.0f} msg/s, "
            f"{value['messages']:,} msgs | p50 {value['p50_ms']:.1f} ms, "
            f"p95 {value['p95_ms']:.1f} ms, p99 {value['p99_ms']:.1f} ms, "
            f"max {value['max_ms']:.1f} ms | {value['missing']} missing | | "
            f"p50 < 5 ms, p99 < 50 ms | {verdict(ok)} |")
    scaling = results.get("scaling", {})
    if "one" in scaling:
        rows.append(f"| 4 | 2 relay processes vs 1, amqp, {scaling['one']['rows']:,} rows | "
                    f"{fmt_rate(scaling['two']['rate'])} | 1 process "
                    f"{fmt_rate(scaling['one']['rate'])} | {scaling['ratio']:.2f}x | | — |")
    peer = results.get("peer", {})
    amqp = results.get("throughput", {}).get("amqp", {}).get("relay")
    if "rate" in peer:
        ours = amqp["rate"] if amqp else None
        peer_rate = peer["rate"]
        rows.append(
            f"| 5 | peer: procrastinate, a confirm per job, {peer['jobs']:,} jobs in "
            f"{peer['window_seconds']:.0f}s of a {peer['backlog']:,} backlog | "
            f"{fmt_rate(peer['rate'])} | outbox amqp {fmt_rate(ours)} | "
            f"{'—' if ours is None else f'outbox {ours / peer_rate:.1f}x'} | | — |")
    long = results.get("long", {})
    if "rows" in long:
        rows.append(
            f"| 6 | long drain, {long['rows']:,} rows, amqp | last tenth "
            f"{fmt_rate(long['last_tenth_rate'])} | first tenth "
            f"{fmt_rate(long['first_tenth_rate'])} | {long['ratio']:.2f}x | | — |")
        b, d, r = (long["sizes_before_drain"], long["sizes_after_drain"],
                   long["sizes_after_retention"])
        rows.append(
            f"| 6 | table + indexes: pending → sent → after retention | "
            f"{mb(b['table'])} + {mb(b['indexes'])} → {mb(d['table'])} + {mb(d['indexes'])} → "
            f"{mb(r['table'])} + {mb(r['indexes'])} | {long['retention']['how']} | | | — |")
    console = results.get("console", {})
    if "overview" in console:
        rows.append(
            f"| 7 | console overview data, {console['rows']:,} rows | "
            f"{console['overview']['median_ms']:,.0f} ms (GET /api/overview "
            f"{console['endpoint']['median_ms']:,.0f} ms) | `outbox status` "
            f"{console['status']['median_ms']:,.0f} ms | {console['overview_to_status']:.2f}x | "
            f"< 1 s | {verdict(console['endpoint']['median_ms'] < 1000)} |")
    if "gateway" in results:
        from bench import gateway  # noqa: PLC0415

        rows.extend(gateway.table_rows(results["gateway"]))
    rows.extend(priority_rows(results.get("priorities", {})))
    return rows


def priority_rows(block: dict[str, Any]) -> list[str]:
    """Issue 11's rows (bench/priorities.py)."""
    rows = []
    for broker in ("amqp", "redis"):
        value = block.get(f"otp_{broker}")
        if not value:
            continue
        if "own_route_p50_ms" not in value or value["own_route_p50_ms"] is None:
            rows.append(f"| 7 | OTP behind a bulk backlog, {broker} | not run: "
                        f"{value.get('error', 'no OTP arrived')} | | | | |")
            continue
        ok = value["own_route_p50_ms"] < 10 and value["own_route_p99_ms"] < 50
        rows.append(
            f"| 7 | OTP committed while {value['bulk_rows']:,} bulk rows drain, {broker}: "
            f"commit → subscriber ({value['otps']} OTPs on their route) | "
            f"p50 {value['own_route_p50_ms']:.1f} ms, p99 {value['own_route_p99_ms']:.1f} ms | "
            f"{value['backlog_when_the_last_otp_came']:,} bulk rows still pending after the "
            f"last | | p50 < 10 ms, p99 < 50 ms | {verdict(ok)} |")
        rows.append(
            f"| 7 | the same, OTPs on the bulk route itself: commit → claimed | "
            f"p50 {value['same_route_to_claim_p50_ms']:.1f} ms, "
            f"p99 {value['same_route_to_claim_p99_ms']:.1f} ms | | | | — |")
    keys = block.get("drain_keys")
    if keys and "ratio" in keys:
        rows.append(
            f"| 7 | drain with priorities and 10% of rows keyed, redis, {keys['rows']:,} rows | "
            f"{fmt_rate(keys['keyed'])} | the same rows without them {fmt_rate(keys['plain'])} | "
            f"{keys['ratio']:.2f}x | ≥ 0.95x | {verdict(keys['ratio'] >= 0.95)} |")
    explain = block.get("explain")
    if explain and "locked" in explain:
        for mode in ("locked", "leased"):
            value = explain[mode]
            rows.append(
                f"| 7 | claim of {value['limit']:,} ({mode}) from {explain['rows']:,} pending "
                f"rows, 10% keyed: EXPLAIN ANALYZE | {value['execution_ms']:.1f} ms, "
                f"{value['buffers']:,} buffers | | | | — |")
    aging = block.get("aging")
    if aging and aging.get("max_wait_seconds") is not None:
        rows.append(
            f"| 7 | aging: the oldest of 100 bulk rows (priority 5) under urgent rows at the "
            f"relay's full rate (~{aging['relay_rate']:,.0f}/s), aging "
            f"{aging['aging_seconds_per_level']:.0f}s per level | waited at most "
            f"{aging['max_wait_seconds']:.1f}s | bound: 5 levels x aging = "
            f"{aging['bound_seconds']:.0f}s plus the urgent backlog ahead | | | — |")
    return rows


def write_report(results: dict[str, Any], path: Path) -> None:
    info = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Run on {results['date']} with `{results['command']}` "
        f"({results['seconds'] / 60:.1f} minutes).",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), shared and noisy; Python "
        f"{info['python']}, PostgreSQL {info['postgres']}, RabbitMQ {info['rabbitmq']}, "
        f"Redis {info['redis']}, Mosquitto {info.get('mosquitto', '?')}; every service and "
        f"client on loopback. Libraries: {info['libraries']}.",
        "",
        f"Relay as benchmarked: real `outbox run` processes with {CONFIG.describe()}. "
        "Rates are rows over the span of their `sent_at` (server clock). Absolute figures "
        "drift by 30 % between runs on this machine: compare within one run.",
        "",
        *table(results),
        "",
        "Notes:",
        "- Ceilings publish the same ~300-byte bytes with the same library and no database; "
        "they are measured in the same run. For RabbitMQ, Redis and MQTT the ceiling and "
        "the relay's drain run as three ceiling-then-drain pairs, and the pair with the "
        "median ratio is shown (all three are in `bench/results/latest.json`). RabbitMQ: pika "
        "`SelectConnection`, 1,000 messages per turn of its I/O loop, then one synchronous "
        "call (the fastest pika publishes; `BlockingConnection` flushes after every message). "
        "MQTT: paho's loop driven by the publishing thread (`loop_start` shown for reference). "
        "HTTP: one connection, where the relay's two workers hold one each.",
        "- The relay rows use the tuned settings above; RabbitMQ also gets a row with the "
        "defaults. Chaos verdicts (`make chaos`) are in `bench/results/chaos.json`.",
        "- Throughput and long-drain runs have no subscriber: RabbitMQ's queue is purged every "
        "2 s, Redis PUBLISH replies 0 (accepted with `accept_no_subscriber=true`), the MQTT "
        "broker is a private Mosquitto with no subscriber. The latency section uses real "
        "subscribers in their own processes.",
        "- Latency: one `outbox.enqueue()` per transaction at a steady rate; from the moment the "
        "application's COMMIT returns to the subscriber's arrival time (one monotonic clock "
        "shared by the processes).",
        "- Enqueue: 15 rounds, each running every variant back to back (the same number of "
        "rows, the order rotating); a ratio is the median of the rounds' ratios, a time the "
        "median round's. The bare table has an identity primary key, `command text`, "
        "`data jsonb`, nothing else.",
        "",
    ]
    path.write_text("\n".join(lines))


# --- main ---------------------------------------------------------------------------------------


def parse_only(value: str | None) -> dict[str, set[str]]:
    if not value:
        return {}
    chosen: dict[str, set[str]] = {}
    for item in value.split(","):
        section, _, detail = item.strip().partition(":")
        if section not in SECTIONS:
            raise SystemExit(f"unknown section {section!r} (expected one of: {', '.join(SECTIONS)})")
        chosen.setdefault(section, set())
        if detail:
            chosen[section].add(detail)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--rows", type=int,
                        help="rows per throughput and scaling drain (default 100,000; "
                             "10,000 with --quick)")
    args = parser.parse_args(argv)
    only = parse_only(args.only)
    sizes = QUICK if args.quick else FULL
    if args.rows:
        sizes = dataclasses.replace(sizes, backlog=args.rows)
    command = "python -m bench.run" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "") + (f" --rows {args.rows}" if args.rows else "")
    started = time.monotonic()
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "quick": args.quick, "config": vars(CONFIG) | {},
        "machine": machine(),
    }
    progress(f"bench: {'quick' if args.quick else 'full'} run; machine "
             f"{results['machine']['cores']} cores, {results['machine']['cpu']}")
    with scratch_database() as url:
        bench = Bench(sizes, url, logs)
        bench.only = only
        for section in SECTIONS:
            if only and section not in only:
                continue
            progress(f"== {section}")
            try:
                if section == "throughput":
                    results[section] = bench.throughput(only.get(section, set()))
                else:
                    results[section] = getattr(bench, section)()
            except Exception as exc:
                traceback.print_exc()
                results[section] = {"error": f"{type(exc).__name__}: {exc}"}
    results["seconds"] = time.monotonic() - started
    # latest.json is the full run BENCHMARKS.md was written from; smoke and partial runs
    # keep their own file
    name = ("latest-quick.json" if args.quick else
            "latest-only.json" if only or args.rows else "latest.json")
    write_json(RESULTS / name, results)
    progress(f"bench: done in {results['seconds'] / 60:.1f} min; results in "
             f"{(RESULTS / name).relative_to(ROOT)}")
    print("\n".join(table(results)))
    if not args.quick and not only and not args.rows and not args.no_report:
        write_report(results, ROOT / "BENCHMARKS.md")
        progress("bench: BENCHMARKS.md written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
