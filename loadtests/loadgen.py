"""Load generation: an open-loop runner, a closed-loop runner and a serial runner over a
pluggable `Client`, plus the statistics they report.

Open loop: request i is due at `start + i / rate` whatever happened to earlier requests,
and its latency is counted from that scheduled time. A stall (in the server, or in this
process, or while waiting for a free connection) therefore shows in the latency of every
request that was due during it: coordinated omission is accounted for.

Every latency ends when the answer's last byte has been read, stamped in the connection's
read callback: the time until the awaiting coroutine runs again is the generator's own,
not the server's.

Closed loop: N clients, each sending its next request when the previous one answered;
throughput is what the system gives, latency is counted from the actual send.

The generator shares a small machine with the systems it measures, so the HTTP client is
a few dozen lines of raw asyncio over keep-alive connections with pre-encoded requests:
no per-request header building, no body parsing beyond framing. Its CPU cost per request
is measured on every run (`client_cpu_us_per_request`).

A transport is added by implementing `Client` (see `grpc_client.py` for the gRPC hook).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

INF = math.inf
# The generator's clock. Not loop.time(): uvloop's has millisecond resolution.
now = time.perf_counter
REFUSED = (503, 14)  # overloaded: HTTP 503, gRPC UNAVAILABLE
PERCENTILES = (50.0, 90.0, 95.0, 99.0)


# ---- the client contract ---------------------------------------------------------------
@dataclass(slots=True)
class Reply:
    ok: bool  # a 2xx answer (or the transport's success)
    status: int  # HTTP status (gRPC: 0 for OK, else the status code's value)
    sent: float  # now() when the request was handed to the socket
    done: float  # now() when the answer's last byte was read (before any task resumes)
    timing: bytes | None = None  # raw Server-Timing value, when the client keeps it
    flagged: bool = False  # the answer carried the scenario's flag (e.g. "degraded")


class Client(Protocol):
    """Sends request number `i` (payloads are cycled) and returns when it is answered.
    Must allow many calls in flight at once; raises on transport failures."""

    async def call(self, i: int) -> Reply: ...

    async def aclose(self) -> None: ...


# ---- raw asyncio HTTP/1.1 client -------------------------------------------------------
class HttpError(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time (no pipelining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keep: bytes, flag: bytes | None) -> None:
        self._loop = loop
        self._keep = keep  # lower-case header name whose value to return, e.g. server-timing
        self._flag = flag
        self._buf = bytearray()
        self._fut: asyncio.Future[Reply] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._sent = 0.0
        self._head: tuple[int, int, int, bool, bytes | None, bool] | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        read_at = now()  # the answer is in hand when its last bytes are read
        self._buf += data
        if self._fut is not None:
            self._parse(read_at)

    # the request
    def request(self, line: bytes, rest: bytes, timeout_s: float) -> asyncio.Future[Reply]:
        """Send the request `line` (with its CRLF), an `x-request-start` header stamped
        now (wall clock, microseconds: the server reports the way in as its `inbound`
        stage) and `rest` (the other headers and the body)."""
        assert self._transport is not None and self._fut is None
        self._fut = self._loop.create_future()
        self._timer = self._loop.call_later(timeout_s, self._on_timeout)
        self._sent = now()
        stamp = b"x-request-start: t=%d\r\n" % (time.time_ns() // 1000)
        self._transport.write(b"".join((line, stamp, rest)))
        return self._fut

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _on_timeout(self) -> None:
        self._fail(TimeoutError("no answer within the client timeout"))
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: Exception) -> None:
        fut, self._fut = self._fut, None
        if self._timer is not None:
            self._timer.cancel()
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _parse(self, read_at: float) -> None:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            status = int(head[9:12])
            length, chunked, keep, close = -1, False, None, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value
                elif name == self._keep:
                    # Header values were lower-cased with the head; stage names are too.
                    keep = value.strip()
                elif name == b"connection":
                    close = b"close" in value
            self._head = (status, end + 4, length, chunked, keep, close)
        status, start, length, chunked, keep, close = self._head
        if chunked:
            stop = _chunked_end(buf, start)
            if stop < 0:
                return
        else:
            stop = start + max(length, 0)
            if len(buf) < stop:
                return
        flagged = self._flag is not None and buf.find(self._flag, start, stop) >= 0
        del buf[:stop]
        self._head = None
        if close:
            self.close()
        fut, self._fut = self._fut, None
        if self._timer is not None:
            self._timer.cancel()
        if fut is not None and not fut.done():
            fut.set_result(Reply(200 <= status < 300, status, self._sent, read_at, keep, flagged))


def _chunked_end(buf: bytearray, pos: int) -> int:
    """Index just past a complete chunked body starting at `pos`, or -1 if incomplete."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # optional trailers, then a blank line
            return -1 if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if len(buf) < pos:
            return -1


