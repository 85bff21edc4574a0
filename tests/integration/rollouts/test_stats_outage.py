"""Rollout statistics through Redis outages: nothing lost, nothing counted twice."""

from __future__ import annotations

import os
import signal
import time

import pytest
from redis.exceptions import RedisError

from serving.redis_conn import LazyClient
from serving.rollouts import stats as stats_module
from serving.rollouts.stats import StatsStore
from tests.conftest import RedisServer


def _requests(store: StatsStore, n: int) -> None:
    for _ in range(n):
        store.recorder.request("m", "v1", 0.001, error=False)


async def test_a_killed_redis_loses_no_statistics(own_redis: RedisServer) -> None:
    t0 = time.time()
    store = StatsStore(LazyClient(own_redis.url), "t")
    try:
        _requests(store, 5)
        await store.flush()
        own_redis.stop()
        for _ in range(3):  # three seconds of traffic while Redis is gone
            _requests(store, 10)
            with pytest.raises((RedisError, OSError)):
                await store.flush()
        assert store.unsent == 3
        own_redis.start()
        await store.flush()
        assert store.unsent == 0
        assert (await store.window("m", "v1", t0 - 1, time.time())).n == 30  # 5 died with it
    finally:
        await store._redis.aclose()


async def test_a_batch_sent_again_after_a_lost_reply_counts_once(
    own_redis: RedisServer,
) -> None:
    """Redis hung: the write times out but Redis runs it once resumed; the retry must
    not add the same figures again."""
    t0 = time.time()
    store = StatsStore(LazyClient(own_redis.url), "t")
    assert own_redis.proc is not None
    try:
        await store._redis().ping()  # connected before it hangs
        _requests(store, 7)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises((RedisError, OSError)):
                await store.flush()  # the client's 2 s socket timeout
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert store.unsent == 1
        await store.flush()
        assert store.unsent == 0
        assert (await store.window("m", "v1", t0 - 1, time.time())).n == 7
    finally:
        await store._redis.aclose()


async def test_past_the_buffer_the_oldest_second_is_dropped(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats_module, "MAX_UNSENT_BATCHES", 2)
    own_redis.stop()
    store = StatsStore(LazyClient(own_redis.url), "t")
    t0 = time.time()
    try:
        for n in (1, 10, 100):
            _requests(store, n)
            with pytest.raises((RedisError, OSError)):
                await store.flush()
        assert store.unsent == 2
        own_redis.start()
        await store.flush()
        assert (await store.window("m", "v1", t0 - 1, time.time())).n == 110
    finally:
        await store._redis.aclose()
