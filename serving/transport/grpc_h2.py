"""A gRPC server on the replica's own event loop: HTTP/2 through the `h2` state machine,
the same servicers as grpcio's (registered through the generated `add_*_to_server`).

grpcio's asyncio server polls its completion queue on a thread of its own and hands
every event to the loop across threads; here each connection is an asyncio protocol,
so a call is read, run and answered on the loop alone, as direct HTTP is.

What it implements of gRPC over HTTP/2: unary and bidirectional-streaming methods
(reflection), `grpc-timeout`, metadata both ways, trailers-only errors, uncompressed
messages (a compressed one is refused with UNIMPLEMENTED), a bound on calls in flight
(RESOURCE_EXHAUSTED past it), a bound on message size, flow control both ways, and a
drain: GOAWAY, then the calls in flight finish within the drain time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import quote

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from serving.listeners import shared_port_socket
from serving.transport.grpc_context import Abort, Context, Registry, grpc_timeout

log = logging.getLogger(__name__)

_END = object()  # the end of a request stream
_WINDOW = 1 << 20
_TRANSPORT = (b"content-type", b"te", b"user-agent")


class _Stream:
    __slots__ = ("buffer", "context", "handler", "queue", "task")

    def __init__(self, handler: Any = None) -> None:
        self.handler = handler
        self.buffer = bytearray()
        self.queue: asyncio.Queue[Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self.context: Context | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2GrpcServer) -> None:
        self._server = server
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, bytearray] = {}  # response bytes waiting for window
        self._trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self._transport: asyncio.Transport | None = None
        self.closing = False

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._h2.initiate_connection()
        # Streams are not the bound (calls in flight are: RESOURCE_EXHAUSTED, as grpcio's
        # maximum_concurrent_rpcs); a large window saves round trips on large messages.
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2**31 - 1,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            }
        )
        self._h2.increment_flow_control_window(_WINDOW)
        self._flush()
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for stream in self._streams.values():
            if stream.context is not None:
                stream.context.peer_gone = True
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._data(event.stream_id, event.data)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._reset(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._resume(event.stream_id)
        self._flush()

    # ---- requests ---------------------------------------------------------------------
    def _request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        path = b""
        metadata: list[tuple[str, Any]] = []
        deadline = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"grpc-timeout":
                timeout = grpc_timeout(value.decode("ascii", "replace"))
                deadline = None if timeout is None else time.monotonic() + timeout
            elif name == b"grpc-encoding" and value != b"identity":
                self._trailers_only(sid, grpc.StatusCode.UNIMPLEMENTED, "compression")
                return
            elif not name.startswith((b":", b"grpc-")) and name not in _TRANSPORT:
                metadata.append((name.decode("latin-1"), _metadata_value(name, value)))
        if self.closing:  # after our GOAWAY: the client retries it elsewhere
            self._h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        handler = self._server.methods.get(path)
        if handler is None:
            self._trailers_only(sid, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path!r}")
            return
        if self._server.in_flight >= self._server.max_concurrent:
            self._trailers_only(sid, grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit")
            return
        stream = _Stream(handler)
        stream.context = Context(tuple(metadata), deadline)
        self._streams[sid] = stream
        if handler.request_streaming:
            stream.queue = asyncio.Queue()
            stream.task = self._server.spawn(self._streaming(sid, handler, stream))

    def _data(self, sid: int, data: bytes) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.buffer += data
        if len(stream.buffer) > self._server.max_message + 5:
            self._streams.pop(sid, None)
            self._trailers_only(sid, grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large")
            if stream.task is not None:
                stream.task.cancel()
            return
        if stream.queue is not None:
            try:
                messages = self._messages(sid, stream, complete=False)
            except Abort as exc:
                self._streams.pop(sid, None)
                self._trailers_only(sid, exc.code, exc.details)
                if stream.task is not None:
                    stream.task.cancel()
                return
            for message in messages:
                stream.queue.put_nowait(message)

    def _messages(self, sid: int, stream: _Stream, complete: bool) -> list[bytes]:
        out = []
        buf = stream.buffer
        while len(buf) >= 5:
            flag, length = struct.unpack_from(">BI", buf)
            if len(buf) < 5 + length:
                break
            if flag:
                raise Abort(grpc.StatusCode.UNIMPLEMENTED, "compressed messages")
            out.append(bytes(buf[5 : 5 + length]))
            del buf[: 5 + length]
        if complete and buf:
            raise Abort(grpc.StatusCode.INTERNAL, "truncated message")
        return out

    def _ended(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.queue is not None:
            stream.queue.put_nowait(_END)
            return
        stream.task = self._server.spawn(self._unary(sid, stream))

    def _reset(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        self._pending.pop(sid, None)
        self._trailers.pop(sid, None)
        if stream is not None:
            if stream.context is not None:
                stream.context.peer_gone = True
            if stream.task is not None:
                stream.task.cancel()

    # ---- calls ------------------------------------------------------------------------
    async def _unary(self, sid: int, stream: _Stream) -> None:
        assert stream.context is not None
        handler = stream.handler
        try:
            messages = self._messages(sid, stream, complete=True)
            if len(messages) != 1:
                raise Abort(grpc.StatusCode.UNIMPLEMENTED, "a unary call takes one message")
            request = handler.request_deserializer(messages[0])
            response = await handler.unary_unary(request, stream.context)
            body = handler.response_serializer(response)
        except Abort as exc:
            self._finish(sid, exc.code, exc.details, exc.trailing)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:
            ctx = stream.context
            if ctx.code is not grpc.StatusCode.OK:  # set_code, then raise: as grpcio
                self._finish(sid, ctx.code, ctx.details, ctx.trailing)
                return
            log.exception("gRPC call failed")  # a servicer's own failure: INTERNAL
            self._finish(sid, grpc.StatusCode.INTERNAL, f"Unexpected {type(exc).__name__}", ())
            return
        if stream.context.code is not grpc.StatusCode.OK:
            self._finish(sid, stream.context.code, stream.context.details, stream.context.trailing)
            return
        self._answer(sid, [body], stream.context.trailing)

    async def _streaming(self, sid: int, handler: Any, stream: _Stream) -> None:
        assert stream.queue is not None and stream.context is not None
        queue = stream.queue

        async def requests() -> AsyncIterator[Any]:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                yield handler.request_deserializer(item)

        try:
            self._headers(sid)
            async for response in handler.stream_stream(requests(), stream.context):
                self._send(sid, _frame(handler.response_serializer(response)))
                self._flush()
        except Abort as exc:
            self._finish(sid, exc.code, exc.details, exc.trailing, headers_sent=True)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("gRPC stream failed")
            self._finish(sid, grpc.StatusCode.INTERNAL, "stream failed", (), headers_sent=True)
            return
        self._finish(sid, grpc.StatusCode.OK, "", stream.context.trailing, headers_sent=True)

    # ---- answers ----------------------------------------------------------------------
    def _headers(self, sid: int) -> None:
        self._h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])

    def _answer(self, sid: int, bodies: list[bytes], trailing: Iterable[Any]) -> None:
        if sid not in self._streams:
            return  # reset by the client meanwhile
        self._headers(sid)
        for body in bodies:
            self._send(sid, _frame(body))
        self._finish(sid, grpc.StatusCode.OK, "", trailing, headers_sent=True)

    def _finish(
        self,
        sid: int,
        code: grpc.StatusCode,
        details: str,
        trailing: Iterable[Any],
        headers_sent: bool = False,
    ) -> None:
        if sid not in self._streams:
            return
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            trailers.append((b"grpc-message", quote(details, safe=" ").encode()))
        trailers += [(k.encode("latin-1"), str(v).encode()) for k, v in trailing]
        if not headers_sent:
            self._h2.send_headers(
                sid,
                [(b":status", b"200"), (b"content-type", b"application/grpc"), *trailers],
                end_stream=True,
            )
            self._close_stream(sid)
        elif self._pending.get(sid):
            self._trailers[sid] = trailers  # after the data still waiting for window
        else:
            self._h2.send_headers(sid, trailers, end_stream=True)
            self._close_stream(sid)
        self._flush()

    def _trailers_only(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        self._streams[sid] = _Stream()
        self._finish(sid, code, details, ())

    def _close_stream(self, sid: int) -> None:
        self._streams.pop(sid, None)
        if self.closing and not self._streams:
            self._shut()

    def _shut(self) -> None:
        """The last GOAWAY, then our side's end: the client closes the connection after
        reading all (closing it here with its frames unread would reset it)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()
        self._flush()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def _send(self, sid: int, data: bytes) -> None:
        pending = self._pending.setdefault(sid, bytearray())
        pending += data
        self._resume(sid)

    def _resume(self, sid: int) -> None:
        sids = list(self._pending) if sid == 0 else [sid]
        for s in sids:
            pending = self._pending.get(s)
            while pending:
                try:
                    window = self._h2.local_flow_control_window(s)
                except h2.exceptions.StreamClosedError:
                    self._pending.pop(s, None)
                    break
                size = min(window, len(pending), self._h2.max_outbound_frame_size)
                if size <= 0:
                    break
                self._h2.send_data(s, bytes(pending[:size]))
                del pending[:size]
            if pending is not None and not pending:
                self._pending.pop(s, None)
                trailers = self._trailers.pop(s, None)
                if trailers is not None:
                    self._h2.send_headers(s, trailers, end_stream=True)
                    self._close_stream(s)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def goaway(self) -> None:
        """No new calls on this connection; those in flight finish, then it closes.
        The GOAWAY frame is written past h2's state machine, which would otherwise
        refuse to send anything more on the connection."""
        self.closing = True
        self._flush()
        if self._transport is not None and not self._transport.is_closing():
            last = self._h2.highest_inbound_stream_id
            self._transport.write(GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())
        if not self._streams:
            self._shut()


def _metadata_value(name: bytes, value: bytes) -> Any:
    """As grpcio hands metadata over: binary (-bin) values base64-decoded to bytes, the
    rest as text."""
    if name.endswith(b"-bin"):
        with contextlib.suppress(ValueError):
            return base64.b64decode(value + b"=" * (-len(value) % 4))
        return value
    return value.decode("utf-8", "surrogateescape")


def _frame(body: bytes) -> bytes:
    return struct.pack(">BI", 0, len(body)) + body


class H2GrpcServer:
    """`start`/`stop` on the replica's event loop; servicers are added to `registry`."""

    def __init__(self, host: str, port: int, max_concurrent: int, max_message: int) -> None:
        self.host, self.port = host, port
        self.max_concurrent = max_concurrent
        self.max_message = max_message
        # Pass it where the generated `add_*Servicer_to_server` take a grpc.Server.
        self.registry = Registry()
        self.methods = self.registry.methods
        self.connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        sock = shared_port_socket(self.host, self.port, "gRPC")
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)

    async def stop(self, grace: float) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for conn in list(self.connections):
            conn.goaway()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        deadline = time.monotonic() + 1.0  # clients close after the last GOAWAY
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
