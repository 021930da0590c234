"""Pure scheduling decisions, kept apart from the SQL and the loop so they can be unit-tested.

How many rows a lane claims, how many it publishes between two checks of its lease, and
whether its lease still leaves time for the next chunk: a relay must never hold more rows
than it can publish before its claim expires, so that the rows behind stay claimable by
other relays, and a slow device (a GSM modem needs seconds per SMS) gets a claim of a few
rows while a broker gets whole batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: share of the claim timeout a claim's work may take, by the lane's observed pace
CLAIM_BUDGET = 0.5
#: seconds of publishing between two lease checks (and two records)
CHUNK_BUDGET = 1.0
#: weight of the newest observation in the pace estimate
SMOOTHING = 0.3


@dataclass
class Pace:
    """A lane's observed publishing pace: seconds per row, smoothed (None until observed)."""

    seconds_per_row: float | None = None

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        sample = seconds / rows
        if self.seconds_per_row is None:
            self.seconds_per_row = sample
        else:
            # A slow sample counts at once (a device that slowed down must not be handed a
            # claim it cannot finish); a fast one only gradually.
            weight = 1.0 if sample > self.seconds_per_row else SMOOTHING
            self.seconds_per_row += weight * (sample - self.seconds_per_row)


def claim_size(pace: Pace, *, claim_timeout: float, batch_size: int) -> int:
    """Rows to claim: what the lane publishes in ``CLAIM_BUDGET`` of the claim timeout at its
    observed pace, between 1 and ``batch_size``. An unobserved lane claims a whole batch but
    publishes one row first and hands back what its pace then says it cannot finish."""
    if pace.seconds_per_row is None:
        return batch_size
    if pace.seconds_per_row <= 0:
        return batch_size
    return max(1, min(batch_size, int(claim_timeout * CLAIM_BUDGET / pace.seconds_per_row)))


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


__all__ = [
    "CHUNK_BUDGET",
    "CLAIM_BUDGET",
    "Pace",
    "backoff_after_outage",
    "chunk_size",
    "claim_size",
    "lease_allows",
    "lease_free",
    "lease_margin",
]
