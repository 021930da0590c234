from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from outbox.web.batching import GroupCommit


def test_each_item_gets_its_own_result_and_batches_form_under_load() -> None:
    batches: list[list[int]] = []
    release = threading.Event()

    def process(items: Sequence[int]) -> list[int]:
        release.wait(5)  # the first batch waits, so the rest queue up behind it
        batches.append(list(items))
        return [item * 10 for item in items]

    commit: GroupCommit[int, int] = GroupCommit(process, threads=1, max_batch=4)
    commit.start()

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(commit.submit(n)) for n in range(9)]
        await asyncio.sleep(0.05)
        release.set()
        return list(await asyncio.gather(*tasks))

    try:
        assert asyncio.run(main()) == [n * 10 for n in range(9)]
    finally:
        commit.stop(5)
    assert sorted(n for batch in batches for n in batch) == list(range(9))
    assert all(len(batch) <= 4 for batch in batches)
    assert len(batches) < 9  # items that queued meanwhile shared a batch


def test_an_exception_reaches_every_request_of_its_batch() -> None:
    def process(items: Sequence[int]) -> list[int]:
        raise ValueError("boom")

    commit: GroupCommit[int, int] = GroupCommit(process, threads=2, max_batch=10)
    commit.start()

    async def main() -> list[BaseException | int]:
        return list(await asyncio.gather(*(commit.submit(n) for n in range(5)),
                                         return_exceptions=True))

    try:
        results = asyncio.run(main())
    finally:
        commit.stop(5)
    assert all(isinstance(result, ValueError) for result in results)


def test_a_wrong_number_of_results_is_an_error_not_a_hang() -> None:
    commit: GroupCommit[int, int] = GroupCommit(lambda items: [], threads=1, max_batch=10)
    commit.start()
    try:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            asyncio.run(commit.submit(1))
    finally:
        commit.stop(5)


def test_submit_before_start_and_bad_sizes_are_refused() -> None:
    commit: GroupCommit[int, int] = GroupCommit(list, threads=1, max_batch=1)
    with pytest.raises(RuntimeError, match="not started"):
        asyncio.run(commit.submit(1))
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(list, threads=0, max_batch=1)
