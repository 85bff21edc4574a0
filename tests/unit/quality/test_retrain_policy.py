"""The retraining trigger's pure parts: the policy schema, the triggers, the command."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serving.errors import ConfigError
from serving.quality.policy import (
    MIN_PSI_ROWS,
    AccuracyTrigger,
    RetrainPolicy,
    accuracy_reason,
    command_line,
    next_version,
    worst_psi,
)
from serving.settings import ModelConfig


def _policy(**kw: object) -> RetrainPolicy:
    base: dict[str, object] = {"command": ["{python}", "train.py", "--out", "{output}"]}
    base.update(kw)
    return RetrainPolicy.model_validate(base)


def test_a_policy_needs_a_trigger_and_leaves_the_target_to_the_run() -> None:
    with pytest.raises(ValidationError, match="needs an `accuracy` or a `drift` trigger"):
        _policy()
    with pytest.raises(ValidationError, match=r"rollout\.to is the retrained version"):
        _policy(accuracy={"drop": 0.05}, rollout={"to": "v9"})
    with pytest.raises(ValidationError, match="command"):
        RetrainPolicy.model_validate({"command": [], "accuracy": {"drop": 0.05}})
    p = _policy(drift={"psi": 0.3, "for_s": 60})
    assert p.drift is not None and p.drift.psi == 0.3 and p.accuracy is None
    cfg = ModelConfig.model_validate(
        {"default": "v1", "versions": {"v1": {}}, "retrain": p.model_dump()}
    )
    assert cfg.retrain == p


def test_accuracy_triggers_only_past_the_drop_with_enough_labels() -> None:
    policy = AccuracyTrigger(drop=0.05, min_labels=100)
    good = [(60, 60, 58), (120, 60, 57)]  # 95.8 %
    bad = [(60, 60, 50), (120, 60, 50)]  # 83.3 %
    assert accuracy_reason(policy, good, 0.98, "training accuracy") is None
    reason = accuracy_reason(policy, bad, 0.98, "training accuracy of v2")
    assert reason is not None and "83.3%" in reason and "14.7% below" in reason
    assert "training accuracy of v2 98.0%" in reason and "120 labels" in reason
    assert accuracy_reason(policy, bad[:1], 0.98, "x") is None  # 60 < 100 labels
    assert accuracy_reason(policy, bad, None, "x") is None  # no reference recorded


def test_drift_reads_the_worst_fresh_psi_over_enough_rows() -> None:
    now = 1000.0
    published = {
        "a": json.dumps({"ts": now - 2, "rows": MIN_PSI_ROWS, "features": {"amount": 0.4}}),
        "b": json.dumps({"ts": now - 1, "rows": 5000, "features": {"amount": 0.1, "age": 0.6}}),
        "stale": json.dumps({"ts": now - 300, "rows": 5000, "features": {"amount": 9.0}}),
        "few": json.dumps({"ts": now, "rows": MIN_PSI_ROWS - 1, "features": {"amount": 9.0}}),
    }
    assert worst_psi(published, now) == ("age", 0.6)
    assert worst_psi({"stale": published["stale"]}, now) is None


def test_new_versions_count_on_from_the_highest_of_their_prefix() -> None:
    assert next_version(["v1", "v2"], "r") == "r1"
    assert next_version(["v1", "r1", "r3", "r10x", "rr2"], "r") == "r4"
    assert next_version(["auto-7"], "auto-") == "auto-8"


def test_the_command_fills_its_placeholders_and_names_an_unknown_one() -> None:
    p = _policy(accuracy={"drop": 0.05})
    argv = command_line(p, {"python": "/py", "output": "/reg/m/r1"})
    assert argv == ["/py", "train.py", "--out", "/reg/m/r1"]
    bad = _policy(accuracy={"drop": 0.05}, command=["x", "--since", "{sinse}"])
    with pytest.raises(ConfigError, match=r"unknown placeholder \{sinse\}"):
        command_line(bad, {"since": "t"})
