"""Issue 12's rows: failover pools, rate limits, receiver limits.

Chaos scenarios (``python -m bench.chaos --only pool-failover,rate-limit``):

* ``pool-failover``: two REST device stand-ins (:mod:`bench.httpd`, recording every id and
  its arrival time), route ``a|b``; a steady producer; device ``a`` stopped mid-run for 30 s
  and started again on the same port. Verdict: lost 0, failed 0, duplicates at most one
  claim (``OUTBOX_BATCH_SIZE``), and the times to fail over (a stopped -> first arrival at
  b) and to fail back (a started -> first arrival at a).
* ``rate-limit``: one device with ``rate=10/s``, 2 ``outbox run`` processes x 2 workers and a
  backlog: over 60 s the device's busiest 1-second window holds at most 10 + burst.

Bench section (``python -m bench.run --only limits``): what a receiver limit costs where it
could be enforced. At the door (a second trigger counting per receiver digest in the
application's INSERT) against the same INSERT without it; in the relay, a drain with the
limit on against the same drain without.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.common import (
    HttpDevice,
    RelayConfig,
    RelayProcess,
    connect,
    now,
    progress,
    reset,
    sample_data,
    seed,
    sent_rate,
    wait_until_drained,
)

POOL_CONFIG = RelayConfig(batch_size=50, workers=1)
RATE_CONFIG = RelayConfig(batch_size=50, workers=2)


def _device(port: int | None = None) -> HttpDevice:
    device = HttpDevice(record=True)
    if port is not None:
        device.port = port
        device.args[device.args.index("--port") + 1] = str(port)
    return device


def _arrivals(device: HttpDevice) -> tuple[list[int], list[float]]:
    from bench.subscriber import read_results  # noqa: PLC0415

    assert device.out is not None
    ids, times, _ = read_results(device.out)
    device.out.unlink(missing_ok=True)
    return list(ids), list(times)


def _produce(url: str, rate: float, stop: threading.Event, committed: list[int]) -> None:
    with psycopg.connect(url) as conn:
        started = now()
        n = 0
        while not stop.is_set():
            delay = started + n / rate - now()
            if delay > 0:
                time.sleep(delay)
            row = conn.execute("INSERT INTO outbox.message (command, data) VALUES "
                               "('send-sms', %s) RETURNING id", (Jsonb(sample_data(n)),)).fetchone()
            conn.commit()
            assert row is not None
            committed.append(int(row[0]))
            n += 1


def pool_failover(url: str, logs: Path, verdict: Callable[..., Any], *,
                  outage: float = 30.0, before: float = 15.0, after: float = 20.0,
                  rate: float = 50.0) -> Any:
    reset(url)
    a, b = _device().start(), _device().start()
    a_port = a.port
    runs: list[HttpDevice] = [a, b]
    committed: list[int] = []
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(url, rate, stop, committed), daemon=True)
    relay = RelayProcess(url, a.url, POOL_CONFIG, log=logs / "chaos-pool-failover.log",
                         OUTBOX_TRANSPORT_A=a.url, OUTBOX_TRANSPORT_B=b.url,
                         OUTBOX_ROUTE_SEND_SMS="a|b", OUTBOX_PUBLISH_TIMEOUT="2s")
    progress(f"pool-failover: {rate:.0f} SMS/s through a|b; a stopped after {before:.0f}s for "
             f"{outage:.0f}s")
    try:
        relay.start()
        producer.start()
        time.sleep(before)
        a.stop()
        stopped_at = now()
        time.sleep(outage)
        a2 = _device(a_port).start()
        runs.append(a2)
        started_at = now()
        time.sleep(after)
        stop.set()
        producer.join(10)
        drained = wait_until_drained(url, len(committed), timeout=60, label="pool-failover")
    finally:
        stop.set()
        relay.stop()
        for device in runs:
            device.stop()
    a_ids, _ = _arrivals(a)
    b_ids, b_times = _arrivals(b)
    a2_ids, a2_times = _arrivals(runs[2]) if len(runs) > 2 else ([], [])
    with connect(url) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM outbox.message GROUP BY state"
                                   ).fetchall())
        served = dict(conn.execute("SELECT coalesce(served_by, '-'), count(*) FROM "
                                   "outbox.message WHERE state = 'sent' GROUP BY 1").fetchall())
    received = a_ids + b_ids + a2_ids
    seen = set(received)
    lost = [i for i in committed if i not in seen]
    duplicates = len(received) - len(seen)
    failover = min((t for t in b_times if t >= stopped_at), default=None)
    failback = min((t for t in a2_times if t >= started_at), default=None)
    to_fail_over = None if failover is None else failover - stopped_at
    to_fail_back = None if failback is None else failback - started_at
    passed = (bool(drained) and not lost and states.get("failed", 0) == 0
              and duplicates <= POOL_CONFIG.batch_size and to_fail_back is not None)
    summary = (f"enqueued={len(committed)} lost={len(lost)} failed={states.get('failed', 0)} "
               f"duplicates={duplicates} (bound: one claim, {POOL_CONFIG.batch_size}) "
               f"fail-over={_s(to_fail_over)} fail-back={_s(to_fail_back)} "
               f"served_by={served}")
    return verdict("pool-failover", passed, summary, {
        "enqueued": len(committed), "lost": len(lost), "duplicates": duplicates,
        "states": states, "served_by": served, "fail_over_seconds": to_fail_over,
        "fail_back_seconds": to_fail_back, "received_a_before": len(a_ids),
        "received_b": len(b_ids), "received_a_after": len(a2_ids)})


def worst_window(times: list[float], width: float = 1.0) -> int:
    """The most arrivals in any window of ``width`` seconds (sliding, starting at each)."""
    ordered = sorted(times)
    best = 0
    end = 0
    for start, at in enumerate(ordered):
        while end < len(ordered) and ordered[end] < at + width:
            end += 1
        best = max(best, end - start)
    return best


def rate_limit(url: str, logs: Path, verdict: Callable[..., Any], *, seconds: float = 60.0,
               per_second: int = 10, processes: int = 2) -> Any:
    reset(url)
    backlog = int(per_second * seconds * 1.5)
    seed(url, backlog, label="rate-limit ")
    device = _device().start()
    limited = f"{device.url}?rate={per_second}/s"
    progress(f"rate-limit: {backlog:,} rows, rate={per_second}/s, {processes} relays x "
             f"{RATE_CONFIG.workers} workers, {seconds:.0f}s")
    started = now()
    relays = [RelayProcess(url, limited, RATE_CONFIG, log=logs / "chaos-rate-limit.log")
              for _ in range(processes)]
    try:
        for relay in relays:
            relay.start()
        time.sleep(seconds)
    finally:
        for relay in relays:
            relay.stop()
        device.stop()
    _, times = _arrivals(device)
    times = [t for t in times if t >= started]
    worst = worst_window(times)
    burst = max(1, -(-per_second // 10))
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    achieved = (len(times) - 1) / span if span else 0.0
    passed = bool(times) and worst <= per_second + burst
    summary = (f"received={len(times)} in {seconds:.0f}s, busiest 1s window={worst} "
               f"(bound {per_second} + burst {burst}), average {achieved:.2f}/s")
    return verdict("rate-limit", passed, summary, {
        "received": len(times), "worst_1s_window": worst, "bound": per_second + burst,
        "average_per_second": achieved})


# --- receiver limits: where to enforce them ------------------------------------------------

# The cheapest door we could think of: a second BEFORE INSERT trigger, only for the
# commands that reach a person, counting per (command, receiver digest) in fixed windows with
# one upsert, refusing beyond the limit. Nothing here ships: it is measured to decide.
DOOR = """
CREATE TABLE bench.receiver_count (
    digest bytea NOT NULL, window_start timestamptz NOT NULL, n integer NOT NULL,
    PRIMARY KEY (digest, window_start));
