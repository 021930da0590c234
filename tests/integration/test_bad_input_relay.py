"""Issue 13, item 1: whatever plain SQL puts in a row, the relay stays up and every row ends.

Hypothesis writes arbitrary column values and arbitrary jsonb through plain ``INSERT``s (and
an operator's ``UPDATE``s) while a real relay (``RelayService`` with its real Redis
transports) runs. For each example: the relay is alive, each row was refused at the door or
ended sent, failed or expired with a reason (none due and still pending), and the good rows
written around the bad ones were sent. ``make chaos`` runs the same strategies longer
(``python -m bench.chaos --only bad-input``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from bench.badinput import UPDATES, insert_row, row_case, unfinished, update_row
from outbox.relay import DISCOVERY_INTERVAL, RelayService
from outbox.settings import Settings
from tests.support.brokers import REDIS_URL

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("OUTBOX_BAD_INPUT_EXAMPLES", "200"))
GOOD = {"receiver": "+6281234567890", "message": "a good row"}


@pytest.fixture
def relay(clean_db: str) -> Iterator[RelayService]:
    topic = f"bad-input-{uuid.uuid4().hex[:8]}"
    redis = f"{REDIS_URL}?accept_no_subscriber=true&timeout=5&topic="
    config = Settings(transports={"default": redis + topic, "sms": redis + topic + "-sms"},
                      otp_secret="bad-input-" + "s" * 32, poll_interval=0.2,
                      backoff_base=0.05, backoff_max=0.2, max_attempts=2, purge_interval=0,
                      claim_timeout=10.0)
    service = RelayService(config, clean_db)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="bad-input-relay")
    thread.start()
    service_thread[0] = thread
    try:
        yield service
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


service_thread: list[threading.Thread] = [threading.Thread()]


def good_row(conn: psycopg.Connection[Any]) -> int:
    found = conn.execute("INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s) "
                         "RETURNING id", (Jsonb(GOOD),)).fetchone()
    assert found is not None
    return int(found[0])


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(rows=st.lists(row_case(), min_size=1, max_size=4),
       updates=st.lists(st.tuples(st.integers(min_value=0, max_value=3), UPDATES), max_size=2))
def test_every_row_is_refused_or_ends_with_a_reason_and_the_relay_stays_up(
        relay: RelayService, conn: psycopg.Connection[Any], rows: list[dict[str, Any]],
        updates: list[tuple[int, str]]) -> None:
    before = good_row(conn)
    accepted = [row_id for row_id, outcome in (insert_row(conn, row) for row in rows)
                if row_id is not None]
    ended_by_operator: set[int] = set()
    for index, assignment in updates:
        if accepted:
            row_id = accepted[index % len(accepted)]
            if (update_row(conn, row_id, assignment) == "accepted"
                    and assignment.startswith("state = 'failed'")):
                ended_by_operator.add(row_id)  # its reason is the operator's to give
    after = good_row(conn)
    ids = [before, *(row_id for row_id in accepted if row_id not in ended_by_operator), after]

    # A row on a lane nobody configured (a route to no transport) waits for the relay to
    # discover its lane, and so do the later rows of its ordering key: slow, not stuck.
    deadline = time.monotonic() + DISCOVERY_INTERVAL + 30
    while (left := unfinished(conn, ids)) and time.monotonic() < deadline:
        assert service_thread[0].is_alive() and not relay.errors, relay.errors
        time.sleep(0.05)

    assert service_thread[0].is_alive() and not relay.errors, relay.errors
    assert left == [], f"rows due but not ended, or ended without a reason: {left}"
    states = dict(conn.execute("SELECT id, state FROM outbox.message WHERE id = ANY(%s)",
                               ([before, after],)).fetchall())
    assert states == {before: "sent", after: "sent"}


#: rows the door refuses today, written as if they predated migration 0013 (the trigger off)
SLIPPED_PAST = [
    ("data", '{"receiver": "+6281234567890", "message": "deep", "x": ' + "[" * 3000 + "]" * 3000
     + "}"),
    ("data", '{"receiver": "+6281234567890", "message": "huge number", "x": 1e400}'),
    ("data", '{"receiver": "+6281234567890", "message": "big id", "id": 18446744073709551616}'),
    ("data", '{"receiver": " +6281234567890\\t", "message": "untrimmed"}'),
    ("created_at", "infinity"),
    ("created_at", "-infinity"),
    ("expires_at", "-infinity"),
    ("expires_at", "infinity"),
    ("available_at", "-infinity"),
    ("attempts", "1000001"),
    ("dedup_key", ""),
    ("route", " + "),
    ("route", "nowhere"),
]


def test_rows_from_before_the_door_cannot_stop_the_relay(
        relay: RelayService, conn: psycopg.Connection[Any]) -> None:
    before = good_row(conn)
    ids = []
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # no trigger: as of old
        for column, value in SLIPPED_PAST:
            data = value if column == "data" else '{"receiver": "+6281234567890", "message": "m"}'
            extra = "" if column == "data" else f", {column}"
            extra_value = "" if column == "data" else ", %s"
            params: list[Any] = [data] if column == "data" else [data, value]
            found = conn.execute(
                f"INSERT INTO outbox.message (command, data, priority{extra}) "
                f"VALUES ('send-sms', %s::jsonb, 5{extra_value}) RETURNING id", params).fetchone()
            assert found is not None
            ids.append(int(found[0]))
    after = good_row(conn)

    deadline = time.monotonic() + 30
    while (left := unfinished(conn, [before, *ids, after])) and time.monotonic() < deadline:
        assert service_thread[0].is_alive() and not relay.errors, relay.errors
        time.sleep(0.1)
    assert service_thread[0].is_alive() and not relay.errors, relay.errors
    assert left == []
    endings = {row[0]: (row[1], row[2]) for row in conn.execute(
        "SELECT id, state, last_error FROM outbox.message WHERE id = ANY(%s)",
        ([before, *ids, after],))}
    assert endings[before][0] == endings[after][0] == "sent"
    for row_id, (column, value) in zip(ids, SLIPPED_PAST, strict=True):
        state, reason = endings[row_id]
        assert state in ("sent", "failed", "expired"), (column, value, state)
        assert state == "sent" or reason, (column, value)


@pytest.mark.parametrize("route", ["\tnowhere", "default\n", "\u00a0default", " a | \t b"])
def test_a_route_with_odd_whitespace_ends_and_frees_its_ordering_key(
        relay: RelayService, conn: psycopg.Connection[Any], route: str) -> None:
    # Found by the property test: the lane of such a route was filed under a key trimmed of
    # its tab, matched no row, and the row (and the unblock behind it) stayed pending.
    block = conn.execute("INSERT INTO outbox.message (command, data, route) "
                         "VALUES ('block-msisdn', %s, %s) RETURNING id",
                         (Jsonb({"receiver": "21775168"}), route)).fetchone()
    unblock = conn.execute("INSERT INTO outbox.message (command, data) "
                           "VALUES ('unblock-msisdn', %s) RETURNING id",
                           (Jsonb({"receiver": "21775168"}),)).fetchone()
    assert block is not None and unblock is not None
    ids = [block[0], unblock[0]]
    deadline = time.monotonic() + DISCOVERY_INTERVAL + 30
    while (left := unfinished(conn, ids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []
    states = dict(conn.execute("SELECT id, state FROM outbox.message WHERE id = ANY(%s)",
                               (ids,)).fetchall())
    assert states[unblock[0]] == "sent"
    assert not relay.errors
