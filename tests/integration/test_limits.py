"""Rate limits and receiver limits against the real Postgres: the token bucket statement
does the pure function's arithmetic, holds its bound under concurrent takers, and the
relay refuses a receiver's messages beyond its limit (with an OTP-Pi stand-in)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox.limits import RECEIVER_LIMIT_RULE, receiver_digest
from outbox.relay import Relay
from outbox.scheduling import take_tokens
from outbox.settings import Settings
from outbox.store import Bucket, PostgresStore, PostgresTransaction
from outbox.transports import open_transports
from tests.conftest import rows_by_state
from tests.support.chaos import Relay as ChaosRelay
from tests.support.otp_pi import Fault, OtpPi

pytest_plugins = ("tests.support.otp_pi_fixtures",)
pytestmark = pytest.mark.integration


# --- the token bucket statement -----------------------------------------------------------


def test_take_tokens_in_sql_is_the_pure_function(conn: psycopg.Connection[Any]) -> None:
    rng = random.Random(3)
    for case in range(60):
        rate = rng.choice([0.1, 1.0, 10.0, 250.0])
        burst = rng.randint(1, 20)
        tokens = rng.uniform(0, burst)
        elapsed = rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 300), -rng.uniform(0, 1)])
        want = rng.randint(0, 25)
        name = f"t{case}"
        with conn.transaction():
            now = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0]  # type: ignore[index]
            conn.execute("INSERT INTO outbox.rate_bucket (transport, tokens, updated_at) "
                         "VALUES (%s, %s, %s)", (name, tokens, now - elapsed))
            tx = PostgresTransaction(conn, blank_texts=False)
            granted, left = tx.take_tokens(Bucket(name, rate, burst), want)
            stored = conn.execute("SELECT updated_at FROM outbox.rate_bucket WHERE transport = %s",
                                  (name,)).fetchone()[0]  # type: ignore[index]
        expected = take_tokens(tokens, now - elapsed, now, rate=rate, burst=burst, want=want)
        assert granted == expected.granted, (case, rate, burst, tokens, elapsed, want)
        assert left == pytest.approx(expected.tokens, abs=1e-6)
        assert stored == pytest.approx(expected.updated_at, abs=1e-6)


def test_a_new_bucket_starts_full_and_unused_tokens_go_back(conn: psycopg.Connection[Any]) -> None:
    bucket = Bucket("device", rate=1.0, burst=3)
    with conn.transaction():
        tx = PostgresTransaction(conn, blank_texts=False)
        assert tx.take_tokens(bucket, 5)[0] == 3
        tx.return_tokens(bucket, 2)
        assert tx.take_tokens(bucket, 1)[0] == 1


def test_concurrent_takers_never_get_more_than_burst_plus_rate_times_t(clean_db: str) -> None:
    bucket = Bucket("shared", rate=40.0, burst=2)
    grants: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def taker(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(clean_db) as connection:
            while not stop.is_set():
                with connection.transaction():
                    tx = PostgresTransaction(connection, blank_texts=False)
                    granted, _ = tx.take_tokens(bucket, rng.randint(1, 3))
                    at = connection.execute(
                        "SELECT updated_at FROM outbox.rate_bucket WHERE transport = 'shared'"
                    ).fetchone()[0]  # type: ignore[index]
                if granted:
                    with lock:
                        grants.append((at, granted))

    threads = [threading.Thread(target=taker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    stop.wait(2.0)
    stop.set()
    for thread in threads:
        thread.join(10)
    grants.sort()
    assert len(grants) > 10
    first = grants[0][0]
    # Whatever the interleaving: at most burst + rate * T tokens by the bucket's own clock.
    total = 0
    for at, granted in grants:
        total += granted
        assert total <= bucket.burst + bucket.rate * (at - first) + 1e-6


# --- receiver limits through the relay ---------------------------------------------------


def relay_for(url: str, device: OtpPi, **overrides: Any) -> Relay:
    settings = Settings(transports={"default": device.url()}, publish_timeout=2.0,
                        backoff_base=0.01, backoff_max=0.02, **overrides)
    return Relay(PostgresStore(psycopg.connect(url)), open_transports(settings), settings)


def close(*relays: Relay) -> None:
    for relay in relays:
        relay.store.close()
        for transport in relay.transports.values():
            transport.close()


def insert(conn: psycopg.Connection[Any], command: str, receiver: str, **data: Any) -> int:
    if command in ("send-sms", "send-email"):
        data.setdefault("message", "hello")
    if command == "send-email":
        data.setdefault("subject", "s")
    return int(conn.execute(  # type: ignore[index]
        "INSERT INTO outbox.message (command, data) VALUES (%s, %s) RETURNING id",
        (command, Jsonb({"receiver": receiver, **data}))).fetchone()[0])


def drain(relay: Relay, until: Callable[[], bool], turns: int = 50) -> None:
    for _ in range(turns):
        relay.process_batch()
        if until():
            return
        time.sleep(0.05)
    raise AssertionError("not drained")


def test_a_receiver_gets_at_most_its_limit_and_the_rest_fail_naming_it(
        conn: psycopg.Connection[Any], clean_db: str, otp_pi: OtpPi) -> None:
    limited, other = "+6281111111111", "+6282222222222"
    ids = [insert(conn, "send-sms", limited, message=f"m{n}") for n in range(5)]
    insert(conn, "send-sms", f" {limited} ")  # the same receiver, written with spaces
    insert(conn, "send-sms", other)
    insert(conn, "block-msisdn", limited)  # never limited
    insert(conn, "send-email", "ann@example.com")  # the limit of send-email is lifted
    insert(conn, "send-email", "ANN@example.com")
    relay = relay_for(clean_db, otp_pi, receiver_limit="2/10m",
                      receiver_limits={"send-email": "off"})
    try:
        relay.drain()
    finally:
        close(relay)
    assert [sent.text for sent in otp_pi.inbox if sent.receiver == limited] == ["m0", "m1"]
    assert otp_pi.blocked == {limited}
    assert rows_by_state(conn) == {"sent": 6, "failed": 4}
    failed = conn.execute("SELECT id, last_error, attempts FROM outbox.message "
                          "WHERE state = 'failed' ORDER BY id").fetchall()
    assert [row[0] for row in failed][:3] == ids[2:]
    assert all(row[1].startswith(RECEIVER_LIMIT_RULE) and "2/10m per receiver for send-sms"
               in row[1] and row[2] == 0 for row in failed)
    # Only digests are kept, never the receiver.
    kept = conn.execute("SELECT message_id, digest FROM outbox.receiver_window").fetchall()
    assert len(kept) == 3  # two for the limited receiver, one for the other
    assert all(len(bytes(digest)) == 16 for _, digest in kept)
    assert limited.encode() not in b"".join(bytes(d) for _, d in kept)
    dump = conn.execute("SELECT string_agg(t::text, ',') FROM outbox.receiver_window AS t"
                        ).fetchone()[0]  # type: ignore[index]
    assert "81111111111" not in dump


def test_a_retry_keeps_its_place_and_another_relay_counts_the_same_window(
        conn: psycopg.Connection[Any], clean_db: str, otp_pi: OtpPi) -> None:
    receiver = "+6281111111111"
    first = insert(conn, "send-sms", receiver, message="first")
    otp_pi.fail_next(Fault.http_status(503))  # the first attempt fails transiently
    one = relay_for(clean_db, otp_pi, receiver_limit="1/1h")
    two = relay_for(clean_db, otp_pi, receiver_limit="1/1h")
    try:
        one.process_batch()
        assert rows_by_state(conn) == {"pending": 1}
        second = insert(conn, "send-sms", receiver, message="second")
        drain(two, lambda: rows_by_state(conn) == {"sent": 1, "failed": 1})
    finally:
        close(one, two)
    assert [sent.text for sent in otp_pi.inbox] == ["first"]
    states = dict(conn.execute("SELECT id, state FROM outbox.message").fetchall())
    assert states == {first: "sent", second: "failed"}
    digest = receiver_digest(b"outbox receiver limit", "send-sms", receiver)
    assert conn.execute("SELECT count(*) FROM outbox.receiver_window WHERE digest = %s",
                        (digest,)).fetchone()[0] == 1  # type: ignore[index]


# --- one rate shared by two relay processes ----------------------------------------------


def test_two_relay_processes_share_one_rate(conn: psycopg.Connection[Any], clean_db: str,
                                            otp_pi: OtpPi, tmp_path: Path) -> None:
    """Two ``outbox run`` processes of two workers each, one device at rate=10/s with the
    default burst (1): whatever the interleaving, the device never sees more than
    burst + rate * T requests in any T seconds (T = 2 s here, with 0.3 s allowed for the
    spread between taking a token and the request reaching the device)."""
    rows = 40
    for n in range(rows):
        insert(conn, "send-sms", f"+62812{n:07d}", message=f"m{n}")
    url = otp_pi.url(rate="10/s")
    relays = [ChaosRelay(clean_db, url, log=tmp_path / f"relay{n}.log", route_all=True,
                         env={"OUTBOX_WORKERS": "2", "OUTBOX_POLL_INTERVAL": "0.2"})
              for n in range(2)]
    try:
        for relay in relays:
            relay.start()
        deadline = time.monotonic() + 60
        while rows_by_state(conn) != {"sent": rows} and time.monotonic() < deadline:
            time.sleep(0.2)
            assert all(relay.alive() for relay in relays)
        sessions = conn.execute("SELECT count(DISTINCT application_name) FROM pg_stat_activity "
                                "WHERE application_name LIKE 'outbox relay %' "
                                "AND datname = current_database()").fetchone()
    finally:
        for relay in relays:
            relay.stop()
    assert rows_by_state(conn) == {"sent": rows}
    assert sessions is not None and sessions[0] == 2
    # commands only: each `outbox run` probes the device once at start (an OPTIONS)
    arrivals = sorted(request.at for request in otp_pi.requests if request.method == "POST")
    assert len(arrivals) == rows
    window, rate, burst, spread = 2.0, 10.0, 1, 0.3
    for start, at in enumerate(arrivals):
        inside = sum(1 for other in arrivals[start:] if other < at + window)
        assert inside <= burst + rate * (window + spread), (inside, at)
    tokens = conn.execute("SELECT transport FROM outbox.rate_bucket").fetchall()
    assert tokens == [("default",)]


def test_retention_purges_places_older_than_every_window(conn: psycopg.Connection[Any]) -> None:
    from outbox.retention import purge  # noqa: PLC0415

    conn.execute("INSERT INTO outbox.receiver_window (message_id, digest, taken_at) VALUES "
                 "(1, %s, now() - interval '3 days'), (2, %s, now() - interval '1 hour')",
                 (b"a" * 16, b"b" * 16))
    assert purge(conn, Settings(receiver_limit="3/10m")) is not None
    assert conn.execute("SELECT message_id FROM outbox.receiver_window").fetchall() == [(2,)]
