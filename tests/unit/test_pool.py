"""The failover pool's own logic, with in-memory members (the real devices: integration)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from outbox.errors import PermanentPublishError, PublishError, TransientPublishError, TransportDown
from outbox.scheduling import ProbePolicy, parse_rate
from outbox.testing import MemoryTransport
from outbox.transports.base import Envelope, TransportOptions
from outbox.transports.pool import PoolTransport


class Member(MemoryTransport):
    """An in-memory member that can be switched off (publish and check fail transiently)."""

    def __init__(self, name: str, *, rate: str | None = None) -> None:
        options = TransportOptions(rate=parse_rate(rate) if rate else None)
        super().__init__(name, options=options, fail=self._failure)
        self.down = False
        self.checks = 0

    def _failure(self, envelope: Envelope) -> PublishError | None:
        return TransientPublishError(f"{self.name} refused") if self.down else None

    def check(self) -> None:
        self.checks += 1
        if self.down:
            raise TransientPublishError(f"{self.name} unreachable")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def batch(*ids: int) -> list[Envelope]:
    return [Envelope(i, "send-sms", b"{}") for i in ids]


@pytest.fixture
def members() -> tuple[Member, Member, Member]:
    return Member("a"), Member("b"), Member("c")


def pool_of(*members: Member, clock: Callable[[], float] | None = None) -> PoolTransport:
    return PoolTransport("|".join(m.name for m in members), members,
                         policy=ProbePolicy(5.0, 60.0), clock=clock or Clock(), probing=False)


def test_the_first_member_serves_each_row_once(members: tuple[Member, Member, Member]) -> None:
    a, b, c = members
    pool = pool_of(a, b, c)
    answer = pool.publish(batch(1, 2))
    assert answer == {}
    assert answer.served_by == "a"  # type: ignore[attr-defined]
    assert [e.id for e in a.delivered] == [1, 2]
    assert b.attempts == c.attempts == []


def test_a_member_failing_a_batch_as_a_whole_hands_it_to_the_next_at_once(
        members: tuple[Member, Member, Member]) -> None:
    a, b, c = members
    pool = pool_of(a, b, c)
    a.down = True
    answer = pool.publish(batch(1, 2, 3))
    assert answer == {}
    assert answer.served_by == "b"  # type: ignore[attr-defined]
    assert [e.id for e in b.delivered] == [1, 2, 3]
    assert pool.serving() == "b"
    pool.publish(batch(4))
    assert len(a.attempts) == 3  # a is down: not offered the next batch
    assert [e.id for e in b.delivered] == [1, 2, 3, 4]


def test_partial_or_permanent_failures_do_not_make_a_member_down() -> None:
    a = MemoryTransport("a", fail=lambda e: TransientPublishError("x") if e.id == 2 else None)
    b = MemoryTransport("b")
    pool = PoolTransport("a|b", [a, b], clock=Clock(), probing=False)
    failures = pool.publish(batch(1, 2))
    assert set(failures) == {2}
    assert pool.serving() == "a"
    c = MemoryTransport("c", fail=lambda e: PermanentPublishError("401"))
    pool = PoolTransport("c|b", [c, b], clock=Clock(), probing=False)
    assert set(pool.publish(batch(5))) == {5}
    assert pool.serving() == "c"


def test_every_member_down_the_rows_are_not_tried_and_wait_for_the_next_probe(
        members: tuple[Member, Member, Member]) -> None:
    a, b, _ = members
    clock = Clock()
    pool = pool_of(a, b, clock=clock)
    a.down = b.down = True
    first = pool.publish(batch(1))
    assert isinstance(first[1], TransientPublishError)
    assert not isinstance(first[1], TransportDown)  # tried: the attempt counts
    clock.now += 1.0
    tried = len(a.attempts) + len(b.attempts)
    second = pool.publish(batch(2))
    error = second[2]
    assert isinstance(error, TransportDown)
    assert "every member is down" in str(error)
    assert error.retry_after == pytest.approx(4.05)
    assert len(a.attempts) + len(b.attempts) == tried  # nothing was offered


def test_a_probe_brings_an_earlier_member_back_before_any_traffic(
        members: tuple[Member, Member, Member]) -> None:
    a, b, _ = members
    clock = Clock()
    pool = pool_of(a, b, clock=clock)
    a.down = True
    pool.publish(batch(1))
    assert pool.serving() == "b"
    a.down = False
    assert pool._probe(0, blocking=True)
    assert pool.serving() == "a"
    pool.publish(batch(2))
    assert [e.id for e in a.delivered] == [2]


def test_check_passes_while_one_member_answers(members: tuple[Member, Member, Member]) -> None:
    a, b, _ = members
    pool = pool_of(a, b)
    a.down = True
    pool.check()
    assert pool.serving() == "b"
    b.down = True
    with pytest.raises(TransientPublishError, match="no member reachable"):
        pool.check()


def test_rate_limited_members_serve_only_rows_whose_tokens_they_gave() -> None:
    a, b = Member("a", rate="10/m"), Member("b", rate="10/m")
    pool = pool_of(a, b)
    assert pool.serving() == "a"
    a.down = True
    answer = pool.publish(batch(1), through="a")
    error = answer[1]
    assert isinstance(error, TransportDown)  # handed back for b's tokens, not sent by b
    assert error.retry_after == 0.0
    assert b.attempts == []
    assert pool.serving() == "b"
    assert pool.publish(batch(1), through="b") == {}
    assert [e.id for e in b.delivered] == [1]


def test_the_prober_thread_brings_a_member_back() -> None:
    a, b = Member("a"), Member("b")
    pool = PoolTransport("a|b", [a, b], policy=ProbePolicy(0.05, 0.2))
    try:
        a.down = True
        pool.publish(batch(1))
        assert pool.serving() == "b"
        a.down = False
        import time  # noqa: PLC0415

        deadline = time.monotonic() + 10
        while pool.serving() != "a" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.serving() == "a"
    finally:
        pool.close()
    assert a.closed and b.closed
