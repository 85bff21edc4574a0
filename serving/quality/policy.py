"""A model's retraining policy: the `retrain` block of a deployment file's model
(schema only; serving.quality.retrain acts on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
