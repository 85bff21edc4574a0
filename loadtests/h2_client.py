"""A lean gRPC client for the generator: unary calls over one HTTP/2 connection in raw
asyncio, as the HTTP client is raw HTTP/1.1 (`--grpc-client lean`, the default).

grpcio's client alone costs ~0.4 ms of CPU and ~0.5 ms of latency per call here, more
than the gateway's whole HTTP answer, so with it the gRPC rows measure mostly the client.
This one writes each call as two pre-encoded frames (HEADERS, whose header block is
literal fields without indexing, so the same bytes are valid on every stream, plus
the stamp; and DATA with END_STREAM) and reads frames back, decoding header blocks
with `hpack` (the server's encoder may index, so its blocks need the decoder's state).

What it implements of HTTP/2: the preface and SETTINGS both ways (ACKed), PING ACKs,
flow control both ways (it opens its receive windows to the maximum and tops the
connection's up; it honours the server's windows and frame size, parking DATA that
does not fit until WINDOW_UPDATE), CONTINUATION, padding, RST_STREAM and GOAWAY (the
calls they end fail). Not: server push, priorities, compression, streaming methods.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time
from typing import cast

import hpack

from loadtests.loadgen import Reply, now

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
MAX_WINDOW = 2**31 - 1
INITIAL_WINDOW = 65_535
_HEAD = struct.Struct(">I")  # frame length (24 bits) and type, before flags and stream


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind) + bytes((flags,)) + _HEAD.pack(stream) + payload


def _int7(n: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (string lengths, no Huffman coding)."""
    if n < 127:
        return bytes((n,))
    out, n = bytearray((127,)), n - 127
    while n >= 128:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field literal without indexing, new name: valid in any HPACK state."""
    return b"\x00" + _int7(len(name)) + name + _int7(len(value)) + value


def header_block(authority: str, path: str) -> bytes:
    """The fixed part of every call's header block (the stamp is added per call)."""
    return b"".join(
        (
            b"\x83\x86",  # :method POST, :scheme http (static table, indexed)
            literal(b":path", path.encode()),
            literal(b":authority", authority.encode()),
            literal(b"content-type", b"application/grpc"),
            literal(b"te", b"trailers"),
        )
    )


class H2Error(Exception):
    pass


class _Call:
    __slots__ = ("answer", "done", "fut", "headers", "sent", "timer")

    def __init__(self, fut: asyncio.Future[Reply], sent: float) -> None:
        self.fut = fut
        self.sent = sent
        self.answer = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.done = False


