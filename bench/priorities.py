"""Benchmark rows for priorities and ordering keys (issue 11), run by ``bench.run``.

- an OTP committed while a large bulk backlog drains, to RabbitMQ and to Redis: commit to a
  real subscriber on the OTP's own topic, and, for OTPs on the bulk route itself, commit to
  claim (``sent_at`` is the claiming transaction's start);
- the bulk drain rate with priorities and ordering keys in use (a tenth of the rows keyed,
  one in a hundred urgent) against the same drain of rows without them, in alternating
  pairs;
- the claim's cost on a large backlog with a tenth of the rows keyed: EXPLAIN ANALYZE time
  and buffers;
- aging: the wait of the oldest bulk rows under a stream of urgent rows at the relay's full
  rate, against the bound the aging rate promises.
"""

from __future__ import annotations

import secrets
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    AMQP_URL,
    RECEIVER,
    REDIS_URL,
    TEXT,
    RelayConfig,
    Subscriber,
    connect,
    now,
    percentile,
    progress,
    relays,
    reset,
    seed,
    sent_rate,
    wait_until_drained,
)

CONFIG = RelayConfig(batch_size=2000, workers=2)
#: drawn per run, as `outbox otp new-secret` would (32 random bytes as hex)
OTP_SECRET = secrets.token_hex(32)
OTPS = 20