def http_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """A complete HTTP/1.1 POST, encoded once and reused for every send."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _split_line(request: bytes) -> tuple[bytes, bytes]:
    end = request.find(b"\r\n")
    if end < 0:
        raise ValueError("an HTTP request needs a request line ending in CRLF")
    return request[: end + 2], request[end + 2 :]


class HttpClient:
    """Keep-alive connection pool. A call takes an idle connection, else opens one (up to
    `max_connections`), else waits for one: that wait counts in open-loop latency."""

    def __init__(
        self,
        host: str,
        port: int,
        requests: Sequence[bytes],
        *,
        max_connections: int = 512,
        keep_header: str = "server-timing",
        flag: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not requests:
            raise ValueError("need at least one request")
        self._host, self._port = host, port
        # Split after the request line: each send stamps `x-request-start` there.
        self._requests = [_split_line(r) for r in requests]
        self._max = max_connections
        self._keep = keep_header.lower().encode()
        self._flag = flag
        self._timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._open = 0
        self.connections_opened = 0

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Conn(loop, self._keep, self._flag), self._host, self._port
        )
        self.connections_opened += 1
        return conn

    async def _acquire(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._open -= 1
        if self._open >= self._max:
            fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            got = await fut
            if got is not None:
                return got
            # A slot was freed by a dropped connection: open a new one in it.
        else:
            self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._release(None)
            raise

    def _release(self, conn: _Conn | None) -> None:
        """Hand a connection (or, for None, a free slot) to a waiter, else keep it idle."""
        if conn is not None and conn.closed:
            conn = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if conn is None:
            self._open -= 1
        else:
            self._idle.append(conn)

    async def call(self, i: int) -> Reply:
        conn = await self._acquire()
        try:
            line, rest = self._requests[i % len(self._requests)]
            reply = await conn.request(line, rest, self._timeout_s)
        except BaseException:
            conn.close()
            self._release(None)
            raise
        self._release(conn)
        return reply

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for fut in self._waiters:
            fut.cancel()


# ---- statistics --------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as
    numpy's default; `inf` (a failed request) sorts last and propagates honestly."""
    if not values:
        return math.nan
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    a, b = xs[lo], xs[hi]
    if a == b or rank == lo:
        return a
    return a + (b - a) * (rank - lo)


def parse_server_timing(raw: bytes | str) -> dict[str, float]:
    """`decode;dur=0.4, infer;dur=1.2` → {"decode": 0.4, "infer": 1.2} (milliseconds)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    out: dict[str, float] = {}
    for part in text.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "dur" and name:
                out[name] = float(value)
    return out


def machine_busy_s() -> float | None:
    """CPU seconds every process on this machine has spent busy since boot (Linux's
    /proc/stat: user, nice, system, irq, softirq, steal); None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _busy_since(start: float | None) -> float | None:
    end = machine_busy_s()
    return None if start is None or end is None else end - start


