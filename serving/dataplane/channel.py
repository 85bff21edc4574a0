"""The direct channel, ingress side: predictions to model replicas over one TCP
connection per replica (serving.models.endpoint), instead of a Ray handle round trip.

Which replicas a version has comes from Ray Serve itself (serving.dataplane.replicas):
Serve keeps owning placement, health, restarts, scaling and rolling updates. A request
goes to the replica with the fewest of this ingress's requests in flight. A replica that
goes away with requests on it (killed, or stopping) costs them nothing but time: each
is sent once more, to another replica (predictions are idempotent). Requests written
in one loop step leave in one write; answers are matched by request id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from serving.errors import NotReady, by_code
from serving.models import wire
from serving.models.endpoint import STOPPING
from serving.models.registry import Arrays
from serving.models.worker import ReplicaResult
from serving.observability.metrics import metrics

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
DOWN_FOR_S = 1.0  # a replica that refused a connection is not tried again this long


class ReplicaGone(Exception):
    """The replica went away before answering: the request may be sent elsewhere."""


@dataclass(eq=False)
class Replica:
    """One replica's endpoint as Serve published it, and this ingress's use of it."""

    id: str
    host: str
    port: int
    token: str
    inflight: int = 0
    down_until: float = 0.0
    conn: _Connection | None = None
    opening: asyncio.Future[_Connection] | None = field(default=None, repr=False)


class _Connection(asyncio.Protocol):
    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._reader = wire.FrameReader()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[wire.Frame]] = {}
        self._out: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(wire.frame(0, wire.HELLO, [self._token]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._transport = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaGone(f"connection lost: {exc or 'closed'}"))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except wire.WireError as exc:
            log.warning("direct channel: bad answer stream (%s); dropping it", exc)
            self.abort()
            return
        for frame in frames:
            fut = self._pending.pop(frame.request_id, None)
            if fut is not None and not fut.done():  # done: the caller gave up
                fut.set_result(frame)

    def send(self, rid: int, data: bytes) -> asyncio.Future[wire.Frame]:
        if self._transport is None:
            raise ReplicaGone("connection closed")
        fut: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)
        return fut

    def forget(self, rid: int) -> None:
        self._pending.pop(rid, None)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(b"".join(out))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class DirectChannel:
    """`predict(model, version, ...)` over the direct channel. `endpoints` says whether
    a version has replicas to send to (else the caller uses a Serve handle)."""

    def __init__(self) -> None:
        self._replicas: dict[tuple[str, str], dict[str, Replica]] = {}
        self._ids: Iterator[int] = itertools.count(1)

    def has_endpoints(self, model: str, version: str) -> bool:
        return bool(self._replicas.get((model, version)))

    def state(self, model: str, version: str) -> dict[str, Any]:
        """What this ingress knows of a version's replicas (for the admin API)."""
        replicas = self._replicas.get((model, version), {})
        return {
            "replicas": len(replicas),
            "connected": sum(1 for r in replicas.values() if r.conn and not r.conn.lost),
            "in_flight": sum(r.inflight for r in replicas.values()),
            "hosts": sorted({r.host for r in replicas.values()}),
        }

    def update(self, model: str, version: str, endpoints: dict[str, tuple[str, int, str]]) -> None:
        """The replicas Serve runs for a version now: id → (host, port, token). Those
        gone are closed once their requests in flight are answered or failed."""
        known = self._replicas.setdefault((model, version), {})
        for rid in list(known):
            if rid not in endpoints or endpoints[rid] != _address(known[rid]):
                old = known.pop(rid)
                if old.conn is not None:
                    asyncio.get_running_loop().call_later(30.0, old.conn.close)
        for rid, (host, port, token) in endpoints.items():
            if rid not in known:
                known[rid] = Replica(rid, host, port, token)

    async def predict(
        self, model: str, version: str, arrays: Arrays, alone: bool, timeout_s: float
    ) -> ReplicaResult:
        body = wire.encode_arrays(arrays)
        deadline_ms = max(1, min(int(timeout_s * 1000), 0xFFFFFFFF))
        tried: set[str] = set()
        for _ in range(2):  # the first try, and once more if the replica went away
            replica = self._pick(model, version, tried)
            if replica is None:
                break
            tried.add(replica.id)
            try:
                frame = await self._exchange(replica, body, alone, deadline_ms)
            except ReplicaGone as exc:
                log.info("%s/%s replica %s gone (%s)", model, version, replica.id, exc)
                metrics().replica_retries.inc(1, tags={"model": model, "version": version})
                continue
            if frame.kind == wire.RESULT:
                outputs, queue_s, infer_s, batch_size = wire.decode_result(frame.body)
                return ReplicaResult(outputs, queue_s, infer_s, batch_size)
            code, message = wire.decode_error(frame.body)
            if code == STOPPING:  # it is going away: not this one again
                replica.down_until = time.monotonic() + DOWN_FOR_S
                metrics().replica_retries.inc(1, tags={"model": model, "version": version})
                continue
            raise by_code(code)(f"{model}/{version}: {message}")
        raise NotReady(f"{model}/{version}: no replica answered; retry")

    def _pick(self, model: str, version: str, tried: set[str]) -> Replica | None:
        """The replica with the fewest of our requests in flight, among those not tried
        yet and not refusing connections lately; else one already tried that is not
        refusing (its connection was lost, but it may answer on a new one)."""
        now = time.monotonic()
        best: Replica | None = None
        for r in self._replicas.get((model, version), {}).values():
            if r.down_until > now:
                continue
            if best is None or (r.id in tried, r.inflight) < (best.id in tried, best.inflight):
                best = r
        return best

    async def _exchange(
        self, replica: Replica, body: list[bytes], alone: bool, deadline_ms: int
    ) -> wire.Frame:
        replica.inflight += 1
        rid = next(self._ids)
        conn: _Connection | None = None
        try:
            conn = replica.conn
            if conn is None or conn.lost:
                conn = await self._connect(replica)
            flags = wire.ALONE if alone else 0
            return await conn.send(rid, wire.frame(rid, wire.PREDICT, body, flags, deadline_ms))
        finally:
            replica.inflight -= 1
            if conn is not None:
                conn.forget(rid)  # an answer after the caller gave up is dropped

    async def _connect(self, replica: Replica) -> _Connection:
        """One connection attempt at a time per replica, shared by every request that
        needs it (shielded: one caller giving up does not cancel it for the others)."""
        if replica.opening is None:
            attempt = asyncio.ensure_future(self._open(replica))
            replica.opening = attempt
            attempt.add_done_callback(lambda done: _opened(replica, done))
        return await asyncio.shield(replica.opening)

    async def _open(self, replica: Replica) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(
                    lambda: _Connection(replica.token), replica.host, replica.port
                )
        except (OSError, TimeoutError) as exc:
            replica.down_until = time.monotonic() + DOWN_FOR_S
            raise ReplicaGone(f"cannot connect to {replica.host}:{replica.port}: {exc}") from None
        replica.conn = conn
        return conn

    def close(self) -> None:
        for replicas in self._replicas.values():
            for r in replicas.values():
                if r.conn is not None:
                    r.conn.close()


def _opened(replica: Replica, attempt: asyncio.Future[_Connection]) -> None:
    # Finished, whether or not anyone still waits: the next request that finds no
    # connection starts a new attempt (never re-reads a stale failure).
    if replica.opening is attempt:
        replica.opening = None
    if not attempt.cancelled():
        attempt.exception()  # read here too, for when every waiter gave up


def _address(r: Replica) -> tuple[str, int, str]:
    return (r.host, r.port, r.token)
