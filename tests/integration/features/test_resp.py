"""The multiplexed Redis client of the feature path (serving.features.resp) against a real
redis-server: replies reach the request that asked, also when requests give up, fail
or run concurrently; a restarted server is picked up; AUTH and SELECT from the URL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import hiredis
import pytest
import redis
from redis.exceptions import ResponseError

from serving.features import materialize
from serving.features.resp import MultiplexedRedis, pack
from serving.features.store import RedisFeatureStore
from serving.models.registry import Registry
from tests.conftest import RedisServer


def test_pack_is_resp() -> None:
    assert pack([("HMGET", "k", "a")]) == b"*3\r\n$5\r\nHMGET\r\n$1\r\nk\r\n$1\r\na\r\n"
    assert pack([("SET", b"\xff", "")]) == b"*3\r\n$3\r\nSET\r\n$1\r\n\xff\r\n$0\r\n\r\n"


async def test_concurrent_requests_get_their_own_replies(own_redis: RedisServer) -> None:
    r = own_redis.client()
    for i in range(200):
        r.hset(f"k{i}", mapping={"a": str(i), "b": str(-i)})
    mux = MultiplexedRedis(own_redis.url)
    try:

        async def one(i: int) -> None:
            got = await mux.execute([("HMGET", f"k{i}", "a", "b", "zz"), ("HMGET", "none", "a")])
            assert got == [[str(i), str(-i), None], [None]]

        await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        await mux.aclose()


async def test_an_error_reply_stays_in_its_place(own_redis: RedisServer) -> None:
    own_redis.client().set("str", "x")
    mux = MultiplexedRedis(own_redis.url)
    try:
        got = await mux.execute([("HMGET", "str", "a"), ("PING",)])
        assert isinstance(got[0], ResponseError) and "WRONGTYPE" in str(got[0])
        assert got[1] == "PONG"
        assert await mux.execute([("ECHO", "next")]) == ["next"]  # still in step
        own_redis.client().hset("bin", "a", b"\xff\xfe")
        assert await mux.execute([("HMGET", "bin", "a")]) == [["\ufffd\ufffd"]]
    finally:
        await mux.aclose()


async def test_a_request_that_gives_up_does_not_shift_the_replies(
    own_redis: RedisServer,
) -> None:
    mux = MultiplexedRedis(own_redis.url)
    try:
        # BLPOP holds the shared connection for 0.3 s; the request gives up at 0.05 s.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await mux.execute([("BLPOP", "empty", "0.3")])
        # Queued behind it, answered after it: each gets its own reply.
        a, b = await asyncio.gather(
            mux.execute([("ECHO", "a")]), mux.execute([("ECHO", "b"), ("ECHO", "c")])
        )
        assert (a, b) == (["a"], ["b", "c"])
    finally:
        await mux.aclose()


async def test_a_restarted_server_is_picked_up(own_redis: RedisServer) -> None:
    mux = MultiplexedRedis(own_redis.url)
    try:
        assert await mux.execute([("PING",)]) == ["PONG"]
        own_redis.stop()
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(2):
                await mux.execute([("PING",)])  # down: a clear connection error, at once
        own_redis.start()
        for _ in range(3):
            assert await mux.execute([("PING",)]) == ["PONG"]
    finally:
        await mux.aclose()


async def test_auth_and_select_from_the_url(own_redis: RedisServer) -> None:
    admin = own_redis.client()
    admin.config_set("requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{own_redis.port}/2"
        redis.Redis.from_url(url, decode_responses=True).set("where", "db2")
        mux = MultiplexedRedis(url)
        try:
            assert await mux.execute([("GET", "where")]) == ["db2"]
        finally:
            await mux.aclose()
        bad = MultiplexedRedis(f"redis://:wrong@127.0.0.1:{own_redis.port}/0")
        with pytest.raises(ResponseError):
            await bad.execute([("PING",)])
    finally:
        admin.config_set("requirepass", "")


async def test_feature_lookups_recover_after_a_restart(
    own_redis: RedisServer, registry_root: Path
) -> None:
    cfg = Registry(registry_root).get("fraud", "v2").manifest.features
    assert cfg is not None

    def load() -> None:
        for view in cfg.views:
            materialize.load(
                own_redis.url,
                "t",
                materialize.find_view(registry_root, view.name),
                registry_root / "fraud" / "features" / f"{view.name}.csv",
                view.entity,
            )

    load()
    entity = {
        v.entity: own_redis.client().keys(f"t:fv:{v.name}:*")[0].split(":")[-1] for v in cfg.views
    }
    store = RedisFeatureStore(own_redis.url, "t", timeout_s=0.5)
    assert store._mux is not None  # redis:// takes the multiplexed path
    try:
        _, problems = await store.lookup(cfg, [entity])
        assert problems == []
        own_redis.stop()
        _, problems = await store.lookup(cfg, [entity])
        assert {p.outcome for p in problems} == {"error"}
        own_redis.start()
        load()
        _, problems = await store.lookup(cfg, [entity])
        assert problems == []
    finally:
        await store.close()


async def test_a_connect_attempt_everyone_gave_up_on_is_not_reused() -> None:
    """An attempt that fails after every waiting request left (here: a server that
    accepts but never answers AUTH) must not be handed to later requests."""
    answering = False

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)
            self.reader = hiredis.Reader()

        def data_received(self, data: bytes) -> None:
            self.reader.feed(data)
            while (cmd := self.reader.gets()) is not False:
                if answering:
                    self.t.write(b"+OK\r\n" if cmd[0] == b"AUTH" else b"+PONG\r\n")

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = MultiplexedRedis(f"redis://:pw@127.0.0.1:{port}/0", connect_timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await mux.execute([("PING",)])
        async with asyncio.timeout(5):  # the attempt times out, with nobody waiting
            while mux._opening is not None:
                await asyncio.sleep(0.01)
        answering = True
        assert await mux.execute([("PING",)]) == ["PONG"]
    finally:
        await mux.aclose()
        server.close()


async def test_a_half_open_connection_is_dropped_after_the_read_timeout(
    own_redis: RedisServer,
) -> None:
    """The link to Redis dies without a FIN (here: a proxy whose first connection
    swallows everything): requests time out at their deadlines, and once the oldest has
    waited past the read timeout the next request drops the link and opens a new one,
    instead of timing out until thousands are outstanding."""
    accepted: list[int] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        if len(accepted) == 1:  # the half-open one: reads, never answers
            while await reader.read(65536):
                pass
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", own_redis.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", read_timeout_s=0.3)
    try:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await client.execute([("PING",)])
        await asyncio.sleep(0.35)  # the oldest unanswered request is now past 0.3 s
        async with asyncio.timeout(2):
            assert await client.execute([("PING",)]) == ["PONG"]
        assert len(accepted) == 2
    finally:
        await client.aclose()
        server.close()
