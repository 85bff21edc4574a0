"""A lean gRPC client for the generator: unary calls over one HTTP/2 connection in raw
asyncio, as the HTTP client is raw HTTP/1.1 (`--grpc-client lean`, the default).

grpcio's client alone costs ~0.4 ms of CPU and ~0.5 ms of latency per call here, more
than the gateway's whole HTTP answer, so with it the gRPC rows measure mostly the client.
This one writes each call as two pre-encoded frames in one write (HEADERS: the fixed
fields by HPACK index after the first call, plus the stamp; DATA with END_STREAM) and
reads frames back with serving.transport.h2wire, as the gateway's own gRPC server does.

What it implements of HTTP/2: the preface and SETTINGS both ways (ACKed), PING ACKs,
flow control both ways (it opens its receive windows to the maximum and tops the
connection's up; it honours the server's windows and frame size, parking DATA that
does not fit until WINDOW_UPDATE), CONTINUATION, padding, RST_STREAM and GOAWAY (the
calls they end fail). Not: server push, priorities, compression, streaming methods.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import cast

import hpack

from loadtests.loadgen import Reply, now
from serving.transport import h2wire as w
from serving.transport.grpc_h2 import message as grpc_message


def header_blocks(authority: str, path: str) -> tuple[bytes, bytes]:
    """The fixed part of a call's header block (each call adds its stamp): as the first
    call sends it, entering its fields in the server's HPACK table, and as every later
    call does, naming them by index (as grpcio's client does: cheaper for the server
    to decode than literals). The stamp is never indexed, so the table keeps these."""
    encoder = hpack.Encoder()
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    first = encoder.encode(fields, huffman=False)
    return first, encoder.encode(fields, huffman=False)


class H2Error(Exception):
    pass


class _Call:
    __slots__ = ("answer", "fut", "headers", "sent", "timer")

    def __init__(self, fut: asyncio.Future[Reply], sent: float) -> None:
        self.fut = fut
        self.sent = sent
        self.answer = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.timer: asyncio.TimerHandle | None = None


class H2GrpcClient(asyncio.Protocol):
    """One connection; every call a stream on it. `call(i)` sends message i (cycled)."""

    def __init__(self, messages: list[bytes], path: str, authority: str, flag: bytes | None):
        self._loop = asyncio.get_running_loop()
        self._bodies = [grpc_message(m) for m in messages]
        self._first_block, self._block = header_blocks(authority, path)
        self._flag = flag
        self._reader = w.FrameReader(w.MAX_WINDOW)  # we accept any frame size the server
        self._decoder = w.HeaderDecoder()
        self._calls: dict[int, _Call] = {}
        self._next_stream = 1
        self._transport: asyncio.Transport | None = None
        self._closed: Exception | None = None
        self._flow = w.Flow(w.MAX_WINDOW)  # both ways; the frames to write in its `out`
        self.connections_opened = 1
        self.timeout_s = 10.0

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, messages: list[bytes], flag: bytes | None
    ) -> H2GrpcClient:
        loop = asyncio.get_running_loop()
        authority = f"{host}:{port}"
        _, client = await loop.create_connection(
            lambda: cls(messages, path, authority, flag), host, port
        )
        return client

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport.write(
            w.PREFACE
            + w.settings({w.ENABLE_PUSH: 0, w.INITIAL_WINDOW_SIZE: w.MAX_WINDOW})
            + w.window_update(0, w.MAX_WINDOW - w.DEFAULT_WINDOW)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(H2Error(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        read_at = now()  # an answer is in hand when its last frame is read
        try:
            for kind, flags, stream, payload in self._reader.feed(data):
                self._frame(kind, flags, stream, payload, read_at)
        except w.ProtocolError as exc:
            self._fail_all(H2Error(f"protocol error: {exc}"))
            if self._transport is not None:
                self._transport.abort()
            return
        self._flow.flush(self._transport)

    # ---- calls ------------------------------------------------------------------------
    async def call(self, i: int) -> Reply:
        if self._closed is not None:
            raise self._closed
        assert self._transport is not None
        stream = self._next_stream
        self._next_stream += 2
        block = self._block if stream > 1 else self._first_block
        sent = now()
        call = _Call(self._loop.create_future(), sent)
        call.timer = self._loop.call_later(self.timeout_s, self._timeout, stream)
        self._calls[stream] = call
        # The server reports the way in from this stamp as its `inbound` stage.
        stamp = w.literal(b"x-request-start", b"t=%d" % (time.time_ns() // 1000))
        # HEADERS and as much DATA as the windows allow, in one write.
        self._flow.out.append(w.frame(w.HEADERS, w.END_HEADERS, stream, block + stamp))
        self._flow.open(stream)
        self._flow.send(stream, self._bodies[i % len(self._bodies)], end_stream=True)
        self._flow.flush(self._transport)
        return await call.fut

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.write(w.goaway(0))
            self._transport.close()
        self._fail_all(H2Error("client closed"))

    # ---- frames -----------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream: int, payload: bytes, read_at: float) -> None:
        if kind == w.DATA:
            self._flow.received(stream, len(payload))
            call = self._calls.get(stream)
            if call is not None:
                call.answer += payload
                if flags & w.END_STREAM:
                    self._finish(stream, read_at)
        elif kind == w.HEADERS:
            fields = self._decoder.decode(payload)  # always: it keeps the table's state
            call = self._calls.get(stream)
            if call is not None:
                call.headers.extend(fields)
                if flags & w.END_STREAM:
                    self._finish(stream, read_at)
        elif kind == w.RST_STREAM:
            code = w.u32(payload)
            self._end(stream, H2Error(f"stream reset by the server (error code {code})"))
        elif kind == w.GOAWAY:
            last = w.u32(payload) & w.MAX_WINDOW
            self._closed = H2Error("the server sent GOAWAY")
            for sid in [s for s in self._calls if s > last]:
                self._end(sid, self._closed)
        else:  # SETTINGS, WINDOW_UPDATE, PING (the rest: nothing)
            self._flow.control(kind, flags, stream, payload)

    def _finish(self, stream: int, read_at: float) -> None:
        call = self._calls.pop(stream)
        self._flow.forget(stream)
        if call.timer is not None:
            call.timer.cancel()
        status, grpc_status, timing = b"", b"", None
        for name, value in call.headers:
            if name == b":status":
                status = value
            elif name == b"grpc-status":
                grpc_status = value
            elif name == b"server-timing":
                timing = value
        if status != b"200":
            code = 14 if status in (b"502", b"503", b"504") else 2  # as gRPC maps them
        else:
            code = int(grpc_status) if grpc_status.isdigit() else 2
        answer = bytes(call.answer[5:])
        flagged = code == 0 and self._flag is not None and self._flag in answer
        if not call.fut.done():
            call.fut.set_result(Reply(code == 0, code, call.sent, read_at, timing, flagged))

    def _end(self, stream: int, exc: Exception) -> None:
        call = self._calls.pop(stream, None)
        self._flow.forget(stream)
        if call is None:
            return
        if call.timer is not None:
            call.timer.cancel()
        if not call.fut.done():
            call.fut.set_exception(exc)

    def _timeout(self, stream: int) -> None:
        if stream in self._calls and self._transport is not None:
            self._transport.write(w.rst_stream(stream, w.CANCEL))
        self._end(stream, TimeoutError("no answer within the client timeout"))

    def _fail_all(self, exc: Exception) -> None:
        if self._closed is None:
            self._closed = exc
        for stream in list(self._calls):
            self._end(stream, exc)
