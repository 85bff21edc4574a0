"""The feature step: validated records → stored features (one Redis round trip) →
the model's input vectors, with the model's policy applied to whatever was missing,
stale or unreachable (`default`: defaults and a degraded answer; `reject`: 503/422)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from serving.errors import FeatureStoreUnavailable, InvalidInput, ServingError
from serving.features.spec import FeatureConfig, build_vectors
from serving.features.store import Problem, RedisFeatureStore, Stored
from serving.models.registry import Arrays, Manifest
from serving.settings import Settings


class FeatureSource(Protocol):
    """Stored features for each record and view (None where absent), and the entities
    that were not a fresh hit: one round trip, under its own deadline."""

    async def lookup(
        self, cfg: FeatureConfig, raw: Sequence[Mapping[str, Any]]
    ) -> tuple[Stored, list[Problem]]: ...


class FeatureStep:
    def __init__(self, settings: Settings, store: FeatureSource | None = None) -> None:
        self._settings = settings
        self._store = store  # made on first use, inside the running loop
        # Column plan of each version's input: resolved once per version.
        self._columns: dict[tuple[str, str], list[tuple[str, str, float]]] = {}

    def store(self) -> FeatureSource:
        if self._store is None:
            s = self._settings
            self._store = RedisFeatureStore(
                s.redis_url,
                s.redis_namespace,
                timeout_s=s.feature_timeout_s,
                cache_ttl_s=s.feature_cache_ttl_s,
                max_connections=s.redis_max_connections,
            )
        return self._store

    async def vectors(
        self, model: str, version: str, manifest: Manifest, raw: list[dict[str, Any]]
    ) -> tuple[Arrays, list[str]]:
        """The model's input built from `raw` and the store, and why it is degraded
        ("<view>:<outcome>:<entity>", at most 10; empty when it is not)."""
        cfg = manifest.features
        assert cfg is not None
        stored, problems = await self.store().lookup(cfg, raw)
        degraded: list[str] = []
        if problems:
            if cfg.policy == "reject":
                raise _rejection(cfg.view(problems[0].view).entity, problems)
            degraded = [f"{p.view}:{p.outcome}:{p.entity}" for p in problems[:10]]
        key = (model, version)
        columns = self._columns.get(key)
        if columns is None:
            columns = self._columns[key] = cfg.resolve_columns(manifest.inputs[0].columns or [])
        vectors = build_vectors(columns, raw, stored, manifest.inputs[0].dtype)
        return {cfg.input: vectors}, degraded


def _rejection(entity_field: str, problems: list[Problem]) -> ServingError:
    p = next((p for p in problems if p.outcome in ("timeout", "error")), problems[0])
    if p.outcome in ("timeout", "error"):
        return FeatureStoreUnavailable(
            f"feature store {p.outcome} for view {p.view!r} (entity {p.entity!r}); "
            "this model's policy rejects requests without features"
        )
    return InvalidInput(
        f"{p.outcome} features for {entity_field}={p.entity!r} in view {p.view!r}",
        field=f"instances[{p.index}].{entity_field}",
    )