@dataclass
class RunResult:
    """Raw per-request data of one run; `summary()` is what gets reported."""

    mode: str  # serial | open | closed
    requests: int  # requests counted (after warm-up)
    window_s: float  # measurement window (open loop: from first due time to last answer)
    latencies_s: list[float]  # inf for a failed or unanswered request
    client_cpu_s: float  # CPU this process spent during the whole run
    total_calls: int  # including warm-up, for the per-request CPU figure
    # CPU every process on the machine spent busy during the run (Linux; None elsewhere)
    machine_cpu_s: float | None = None
    rate: float | None = None
    concurrency: int | None = None
    first_due: float | None = None  # open loop: due time of request 0 (now() clock)
    send_lag_s: list[float] = field(default_factory=list)  # open loop: sent - due
    timings: list[dict[str, float]] = field(default_factory=list)  # with the latency
    timing_latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    flagged: int = 0
    connections: int = 0
    # Open loop: latency of each answer refusing the request (HTTP 503, gRPC UNAVAILABLE)
    rejected_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(1 for x in self.latencies_s if x != INF)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s
        ok = self.ok
        out: dict[str, Any] = {
            "mode": self.mode,
            "requests": self.requests,
            "ok": ok,
            "errors": self.requests - ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "flagged": self.flagged,
            "window_s": round(self.window_s, 3),
            "throughput_rps": ok / self.window_s if self.window_s > 0 else 0.0,
            "client_cpu_us_per_request": 1e6 * self.client_cpu_s / max(self.total_calls, 1),
            # Everything but the generator: the server under test and whatever else runs
            # (an idle Ray cluster's own processes too), per request of the run.
            "server_cpu_ms_per_request": (
                None
                if self.machine_cpu_s is None
                else 1e3 * (self.machine_cpu_s - self.client_cpu_s) / max(self.total_calls, 1)
            ),
            "connections": self.connections,
        }
        if self.rate is not None:
            out["offered_rps"] = self.rate
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency
        finite = [x for x in lat if x != INF]
        out["latency_ms"] = {
            **{f"p{q:g}": _ms(percentile(lat, q)) for q in PERCENTILES},
            "mean": _ms(sum(finite) / len(finite)) if finite else None,
            "max": _ms(max(lat)) if lat else None,
        }
        if self.mode == "open":
            out["admitted_ms"] = {f"p{q:g}": _ms(percentile(finite, q)) for q in (50, 99)}
            out["rejected"] = len(self.rejected_s)
            out["rejected_ms"] = {f"p{q:g}": _ms(percentile(self.rejected_s, q)) for q in (50, 99)}
        if self.send_lag_s:
            out["send_lag_ms"] = {
                "p50": _ms(percentile(self.send_lag_s, 50)),
                "p99": _ms(percentile(self.send_lag_s, 99)),
                "max": _ms(max(self.send_lag_s)),
            }
        if self.timings:
            out["server_timing"] = timing_coverage(self.timings, self.timing_latencies_s)
        return out


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else (x * 1000 if x != INF else INF)


def timing_coverage(timings: list[dict[str, float]], latencies_s: list[float]) -> dict[str, Any]:
    """How much of the client-measured latency the server's stages account for.

    coverage = mean over requests of sum(stages except `total`) / client latency; the
    stages include `inbound` (the client's `x-request-start` stamp to the server's first
    read), which `coverage_without_inbound` leaves out. `outside_mean_ms` is what no
    stage sees: client latency minus `inbound` and the server's `total` (the answer's way
    back, the client itself). `inside_total_unattributed_mean_ms`: `total` minus the
    stages inside it.
    """
    n = len(timings)
    stages: dict[str, float] = {}
    cov = cov_in = outside = inside_gap = 0.0
    for t, lat in zip(timings, latencies_s):
        lat_ms = lat * 1000
        parts = sum(v for k, v in t.items() if k != "total")
        inbound = t.get("inbound", 0.0)
        cov += parts / lat_ms
        cov_in += (parts - inbound) / lat_ms
        total = t.get("total", parts - inbound)
        outside += lat_ms - total - inbound
        inside_gap += total - (parts - inbound)
        for k, v in t.items():
            stages[k] = stages.get(k, 0.0) + v
    return {
        "requests": n,
        "coverage": cov / n,
        "coverage_without_inbound": cov_in / n,
        "stages_mean_ms": {k: v / n for k, v in stages.items()},
        "client_mean_ms": 1000 * sum(latencies_s) / n,
        "outside_mean_ms": outside / n,
        "inside_total_unattributed_mean_ms": inside_gap / n,
    }


class _Recorder:
    """Collects replies; `keep_timing` parses Server-Timing after the fact, off the clock."""

    def __init__(self, keep_timing: bool) -> None:
        self.keep_timing = keep_timing
        self.statuses: collections.Counter[int] = collections.Counter()
        self.flagged = 0
        self.raw_timings: list[tuple[bytes, float]] = []

    def add(self, reply: Reply | None, latency_s: float) -> None:
        if reply is None:
            self.statuses[-1] += 1  # no answer: connection failure or client timeout
            return
        self.statuses[reply.status] += 1
        self.flagged += reply.flagged
        if self.keep_timing and reply.ok and reply.timing is not None:
            self.raw_timings.append((reply.timing, latency_s))

    def fill(self, result: RunResult) -> RunResult:
        result.statuses = dict(self.statuses)
        result.flagged = self.flagged
        for raw, lat in self.raw_timings:
            result.timings.append(parse_server_timing(raw))
            result.timing_latencies_s.append(lat)
        return result


