"""Latency-aware autoscaling: a Ray Serve custom autoscaling policy.

Each ModelReplica reports, through `record_autoscaling_stats`, the p95 of queue wait
plus inference over its last few seconds. Ray Serve's controller aggregates those per
replica and calls this policy, which adds a replica while the worst replica's p95 is
above the version's SLO, removes one when every replica is well below it (and the
ongoing load is low), and otherwise holds — always within the configured bounds. Ray
applies its own upscale/downscale delays on top, so one slow batch does not scale.
Every decision is logged and exported (`serving_autoscaling_*`).
"""

from __future__ import annotations

import logging
from typing import Any

from serving.observability.metrics import metrics

log = logging.getLogger(__name__)

P95_METRIC = "serving_p95_s"


class LatencyPolicy:
    """Ray Serve autoscaling policy class (`policy_kwargs` go to the constructor)."""

    def __init__(self, model: str, version: str, slo_ms: float, low_ratio: float = 0.3) -> None:
        self.model = model
        self.version = version
        self.slo_s = slo_ms / 1000
        self.low_ratio = low_ratio

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = int(ctx.current_num_replicas)
        lo, hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
        per_replica = (ctx.aggregated_metrics or {}).get(P95_METRIC, {})
        p95 = max(per_replica.values(), default=0.0)
        if p95 > self.slo_s:
            target, direction = min(current + 1, hi), "up"
        elif p95 < self.low_ratio * self.slo_s and current > lo:
            target, direction = max(current - 1, lo), "down"
        else:
            target, direction = current, "hold"
        target = min(max(target, lo), hi)
        if target == current:
            direction = "hold"
        tags = {"model": self.model, "version": self.version}
        m = metrics()
        m.autoscaling_decisions.inc(1, tags={**tags, "direction": direction})
        m.autoscaling_target.set(target, tags=tags)
        m.replica_p95.set(p95, tags=tags)
        if direction != "hold":
            log.info(
                "autoscaling %s/%s: %s %d -> %d (p95 %.1f ms, SLO %.1f ms)",
                self.model,
                self.version,
                direction,
                current,
                target,
                p95 * 1000,
                self.slo_s * 1000,
            )
        state = dict(ctx.policy_state or {})
        state["last"] = {"p95_s": p95, "target": target, "direction": direction}
        return target, state
