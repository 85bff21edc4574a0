"""The load generator against a tiny HTTP server in a thread (no Ray, no Redis).

The server runs on its own event loop in a thread, so a blocking stall there does not
stall the generator; both use time.perf_counter, so their instants compare directly.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from loadtests import loadgen
from loadtests.loadgen import HttpClient, closed_loop, open_loop, percentile, serial

STALL_S = 0.3


class TinyServer:
    """HTTP/1.1 keep-alive server. `delay_s`: non-blocking service time per request;
    `stall_at`: the request number (1-based) on which the whole server blocks."""

    def __init__(self, delay_s: float = 0.0, stall_at: int | None = None) -> None:
        self.delay_s = delay_s
        self.stall_at = stall_at
        self.count = 0
        self.stall: tuple[float, float] | None = None
        self.stamps: list[tuple[int, int]] = []  # (x-request-start, read), µs since epoch
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                read_us = time.time_ns() // 1000
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    if line.lower().startswith(b"x-request-start: t="):
                        self.stamps.append((int(line.split(b"=")[1]), read_us))
                await reader.readexactly(length)
                self.count += 1
                if self.count == self.stall_at:
                    t = time.perf_counter()
                    time.sleep(STALL_S)  # blocks this server's loop: every connection waits
                    self.stall = (t, time.perf_counter())
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                body = b'{"ok":true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"Server-Timing: infer;dur=1.5, hop;dur=0.5, total;dur=2.25\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> TinyServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[TinyServer]:
    with TinyServer() as s:
        yield s


def _client(port: int, **kw: object) -> HttpClient:
    req = loadgen.http_request("127.0.0.1", port, "/p", b'{"x":1}')
    return HttpClient("127.0.0.1", port, [req], **kw)  # type: ignore[arg-type]


def test_open_loop_sends_the_schedule(server: TinyServer) -> None:
    async def go() -> loadgen.RunResult:
        client = _client(server.port)
        try:
            return await open_loop(client, rate=200, duration_s=1.0, warmup_s=0.2)
        finally:
            await client.aclose()

    t = time.perf_counter()
    r = asyncio.run(go())
    elapsed = time.perf_counter() - t
    s = r.summary()
    assert s["requests"] == 200 and s["ok"] == 200 and s["errors"] == 0
    assert server.count == 240  # warm-up requests are sent, just not counted
    assert 1.15 < elapsed < 2.5  # the schedule spans 1.2 s: not compressed, not stretched
    # Sent on time: the median request left within a few ms of its due time.
    assert abs(s["send_lag_ms"]["p50"]) < 5
    assert 0 < s["latency_ms"]["p50"] < 50
    assert s["statuses"] == {"200": 200}


@pytest.mark.parametrize("max_connections", [1, 512])
def test_server_stall_counts_from_the_scheduled_time(max_connections: int) -> None:
    """With one connection the requests due during the stall queue in the client; a
    generator timing from the actual send would show them as fast. Ours must not."""
    rate = 100
    with TinyServer(stall_at=41) as srv:  # ~0.4 s into the run

        async def go() -> loadgen.RunResult:
            client = _client(srv.port, max_connections=max_connections)
            try:
                return await open_loop(client, rate=rate, duration_s=1.0)
            finally:
                await client.aclose()

        r = asyncio.run(go())
    assert srv.stall is not None and r.first_due is not None
    start, end = srv.stall
    assert r.requests == rate and r.ok == rate
    dues = [r.first_due + i / rate for i in range(rate)]
    during = [(due, lat) for due, lat in zip(dues, r.latencies_s) if start <= due <= end - 0.02]
    assert len(during) >= 20, (len(during), start - r.first_due)
    for due, lat in during:
        assert lat >= (end - due) - 0.005, (due - start, lat)
    # The stall shows in the tail: p99 is at least most of the stall.
    assert percentile(r.latencies_s, 99) > 0.8 * STALL_S
    # Requests due long after the stall are fast again.
    assert percentile(r.latencies_s[-20:], 50) < 0.05


def test_client_side_stall_counts_from_the_scheduled_time(server: TinyServer) -> None:
    """The generator's own loop blocks for 300 ms: requests due meanwhile go out late
    and their latency must include the lateness."""

    async def go() -> loadgen.RunResult:
        client = _client(server.port)
        asyncio.get_running_loop().call_later(0.4, time.sleep, STALL_S)
        try:
            return await open_loop(client, rate=100, duration_s=1.0)
        finally:
            await client.aclose()

    r = asyncio.run(go())
    assert r.requests == 100 and r.ok == 100
    late = [lag for lag in r.send_lag_s if lag > 0.1]
    assert len(late) >= 20  # ~30 requests were due during the stall
    for lag, lat in zip(r.send_lag_s, r.latencies_s):
        assert lat >= lag  # latency includes how late the request went out
    assert max(r.latencies_s) > 0.25


def test_percentile_matches_numpy() -> None:
    rng = random.Random(3)
    for n in (1, 2, 5, 101, 1000):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 95, 99, 99.9, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    # A failed request counts as infinitely slow and is never averaged away.
    assert percentile([0.001] * 98 + [loadgen.INF] * 2, 99) == loadgen.INF
    assert percentile([0.001] * 99 + [loadgen.INF], 50) == 0.001


def test_closed_loop_throughput_follows_concurrency() -> None:
    """10 ms service time: N clients get ~N/10ms requests per second."""
    with TinyServer(delay_s=0.010) as srv:

        async def go(n: int) -> loadgen.RunResult:
            client = _client(srv.port)
            try:
                return await closed_loop(client, n, duration_s=0.8, warmup_s=0.1)
            finally:
                await client.aclose()

        one = asyncio.run(go(1)).summary()
        four = asyncio.run(go(4)).summary()
    assert 60 < one["throughput_rps"] <= 101
    assert 240 < four["throughput_rps"] <= 404
    assert four["throughput_rps"] > 3 * one["throughput_rps"]
    assert 10 <= four["latency_ms"]["p50"] < 30
    assert four["connections"] == 4
    assert four["requests"] == four["ok"] > 200


def test_serial_keeps_server_timing(server: TinyServer) -> None:
    async def go() -> loadgen.RunResult:
        client = _client(server.port)
        try:
            return await serial(client, 50, warmup=5, keep_timing=True)
        finally:
            await client.aclose()

    r = asyncio.run(go())
    s = r.summary()
    assert s["requests"] == 50 and s["connections"] == 1
    st = s["server_timing"]
    assert st["requests"] == 50
    assert st["stages_mean_ms"] == {"infer": 1.5, "hop": 0.5, "total": 2.25}
    assert st["inside_total_unattributed_mean_ms"] == pytest.approx(0.25)
    # coverage = (infer + hop) / client latency, averaged.
    want = sum(2.0 / (lat * 1000) for lat in r.latencies_s) / 50
    assert st["coverage"] == pytest.approx(want)
    assert loadgen.parse_server_timing("a;desc=x;dur=1, b;dur=2.5") == {"a": 1.0, "b": 2.5}
    # Every request carried its send time, stamped as it left (never after the read).
    assert len(server.stamps) == 55
    assert all(0 <= read - sent < 1_000_000 for sent, read in server.stamps)


def test_coverage_counts_inbound_apart() -> None:
    timings = [
        {"inbound": 0.1, "http": 0.1, "infer": 0.5, "total": 0.7},
        {"http": 0.1, "infer": 0.5, "total": 0.7},  # a server that got no stamp
    ]
    st = loadgen.timing_coverage(timings, [0.001, 0.001])
    assert st["coverage"] == pytest.approx((0.7 + 0.6) / 2)
    assert st["coverage_without_inbound"] == pytest.approx(0.6)
    assert st["outside_mean_ms"] == pytest.approx((0.2 + 0.3) / 2)
    assert st["inside_total_unattributed_mean_ms"] == pytest.approx(0.1)
    assert st["stages_mean_ms"]["inbound"] == pytest.approx(0.05)


def test_dead_server_gives_errors_not_latencies() -> None:
    port = _unused_port()

    async def go() -> loadgen.RunResult:
        client = _client(port)
        try:
            return await open_loop(client, rate=50, duration_s=0.2)
        finally:
            await client.aclose()

    r = asyncio.run(go()).summary()
    assert r["requests"] == 10 and r["ok"] == 0 and r["errors"] == 10
    assert r["latency_ms"]["p50"] == loadgen.INF


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
