"""Group commit for a web service: many requests, one transaction.

A gateway answer ``0000`` promises a committed row, and a commit waits for the WAL to reach
the disk: milliseconds on a busy machine, which at one commit per request caps a worker at a
few hundred requests a second however little else it does. :class:`GroupCommit` lets the
event loop hand each request to a few worker threads; a thread takes whatever has queued up
meanwhile (up to ``max_batch``) and processes it together, in one transaction of the
caller's making, then wakes each waiting request with its own answer. An idle service still
answers one request per transaction at once; a busy one commits tens of them at a time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future[Result], result: Result | BaseException) -> None:
    if future.done():  # the request was cancelled (its client went away)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class GroupCommit(Generic[Item, Result]):
    """Runs ``process(items) -> results`` (one result per item, in order) in ``threads``
    worker threads on batches of at most ``max_batch`` items."""

    def __init__(self, process: Callable[[Sequence[Item]], Sequence[Result]], *,
                 threads: int, max_batch: int, name: str = "group-commit") -> None:
        if threads < 1 or max_batch < 1:
            raise ValueError("threads and max_batch must be at least 1")
        self._process = process
        self._threads_wanted = threads
        self._max_batch = max_batch
        self._name = name
        self._queue: queue.SimpleQueue[_Waiting[Item, Result] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self._threads_wanted):
            thread = threading.Thread(target=self._run, name=f"{self._name}-{index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Process what is queued, then end the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    async def submit(self, item: Item) -> Result:
        if not self._threads:
            raise RuntimeError("GroupCommit is not started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put(_Waiting(item, future, loop))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            outcomes: Sequence[Result | BaseException]
            try:
                outcomes = self._process([waiting.item for waiting in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"{len(outcomes)} results for {len(batch)} items")
            except Exception as exc:  # each waiting request gets the error, none hangs
                outcomes = [exc] * len(batch)
            for waiting, outcome in zip(batch, outcomes, strict=True):
                waiting.loop.call_soon_threadsafe(_resolve, waiting.future, outcome)
            if stopping:
                return


__all__ = ["GroupCommit"]