# ---- runners ---------------------------------------------------------------------------
async def open_loop(
    client: Client,
    rate: float,
    duration_s: float,
    *,
    warmup_s: float = 0.0,
    drain_s: float = 10.0,
    early_s: float = 0.001,
    keep_timing: bool = False,
) -> RunResult:
    """Send at a fixed rate for warmup_s + duration_s; count requests due after warm-up.

    Latency = answer time - min(due time, actual send). The event loop's timers fire up
    to ~1 ms late, so the scheduler wakes `early_s` ahead and a request may go out a
    little early: then its latency is taken from the actual send and the earliness does
    not shorten it. A late send (this process stalled, or every connection busy) is
    counted from the due time.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    loop = asyncio.get_running_loop()
    n_warm = round(rate * warmup_s)
    n = n_warm + max(1, round(rate * duration_s))
    lat = [INF] * n
    lag = [0.0] * n
    rejected: list[float] = []
    rec = _Recorder(keep_timing)
    cpu0, busy0 = time.process_time(), machine_busy_s()
    t0 = now() + 0.005
    last_done = t0

    async def fire(i: int, due: float) -> None:
        nonlocal last_done
        reply: Reply | None
        try:
            reply = await client.call(i)
        except Exception:
            reply = None
        done = reply.done if reply is not None else now()
        last_done = max(last_done, done)
        latency = INF
        if reply is not None:
            lag[i] = reply.sent - due
            if reply.ok:
                latency = lat[i] = done - min(due, reply.sent)
            elif reply.status in REFUSED and i >= n_warm:
                rejected.append(done - min(due, reply.sent))
        if i >= n_warm:
            rec.add(reply, latency)

    tasks: list[asyncio.Task[None]] = []
    interval = 1.0 / rate
    for i in range(n):
        due = t0 + i * interval
        delay = due - early_s - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(fire(i, due)))
    _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for t in pending:  # unanswered: they stay at inf latency
        t.cancel()
    if pending:
        await asyncio.wait(pending)
    cpu = time.process_time() - cpu0
    first_due = t0 + n_warm * interval
    result = RunResult(
        mode="open",
        requests=n - n_warm,
        window_s=max(last_done - first_due, (n - n_warm) * interval),
        latencies_s=lat[n_warm:],
        client_cpu_s=cpu,
        machine_cpu_s=_busy_since(busy0),
        total_calls=n,
        rate=rate,
        first_due=first_due,
        send_lag_s=lag[n_warm:],
        connections=getattr(client, "connections_opened", 0),
        rejected_s=rejected,
    )
    return rec.fill(result)


async def closed_loop(
    client: Client,
    concurrency: int,
    duration_s: float,
    *,
    warmup_s: float = 0.0,
    keep_timing: bool = False,
) -> RunResult:
    """`concurrency` clients back to back; counts requests sent inside the window
    [warm-up end, warm-up end + duration] and answered; latency from the actual send."""
    rec = _Recorder(keep_timing)
    lat: list[float] = []
    calls = 0
    cpu0, busy0 = time.process_time(), machine_busy_s()
    t_measure = now() + warmup_s
    t_end = t_measure + duration_s

    async def worker(w: int) -> None:
        nonlocal calls
        i = w
        while now() < t_end:
            reply: Reply | None
            sent = now()
            try:
                reply = await client.call(i)
                sent = reply.sent
            except Exception:
                reply = None
            done = reply.done if reply is not None else now()
            calls += 1
            i += concurrency
            if sent >= t_measure:
                latency = done - sent if reply is not None and reply.ok else INF
                lat.append(latency)
                rec.add(reply, latency)
            if reply is None:
                await asyncio.sleep(0.01)  # a dead server must not spin this loop

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    window = now() - t_measure
    result = RunResult(
        mode="closed",
        requests=len(lat),
        window_s=window,
        latencies_s=lat,
        client_cpu_s=time.process_time() - cpu0,
        machine_cpu_s=_busy_since(busy0),
        total_calls=calls,
        concurrency=concurrency,
        connections=getattr(client, "connections_opened", 0),
    )
    return rec.fill(result)


async def serial(
    client: Client, n: int, *, warmup: int = 0, keep_timing: bool = False
) -> RunResult:
    """One client, one request at a time, `warmup` unrecorded requests first."""
    rec = _Recorder(keep_timing)
    lat: list[float] = []
    cpu0, busy0 = time.process_time(), machine_busy_s()
    t_start = now()
    for i in range(warmup + n):
        if i == warmup:
            t_start = now()
        try:
            reply: Reply | None = await client.call(i)
        except Exception:
            reply = None
        if i >= warmup:
            latency = reply.done - reply.sent if reply is not None and reply.ok else INF
            lat.append(latency)
            rec.add(reply, latency)
    result = RunResult(
        mode="serial",
        requests=n,
        window_s=now() - t_start,
        latencies_s=lat,
        client_cpu_s=time.process_time() - cpu0,
        machine_cpu_s=_busy_since(busy0),
        total_calls=warmup + n,
        concurrency=1,
        connections=getattr(client, "connections_opened", 0),
    )
    return rec.fill(result)