class H2GrpcClient(asyncio.Protocol):
    """One connection; every call a stream on it. `call(i)` sends message i (cycled)."""

    def __init__(self, messages: list[bytes], path: str, authority: str, flag: bytes | None):
        self._loop = asyncio.get_running_loop()
        self._bodies = [b"\x00" + _HEAD.pack(len(m)) + m for m in messages]  # gRPC framing
        self._block = header_block(authority, path)
        self._flag = flag
        self._decoder = hpack.Decoder()
        self._buf = bytearray()
        self._calls: dict[int, _Call] = {}
        self._next_stream = 1
        self._transport: asyncio.Transport | None = None
        self._closed: Exception | None = None
        # Sending: the server's windows and frame size; DATA that did not fit waits.
        self._send_window = INITIAL_WINDOW
        self._stream_initial = INITIAL_WINDOW
        self._stream_windows: dict[int, int] = {}
        self._max_frame = 16_384
        self._parked: collections.deque[tuple[int, memoryview]] = collections.deque()
        # Receiving: a header block spread over CONTINUATION frames, and how much DATA
        # was read since the connection's window was last topped up.
        self._continued: tuple[int, int, bytearray] | None = None
        self._received = 0
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
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, MAX_WINDOW)  # no push
        self._transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(MAX_WINDOW - INITIAL_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(H2Error(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        read_at = now()  # an answer is in hand when its last frame is read
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 9:
            head = _HEAD.unpack_from(buf, pos)[0]
            length, kind, flags = head >> 8, head & 0xFF, buf[pos + 4]
            if len(buf) - pos < 9 + length:
                break
            stream = _HEAD.unpack_from(buf, pos + 5)[0] & MAX_WINDOW
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            try:
                self._frame(kind, flags, stream, payload, read_at)
            except (H2Error, hpack.HPACKError) as exc:
                self._fail_all(H2Error(f"protocol error: {exc}"))
                if self._transport is not None:
                    self._transport.abort()
                return
        del buf[:pos]

    # ---- calls ------------------------------------------------------------------------
    async def call(self, i: int) -> Reply:
        if self._closed is not None:
            raise self._closed
        assert self._transport is not None
        stream = self._next_stream
        self._next_stream += 2
        sent = now()
        call = _Call(self._loop.create_future(), sent)
        call.timer = self._loop.call_later(self.timeout_s, self._timeout, stream)
        self._calls[stream] = call
        # The server reports the way in from this stamp as its `inbound` stage.
        stamp = literal(b"x-request-start", b"t=%d" % (time.time_ns() // 1000))
        self._transport.write(frame(HEADERS, END_HEADERS, stream, self._block + stamp))
        self._stream_windows[stream] = self._stream_initial
        self._parked.append((stream, memoryview(self._bodies[i % len(self._bodies)])))
        self._send_parked()
        return await call.fut

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.write(frame(GOAWAY, 0, 0, _HEAD.pack(0) + _HEAD.pack(0)))
            self._transport.close()
        self._fail_all(H2Error("client closed"))

    def _send_parked(self) -> None:
        """Send waiting DATA, in order, as far as the windows allow."""
        assert self._transport is not None
        out = []
        while self._parked:
            stream, data = self._parked[0]
            window = min(self._send_window, self._stream_windows.get(stream, 0))
            if window <= 0 and data:
                break
            n = min(len(data), window, self._max_frame)
            last = n == len(data)
            out.append(frame(DATA, END_STREAM if last else 0, stream, bytes(data[:n])))
            self._send_window -= n
            if last:
                self._parked.popleft()
                self._stream_windows.pop(stream, None)
            else:
                self._stream_windows[stream] -= n
                self._parked[0] = (stream, data[n:])
        if out:
            self._transport.write(b"".join(out))

    # ---- frames -----------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream: int, payload: bytes, read_at: float) -> None:
        if self._continued is not None and kind != CONTINUATION:
            raise H2Error("a header block was interrupted")
        if kind == DATA:
            self._received += len(payload)
            if self._received >= MAX_WINDOW // 2:  # top the connection's window up
                assert self._transport is not None
                self._transport.write(frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(self._received)))
                self._received = 0
            call = self._calls.get(stream)
            if call is not None:
                call.answer += _unpad(flags, payload)
                if flags & END_STREAM:
                    self._finish(stream, read_at)
        elif kind == HEADERS:
            block = _unpad(flags, payload)
            if flags & PRIORITY:
                block = block[5:]
            if flags & END_HEADERS:
                self._headers(stream, flags, block, read_at)
            else:
                self._continued = (stream, flags, bytearray(block))
        elif kind == CONTINUATION:
            if self._continued is None or self._continued[0] != stream:
                raise H2Error("CONTINUATION without its HEADERS")
            self._continued[2].extend(payload)
            if flags & END_HEADERS:
                sid, first_flags, parts = self._continued
                self._continued = None
                self._headers(sid, first_flags, bytes(parts), read_at)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            increment = _HEAD.unpack(payload)[0] & MAX_WINDOW
            if stream == 0:
                self._send_window += increment
            elif stream in self._stream_windows:
                self._stream_windows[stream] += increment
            self._send_parked()
        elif kind == PING:
            if not flags & ACK:
                assert self._transport is not None
                self._transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            code = _HEAD.unpack(payload)[0]
            self._end(stream, H2Error(f"stream reset by the server (error code {code})"))
        elif kind == GOAWAY:
            last = _HEAD.unpack_from(payload)[0] & MAX_WINDOW
            self._closed = H2Error("the server sent GOAWAY")
            for sid in [s for s in self._calls if s > last]:
                self._end(sid, self._closed)

    def _settings(self, payload: bytes) -> None:
        assert self._transport is not None
        for off in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack_from(">HI", payload, off)
            if key == 0x4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                delta = value - self._stream_initial
                self._stream_initial = value
                for sid in self._stream_windows:
                    self._stream_windows[sid] += delta
            elif key == 0x5:  # MAX_FRAME_SIZE
                self._max_frame = value
            # HEADER_TABLE_SIZE bounds our encoder's table, which indexes nothing.
        self._transport.write(frame(SETTINGS, ACK, 0))
        self._send_parked()

    def _headers(self, stream: int, flags: int, block: bytes, read_at: float) -> None:
        fields = self._decoder.decode(block, raw=True)  # always: it keeps the table's state
        call = self._calls.get(stream)
        if call is None:
            return
        call.headers.extend(fields)
        if flags & END_STREAM:
            self._finish(stream, read_at)

    def _finish(self, stream: int, read_at: float) -> None:
        call = self._calls.pop(stream)
        self._stream_windows.pop(stream, None)
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
        self._stream_windows.pop(stream, None)
        if call is None:
            return
        if call.timer is not None:
            call.timer.cancel()
        if not call.fut.done():
            call.fut.set_exception(exc)

    def _timeout(self, stream: int) -> None:
        if stream in self._calls and self._transport is not None:
            self._transport.write(frame(RST_STREAM, 0, stream, _HEAD.pack(0x8)))  # CANCEL
        self._end(stream, TimeoutError("no answer within the client timeout"))

    def _fail_all(self, exc: Exception) -> None:
        if self._closed is None:
            self._closed = exc
        for stream in list(self._calls):
            self._end(stream, exc)
        self._parked.clear()


def _unpad(flags: int, payload: bytes) -> bytes:
    if flags & PADDED:
        return payload[1 : len(payload) - payload[0]]
    return payload
