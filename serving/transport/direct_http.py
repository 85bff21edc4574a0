"""Direct HTTP: the ingress replica serves its FastAPI app on the gateway's port itself.

Ray Serve's proxy adds a Ray hop (milliseconds on a small machine) before the ingress
replica sees a request. In `direct` mode (the default) every ingress replica runs a
uvicorn server on SERVING_HTTP_HOST:SERVING_HTTP_PORT with SO_REUSEPORT, so the kernel
spreads connections over the replicas of a node and no proxy sits in between; Ray's
proxy still runs, on SERVING_RAY_PROXY_PORT, for Ray-native clients and health checks.
The server lives exactly as long as the app (started and stopped by its lifespan, on the
replica's event loop), like the gRPC server.

Connections are bounded in time (ConnectionLimits): a new connection must deliver its
first request, and any request its headers and body, within `read_s` (slowloris, a
Content-Length larger than the body), and an idle keep-alive connection is closed after
`idle_s`. Stopping drains: the listener closes at once (new connections are refused and
go to another replica), every request already read is answered, with `Connection:
close`, and so is any request an idle connection sends within DRAIN_IDLE_S; then the
idle connections close (closing them at once would race the requests already on their
way).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    HttpToolsProtocol,
    RequestResponseCycle,
)

from serving.listeners import shared_port_socket
from serving.transport import refusal
from serving.transport.context import REQUEST_ID, new_request_id, usable_request_id
from serving.transport.http import ARRIVAL, WRITE, response_bytes
from serving.transport.refusal import Waiting

log = logging.getLogger(__name__)

FastPath = Callable[[Any, Any, Any], Awaitable[bool]]  # ASGI; False: not taken
_REQUEST_ID = REQUEST_ID.encode()
WAITING = "serving.waiting"  # ASGI scope key: the Waiting this request is counted in
DRAIN_IDLE_S = 1.0  # when stopping, idle connections still get this long to send a request


@dataclass(frozen=True)
class ConnectionLimits:
    read_s: float = 10.0  # a request's headers and body (and a new connection's first one)
    idle_s: float = 75.0  # an idle keep-alive connection (above a load balancer's own)
    drain_s: float = 10.0  # stopping: answering what was read, at most this long


class RequestIdMiddleware:
    """What Ray Serve's proxy does for requests it forwards: make sure the request has an
    `x-request-id` (generated when the client sent none) and echo it in the response.

    Requests the app's `state.fast_path` takes (the v1 predict and v2 infer routes; see
    serving.transport.http.FastRoutes) are answered by it directly, the rest by the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.fast_path: FastPath | None = getattr(getattr(app, "state", None), "fast_path", None)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Server-Timing's `http` stage starts when the request's first bytes were read
        # (ArrivalStampingProtocol); here only for a server that does not stamp.
        scope.setdefault(ARRIVAL, time.perf_counter())
        counted = scope.pop(WAITING, None)
        if counted is not None:  # it waits no more: its handler starts
            counted.waiting -= 1
        headers = scope.get("headers", [])
        rid = next((v for k, v in headers if k == _REQUEST_ID), None)
        if rid is None or not usable_request_id(rid):
            rid = new_request_id().encode()
            kept = [(k, v) for k, v in headers if k != _REQUEST_ID]
            scope = {**scope, "headers": [*kept, (_REQUEST_ID, rid)]}
        echo = (_REQUEST_ID, rid)

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), echo]}
            await send(message)

        write = scope.get(WRITE)
        if write is not None:  # the one-write answers echo it too

            async def write_with_id(
                status: int, headers: list[Any], body: bytes, timing: Any = None
            ) -> None:
                await write(status, [*headers, echo], body, timing)

            scope[WRITE] = write_with_id

        if self.fast_path is not None and await self.fast_path(scope, receive, send_with_id):
            return
        scope.pop(WRITE, None)  # the app answers through ASGI send (and formats its headers)
        await self.app(scope, receive, send_with_id)


class ArrivalStampingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, noting when each request's first bytes came off the
    socket. Parsing, the task uvicorn creates per request and any wait for the event
    loop (busy with other requests or the replica's own work) then fall inside the
    `http` stage instead of outside every stage. A server made with `counting` also
    counts each request as waiting from when it is read to when its handler starts.

    It also keeps the connection limits (the read deadline here; the idle one is
    uvicorn's keep-alive timer) and drains on shutdown (see the module's doc)."""

    _read_at = 0.0
    counter: Waiting | None = None
    read_timeout_s = ConnectionLimits.read_s
    _read_timer: asyncio.TimerHandle | None = None
    _draining = False
    _shed_body: bytes | None = None  # the refusal to send once this request is read

    @classmethod
    def counting(
        cls, counter: Waiting | None, read_timeout_s: float = ConnectionLimits.read_s
    ) -> type[ArrivalStampingProtocol]:
        attrs = {"counter": counter, "read_timeout_s": read_timeout_s}
        return type(cls.__name__, (cls,), attrs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()  # its first request, within the read deadline

    def data_received(self, data: bytes) -> None:
        self._read_at = time.perf_counter()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[ARRIVAL] = self._read_at  # type: ignore[literal-required]
        self._arm_read_timer()

    def on_headers_complete(self) -> None:
        shed = self._refuse()
        if shed is not None and (self.cycle is None or self.cycle.response_complete):
            # Answered by this protocol itself once the body is read: no request cycle,
            # no task, no app (a refusal must cost far less than a prediction).
            self._shed_body = shed
            return
        if shed is not None:  # pipelined behind an answer in progress: its turn, by app
            app, self.app = self.app, refusal.SHED_APPS[shed]
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return  # no request cycle (an upgrade)
        if self._draining or (shed is not None and self._close_refused()):
            cycle.keep_alive = False  # answered, then the connection closes
        if _cycle_is_known(cycle):
            self.scope[WRITE] = functools.partial(_write_whole, cycle)  # type: ignore[literal-required]
        if self.counter is not None and shed is None:
            self.counter.waiting += 1
            self.scope[WAITING] = self.counter  # type: ignore[literal-required]

    def _refuse(self) -> bytes | None:
        """The refusal's body for a prediction that arrives while the replica is full."""
        counter = self.counter
        if counter is None or not counter.full():
            return None
        return refusal.refusal_body(self.parser.get_method(), self.url, counter)

    def _close_refused(self) -> bool:
        return self.counter is not None and self.counter.close_refused

    def on_body(self, body: bytes) -> None:
        if self._shed_body is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_read_timer()
        body = self._shed_body
        if body is None:
            super().on_message_complete()
            return
        self._shed_body = None
        keep = not self._draining and self.parser.should_keep_alive() and not self._close_refused()
        headers = (*self.server_state.default_headers, *refusal.headers(body, self.headers))
        self.transport.write(response_bytes(503, headers, body, keep))
        if keep:
            self.on_response_complete()  # the keep-alive timer, or a pipelined request
        else:
            self.transport.close()

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection: no whole request within %g s", self.read_timeout_s)
            self.transport.close()

    def shutdown(self) -> None:
        """The server stops: finish the request in progress with `Connection: close`; an
        idle connection may still send one within DRAIN_IDLE_S (answered the same way)."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                DRAIN_IDLE_S, self.timeout_keep_alive_handler
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        # Pipelined requests that will now never start wait no more.
        for cycle, _ in self.pipeline:
            counted = cycle.scope.pop(WAITING, None)  # type: ignore[misc]
            if counted is not None:
                counted.waiting -= 1
        super().connection_lost(exc)


# The uvicorn cycle state _write_whole reads and sets. A uvicorn whose cycle lacks any
# of it (checked once) keeps answering through ASGI `send`, as any app's answers do.
_CYCLE_FIELDS = (
    "flow",
    "transport",
    "default_headers",
    "keep_alive",
    "disconnected",
    "response_started",
    "response_complete",
    "message_event",
    "on_response",
)
_cycle_known: bool | None = None


def _cycle_is_known(cycle: RequestResponseCycle) -> bool:
    global _cycle_known
    if _cycle_known is None:
        _cycle_known = all(hasattr(cycle, f) for f in _CYCLE_FIELDS)
        if not _cycle_known:
            log.warning("unexpected uvicorn request cycle; answers go through ASGI send")
    return _cycle_known


async def _write_whole(
    cycle: RequestResponseCycle,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    timing: Callable[[], bytes] | None = None,
) -> None:
    """Status line, headers and body in one write, leaving uvicorn's cycle as its own
    `send` would after a complete response (keep-alive, flow control, next pipelined
    request); the answer is serving.transport.http.response_bytes."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    if cycle.response_started:
        raise RuntimeError("the response has already started")
    cycle.response_started = True
    cycle.transport.write(
        response_bytes(
            status,
            (*cycle.default_headers, *headers),
            body,
            cycle.keep_alive,
            timing,
        )
    )
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to Ray's replica process, not to this embedded server.
        yield


class DirectHttpServer:
    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        waiting: Waiting | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
    ) -> None:
        self._app = app
        self.host, self.port = host, port
        self.limits = limits
        self._protocol = ArrivalStampingProtocol.counting(waiting, limits.read_s)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = shared_port_socket(self.host, self.port, "HTTP")
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(
            RequestIdMiddleware(self._app),
            lifespan="off",  # the app's lifespan is Ray's to run; it starts this server
            access_log=False,
            log_level="warning",
            timeout_keep_alive=max(1, round(self.limits.idle_s)),
            timeout_graceful_shutdown=max(1, round(self.limits.drain_s)),
            proxy_headers=False,  # the client address is not used; one layer less
            http=self._protocol,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):  # started within 5 s, or the task's error surfaces
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        log.info("HTTP listening on %s:%d (direct)", self.host, self.port)

    async def stop(self) -> None:
        """Drain (the module's doc), within the limits' drain_s."""
        if self._server is None or self._task is None:
            return
        started = time.monotonic()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.limits.drain_s + 1.0)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
        took = time.monotonic() - started
        log.info("HTTP on %s:%d drained in %.1f s", self.host, self.port, took)
        self._server = self._task = None


Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def with_servers(lifespan: Lifespan, servers: Sequence[Service], background: Service) -> Lifespan:
    """Wrap an ASGI app's lifespan: `background` starts first and stops last; the
    servers start once the app is up, and stop (drain, all at once) before it goes."""

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        await background.start()
        try:
            async with lifespan(app) as state:
                started: list[Service] = []
                try:
                    for server in servers:
                        await server.start()
                        started.append(server)
                    yield state
                finally:
                    await asyncio.gather(*(server.stop() for server in started))
        finally:
            await background.stop()

    return run
