"""Retention against the real Postgres: only what the settings allow goes, pending rows never,
one purger at a time, small batches; texts blanked once a row is terminal."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg import errors
from psycopg.types.json import Jsonb

from outbox.errors import PermanentPublishError
from outbox.housekeeping import BacklogSampler, Housekeeper
from outbox.relay import Relay
from outbox.retention import PurgeReport, count_purgeable, purge, vacuum_if_nobody_does
from outbox.settings import Settings
from outbox.store import PostgresStore
from outbox.testing import MemoryTransport
from tests.conftest import rows_by_state

pytestmark = pytest.mark.integration

DAY = 86400.0
SETTINGS = Settings(transports={"default": "memory://"}, sent_retention=7 * DAY,
                    failed_retention=30 * DAY)


def insert(connection: psycopg.Connection[Any], count: int, state: str, age_days: float,
           ) -> set[int]:
    rows = connection.execute(
        """INSERT INTO outbox.message (command, data, created_at)
           SELECT 'send-sms', jsonb_build_object('receiver', '+62812' || lpad(n::text, 7, '0'),
                                                 'message', 'hello'),
                  now() - make_interval(secs => %s)
           FROM generate_series(1, %s) AS n RETURNING id""",
        (age_days * DAY, count)).fetchall()
    ids = {row[0] for row in rows}
    if state != "pending":
        connection.execute("UPDATE outbox.message SET state = %s, sent_at = CASE WHEN %s = "
                           "'sent' THEN created_at END WHERE id = ANY(%s)",
                           (state, state, list(ids)))
    return ids


def remaining(connection: psycopg.Connection[Any]) -> set[int]:
    return {row[0] for row in connection.execute("SELECT id FROM outbox.message")}


def test_purge_deletes_only_what_retention_allows(conn: psycopg.Connection[Any]) -> None:
    gone = insert(conn, 30, "sent", 8) | insert(conn, 4, "expired", 8) | \
        insert(conn, 3, "failed", 31)
    kept = (insert(conn, 5, "sent", 6) | insert(conn, 2, "expired", 1)
            | insert(conn, 6, "failed", 8)     # failed rows are kept longer than sent ones
            | insert(conn, 7, "pending", 400)  # pending rows are never purged, however old
            | insert(conn, 2, "pending", 0))
    assert count_purgeable(conn, SETTINGS) == PurgeReport(sent=30, expired=4, failed=3,
                                                          dry_run=True)
    assert remaining(conn) == gone | kept  # counting deleted nothing

    batches: list[PurgeReport] = []
    report = purge(conn, SETTINGS, batch_size=10, on_batch=batches.append)

    assert report == PurgeReport(sent=30, expired=4, failed=3)
    assert remaining(conn) == kept
    assert [b.total for b in batches] == [10, 20, 30, 34, 37]  # at most ten per transaction
    assert purge(conn, SETTINGS) == PurgeReport()  # nothing left to do


def test_purge_removes_managed_otps_expired_longer_than_the_retention(
        conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """INSERT INTO outbox.otp (reference, key_id, digest, message_id, expires_at)
           SELECT 'ref-' || n, 'k0', decode(repeat('ab', 32), 'hex'), n,
                  now() - make_interval(secs => %s * n - 43200)
           FROM generate_series(1, 10) AS n""", (DAY,))
    report = purge(conn, SETTINGS, batch_size=2)
    assert report is not None
    assert report.otps == 3  # expired 7.5, 8.5 and 9.5 days ago; a 7-day retention keeps the rest
    left = {row[0] for row in conn.execute("SELECT reference FROM outbox.otp")}
    assert left == {f"ref-{n}" for n in range(1, 8)}


def test_purge_leaves_rows_another_session_holds(conn: psycopg.Connection[Any],
                                                 clean_db: str) -> None:
    old = sorted(insert(conn, 3, "sent", 10))
    with psycopg.connect(clean_db) as other:
        other.execute("SELECT 1 FROM outbox.message WHERE id = %s FOR UPDATE", (old[0],))
        report = purge(conn, SETTINGS)
        other.rollback()
    assert report is not None and report.sent == 2
    assert remaining(conn) == {old[0]}


def test_one_purger_at_a_time(conn: psycopg.Connection[Any], clean_db: str) -> None:
    insert(conn, 5, "sent", 10)
    with psycopg.connect(clean_db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended('outbox.retention', 0))")
        assert purge(conn, SETTINGS) is None  # the other one is at it: skip, do not wait
        assert len(remaining(conn)) == 5
        other.execute("SELECT pg_advisory_unlock(hashtextextended('outbox.retention', 0))")
    assert purge(conn, SETTINGS) == PurgeReport(sent=5)
    # the lock is released after a run: another session can take it at once
    with psycopg.connect(clean_db, autocommit=True) as other:
        row = other.execute(
            "SELECT pg_try_advisory_lock(hashtextextended('outbox.retention', 0))").fetchone()
        assert row == (True,)


def test_on_batch_can_stop_a_purge_between_batches(conn: psycopg.Connection[Any]) -> None:
    insert(conn, 25, "sent", 10)
    report = purge(conn, SETTINGS, batch_size=10, on_batch=lambda so_far: False)
    assert report == PurgeReport(sent=10, interrupted=True)
    assert len(remaining(conn)) == 15


def test_purge_needs_a_connection_outside_a_transaction(clean_db: str) -> None:
    with psycopg.connect(clean_db) as connection:
        connection.execute("SELECT 1")
        with pytest.raises(ValueError, match="outside a transaction"):
            purge(connection, SETTINGS)


def test_purged_rows_are_counted_in_the_metrics(conn: psycopg.Connection[Any]) -> None:
    def purged() -> float:
        return REGISTRY.get_sample_value("outbox_purged_messages_total",
                                         {"state": "expired"}) or 0.0

    before = purged()
    insert(conn, 3, "expired", 10)
    purge(conn, SETTINGS)
    assert purged() == before + 3


def test_the_relay_process_purges_every_purge_interval(conn: psycopg.Connection[Any],
                                                       clean_db: str) -> None:
    settings = Settings(transports={"default": "memory://"}, sent_retention=60.0,
                        purge_interval=0.2)
    insert(conn, 4, "sent", 1)
    fresh = insert(conn, 2, "sent", 0)
    stop = threading.Event()
    thread = Housekeeper(settings, clean_db, sample_metrics=False).start(stop)
    try:
        deadline = time.monotonic() + 10
        while remaining(conn) != fresh and time.monotonic() < deadline:
            time.sleep(0.05)
        assert remaining(conn) == fresh
        # later rows age past the retention and go on a later turn
        conn.execute("UPDATE outbox.message SET created_at = now() - interval '1 hour'")
        deadline = time.monotonic() + 10
        while remaining(conn) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert remaining(conn) == set()
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_the_purger_vacuums_when_autovacuum_is_off(conn: psycopg.Connection[Any],
                                                   clean_db: str) -> None:
    conn.execute("ALTER TABLE outbox.message SET (autovacuum_enabled = false)")
    try:
        insert(conn, 3000, "sent", 10)
        conn.execute("DELETE FROM outbox.message")
        conn.execute("SELECT pg_stat_force_next_flush()")  # statistics reach the view now
        conn.execute("SELECT 1")

        def dead_rows() -> int:
            row = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables "
                               "WHERE relid = 'outbox.message'::regclass").fetchone()
            return int(row[0]) if row else 0

        deadline = time.monotonic() + 10
        while dead_rows() < 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        with psycopg.connect(clean_db, autocommit=True) as purger:
            assert vacuum_if_nobody_does(purger)
            assert not vacuum_if_nobody_does(purger)  # nothing left for it to do
        with psycopg.connect(clean_db) as in_a_transaction:
            assert not vacuum_if_nobody_does(in_a_transaction)
    finally:
        conn.execute("ALTER TABLE outbox.message RESET (autovacuum_enabled)")
    with psycopg.connect(clean_db, autocommit=True) as purger:
        assert not vacuum_if_nobody_does(purger)  # autovacuum's job again


def test_blank_terminal_texts_blanks_sent_and_expired_rows_but_keeps_failed(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    def fail_one(envelope: Any) -> PermanentPublishError | None:
        return PermanentPublishError("refused") if envelope.id == 2 else None

    for data in ({"receiver": "+6281234567890", "message": "sent text"},
                 {"receiver": "+6281234567890", "message": "failed text"},
                 {"receiver": "a@example.com", "subject": "Subject", "message": "expiring",
                  "expiration": time.time() + 0.5}):
        command = "send-email" if "@" in data["receiver"] else "send-sms"  # type: ignore[operator]
        conn.execute("INSERT INTO outbox.message (command, data) VALUES (%s, %s)",
                     (command, Jsonb(data)))
    time.sleep(0.6)
    settings = Settings(transports={"default": "memory://"}, blank_terminal_texts=True)
    with psycopg.connect(clean_db) as connection:
        store = PostgresStore(connection, blank_texts=True)
        report = Relay(store, {"default": MemoryTransport(fail=fail_one)}, settings,
                       ).drain()
    assert (report.sent, report.failed, report.expired) == (1, 1, 1)
    rows = conn.execute("SELECT state, data FROM outbox.message ORDER BY id").fetchall()
    assert rows == [
        ("sent", {"receiver": "+6281234567890"}),
        ("failed", {"receiver": "+6281234567890", "message": "failed text"}),
        ("expired", {"receiver": "a@example.com", "expiration": rows[2][1]["expiration"]}),
    ]
    assert rows_by_state(conn) == {"sent": 1, "failed": 1, "expired": 1}


def test_edits_of_pending_rows_are_still_checked(conn: psycopg.Connection[Any]) -> None:
    insert(conn, 1, "pending", 0)
    with pytest.raises(errors.CheckViolation):
        conn.execute("UPDATE outbox.message SET data = data - 'message'")


def test_backlog_gauges_reset_routes_that_emptied(conn: psycopg.Connection[Any]) -> None:
    settings = Settings(transports={"default": "memory://", "sms": "memory://"})
    conn.execute("INSERT INTO outbox.message (command, data, route) VALUES "
                 "('send-sms', '{\"receiver\": \"+6281234567\", \"message\": \"m\"}', "
                 "'default+sms')")

    def pending(route: str) -> float | None:
        return REGISTRY.get_sample_value("outbox_pending_messages", {"route": route})

    sampler = BacklogSampler(settings)
    sampler.sample(conn)
    assert (pending("default+sms"), pending("default"), pending("sms")) == (1, 0, 0)
    conn.execute("DELETE FROM outbox.message")
    sampler.sample(conn)
    assert pending("default+sms") == 0
