"""Online features: the spec in the manifest, and the one transformation that turns
raw fields plus stored features into a model's input vector.

Each entity of a view is a Redis hash (key: serving.keys.feature):
    field "<feature name>" → the value as a decimal string
    field "_ts"            → unix seconds of the last update (for max_age_s)

`build_vectors` is the single code path from raw records to model inputs: training
(models/train_fraud.py) and serving (the gateway) both call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

TS_FIELD = "_ts"


class StoredFeature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: Literal["float32", "float64", "int64", "int32"] = "float32"
    default: float = 0.0


class FeatureView(BaseModel):
    """Features stored per entity, looked up by the instance field `entity`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    entity: str
    features: list[StoredFeature] = Field(min_length=1)
    max_age_s: float | None = Field(default=None, gt=0)


class RequestField(BaseModel):
    """A raw value the caller sends with each instance."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: Literal["float32", "float64", "int64", "int32"] = "float32"
    min: float | None = None
    max: float | None = None


class FeatureConfig(BaseModel):
    """`features:` in a manifest. The model input `input` is built column by column:
    a column named `<view>.<feature>` comes from the store, any other from the request."""

    model_config = ConfigDict(extra="forbid")

    input: str
    policy: Literal["default", "reject"] = "default"
    request: list[RequestField] = Field(default_factory=list)
    views: list[FeatureView] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> FeatureConfig:
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            raise ValueError("view names must be unique")
        return self

    def view(self, name: str) -> FeatureView:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(name)

    def resolve_columns(self, columns: Sequence[str]) -> list[tuple[str, str, float]]:
        """Each column as (source, name, default): source is "request" or a view name.
        Raises ValueError naming a column that nothing provides."""
        request = {f.name for f in self.request}
        stored = {(v.name, f.name): f.default for v in self.views for f in v.features}
        out: list[tuple[str, str, float]] = []
        for col in columns:
            view, dot, feat = col.partition(".")
            if dot and (view, feat) in stored:
                out.append((view, feat, stored[(view, feat)]))
            elif col in request:
                out.append(("request", col, math.nan))
            else:
                raise ValueError(f"column {col!r} is neither a request field nor a stored feature")
        return out

    def instance_fields(self) -> list[str]:
        """The fields an instance carries: entity keys, then request fields."""
        keys = list(dict.fromkeys(v.entity for v in self.views))
        return keys + [f.name for f in self.request]


def build_vectors(
    columns: Sequence[tuple[str, str, float]],
    raw: Sequence[Mapping[str, Any]],
    stored: Mapping[str, Sequence[Mapping[str, float] | None]],
    dtype: str = "float32",
) -> np.ndarray:
    """The model input for each raw record.

    `columns` comes from `FeatureConfig.resolve_columns`; `stored[view][i]` holds the
    features of record i's entity in that view, or None when absent (defaults apply).
    """
    out = np.empty((len(raw), len(columns)), dtype=np.float64)
    for j, (source, name, default) in enumerate(columns):
        if source == "request":
            out[:, j] = [r[name] for r in raw]
        else:
            rows = stored[source]
            out[:, j] = [default if row is None else row.get(name, default) for row in rows]
    return out.astype(dtype, copy=False)
