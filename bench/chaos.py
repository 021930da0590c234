"""``make chaos``: break things on purpose and count, at a real subscriber, what got through.

    python -m bench.chaos [--quick] [--only SCENARIO[,SCENARIO...]] [--seed N]

Scenarios (issue 7): ``sigkill``, ``rabbitmq-restart``, ``mqtt-restart``, ``postgres-restart``,
``poison``, ``long-transaction``, ``bad-input``; (issue 10, :mod:`bench.claims`):
``frozen-relay``, ``partitioned-relay``, ``slow-device``. Each ends in one ``VERDICT`` line. What was
enqueued is read back from ``outbox.message`` itself (every committed row, whatever the
application saw of its commit); what was delivered is what a subscriber in its own process
received, by message id.

Stopping RabbitMQ and restarting Postgres disturb everything else on this machine that uses
them: they are restored in ``finally`` blocks and on SIGTERM/SIGINT, but do not run this while
someone else's tests depend on those services.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from bench import claims
from bench.common import (
    AMQP_URL,
    RESULTS,
    TEXT,
    HttpDevice,
    Mosquitto,
    RelayConfig,
    RelayProcess,
    Subscriber,
    connect,
    dead_tuples,
    mosquitto_available,
    now,
    port_open,
    progress,
    reset,
    sample_data,
    scratch_database,
    seed,
    wait_for_port,
    wait_until_drained,
    write_json,
)

SCENARIOS = ("sigkill", "rabbitmq-restart", "mqtt-restart", "postgres-restart", "poison",
             "long-transaction", "bad-input", "frozen-relay", "partitioned-relay", "slow-device",
             "pool-failover", "rate-limit")
#: one worker: a SIGKILL can then cost at most the one batch in flight
CHAOS = RelayConfig(batch_size=500, workers=1)
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


@dataclass(frozen=True)
class Sizes:
    kill_rows: int
    kills: int
    kill_interval: tuple[float, float]
    outage: float
    poison_rows: int
    hold_before: float
    hold: float
    hold_after: float
    examples: int
    #: rows of the bounded-claim scenarios, and how long they freeze, cut and watch
    claim_rows: int = 300
    freeze: float = 60.0
    slow_rows: int = 500
    watch: float = 60.0


FULL = Sizes(kill_rows=50_000, kills=20, kill_interval=(0.5, 2.0), outage=60.0,
             poison_rows=20_000, hold_before=60.0, hold=600.0, hold_after=60.0, examples=1000)
QUICK = Sizes(kill_rows=5_000, kills=5, kill_interval=(0.2, 0.6), outage=10.0,
              poison_rows=3_000, hold_before=15.0, hold=30.0, hold_after=15.0, examples=150,
              claim_rows=100, freeze=20.0, slow_rows=60, watch=15.0)


@dataclass
class Verdict:
    scenario: str
    passed: bool | None  # None: not run
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def line(self) -> str:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"VERDICT {self.scenario}: {word} | {self.summary}"


# --- what was enqueued, what arrived -----------------------------------------------------------


@dataclass
class Delivery:
    enqueued: int
    received_unique: int
    received_total: int
    lost: list[int]
    duplicates: int
    states: dict[str, int]

    def brief(self) -> str:
        return (f"enqueued={self.enqueued} received={self.received_unique} "
                f"lost={len(self.lost)} duplicates={self.duplicates} states={self.states}")


def tally(url: str, received: list[int], *, expect_sent_only: bool = True) -> Delivery:
    with connect(url) as conn:
        rows = conn.execute("SELECT id, state FROM outbox.message").fetchall()
    should_arrive = {i for i, state in rows if state == "sent" or expect_sent_only}
    seen = set(received)
    return Delivery(enqueued=len(rows), received_unique=len(seen & {i for i, _ in rows}),
                    received_total=len(received), lost=sorted(should_arrive - seen),
                    duplicates=len(received) - len(seen),
                    states=dict(Counter(state for _, state in rows)))


class SteadyProducer(threading.Thread):
    """An application committing ``per_tx`` rows per transaction at ``rate`` rows/s.

    It survives the database going away (reconnects, carries on); what it believes it
    committed does not matter: the table is the record of what was enqueued.
    """

    def __init__(self, url: str, rate: float, *, total: int | None = None, per_tx: int = 1,
                 text: Callable[[int], str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.rate = rate
        self.total = total
        self.per_tx = per_tx
        self.text = text
        self.stop_event = threading.Event()
        self.committed = 0
        self.errors = 0

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def run(self) -> None:
        from outbox.producer import enqueue  # noqa: PLC0415

        started = now()
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self.stop_event.is_set() and (self.total is None or n < self.total):
            due = started + n / self.rate
            delay = due - now()
            if delay > 0:
                self.stop_event.wait(delay)
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, connect_timeout=3)
                for k in range(self.per_tx):
                    data = sample_data(n + k)
                    if self.text is not None:
                        data["message"] = self.text(n + k)
                    enqueue(conn, "send-sms", data)
                conn.commit()
                self.committed += self.per_tx
                n += self.per_tx
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self.stop_event.wait(0.2)
        if conn is not None:
            conn.close()


def wait_for_progress(url: str, timeout: float) -> None:
    """Until the relay marks another row sent (it is up and publishing)."""
    with connect(url) as conn:
        def sent() -> int:
            return int(conn.execute(
                "SELECT count(*) FROM outbox.message WHERE state = 'sent'").fetchone()[0])
        first = sent()
        deadline = time.monotonic() + timeout
        while sent() == first and time.monotonic() < deadline:
            time.sleep(0.02)


def wait_all_received(subscriber: Subscriber, url: str, timeout: float) -> None:
    with connect(url) as conn:
        sent = int(conn.execute(
            "SELECT count(*) FROM outbox.message WHERE state = 'sent'").fetchone()[0])
    if not subscriber.wait_for(sent, timeout):
        progress(f"subscriber has {subscriber.distinct():,} of {sent:,} sent rows after "
                 f"{timeout:.0f}s")


# --- services we break on purpose ------------------------------------------------------------


def rabbitmqctl() -> str | None:
    return shutil.which("rabbitmqctl", path=SBIN)


def rabbitmq_up() -> bool:
    import pika  # noqa: PLC0415

    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception:
        return False
    return True


def start_rabbitmq() -> None:
    """``rabbitmqctl start_app`` until the broker answers again (idempotent)."""
    ctl = rabbitmqctl()
    if ctl is None:
        return
    for _ in range(3):
        subprocess.run([ctl, "start_app"], capture_output=True, timeout=120, check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if rabbitmq_up():
                return
            time.sleep(0.5)
    progress("WARNING: RabbitMQ did not come back after start_app")


def postgres_cluster() -> tuple[str, str] | None:
    """(pg_ctlcluster, version) of the local Debian-style cluster, if this is one."""
    ctl = shutil.which("pg_ctlcluster", path=SBIN)
    config = Path("/etc/postgresql")
    if ctl is None or not config.is_dir():
        return None
    versions = sorted((p.name for p in config.iterdir() if p.is_dir()),
                      key=lambda v: [int(x) for x in v.split(".") if x.isdigit()])
    return (ctl, versions[-1]) if versions else None


def postgres_port() -> int:
    from urllib.parse import urlsplit  # noqa: PLC0415

    from bench.common import ADMIN_URL  # noqa: PLC0415

    return urlsplit(ADMIN_URL).port or 5432


def ensure_postgres() -> None:
    cluster = postgres_cluster()
    if cluster is None or port_open(postgres_port()):
        return
    ctl, version = cluster
    subprocess.run([ctl, "--skip-systemctl-redirect", version, "main", "start"],
                   capture_output=True, timeout=120, check=False)
    wait_for_port(postgres_port(), 60)


def restore_services() -> None:
    """Put back what a scenario may have stopped (called from finally blocks and signals)."""
    with contextlib.suppress(Exception):
        if rabbitmqctl() is not None and not rabbitmq_up():
            start_rabbitmq()
    with contextlib.suppress(Exception):
        ensure_postgres()


def amqp_declare(queue: str, *, durable: bool = False) -> None:
    import pika  # noqa: PLC0415

    from bench.subscriber import DURABLE_QUEUE  # noqa: PLC0415

    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        if durable:
            channel.queue_declare(queue, durable=True, arguments=DURABLE_QUEUE)
        else:
            channel.queue_declare(queue, durable=False, exclusive=False, auto_delete=False)
        channel.queue_purge(queue)
    finally:
        connection.close()


def amqp_delete(queue: str) -> None:
    import pika  # noqa: PLC0415

    with contextlib.suppress(Exception):
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()


@contextlib.contextmanager
def amqp_subscriber(*, durable: bool = False, **kwargs: Any) -> Iterator[tuple[str, Subscriber]]:
    """A fresh queue (the device's flags, or a quorum queue when ``durable``) with a real
    subscriber consuming it."""
    queue = f"outbox-chaos-{uuid.uuid4().hex[:6]}"
    amqp_declare(queue, durable=durable)
    subscriber = Subscriber("amqp", AMQP_URL, queue, durable=durable, **kwargs)
    try:
        with subscriber:
            yield queue, subscriber
    finally:
        amqp_delete(queue)


def amqp_transport(queue: str) -> str:
    return f"{AMQP_URL}?topic={queue}"


# --- the scenarios -------------------------------------------------------------------------------


class Chaos:
    def __init__(self, sizes: Sizes, url: str, logs: Path, rng: random.Random) -> None:
        self.sizes = sizes
        self.url = url
        self.logs = logs
        self.rng = rng

    def relay(self, transport: str, name: str, config: RelayConfig = CHAOS,
              **extra: str) -> RelayProcess:
        return RelayProcess(self.url, transport, config, log=self.logs / f"chaos-{name}.log",
                            **extra)

    # -- failover pools and rate limits (bench.pools) ---------------------------------------

    def pool_failover(self) -> Verdict:
        from bench.pools import pool_failover  # noqa: PLC0415

        return pool_failover(self.url, self.logs, Verdict)  # type: ignore[no-any-return]

    def rate_limit(self) -> Verdict:
        from bench.pools import rate_limit  # noqa: PLC0415

        return rate_limit(self.url, self.logs, Verdict)  # type: ignore[no-any-return]

    # -- SIGKILL ----------------------------------------------------------------------------

    def sigkill(self) -> Verdict:
        reset(self.url)
        total, kills = self.sizes.kill_rows, self.sizes.kills
        low, high = self.sizes.kill_interval
        rate = 1000.0
        progress(f"sigkill: {total:,} rows at {rate:,.0f}/s (10 per transaction), outbox run "
                 f"SIGKILLed {kills} times every {low}-{high}s and restarted at once")
        kill_times: list[float] = []
        with amqp_subscriber() as (queue, subscriber):
            relay = self.relay(amqp_transport(queue), "sigkill").start()
            producer = SteadyProducer(self.url, rate, total=total, per_tx=10)
            producer.start()
            try:
                for k in range(kills):
                    # let the backlog of the restart build up, then kill while the relay is
                    # draining it: in the middle of a batch, not while it idles or boots
                    time.sleep(self.rng.uniform(low, high))
                    wait_for_progress(self.url, timeout=30)
                    time.sleep(self.rng.uniform(0.0, 0.15))
                    relay.kill()
                    kill_times.append(now())
                    relay = self.relay(amqp_transport(queue), "sigkill").start()
                    if (k + 1) % 5 == 0:
                        progress(f"sigkill: {k + 1}/{kills} kills, "
                                 f"{producer.committed:,} rows committed")
                producer.join()
                wait_until_drained(self.url, total, timeout=300, label="sigkill: ",
                                   alive=relay.alive)
                wait_all_received(subscriber, self.url, 60)
            finally:
                producer.stop()
                relay.stop()
        ids, times, _ = subscriber.received()
        delivery = tally(self.url, ids)
        per_kill = duplicates_per_kill(ids, times, kill_times)
        worst = max(per_kill, default=0)
        passed = not delivery.lost and worst <= CHAOS.batch_size and delivery.enqueued == total
        summary = (f"{delivery.brief()} kills={len(kill_times)} duplicates per kill: "
                   f"mean {sum(per_kill) / max(len(per_kill), 1):.1f}, max {worst} "
                   f"(bound: one batch = {CHAOS.batch_size})")
        return Verdict("sigkill", passed, summary,
                       {"delivery": vars(delivery) | {"lost": delivery.lost[:20]},
                        "duplicates_per_kill": per_kill, "batch_size": CHAOS.batch_size})

    # -- brokers stopped for a minute --------------------------------------------------------

    def rabbitmq_restart(self) -> Verdict:
        ctl = rabbitmqctl()
        if ctl is None:
            return Verdict("rabbitmq-restart", None, "rabbitmqctl is not installed")
        reset(self.url)
        outage = self.sizes.outage
        # The device's queue is non-durable and consumed with auto-ack: stopping the broker
        # loses whatever sat in it at that moment, whoever published it. The subscriber here
        # uses a quorum queue and manual acks, so that what it misses is the relay's doing.
        with amqp_subscriber(durable=True) as (queue, subscriber):
            relay = self.relay(amqp_transport(queue), "rabbitmq-restart").start()
            producer = SteadyProducer(self.url, 200.0)
            producer.start()
            try:
                time.sleep(10.0 if outage >= 60 else 3.0)
                progress(f"rabbitmq-restart: rabbitmqctl stop_app for {outage:.0f}s "
                         f"({producer.committed:,} rows so far)")
                subprocess.run([ctl, "stop_app"], capture_output=True, timeout=120, check=True)
                time.sleep(outage)
            finally:
                start_rabbitmq()
            back = time.monotonic()
            progress("rabbitmq-restart: RabbitMQ is back; producing 5 s more")
            try:
                time.sleep(5.0)
                producer.stop()
                drained = wait_until_drained(self.url, producer.committed, timeout=600,
                                             label="rabbitmq-restart: ",
                                             alive=relay.alive) + 5.0
                wait_all_received(subscriber, self.url, 120)
                everything = time.monotonic() - back
                alive = relay.alive()
            finally:
                producer.stop()
                relay.stop()
        return self._broker_verdict("rabbitmq-restart", subscriber, drained, everything, alive,
                                    producer)

    def mqtt_restart(self) -> Verdict:
        if not mosquitto_available():
            return Verdict("mqtt-restart", None, "mosquitto is not installed")
        reset(self.url)
        outage = self.sizes.outage
        topic = "outbox/chaos"
        with Mosquitto() as broker:
            subscriber = Subscriber("mqtt", broker.url, topic,
                                    client_id=f"chaos-{uuid.uuid4().hex[:8]}")
            with subscriber:
                relay = self.relay(f"{broker.url}?topic={topic}&qos=1", "mqtt-restart").start()
                producer = SteadyProducer(self.url, 200.0)
                producer.start()
                try:
                    time.sleep(10.0 if outage >= 60 else 3.0)
                    progress(f"mqtt-restart: our mosquitto stopped for {outage:.0f}s "
                             f"({producer.committed:,} rows so far)")
                    broker.stop()
                    time.sleep(outage)
                    broker.start()
                    back = time.monotonic()
                    progress("mqtt-restart: mosquitto is back; producing 5 s more")
                    time.sleep(5.0)
                    producer.stop()
                    drained = wait_until_drained(self.url, producer.committed, timeout=600,
                                                 label="mqtt-restart: ",
                                                 alive=relay.alive) + 5.0
                    wait_all_received(subscriber, self.url, 120)
                    everything = time.monotonic() - back
                    alive = relay.alive()
                finally:
                    producer.stop()
                    relay.stop()
        return self._broker_verdict("mqtt-restart", subscriber, drained, everything, alive,
                                    producer)

    def _broker_verdict(self, name: str, subscriber: Subscriber, drained: float,
                        everything: float, alive: bool, producer: SteadyProducer) -> Verdict:
        ids, _, _ = subscriber.received()
        delivery = tally(self.url, ids)
        with connect(self.url) as conn:
            retried, max_attempts = conn.execute(
                "SELECT count(*) FILTER (WHERE attempts > 1), max(attempts) "
                "FROM outbox.message").fetchone()
        passed = not delivery.lost and alive and delivery.states.get("pending", 0) == 0
        summary = (f"{delivery.brief()} outage={self.sizes.outage:.0f}s; after the broker was "
                   f"back: every row sent in {drained:.1f}s, all at the subscriber in "
                   f"{everything:.1f}s; rows retried={retried} (max attempts {max_attempts}); "
                   f"relay {'still running' if alive else 'EXITED'}")
        return Verdict(name, passed, summary,
                       {"delivery": vars(delivery) | {"lost": delivery.lost[:20]},
                        "drain_seconds_after_back": drained,
                        "all_received_seconds_after_back": everything,
                        "rows_retried": retried, "max_attempts": max_attempts,
                        "producer_errors": producer.errors})

    # -- Postgres restarted -------------------------------------------------------------------

    def postgres_restart(self) -> Verdict:
        cluster = postgres_cluster()
        if cluster is None:
            return Verdict("postgres-restart", None, "no pg_ctlcluster cluster to restart")
        ctl, version = cluster
        reset(self.url)
        with amqp_subscriber() as (queue, subscriber):
            relay = self.relay(amqp_transport(queue), "postgres-restart").start()
            producer = SteadyProducer(self.url, 200.0)
            producer.start()
            try:
                time.sleep(5.0)
                progress(f"postgres-restart: pg_ctlcluster {version} main restart "
                         f"({producer.committed:,} rows so far)")
                restart = subprocess.run(
                    [ctl, "--skip-systemctl-redirect", version, "main", "restart"],
                    capture_output=True, text=True, timeout=180, check=False)
                if restart.returncode != 0:
                    progress(f"postgres-restart: restart exited {restart.returncode}: "
                             f"{restart.stderr.strip()[:200]}")
            finally:
                ensure_postgres()
            try:
                wait_for_port(postgres_port(), 60)
                time.sleep(5.0)
                producer.stop()
                wait_until_drained(self.url, producer.committed, timeout=300,
                                   label="postgres-restart: ", alive=relay.alive)
                wait_all_received(subscriber, self.url, 60)
                alive = relay.alive()
            finally:
                producer.stop()
                relay.stop()
        with connect(self.url) as conn:
            reconnect = conn.execute(
                "SELECT extract(epoch FROM min(sent_at) - pg_postmaster_start_time())::float8 "
                "FROM outbox.message WHERE sent_at > pg_postmaster_start_time()").fetchone()[0]
        ids, _, _ = subscriber.received()
        delivery = tally(self.url, ids)
        passed = (not delivery.lost and alive and restart.returncode == 0
                  and delivery.states.get("pending", 0) == 0)
        when = "no row sent after it" if reconnect is None else f"{reconnect:.1f}s"
        summary = (f"{delivery.brief()}; first row sent after the restart: {when} after "
                   f"Postgres started; relay {'reconnected by itself' if alive else 'EXITED'}; "
                   f"application commits that failed during the restart: {producer.errors}")
        return Verdict("postgres-restart", passed, summary,
                       {"delivery": vars(delivery) | {"lost": delivery.lost[:20]},
                        "first_send_after_start_seconds": reconnect,
                        "producer_errors": producer.errors})

    # -- poison rows ---------------------------------------------------------------------------

    def poison(self) -> Verdict:
        rows = self.sizes.poison_rows
        clean = rows - rows // 10
        progress(f"poison: baseline, {clean:,} clean rows to a local REST device")
        with HttpDevice() as device:
            reset(self.url)
            seed(self.url, clean)
            with self.relay(device.url, "poison-baseline") as relay:
                wait_until_drained(self.url, clean, timeout=600, label="poison baseline: ",
                                   alive=relay.alive)
            baseline = clean_rate(self.url)
        progress(f"poison: {rows:,} rows, one in ten refused by the device "
                 "(half with {}, half with HTTP 400)")
        with HttpDevice(record=True) as device:
            reset(self.url)
            with connect(self.url) as conn:
                conn.execute(POISON_SEED, {"text": TEXT, "last": rows})
            with self.relay(device.url, "poison") as relay:
                wait_until_drained(self.url, rows, timeout=600, label="poison: ",
                                   alive=relay.alive)
            mixed = clean_rate(self.url)
        received = device.received()
        with connect(self.url) as conn:
            poison_states = dict(conn.execute(
                "SELECT state || CASE WHEN coalesce(last_error, '') = '' THEN ' (no reason)' "
                "ELSE '' END, count(*) FROM outbox.message "
                "WHERE data->>'message' LIKE '%%POISON%%' GROUP BY 1").fetchall())
            reasons = [r[0] for r in conn.execute(
                "SELECT DISTINCT last_error FROM outbox.message "
                "WHERE data->>'message' LIKE '%%POISON%%' LIMIT 5").fetchall()]
            clean_ids = [r[0] for r in conn.execute(
                "SELECT id FROM outbox.message WHERE data->>'message' NOT LIKE '%%POISON%%'")]
        seen = set(received)
        lost = [i for i in clean_ids if i not in seen]
        ratio = mixed / baseline if baseline else 0.0
        poison_ok = poison_states == {"failed": rows // 10}
        passed = poison_ok and not lost and ratio >= 0.75
        summary = (f"poison rows {rows // 10}: {poison_states}; reasons {reasons}; clean rows "
                   f"{len(clean_ids)}: lost={len(lost)} duplicates={len(received) - len(seen)}; "
                   f"clean rate with poison {mixed:,.0f}/s vs without {baseline:,.0f}/s "
                   f"({ratio:.0%}; full speed means >= 75 % on this noisy machine)")
        return Verdict("poison", passed, summary,
                       {"poison_states": poison_states, "reasons": reasons, "lost": lost[:20],
                        "rate_with_poison": mixed, "rate_without": baseline})

    # -- a long-open transaction -----------------------------------------------------------

    def long_transaction(self) -> Verdict:
        reset(self.url)
        phases = (("before", self.sizes.hold_before), ("during", self.sizes.hold),
                  ("after", self.sizes.hold_after))
        measured: dict[str, dict[str, Any]] = {}
        holder: psycopg.Connection[Any] | None = None
        with amqp_subscriber(settle=2.0) as (queue, subscriber):
            relay = self.relay(amqp_transport(queue), "long-transaction").start()
            time.sleep(3.0)  # the relay is up: its start-up is not a phase's lag
            producer = SteadyProducer(self.url, 1000.0, per_tx=10)
            producer.start()
            try:
                for name, seconds in phases:
                    if name == "during":
                        holder = psycopg.connect(self.url)
                        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        holder.execute("SELECT count(*) FROM outbox.message")  # the snapshot
                        progress(f"long-transaction: a REPEATABLE READ snapshot held open "
                                 f"for {seconds:.0f}s")
                    elif name == "after" and holder is not None:
                        holder.rollback()
                        holder.close()
                        holder = None
                        progress("long-transaction: snapshot released")
                    measured[name] = self._phase(name, seconds)
                producer.stop()
                wait_until_drained(self.url, producer.committed, timeout=600,
                                   label="long-transaction: ", alive=relay.alive)
                wait_all_received(subscriber, self.url, 120)
            finally:
                if holder is not None:
                    holder.close()
                producer.stop()
                relay.stop()
        ids, _, _ = subscriber.received()
        delivery = tally(self.url, ids)
        parts = []
        for name, m in measured.items():
            parts.append(f"{name}: {m['sent_rate']:,.0f}/s sent of {m['offered_rate']:,.0f}/s "
                         f"offered, lag p50 {m['lag_p50_ms']:.0f} ms p99 {m['lag_p99_ms']:.0f} ms, "
                         f"dead tuples {m['dead_tuples']:,}, claim {m['claim_ms']:.1f} ms / "
                         f"{m['claim_buffers']:,} buffers, pending {m['pending']:,}")
        passed = not delivery.lost and delivery.states.get("pending", 0) == 0
        summary = f"{delivery.brief()}; " + "; ".join(parts)
        return Verdict("long-transaction", passed, summary,
                       {"phases": measured, "delivery": vars(delivery) | {"lost": delivery.lost[:20]}})

    def _phase(self, name: str, seconds: float) -> dict[str, Any]:
        with connect(self.url) as conn:
            started = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            created_before = conn.execute("SELECT count(*) FROM outbox.message").fetchone()[0]
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(min(30.0, max(deadline - time.monotonic(), 0)))
                progress(f"long-transaction {name}: {time.monotonic() - deadline + seconds:.0f}"
                         f"/{seconds:.0f}s, dead tuples {dead_tuples(self.url):,}")
            ended = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            created, sent, p50, p99 = conn.execute(
                "SELECT (SELECT count(*) FROM outbox.message WHERE created_at >= %(a)s "
                "        AND created_at < %(b)s), "
                "count(*), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY sent_at - created_at), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY sent_at - created_at) "
                "FROM outbox.message WHERE sent_at >= %(a)s AND sent_at < %(b)s",
                {"a": started, "b": ended}).fetchone()
            claim_ms, claim_buffers = explain_claim(conn)
            pending = conn.execute(
                "SELECT count(*) FROM outbox.message WHERE state = 'pending'").fetchone()[0]
        span = (ended - started).total_seconds()
        result = {
            "seconds": span, "offered_rate": created / span, "sent_rate": sent / span,
            "lag_p50_ms": p50.total_seconds() * 1000 if p50 else 0.0,
            "lag_p99_ms": p99.total_seconds() * 1000 if p99 else 0.0,
            "dead_tuples": dead_tuples(self.url), "claim_ms": claim_ms,
            "claim_buffers": claim_buffers, "pending": int(pending),
            "rows_so_far": int(created_before),
        }
        progress(f"long-transaction {name}: {result['sent_rate']:,.0f}/s sent, lag p99 "
                 f"{result['lag_p99_ms']:.0f} ms, dead tuples {result['dead_tuples']:,}, claim "
                 f"{claim_ms:.1f} ms over {claim_buffers:,} buffers")
        return result

    # -- property-based bad input ----------------------------------------------------------

    def bad_input(self) -> Verdict:
        from bench import badinput  # noqa: PLC0415

        reset(self.url)
        progress(f"bad-input: {self.sizes.examples} hypothesis examples through INSERT and "
                 "through outbox.enqueue()")
        cases = badinput.explore(self.url, self.sizes.examples)
        # Whole rows too (issue 13): arbitrary column values and jsonb, operator UPDATEs.
        progress(f"bad-input: {self.sizes.examples} generated rows through plain SQL")
        _, row_outcomes = badinput.explore_rows(self.url, self.sizes.examples)
        with amqp_subscriber() as (queue, subscriber):
            with self.relay(amqp_transport(queue), "bad-input",
                            OUTBOX_OTP_SECRET=uuid.uuid4().hex + uuid.uuid4().hex) as relay:
                # rows an application scheduled for later stay pending: not stuck
                left = badinput.wait_until_ended(self.url, 120, relay.alive)
                stuck = len(left)
                relay_alive = relay.alive()
                if left:
                    progress(f"bad-input: unfinished rows {left[:5]}")
            wait_all_received(subscriber, self.url, 30)
        ids, _, _ = subscriber.received()
        delivery = tally(self.url, ids, expect_sent_only=False)
        with connect(self.url) as conn:
            unexplained = int(conn.execute(
                "SELECT count(*) FROM outbox.message WHERE state IN ('failed', 'expired') "
                "AND coalesce(last_error, '') = ''").fetchone()[0])
            endings = dict(conn.execute(
                "SELECT state || ': ' || left(coalesce(last_error, ''), 60), count(*) "
                "FROM outbox.message WHERE state <> 'sent' GROUP BY 1").fetchall())
        summary_cases = badinput.summarise(cases)
        other = summary_cases["refused_without_a_name"]
        passed = (not other and not stuck and not unexplained and not delivery.lost
                  and relay_alive)
        summary = (f"{len(cases)} cases x 2 paths: {summary_cases['counts']}; rows ended "
                   f"{delivery.states} ({unexplained} failed/expired without a reason, "
                   f"{stuck} still pending); sent rows lost at the subscriber={len(delivery.lost)}"
                   f"; SQL and helper name a refusal differently in "
                   f"{summary_cases['disagreements'] - summary_cases['accepted_by_one_path_only']}"
                   f" cases and one accepts what the other refuses in "
                   f"{summary_cases['accepted_by_one_path_only']}; generated rows: "
                   f"{sum(row_outcomes.values())} attempts, relay alive={relay_alive}")
        return Verdict("bad-input", passed, summary,
                       {"cases": summary_cases, "endings": endings,
                        "rows": dict(row_outcomes.most_common(40)),
                        "delivery": vars(delivery) | {"lost": delivery.lost[:20]}})

    # -- bounded claims (bench/claims.py) ------------------------------------------------------

    def frozen_relay(self) -> Verdict:
        outcome = claims.frozen_relay(self.url, self.logs, rows=self.sizes.claim_rows,
                                      freeze=self.sizes.freeze)
        return Verdict("frozen-relay", outcome.passed, outcome.summary, outcome.details)

    def partitioned_relay(self) -> Verdict:
        outcome = claims.partitioned_relay(self.url, self.logs, rows=self.sizes.claim_rows,
                                           cut_for=self.sizes.freeze)
        if outcome is None:
            return Verdict("partitioned-relay", None,
                           f"network namespaces unavailable: {claims.Namespace.available()}")
        return Verdict("partitioned-relay", outcome.passed, outcome.summary, outcome.details)

    def slow_device(self) -> Verdict:
        outcome = claims.slow_device(self.url, self.logs, rows=self.sizes.slow_rows,
                                     watch=self.sizes.watch)
        return Verdict("slow-device", outcome.passed, outcome.summary, outcome.details)


POISON_SEED = """
INSERT INTO outbox.message (command, data)
SELECT 'send-sms', jsonb_build_object(
    'receiver', '+6281234567890',
    'message', %(text)s || ' ' || g
        || CASE g %% 20 WHEN 0 THEN ' POISON-EMPTY' WHEN 10 THEN ' POISON-400' ELSE '' END)
FROM generate_series(1, %(last)s) AS g
"""


def clean_rate(url: str) -> float:
    with connect(url) as conn:
        n, span = conn.execute(
            "SELECT count(*), extract(epoch FROM max(sent_at) - min(sent_at))::float8 "
            "FROM outbox.message WHERE state = 'sent'").fetchone()
    return n / span if span else 0.0


def explain_claim(conn: psycopg.Connection[Any]) -> tuple[float, int]:
    """The relay's claim, explained and rolled back: its time and the buffers it touched."""
    from outbox.store import CLAIM_LOCKED  # noqa: PLC0415

    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL jit = off")  # as on the relay's own sessions
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + CLAIM_LOCKED, {
                "keys": ["@send-sms"], "limit": CHAOS.batch_size, "aging": 60.0,
                "max_priority": 9}).fetchone()[0]
    except psycopg.Error:
        return float("nan"), 0
    top = plan[0]
    buffers = int(top["Plan"].get("Shared Hit Blocks", 0)) + int(
        top["Plan"].get("Shared Read Blocks", 0))
    return float(top["Execution Time"]), buffers


