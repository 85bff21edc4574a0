"""Per-arm request statistics for rollout analysis.

Each ingress replica counts requests (and errors, latency buckets, shadow outcomes) per
model version in memory (`StatsRecorder`, on the request path: no I/O) and flushes them
once a second into 1 s buckets in Redis (`StatsStore.flush`, one pipeline); analysis
sums the buckets of a window across every replica (`StatsStore.window`).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serving import keys
from serving.redis_conn import LazyClient

# Latency buckets (seconds) for the per-arm p99 estimate; upper bounds.
STAT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BUCKET_S = 1


@dataclass
class ArmStats:
    """Counters for one version over a window."""

    n: int = 0
    errors: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * (len(STAT_BUCKETS_S) + 1))
    shadow_n: int = 0
    shadow_errors: int = 0
    shadow_agree: int = 0
    labeled: int = 0
    correct: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.n if self.n else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labeled if self.labeled else None

    def p99_ms(self) -> float:
        """Upper bound of the bucket holding the 99th percentile (inf past the last)."""
        if not self.n:
            return 0.0
        rank = math.ceil(0.99 * self.n)
        seen = 0
        for i, count in enumerate(self.hist):
            seen += count
            if seen >= rank:
                return STAT_BUCKETS_S[i] * 1000 if i < len(STAT_BUCKETS_S) else math.inf
        return math.inf

    def add(self, other: ArmStats) -> None:
        self.n += other.n
        self.errors += other.errors
        self.hist = [a + b for a, b in zip(self.hist, other.hist)]
        self.shadow_n += other.shadow_n
        self.shadow_errors += other.shadow_errors
        self.shadow_agree += other.shadow_agree
        self.labeled += other.labeled
        self.correct += other.correct

    def to_fields(self) -> dict[str, int]:
        out = {
            "n": self.n,
            "err": self.errors,
            "sn": self.shadow_n,
            "serr": self.shadow_errors,
            "sagree": self.shadow_agree,
        }
        out.update({f"h{i}": c for i, c in enumerate(self.hist) if c})
        return {k: v for k, v in out.items() if v}

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> ArmStats:
        s = cls(int(raw.get("n", 0)), int(raw.get("err", 0)))
        s.hist = [int(raw.get(f"h{i}", 0)) for i in range(len(STAT_BUCKETS_S) + 1)]
        s.shadow_n, s.shadow_errors = int(raw.get("sn", 0)), int(raw.get("serr", 0))
        s.shadow_agree = int(raw.get("sagree", 0))
        s.labeled, s.correct = int(raw.get("ln", 0)), int(raw.get("lc", 0))
        return s

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.n,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 5),
            "p99_ms": self.p99_ms(),
        }
        if self.labeled:
            out["accuracy"] = round(self.correct / self.labeled, 5)
            out["labels"] = self.labeled
        if self.shadow_n:
            out["shadow"] = {
                "requests": self.shadow_n,
                "errors": self.shadow_errors,
                "agreement": round(
                    self.shadow_agree / max(self.shadow_n - self.shadow_errors, 1), 5
                ),
            }
        return out


class StatsRecorder:
    """In-memory per-(model, version) counters, drained by `drain` once a second."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], ArmStats] = {}

    def _arm(self, model: str, version: str) -> ArmStats:
        s = self._pending.get((model, version))
        if s is None:
            s = self._pending[(model, version)] = ArmStats()
        return s

    def request(self, model: str, version: str, latency_s: float, error: bool) -> None:
        s = self._arm(model, version)
        s.n += 1
        s.errors += int(error)
        s.hist[bisect.bisect_left(STAT_BUCKETS_S, latency_s)] += 1

    def shadow(self, model: str, version: str, *, error: bool, agree: bool) -> None:
        s = self._arm(model, version)
        s.shadow_n += 1
        s.shadow_errors += int(error)
        s.shadow_agree += int(agree and not error)

    def drain(self) -> dict[tuple[str, str], ArmStats]:
        pending, self._pending = self._pending, {}
        return pending


def bucket_start(ts: float) -> int:
    return int(ts // BUCKET_S) * BUCKET_S


def window_buckets(start: float, end: float) -> Iterable[int]:
    return range(bucket_start(start), bucket_start(end) + 1, BUCKET_S)


class StatsStore:
    """The recorder of this replica, and the statistics of all replicas in Redis."""

    def __init__(self, redis: LazyClient, namespace: str) -> None:
        self._redis = redis
        self._ns = namespace
        self.recorder = StatsRecorder()

    async def flush(self) -> None:
        """This replica's last second of per-arm statistics, in one pipeline."""
        pending = self.recorder.drain()
        if not pending:
            return
        bucket = bucket_start(time.time())
        pipe = self._redis().pipeline(transaction=False)
        for (model, version), stats in pending.items():
            key = keys.stats(self._ns, model, version, bucket)
            for f, v in stats.to_fields().items():
                pipe.hincrby(key, f, v)
            pipe.expire(key, keys.STATS_TTL_S)
        await pipe.execute()

    async def window(self, model: str, version: str, start: float, end: float) -> ArmStats:
        """Every replica's figures for one version between `start` and `end`."""
        pipe = self._redis().pipeline(transaction=False)
        for b in window_buckets(start, end):
            pipe.hgetall(keys.stats(self._ns, model, version, b))
        total = ArmStats()
        for raw in await pipe.execute():
            if raw:
                total.add(ArmStats.from_fields(raw))
        return total
