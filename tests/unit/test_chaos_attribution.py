"""The SIGKILL verdict charges each repeat to the kill that caused it."""

from __future__ import annotations

from bench.chaos import duplicates_per_kill


def test_a_repeat_belongs_to_the_first_kill_after_the_first_delivery() -> None:
    kills = [2.0, 5.0]
    # 1: delivered at 1.0, the relay killed at 2.0 before recording it; its lease ran out
    #    and it went again at 9.0, after the second kill: the first kill's duplicate
    # 2: delivered at 4.9, killed at 5.0, again at 6.0
    # 3: published just before the kill at 5.0, reached the subscriber just after it
    # 4: delivered once
    ids = [1, 2, 3, 4, 1, 2, 3]
    times = [1.0, 4.9, 5.2, 5.5, 9.0, 6.0, 7.0]
    assert duplicates_per_kill(ids, times, kills) == [1, 2]


def test_repeats_after_the_last_kill_are_charged_to_no_kill() -> None:
    assert duplicates_per_kill([1, 1], [6.0, 7.0], [2.0, 5.0]) == [0, 0]
