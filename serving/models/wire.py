"""The direct channel's wire format: ingress ⇄ model replica, over one TCP connection.

Every frame is a fixed header and a body:

    header   u32 body length, u64 request id, u8 kind, u8 flags, u32 deadline (ms, 0: none)
    HELLO    body: the replica's token (the first frame a client sends; anything else, or
             a wrong token, and the replica closes the connection)
    PREDICT  body: arrays; flags bit 0: `alone` (no other request for the model in flight
             at the ingress)
    RESULT   body: f64 queue_s, f64 infer_s, u32 batch size, arrays
    ERROR    body: u16 code length, code (a ServingError code), the message (UTF-8)

Arrays: u8 count, then per array u8 name length, name, u8 dtype length, dtype (numpy's
`str`, e.g. "<f4"), u8 rank, u32 per dimension, the raw bytes (C order). Numeric and
boolean arrays only: nothing is unpickled, nothing but numbers crosses.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import numpy as np

from serving.models.registry import Arrays

HEADER = struct.Struct("<IQBBI")
HELLO, PREDICT, RESULT, ERROR = 0, 1, 2, 3
ALONE = 1
MAX_BODY = 1 << 30  # a frame longer than this is a broken stream, not a request
_RESULT = struct.Struct("<ddI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_DIMS = [struct.Struct(f"<{n}I") for n in range(33)]


class WireError(ValueError):
    """The bytes do not follow the format: the connection is dropped."""


class Frame(NamedTuple):
    request_id: int
    kind: int
    flags: int
    deadline_ms: int
    body: bytes


def frame(
    request_id: int, kind: int, body: list[bytes], flags: int = 0, deadline_ms: int = 0
) -> bytes:
    size = sum(len(b) for b in body)
    return b"".join((HEADER.pack(size, request_id, kind, flags, deadline_ms), *body))


def encode_arrays(arrays: Arrays) -> list[bytes]:
    out = [_U8.pack(len(arrays))]
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.kind not in "biuf":
            raise WireError(f"{name}: dtype {arr.dtype} cannot cross the channel")
        n, dt = name.encode(), arr.dtype.str.encode()
        out += (
            _U8.pack(len(n)),
            n,
            _U8.pack(len(dt)),
            dt,
            _U8.pack(arr.ndim),
            _DIMS[arr.ndim].pack(*arr.shape),
            arr.tobytes(),
        )
    return out


def decode_arrays(body: bytes, pos: int = 0) -> tuple[Arrays, int]:
    """The arrays at `pos`, as writable copies (runtimes may write into inputs)."""
    try:
        count = body[pos]
        pos += 1
        out: Arrays = {}
        for _ in range(count):
            n = body[pos]
            name = body[pos + 1 : pos + 1 + n].decode()
            pos += 1 + n
            n = body[pos]
            dtype = _dtype(body[pos + 1 : pos + 1 + n])
            pos += 1 + n
            rank = body[pos]
            shape = _DIMS[rank].unpack_from(body, pos + 1)
            pos += 1 + _DIMS[rank].size
            size = dtype.itemsize * math.prod(shape)
            if pos + size > len(body):
                raise WireError(f"{name}: {size} bytes of data, {len(body) - pos} left")
            out[name] = (
                np.frombuffer(body, dtype, size // dtype.itemsize, pos).reshape(shape).copy()
            )
            pos += size
        return out, pos
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed arrays: {exc}") from None


_DTYPES: dict[bytes, np.dtype[Any]] = {}


def _dtype(name: bytes) -> np.dtype[Any]:
    """A numeric or boolean dtype from its `str` (cached: a handful ever occur)."""
    dt = _DTYPES.get(name)
    if dt is None:
        try:
            dt = np.dtype(name.decode())
        except (TypeError, ValueError, UnicodeDecodeError):
            raise WireError(f"bad dtype {name!r}") from None
        if dt.kind not in "biuf":
            raise WireError(f"dtype {dt} cannot cross the channel")
        if len(_DTYPES) < 64:
            _DTYPES[name] = dt
    return dt


def encode_result(
    request_id: int, outputs: Arrays, queue_s: float, infer_s: float, batch_size: int
) -> bytes:
    return frame(
        request_id, RESULT, [_RESULT.pack(queue_s, infer_s, batch_size), *encode_arrays(outputs)]
    )


def decode_result(body: bytes) -> tuple[Arrays, float, float, int]:
    try:
        queue_s, infer_s, batch_size = _RESULT.unpack_from(body, 0)
    except struct.error as exc:
        raise WireError(f"malformed result: {exc}") from None
    outputs, _ = decode_arrays(body, _RESULT.size)
    return outputs, queue_s, infer_s, batch_size


def encode_error(request_id: int, code: str, message: str) -> bytes:
    c = code.encode()
    return frame(request_id, ERROR, [_U16.pack(len(c)), c, message.encode()])


def decode_error(body: bytes) -> tuple[str, str]:
    try:
        (n,) = _U16.unpack_from(body, 0)
        return bytes(body[2 : 2 + n]).decode(), bytes(body[2 + n :]).decode()
    except (struct.error, UnicodeDecodeError) as exc:
        raise WireError(f"malformed error: {exc}") from None


class FrameReader:
    """Whole frames out of a byte stream that arrives in pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        while len(buf) - pos >= HEADER.size:
            size, rid, kind, flags, deadline = HEADER.unpack_from(buf, pos)
            if size > MAX_BODY:
                raise WireError(f"frame of {size} bytes")
            end = pos + HEADER.size + size
            if end > len(buf):
                break
            frames.append(Frame(rid, kind, flags, deadline, bytes(buf[pos + HEADER.size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames
