"""HTTP/2 on the wire (RFC 9113), as much of it as gRPC's unary and streaming calls use:
frames out, frames in, and header blocks. The gRPC server on the ingress's loop
(serving.transport.grpc_h2) and the load generator's lean client speak HTTP/2 through
this, not through a general state machine: h2's cost a call (~0.15 ms of CPU on this
machine's cores, its events, validation and per-frame objects) was most of what gRPC
cost above HTTP/1.1.

Header blocks are decoded with `hpack` (a peer's encoder may index, so the decoder's
table must see every block in order); ours are written as literal fields without
indexing (and static-table indices), so the same bytes are valid in any HPACK state
and cost no table work on either side.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# Flags (ACK shares END_STREAM's bit, on SETTINGS and PING).
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# Settings.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5
# Error codes.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
_U32 = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY carrying `code`."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _U32.pack(len(payload) << 8 | kind) + bytes((flags,)) + _U32.pack(stream) + payload


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in values.items()))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, _U32.pack(increment))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, _U32.pack(code))


def goaway(last_stream: int, code: int = NO_ERROR) -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream) + _U32.pack(code))


def header_frames(stream: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS, then CONTINUATION frames past the peer's frame size."""
    first = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, first | END_HEADERS, stream, block)
    parts = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame(HEADERS, first, stream, parts[0])]
    out += [frame(CONTINUATION, 0, stream, p) for p in parts[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, stream, parts[-1]))
    return b"".join(out)


