"""The relay loop against the in-memory store and transport: no database, no broker."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from outbox.errors import PermanentPublishError, PublishError, TransientPublishError
from outbox.relay import UNROUTABLE, Lane, Relay, configured_lanes
from outbox.scheduling import Pace
from outbox.settings import Settings
from outbox.testing import MemoryStore, MemoryTransport
from outbox.transports.base import Envelope, OtpMode, TransportOptions


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(settings: Settings | None = None, **transports: MemoryTransport) -> tuple[
        Relay, MemoryStore, Clock]:
    clock = Clock()
    store = MemoryStore(clock=clock)
    transports = transports or {"default": MemoryTransport()}
    relay = Relay(store, transports, settings or Settings(), clock=clock, rng=random.Random(3))
    relay.pace.observe(1, 1e-6)  # a fast transport whose pace is known: whole batches
    return relay, store, clock


def sms(n: int = 0) -> dict[str, Any]:
    return {"receiver": f"+62812345{n:04d}", "message": f"hello {n}"}


def test_a_pending_row_is_published_and_marked_sent() -> None:
    relay, store, clock = make()
    message_id = store.insert("send-sms", sms())
    report = relay.process_batch()
    assert (report.claimed, report.sent) == (1, 1)
    row = store.rows[message_id]
    assert (row.state, row.attempts, row.last_error) == ("sent", 1, None)
    transport = relay.transports["default"]
    assert isinstance(transport, MemoryTransport)
    assert json.loads(transport.bodies[0]) == {"command": "send-sms", "data": {
        **sms(), "id": message_id, "date_time": int(clock.now)}}


def test_claims_in_available_order_and_respects_batch_size() -> None:
    relay, store, clock = make(Settings(batch_size=2))
    later = store.insert("send-sms", sms(1), available_at=clock.now - 1)
    first = store.insert("send-sms", sms(2), available_at=clock.now - 10)
    store.insert("send-sms", sms(3), available_at=clock.now + 100)
    assert relay.process_batch().claimed == 2
    transport = relay.transports["default"]
    assert isinstance(transport, MemoryTransport)
    assert [e.id for e in transport.delivered] == [first, later]
    assert relay.process_batch().claimed == 0  # the third is not due yet
    clock.now += 100
    assert relay.process_batch().sent == 1


def test_transient_failure_is_retried_later_with_the_same_id() -> None:
    outages = {"left": 2}

    def flaky(envelope: Envelope) -> PublishError | None:
        if outages["left"]:
            outages["left"] -= 1
            return TransientPublishError("broker away")
        return None

    transport = MemoryTransport(fail=flaky)
    relay, store, clock = make(Settings(backoff_base=1.0), default=transport)
    message_id = store.insert("send-sms", sms())
    assert relay.process_batch().retried == 1
    row = store.rows[message_id]
    assert (row.state, row.attempts, row.last_error) == ("pending", 1, "broker away")
    assert clock.now + 0.5 <= row.available_at <= clock.now + 1.0
    assert relay.process_batch().claimed == 0  # not due yet
    clock.now = row.available_at
    assert relay.process_batch().retried == 1
    assert clock.now + 1.0 <= row.available_at <= clock.now + 2.0  # backoff grew
    clock.now = row.available_at
    assert relay.process_batch().sent == 1
    assert row.state == "sent"
    assert row.attempts == 3
    assert [e.id for e in transport.attempts] == [message_id] * 3
    assert [e.attempt for e in transport.attempts] == [1, 2, 3]


def test_permanent_failure_fails_at_once() -> None:
    transport = MemoryTransport(fail=lambda e: PermanentPublishError("credentials refused"))
    relay, store, _ = make(default=transport)
    message_id = store.insert("send-sms", sms())
    assert relay.process_batch().failed == 1
    row = store.rows[message_id]
    assert (row.state, row.last_error, row.attempts) == ("failed", "credentials refused", 1)


def test_gives_up_after_max_attempts() -> None:
    transport = MemoryTransport(fail=lambda e: TransientPublishError("down"))
    relay, store, clock = make(Settings(max_attempts=3), default=transport)
    message_id = store.insert("send-sms", sms())
    for _ in range(3):
        relay.process_batch()
        clock.now += 3600
    row = store.rows[message_id]
    assert row.state == "failed"
    assert row.last_error == "gave up after 3 attempts: down"
    assert len(transport.attempts) == 3


def test_a_retry_is_never_scheduled_past_expiration() -> None:
    transport = MemoryTransport(fail=lambda e: TransientPublishError("down"))
    relay, store, clock = make(Settings(backoff_base=30.0), default=transport)
    message_id = store.insert("send-sms", {**sms(), "expiration": clock.now + 10})
    relay.process_batch()
    row = store.rows[message_id]
    assert row.state == "expired"
    assert row.last_error is not None and "down" in row.last_error


def test_expired_rows_are_never_published() -> None:
    relay, store, clock = make()
    message_id = store.insert("send-sms", {**sms(), "expiration": clock.now + 5})
    clock.now += 6
    assert relay.process_batch().expired == 1
    row = store.rows[message_id]
    assert (row.state, row.attempts) == ("expired", 0)
    transport = relay.transports["default"]
    assert isinstance(transport, MemoryTransport)
    assert transport.attempts == []


def test_create_otp_without_expiration_expires_after_the_otp_ttl() -> None:
    relay, store, clock = make(Settings(otp_ttl=60))
    store.insert("create-otp", {"receiver": "0812345", "reference": "r", "message": "%s"})
    clock.now += 61
    assert relay.process_batch().expired == 1


def test_a_poison_row_fails_with_a_reason_and_does_not_block_the_others() -> None:
    relay, store, _ = make()
    relay.lane.add_key("@send-fax")  # the service files such a key under the unroutable lane
    store.validate_on_insert = False
    good_before = store.insert("send-sms", sms(1))
    poison = store.insert("send-sms", {"receiver": "not a number", "message": "x"})
    junk = store.insert("send-fax", "not even an object")
    good_after = store.insert("send-sms", sms(2))
    report = relay.process_batch()
    assert (report.sent, report.failed) == (2, 2)
    assert store.rows[good_before].state == store.rows[good_after].state == "sent"
    assert store.rows[poison].state == "failed"
    assert "MSISDN" in (store.rows[poison].last_error or "")
    assert "unknown command" in (store.rows[junk].last_error or "")
    assert store.rows[poison].attempts == 0


def test_a_transport_that_raises_for_the_whole_batch_gets_every_row_retried() -> None:
    class Broken(MemoryTransport):
        def publish(self, batch: Any) -> Any:
            raise TransientPublishError("connection reset")

    relay, store, clock = make(default=Broken())
    relay.pace = Pace(0.6)  # a slow device: a leased claim published row by row
    relay.settings = Settings(claim_timeout=60.0)
    ids = [store.insert("send-sms", sms(n), available_at=clock.now - 10 + n) for n in range(3)]
    report = relay.process_batch()
    # The first row was tried and waits to retry; the others were never offered to the
    # broker: they go back to their place with their attempts untouched.
    assert (report.retried, report.handed_back) == (1, 2)
    assert store.rows[ids[0]].last_error == "connection reset"
    assert [(store.rows[i].attempts, store.rows[i].available_at) for i in ids[1:]] == [
        (0, clock.now - 9), (0, clock.now - 8)]
    assert relay.outage == 1


def test_a_broker_batch_that_fails_as_a_whole_is_retried_whole() -> None:
    class Broken(MemoryTransport):
        def publish(self, batch: Any) -> Any:
            raise TransientPublishError("connection reset")

    relay, store, _ = make(default=Broken())  # a fast lane: one locked claim, one batch
    ids = [store.insert("send-sms", sms(n)) for n in range(3)]
    assert relay.process_batch().retried == 3
    assert {store.rows[i].last_error for i in ids} == {"connection reset"}


def test_an_unexpected_exception_in_a_transport_is_retried_not_lost() -> None:
    class Buggy(MemoryTransport):
        def publish(self, batch: Any) -> Any:
            raise RuntimeError("bug")

    relay, store, _ = make(default=Buggy())
    message_id = store.insert("send-sms", sms())
    assert relay.process_batch().retried == 1
    assert "RuntimeError" in (store.rows[message_id].last_error or "")


def test_routes_send_each_command_to_its_transport() -> None:
    sms_transport, rest = MemoryTransport("sms"), MemoryTransport("rest")
    settings = Settings(transports={"default": "memory://", "sms": "memory://",
                                    "rest": "memory://"},
                        routes={"send-sms": "sms"})
    relay, store, _ = make(settings, default=rest, sms=sms_transport, rest=rest)
    store.insert("send-sms", sms())
    store.insert("block-msisdn", {"receiver": "0812345"})
    override = store.insert("send-sms", sms(9), route="rest")
    relay.process_batch()
    assert [json.loads(b)["command"] for b in sms_transport.bodies] == ["send-sms"]
    assert sorted(json.loads(b)["command"] for b in rest.bodies) == ["block-msisdn", "send-sms"]
    assert override in [e.id for e in rest.delivered]


def test_a_row_routed_to_a_missing_transport_fails_with_the_name() -> None:
    relay, store, _ = make()
    relay.lane = Lane(UNROUTABLE, (), {"nowhere"})
    message_id = store.insert("send-sms", sms(), route="nowhere")
    relay.process_batch()
    row = store.rows[message_id]
    assert row.state == "failed"
    assert row.last_error == "route 'nowhere' names no configured transport"


def test_explicit_fan_out_publishes_to_both_and_retries_both_until_both_confirm() -> None:
    calls = {"n": 0}

    def fail_once(envelope: Envelope) -> PublishError | None:
        calls["n"] += 1
        return TransientPublishError("b down") if calls["n"] == 1 else None

    a, b = MemoryTransport("a"), MemoryTransport("b", fail=fail_once)
    settings = Settings(transports={"default": "memory://", "a": "memory://", "b": "memory://"})
    relay, store, clock = make(settings, default=a, a=a, b=b)
    relay.lane = Lane("a+b", ("a", "b"), {"a+b"})
    message_id = store.insert("send-sms", sms(), route="a+b")
    assert relay.process_batch().retried == 1
    clock.now += 10
    assert relay.process_batch().sent == 1
    assert len(a.delivered) == 2  # at-least-once: the retry repeats the copy a already had
    assert len(b.delivered) == 1
    assert store.rows[message_id].state == "sent"


def test_dialect_is_per_transport() -> None:
    readme = MemoryTransport("r", options=TransportOptions(dialect="readme"))  # type: ignore[arg-type]
    relay, store, _ = make(default=readme)
    store.insert("send-email", {"receiver": "a@b.co", "message": "m", "subject": "s"})
    relay.process_batch()
    assert json.loads(readme.bodies[0])["command"] == "send-email"


def test_managed_otp_without_a_secret_fails_the_row_with_the_fix() -> None:
    managed = MemoryTransport(options=TransportOptions(otp_mode=OtpMode.MANAGED))
    relay, store, _ = make(default=managed)
    message_id = store.insert("create-otp", {"receiver": "0812345", "reference": "r",
                                             "message": "Code %s"})
    relay.process_batch()
    row = store.rows[message_id]
    assert row.state == "failed"
    assert "OUTBOX_OTP_SECRET" in (row.last_error or "")


def test_device_otp_is_relayed_as_request_otp_with_an_expiration() -> None:
    device = MemoryTransport(options=TransportOptions(otp_mode=OtpMode.DEVICE))
    relay, store, clock = make(Settings(otp_ttl=120), default=device)
    store.insert("create-otp", {"receiver": "0812345", "reference": "r", "message": "Code %s"})
    relay.process_batch()
    payload = json.loads(device.bodies[0])
    assert payload["command"] == "request-otp"
    assert payload["data"]["expiration"] == int(clock.now + 120)


@pytest.mark.parametrize("failure", [TransientPublishError("x"), PermanentPublishError("y")])
def test_one_failing_row_does_not_change_the_fate_of_the_others(failure: PublishError) -> None:
    transport = MemoryTransport(fail=lambda e: failure if e.id == 2 else None)
    relay, store, _ = make(default=transport)
    for n in range(4):
        store.insert("send-sms", sms(n))
    relay.process_batch()
    assert [store.rows[i].state for i in (1, 3, 4)] == ["sent"] * 3
    assert store.rows[2].state == ("pending" if failure.transient else "failed")


def test_a_transport_back_from_an_outage_releases_the_rows_waiting_to_retry() -> None:
    down = True
    broker = MemoryTransport("broker", fail=lambda e: TransientPublishError("refused")
                             if down else None)
    settings = Settings(transports={"default": "memory://", "broker": "memory://"},
                        routes={"send-sms": "broker"}, backoff_base=300.0, backoff_max=600.0)
    relay, store, clock = make(settings, broker=broker)
    relay.lane = configured_lanes(settings)["broker"]
    elsewhere = store.insert("block-msisdn", {"receiver": "0812346"})  # another lane
    waiting = [store.insert("send-sms", sms(n)) for n in range(3)]
    named = store.insert("send-sms", sms(5), route=" broker ")
    for _ in range(3):
        relay.process_batch()  # the broker is down: every row tried waits a long backoff
    assert all(store.rows[i].available_at > clock.now + 60 for i in [*waiting, named])
    later = store.insert("send-sms", sms(7), available_at=clock.now + 3600)  # the app's own

    down = False
    clock.now += 5
    fresh = store.insert("send-sms", sms(8))
    report = relay.process_batch()  # the broker delivers again
    assert report.sent == 1 and broker.delivered[-1].id == fresh
    for message_id in [*waiting, named]:  # due now, not in five minutes
        assert store.rows[message_id].available_at == clock.now
    assert store.rows[later].available_at == clock.now + 3595  # never tried: stays scheduled
    assert store.rows[elsewhere].state == "pending"  # not this lane's

    relay.process_batch()
    assert {store.rows[i].state for i in waiting} == {"sent"}
    assert set(waiting) <= {e.id for e in broker.delivered}


def test_a_transport_that_only_refuses_some_rows_releases_nothing() -> None:
    broker = MemoryTransport(fail=lambda e: TransientPublishError("busy")
                             if e.id % 2 else None)
    settings = Settings(backoff_base=300.0, backoff_max=600.0)
    relay, store, clock = make(settings, default=broker)
    ids = [store.insert("send-sms", sms(n)) for n in range(4)]
    relay.process_batch()
    retrying = [i for i in ids if store.rows[i].state == "pending"]
    assert retrying
    store.insert("send-sms", sms(9))
    relay.process_batch()
    assert all(store.rows[i].available_at > clock.now + 60 for i in retrying)


@pytest.mark.parametrize(("payload", "woken"), [
    ("0", "express"), ("1", "express"), ("2", "bulk"), ("9", "bulk"),
    ("", "both"),  # a schema before 0015: anything may have arrived
    ("x", "both"), ("10", "both"),
])
def test_a_notify_wakes_the_workers_that_can_claim_its_row(payload: str, woken: str) -> None:
    import threading  # noqa: PLC0415

    from outbox.relay import RelayService  # noqa: PLC0415

    settings = Settings()
    assert settings.express_priority == 1
    service = RelayService(settings, "postgresql://unused/db")
    bulk, express = threading.Event(), threading.Event()
    service._wake_events += [bulk, express]
    service._express_events.append(express)
    service._wake_for(payload)
    assert express.is_set() is (woken in ("express", "both"))
    assert bulk.is_set() is (woken in ("bulk", "both"))


def test_an_urgent_notify_wakes_everybody_when_there_is_no_express_worker() -> None:
    import threading  # noqa: PLC0415

    from outbox.relay import RelayService  # noqa: PLC0415

    service = RelayService(Settings(express_priority=-1), "postgresql://unused/db")
    bulk = threading.Event()
    service._wake_events.append(bulk)
    service._wake_for("0")
    assert bulk.is_set()
