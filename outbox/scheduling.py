"""Pure scheduling decisions, kept apart from the SQL and the loop so they can be unit-tested.

* **Claims** (issue 10): how many rows a lane claims, how many it publishes between two checks
  of its lease, and whether its lease still leaves time for the next chunk: a relay must never
  hold more rows than it can publish in a couple of seconds (and never past its claim's
  expiry), so that the rows behind stay claimable by other relays, and a slow device (a GSM
  modem needs seconds per SMS) gets a claim of a row or two while a broker gets whole batches.
* **Rates** (``rate=10/m`` on a transport URL, ``OUTBOX_RECEIVER_LIMIT=3/10m``): parsing.
* **Token buckets** (a transport's rate limit): how many tokens a claim gets and when the
  next one is due. The same arithmetic runs inside Postgres (``TAKE_TOKENS`` in
  :mod:`outbox.store`), in one atomic statement, so that every worker of every relay shares
  one bucket; a test holds the two to the same results.
* **Failover pools** (a route ``a|b|c``): which member serves, when a member counts as down,
  when a down member is probed again.
* **Receiver limits**: which rows of a claim are still within a receiver's limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

#: share of the claim timeout a claim's work may take, by the lane's observed pace ...
CLAIM_BUDGET = 0.5
#: ... and at most this many seconds of it: a relay that freezes or dies strands no more
#: than that, and a relay that takes over is never more than that from its next claim
MAX_CLAIM_SECONDS = 2.0
#: seconds of publishing between two lease checks (and two records)
CHUNK_BUDGET = 1.0
#: weight of the newest observation in the pace estimate
SMOOTHING = 0.3


@dataclass
class Pace:
    """A lane's observed publishing pace: seconds per row, smoothed (None until observed)."""

    seconds_per_row: float | None = None
    #: rows of the largest chunk observed so far: what the estimate rests on
    basis: int = 0

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        sample = seconds / rows
        if self.seconds_per_row is None:
            self.seconds_per_row = sample
        else:
            # A slow sample counts at once (a device that slowed down must not be handed a
            # claim it cannot finish); a fast one only gradually, unless it measured more
            # rows than any before: a lane's first claim of one row is mostly round trips,
            # and its pace at forty times that per row kept a broker's claims small for a
            # dozen claims (a tenth of a 100,000-row drain at a third of its speed).
            faster_and_larger = sample <= self.seconds_per_row and rows > self.basis
            weight = 1.0 if sample > self.seconds_per_row or faster_and_larger else SMOOTHING
            self.seconds_per_row += weight * (sample - self.seconds_per_row)
        self.basis = max(self.basis, rows)


def claim_budget(claim_timeout: float) -> float:
    """Seconds of publishing one claim may hold."""
    return min(claim_timeout * CLAIM_BUDGET, MAX_CLAIM_SECONDS)


def claim_size(pace: Pace, *, claim_timeout: float, batch_size: int) -> int:
    """Rows to claim: what the lane publishes in ``claim_budget`` at its observed pace,
    between 1 and ``batch_size``. An unobserved lane claims one row: its pace is learnt
    before it holds more (a broker pays one small claim at start, a modem holds no batch)."""
    if pace.seconds_per_row is None:
        return 1
    if pace.seconds_per_row <= 0:
        return batch_size
    return max(1, min(batch_size, int(claim_budget(claim_timeout) / pace.seconds_per_row)))


def chunk_size(pace: Pace, *, remaining: int) -> int:
    """Rows to publish before the next lease check: about ``CHUNK_BUDGET`` seconds of work."""
    if remaining <= 0:
        return 0
    if pace.seconds_per_row is None:
        return 1
    if pace.seconds_per_row <= 0:
        return remaining
    return max(1, min(remaining, int(CHUNK_BUDGET / pace.seconds_per_row)))