def _int(n: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a prefix of `prefix_bits`, `first` holding the
    representation's own leading bits."""
    top = (1 << prefix_bits) - 1
    if n < top:
        return bytes((first | n,))
    out, n = bytearray((first | top,)), n - top
    while n >= 128:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, its name literal too (no Huffman)."""
    return b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value


def indexed(index: int) -> bytes:
    """A header field from the static table, e.g. 8 for `:status: 200`."""
    return _int(index, 7, 0x80)


class FrameReader:
    """Splits what a connection reads into frames: (type, flags, stream, payload), with
    padding and priority fields stripped and a header block spread over CONTINUATION
    frames joined into one HEADERS frame (carrying the first frame's END_STREAM)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame  # what we accept: our SETTINGS_MAX_FRAME_SIZE
        self._buf = bytearray()
        self._block: tuple[int, int, bytearray] | None = None  # stream, flags, block so far

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, int, int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 9:
            head = _U32.unpack_from(buf, pos)[0]
            length, kind = head >> 8, head & 0xFF
            if length > self.max_frame:
                raise ProtocolError(f"a frame of {length} bytes", FRAME_SIZE_ERROR)
            if end - pos < 9 + length:
                break
            flags = buf[pos + 4]
            stream = _U32.unpack_from(buf, pos + 5)[0] & MAX_WINDOW
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            item = self._frame(kind, flags, stream, payload)
            if item is not None:
                out.append(item)
        del buf[:pos]
        return out

    def _frame(
        self, kind: int, flags: int, stream: int, payload: bytes
    ) -> tuple[int, int, int, bytes] | None:
        if self._block is not None:
            sid, first, block = self._block
            if kind != CONTINUATION or stream != sid:
                raise ProtocolError("a header block was interrupted")
            block += payload
            if not flags & END_HEADERS:
                return None
            self._block = None
            return HEADERS, first | END_HEADERS, sid, bytes(block)
        if kind == CONTINUATION:
            raise ProtocolError("CONTINUATION without its HEADERS")
        if kind in (DATA, HEADERS) and flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError("padding past the frame")
            payload = payload[1 : len(payload) - payload[0]]
        if kind == HEADERS:
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if not flags & END_HEADERS:
                self._block = (stream, flags, bytearray(payload))
                return None
        elif kind in (RST_STREAM, WINDOW_UPDATE) and len(payload) != 4:
            raise ProtocolError(f"frame type {kind} of {len(payload)} bytes", FRAME_SIZE_ERROR)
        elif kind == PING and len(payload) != 8:
            raise ProtocolError("PING of other than 8 bytes", FRAME_SIZE_ERROR)
        elif kind == SETTINGS and len(payload) % 6:
            raise ProtocolError("SETTINGS not in 6-byte entries", FRAME_SIZE_ERROR)
        return kind, flags, stream, payload


def settings_values(payload: bytes) -> list[tuple[int, int]]:
    return [struct.unpack_from(">HI", payload, off) for off in range(0, len(payload), 6)]


def u32(payload: bytes, offset: int = 0) -> int:
    """A 31-bit value (window increments, stream ids) or an error code."""
    return int(_U32.unpack_from(payload, offset)[0])


class HeaderDecoder:
    """hpack's decoder, its failures as COMPRESSION_ERROR."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
        except hpack.HPACKError as exc:
            raise ProtocolError(f"header block: {exc}", COMPRESSION_ERROR) from exc


class Flow:
    """Flow control for one connection, both ways, and the frames every peer answers
    alike (SETTINGS and PING are acknowledged).

    Sending: DATA waits, in order per stream, until the peer's connection and stream
    windows allow it, cut to the peer's frame size; `then` (e.g. the trailers' frames)
    goes once a stream's data all went, and then `on_done(stream)` is told. Receiving: each
    window we gave (`recv_window`, per stream and for the connection) is topped up once
    half of it was used. Frames to write collect in `out`."""

    def __init__(self, recv_window: int, on_done: Callable[[int], None] | None = None) -> None:
        self.out: list[bytes] = []
        self.recv_window = recv_window
        self._on_done = on_done
        self._send_window = DEFAULT_WINDOW
        self._initial = DEFAULT_WINDOW
        self._windows: dict[int, int] = {}
        self.max_frame = DEFAULT_MAX_FRAME
        self._pending: dict[int, tuple[bytearray, bool, bytes]] = {}
        self._used = 0
        self._used_streams: dict[int, int] = {}

    def flush(self, transport: asyncio.WriteTransport | None) -> None:
        """Write what collected in `out`, in one write (dropped once the connection
        is closing)."""
        if self.out and transport is not None and not transport.is_closing():
            transport.write(b"".join(self.out))
        self.out.clear()

    def open(self, stream: int) -> None:
        self._windows[stream] = self._initial

    def forget(self, stream: int) -> None:
        self._windows.pop(stream, None)
        self._pending.pop(stream, None)
        self._used_streams.pop(stream, None)

    def waiting(self, stream: int) -> bool:
        """Data of the stream still waits for window."""
        return stream in self._pending

    def send(self, stream: int, data: bytes, end_stream: bool = False, then: bytes = b"") -> None:
        """Queue DATA (END_STREAM on its last frame when asked), then `then`'s bytes."""
        held = self._pending.get(stream)
        if held is None:
            self._pending[stream] = (bytearray(data), end_stream, then)
        else:
            self._pending[stream] = (held[0] + data, end_stream, held[2] + then)
        self.drain(stream)

    def then(self, stream: int, frames: bytes) -> None:
        """Bytes to write once the stream's waiting data all went."""
        data, end, then = self._pending[stream]
        self._pending[stream] = (data, end, then + frames)

    def drain(self, stream: int = 0) -> None:
        """Send what the windows allow, of one stream or (0) of every stream."""
        for sid in list(self._pending) if stream == 0 else [stream]:
            held = self._pending.get(sid)
            if held is None:
                continue
            data, end, then = held
            ended = False
            while data:
                n = min(self._send_window, self._windows.get(sid, 0), len(data), self.max_frame)
                if n <= 0:
                    break
                ended = end and n == len(data)
                self.out.append(frame(DATA, END_STREAM if ended else 0, sid, bytes(data[:n])))
                del data[:n]
                self._send_window -= n
                self._windows[sid] -= n
            if data:
                continue
            if end and not ended:  # no data at all
                self.out.append(frame(DATA, END_STREAM, sid))
            del self._pending[sid]
            if then:
                self.out.append(then)
                if self._on_done is not None:
                    self._on_done(sid)

    def received(self, stream: int, n: int) -> None:
        """DATA of n bytes read on the stream (or a stream already ended)."""
        half = self.recv_window // 2
        self._used += n
        if self._used >= half:
            self.out.append(window_update(0, self._used))
            self._used = 0
        if stream in self._windows:
            used = self._used_streams.get(stream, 0) + n
            if used >= half:
                self.out.append(window_update(stream, used))
                used = 0
            self._used_streams[stream] = used

    def control(self, kind: int, flags: int, stream: int, payload: bytes) -> bool:
        """SETTINGS, WINDOW_UPDATE and PING: handled here (True), answered in `out`."""
        if kind == SETTINGS:
            if flags & ACK:
                return True
            for key, value in settings_values(payload):
                if key == INITIAL_WINDOW_SIZE:  # applies to the open streams too
                    if value > MAX_WINDOW:
                        raise ProtocolError("window past 2^31-1", FLOW_CONTROL_ERROR)
                    delta, self._initial = value - self._initial, value
                    for sid in self._windows:
                        self._windows[sid] += delta
                elif key == MAX_FRAME_SIZE:
                    self.max_frame = value
                # HEADER_TABLE_SIZE bounds an encoder's table: ours index nothing.
            self.out.append(frame(SETTINGS, ACK, 0))
            self.drain()
        elif kind == WINDOW_UPDATE:
            increment = u32(payload) & MAX_WINDOW
            if stream == 0:
                self._send_window += increment
            elif stream in self._windows:
                self._windows[stream] += increment
            self.drain(stream)
        elif kind == PING:
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        else:
            return False
        return True
