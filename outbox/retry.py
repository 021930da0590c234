"""Durable retries as row state, computed by a pure function.

Short reconnects inside one publish call are the transports' business (tenacity); this module
decides what happens to a *row* after a failed attempt: retry at a later time, fail, or expire.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from outbox.errors import PublishError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 1.0
    cap: float = 600.0
    max_attempts: int = 12

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based).

        Exponential (base, 2·base, 4·base, ...) capped at ``cap``, then "equal jitter": a
        uniform draw from the upper half, so retries of a burst spread out but the schedule
        still grows.
        """
        ceiling = min(self.cap, self.base * float(2 ** min(attempt - 1, 62)))
        draw: float = (rng or random).random()
        return ceiling / 2 + draw * ceiling / 2


@dataclass(frozen=True, slots=True)
class Retry:
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str


@dataclass(frozen=True, slots=True)
class Expire:
    reason: str


Decision = Retry | Fail | Expire


def decide(
    policy: RetryPolicy,
    error: PublishError,
    *,
    attempts: int,
    now: float,
    expires_at: float | None,
    rng: random.Random | None = None,
) -> Decision:
    """What to do with a row whose ``attempts``-th attempt (1-based, this one included) failed."""
    reason = str(error) or type(error).__name__
    if not error.transient:
        return Fail(reason)
    if attempts >= policy.max_attempts:
        return Fail(f"gave up after {attempts} attempts: {reason}")
    at = now + policy.delay(attempts, rng)
    if expires_at is not None and at >= expires_at:
        return Expire(f"expires before the next attempt: {reason}")
    return Retry(at, reason)


__all__ = ["Decision", "Expire", "Fail", "Retry", "RetryPolicy", "decide"]