CREATE FUNCTION bench.receiver_door() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    counted integer;
BEGIN
    INSERT INTO bench.receiver_count AS c (digest, window_start, n)
    VALUES (substr(sha256(convert_to(NEW.command || ':' || btrim(NEW.data ->> 'receiver'),
                                     'UTF8')), 1, 16),
            date_bin('10 minutes', now(), timestamptz '2000-01-01'), 1)
    ON CONFLICT (digest, window_start) DO UPDATE SET n = c.n + 1
    RETURNING n INTO counted;
    IF counted > 1000000 THEN
        RAISE EXCEPTION 'receiver limit' USING ERRCODE = 'P0001';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER message_receiver_door BEFORE INSERT ON outbox.message
    FOR EACH ROW WHEN (NEW.command IN ('send-sms', 'send-email', 'create-otp'))
    EXECUTE FUNCTION bench.receiver_door();
"""

UNDO_DOOR = """
DROP TRIGGER IF EXISTS message_receiver_door ON outbox.message;
DROP SCHEMA IF EXISTS bench CASCADE;
"""


def distinct_receiver(n: int) -> dict[str, Any]:
    return {**sample_data(n), "receiver": f"+62812{n:07d}"}


# A backlog with a receiver of its own per row: the limit never refuses, it only costs.
SEED_DISTINCT = """
INSERT INTO outbox.message (command, data)
SELECT 'send-sms', jsonb_build_object('receiver', '+62812' || lpad(n::text, 7, '0'),
                                      'message', %(text)s::text)