# A tenth of the rows carry an ordering key (one per customer), one in a hundred is urgent
# (priority 0), the rest take send-sms's default (5).
KEYED_SEED = """
INSERT INTO outbox.message (command, data, priority, ordering_key)
SELECT 'send-sms', jsonb_build_object('receiver', %(receiver)s::text,
                                      'message', %(text)s || ' ' || lpad(g::text, 8, '0')),
       CASE WHEN g %% 100 = 7 THEN 0 END,
       CASE WHEN g %% 10 = 0 THEN 'customer-' || g END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""


def seed_keyed(url: str, count: int, chunk: int = 100_000) -> None:
    with connect(url) as conn:
        for first in range(1, count + 1, chunk):
            conn.execute(KEYED_SEED, {"receiver": RECEIVER, "text": TEXT, "first": first,
                                      "last": min(first + chunk - 1, count)})
        conn.execute("VACUUM ANALYZE outbox.message")


def _enqueue_otp(url: str, n: int, route: str) -> tuple[int, float]:
    with connect(url) as conn:
        row = conn.execute(
            "SELECT outbox.enqueue('create-otp', jsonb_build_object('receiver', %s::text, "
            "'reference', %s::text, 'message', 'Your code is %%s'), route => %s)",
            (RECEIVER, f"otp-{uuid.uuid4().hex[:8]}-{n}", route)).fetchone()
        committed = now()
    assert row is not None
    return int(row[0]), committed


# --- an OTP behind a bulk backlog --------------------------------------------------------------


def otp_behind_backlog(url: str, broker: str, rows: int, logs: Path) -> dict[str, Any]:
    """OTPs committed while ``rows`` bulk SMS drain through the same relay and broker."""
    reset(url)
    progress(f"priorities: seeding {rows:,} bulk rows for the {broker} drain")
    seed(url, rows)
    tag = uuid.uuid4().hex[:6]
    if broker == "amqp":
        from bench.run import amqp_queue, amqp_url, purging  # noqa: PLC0415

        bulk_queue, otp_queue = f"outbox-bulk-{tag}", f"outbox-otp-{tag}"
        with amqp_queue(bulk_queue) as bulk, amqp_queue(otp_queue) as otp, purging(bulk):
            subscriber = Subscriber("amqp", AMQP_URL, otp.name)
            return _otp_run(url, broker, rows, logs, amqp_url(bulk.name), amqp_url(otp.name),
                            subscriber)
    bulk_url = f"{REDIS_URL}?topic=outbox-bulk-{tag}&accept_no_subscriber=true"
    otp_url = f"{REDIS_URL}?topic=outbox-otp-{tag}"
    return _otp_run(url, broker, rows, logs, bulk_url, otp_url,
                    Subscriber("redis", REDIS_URL, f"outbox-otp-{tag}"))


def _otp_run(url: str, broker: str, rows: int, logs: Path, bulk_url: str, otp_url: str,
             subscriber: Subscriber) -> dict[str, Any]:
    extra = {"OUTBOX_TRANSPORT_BULK": bulk_url, "OUTBOX_TRANSPORT_OTP": otp_url,
             "OUTBOX_ROUTE_SEND_SMS": "bulk", "OUTBOX_ROUTE_CREATE_OTP": "otp",
             "OUTBOX_OTP_SECRET": OTP_SECRET}
    own: dict[int, float] = {}
    same: list[int] = []
    with subscriber, relays(url, bulk_url, CONFIG, log=logs / f"priorities-{broker}.log",
                            **extra) as running:
        with connect(url) as conn:  # the drain is under way
            deadline = time.monotonic() + 120
            while conn.execute("SELECT count(*) FROM outbox.message WHERE state = 'sent'"
                               ).fetchone()[0] < min(20_000, rows // 10):  # type: ignore[index]
                if time.monotonic() > deadline or not running[0].alive():
                    raise RuntimeError("the drain did not start")
                time.sleep(0.1)
            started, sent_then = time.monotonic(), conn.execute(
                "SELECT count(*) FROM outbox.message WHERE state = 'sent'").fetchone()[0]  # type: ignore[index]
            time.sleep(1.0)
            rate = (conn.execute("SELECT count(*) FROM outbox.message WHERE state = 'sent'"
                                 ).fetchone()[0] - sent_then) / (time.monotonic() - started)  # type: ignore[index]
        remaining = max(rows - sent_then, 1)
        spacing = max(0.05, remaining / max(rate, 1.0) / (OTPS * 1.5))
        progress(f"priorities {broker}: draining at ~{rate:,.0f}/s; {OTPS} OTPs on their own "
                 f"route and {OTPS} on the bulk route, {spacing:.2f}s apart")
        for n in range(OTPS):
            message_id, committed = _enqueue_otp(url, n, "otp")
            own[message_id] = committed
            same.append(_enqueue_otp(url, n, "bulk")[0])
            time.sleep(spacing)
        with connect(url) as conn:
            backlog_left = conn.execute("SELECT count(*) FROM outbox.message WHERE "
                                        "state = 'pending'").fetchone()[0]  # type: ignore[index]
        wait_until_drained(url, rows + 2 * OTPS, timeout=600, label=f"priorities {broker}: ",
                           alive=running[0].alive)
        time.sleep(1.0)
    ids, arrivals, _ = subscriber.received()
    arrived = dict(zip(ids, arrivals, strict=True))
    latencies = sorted((arrived[i] - t) * 1000 for i, t in own.items() if i in arrived)
    with connect(url) as conn:
        claimed = sorted(float(r[0]) * 1000 for r in conn.execute(
            "SELECT extract(epoch FROM sent_at - created_at) FROM outbox.message "
            "WHERE id = ANY(%s)", (same,)))
    _, drain_rate = sent_rate(url)
    result = {
        "bulk_rows": rows, "otps": OTPS, "received": len(latencies),
        "backlog_when_the_last_otp_came": backlog_left, "drain_rate": drain_rate,
        "own_route_p50_ms": percentile(latencies, 0.5), "own_route_p99_ms": percentile(latencies, 0.99),
        "own_route_max_ms": latencies[-1] if latencies else None,
        "same_route_to_claim_p50_ms": percentile(claimed, 0.5),
        "same_route_to_claim_p99_ms": percentile(claimed, 0.99),
    }
    progress(f"priorities {broker}: OTP commit->subscriber p50 {result['own_route_p50_ms']:.1f} ms, "
             f"p99 {result['own_route_p99_ms']:.1f} ms; on the bulk route commit->claim p50 "
             f"{result['same_route_to_claim_p50_ms']:.1f} ms, p99 "
             f"{result['same_route_to_claim_p99_ms']:.1f} ms ({backlog_left:,} bulk rows left)")
    return result


# --- the drain with priorities and keys against the drain without --------------------------------


def drain_with_and_without_keys(url: str, rows: int, logs: Path, pairs: int = 3) -> dict[str, Any]:
    transport = f"{REDIS_URL}?topic=outbox-keys-{uuid.uuid4().hex[:6]}&accept_no_subscriber=true"

    def drain(label: str, seeder: Callable[[], None]) -> float:
        reset(url)
        seeder()
        with relays(url, transport, CONFIG, log=logs / f"priorities-{label}.log") as running:
            wait_until_drained(url, rows, timeout=600, label=f"priorities {label}: ",
                               alive=running[0].alive)
        return sent_rate(url)[1]

    measured = []
    for index in range(pairs):
        plain = drain("plain", lambda: seed(url, rows))
        keyed = drain("keyed", lambda: seed_keyed(url, rows))
        measured.append({"plain": plain, "keyed": keyed, "ratio": keyed / plain})
        progress(f"priorities: pair {index + 1}/{pairs}: without keys {plain:,.0f}/s, with "
                 f"priorities and 10% keyed {keyed:,.0f}/s ({keyed / plain:.0%})")
    middle = sorted(measured, key=lambda pair: pair["ratio"])[len(measured) // 2]
    return {"rows": rows, "pairs": measured, **middle, "target": 0.95}


# --- the claim on a large backlog --------------------------------------------------------------


def explain_claim(url: str, rows: int) -> dict[str, Any]:
    from outbox.store import CLAIM, CLAIM_LOCKED  # noqa: PLC0415

    reset(url)
    progress(f"priorities: seeding {rows:,} rows, a tenth of them keyed, for EXPLAIN")
    seed_keyed(url, rows)
    keys = ["@send-sms", "@send-email", "@block-msisdn", "@unblock-msisdn", "@create-otp",
            "default"]
    result: dict[str, Any] = {"rows": rows, "keyed_share": 0.1}
    with connect(url) as conn:
        conn.execute("SET jit = off")
        for name, statement, params in (
                ("locked", CLAIM_LOCKED, {"keys": keys, "limit": 2000, "aging": 60.0,
                                           "max_priority": 9}),
                ("leased", CLAIM, {"keys": keys, "limit": 2000, "aging": 60.0, "lease": 30.0,
                                   "owner": "bench", "claim": 1, "max_priority": 9})):
            times, buffers = [], 0
            for _ in range(5):
                with conn.transaction(force_rollback=True):
                    plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement,
                                        params).fetchone()[0]  # type: ignore[index]
                top = plan[0]
                times.append(float(top["Execution Time"]))
                buffers = int(top["Plan"].get("Shared Hit Blocks", 0)) + int(
                    top["Plan"].get("Shared Read Blocks", 0))
            result[name] = {"limit": 2000, "execution_ms": statistics.median(times),
                            "buffers": buffers}
            progress(f"priorities: claim ({name}) of 2,000 from {rows:,}: "
                     f"{statistics.median(times):.1f} ms, {buffers:,} buffers")
    return result


# --- aging ----------------------------------------------------------------------------------


def aging(url: str, logs: Path, *, seconds: float, step: float = 2.0) -> dict[str, Any]:
    """Bulk rows (priority 5) committed into a relay kept busy by urgent rows (priority 0)
    arriving at least as fast as it can publish them: how long do the bulk rows wait?"""
    reset(url)
    transport = f"{REDIS_URL}?topic=outbox-aging-{uuid.uuid4().hex[:6]}&accept_no_subscriber=true"
    stop = threading.Event()

    def urgent() -> None:
        with connect(url) as conn:
            n = 0
            while not stop.is_set():
                pending = conn.execute("SELECT count(*) FROM outbox.message WHERE "
                                       "state = 'pending' AND priority = 0").fetchone()[0]  # type: ignore[index]
                if pending < 20_000:  # keep the relay saturated with urgent work
                    conn.execute(
                        "INSERT INTO outbox.message (command, data, priority) "
                        "SELECT 'send-sms', jsonb_build_object('receiver', %s::text, "
                        "'message', 'urgent ' || g), 0 FROM generate_series(1, 5000) AS g",
                        (RECEIVER,))
                    n += 5000
                else:
                    time.sleep(0.01)

    feeder = threading.Thread(target=urgent, daemon=True)
    with relays(url, transport, CONFIG, log=logs / "priorities-aging.log",
                OUTBOX_PRIORITY_AGING=f"{step}s") as running:
        feeder.start()
        time.sleep(3.0)  # the relay is saturated
        with connect(url) as conn:
            conn.execute("INSERT INTO outbox.message (command, data, priority) "
                         "SELECT 'send-sms', jsonb_build_object('receiver', %s::text, "
                         "'message', 'bulk ' || g), 5 FROM generate_series(1, 100) AS g",
                         (RECEIVER,))
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and running[0].alive():
                left = conn.execute("SELECT count(*) FROM outbox.message WHERE priority = 5 "
                                    "AND state = 'pending'").fetchone()[0]  # type: ignore[index]
                if not left:
                    break
                time.sleep(0.2)
            waits = [float(r[0]) for r in conn.execute(
                "SELECT extract(epoch FROM sent_at - created_at) FROM outbox.message "
                "WHERE priority = 5 AND state = 'sent' ORDER BY 1")]
            urgent_waits = [float(r[0]) for r in conn.execute(
                "SELECT extract(epoch FROM sent_at - created_at) FROM outbox.message "
                "WHERE priority = 0 AND state = 'sent' AND created_at > now() - interval '5 s' "
                "ORDER BY 1")]
            rate = conn.execute("SELECT count(*) / 5.0 FROM outbox.message WHERE "
                                "state = 'sent' AND sent_at > now() - interval '5 s'").fetchone()[0]  # type: ignore[index]
        stop.set()
        feeder.join(10)
    bound = 5 * step
    result = {"aging_seconds_per_level": step, "bulk_rows": 100, "sent": len(waits),
              "max_wait_seconds": max(waits) if waits else None,
              "urgent_p50_wait_seconds": percentile(urgent_waits, 0.5) if urgent_waits else None,
              "relay_rate": float(rate or 0),
              "bound_seconds": bound,
              "bound_note": "5 levels x aging, plus the urgent rows ranked ahead at that moment "
                            "(at most 20,000 here, drained at the relay's rate)"}
    progress(f"priorities aging: bulk rows waited at most {result['max_wait_seconds']} s "
             f"(5 levels x {step:.0f}s = {bound:.0f}s, plus the urgent backlog ahead) while "
             f"urgent rows kept the relay at ~{result['relay_rate']:,.0f}/s")
    return result


def run(url: str, logs: Path, *, rows: int, quick: bool,
        parts: frozenset[str] = frozenset({"otp", "keys", "explain", "aging"})) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if "otp" not in parts:
        return _rest(url, logs, rows=rows, quick=quick, parts=parts, result=result)
    for broker in ("amqp", "redis"):
        try:
            result[f"otp_{broker}"] = otp_behind_backlog(url, broker, rows, logs)
        except Exception as exc:  # a broker that is down skips its row, not the section
            result[f"otp_{broker}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return _rest(url, logs, rows=rows, quick=quick, parts=parts, result=result)


def _rest(url: str, logs: Path, *, rows: int, quick: bool, parts: frozenset[str],
          result: dict[str, Any]) -> dict[str, Any]:
    if "keys" in parts:
        result["drain_keys"] = drain_with_and_without_keys(url, min(rows, 200_000), logs,
                                                           pairs=1 if quick else 3)
    if "explain" in parts:
        result["explain"] = explain_claim(url, rows)
    if "aging" in parts:
        result["aging"] = aging(url, logs, seconds=60 if quick else 120)
    return result


__all__ = ["run"]
