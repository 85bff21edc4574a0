"""Per-arm request statistics for rollout analysis.

Each ingress replica counts requests (and errors, latency buckets, shadow outcomes) per
model version in memory (`StatsRecorder`, on the request path: no I/O) and flushes them
once a second into 1 s buckets in Redis (`StatsStore.flush`, one pipeline); analysis
sums the buckets of a window across every replica (`StatsStore.window`).

Redis down or hung loses nothing for MAX_UNSENT_BATCHES seconds: each second's figures
are a batch kept in memory, stamped with the bucket they belong to, until Redis has
them; past that the oldest batch is dropped and counted (`serving_dropped_rows_total`,
kind `statistics`). A batch is applied exactly once, even when it is sent again after a
reply was lost: a Lua script marks the batch's id applied (SET NX) and adds its counts
in one step.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serving import keys
from serving.observability.metrics import metrics
from serving.redis_conn import LazyClient

log = logging.getLogger(__name__)

# Latency buckets (seconds) for the per-arm p99 estimate; upper bounds.
STAT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BUCKET_S = 1
MAX_UNSENT_BATCHES = 900  # 15 minutes of one flush a second, held through an outage

# KEYS: the batch's mark, then one stats hash per arm bucket. ARGV: the TTL, then per
# hash its number of fields and those (field, increment) pairs.
_APPLY_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local a = 2
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[1])
end
return 1
"""


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


@dataclass(frozen=True)
class _Batch:
    """One flush's figures, as the arguments of _APPLY_ONCE."""

    keys: list[str]
    args: list[str | int]
    arms: int


class StatsStore:
    """The recorder of this replica, and the statistics of all replicas in Redis."""

    def __init__(self, redis: LazyClient, namespace: str) -> None:
        self._redis = redis
        self._ns = namespace
        self.recorder = StatsRecorder()
        self._unsent: collections.deque[_Batch] = collections.deque()

    def _batch(self, pending: dict[tuple[str, str], ArmStats], bucket: int) -> _Batch:
        batch_keys = [keys.stats_batch(self._ns, uuid.uuid4().hex)]
        args: list[str | int] = [keys.STATS_TTL_S]
        for (model, version), stats in pending.items():
            fields = stats.to_fields()
            batch_keys.append(keys.stats(self._ns, model, version, bucket))
            args.append(len(fields))
            for f, v in fields.items():
                args += (f, v)
        return _Batch(batch_keys, args, len(pending))

    @property
    def unsent(self) -> int:
        """Batches waiting for Redis."""
        return len(self._unsent)

    async def flush(self) -> None:
        """This replica's last second of per-arm statistics, and any earlier seconds
        Redis did not take, in one pipeline. Raises what Redis raised (kept for later)."""
        pending = self.recorder.drain()
        if pending:
            self._unsent.append(self._batch(pending, bucket_start(time.time())))
            while len(self._unsent) > MAX_UNSENT_BATCHES:
                lost = self._unsent.popleft()
                metrics().dropped_rows.add(lost.arms, "statistics")
                log.warning("dropped one second of rollout statistics: Redis unreachable")
        if not self._unsent:
            return
        sending = list(self._unsent)
        pipe = self._redis().pipeline(transaction=False)
        for batch in sending:
            pipe.eval(_APPLY_ONCE, len(batch.keys), *batch.keys, *batch.args)
        await pipe.execute()
        for _ in sending:  # only now: a batch whose fate is unknown is sent again
            self._unsent.popleft()

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