#: seconds a published message may take to reach the subscriber (see duplicates_per_kill)
KILL_SLACK = 0.5


def duplicates_per_kill(ids: list[int], times: list[float], kills: list[float]) -> list[int]:
    """Attribute every repeated arrival to the SIGKILL that caused it: the first kill after
    the message's first arrival (it was delivered, and the relay died before recording it).

    Attributing a repeat to the last kill before it, as this did, charged one kill with the
    repeats of an earlier one whenever they came back later: the rows of a lease held by a
    killed relay go out again only when the lease runs out, which may be after the next kill
    (a verdict of 556 duplicates for one kill of a relay holding at most 500 rows)."""
    per_kill = [0] * len(kills)
    first: dict[int, float] = {}
    for message_id, arrived in sorted(zip(ids, times, strict=True), key=lambda p: p[1]):
        if message_id not in first:
            first[message_id] = arrived
            continue
        # a message the relay published just before a kill may reach the subscriber just
        # after it: half a second of slack, far less than a restarted relay's first publish
        index = bisect.bisect_left(kills, first[message_id] - KILL_SLACK)
        if index < len(kills):
            per_kill[index] += 1
    return per_kill


# --- main -------------------------------------------------------------------------------------


def _restore_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that restore services


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short outages")
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill timings")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    for name in chosen:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r} (expected one of: {', '.join(SCENARIOS)})")
    seed_value = args.seed if args.seed is not None else random.randrange(1 << 30)
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _restore_on_signal)
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    verdicts: list[Verdict] = []
    progress(f"chaos: {'quick' if args.quick else 'full'} run, seed {seed_value}")
    try:
        with scratch_database("outbox_chaos") as url:
            chaos = Chaos(sizes, url, logs, random.Random(seed_value))
            for name in chosen:
                progress(f"== {name}")
                scenario_started = time.monotonic()
                try:
                    verdict = getattr(chaos, name.replace("-", "_"))()
                except Exception as exc:
                    traceback.print_exc()
                    verdict = Verdict(name, False, f"the scenario itself failed: "
                                                   f"{type(exc).__name__}: {exc}")
                finally:
                    restore_services()
                verdict.details["seconds"] = time.monotonic() - scenario_started
                verdicts.append(verdict)
                progress(verdict.line)
    finally:
        restore_services()
    elapsed = time.monotonic() - started
    # chaos.json is the full run the README quotes; smoke and partial runs keep their own file
    name = "chaos-quick.json" if args.quick else "chaos-only.json" if args.only else "chaos.json"
    write_json(RESULTS / name, {
        "seed": seed_value, "quick": args.quick, "seconds": elapsed,
        "verdicts": [{"scenario": v.scenario, "passed": v.passed, "summary": v.summary,
                      "details": v.details} for v in verdicts]})
    print(f"chaos: {len(verdicts)} scenarios in {elapsed / 60:.1f} min (seed {seed_value})")
    for verdict in verdicts:
        print(verdict.line)
    return 0 if all(v.passed is not False for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

