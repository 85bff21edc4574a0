"""Rollouts: the spec a rollout runs by, its state and decisions (kept in Redis as
JSON, keys in serving.keys), and the analysis that decides from the per-arm figures
(serving.rollouts.stats) whether the canary advances, holds or is rolled back. Pure:
no I/O here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.rollouts.stats import ArmStats

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
    # Hold each step until both arms have `min_labels` labels (a canary is judged on
    # accuracy, never promoted on latency and errors alone): what a retrained version's
    # rollout wants.
    require_labels: bool = False
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
    revision: int = 0  # the routing table's revision this decision wrote


class RolloutState(BaseModel):
    model: str
    status: Status = "idle"
    spec: RolloutSpec | None = None
    stable: str | None = None
    step: int = 0  # index into spec.steps
    window_start: float = 0.0  # figures are taken since the last decision
    # Stable's accuracy in the last window where it had min_labels: what a canary at
    # 100 % (stable takes no traffic then) is compared with.
    stable_accuracy: float | None = None


# ---- analysis (pure) -------------------------------------------------------------------
def analyze(
    spec: RolloutSpec,
    step: int,
    canary: ArmStats,
    stable: ArmStats,
    stable_accuracy: float | None = None,
) -> tuple[Action, str]:
    """Advance, hold or roll back, with the reason. No decision before min_requests on
    each arm; failed checks roll back; passing the last step completes. At a 100 % step
    stable serves nothing: the canary is judged alone, its accuracy against
    `stable_accuracy` (stable's in an earlier window) when known."""
    alone = spec.steps[step] >= 100
    if canary.n < spec.min_requests or (not alone and stable.n < spec.min_requests):
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
    labelled = canary.labeled >= spec.min_labels and (alone or stable.labeled >= spec.min_labels)
    if spec.require_labels and not labelled:
        return "hold", (
            f"waiting for {spec.min_labels} labels per arm "
            f"(canary {canary.labeled}, stable {stable.labeled})"
        )
    s_acc = stable_accuracy if alone else stable.accuracy
    if spec.max_accuracy_drop is not None and labelled and s_acc is not None:
        c_acc = canary.accuracy or 0.0
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