def lease_free(pace: Pace, rows: int) -> bool:
    """Whether a claim of ``rows`` publishes within ``CHUNK_BUDGET`` at the observed pace: then
    one short transaction can hold the rows' locks while they are published (a broker), and
    writing a lease would cost more than it protects. Unobserved lanes take a lease."""
    return pace.seconds_per_row is not None and pace.seconds_per_row * rows <= CHUNK_BUDGET


def lease_allows(*, now: float, deadline: float, rows: int, pace: Pace,
                 margin: float) -> bool:
    """Whether a chunk of ``rows`` can still be published before the lease's ``deadline``
    (monotonic seconds), with ``margin`` to spare."""
    expected = (pace.seconds_per_row or 0.0) * rows
    return now + expected + margin < deadline


def lease_margin(claim_timeout: float) -> float:
    """Time kept in hand before a lease's end: clocks, the record's round trip."""
    return min(5.0, claim_timeout * 0.1)


def backoff_after_outage(failures_in_a_row: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds a lane waits before its next claim after ``failures_in_a_row`` chunks that its
    transport could not deliver at all (0: no wait)."""
    if failures_in_a_row <= 0:
        return 0.0
    return float(min(cap, base * 2.0 ** (failures_in_a_row - 1)))


# --- rates --------------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``period`` seconds."""

    count: int
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        for unit in ("d", "h", "m", "s"):
            size = _UNIT_SECONDS[unit]
            if self.period >= size and (self.period / size).is_integer():
                amount = int(self.period / size)
                return f"{self.count}/{'' if amount == 1 else amount}{unit}"
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """``10/s``, ``10/m``, ``600/h``, ``3/10m``, ``1/1.5s``; ValueError naming the problem."""
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate (examples: 10/s, 10/m, 600/h, 3/10m)")
    count = int(match.group(1))
    period = float(match.group(2) or 1) * _UNIT_SECONDS[match.group(3)]
    if count < 1 or period <= 0 or not math.isfinite(period):
        raise ValueError(f"{text!r}: a rate needs at least 1 event over a positive period")
    return Rate(count, period)


def default_burst(rate: Rate) -> int:
    """The tokens a bucket holds when the URL says no ``burst``: a tenth of a second's worth,
    at least one. At 10/s or slower that is 1 (the device sees the rate evenly spaced);
    a fast broker at 1,000/s gets claims of 100."""
    return max(1, math.ceil(rate.per_second / 10))


# --- token buckets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """The outcome of taking tokens from a bucket."""

    granted: int
    #: tokens left in the bucket (a fraction: the next token accruing)
    tokens: float
    #: the bucket's clock after this take (never moves backwards)
    updated_at: float


def take_tokens(tokens: float, updated_at: float, now: float, *, rate: float, burst: int,
                want: int) -> Grant:
    """Refill a bucket of ``burst`` tokens at ``rate`` per second since ``updated_at``, then
    take up to ``want`` whole tokens.

    A clock that reads earlier than ``updated_at`` (another relay's transaction started a
    moment later but took its tokens first) refills nothing and leaves the bucket's clock
    where it was, so no interval is ever counted twice. Over any span of ``T`` seconds at
    most ``burst + rate * T`` tokens are granted, however the takers interleave.
    """
    elapsed = max(now - updated_at, 0.0)
    refilled = min(float(burst), tokens + elapsed * rate)
    granted = max(0, min(want, math.floor(refilled + 1e-9)))
    return Grant(granted, max(refilled - granted, 0.0), max(now, updated_at))


def next_token_in(tokens: float, *, rate: float) -> float:
    """Seconds until a bucket holding ``tokens`` has a whole one (0 if it has)."""
    if tokens >= 1.0 - 1e-9:
        return 0.0
    return (1.0 - tokens) / rate


# --- failover pools -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberState:
    """What a pool knows of one member."""

    up: bool = True
    #: times it went down again since it last delivered (a device whose check passes but
    #: whose publishes fail): each one doubles the wait before the next probe
    flaps: int = 0
    #: monotonic time the member should next be checked (down: to bring it back; up and
    #: idle: to notice it went away before traffic does)
    next_probe_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ProbePolicy:
    #: how often a down member is checked, and an idle up member too
    interval: float = 5.0
    #: the longest wait between probes of a member that keeps flapping
    max_interval: float = 60.0

    def delay(self, flaps: int) -> float:
        """Seconds until the next probe of a member that went down ``flaps`` times in a row
        without delivering in between: ``interval``, doubled per flap, capped."""
        return min(self.max_interval, self.interval * float(2 ** min(max(flaps - 1, 0), 30)))


def serving_order(states: Sequence[MemberState]) -> list[int]:
    """The members to offer a batch to, in order: those up, in the pool's order. Empty when
    every member is down (the batch is not tried: see :class:`outbox.errors.TransportDown`)."""
    return [index for index, state in enumerate(states) if state.up]


def batch_failed_as_a_whole(offered: int, failures: int, all_transient: bool) -> bool:
    """Whether a member's answer to a batch means it is down: every row failed, transiently.
    A batch with some rows through (or a permanent refusal) says the member works."""
    return offered > 0 and failures == offered and all_transient


def went_down(state: MemberState, now: float, policy: ProbePolicy) -> MemberState:
    """A member failed a batch as a whole, or its check failed."""
    flaps = state.flaps + 1 if state.up else max(state.flaps, 1)
    return MemberState(up=False, flaps=flaps, next_probe_at=now + policy.delay(flaps))


def probe_passed(state: MemberState, now: float, policy: ProbePolicy) -> MemberState:
    """A member's check passed: it is up (and checked again after ``interval`` if idle)."""
    return MemberState(up=True, flaps=state.flaps, next_probe_at=now + policy.interval)


def delivered(state: MemberState, now: float, policy: ProbePolicy) -> MemberState:
    """A member delivered (some of) a batch: up, flaps forgotten, no probe needed soon."""
    return MemberState(up=True, flaps=0, next_probe_at=now + policy.interval)


def probes_due(states: Sequence[MemberState], now: float) -> list[int]:
    """Members whose probe is due, in the pool's order (earlier members matter more)."""
    return [index for index, state in enumerate(states) if state.next_probe_at <= now]


def next_probe_at(states: Sequence[MemberState]) -> float | None:
    return min((state.next_probe_at for state in states), default=None)


# --- receiver limits ----------------------------------------------------------------------


def within_limit(limit: int, sent_recently: dict[bytes, int],
                 claimed: Sequence[tuple[bytes, bool]]) -> list[bool]:
    """For each claimed row (its receiver key, and whether it already holds a place in the
    window from an earlier attempt), whether it may go: a row that holds a place always
    may (and its place counts); a new one only while its receiver has fewer than ``limit``
    places, counting those this claim hands out in order. ``sent_recently`` counts the
    places taken in the window by other rows (earlier claims, any relay)."""
    taken = dict(sent_recently)
    for key, holds_place in claimed:
        if holds_place:
            taken[key] = taken.get(key, 0) + 1
    allowed: list[bool] = []
    for key, holds_place in claimed:
        if holds_place:
            allowed.append(True)
            continue
        count = taken.get(key, 0)
        if count < limit:
            taken[key] = count + 1
            allowed.append(True)
        else:
            allowed.append(False)
    return allowed


__all__ = [
    "CHUNK_BUDGET",
    "CLAIM_BUDGET",
    "MAX_CLAIM_SECONDS",
    "Grant",
    "MemberState",
    "Pace",
    "ProbePolicy",
    "Rate",
    "backoff_after_outage",
    "batch_failed_as_a_whole",
    "chunk_size",
    "claim_budget",
    "claim_size",
    "default_burst",
    "delivered",
    "lease_allows",
    "lease_free",
    "lease_margin",
    "next_probe_at",
    "next_token_in",
    "parse_rate",
    "probe_passed",
    "probes_due",
    "serving_order",
    "take_tokens",
    "went_down",
    "within_limit",
]
