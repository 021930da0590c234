"""The relay against the real Postgres: claims, outcomes, concurrency, wake-ups, outages."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox import SendSms, enqueue
from outbox.errors import PermanentPublishError, PublishError, TransientPublishError
from outbox.relay import Relay, RelayService
from outbox.settings import Settings
from outbox.signals import StopRequest
from outbox.store import PostgresStore
from outbox.testing import MemoryTransport
from outbox.transports.base import Envelope
from tests.conftest import rows_by_state
from tests.support.log_capture import rendered_logs

pytestmark = pytest.mark.integration

SETTINGS = Settings(transports={"default": "memory://"})


def insert_sms(connection: psycopg.Connection[Any], count: int, **extra: Any) -> list[int]:
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s) RETURNING id",
            [(Jsonb({"receiver": f"+62812{n:06d}", "message": f"m{n}", **extra}),)
             for n in range(count)], returning=True)
        ids = []
        while True:
            ids.append(cursor.fetchone()[0])  # type: ignore[index]
            if not cursor.nextset():
                break
    return ids


def make_relay(url: str, transport: MemoryTransport, settings: Settings = SETTINGS) -> Relay:
    return Relay(PostgresStore(psycopg.connect(url)), {"default": transport}, settings)


def test_committed_rows_are_sent_and_recorded(conn: psycopg.Connection[Any], clean_db: str) -> None:
    ids = insert_sms(conn, 5)
    transport = MemoryTransport()
    relay = make_relay(clean_db, transport)
    try:
        assert relay.drain().sent == 5
    finally:
        relay.store.close()
    assert [e.id for e in transport.delivered] == ids
    rows = conn.execute("SELECT state, attempts, sent_at IS NOT NULL, last_error FROM "
                        "outbox.message ORDER BY id").fetchall()
    assert rows == [("sent", 1, True, None)] * 5


def test_a_failed_publish_schedules_a_durable_retry(conn: psycopg.Connection[Any],
                                                     clean_db: str) -> None:
    [message_id] = insert_sms(conn, 1)
    transport = MemoryTransport(fail=lambda e: TransientPublishError("broker away"))
    relay = make_relay(clean_db, transport, Settings(transports={"default": "memory://"},
                                                     backoff_base=20.0))
    try:
        before = time.time()
        assert relay.process_batch().retried == 1
        assert relay.process_batch().claimed == 0  # not due yet
        due = relay.store.next_due(relay.lane.key_list())
    finally:
        relay.store.close()
    state, attempts, delay, error = conn.execute(
        "SELECT state, attempts, extract(epoch FROM available_at)::float8, last_error "
        "FROM outbox.message WHERE id = %s", (message_id,)).fetchone()  # type: ignore[misc]
    assert (state, attempts, error) == ("pending", 1, "broker away")
    assert before + 10 - 1 <= delay <= time.time() + 20
    assert due is not None and 8 < due <= 20


def test_permanent_failures_expiry_and_poison_rows_do_not_block_good_rows(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    good = insert_sms(conn, 3)
    refused = insert_sms(conn, 1, message="refused by the broker")[0]
    expired = insert_sms(conn, 1, expiration=int(time.time()) + 600)[0]
    conn.execute("UPDATE outbox.message SET expires_at = now() - interval '1 second' "
                 "WHERE id = %s", (expired,))
    conn.execute("SET session_replication_role = replica")  # bypass the insert checks
    poison = conn.execute("INSERT INTO outbox.message (command, data, priority) VALUES "
                          "('send-sms', '\"not an object\"', 5) RETURNING id").fetchone()[0]  # type: ignore[index]
    conn.execute("SET session_replication_role = origin")

    def refuse(envelope: Envelope) -> PublishError | None:
        return PermanentPublishError("payload refused") if envelope.id == refused else None

    transport = MemoryTransport(fail=refuse)
    relay = make_relay(clean_db, transport)
    try:
        relay.drain()
    finally:
        relay.store.close()
    states = dict(conn.execute("SELECT id, state || ':' || coalesce(last_error, '') "
                               "FROM outbox.message").fetchall())
    assert all(states[i] == "sent:" for i in good)
    assert states[refused] == "failed:payload refused"
    assert states[expired] == "expired:expired before it could be published"
    assert states[poison] == "failed:invalid command: data must be a JSON object"
    assert expired not in [e.id for e in transport.attempts]


def test_a_claim_abandoned_mid_way_is_published_again_once_its_lease_runs_out(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    """A crash between publishing and recording: at-least-once, never lost. The rows stay
    leased to the crashed relay until the lease runs out, then any relay takes them."""
    ids = insert_sms(conn, 3)
    settings = Settings(transports={"default": "memory://"}, claim_timeout=1.0)

    class Crashing(MemoryTransport):
        def publish(self, batch: Any) -> Any:
            super().publish(batch)
            raise KeyboardInterrupt  # not a PublishError: escapes before anything is recorded

    relay = make_relay(clean_db, Crashing(), settings)
    try:
        with pytest.raises(KeyboardInterrupt):
            relay.process_batch()
    finally:
        relay.store.close()
    assert rows_by_state(conn) == {"pending": 3}
    leased = conn.execute("SELECT count(*) FROM outbox.message WHERE claim IS NOT NULL "
                          "AND available_at > now()").fetchone()
    assert leased == (1,)  # a relay that does not know its transport's pace claims one row
    transport = MemoryTransport()
    relay = make_relay(clean_db, transport, settings)
    try:
        # the other two rows are anyone's; the crashed relay's row is not, until its lease ends
        assert relay.drain().sent == 2
        assert relay.process_batch().claimed == 0
        deadline = time.monotonic() + 30
        while relay.process_batch().claimed == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        while relay.process_batch().claimed:
            pass
    finally:
        relay.store.close()
    assert sorted(e.id for e in transport.delivered) == ids
    assert rows_by_state(conn) == {"sent": 3}


def test_skip_locked_two_relays_share_a_backlog_without_overlap(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    ids = insert_sms(conn, 600)
    a, b = MemoryTransport(), MemoryTransport()
    settings = Settings(transports={"default": "memory://"}, batch_size=50)
    relays = [make_relay(clean_db, a, settings), make_relay(clean_db, b, settings)]
    barrier = threading.Barrier(2)

    def drain(relay: Relay) -> None:
        barrier.wait()
        while relay.process_batch().claimed:
            pass

    threads = [threading.Thread(target=drain, args=(relay,)) for relay in relays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for relay in relays:
        relay.store.close()
    published = [e.id for e in a.delivered] + [e.id for e in b.delivered]
    assert sorted(published) == ids
    assert rows_by_state(conn) == {"sent": 600}


@contextmanager
def running(url: str, transport: MemoryTransport, **overrides: Any) -> Iterator[RelayService]:
    settings = Settings(**{"transports": {"default": "memory://"}, **overrides})
    service = RelayService(settings, url, transports_factory=lambda s: {"default": transport})
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,))
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
    assert service.errors == []


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)
    return time.monotonic() - started


def test_notify_wakes_the_relay_long_before_the_poll_interval(clean_db: str) -> None:
    transport = MemoryTransport()
    with running(clean_db, transport, poll_interval=30.0):
        time.sleep(0.5)  # the relay is idle, waiting
        with psycopg.connect(clean_db) as app:
            enqueue(app, SendSms(receiver="0812345", message="m"))
            app.commit()
            committed = time.monotonic()
        wait_for(lambda: len(transport.delivered) == 1, timeout=5)
        assert time.monotonic() - committed < 2.0


def test_polling_picks_up_a_retry_when_it_falls_due(conn: psycopg.Connection[Any],
                                                    clean_db: str) -> None:
    calls = {"n": 0}

    def fail_first(envelope: Envelope) -> PublishError | None:
        calls["n"] += 1
        return TransientPublishError("once") if calls["n"] == 1 else None

    transport = MemoryTransport(fail=fail_first)
    insert_sms(conn, 1)
    with running(clean_db, transport, poll_interval=0.2, backoff_base=0.5):
        wait_for(lambda: len(transport.delivered) == 1, timeout=10)
    assert rows_by_state(conn) == {"sent": 1}


def test_the_database_going_away_and_coming_back_is_survived(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    transport = MemoryTransport()
    insert_sms(conn, 50)
    with running(clean_db, transport, workers=2, poll_interval=0.1, batch_size=10):
        wait_for(lambda: len(transport.delivered) == 50)
        for _ in range(3):  # the server drops every relay connection, three times
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'outbox' AND pid <> pg_backend_pid()")
            insert_sms(conn, 50)
            time.sleep(0.3)
        wait_for(lambda: rows_by_state(conn) == {"sent": 200}, timeout=20)
    assert len({e.id for e in transport.delivered}) == 200


def test_several_workers_publish_every_row_once(conn: psycopg.Connection[Any],
                                                clean_db: str) -> None:
    transport = MemoryTransport()
    ids = insert_sms(conn, 2000)
    with running(clean_db, transport, workers=3, batch_size=100):
        wait_for(lambda: len(transport.delivered) >= 2000, timeout=30)
    assert sorted(e.id for e in transport.delivered) == ids


def test_the_service_logs_the_stop_request_with_the_signal_that_made_it(clean_db: str) -> None:
    settings = Settings(transports={"default": "memory://"}, poll_interval=30.0)
    service = RelayService(settings, clean_db,
                           transports_factory=lambda s: {"default": MemoryTransport()})
    stop = StopRequest()
    with rendered_logs("info") as output:
        thread = threading.Thread(target=service.run, args=(stop,))
        thread.start()
        wait_for(lambda: "relay.started" in output.getvalue())
        stop.signal_name = "SIGTERM"  # as the handler in outbox.signals records it
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    events = [json.loads(line) for line in output.getvalue().splitlines()]
    stopping = [event for event in events if event["event"] == "relay.stopping"]
    assert [event["signal"] for event in stopping] == ["SIGTERM"]
    assert events[-1]["event"] == "relay.stopped"


def test_release_retries_picks_the_rows_waiting_for_that_transport(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    def row(command: str, route: str | None, *, attempts: int, due_in: str,
            receiver: str = "+6281234567") -> int:
        data = {"receiver": receiver} if command != "send-sms" else {"receiver": receiver,
                                                                      "message": "m"}
        found = conn.execute(
            "INSERT INTO outbox.message (command, data, route, attempts, available_at) "
            "VALUES (%s, %s, %s, %s, now() + %s::interval) RETURNING id",
            (command, Jsonb(data), route, attempts, due_in)).fetchone()
        assert found is not None
        return int(found[0])

    by_command = row("send-sms", None, attempts=2, due_in="5 minutes")
    empty_route = row("send-sms", " ", attempts=1, due_in="5 minutes")
    spaced = row("block-msisdn", " broker ", attempts=1, due_in="5 minutes")
    named = row("block-msisdn", "broker", attempts=3, due_in="9 minutes", receiver="+6281239")
    fanned = row("block-msisdn", "other + broker", attempts=1, due_in="5 minutes",
                 receiver="+6281230")
    other_command = row("block-msisdn", None, attempts=1, due_in="5 minutes",
                        receiver="+6281231")
    other_route = row("send-sms", "other", attempts=1, due_in="5 minutes")
    scheduled_by_the_app = row("send-sms", None, attempts=0, due_in="1 hour")
    already_due = row("send-sms", None, attempts=1, due_in="-1 minute")
    released = {by_command, empty_route, spaced, named}
    # the broker lane's keys: send-sms without a route of its own, and "broker" itself
    keys = ["@send-sms", "broker"]

    store = PostgresStore(psycopg.connect(clean_db))
    try:
        with store.transaction() as tx:
            assert tx.release_retries(keys, limit=3) == 3
            assert tx.release_retries(keys, limit=3) == 1
            assert tx.release_retries(keys, limit=3) == 0
    finally:
        store.close()
    due = {int(r[0]) for r in conn.execute(
        "SELECT id FROM outbox.message WHERE available_at <= now()")}
    assert due == released | {already_due}
    assert not due & {other_command, other_route, scheduled_by_the_app, fanned}


def test_a_broker_back_from_an_outage_gets_its_retries_at_once(clean_db: str) -> None:
    down = threading.Event()
    down.set()
    transport = MemoryTransport(fail=lambda e: TransientPublishError("connection refused")
                                if down.is_set() else None)
    with running(clean_db, transport, backoff_base=300.0, backoff_max=600.0,
                 poll_interval=0.2) as service:
        with psycopg.connect(clean_db) as app:
            for n in range(20):
                enqueue(app, SendSms(receiver="0812345", message=f"m{n}"))
            app.commit()
        wait_for(lambda: len(transport.attempts) >= 20)
        down.clear()
        with psycopg.connect(clean_db) as app:
            enqueue(app, SendSms(receiver="0812345", message="the first after the outage"))
            app.commit()
        # without the release, the 20 would wait out their five-minute backoff
        wait_for(lambda: len({e.id for e in transport.delivered}) == 21, timeout=15)
        assert service.errors == []
