from __future__ import annotations

import random

from outbox.errors import PermanentPublishError, TransientPublishError
from outbox.retry import Expire, Fail, Retry, RetryPolicy, decide

POLICY = RetryPolicy(base=1.0, cap=60.0, max_attempts=5)


def test_delay_grows_exponentially_within_jitter_bounds() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (7, 60), (50, 60), (10_000, 60)]:
        for _ in range(50):
            delay = POLICY.delay(attempt, rng)
            assert ceiling / 2 <= delay <= ceiling


def test_jitter_spreads_a_burst() -> None:
    rng = random.Random(1)
    delays = {round(POLICY.delay(3, rng), 6) for _ in range(100)}
    assert len(delays) > 90


def test_transient_error_is_retried_later() -> None:
    decision = decide(POLICY, TransientPublishError("down"), attempts=1, now=100.0,
                      expires_at=None, rng=random.Random(0))
    assert isinstance(decision, Retry)
    assert 100.5 <= decision.at <= 101.0
    assert decision.reason == "down"


def test_permanent_error_fails_at_once() -> None:
    decision = decide(POLICY, PermanentPublishError("401"), attempts=1, now=0.0, expires_at=None)
    assert decision == Fail("401")


def test_gives_up_after_max_attempts() -> None:
    decision = decide(POLICY, TransientPublishError("down"), attempts=5, now=0.0, expires_at=None)
    assert isinstance(decision, Fail)
    assert decision.reason == "gave up after 5 attempts: down"


def test_never_schedules_past_expiration() -> None:
    decision = decide(POLICY, TransientPublishError("down"), attempts=4, now=0.0, expires_at=3.0)
    assert isinstance(decision, Expire)
    assert "down" in decision.reason
