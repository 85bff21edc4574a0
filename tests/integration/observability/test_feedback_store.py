"""Delayed labels against a real Redis: all or nothing, and a deadline when Redis hangs."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from serving.errors import Conflict, Forbidden, InvalidInput, NotFound, StateStoreUnavailable
from serving.observability.feedback import FeedbackStore
from tests.conftest import RedisServer


async def _store_with(redis: RedisServer, *rids: str) -> FeedbackStore:
    store = FeedbackStore(redis.url, "t", ttl_s=600)
    for rid in rids:
        store.record(rid, "m", "v1", np.array([1]))
    await store.flush()
    return store


def _trusted(pairs: list[tuple[str, object]]) -> list[tuple[str, object, str | None]]:
    return [(rid, label, None) for rid, label in pairs]


async def test_a_label_needs_its_answers_key_unless_trusted(own_redis: RedisServer) -> None:
    store = FeedbackStore(own_redis.url, "t", ttl_s=600)
    try:
        key_a = store.record("a", "m", "v1", np.array([1]))
        key_b = store.record("b", "m", "v1", np.array([0]))
        assert len(key_a) == 32 and key_a != key_b
        # A later prediction reusing "a" (a client-chosen id) cannot take it over.
        key_a2 = store.record("a", "m", "v2", np.array([0]))
        await store.flush()
        for items in ([("a", 1, key_b)], [("a", 1, key_a2)], [("a", 1, None)], [("a", 1, "")]):
            with pytest.raises(Forbidden, match="feedback_key does not match request 'a'"):
                await store.label(items)
        # Nothing was stored by the refused calls; the right key labels it once.
        got = await store.label([("a", 1, key_a), ("b", 0, key_b)])
        assert [g["correct"] for g in got] == [1, 1]
        assert (await store.accuracy("m", "v1"))["5m"] == 1.0
        assert (await store.accuracy("m", "v2"))["5m"] is None
        # The trusted label source needs no key.
        store.record("c", "m", "v1", np.array([1]))
        await store.flush()
        assert (await store.label([("c", 0, None)], trusted=True))[0]["correct"] == 0
    finally:
        await store.close()


async def test_a_bad_item_stores_and_counts_nothing(own_redis: RedisServer) -> None:
    store = await _store_with(own_redis, "a", "b")
    try:
        with pytest.raises(InvalidInput, match="'b' had 1 instances; got 2"):
            await store.label(_trusted([("a", 1), ("b", [1, 2])]), trusted=True)
        with pytest.raises(Conflict, match="'a'"):
            await store.label(_trusted([("a", 1), ("a", 0)]), trusted=True)
        with pytest.raises(NotFound, match="'nope'"):
            await store.label(_trusted([("a", 1), ("nope", 1)]), trusted=True)
        # None of the above stored "a": now it counts, once.
        got = await store.label(_trusted([("a", 1), ("a", 1), ("b", 0)]), trusted=True)
        assert got == [
            {"request_id": "a", "duplicate": False, "correct": 1, "instances": 1},
            {"request_id": "a", "duplicate": True},
            {"request_id": "b", "duplicate": False, "correct": 0, "instances": 1},
        ]
        assert (await store.accuracy("m", "v1"))["5m"] == 0.5
        assert (await store.label(_trusted([("a", 1)]), trusted=True))[0]["duplicate"] is True
    finally:
        await store.close()


async def test_a_hung_redis_is_a_503_within_the_deadline(own_redis: RedisServer) -> None:
    store = await _store_with(own_redis, "a")
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(StateStoreUnavailable, match=r"Redis (unavailable|did not answer)"):
            await store.label(_trusted([("a", 1)]), timeout_s=0.3, trusted=True)
        assert time.monotonic() - t0 < 1.5
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await store.close()
    own_redis.stop()
    store = FeedbackStore(own_redis.url, "t", ttl_s=600)
    with pytest.raises(StateStoreUnavailable, match="Redis unavailable"):
        await store.label(_trusted([("a", 1)]), trusted=True)


async def test_records_written_during_a_10_s_outage_are_all_joinable(
    own_redis: RedisServer,
) -> None:
    """Redis killed for 10 s under a steady stream of predictions: every record waits in
    memory, reaches Redis once it is back, and its label joins (was: a third dropped)."""
    import asyncio

    store = FeedbackStore(own_redis.url, "t", ttl_s=600)
    rids = [f"r{i}" for i in range(2000)]
    try:
        store.record("before", "m", "v1", np.array([1]))
        await store.flush()
        own_redis.stop()
        for i, rid in enumerate(rids):  # 200 a second across the outage
            store.record(rid, "m", "v1", np.array([i % 2]))
            if i % 20 == 19:
                await asyncio.sleep(0.1)
        assert store.buffered == len(rids) and store.dropped == 0
        own_redis.start()  # same port, empty: everything must come from the buffer
        deadline = time.monotonic() + 5
        while store.buffered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert store.buffered == 0
        got = await store.label(
            _trusted([(rid, i % 2) for i, rid in enumerate(rids)]), trusted=True
        )
        assert all(g["correct"] == 1 for g in got)
        assert store.dropped == 0
    finally:
        await store.close()


async def test_past_the_buffer_new_records_are_dropped_and_counted(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.observability import feedback

    monkeypatch.setattr(feedback, "MAX_PENDING", 3)
    own_redis.stop()
    store = FeedbackStore(own_redis.url, "t", ttl_s=600)
    try:
        for rid in "abcde":
            store.record(rid, "m", "v1", np.array([1]))
        await store.flush()  # fails: all three kept
        assert (store.buffered, store.dropped) == (3, 2)
        own_redis.start()
        await store.flush()
        assert store.buffered == 0
        assert [
            g["duplicate"] for g in await store.label(_trusted([("a", 1), ("c", 1)]), trusted=True)
        ] == [False] * 2
        with pytest.raises(NotFound, match="'d'"):
            await store.label(_trusted([("d", 1)]), trusted=True)
    finally:
        await store.close()
