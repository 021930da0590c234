"""Failover pools (route ``a|b``) against two OTP-Pi REST stand-ins and the real Postgres:
failover when a device stops, fail-back by probe before any traffic, a device up without
its modem, and a pool whose every member is down (rows wait, nothing fails for that)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb

from outbox.admin import read_status
from outbox.relay import RelayService
from outbox.settings import Settings
from tests.conftest import rows_by_state
from tests.support.otp_pi import OtpPi

pytest_plugins = ("tests.support.otp_pi_fixtures",)
pytestmark = pytest.mark.integration


def pool_settings(a: OtpPi, b: OtpPi, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "transports": {"default": "stdout://", "a": a.url(), "b": b.url()},
        "routes": {"send-sms": "a|b"},
        "pool_probe_interval": 0.2,
        "publish_timeout": 2.0,
        "poll_interval": 0.2,
        "backoff_base": 0.2,
        "backoff_max": 1.0,
        **overrides,
    }
    return Settings(**values)


@contextmanager
def running(url: str, settings: Settings) -> Iterator[RelayService]:
    service = RelayService(settings, url)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,))
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive()
    assert service.errors == []


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def insert_sms(conn: psycopg.Connection[Any], first: int, count: int) -> list[int]:
    return [conn.execute(
        "INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s) RETURNING id",
        (Jsonb({"receiver": f"+62812{n:06d}", "message": f"m{n}"}),)).fetchone()[0]  # type: ignore[index]
        for n in range(first, first + count)]


def all_sent(conn: psycopg.Connection[Any], ids: list[int]) -> bool:
    row = conn.execute("SELECT count(*) FROM outbox.message WHERE id = ANY(%s) AND state = 'sent'",
                       (ids,)).fetchone()
    return row is not None and row[0] == len(ids)


def served_by(conn: psycopg.Connection[Any], ids: list[int]) -> set[str | None]:
    return {row[0] for row in conn.execute(
        "SELECT served_by FROM outbox.message WHERE id = ANY(%s)", (ids,))}


def member_up(member: str) -> float | None:
    return REGISTRY.get_sample_value("outbox_pool_member_up", {"pool": "a|b", "member": member})


def texts(device: OtpPi) -> list[str]:
    return [sent.text for sent in device.inbox]


def test_a_stopped_device_fails_over_and_a_probe_brings_it_back(
        conn: psycopg.Connection[Any], clean_db: str,
        otp_pi_factory: Callable[..., OtpPi]) -> None:
    a, b = otp_pi_factory(), otp_pi_factory()
    with running(clean_db, pool_settings(a, b)):
        first = insert_sms(conn, 0, 3)
        wait_for(lambda: all_sent(conn, first))
        assert texts(a) == ["m0", "m1", "m2"]
        assert served_by(conn, first) == {"a"}

        a.stop()
        second = insert_sms(conn, 3, 3)
        wait_for(lambda: all_sent(conn, second))
        assert texts(b) == ["m3", "m4", "m5"]
        assert served_by(conn, second) == {"b"}
        assert member_up("a") == 0

        a.start()  # same port: the device is switched on again
        wait_for(lambda: member_up("a") == 1)  # by probe: no row was sent meanwhile
        third = insert_sms(conn, 6, 3)
        wait_for(lambda: all_sent(conn, third))
    assert texts(a) == ["m0", "m1", "m2", "m6", "m7", "m8"]
    assert texts(b) == ["m3", "m4", "m5"]
    assert served_by(conn, third) == {"a"}
    assert rows_by_state(conn) == {"sent": 9}
    status = read_status(conn, pool_settings(a, b))
    assert dict(status.rate.by_pool_member) == {"a": 6, "b": 3}


def test_a_device_without_its_modem_is_down_though_its_check_passes(
        conn: psycopg.Connection[Any], clean_db: str,
        otp_pi_factory: Callable[..., OtpPi]) -> None:
    a, b = otp_pi_factory(modem_connected=False), otp_pi_factory()
    with running(clean_db, pool_settings(a, b)):
        ids = insert_sms(conn, 0, 3)
        wait_for(lambda: all_sent(conn, ids))
        time.sleep(1.0)  # a's check passes again and again; its batches would not
        more = insert_sms(conn, 3, 3)
        wait_for(lambda: all_sent(conn, more))
    assert a.inbox == []
    assert sorted(texts(b)) == [f"m{n}" for n in range(6)]
    assert rows_by_state(conn) == {"sent": 6}


def test_a_pool_whose_every_member_is_down_keeps_its_rows_pending_until_one_is_back(
        conn: psycopg.Connection[Any], clean_db: str,
        otp_pi_factory: Callable[..., OtpPi]) -> None:
    a, b = otp_pi_factory(), otp_pi_factory()
    a.stop()
    b.stop()
    settings = pool_settings(a, b, max_attempts=3)
    with running(clean_db, settings):
        ids = insert_sms(conn, 0, 4)
        time.sleep(3.0)  # about 15 probe intervals: with counted attempts they would fail
        # The batch that found both down counted one attempt for its first row; since then
        # nothing was offered to anyone, and nothing counted.
        states = conn.execute("SELECT state, max(attempts) FROM outbox.message GROUP BY state"
                              ).fetchall()
        assert states == [("pending", 1)]
        b.start()
        wait_for(lambda: all_sent(conn, ids))
    assert sorted(texts(b)) == ["m0", "m1", "m2", "m3"]
    assert served_by(conn, ids) == {"b"}
    assert rows_by_state(conn) == {"sent": 4}


def test_two_sims_with_a_rate_each_the_standby_takes_over_at_its_own_rate(
        conn: psycopg.Connection[Any], clean_db: str,
        otp_pi_factory: Callable[..., OtpPi]) -> None:
    """The README's two devices with a SIM each, at a rate each: while a serves, b gets
    nothing; a stopped, its rows are handed back (no attempt counted) and b takes them with
    its own tokens; nothing fails, every row once."""
    a, b = otp_pi_factory(), otp_pi_factory()
    settings = pool_settings(a, b, transports={"default": "stdout://",
                                               "a": a.url(rate="20/s", burst="2"),
                                               "b": b.url(rate="20/s", burst="2")})
    with running(clean_db, settings):
        first = insert_sms(conn, 0, 6)
        wait_for(lambda: all_sent(conn, first))
        assert b.inbox == []
        a.stop()
        second = insert_sms(conn, 6, 6)
        wait_for(lambda: all_sent(conn, second))
    assert texts(a) == [f"m{n}" for n in range(6)]
    assert sorted(texts(b)) == sorted(f"m{n}" for n in range(6, 12))
    assert served_by(conn, second) == {"b"}
    assert rows_by_state(conn) == {"sent": 12}
    buckets = dict(conn.execute("SELECT transport, granted FROM outbox.rate_bucket").fetchall())
    assert set(buckets) == {"a", "b"}
    attempts = conn.execute("SELECT max(attempts) FROM outbox.message").fetchone()
    assert attempts is not None and attempts[0] <= 2  # a handed-back row is not counted
