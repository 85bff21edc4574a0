"""The batcher: who goes with whom, and when a batch leaves."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from serving.models.batcher import Batcher


class Runs:
    """A batch function that records its batches and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def __call__(self, requests: list[int]) -> list[int]:
        self.batches.append(list(requests))
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("runtime fault")
        return [10 * r for r in requests]


def batcher(runs: Runs, max_rows: int = 4, wait_s: float = 0.05) -> Batcher[int, int]:
    return Batcher(runs, rows=lambda r: 1 if r >= 0 else 2, max_rows=max_rows, wait_s=wait_s)


async def held_first(max_rows: int, wait_s: float) -> tuple[Runs, Batcher[int, int], Any]:
    """A batcher whose first batch ([1]) is running, held until `runs.gate` is set."""
    runs = Runs()
    runs.gate.clear()
    b = batcher(runs, max_rows=max_rows, wait_s=wait_s)
    first = asyncio.create_task(b.submit(1))
    while not runs.batches:
        await asyncio.sleep(0)
    return runs, b, first


async def test_a_lone_request_leaves_at_once() -> None:
    runs = Runs()
    b = batcher(runs, wait_s=10.0)
    t = time.perf_counter()
    assert await b.submit(1) == 10
    assert time.perf_counter() - t < 1.0 and runs.batches == [[1]]
    assert not b.busy


async def test_a_burst_read_in_one_step_leaves_together_up_to_max_rows() -> None:
    runs = Runs()
    b = batcher(runs, max_rows=4, wait_s=0.05)
    results = await asyncio.gather(*(b.submit(i) for i in range(1, 10)))
    assert results == [10 * i for i in range(1, 10)]  # each gets its own result
    # The first batch takes what arrived with the first request; the next leaves full;
    # the last, partial one once its first request has waited wait_s.
    assert runs.batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]


async def test_while_a_batch_runs_requests_queue_and_leave_as_one() -> None:
    runs, b, first = await held_first(max_rows=8, wait_s=0.0)
    later = [asyncio.create_task(b.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    runs.gate.set()
    assert await first == 10 and [await t for t in later] == [20, 30, 40]
    assert runs.batches == [[1], [2, 3, 4]]


async def test_a_partial_batch_waits_at_most_wait_s_for_company() -> None:
    runs, b, first = await held_first(max_rows=8, wait_s=0.2)
    runs.gate.set()
    await first
    t = time.perf_counter()
    second = asyncio.create_task(b.submit(2))  # the batcher is idle again: at once
    assert await second == 20 and time.perf_counter() - t < 0.15
    runs.gate.clear()
    busy = asyncio.create_task(b.submit(3))
    while len(runs.batches) < 3:
        await asyncio.sleep(0)
    t = time.perf_counter()
    waiting = asyncio.create_task(b.submit(4))  # queued behind a running batch
    runs.gate.set()
    await busy
    assert await waiting == 40
    assert 0.15 < time.perf_counter() - t < 2.0  # it waited for company, not forever


async def test_rows_fill_a_batch_and_a_hurried_request_does_not_wait() -> None:
    runs, b, first = await held_first(max_rows=4, wait_s=10.0)
    two_rows = [asyncio.create_task(b.submit(-i)) for i in (1, 2, 3)]  # 2 rows each
    hurried = asyncio.create_task(b.submit(5, hurry=True))
    await asyncio.sleep(0)
    runs.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *two_rows, hurried), 5.0)
    assert runs.batches == [[1], [-1, -2], [-3, 5]]


async def test_a_failed_batch_fails_its_requests_only() -> None:
    runs = Runs()
    b = batcher(runs)
    runs.fail = True
    with pytest.raises(RuntimeError, match="runtime fault"):
        await b.submit(1)
    runs.fail = False
    assert await b.submit(2) == 20


async def test_a_request_whose_caller_gave_up_is_not_run() -> None:
    runs, b, first = await held_first(max_rows=8, wait_s=0.0)
    gone = asyncio.create_task(b.submit(2))
    kept = asyncio.create_task(b.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    runs.gate.set()
    assert await first == 10 and await kept == 30
    assert runs.batches == [[1], [3]]
