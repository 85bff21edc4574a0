"""Load shedding at the ingress: inference requests in flight in this ingress replica,
all transports together (HTTP either mode, gRPC). Past the limit a request is refused at
once (503 overloaded with Retry-After; gRPC UNAVAILABLE) instead of queueing in the
replica's event loop.

The limit adapts to the backlog it causes (additive increase, multiplicative
decrease, as TCP's congestion window or Envoy's adaptive concurrency), with CoDel's
test for a standing queue: each answered request reports how long it queued (read but
not yet handled while the event loop was busy, plus its wait in the batcher). When
even the least-queued answer of an interval (INTERVAL_S) queued longer than
`target_queue_s` (over at least MIN_ANSWERS answers), the limit is cut: by target / queued,
between a tenth and a half (the deeper the queue, the faster the cut); a burst
that drains (a pause of the process, a spike) leaves some answer of the interval
unqueued and cuts nothing. An answer that did not queue, while the limit is nearly
used, raises it by 1/limit (about one per limit's worth of answers). Between MIN_LIMIT
and `max_ongoing_requests`. A fixed count alone let a replica past its CPU peak queue
hundreds of requests for seconds.

The same cut follows the event loop's own lateness: a probe sleeps LAG_PERIOD_S at a
time and reports how late it woke (`probe`); when even the least late of an interval's
probes is past `target_lag_s` while the loop's thread ran most of the interval with
requests in flight, every read (a refusal's too) waits that long for the loop, whatever
the answers report: requests in flight do the work that delays it. (Late but not busy:
the process waited for a CPU, which refusing would not give it.)

The direct HTTP server also asks `full()` before it starts a request's handler: a
prediction that arrives while the replica is full is answered 503 by the server
itself, which costs a fraction of a handled request (serving.transport.direct_http).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from serving.errors import Overloaded

MIN_LIMIT = 4.0
START_LIMIT = 64.0
INTERVAL_S = 0.1
MIN_ANSWERS = 8  # fewer answers in an interval say nothing about a standing queue
LAG_PERIOD_S = 0.005
MIN_PROBES = 5  # of an interval (INTERVAL_S / LAG_PERIOD_S when the loop keeps time)
LOOP_BUSY = 0.7  # share of an interval the loop thread ran: it is saturated


class Admission:
    def __init__(
        self, limit: int, target_queue_s: float = 0.020, target_lag_s: float = 0.005
    ) -> None:
        self.max_limit = float(limit)
        self.limit = min(START_LIMIT, self.max_limit)
        self.target_queue_s = target_queue_s
        self.target_lag_s = target_lag_s
        self._lag_start = time.monotonic()
        self._lag_cpu = time.thread_time()  # the loop thread's CPU time (probes run on it)
        self._least_lag = math.inf  # of this interval's probes
        self._probes = 0
        self.inflight: dict[str, int] = {}  # per model; read by the in-flight gauge
        self.total = 0
        # Requests a server has read whose handler has not started yet (the direct
        # HTTP server counts them): a burst read in one loop step is known to be
        # coming before the first of it runs.
        self.waiting = 0
        self._interval_start = time.monotonic()
        self._least_queued = math.inf  # of this interval's answers
        self._answers = 0  # in this interval
        # Counts a request the server refused itself (the model name from its path).
        self.on_shed: Callable[[str], None] | None = None
        # Close a refused request's connection, so that its client connects again and
        # the kernel may hand it to another ingress replica on this port (keep-alive
        # connections never move by themselves, e.g. onto a replacement replica).
        self.close_refused = False

    def full(self) -> bool:
        """Taking one more request would pass the limit."""
        return self.total + self.waiting >= self.limit

    def enter(self, model: str) -> None:
        """Count a request in, or raise Overloaded when the replica is at its limit."""
        if self.total >= self.limit:
            raise Overloaded(
                f"gateway replica at its limit of {int(self.limit)} requests in flight "
                "(adapted to its backlog; ingress.max_ongoing_requests at most); retry later"
            )
        self.inflight[model] = self.inflight.get(model, 0) + 1
        self.total += 1

    def leave(self, model: str, queued_s: float | None = None) -> None:
        """Count a request out; `queued_s`: how long it queued (None: not answered)."""
        self.inflight[model] -= 1
        self.total -= 1
        if queued_s is None:
            return
        self._answers += 1
        self._least_queued = min(self._least_queued, queued_s)
        now = time.monotonic()
        if now - self._interval_start >= INTERVAL_S:
            if self._least_queued > self.target_queue_s and self._answers >= MIN_ANSWERS:
                self._cut(self.target_queue_s / self._least_queued)
            self._interval_start, self._least_queued, self._answers = now, math.inf, 0
        if queued_s <= self.target_queue_s and self.total + 1 >= 0.8 * self.limit:
            self.limit = min(self.max_limit, self.limit + 1.0 / self.limit)

    def _cut(self, ratio: float) -> None:
        """The further past the target, the deeper the cut (by a tenth to a half)."""
        self.limit = max(MIN_LIMIT, self.limit * min(0.9, max(0.5, ratio)))

    def observe_lag(self, lag_s: float) -> None:
        """One probe: how late the loop woke it."""
        self._probes += 1
        self._least_lag = min(self._least_lag, lag_s)
        now = time.monotonic()
        if now - self._lag_start >= INTERVAL_S:
            cpu = time.thread_time()
            # Late because the loop is busy (its thread ran most of the interval) with
            # requests in flight: refusing some shortens its turns. A loop late while
            # its process waits for a CPU, or idle, has nothing to gain from refusing.
            busy = (cpu - self._lag_cpu) / (now - self._lag_start) >= LOOP_BUSY
            if (
                busy
                and self.total
                and self._probes >= MIN_PROBES
                and self._least_lag > self.target_lag_s
            ):
                self._cut(self.target_lag_s / self._least_lag)
            self._lag_start, self._lag_cpu = now, cpu
            self._least_lag, self._probes = math.inf, 0

    async def probe(self) -> None:
        """Measure the loop's lateness for the replica's life (cancel to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PERIOD_S
            await asyncio.sleep(LAG_PERIOD_S)
            self.observe_lag(max(0.0, loop.time() - due))

    def alone(self, model: str) -> bool:
        """No other request for this model is in flight here, and none is waiting to
        start."""
        return self.inflight.get(model, 0) == 1 and self.waiting <= 0
