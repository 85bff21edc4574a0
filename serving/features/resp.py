"""A multiplexed Redis client for the request path's feature reads.

One TCP connection carries the commands of every request in flight, pipelined; Redis
answers in order, so each reply goes to its request by position (parsed by hiredis).
Against redis-py's pooled pipeline this drops, per request, the pool's locking and
connection checks and the pipeline's bookkeeping, which on the reference machine cost
more than the round trip itself; concurrent requests also share round trips instead of
waiting for a free connection.

Invariants:
- A request that gives up (its deadline passed) leaves its place in the queue: its
  replies are read and dropped, so no reply ever reaches another request.
- A lost connection fails every request on it at once (`ConnectionError`) and the next
  request opens a new one: a restarted Redis is picked up without a stale-connection
  failure.
- More than `MAX_IN_FLIGHT` requests outstanding on one connection means Redis stopped
  answering: the connection is dropped (its requests fail) instead of queueing forever.
- So does a request that finds the oldest one on its connection unanswered for longer
  than `read_timeout_s` (a half-open connection: the server or the path to it is gone
  without a FIN): the connection is dropped and this request opens a new one.

Only `redis://` URLs (host, port, db, username, password); `supports` says so, and
callers keep redis-py for the rest (TLS, unix sockets).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ResponseError

MAX_IN_FLIGHT = 4096
READ_TIMEOUT_S = 2.0  # Redis answers in well under a millisecond; this is a dead link

Command = Sequence[str | bytes]


def pack(commands: Sequence[Command]) -> bytes:
    """RESP arrays of bulk strings, one per command."""
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            b = arg.encode() if isinstance(arg, str) else arg
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def checked(replies: list[Any]) -> list[Any]:
    """`replies`, unless one is an error reply: then the first such is raised (as
    redis-py's pipeline does)."""
    failed = next((r for r in replies if isinstance(r, Exception)), None)
    if failed is not None:
        raise failed
    return replies


@dataclass(slots=True)
class _Waiter:
    fut: asyncio.Future[list[Any]]
    n: int  # replies this request expects
    sent: float  # time.monotonic() when written
    replies: list[Any] = field(default_factory=list)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        # Undecodable bytes become U+FFFD: a corrupt value fails its own parse, not the
        # connection.
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=ResponseError)
        self._waiting: deque[_Waiter] = deque()
        self._transport: asyncio.Transport | None = None
        self.lost = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:
                self.abort()
                return
            if reply is False:
                return
            if not self._waiting:  # a reply nobody asked for: the stream is out of step
                self.abort()
                return
            w = self._waiting[0]
            w.replies.append(reply)
            if len(w.replies) == w.n:
                self._waiting.popleft()
                if not w.fut.done():  # done: the request gave up; drop its replies
                    w.fut.set_result(w.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        err = ConnectionError(f"Redis connection lost: {exc or 'closed by the server'}")
        while self._waiting:
            w = self._waiting.popleft()
            if not w.fut.done():
                w.fut.set_exception(err)

    # requests
    def stalled(self, now: float, read_timeout_s: float) -> bool:
        """The oldest request here has waited past `read_timeout_s` for its replies."""
        return bool(self._waiting) and now - self._waiting[0].sent > read_timeout_s

    def send(self, payload: bytes, n: int, now: float) -> asyncio.Future[list[Any]]:
        assert self._transport is not None
        if len(self._waiting) >= MAX_IN_FLIGHT:
            self.abort()
            raise ConnectionError(f"Redis left {MAX_IN_FLIGHT} requests unanswered")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiter(fut, n, now))
        self._transport.write(payload)
        return fut

    def abort(self) -> None:
        self.lost = True
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails whoever still waits

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class MultiplexedRedis:
    """`execute(commands)`: their replies, in order, over the shared connection. An
    error reply comes back as a `ResponseError` in its place; transport failures raise
    `ConnectionError` (an OSError); deadlines are the caller's (asyncio.timeout)."""

    def __init__(
        self, url: str, connect_timeout_s: float = 1.0, read_timeout_s: float = READ_TIMEOUT_S
    ) -> None:
        if not self.supports(url):
            raise ValueError(f"not a redis:// URL: {url}")
        u = urlsplit(url)
        self._host = u.hostname or "localhost"
        self._port = u.port or 6379
        db = unquote(u.path.lstrip("/")) or parse_qs(u.query).get("db", ["0"])[0]
        setup: list[Command] = []
        if u.password:
            user, password = unquote(u.username or ""), unquote(u.password)
            setup.append(("AUTH", user, password) if user else ("AUTH", password))
        if db and db != "0":
            setup.append(("SELECT", db))
        self._setup = setup
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._conn: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return url.startswith("redis://")

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        conn = self._conn
        now = time.monotonic()
        if conn is not None and not conn.lost and conn.stalled(now, self._read_timeout_s):
            conn.abort()  # half-open: its requests fail now, this one takes a new link
        if conn is None or conn.lost:
            conn = await self._connect()
        return await conn.send(pack(commands), len(commands), now)

    async def _connect(self) -> _Connection:
        # One attempt at a time, shared by every request that needs it; shielded so a
        # request giving up does not cancel it for the others.
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, attempt: asyncio.Future[_Connection]) -> None:
        # Finished, whether or not anyone still waits for it: the next request that
        # finds no connection starts a new attempt (never re-reads a stale failure).
        if self._opening is attempt:
            self._opening = None
        if not attempt.cancelled():
            attempt.exception()  # read here too, for when every waiter gave up

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
                if self._setup:
                    setup = conn.send(pack(self._setup), len(self._setup), time.monotonic())
                    checked(await setup)
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        return conn

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
