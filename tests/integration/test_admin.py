"""The operator's Python API against the real Postgres: status, and failed rows listed,
retried and discarded by filter, in batches, with ids kept."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox import admin
from outbox.admin import FailedFilter
from outbox.settings import Settings
from tests.conftest import rows_by_state

pytestmark = pytest.mark.integration

#: send-sms goes to "sms" unless a row names its own route; everything else to "default"
SETTINGS = Settings(transports={"default": "memory://", "sms": "memory://"},
                    routes={"send-sms": "sms"})


def insert(connection: psycopg.Connection[Any], command: str, count: int, *,
           state: str = "pending", age: str = "0 seconds", route: str | None = None,
           error: str | None = None) -> list[int]:
    data = {"send-sms": {"receiver": "+6281234567890", "message": "Your code is 4711"},
            "send-email": {"receiver": "ann@example.com", "subject": "Hi", "message": "Text"},
            "block-msisdn": {"receiver": "+6281234567890"}}[command]
    rows = connection.execute(
        """INSERT INTO outbox.message (command, data, route, created_at)
           SELECT %s, %s, %s, now() - %s::interval FROM generate_series(1, %s)
           RETURNING id""", (command, Jsonb(data), route, age, count)).fetchall()
    ids = [row[0] for row in rows]
    if state != "pending":
        connection.execute(
            """UPDATE outbox.message SET state = %s, attempts = 3, last_error = %s,
                      sent_at = CASE WHEN %s = 'sent' THEN now() END
               WHERE id = ANY(%s)""", (state, error, state, ids))
    return ids


def test_status_counts_states_and_pending_rows_per_effective_route(
        conn: psycopg.Connection[Any]) -> None:
    insert(conn, "send-sms", 3, age="10 minutes")
    insert(conn, "send-sms", 2, route="default")
    insert(conn, "send-email", 1, age="1 minute")
    insert(conn, "send-sms", 4, state="sent")
    insert(conn, "send-sms", 2, state="failed")
    insert(conn, "block-msisdn", 1, state="expired")
    conn.execute("UPDATE outbox.message SET available_at = now() + interval '1 hour', "
                 "attempts = 1 WHERE id = 1")

    status = admin.read_status(conn, SETTINGS)

    assert status.counts == {"pending": 6, "failed": 2, "sent": 4, "expired": 1}
    assert status.estimated == ()  # a small table is counted exactly
    routes = {route.route: route for route in status.routes}
    assert set(routes) == {"sms", "default"}
    assert (routes["sms"].pending, routes["sms"].due, routes["sms"].retrying) == (3, 2, 1)
    assert 595 < routes["sms"].oldest_pending_age_seconds < 700
    assert (routes["default"].pending, routes["default"].due) == (3, 3)
    assert 55 < routes["default"].oldest_pending_age_seconds < 120
    assert status.oldest_pending_age_seconds == routes["sms"].oldest_pending_age_seconds
    assert status.rate.sent == 4
    assert status.rate.window_seconds == admin.RATE_WINDOW_SECONDS
    shown = status.as_json()
    assert shown["counts"]["sent"] == 4 and shown["routes"]["sms"]["pending"] == 3


def test_status_estimates_sent_and_expired_on_a_big_table(
        conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    insert(conn, "send-sms", 900, state="sent")
    insert(conn, "send-sms", 100, state="expired")
    insert(conn, "send-sms", 7, state="failed")
    insert(conn, "send-sms", 5)
    conn.execute("ANALYZE outbox.message")
    monkeypatch.setattr(admin, "EXACT_COUNT_MAX_PAGES", 0)  # as if the table were huge

    status = admin.read_status(conn, SETTINGS)

    assert status.estimated == ("sent", "expired")
    assert (status.counts["pending"], status.counts["failed"]) == (5, 7)  # always exact
    assert status.counts["sent"] == pytest.approx(900, rel=0.1)
    assert status.counts["expired"] == pytest.approx(100, rel=0.3)


def test_the_rate_is_capped_to_the_newest_rows(conn: psycopg.Connection[Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ids = insert(conn, "send-sms", 50, state="sent")
    conn.execute("UPDATE outbox.message SET sent_at = now() - (id - %s) * interval '1 second' "
                 "WHERE id = ANY(%s)", (ids[0], ids))
    monkeypatch.setattr(admin, "RATE_SAMPLE_CAP", 10)
    rate = admin.read_status(conn, SETTINGS).rate
    assert rate.sent == 10
    assert 8 <= rate.window_seconds <= 12  # the span the ten newest rows cover
    assert rate.per_second == pytest.approx(1.0, rel=0.3)


def test_list_masks_receivers_and_filters_by_command_route_age_and_id(
        conn: psycopg.Connection[Any]) -> None:
    old_sms = insert(conn, "send-sms", 2, state="failed", age="3 days",
                     error="device refused +6281234567890 (blocked)")
    new_sms = insert(conn, "send-sms", 1, state="failed", age="1 minute")
    own_route = insert(conn, "send-sms", 1, state="failed", route="default")
    mail = insert(conn, "send-email", 1, state="failed", age="2 hours")
    insert(conn, "send-sms", 3, state="sent", age="3 days")

    def ids(where: FailedFilter, **kwargs: Any) -> list[int]:
        return sorted(row.id for row in admin.list_failed(conn, where, settings=SETTINGS,
                                                          **kwargs))

    everything = admin.list_failed(conn, settings=SETTINGS)
    assert len(everything) == 5
    assert everything[0].id in new_sms + own_route  # newest first
    for row in everything:
        assert row.receiver in ("***90", "***om")
        assert "6281234567890" not in (row.last_error or "")
    assert "***90" in next(row.last_error or "" for row in everything if row.id == old_sms[0])

    assert ids(FailedFilter(command="send-email")) == mail
    assert ids(FailedFilter(route="sms")) == sorted(old_sms + new_sms)
    assert ids(FailedFilter(route="default")) == sorted(own_route + mail)
    assert ids(FailedFilter(older_than=86400)) == old_sms
    assert ids(FailedFilter(newer_than=3600)) == sorted(new_sms + own_route)
    assert ids(FailedFilter(ids=(old_sms[0], mail[0], 9999))) == [old_sms[0], mail[0]]
    assert ids(FailedFilter(route="sms", older_than=3600)) == old_sms
    assert len(admin.list_failed(conn, settings=SETTINGS, limit=2)) == 2
    assert admin.count_failed(conn, FailedFilter(route="sms"), settings=SETTINGS) == 3
    assert everything[0].as_json()["created_at"].startswith("20")


def test_retry_keeps_the_id_resets_attempts_and_wakes_the_relays(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    failed = insert(conn, "send-sms", 3, state="failed", error="boom")
    other = insert(conn, "send-email", 2, state="failed")
    conn.execute("UPDATE outbox.message SET available_at = now() + interval '1 day' "
                 "WHERE id = ANY(%s)", (failed,))
    notifications: list[str] = []
    with psycopg.connect(clean_db, autocommit=True) as listener:
        listener.execute("LISTEN outbox_message")
        retried = admin.retry_failed(conn, FailedFilter(command="send-sms"), settings=SETTINGS)
        thread = threading.Thread(target=lambda: notifications.extend(
            n.channel for n in listener.notifies(timeout=1.0, stop_after=1)))
        thread.start()
        thread.join()
    assert retried == 3
    assert notifications == ["outbox_message"]
    rows = conn.execute("SELECT id, state, attempts, last_error, available_at <= now() "
                        "FROM outbox.message WHERE id = ANY(%s) ORDER BY id",
                        (failed,)).fetchall()
    assert rows == [(row_id, "pending", 0, None, True) for row_id in failed]
    assert rows_by_state(conn) == {"pending": 3, "failed": 2}
    assert admin.count_failed(conn, FailedFilter(ids=tuple(other))) == 2


def test_bulk_retry_runs_in_batches_and_touches_each_row_once(
        conn: psycopg.Connection[Any]) -> None:
    insert(conn, "send-sms", 25, state="failed")
    seen: list[int] = []
    assert admin.retry_failed(conn, settings=SETTINGS, batch_size=10,
                              progress=seen.append) == 25
    assert seen == [10, 20, 25]
    assert rows_by_state(conn) == {"pending": 25}


def test_retry_skips_rows_another_session_holds(conn: psycopg.Connection[Any],
                                                clean_db: str) -> None:
    held, free = insert(conn, "send-sms", 2, state="failed")
    with psycopg.connect(clean_db) as other:
        other.execute("SELECT 1 FROM outbox.message WHERE id = %s FOR UPDATE", (held,))
        assert admin.retry_failed(conn, settings=SETTINGS) == 1  # no wait for the lock
        other.rollback()
    states = dict(conn.execute("SELECT id, state FROM outbox.message").fetchall())
    assert states == {held: "failed", free: "pending"}


def test_discard_deletes_only_matching_failed_rows(conn: psycopg.Connection[Any]) -> None:
    old = insert(conn, "send-sms", 12, state="failed", age="40 days")
    recent = insert(conn, "send-sms", 2, state="failed")
    insert(conn, "send-sms", 3, state="sent", age="40 days")
    insert(conn, "send-sms", 1, age="40 days")
    assert admin.discard_failed(conn, FailedFilter(older_than=30 * 86400), settings=SETTINGS,
                                batch_size=5) == len(old)
    assert rows_by_state(conn) == {"failed": 2, "sent": 3, "pending": 1}
    assert admin.discard_failed(conn, FailedFilter(ids=(recent[0],))) == 1


def test_inside_a_callers_transaction_nothing_commits_on_its_own(clean_db: str,
                                                                  conn: psycopg.Connection[Any],
                                                                  ) -> None:
    insert(conn, "send-sms", 3, state="failed")
    with psycopg.connect(clean_db) as connection:
        connection.execute("SELECT 1")  # a transaction is open
        assert admin.retry_failed(connection, settings=SETTINGS, batch_size=2) == 3
        connection.rollback()
    assert rows_by_state(conn) == {"failed": 3}


def test_parse_ids_accepts_repeats_and_commas() -> None:
    assert admin.parse_ids(["3", "5, 8", ""]) == (3, 5, 8)
    with pytest.raises(ValueError, match="not a row id"):
        admin.parse_ids(["x"])
    with pytest.raises(ValueError, match="not a row id"):
        admin.parse_ids(["0"])