FROM generate_series(1, %(rows)s) AS n
"""


def receiver_limit_cost(url: str, logs: Path, *, rounds: int = 21, per_round: int = 400,
                        drain_rows: int = 30_000) -> dict[str, Any]:
    """INSERT with the door trigger against without (median of interleaved rounds, one row
    per transaction, distinct receivers); then drains to stdout with OUTBOX_RECEIVER_LIMIT
    on and off."""
    with connect(url) as conn:
        conn.execute(UNDO_DOOR)
        conn.execute("CREATE SCHEMA bench")
    ratios: list[float] = []
    spent: dict[str, list[float]] = {"without": [], "door": []}
    n = 0
    try:
        with psycopg.connect(url) as conn:
            # The commit's WAL flush is the same for both and the noisiest part here.
            conn.execute("SET synchronous_commit = off")
            conn.commit()
            for round_ in range(rounds):
                for variant in (("without", "door") if round_ % 2 else ("door", "without")):
                    with conn.transaction():
                        conn.execute(DOOR if variant == "door" else "SELECT 1")
                    started = time.perf_counter()
                    for _ in range(per_round):
                        conn.execute("INSERT INTO outbox.message (command, data) VALUES "
                                     "('send-sms', %s)", (Jsonb(distinct_receiver(n)),))
                        conn.commit()
                        n += 1
                    spent[variant].append(time.perf_counter() - started)
                    if variant == "door":
                        with conn.transaction():
                            conn.execute("DROP TRIGGER message_receiver_door ON outbox.message;"
                                         "DROP TABLE bench.receiver_count;"
                                         "DROP FUNCTION bench.receiver_door()")
                ratios.append(spent["door"][-1] / spent["without"][-1])
                progress(f"receiver door: round {round_ + 1}/{rounds} ratio {ratios[-1]:.3f}")
    finally:
        with connect(url) as conn:
            conn.execute(UNDO_DOOR)
    door = statistics.median(ratios)
    result: dict[str, Any] = {
        "door_insert_ratio": door,
        "door_round_ratios": [round(r, 3) for r in ratios],
        "insert_us_without": statistics.median(spent["without"]) / per_round * 1e6,
        "insert_us_door": statistics.median(spent["door"]) / per_round * 1e6,
    }
    drains: dict[str, list[float]] = {"off": [], "on": []}
    for turn, label in enumerate(("off", "on", "off", "on", "off")):
        reset(url)
        with connect(url) as conn:
            conn.execute(SEED_DISTINCT, {"rows": drain_rows, "text": sample_data(0)["message"]})
        extra = {"OUTBOX_RECEIVER_LIMIT": "3/10m"} if label == "on" else {}
        with RelayProcess(url, "stdout://", RelayConfig(batch_size=500, workers=2),
                          log=logs / "bench-receiver-limit.log", **extra):
            wait_until_drained(url, drain_rows, timeout=300, label=f"limit {label} ")
        _, per_second = sent_rate(url)  # from sent_at: the relay's start-up is left out
        drains[label].append(per_second)
        progress(f"receiver limit drain {turn + 1}/5, limit {label}: {per_second:,.0f}/s")
    result["drain_per_second"] = drains
    result["relay_drain_ratio"] = statistics.median(drains["on"]) / statistics.median(
        drains["off"])
    result.update(pool_cost(url, logs, drain_rows))
    reset(url)
    return result


def pool_cost(url: str, logs: Path, rows: int) -> dict[str, Any]:
    """What a pool costs a fast transport: drains to stdout through route ``a|b`` (the pool,
    and ``served_by`` written for every sent row) against route ``a``, interleaved."""
    rates: dict[str, list[float]] = {"a": [], "a|b": []}
    for turn, route in enumerate(("a", "a|b", "a", "a|b", "a")):
        reset(url)
        with connect(url) as conn:
            conn.execute(SEED_DISTINCT, {"rows": rows, "text": sample_data(0)["message"]})
        with RelayProcess(url, "stdout://", RelayConfig(batch_size=500, workers=2),
                          log=logs / "bench-pool-cost.log", OUTBOX_TRANSPORT_A="stdout://",
                          OUTBOX_TRANSPORT_B="stdout://", OUTBOX_ROUTE_SEND_SMS=route):
            wait_until_drained(url, rows, timeout=300, label=f"route {route} ")
        _, per_second = sent_rate(url)
        rates[route].append(per_second)
        progress(f"pool cost {turn + 1}/5, route {route}: {per_second:,.0f}/s")
    return {"pool_drain_per_second": rates,
            "pool_drain_ratio": statistics.median(rates["a|b"]) / statistics.median(rates["a"])}


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


__all__ = ["pool_failover", "rate_limit", "receiver_limit_cost", "worst_window"]
