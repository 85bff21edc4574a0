"""The measurement floor: the cheapest HTTP server we can write (raw asyncio protocol,
fixed answer). What the generator measures against it is the generator's own cost plus
the loopback; run as `python -m loadtests.floor --port N`."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

ANSWER = b'{"predictions":[0]}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


class _Echo(asyncio.Protocol):
    """Answers every complete request (head + content-length body) on the connection."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self._buf) < end + 4 + length:
                return
            del self._buf[: end + 4 + length]
            assert self._t is not None
            self._t.write(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    port = p.parse_args().port
    try:
        import uvloop

        uvloop.run(serve(port))
    except ImportError:
        asyncio.run(serve(port))


if __name__ == "__main__":
    main()
