import math

import pytest

from serving.rollouts.analysis import RolloutSpec, analyze
from serving.rollouts.stats import ArmStats, StatsRecorder


def arm(n: int, errors: int = 0, latency_s: float = 0.004) -> ArmStats:
    rec = StatsRecorder()
    for i in range(n):
        rec.request("m", "v", latency_s, error=i < errors)
    return rec.drain()[("m", "v")]


SPEC = RolloutSpec(
    to="v2", steps=[5, 50, 100], min_requests=50, max_error_rate=0.02, max_p99_ms=100
)


def test_no_decision_before_min_requests_on_each_arm() -> None:
    action, reason = analyze(SPEC, 0, arm(49, errors=49), arm(500))
    assert action == "hold" and "canary 49" in reason
    assert analyze(SPEC, 0, arm(500), arm(10))[0] == "hold"


def test_error_rate_and_latency_roll_back() -> None:
    action, reason = analyze(SPEC, 0, arm(100, errors=10), arm(100))
    assert action == "rollback" and "error rate 10.00% > max 2.00%" in reason
    action, reason = analyze(SPEC, 0, arm(100, latency_s=0.4), arm(100))
    assert action == "rollback" and "p99 500 ms > max 100 ms" in reason


def test_healthy_canary_advances_then_completes() -> None:
    assert analyze(SPEC, 0, arm(100), arm(100))[0] == "advance"
    assert analyze(SPEC, 1, arm(100), arm(100))[0] == "advance"
    assert analyze(SPEC, 2, arm(100), arm(100))[0] == "complete"


def test_p99_estimate_and_serialisation() -> None:
    s = arm(100, latency_s=0.004)
    assert s.p99_ms() == 5.0
    s.add(arm(5, latency_s=10.0))
    assert s.p99_ms() == math.inf
    back = ArmStats.from_fields({k: str(v) for k, v in s.to_fields().items()})
    assert (back.n, back.errors, back.hist) == (s.n, s.errors, s.hist)


def test_steps_must_increase() -> None:
    with pytest.raises(ValueError):
        RolloutSpec(to="v2", steps=[50, 5])
    with pytest.raises(ValueError):
        RolloutSpec(to="v2", steps=[0, 50])


def _labelled(n: int, labeled: int, correct: int) -> ArmStats:
    s = arm(n)
    s.labeled, s.correct = labeled, correct
    return s


def test_a_canary_that_must_be_judged_on_labels_holds_until_they_come() -> None:
    spec = RolloutSpec(
        to="r1", steps=[50, 100], min_requests=20, max_accuracy_drop=0.05, min_labels=40,
        require_labels=True,
    )  # fmt: skip
    action, reason = analyze(spec, 0, _labelled(100, 39, 39), _labelled(100, 500, 300))
    assert action == "hold" and "waiting for 40 labels per arm (canary 39" in reason
    # Without require_labels the same figures advance on errors and latency alone.
    lax = spec.model_copy(update={"require_labels": False})
    assert analyze(lax, 0, _labelled(100, 39, 0), _labelled(100, 500, 300))[0] == "advance"
    # Labelled: better than stable advances, far worse rolls back.
    assert analyze(spec, 0, _labelled(100, 40, 38), _labelled(100, 500, 300))[0] == "advance"
    action, reason = analyze(spec, 0, _labelled(100, 40, 4), _labelled(100, 500, 300))
    assert action == "rollback" and "canary accuracy 10.00% < stable 60.00%" in reason


def test_at_100_percent_the_canary_is_judged_alone_against_stables_earlier_accuracy() -> None:
    """Stable serves nothing at a 100 % step: waiting for its requests would hold the
    rollout for ever (with little traffic); its accuracy from before stands in."""
    spec = RolloutSpec(
        to="r1", steps=[50, 100], min_requests=20, max_accuracy_drop=0.05, min_labels=30,
        require_labels=True,
    )  # fmt: skip
    idle = ArmStats()
    assert analyze(spec, 1, _labelled(100, 40, 38), idle, 0.6)[0] == "complete"
    assert analyze(spec, 1, _labelled(100, 29, 29), idle, 0.6)[0] == "hold"
    action, reason = analyze(spec, 1, _labelled(100, 40, 4), idle, 0.6)
    assert action == "rollback" and "stable 60.00%" in reason
    # Without an earlier figure, only errors and latency decide.
    assert analyze(spec, 1, _labelled(100, 40, 4), idle, None)[0] == "complete"
    # Below 100 %, stable must still show up.
    assert analyze(spec, 0, _labelled(100, 40, 38), idle, 0.6)[0] == "hold"
