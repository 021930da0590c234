"""Bounded claims, lanes, priorities and ordering keys against the real Postgres.

The rules are those written down once in :mod:`outbox.store`; these tests hold the SQL to
them, and drive whole relays (in threads and as ``outbox run`` processes) against a REST
device stand-in that takes seconds per SMS, as a GSM modem does. Bounds on waiting are
generous: they are not measurements.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox.errors import TransientPublishError
from outbox.relay import Lane, Relay, RelayService, configured_lanes
from outbox.settings import Settings
from outbox.store import ClaimRequest, PostgresStore
from outbox.testing import MemoryTransport
from outbox.transports.base import Envelope
from tests.support.chaos import Relay as RelayProcess
from tests.support.otp_pi import OtpPi

pytestmark = pytest.mark.integration
pytest_plugins = ("tests.support.otp_pi_fixtures",)

SETTLE = 90.0


def sms(n: int) -> dict[str, Any]:
    return {"receiver": f"+6281234{n:05d}", "message": f"hello {n}"}


def insert(conn: psycopg.Connection[Any], command: str, data: dict[str, Any],
           **columns: Any) -> int:
    names = ["command", "data", *columns]
    values = [command, Jsonb(data), *columns.values()]
    row = conn.execute(
        f"INSERT INTO outbox.message ({', '.join(names)}) "
        f"VALUES ({', '.join(['%s'] * len(values))}) RETURNING id", values).fetchone()
    assert row is not None
    return int(row[0])


def request(keys: list[str], *, limit: int = 100, lease: float = 30.0, claim: int = 1,
            aging: float = 60.0) -> ClaimRequest:
    return ClaimRequest(keys=keys, limit=limit, lease=lease, owner="test:1", claim=claim,
                        aging=aging)


def claim_ids(url: str, req: ClaimRequest) -> list[int]:
    store = PostgresStore(psycopg.connect(url))
    try:
        with store.transaction() as tx:
            return [row.id for row in tx.claim(req)]
    finally:
        store.close()


def _ago(seconds: float) -> Any:
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    return datetime.now(UTC) - timedelta(seconds=seconds)


def wait_until(condition: Callable[[], bool], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def states(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(conn.execute("SELECT state, count(*) FROM outbox.message GROUP BY 1").fetchall())


# --- the claim statement -----------------------------------------------------------------


def test_a_claim_is_a_lease_others_cannot_take_until_it_runs_out(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    ids = [insert(conn, "send-sms", sms(n)) for n in range(3)]
    assert claim_ids(clean_db, request(["@send-sms"], lease=1.0, claim=11)) == ids
    leased = conn.execute("SELECT claimed_by, claim, available_at > now() FROM outbox.message "
                          "ORDER BY id").fetchall()
    assert leased == [("test:1", 11, True)] * 3
    assert claim_ids(clean_db, request(["@send-sms"], claim=12)) == []  # leased
    time.sleep(1.1)
    assert claim_ids(clean_db, request(["@send-sms"], claim=12)) == ids  # ran out: anyone's


def test_a_relay_that_lost_its_lease_cannot_overwrite_the_new_holders_outcome(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    [row_id] = [insert(conn, "send-sms", sms(1))]
    claim_ids(clean_db, request(["@send-sms"], lease=0.2, claim=21))
    time.sleep(0.3)
    claim_ids(clean_db, request(["@send-sms"], claim=22))  # another relay took it over
    store = PostgresStore(psycopg.connect(clean_db))
    try:
        with store.transaction() as tx:
            tx.mark_sent([row_id], 22)  # the new holder records first
        with store.transaction() as tx:  # the old holder wakes up and records a failure
            tx.mark_failed([_outcome(row_id, "late")], 21)
            tx.hand_back([], 21)
    finally:
        store.close()
    assert conn.execute("SELECT state, last_error, claim FROM outbox.message").fetchone() == (
        "sent", None, None)


def _outcome(row_id: int, reason: str) -> Any:
    from outbox.store import Outcome  # noqa: PLC0415

    return Outcome(row_id, reason)


def test_lanes_claim_only_their_own_rows(conn: psycopg.Connection[Any], clean_db: str) -> None:
    bulk = [insert(conn, "send-sms", sms(n), route="slow") for n in range(50)]
    mail = insert(conn, "send-email", {"receiver": "a@example.com", "subject": "s",
                                       "message": "m"})
    spaced = insert(conn, "send-sms", sms(99), route="  fast ")
    assert claim_ids(clean_db, request(["@send-email", "fast"], claim=1)) == [mail, spaced]
    assert claim_ids(clean_db, request(["slow"], limit=10, claim=2)) == bulk[:10]


def test_urgent_rows_first_and_waiting_ages_a_row(conn: psycopg.Connection[Any],
                                                  clean_db: str) -> None:
    old_bulk = insert(conn, "send-sms", sms(1), available_at=_ago(400))  # 6.7 min waiting
    bulk = [insert(conn, "send-sms", sms(n)) for n in range(2, 6)]
    otp = insert(conn, "create-otp", {"receiver": "+628123", "reference": "r",
                                      "message": "code %s"}, route="default")
    block = insert(conn, "block-msisdn", {"receiver": "+628124"}, route="default")
    keys = ["@send-sms", "default"]
    # priority 0 (create-otp) and 2 (block) beat 5 (send-sms) due at the same time; the
    # bulk row that has waited more than 5 levels x 60 s of aging beats them all
    assert claim_ids(clean_db, request(keys, claim=1)) == [old_bulk, otp, block, *bulk]


def test_an_explicit_priority_and_the_settings_defaults(conn: psycopg.Connection[Any],
                                                        clean_db: str) -> None:
    from outbox.store import apply_default_priorities  # noqa: PLC0415

    bulk = insert(conn, "send-sms", sms(1))
    urgent = insert(conn, "send-sms", sms(2), priority=0)
    assert claim_ids(clean_db, request(["@send-sms"], claim=1)) == [urgent, bulk]
    with psycopg.connect(clean_db) as connection:
        assert apply_default_priorities(connection, {"send-sms": 1, "create-otp": 0})
        assert not apply_default_priorities(connection, {"send-sms": 1, "create-otp": 0})
    later = insert(conn, "send-sms", sms(3))
    assert conn.execute("SELECT priority FROM outbox.message WHERE id = %s",
                        (later,)).fetchone() == (1,)
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        insert(conn, "send-sms", sms(4), priority=10)
    assert refused.value.diag.constraint_name == "message_priority_range"


def test_an_ordering_key_holds_back_only_its_own_later_rows(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    block = insert(conn, "block-msisdn", {"receiver": "+6281111"})
    unblock = insert(conn, "unblock-msisdn", {"receiver": "6281111"})  # same number, no +
    other = insert(conn, "block-msisdn", {"receiver": "+6282222"})
    user_a1 = insert(conn, "send-sms", sms(1), ordering_key="user-a")
    user_a2 = insert(conn, "send-sms", sms(2), ordering_key="user-a")
    keys = ["@block-msisdn", "@unblock-msisdn", "@send-sms"]
    assert sorted(claim_ids(clean_db, request(keys, claim=1))) == [block, other, user_a1]
    store = PostgresStore(psycopg.connect(clean_db))
    try:
        with store.transaction() as tx:  # the block waits to retry: the unblock waits too
            tx.schedule_retry([_rescheduled(block, time.time() + 3600)], 1)
            tx.mark_sent([other, user_a1], 1)
    finally:
        store.close()
    assert claim_ids(clean_db, request(keys, claim=2)) == [user_a2]
    assert claim_ids(clean_db, request(keys, claim=3)) == []
    conn.execute("UPDATE outbox.message SET state = 'failed' WHERE id = %s", (block,))
    assert claim_ids(clean_db, request(keys, claim=4)) == [unblock]  # a failed row lets go


def _rescheduled(row_id: int, at: float) -> Any:
    from outbox.store import Rescheduled  # noqa: PLC0415

    return Rescheduled(row_id, at, "busy")


def test_the_claim_reads_the_lane_index(conn: psycopg.Connection[Any], clean_db: str) -> None:
    conn.execute("""
        INSERT INTO outbox.message (command, data)
        SELECT 'send-sms', jsonb_build_object('receiver', '+62812' || n, 'message', 'm')
        FROM generate_series(1, 2000) AS n""")
    conn.execute("ANALYZE outbox.message")
    from outbox.store import CLAIM  # noqa: PLC0415

    plan = "\n".join(row[0] for row in conn.execute(
        "EXPLAIN " + CLAIM, {"keys": ["@send-sms"], "limit": 10, "lease": 30.0,
                             "owner": "x", "claim": 1, "aging": 60.0,
                             "max_priority": 9}))
    assert "message_claim" in plan
    assert "Seq Scan on message" not in plan


# --- relays -----------------------------------------------------------------------------


class SlowTransport(MemoryTransport):
    """Publishes one envelope at a time, each when ``release`` allows (a device's modem)."""

    def __init__(self, name: str, seconds: float) -> None:
        super().__init__(name)
        self.seconds = seconds
        self.in_flight = threading.Event()

    def publish(self, batch: Any) -> Any:
        failures = {}
        for envelope in batch:
            self.in_flight.set()
            time.sleep(self.seconds)
            failures.update(super().publish([envelope]))
        return failures


def run_service(settings: Settings, url: str, transports: dict[str, MemoryTransport]
                ) -> tuple[RelayService, threading.Event, threading.Thread]:
    service = RelayService(settings, url, transports_factory=lambda s: transports)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    return service, stop, thread


def test_a_slow_lane_never_delays_another_and_holds_no_transaction_open(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    slow, fast = SlowTransport("device", 0.5), MemoryTransport("broker")
    settings = Settings(transports={"default": "memory://", "device": "memory://"},
                        routes={"send-sms": "device"}, claim_timeout=10.0, poll_interval=0.2)
    for n in range(20):
        insert(conn, "send-sms", sms(n))
    _, stop, thread = run_service(settings, clean_db, {"device": slow, "default": fast})
    try:
        slow.in_flight.wait(SETTLE)
        mail = insert(conn, "send-email", {"receiver": "a@example.com", "subject": "s",
                                           "message": "m"})
        wait_until(lambda: any(e.id == mail for e in fast.delivered))
        assert len(slow.delivered) < 20  # the e-mail did not wait for the SMS
        # While the device works, no relay transaction stays open across its requests (a
        # broker's locked claim is a transaction of milliseconds: sample a few times)
        for _ in range(10):
            long_open = conn.execute("""
                SELECT count(*) FROM pg_stat_activity
                WHERE application_name LIKE 'outbox relay %%' AND datname = current_database()
                  AND xact_start < now() - interval '1 second'
            """).fetchone()
            assert long_open == (0,)
            time.sleep(0.1)
        names = {row[0] for row in conn.execute(
            "SELECT DISTINCT application_name FROM pg_stat_activity "
            "WHERE application_name LIKE 'outbox relay %%' AND datname = current_database()")}
        assert names and all(name.endswith(f":{os.getpid()}") for name in names)
        # once its pace is known, a 0.5 s device's claim holds what it publishes in half the
        # claim timeout (10 rows), not a batch: other relays can take the rest
        wait_until(lambda: len(slow.delivered) >= 2)
        held = conn.execute("SELECT count(*) FROM outbox.message WHERE claim IS NOT NULL "
                            "AND state = 'pending'").fetchone()
        assert held is not None and held[0] <= settings.claim_timeout
    finally:
        stop.set()
        thread.join(SETTLE)
    assert not thread.is_alive()
    # stopped mid-way: every row is sent or back in the queue, none left leased
    assert conn.execute("SELECT count(*) FROM outbox.message WHERE claim IS NOT NULL"
                        ).fetchone() == (0,)


def test_a_stop_hands_back_what_was_claimed_and_not_tried(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    slow = SlowTransport("default", 0.3)
    settings = Settings(transports={"default": "memory://"}, claim_timeout=60.0)
    ids = [insert(conn, "send-sms", sms(n)) for n in range(10)]
    before = dict(conn.execute("SELECT id, available_at FROM outbox.message").fetchall())
    stopping = threading.Event()
    store = PostgresStore(psycopg.connect(clean_db))
    relay = Relay(store, {"default": slow}, settings, stopping=stopping.is_set)
    relay.pace.observe(1, 0.3)  # it knows the device's pace already
    timer = threading.Timer(0.1, stopping.set)
    timer.start()
    try:
        report = relay.process_batch()
    finally:
        store.close()
    # a claim of a 0.3 s device holds about two seconds of work: 6 rows, not all 10
    assert report.claimed < 10
    assert report.sent >= 1 and report.sent + report.handed_back == report.claimed
    rows = conn.execute("SELECT id, state, attempts, available_at, claim FROM outbox.message "
                        "WHERE state = 'pending' ORDER BY id").fetchall()
    assert len(rows) == 10 - report.sent
    for row_id, _, attempts, available_at, claim in rows:
        assert (attempts, claim) == (0, None)
        assert available_at == before[row_id]  # its place in the queue, kept
    assert set(ids) >= {row[0] for row in rows}


def test_a_transport_that_stops_answering_keeps_the_untried_rows_in_place(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    def refuse(envelope: Envelope) -> Any:
        return TransientPublishError("connection refused")

    class Down(MemoryTransport):
        def publish(self, batch: Any) -> Any:
            raise TransientPublishError("connection refused")

    ids = [insert(conn, "send-sms", sms(n)) for n in range(5)]
    store = PostgresStore(psycopg.connect(clean_db))
    relay = Relay(store, {"default": Down()}, Settings(transports={"default": "memory://"}))
    relay.pace.observe(1, 0.6)  # a device at 0.6 s per request: claims of 3 rows
    try:
        report = relay.process_batch()
    finally:
        store.close()
    assert (report.claimed, report.retried, report.handed_back) == (3, 1, 2)
    attempts = dict(conn.execute("SELECT id, attempts FROM outbox.message").fetchall())
    assert attempts == {ids[0]: 1, **dict.fromkeys(ids[1:], 0)}


def test_configured_lanes_cover_every_command_and_route() -> None:
    settings = Settings(transports={"default": "memory://", "sms": "memory://",
                                    "mail": "memory://"},
                        routes={"send-sms": "sms", "send-email": "mail+sms"})
    lanes = configured_lanes(settings)
    assert set(lanes) == {"default", "sms", "mail", "mail+sms"}
    assert lanes["sms"].key_list() == ["@send-sms", "sms"]
    assert lanes["mail+sms"].key_list() == ["@send-email", "mail+sms"]
    assert "@create-otp" in lanes["default"].key_list()
    assert isinstance(lanes["default"], Lane)


def test_a_route_nobody_configured_is_found_and_its_rows_fail_with_a_reason(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    fast = MemoryTransport("default")
    settings = Settings(transports={"default": "memory://"}, poll_interval=0.2)
    typo = insert(conn, "send-sms", sms(1), route="defualt")
    junk = insert(conn, "send-sms", sms(2), route="+")
    spaced = insert(conn, "send-sms", sms(3), route=" default + default ")
    service, stop, thread = run_service(settings, clean_db, {"default": fast})
    try:
        wait_until(lambda: states(conn).get("pending", 0) == 0)
    finally:
        stop.set()
        thread.join(SETTLE)
    reasons = dict(conn.execute("SELECT id, coalesce(last_error, state) FROM outbox.message"
                                ).fetchall())
    assert "defualt" in reasons[typo] and "no configured transport" in reasons[typo]
    assert "not a route" in reasons[junk] or "no configured transport" in reasons[junk]
    assert reasons[spaced] in ("sent", "failed") or "route" in reasons[spaced]
    assert not service.errors


# --- relays as processes, against a device that takes seconds per SMS ---------------------


def device_env(device: OtpPi, **extra: str) -> dict[str, str]:
    return {"OUTBOX_CLAIM_TIMEOUT": "4s", "OUTBOX_LOG_LEVEL": "info", **extra}


@pytest.mark.slow
def test_a_frozen_relay_strands_nothing(conn: psycopg.Connection[Any], clean_db: str,
                                        tmp_path: Path, otp_pi: OtpPi) -> None:
    """Two relays share a slow device; one is frozen while it holds a claim. The other
    takes its rows once the lease runs out; after the thaw nothing is lost, and the frozen
    relay repeats at most the one request it had in flight."""
    otp_pi.sms_seconds = 0.2
    ids = [insert(conn, "send-sms", sms(n)) for n in range(30)]
    url = otp_pi.url("/api/sms")
    a = RelayProcess(clean_db, url, log=tmp_path / "a.log", env=device_env(otp_pi),
                     route_all=True)
    b = RelayProcess(clean_db, url, log=tmp_path / "b.log", env=device_env(otp_pi),
                     route_all=True)
    a.start()
    try:
        wait_until(lambda: conn.execute("SELECT count(*) FROM outbox.message "
                                        "WHERE claim IS NOT NULL").fetchone()[0] > 0)  # type: ignore[index]
        a.freeze()
        frozen_claim = {row[0] for row in conn.execute(
            "SELECT id FROM outbox.message WHERE claim IS NOT NULL AND state = 'pending'")}
        b.start()
        wait_until(lambda: states(conn) == {"sent": 30})
        assert frozen_claim  # b published what a held, after a's lease ran out
        a.thaw()
        time.sleep(1.0)
    finally:
        a.thaw()
        assert a.stop() == 0
        assert b.stop() == 0
    received = [int(r.json()["data"]["id"]) for r in otp_pi.requests if r.body]
    assert set(received) == set(ids)
    duplicates = len(received) - len(set(received))
    assert duplicates <= len(frozen_claim)  # at most the claim it held when it froze


@pytest.mark.slow
def test_sigterm_is_prompt_with_a_slow_device_and_hands_back_the_claim(
        conn: psycopg.Connection[Any], clean_db: str, tmp_path: Path, otp_pi: OtpPi) -> None:
    otp_pi.sms_seconds = 1.0
    for n in range(40):
        insert(conn, "send-sms", sms(n))
    relay = RelayProcess(clean_db, otp_pi.url("/api/sms"), log=tmp_path / "relay.log",
                         env=device_env(otp_pi, OUTBOX_CLAIM_TIMEOUT="60s"), route_all=True)
    relay.start()
    try:
        wait_until(lambda: len(otp_pi.requests) >= 2)
        assert relay.process is not None
        relay.process.send_signal(signal.SIGTERM)
        relay.process.wait(SETTLE)  # the request in flight finishes; the rest goes back
        assert relay.process.returncode == 0
    finally:
        relay.stop()
    sent = states(conn).get("sent", 0)
    assert sent <= len(otp_pi.requests)
    leftovers = conn.execute("SELECT count(*), max(attempts), count(claim) FROM outbox.message "
                             "WHERE state = 'pending'").fetchone()
    assert leftovers is not None
    assert leftovers[0] == 40 - sent and leftovers[1] == 0 and leftovers[2] == 0


@pytest.mark.slow
def test_block_and_unblock_arrive_in_order_through_a_flaky_device_and_two_relays(
        conn: psycopg.Connection[Any], clean_db: str, tmp_path: Path, otp_pi: OtpPi) -> None:
    """30 numbers, 6 block/unblock commands each, a device refusing a quarter of the
    requests, 2 relay processes of 2 workers: every number ends as its last command says."""
    otp_pi.transient_ratio = 0.25
    numbers = [f"+62813{n:06d}" for n in range(30)]
    expected = {}
    for round_ in range(6):
        for number in numbers:
            command = "block-msisdn" if round_ % 2 == 0 else "unblock-msisdn"
            insert(conn, command, {"receiver": number})
            expected[number] = command == "block-msisdn"
    env = device_env(otp_pi, OUTBOX_WORKERS="2", OUTBOX_BACKOFF_BASE="50ms",
                     OUTBOX_BACKOFF_MAX="500ms", OUTBOX_CLAIM_TIMEOUT="30s")
    relays = [RelayProcess(clean_db, otp_pi.url("/api/block"), log=tmp_path / f"r{n}.log",
                           env=env, route_all=True) for n in range(2)]
    for relay in relays:
        relay.start()
    try:
        wait_until(lambda: states(conn) == {"sent": 180}, timeout=180)
    finally:
        for relay in relays:
            assert relay.stop() == 0
    wrong = [number for number in numbers if (number in otp_pi.blocked) != expected[number]]
    assert wrong == []


def test_status_shows_claims_per_relay_priorities_and_held_keys(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    from outbox.admin import read_status  # noqa: PLC0415

    for n in range(3):
        insert(conn, "send-sms", sms(n))
    insert(conn, "create-otp", {"receiver": "+628123", "reference": "r", "message": "%s"})
    first = insert(conn, "block-msisdn", {"receiver": "+6281111"}, attempts=1,
                   available_at=_ago(-600))  # waits to retry, holding back the unblock
    insert(conn, "unblock-msisdn", {"receiver": "+6281111"})
    claim_ids(clean_db, request(["@send-sms"], limit=2, lease=0.1, claim=7))
    time.sleep(0.2)  # that relay froze: its lease ran out
    settings = Settings(transports={"default": "memory://"})
    status = read_status(conn, settings)
    assert dict(status.priorities) == {0: 1, 2: 2, 5: 3}
    assert [(c.relay, c.rows, c.expired) for c in status.claims] == [("test:1", 2, 2)]
    assert (status.held_keys.keys, status.held_keys.rows_behind) == (1, 1)
    shown = status.as_json()
    assert shown["claims"]["test:1"]["expired"] == 2
    assert shown["pending_by_priority"] == {"0": 1, "2": 2, "5": 3}
    assert first


def test_the_sql_function_takes_a_priority_and_an_ordering_key(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    row = conn.execute(
        "SELECT outbox.enqueue('send-sms', %s, priority => 1, ordering_key => 'user-1')",
        (Jsonb(sms(1)),)).fetchone()
    assert row is not None
    assert conn.execute("SELECT priority, ordering_key FROM outbox.message WHERE id = %s",
                        (row[0],)).fetchone() == (1, "user-1")
    for wrong in (10, -1, 70000):
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute("SELECT outbox.enqueue('send-sms', %s, priority => %s)",
                         (Jsonb(sms(2)), wrong))
        assert refused.value.diag.constraint_name == "message_priority_range"
