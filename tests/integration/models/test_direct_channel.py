"""The direct channel over real TCP: replica endpoints (serving.models.endpoint) and the
ingress's channel (serving.dataplane.channel), with stand-in workers (no Ray, no model).

What it must hold: answers and errors arrive as themselves; a stranger without the token
gets nothing; a replica killed with requests on it loses none of them (each is sent once
more, to another replica); a stopping replica finishes what it holds and sends new
requests elsewhere; past its limit a replica refuses at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest

from serving.dataplane.channel import DirectChannel
from serving.errors import InvalidInput, NotReady, Overloaded
from serving.models import endpoint as endpoint_module
from serving.models import wire
from serving.models.endpoint import ReplicaEndpoint
from serving.models.worker import ReplicaResult


class Worker:
    """y = factor * sum(x) per row, after the gate opens (open by default)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.gate = asyncio.Event()
        self.gate.set()
        self.seen = 0
        self.alone: list[bool] = []

    async def predict(self, inputs: dict[str, np.ndarray], alone: bool = False) -> ReplicaResult:
        self.seen += 1
        self.alone.append(alone)
        await self.gate.wait()
        x = inputs["x"]
        if x.min() < 0:
            raise InvalidInput("negative input", field="x")
        return ReplicaResult({"y": self.factor * x.sum(axis=1)}, 0.001, 0.002, len(x))


@contextlib.asynccontextmanager
async def two_replicas(limit: int = 64) -> AsyncIterator[list[tuple[Worker, ReplicaEndpoint]]]:
    """Two replicas' endpoints on this test's own event loop."""
    out = []
    for factor in (2.0, 2.0):
        worker = Worker(factor)
        ep = ReplicaEndpoint(worker, limit=limit)  # type: ignore[arg-type]
        await ep.start("127.0.0.1")
        out.append((worker, ep))
    try:
        yield out
    finally:
        for _, ep in out:
            ep._stopping = True
            if ep._server is not None:
                ep._server.close()
            for conn in list(ep._conns):
                conn.close()


def _channel(*eps: ReplicaEndpoint, token: str | None = None) -> DirectChannel:
    channel = DirectChannel()
    endpoints = {f"r{i}": _addr(ep) for i, ep in enumerate(eps)}
    if token is not None:
        endpoints = {k: (host, port, token) for k, (host, port, _) in endpoints.items()}
    channel.update("m", "v1", endpoints)
    return channel


def x(*rows: list[float]) -> dict[str, np.ndarray]:
    return {"x": np.array(rows, dtype=np.float32)}


async def test_answers_and_errors_arrive_as_themselves() -> None:
    async with two_replicas() as replicas:
        (worker, ep), _ = replicas
        channel = _channel(ep)
        r = await channel.predict("m", "v1", x([1, 2], [3, 4]), True, 5.0)
        np.testing.assert_allclose(r.outputs["y"], [6.0, 14.0])
        assert (r.queue_s, r.infer_s, r.batch_size) == (0.001, 0.002, 2)
        assert worker.alone == [True]
        with pytest.raises(InvalidInput, match="m/v1: negative input"):
            await channel.predict("m", "v1", x([-1, 0]), False, 5.0)
        # Many at once share the connection; each answer finds its request.
        answers = await asyncio.gather(
            *(channel.predict("m", "v1", x([i, 0]), False, 5.0) for i in range(50))
        )
        assert [float(a.outputs["y"][0]) for a in answers] == [2.0 * i for i in range(50)]
        channel.close()


async def test_without_the_token_nothing_is_answered() -> None:
    async with two_replicas() as replicas:
        (worker, ep), _ = replicas
        channel = _channel(ep, token="not-the-token")
        with pytest.raises(NotReady, match="no replica answered"):
            await channel.predict("m", "v1", x([1, 2]), False, 5.0)
        assert worker.seen == 0
        channel.close()


async def test_a_killed_replica_loses_no_request() -> None:
    async with two_replicas() as replicas:
        (w0, e0), (w1, e1) = replicas
        w0.gate.clear()  # replica 0 holds what it gets
        channel = _channel(e0, e1)
        calls = [
            asyncio.create_task(channel.predict("m", "v1", x([i, 1]), False, 5.0)) for i in range(6)
        ]
        async with asyncio.timeout(5):
            while w0.seen < 3 or w1.seen < 3:  # spread over both by in-flight count
                await asyncio.sleep(0.005)
        for conn in list(e0._conns):  # replica 0 dies: its connections reset
            conn._transport.abort()  # type: ignore[union-attr]
        e0._server.close()  # type: ignore[union-attr]
        answers = await asyncio.gather(*calls)
        assert [float(a.outputs["y"][0]) for a in answers] == [2.0 * (i + 1) for i in range(6)]
        assert w1.seen == 6  # its own three, and the three replica 0 lost
        channel.close()


async def test_a_stopping_replica_drains_and_sends_new_requests_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with two_replicas() as replicas:
        monkeypatch.setattr(endpoint_module, "DEREGISTER_S", 0.0)
        (w0, e0), (w1, e1) = replicas
        w0.gate.clear()
        channel = _channel(e0)
        held = asyncio.create_task(channel.predict("m", "v1", x([5, 5]), False, 5.0))
        async with asyncio.timeout(5):
            while w0.seen < 1:
                await asyncio.sleep(0.005)
        stopping = asyncio.create_task(e0.stop(grace_s=5.0))
        async with asyncio.timeout(5):
            while not e0._stopping:
                await asyncio.sleep(0.005)
        # Serve still lists it for a moment: a new request is refused and goes elsewhere.
        channel.update("m", "v1", {"r0": _addr(e0), "r1": _addr(e1)})
        channel._replicas[("m", "v1")]["r1"].inflight = 10  # so that r0 is picked first
        again = await channel.predict("m", "v1", x([1, 1]), False, 5.0)
        assert float(again.outputs["y"][0]) == 4.0 and w1.seen == 1
        w0.gate.set()  # what it held is answered before it closes
        assert float((await held).outputs["y"][0]) == 20.0
        await stopping
        channel.close()


async def test_past_its_limit_a_replica_refuses_at_once() -> None:
    async with two_replicas(limit=8) as replicas:
        (worker, ep), _ = replicas
        worker.gate.clear()
        channel = _channel(ep)
        held = [
            asyncio.create_task(channel.predict("m", "v1", x([1, 1]), False, 5.0)) for _ in range(8)
        ]
        async with asyncio.timeout(5):
            while worker.seen < 8:
                await asyncio.sleep(0.005)
        with pytest.raises(Overloaded, match="limit of 8"):
            await channel.predict("m", "v1", x([1, 1]), False, 5.0)
        worker.gate.set()
        assert len(await asyncio.gather(*held)) == 8
        channel.close()


async def test_a_stranger_speaking_nonsense_is_dropped() -> None:
    async with two_replicas() as replicas:
        (worker, ep), _ = replicas
        host, port = _addr(ep)[:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(wire.frame(1, wire.PREDICT, wire.encode_arrays(x([1, 2]))))  # no HELLO
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
        writer.close()
        assert worker.seen == 0


def _addr(ep: ReplicaEndpoint) -> tuple[str, int, str]:
    host, _, port = ep.address.rpartition(":")
    return host, int(port), ep.token
