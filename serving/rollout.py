"""Canary rollouts: state, persistence in Redis, per-arm statistics and analysis.

State lives in Redis so every ingress replica converges on a change (pub/sub, plus a
reload every second as a safety net) and a restart loses nothing:
    <ns>:routing:<model>            JSON RoutingTable
    <ns>:rollout:<model>            JSON RolloutState
    <ns>:rollout:<model>:history    list of JSON Decisions, newest first
    <ns>:stats:<model>:<version>:<t> hash of counters for a 1 s bucket (1 h TTL)
    <ns>:routing-updates            pub/sub channel: a model name per change
The request path never touches Redis for routing: it reads the in-memory tables.
Statistics are counted in memory and flushed once a second in one pipeline.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Latency buckets (seconds) for the per-arm p99 estimate; upper bounds.
STAT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BUCKET_S = 1
STATS_TTL_S = 3600

Status = Literal["idle", "running", "paused", "completed", "rolled_back"]
Action = Literal[
    "start", "advance", "hold", "rollback", "complete", "pause", "resume", "promote",
    "set_weight", "shadow",
]  # fmt: skip


class RolloutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    interval_s: float = Field(default=60.0, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p99_ms: float | None = Field(default=None, gt=0)
    min_requests: int = Field(default=100, ge=1)
    # Once both arms have `min_labels` delayed labels in the window, the canary's
    # accuracy may trail stable's by at most this much.
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    min_labels: int = Field(default=50, ge=1)
    sticky_key: str | None = None

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("steps must be increasing percentages in (0, 100]")
        return steps


class Decision(BaseModel):
    ts: float
    action: Action
    actor: Literal["auto", "admin"]
    reason: str
    weight: float
    figures: dict[str, Any] = Field(default_factory=dict)


class RolloutState(BaseModel):
    model: str
    status: Status = "idle"
    spec: RolloutSpec | None = None
    stable: str | None = None
    step: int = 0  # index into spec.steps
    window_start: float = 0.0  # figures are taken since the last decision


# ---- statistics ------------------------------------------------------------------------
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


# ---- analysis (pure) -------------------------------------------------------------------
def analyze(spec: RolloutSpec, step: int, canary: ArmStats, stable: ArmStats) -> tuple[Action, str]:
    """Advance, hold or roll back, with the reason. No decision before min_requests on
    each arm; failed checks roll back; passing the last step completes."""
    if canary.n < spec.min_requests or stable.n < spec.min_requests:
        return "hold", (
            f"waiting for {spec.min_requests} requests per arm "
            f"(canary {canary.n}, stable {stable.n})"
        )
    if canary.error_rate > spec.max_error_rate:
        return "rollback", (
            f"canary error rate {canary.error_rate:.2%} > max {spec.max_error_rate:.2%} "
            f"(stable {stable.error_rate:.2%})"
        )
    if spec.max_p99_ms is not None and canary.p99_ms() > spec.max_p99_ms:
        return "rollback", (
            f"canary p99 {canary.p99_ms():.0f} ms > max {spec.max_p99_ms:.0f} ms "
            f"(stable {stable.p99_ms():.0f} ms)"
        )
    if (
        spec.max_accuracy_drop is not None
        and canary.labeled >= spec.min_labels
        and stable.labeled >= spec.min_labels
    ):
        c_acc, s_acc = canary.accuracy or 0.0, stable.accuracy or 0.0
        if c_acc < s_acc - spec.max_accuracy_drop:
            return "rollback", (
                f"canary accuracy {c_acc:.2%} < stable {s_acc:.2%} - "
                f"{spec.max_accuracy_drop:.2%} ({canary.labeled} labels)"
            )
    checks = f"error rate {canary.error_rate:.2%} <= {spec.max_error_rate:.2%}"
    if spec.max_p99_ms is not None:
        checks += f", p99 {canary.p99_ms():.0f} ms <= {spec.max_p99_ms:.0f} ms"
    if step + 1 >= len(spec.steps):
        return "complete", f"last step passed ({checks})"
    return "advance", f"step {spec.steps[step]:g}% passed ({checks})"


def agreement(a: dict[str, Any], b: dict[str, Any], names: list[str]) -> list[bool]:
    """Per instance, whether two answers agree: on `label` when the model has one,
    else on every output within a small tolerance."""
    import numpy as np

    keys = ["label"] if "label" in names else names
    n = len(next(iter(a.values())))
    agree = np.ones(n, dtype=bool)
    for k in keys:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape:
            return [False] * n
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            close = np.isclose(x, y, rtol=1e-3, atol=1e-4)
        else:
            close = x == y
        agree &= close.reshape(n, -1).all(axis=1)
    return [bool(v) for v in agree]
