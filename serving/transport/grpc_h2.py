"""A gRPC server on the replica's own event loop: HTTP/2 framed by our own
serving.transport.h2wire (h2's state machine cost ~0.15 ms of CPU a call), the same
servicers as grpcio's (registered through the generated `add_*_to_server`).

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

from serving.listeners import shared_port_socket
from serving.transport import h2wire as w
from serving.transport.grpc_context import Abort, Context, Registry, grpc_timeout

log = logging.getLogger(__name__)

_END = object()  # the end of a request stream
_WINDOW = 1 << 20  # what we let a peer send ahead, per stream and per connection
_TRANSPORT = (b"content-type", b"te", b"user-agent")
_STATUS_200 = w.indexed(8) + w.literal(b"content-type", b"application/grpc")


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
        self._reader = w.FrameReader()
        self._decoder = w.HeaderDecoder()
        self._preface = bytearray()  # until the client's 24-byte preface is read
        self._streams: dict[int, _Stream] = {}
        # Both windows; its `out` holds the frames to write at the next flush. A stream
        # whose trailers waited for its data's window ends once they went.
        self._flow = w.Flow(_WINDOW, on_done=self._close_stream)
        self._out = self._flow.out
        self._transport: asyncio.Transport | None = None
        self._highest = 0  # the highest stream id the client opened
        self.closing = False

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Streams are not the bound (calls in flight are: RESOURCE_EXHAUSTED, as grpcio's
        # maximum_concurrent_rpcs); a large window saves round trips on large messages.
        self._out.append(
            w.settings({w.MAX_CONCURRENT_STREAMS: 2**31 - 1, w.INITIAL_WINDOW_SIZE: _WINDOW})
        )
        self._out.append(w.window_update(0, _WINDOW))
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
        if len(self._preface) < len(w.PREFACE):
            need = len(w.PREFACE) - len(self._preface)
            self._preface += data[:need]
            data = data[need:]
            if not w.PREFACE.startswith(self._preface):
                self._fail(w.ProtocolError("not an HTTP/2 client preface"))
                return
        try:
            for kind, flags, sid, payload in self._reader.feed(data):
                self._frame(kind, flags, sid, payload)
        except w.ProtocolError as exc:
            self._fail(exc)
            return
        self._flush()

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == w.DATA:
            self._flow.received(sid, len(payload))
            if sid in self._streams:
                self._data(sid, payload)
            if flags & w.END_STREAM:
                self._ended(sid)
        elif kind == w.HEADERS:
            headers = self._decoder.decode(payload)  # always: the table's state is shared
            if sid in self._streams:  # trailers: gRPC requests carry none worth reading
                if flags & w.END_STREAM:
                    self._ended(sid)
                return
            if not sid % 2:
                raise w.ProtocolError(f"a client opened the even stream {sid}")
            if sid <= self._highest:  # a stream we already ended: nothing to do
                return
            self._highest = sid
            self._request(sid, headers)
            if flags & w.END_STREAM:
                self._ended(sid)
        elif kind == w.RST_STREAM:
            self._reset(sid)
        elif kind == w.PUSH_PROMISE:
            raise w.ProtocolError("a client sent PUSH_PROMISE")
        else:  # SETTINGS, WINDOW_UPDATE, PING; PRIORITY, GOAWAY and unknown types: nothing
            self._flow.control(kind, flags, sid, payload)

    def _fail(self, exc: w.ProtocolError) -> None:
        """The client broke the protocol: GOAWAY naming why, and the connection ends."""
        log.debug("gRPC connection closed: %s", exc)
        self._out.append(w.goaway(self._highest, exc.code))
        self._flush()
        if self._transport is not None:
            self._transport.close()

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
            self._out.append(w.rst_stream(sid, w.REFUSED_STREAM))
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
        self._flow.open(sid)
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
        self._flow.forget(sid)
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
                self._send(sid, message(handler.response_serializer(response)))
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
        self._out.append(w.frame(w.HEADERS, w.END_HEADERS, sid, _STATUS_200))

    def _answer(self, sid: int, bodies: list[bytes], trailing: Iterable[Any]) -> None:
        if sid not in self._streams:
            return  # reset by the client meanwhile
        self._headers(sid)
        for body in bodies:
            self._send(sid, message(body))
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
        fields = [w.literal(b"grpc-status", str(code.value[0]).encode())]
        if details:
            fields.append(w.literal(b"grpc-message", quote(details, safe=" ").encode()))
        fields += [w.literal(k.encode("latin-1"), str(v).encode()) for k, v in trailing]
        block = b"".join(fields) if headers_sent else _STATUS_200 + b"".join(fields)
        frames = w.header_frames(sid, block, True, self._flow.max_frame)
        if self._flow.waiting(sid):
            self._flow.then(sid, frames)  # after the data still waiting for window
        else:
            self._out.append(frames)
            self._close_stream(sid)
        self._flush()

    def _trailers_only(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        self._streams[sid] = _Stream()
        self._finish(sid, code, details, ())

    def _close_stream(self, sid: int) -> None:
        self._streams.pop(sid, None)
        self._flow.forget(sid)
        if self.closing and not self._streams:
            self._shut()

    def _shut(self) -> None:
        """The last GOAWAY, then our side's end: the client closes the connection after
        reading all (closing it here with its frames unread would reset it)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._out.append(w.goaway(self._highest))
        self._flush()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def _send(self, sid: int, data: bytes) -> None:
        self._flow.send(sid, data)

    def _flush(self) -> None:
        self._flow.flush(self._transport)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def goaway(self) -> None:
        """No new calls on this connection; those in flight finish, then it closes."""
        self.closing = True
        self._out.append(w.goaway(self._highest))
        self._flush()
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


def message(body: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
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
