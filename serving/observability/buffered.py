"""Request-path metrics, summed in the process and handed to Ray once a second.

A Ray metric call costs microseconds of CPU in the caller and more in the node's
metrics agent (the README's benchmarks have the figures); a request records a dozen.
So the request path only adds to plain Python sums here, and `flush` (every
FLUSH_EVERY_S, from a background task of each process that records) hands them over:

- `BufferedCounter`: per tag set, the increments since the last flush, as one
  `Counter.inc`.
- `BufferedHistogram`: per tag set, cumulative bucket counts, sum and count, exported as
  Ray gauges named `<name>_bucket` (label `le`, Prometheus' bucket bounds, `+Inf` last),
  `<name>_sum` and `<name>_count`: the series a Prometheus histogram has, so
  `histogram_quantile` and `rate` read them as one. Every series is set at every flush
  (Ray exports a gauge only while it is set), zeros included, from its first
  observation on.

Invariant: nothing recorded is lost by buffering but what a process holds when it dies
(at most one flush interval's worth).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence

from ray.util.metrics import Counter, Gauge

from serving.background import every

FLUSH_EVERY_S = 1.0

_ALL: list[BufferedCounter | BufferedHistogram] = []
_flusher: asyncio.Task[None] | None = None


class BufferedCounter:
    def __init__(self, name: str, description: str, tag_keys: Sequence[str]) -> None:
        self._keys = tuple(tag_keys)
        self._counter = Counter(name, description=description, tag_keys=self._keys)
        self._pending: dict[tuple[str, ...], float] = {}
        _ALL.append(self)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.add(value, *map((tags or {}).__getitem__, self._keys))

    def add(self, value: float, *labels: str) -> None:
        """`inc` with the label values given in `tag_keys` order (no dict to build)."""
        self._pending[labels] = self._pending.get(labels, 0.0) + value

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for key, value in pending.items():
            if value > 0:
                self._counter.inc(value, tags=dict(zip(self._keys, key)))


class BufferedHistogram:
    def __init__(
        self,
        name: str,
        description: str,
        boundaries: Sequence[float],
        tag_keys: Sequence[str] = (),
    ) -> None:
        self._keys = tuple(tag_keys)
        self._bounds = list(boundaries)
        self._le = [repr(float(b)) for b in self._bounds] + ["+Inf"]
        what = f"{description} (cumulative, as a Prometheus histogram's series)"
        self._buckets = Gauge(f"{name}_bucket", description=what, tag_keys=(*self._keys, "le"))
        self._sum = Gauge(f"{name}_sum", description=what, tag_keys=self._keys)
        self._count = Gauge(f"{name}_count", description=what, tag_keys=self._keys)
        # Per tag set: observations per bucket (the last one past every bound), then
        # the sum of the values.
        self._series: dict[tuple[str, ...], list[float]] = {}
        _ALL.append(self)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.record(value, *map((tags or {}).__getitem__, self._keys))

    def record(self, value: float, *labels: str) -> None:
        """`observe` with the label values given in `tag_keys` order."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
        series[bisect.bisect_left(self._bounds, value)] += 1
        series[-1] += value

    def flush(self) -> None:
        for key, series in self._series.items():
            tags = dict(zip(self._keys, key))
            cumulative = 0.0
            for le, n in zip(self._le, series):
                cumulative += n
                self._buckets.set(cumulative, tags={**tags, "le": le})
            self._count.set(cumulative, tags=tags)
            self._sum.set(series[-1], tags=tags)


def flush() -> None:
    """Hand every buffered metric of this process to Ray."""
    for metric in _ALL:
        metric.flush()


def ensure_flushing() -> None:
    """Flush every FLUSH_EVERY_S from the running loop (once per process)."""
    global _flusher
    if _flusher is None or _flusher.done():

        async def step() -> None:
            flush()

        _flusher = asyncio.get_running_loop().create_task(
            every(FLUSH_EVERY_S, step, "flushing metrics")
        )
