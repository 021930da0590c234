"""The pure scheduling decisions: rates, token buckets, pool members, receiver limits."""

from __future__ import annotations

import random

import pytest

from outbox.scheduling import (
    MemberState,
    ProbePolicy,
    Rate,
    batch_failed_as_a_whole,
    default_burst,
    delivered,
    next_probe_at,
    next_token_in,
    parse_rate,
    probe_passed,
    probes_due,
    serving_order,
    take_tokens,
    went_down,
    within_limit,
)

# --- rates ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "count", "period"), [
    ("10/s", 10, 1.0), ("10/m", 10, 60.0), ("600/h", 600, 3600.0), ("3/10m", 3, 600.0),
    (" 5 / 2s ", 5, 2.0), ("1/1.5s", 1, 1.5), ("100/d", 100, 86400.0), ("4/500ms", 4, 0.5),
])
def test_rates_parse(text: str, count: int, period: float) -> None:
    assert parse_rate(text) == Rate(count, period)


@pytest.mark.parametrize("text", ["", "10", "10/", "ten/s", "10/w", "0/s", "-1/s", "10/0s",
                                  "10/s/m"])
def test_bad_rates_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_a_rate_prints_as_written() -> None:
    assert [str(parse_rate(text)) for text in ("10/m", "3/10m", "10/s", "1/1.5s")] == [
        "10/m", "3/10m", "10/s", "1/1.5s"]


def test_default_burst_is_a_tenth_of_a_second_and_at_least_one() -> None:
    assert default_burst(parse_rate("10/m")) == 1
    assert default_burst(parse_rate("10/s")) == 1
    assert default_burst(parse_rate("25/s")) == 3
    assert default_burst(parse_rate("1000/s")) == 100


# --- token buckets -----------------------------------------------------------------------


def test_a_full_bucket_grants_up_to_its_burst() -> None:
    grant = take_tokens(5.0, 100.0, 100.0, rate=1.0, burst=5, want=3)
    assert (grant.granted, grant.tokens, grant.updated_at) == (3, 2.0, 100.0)
    grant = take_tokens(grant.tokens, grant.updated_at, 100.0, rate=1.0, burst=5, want=3)
    assert grant.granted == 2
    assert take_tokens(0.0, 100.0, 100.0, rate=1.0, burst=5, want=3).granted == 0


def test_tokens_accrue_at_the_rate_up_to_the_burst() -> None:
    assert take_tokens(0.0, 0.0, 0.5, rate=10.0, burst=100, want=100).granted == 5
    assert take_tokens(0.0, 0.0, 1000.0, rate=10.0, burst=3, want=100).granted == 3
    grant = take_tokens(0.0, 0.0, 0.15, rate=10.0, burst=2, want=1)
    assert grant.granted == 1
    assert grant.tokens == pytest.approx(0.5)
    assert next_token_in(grant.tokens, rate=10.0) == pytest.approx(0.05)
    assert next_token_in(1.0, rate=10.0) == 0.0


def test_a_clock_behind_the_bucket_refills_nothing_and_never_moves_it_back() -> None:
    grant = take_tokens(0.25, 10.0, 9.0, rate=1.0, burst=5, want=1)
    assert (grant.granted, grant.tokens, grant.updated_at) == (0, 0.25, 10.0)


def test_interleaved_takers_never_get_more_than_burst_plus_rate_times_t() -> None:
    rng = random.Random(12)
    for _ in range(200):
        rate = rng.choice([0.5, 1.0, 10.0, 166.0])
        burst = rng.randint(1, 5)
        tokens, updated = float(burst), 0.0
        times: list[tuple[float, int]] = []
        clock = 0.0
        for _ in range(300):
            clock += rng.expovariate(rate * 2)
            # a taker whose transaction started a little earlier (reads an older clock)
            seen = clock - rng.random() * 0.01
            grant = take_tokens(tokens, updated, seen, rate=rate, burst=burst,
                                want=rng.randint(0, 4))
            tokens, updated = grant.tokens, grant.updated_at
            times.extend([(clock, 1)] * grant.granted)
        for start, _ in times:
            window = 1.0 / rate * 5
            inside = sum(1 for at, _ in times if start <= at < start + window)
            assert inside <= burst + rate * (window + 0.01) + 1e-6


# --- failover pools ----------------------------------------------------------------------

POLICY = ProbePolicy(interval=5.0, max_interval=60.0)


def test_the_first_member_up_serves() -> None:
    up, down = MemberState(), MemberState(up=False)
    assert serving_order([up, up, up]) == [0, 1, 2]
    assert serving_order([down, up, up]) == [1, 2]
    assert serving_order([down, down]) == []


def test_a_member_is_down_when_a_batch_fails_as_a_whole_and_transiently() -> None:
    assert batch_failed_as_a_whole(10, 10, all_transient=True)
    assert not batch_failed_as_a_whole(10, 9, all_transient=True)
    assert not batch_failed_as_a_whole(10, 10, all_transient=False)
    assert not batch_failed_as_a_whole(0, 0, all_transient=True)


def test_a_down_member_is_probed_every_interval_until_it_passes() -> None:
    state = went_down(MemberState(), now=100.0, policy=POLICY)
    assert (state.up, state.flaps, state.next_probe_at) == (False, 1, 105.0)
    assert probes_due([state], 104.9) == []
    assert probes_due([MemberState(next_probe_at=200.0), state], 105.0) == [1]
    again = went_down(state, now=105.0, policy=POLICY)  # its probe failed: same interval
    assert (again.flaps, again.next_probe_at) == (1, 110.0)
    back = probe_passed(again, now=110.0, policy=POLICY)
    assert back.up
    assert back.next_probe_at == 115.0


def test_a_member_that_flaps_is_probed_at_doubling_intervals_until_it_delivers() -> None:
    state = MemberState()
    delays = []
    for _ in range(6):
        state = went_down(state, now=0.0, policy=POLICY)
        delays.append(state.next_probe_at)
        state = probe_passed(state, now=0.0, policy=POLICY)  # its check passes ...
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]  # ... but its batches fail
    state = delivered(state, now=0.0, policy=POLICY)
    assert state.flaps == 0
    assert went_down(state, now=0.0, policy=POLICY).next_probe_at == 5.0


def test_next_probe_is_the_earliest() -> None:
    assert next_probe_at([MemberState(next_probe_at=9.0), MemberState(next_probe_at=3.0)]) == 3.0
    assert next_probe_at([]) is None


# --- receiver limits ---------------------------------------------------------------------


def test_rows_within_the_limit_go_in_order_and_the_rest_are_refused() -> None:
    a, b = b"a" * 16, b"b" * 16
    assert within_limit(3, {a: 1}, [(a, False), (b, False), (a, False), (a, False)]) == [
        True, True, True, False]


def test_a_row_holding_its_place_from_an_earlier_attempt_always_goes_and_counts() -> None:
    a = b"a" * 16
    assert within_limit(1, {a: 5}, [(a, True), (a, False)]) == [True, False]
    assert within_limit(2, {}, [(a, False), (a, True), (a, False)]) == [True, True, False]
