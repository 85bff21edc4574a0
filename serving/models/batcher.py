"""Dynamic batching: requests in, batches out, one batch at a time.

A batch leaves when it holds `max_rows` rows, or when its first request has waited
`wait_s`, whichever comes first. A request that arrives while nothing is queued or
running leaves at once (there is no one to wait for), with whatever arrived in the same
event-loop step; so does a batch holding a request submitted in a `hurry` (a piece of a
large request, which waits for no company). While a batch runs, new requests queue;
when it is done, the next batch leaves at once if its first request has already waited
`wait_s` (it waited during the run), else it waits the rest of that time. Rows, not
requests, fill a batch (a request may carry several instances); a request is never
split here (the caller cuts large ones first).

Invariants: every submitted request gets exactly its own result or its batch's error;
at most one batch runs at a time; requests leave in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")  # a request
R = TypeVar("R")  # its result


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        rows: Callable[[T], int],
        max_rows: int,
        wait_s: float,
    ) -> None:
        self._run = run
        self._rows = rows
        self.max_rows = max_rows
        self.wait_s = wait_s
        # (request, its rows, when it arrived, in a hurry, its future), oldest first.
        self._queue: deque[tuple[T, int, float, bool, asyncio.Future[R]]] = deque()
        self._queued_rows = 0
        self._hurried = 0  # queued requests submitted in a hurry
        self._worker: asyncio.Task[None] | None = None  # the batch loop, while busy
        self._more: asyncio.Event | None = None  # set when the queue grows

    @property
    def busy(self) -> bool:
        """A batch is running or forming."""
        return self._worker is not None

    async def submit(self, request: T, hurry: bool = False) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        n = self._rows(request)
        self._queue.append((request, n, time.perf_counter(), hurry, fut))
        self._queued_rows += n
        self._hurried += hurry
        if self._worker is None:
            self._more = asyncio.Event()
            self._worker = loop.create_task(self._loop(first_now=True))
        else:
            assert self._more is not None
            self._more.set()
        return await fut

    async def _loop(self, first_now: bool) -> None:
        assert self._more is not None
        try:
            while self._queue:
                if not first_now:
                    await self._fill()
                first_now = False
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await self._run([r for r, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results):
                    if not fut.done():  # done: its caller gave up
                        fut.set_result(result)
        finally:
            self._worker = None

    async def _fill(self) -> None:
        """Wait until the queue holds a full batch or its oldest request has waited
        `wait_s`."""
        assert self._more is not None
        while self._queued_rows < self.max_rows and not self._hurried:
            left = self.wait_s - (time.perf_counter() - self._queue[0][2])
            if left <= 0:
                return
            self._more.clear()
            try:
                async with asyncio.timeout(left):
                    await self._more.wait()
            except TimeoutError:
                return

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The oldest requests that fit in one batch (at least one)."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0][1] <= self.max_rows):
            request, n, _, hurry, fut = self._queue.popleft()
            self._queued_rows -= n
            self._hurried -= hurry
            rows += n
            if not fut.done():  # a request whose caller gave up leaves no work
                batch.append((request, fut))
        return batch
