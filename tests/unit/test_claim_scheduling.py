"""The pure claim-size, chunk-size and lease decisions."""

from __future__ import annotations

import math

import pytest

from outbox.scheduling import (
    CHUNK_BUDGET,
    CLAIM_BUDGET,
    MAX_CLAIM_SECONDS,
    Pace,
    backoff_after_outage,
    chunk_size,
    claim_budget,
    claim_size,
    lease_allows,
    lease_free,
    lease_margin,
)


def paced(seconds_per_row: float | None) -> Pace:
    return Pace(seconds_per_row)


def test_a_slow_device_gets_a_claim_of_a_couple_of_seconds() -> None:
    # a modem at 2 s per SMS: one row at a time, not a batch
    assert claim_size(paced(2.0), claim_timeout=30, batch_size=200) == 1
    assert claim_size(paced(0.1), claim_timeout=30, batch_size=200) == 20
    assert claim_size(paced(0.1), claim_timeout=2, batch_size=200) == 10  # half the timeout
    assert claim_size(paced(60.0), claim_timeout=30, batch_size=200) == 1  # never zero
    assert claim_budget(30) == MAX_CLAIM_SECONDS


def test_a_broker_gets_whole_batches() -> None:
    assert claim_size(paced(20e-6), claim_timeout=30, batch_size=2000) == 2000
    assert claim_size(paced(0.0), claim_timeout=30, batch_size=50) == 50


def test_an_unobserved_lane_claims_one_row_to_learn_its_pace() -> None:
    assert claim_size(Pace(), claim_timeout=30, batch_size=200) == 1
    assert chunk_size(Pace(), remaining=200) == 1
    assert not lease_free(Pace(), 1)  # and it takes a lease for that first claim


def test_chunks_hold_about_a_second_of_work() -> None:
    assert chunk_size(paced(2.0), remaining=7) == 1
    assert chunk_size(paced(0.1), remaining=50) == int(CHUNK_BUDGET / 0.1)
    assert chunk_size(paced(1e-5), remaining=2000) == 2000
    assert chunk_size(paced(1.0), remaining=0) == 0


def test_only_claims_that_publish_within_a_chunk_go_without_a_lease() -> None:
    assert lease_free(paced(20e-6), 2000)
    assert not lease_free(paced(2.0), 1)
    assert not lease_free(paced(0.001), 2000)  # two seconds of work: a lease


@pytest.mark.parametrize(("observations", "expected"), [
    ([(1, 2.0)], 2.0),
    ([(10, 0.01), (10, 0.01)], 0.001),
])
def test_the_pace_is_the_time_per_row(observations: list[tuple[int, float]],
                                      expected: float) -> None:
    pace = Pace()
    for rows, seconds in observations:
        pace.observe(rows, seconds)
    assert pace.seconds_per_row == pytest.approx(expected)


def test_a_slowdown_counts_at_once_a_speedup_only_gradually() -> None:
    pace = paced(0.1)
    pace.observe(1, 2.0)
    assert pace.seconds_per_row == 2.0  # must not be handed a claim it cannot finish
    pace.observe(1, 0.1)
    assert 0.1 < pace.seconds_per_row < 2.0


def test_a_larger_chunk_measures_a_speedup_at_once() -> None:
    # a broker's first claim: one row, mostly round trips; the next, larger, shows its pace
    pace = Pace()
    pace.observe(1, 0.017)
    assert claim_size(pace, claim_timeout=30, batch_size=2000) == 117
    pace.observe(117, 117 * 0.0003)
    assert pace.seconds_per_row == pytest.approx(0.0003)
    assert claim_size(pace, claim_timeout=30, batch_size=2000) == 2000
    assert lease_free(pace, 2000)
    pace.observe(2000, 2000 * 0.0003)
    # once a claim that large has been measured, a faster one of no more rows is one sample
    pace.observe(2000, 2000 * 0.0001)
    assert 0.0001 < pace.seconds_per_row < 0.0003


@pytest.mark.parametrize(("rows", "seconds"), [(0, 1.0), (1, -1.0), (1, math.nan),
                                               (1, math.inf)])
def test_meaningless_observations_are_ignored(rows: int, seconds: float) -> None:
    pace = paced(0.5)
    pace.observe(rows, seconds)
    assert pace.seconds_per_row == 0.5


def test_a_chunk_goes_only_if_the_lease_leaves_time_for_it() -> None:
    pace = paced(2.0)
    assert lease_allows(now=100.0, deadline=130.0, rows=1, pace=pace, margin=3.0)
    assert not lease_allows(now=126.0, deadline=130.0, rows=1, pace=pace, margin=3.0)
    assert not lease_allows(now=131.0, deadline=130.0, rows=1, pace=pace, margin=0.0)
    assert not lease_allows(now=0.0, deadline=float("-inf"), rows=1, pace=pace, margin=0.0)


def test_the_margin_is_a_tenth_of_the_timeout_at_most_five_seconds() -> None:
    assert lease_margin(30.0) == 3.0
    assert lease_margin(600.0) == 5.0


def test_an_outage_backs_off_exponentially_to_a_cap() -> None:
    assert [backoff_after_outage(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_after_outage(100) == 30.0


def test_the_budgets_leave_room() -> None:
    assert 0 < CLAIM_BUDGET < 1
    assert CHUNK_BUDGET <= 1.0
