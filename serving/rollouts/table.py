"""Routing tables and the choice of version: pure functions, no I/O.

A model's table names its `stable` version and optionally a `canary` with a weight
(percent, 0.01 resolution) and a `shadow` with a sample fraction. With a sticky key, a
request's arm is a function of (model, key, weight) alone, so every ingress replica and
every restart agrees; and raising the weight only moves keys from stable to canary,
never back (a key's bucket is fixed, the threshold grows).
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Arm = Literal["stable", "canary", "pinned"]
BUCKETS = 10_000  # 0.01% resolution


class RoutingTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    stable: str
    canary: str | None = None
    canary_weight: float = Field(default=0.0, ge=0, le=100)
    # Instance field (e.g. "user_id") or "header:<name>" whose value keeps a caller on
    # one arm; None: each request is assigned at random.
    sticky_key: str | None = None
    shadow: str | None = None
    shadow_sample: float = Field(default=0.0, ge=0, le=1)
    revision: int = 0  # bumped on every change; replicas keep the highest they saw

    @model_validator(mode="after")
    def _consistent(self) -> RoutingTable:
        if self.canary is None and self.canary_weight:
            raise ValueError("a canary weight needs a canary version")
        if self.canary is not None and self.canary == self.stable:
            raise ValueError("canary and stable must differ")
        return self

    def versions(self) -> set[str]:
        """Every version this table can send traffic (or copies of it) to."""
        return {v for v in (self.stable, self.canary, self.shadow) if v is not None}


def bucket(model: str, key: str) -> int:
    """A stable bucket in [0, BUCKETS) for a sticky key (same on every process)."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def choose(
    table: RoutingTable, sticky_value: str | None, rng: random.Random | None = None
) -> tuple[str, Arm]:
    """The version and arm for one request."""
    if table.canary is None or table.canary_weight <= 0:
        return table.stable, "stable"
    threshold = round(table.canary_weight * BUCKETS / 100)
    b = (
        bucket(table.model, sticky_value)
        if sticky_value is not None
        else (rng or random).randrange(BUCKETS)
    )
    return (table.canary, "canary") if b < threshold else (table.stable, "stable")


def sample_shadow(table: RoutingTable, rng: random.Random | None = None) -> str | None:
    """The shadow version when this request is sampled for a copy, else None."""
    if table.shadow is None or table.shadow_sample <= 0:
        return None
    return table.shadow if (rng or random).random() < table.shadow_sample else None
