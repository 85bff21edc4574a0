"""What a straightforward service does with our artifacts: the request handling shared by
both baselines (the naive Ray Serve app and the single uvicorn process).

Deliberately plain, as a first version would be written: the stdlib JSON body, one
`HGETALL` per entity awaited one after another, `serving.features.spec.build_vectors` (the
one transformation), the runtime, and a dict for FastAPI to serialize. No validation
beyond what numpy does, no deadlines, no batching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from serving import keys
from serving.features.spec import TS_FIELD, build_vectors
from serving.models.registry import Manifest, Registry
from serving.models.runtimes import Arrays, Runtime, RuntimeOptions, load_runtime


class FeatureModel:
    """A model whose input is built from entity keys, request fields and Redis."""

    def __init__(self, manifest: Manifest, redis_url: str, namespace: str) -> None:
        cfg = manifest.features
        if cfg is None:
            raise ValueError(f"{manifest.name}/{manifest.version} has no features section")
        self.input = cfg.input
        self._dtype = manifest.inputs[0].dtype
        self._columns = cfg.resolve_columns(manifest.inputs[0].columns or [])
        self._views = [(v.name, v.entity) for v in cfg.views]
        self._url = redis_url
        self._namespace = namespace
        self._redis: aioredis.Redis | None = None  # made lazily inside the running loop

    async def vectors(self, instances: list[dict[str, Any]]) -> np.ndarray:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(self._url, decode_responses=True)
        stored: dict[str, list[dict[str, float] | None]] = {v: [] for v, _ in self._views}
        for inst in instances:
            for view, entity in self._views:
                key = keys.feature(self._namespace, view, str(inst[entity]))
                h = await self._redis.hgetall(key)
                values = {k: float(x) for k, x in h.items() if k != TS_FIELD}
                stored[view].append(values or None)
        return build_vectors(self._columns, instances, stored, self._dtype)


def tensor_input(manifest: Manifest, instances: list[Any]) -> np.ndarray:
    """A plain model's single input from JSON instances."""
    return np.asarray(instances, dtype=manifest.inputs[0].dtype)


def answer(outputs: Arrays) -> dict[str, Any]:
    """`{"predictions": [{output name: value}, ...]}`, the gateway's answer shape."""
    n = len(next(iter(outputs.values())))
    return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(n)]}


def manifest(registry: Path, model: str, version: str) -> Manifest:
    return Registry(registry).get(model, version).manifest


def runtime(registry: Path, model: str, version: str, device: str = "cpu") -> Runtime:
    """The same runtime, with the same thread settings, as the gateway's replicas."""
    opts = RuntimeOptions(device="cuda" if device == "cuda" else "cpu")
    return load_runtime(Registry(registry).get(model, version), opts)
