"""Delayed labels against a real Redis: all or nothing, and a deadline when Redis hangs."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from serving.errors import Conflict, InvalidInput, NotFound, StateStoreUnavailable
from serving.observability.feedback import FeedbackStore
from tests.conftest import RedisServer


async def _store_with(redis: RedisServer, *rids: str) -> FeedbackStore:
    store = FeedbackStore(redis.url, "t", ttl_s=600)
    for rid in rids:
        store.record(rid, "m", "v1", np.array([1]))
    await store.flush()
    return store


async def test_a_bad_item_stores_and_counts_nothing(own_redis: RedisServer) -> None:
    store = await _store_with(own_redis, "a", "b")
    try:
        with pytest.raises(InvalidInput, match="'b' had 1 instances; got 2"):
            await store.label([("a", 1), ("b", [1, 2])])
        with pytest.raises(Conflict, match="'a'"):
            await store.label([("a", 1), ("a", 0)])
        with pytest.raises(NotFound, match="'nope'"):
            await store.label([("a", 1), ("nope", 1)])
        # None of the above stored "a": now it counts, once.
        got = await store.label([("a", 1), ("a", 1), ("b", 0)])
        assert got == [
            {"request_id": "a", "duplicate": False, "correct": 1, "instances": 1},
            {"request_id": "a", "duplicate": True},
            {"request_id": "b", "duplicate": False, "correct": 0, "instances": 1},
        ]
        assert (await store.accuracy("m", "v1"))["5m"] == 0.5
        assert (await store.label([("a", 1)]))[0]["duplicate"] is True
    finally:
        await store.close()


async def test_a_hung_redis_is_a_503_within_the_deadline(own_redis: RedisServer) -> None:
    store = await _store_with(own_redis, "a")
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(StateStoreUnavailable, match=r"Redis (unavailable|did not answer)"):
            await store.label([("a", 1)], timeout_s=0.3)
        assert time.monotonic() - t0 < 1.5
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await store.close()
    own_redis.stop()
    store = FeedbackStore(own_redis.url, "t", ttl_s=600)
    with pytest.raises(StateStoreUnavailable, match="Redis unavailable"):
        await store.label([("a", 1)])
