"""The gateway's Redis clients across a server restart (a private redis-server)."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from serving import redis_conn
from serving.features.store import RedisFeatureStore
from tests.conftest import RedisServer


async def test_pooled_connections_survive_a_restart(own_redis: RedisServer) -> None:
    client = redis_conn.client(own_redis.url)
    try:
        await client.set("k", "1")
        # Several pooled connections, all to the server about to go away.
        await asyncio.gather(*(client.get("k") for _ in range(4)))
        own_redis.stop()
        with pytest.raises(RedisConnectionError):
            await client.get("k")  # down: a clear connection error, at once
        own_redis.start()
        # Every stale connection is replaced on first use: no call fails.
        for _ in range(3):
            assert await client.get("k") is None  # a restarted server keeps nothing
        assert await asyncio.gather(*(client.set("k", str(i)) for i in range(6)))
    finally:
        await client.aclose()


async def test_feature_store_pool_survives_a_restart(own_redis: RedisServer) -> None:
    store = RedisFeatureStore(own_redis.url, "t", timeout_s=0.5)
    try:
        r = store._redis()
        await asyncio.gather(*(r.ping() for _ in range(4)))
        own_redis.stop()
        own_redis.start()
        assert all(await asyncio.gather(*(r.ping() for _ in range(4))))
    finally:
        await store.close()
