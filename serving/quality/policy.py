"""A model's retraining policy: the `retrain` block of a deployment file's model, and
the pure decisions made from it (serving.quality.retrain acts on them)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.errors import ConfigError

PSI_FRESH_S = 30.0  # a replica's published PSIs older than this are ignored
MIN_PSI_ROWS = 500  # PSIs over fewer rows in a replica's window are too noisy to act on


class AccuracyTrigger(BaseModel):
    """Retrain when the stable version's accuracy from delayed labels over the last
    `window_s` trails the reference by more than `drop` (0.05: five points), once at
    least `min_labels` labels arrived in the window. The reference is the held-out
    accuracy the version's manifest recorded at training (`training`), or its own
    accuracy over the `reference_window_s` before the window (`window`)."""

    model_config = ConfigDict(extra="forbid")

    drop: float = Field(gt=0, le=1)
    min_labels: int = Field(default=200, ge=1)
    window_s: float = Field(default=600.0, ge=60)
    reference: Literal["training", "window"] = "training"
    reference_window_s: float = Field(default=3600.0, ge=60)


class DriftTrigger(BaseModel):
    """Retrain when the PSI of any monitored input feature of the stable version stays
    above `psi` for `for_s` seconds (as every ingress replica measures it)."""

    model_config = ConfigDict(extra="forbid")

    psi: float = Field(default=0.2, gt=0)
    for_s: float = Field(default=300.0, ge=0)


class RetrainPolicy(BaseModel):
    """When and how a model retrains itself (serving.quality.retrain). The command runs
    with `{python}`, `{model}`, `{version}` (the new one), `{output}` (its registry
    folder, which the command fills), `{base}` (the stable version's folder),
    `{registry}`, `{since}` (ISO time, `data_since_s` ago) and `{log_dsn}` replaced."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    timeout_s: float = Field(default=900.0, gt=0)
    cooldown_s: float = Field(default=3600.0, ge=0)  # between two retrains of the model
    check_every_s: float = Field(default=30.0, gt=0)
    data_since_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    accuracy: AccuracyTrigger | None = None
    drift: DriftTrigger | None = None
    # The canary rollout of the new version: RolloutSpec's fields but `to`.
    rollout: dict[str, Any] = Field(default_factory=dict)
    version_prefix: str = Field(default="r", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,20}$")
    # `local`: the new version lives in the registry folder only; `mlflow`: it is also
    # logged and registered in MLflow (ONNX versions) as `mlflow_name` (default: the
    # model's name), with `mlflow_alias` pointing at it.
    register_to: Literal["local", "mlflow"] = "local"
    mlflow_name: str | None = None
    mlflow_alias: str | None = Field(default="challenger", pattern=r"^[A-Za-z][\w-]{0,62}$")
    # Where the command runs; relative to the directory `serving up` runs in (its
    # default), as the registry path is.
    workdir: Path | None = None

    @model_validator(mode="after")
    def _has_a_trigger(self) -> RetrainPolicy:
        if self.accuracy is None and self.drift is None:
            raise ValueError("needs an `accuracy` or a `drift` trigger (or both)")
        if "to" in self.rollout:
            raise ValueError("rollout.to is the retrained version: leave it out")
        return self


# ---- triggers (pure) ---------------------------------------------------------------------
def accuracy_reason(
    policy: AccuracyTrigger,
    window: list[tuple[int, int, int]],
    reference: float | None,
    reference_what: str,
) -> str | None:
    """Why accuracy calls for retraining, or None. `window`: (minute, labelled, correct)
    buckets of the last `window_s`."""
    n = sum(b[1] for b in window)
    c = sum(b[2] for b in window)
    if reference is None or n < policy.min_labels:
        return None
    acc = c / n
    if acc >= reference - policy.drop:
        return None
    return (
        f"accuracy {acc:.1%} over the last {policy.window_s:g}s ({n} labels) is "
        f"{reference - acc:.1%} below the {reference_what} {reference:.1%} "
        f"(allowed {policy.drop:.1%})"
    )


def worst_psi(published: Mapping[Any, Any], now: float) -> tuple[str, float] | None:
    """The highest feature PSI any replica published lately (over enough rows)."""
    worst: tuple[str, float] | None = None
    for doc in published.values():
        entry = json.loads(doc)
        if now - entry["ts"] > PSI_FRESH_S or entry.get("rows", 0) < MIN_PSI_ROWS:
            continue
        for name, value in entry["features"].items():
            if worst is None or value > worst[1]:
                worst = (name, float(value))
    return worst


def next_version(existing: list[str], prefix: str) -> str:
    """`<prefix><n>`, one past the highest such version already in the registry."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    taken = [int(m.group(1)) for v in existing if (m := pattern.match(v))]
    return f"{prefix}{max(taken, default=0) + 1}"


def command_line(policy: RetrainPolicy, values: dict[str, str]) -> list[str]:
    """The policy's command with its placeholders filled; an unknown or unset one is a
    ConfigError naming it."""
    out = []
    for arg in policy.command:
        try:
            out.append(arg.format_map(values))
        except KeyError as exc:
            raise ConfigError(
                f"retrain command: unknown placeholder {{{exc.args[0]}}} in {arg!r}"
            ) from None
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"retrain command: cannot fill {arg!r}: {exc}") from None
    return out
