"""The direct channel's server, inside each model replica.

Ray Serve still owns the replica: placement, health checks, restarts, scaling and
rolling updates. This endpoint only carries predictions from the ingress replicas,
which would otherwise pay a Ray handle round trip per request (the README's benchmarks
say what it costs). It listens on the node's address on a free port and publishes
`host:port` and a per-replica token through Serve's replica metadata
(`ModelReplica.record_replica_metadata`); a client proves it read them there (Ray's own
authenticated control plane) by sending the token first.

Requests run through the same `ModelWorker.predict` as handle calls, so they batch
together. At most `limit` run at once; past that a request is refused `overloaded`.
On graceful shutdown the endpoint keeps answering for a moment (the ingresses hear of
the replica's removal), then refuses new requests with `stopping` (the caller retries
on another replica) and waits for those in flight.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Any, cast

from serving.errors import ServingError
from serving.models import wire
from serving.models.worker import ModelWorker

log = logging.getLogger(__name__)

STOPPING = "stopping"  # error code: this replica is going away; try another one
DEREGISTER_S = 1.0  # how long a stopping replica still answers new requests


class ReplicaEndpoint:
    def __init__(self, worker: ModelWorker, limit: int) -> None:
        self._worker = worker
        self._limit = limit
        self.token = secrets.token_hex(16)
        self.address = ""
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until done
        self._idle: asyncio.Event | None = None  # set while nothing is in flight
        self._stopping = False

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._server = await loop.create_server(lambda: _Connection(self), host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        log.info("direct channel listening on %s", self.address)

    def metadata(self) -> dict[str, Any]:
        """What the ingress needs to reach this replica (Serve's replica metadata)."""
        return {"direct": self.address, "token": self.token}

    async def stop(self, grace_s: float = 10.0) -> None:
        """Graceful shutdown: answer for DEREGISTER_S more, then refuse new requests and
        wait (at most `grace_s`) for those in flight, then close."""
        if self._server is None or self._stopping:
            return
        await asyncio.sleep(DEREGISTER_S)
        self._stopping = True
        self._server.close()
        assert self._idle is not None
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("direct channel closed with %d requests in flight", self._inflight)
        for conn in list(self._conns):
            conn.close()

    # ---- requests --------------------------------------------------------------------
    def accepts(self, token: bytes) -> bool:
        return hmac.compare_digest(token, self.token.encode())

    def request(self, conn: _Connection, frame: wire.Frame) -> None:
        if frame.kind != wire.PREDICT:
            conn.abort(f"unexpected frame kind {frame.kind}")
            return
        if self._stopping:
            conn.send(wire.encode_error(frame.request_id, STOPPING, "replica is stopping"))
        elif self._inflight >= self._limit:
            message = f"replica at its limit of {self._limit} requests; retry later"
            conn.send(wire.encode_error(frame.request_id, "overloaded", message))
        else:
            self._inflight += 1
            assert self._idle is not None
            self._idle.clear()
            task = asyncio.get_running_loop().create_task(self._predict(conn, frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _predict(self, conn: _Connection, frame: wire.Frame) -> None:
        rid = frame.request_id
        try:
            inputs, _ = wire.decode_arrays(frame.body)
            alone = bool(frame.flags & wire.ALONE)
            if frame.deadline_ms:
                async with asyncio.timeout(frame.deadline_ms / 1000):
                    r = await self._worker.predict(inputs, alone)
            else:
                r = await self._worker.predict(inputs, alone)
            out = wire.encode_result(rid, r.outputs, r.queue_s, r.infer_s, r.batch_size)
        except ServingError as exc:
            out = wire.encode_error(rid, exc.code, exc.message)
        except TimeoutError:
            out = wire.encode_error(rid, "deadline_exceeded", "deadline passed in the replica")
        except wire.WireError as exc:
            out = wire.encode_error(rid, "internal", f"malformed request: {exc}")
        except Exception as exc:
            log.exception("direct request failed")
            out = wire.encode_error(rid, "model_error", f"{type(exc).__name__}: {exc}")
        finally:
            self._inflight -= 1
            if not self._inflight:
                assert self._idle is not None
                self._idle.set()
        conn.send(out)


class _Connection(asyncio.Protocol):
    """One ingress's connection. Answers written in one loop step leave in one write."""

    def __init__(self, endpoint: ReplicaEndpoint) -> None:
        self._endpoint = endpoint
        self._reader = wire.FrameReader()
        self._transport: asyncio.Transport | None = None
        self._authed = False
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._endpoint._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._endpoint._conns.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except wire.WireError as exc:
            self.abort(str(exc))
            return
        for frame in frames:
            if self._authed:
                self._endpoint.request(self, frame)
            elif frame.kind == wire.HELLO and self._endpoint.accepts(frame.body):
                self._authed = True
            else:
                self.abort("no valid HELLO")
                return

    def send(self, data: bytes) -> None:
        if self._transport is None:
            return  # the ingress went away; its answer has nowhere to go
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(b"".join(out))

    def abort(self, why: str) -> None:
        log.warning("direct channel: dropping a connection: %s", why)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()
