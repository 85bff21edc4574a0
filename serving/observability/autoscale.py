"""Autoscaling: Ray Serve custom autoscaling policies over what replicas report.

Each ModelReplica reports, through `record_autoscaling_stats`, the p95 of queue wait
plus inference over its last few seconds and the requests it holds now (whichever way
they came: Serve handle or the direct channel, which Ray's default policy cannot see).
Ray Serve's controller aggregates those per replica and calls the version's policy:
- `LatencyPolicy` (a `latency_slo_ms` is set): add a replica while the worst replica's
  p95 is above the SLO, remove one when every replica is well below it, else hold;
- `OngoingPolicy` (otherwise): as many replicas as the requests in flight need at
  `target_ongoing_requests` each.
Always within the configured bounds; Ray applies its own upscale/downscale delays on
top, so one slow batch does not scale. Every decision is logged and exported
(`serving_autoscaling_*`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from serving.observability.metrics import metrics

log = logging.getLogger(__name__)

P95_METRIC = "serving_p95_s"
ONGOING_METRIC = "serving_ongoing"


class _Policy:
    """A Ray Serve autoscaling policy class (`policy_kwargs` go to the constructor)."""

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version

    def want(self, ctx: Any, current: int) -> tuple[int, str]:
        """The replicas wanted (before bounds) and what they were decided from."""
        raise NotImplementedError

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = int(ctx.current_num_replicas)
        lo, hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
        wanted, basis = self.want(ctx, current)
        target = min(max(wanted, lo), hi)
        direction = "up" if target > current else "down" if target < current else "hold"
        m = metrics()
        tags = {"model": self.model, "version": self.version}
        m.autoscaling_decisions.inc(1, tags={**tags, "direction": direction})
        m.autoscaling_target.set(target, tags=tags)
        if direction != "hold":
            log.info(
                "autoscaling %s/%s: %s %d -> %d (%s)",
                self.model,
                self.version,
                direction,
                current,
                target,
                basis,
            )
        state = dict(ctx.policy_state or {})
        state["last"] = {"basis": basis, "target": target, "direction": direction}
        return target, state


def _per_replica(ctx: Any, metric: str) -> dict[Any, float]:
    values: dict[Any, float] = (ctx.aggregated_metrics or {}).get(metric, {})
    return values


class LatencyPolicy(_Policy):
    def __init__(self, model: str, version: str, slo_ms: float, low_ratio: float = 0.3) -> None:
        super().__init__(model, version)
        self.slo_s = slo_ms / 1000
        self.low_ratio = low_ratio

    def want(self, ctx: Any, current: int) -> tuple[int, str]:
        p95 = max(_per_replica(ctx, P95_METRIC).values(), default=0.0)
        metrics().replica_p95.set(p95, tags={"model": self.model, "version": self.version})
        basis = f"p95 {p95 * 1000:.1f} ms, SLO {self.slo_s * 1000:.1f} ms"
        if p95 > self.slo_s:
            return current + 1, basis
        if p95 < self.low_ratio * self.slo_s:
            return current - 1, basis
        return current, basis


class OngoingPolicy(_Policy):
    def __init__(self, model: str, version: str, target: float) -> None:
        super().__init__(model, version)
        self.target = target

    def want(self, ctx: Any, current: int) -> tuple[int, str]:
        ongoing = sum(_per_replica(ctx, ONGOING_METRIC).values())
        return math.ceil(ongoing / self.target), f"{ongoing:.1f} requests in flight"
