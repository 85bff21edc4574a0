"""The request flow shared by every transport.

decode (validate against the manifest) → choose the version → call the version's
replica with a deadline → encode. Each stage is timed; the timings go to metrics and,
through the transport, to the client (Server-Timing). Errors are ServingErrors only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.errors import (
    DeadlineExceeded,
    FeatureStoreUnavailable,
    InvalidInput,
    ModelError,
    NotFound,
    NotReady,
    Overloaded,
    ServingError,
)
from serving.feature_store import Problem, RedisFeatureStore
from serving.features import build_vectors
from serving.metrics import metrics
from serving.registry import Manifest, Registry
from serving.schemas import (
    Arrays,
    decode_instances,
    decode_records,
    tensors_to_records,
    validate_tensors,
)
from serving.settings import DeploymentFile, Settings

log = logging.getLogger(__name__)


class ReplicaHandle(Protocol):
    """The part of a Ray Serve DeploymentHandle the pipeline uses."""

    def __getattr__(self, method: str) -> Any: ...


HandleFactory = Callable[[str, str], ReplicaHandle]


def model_app_name(model: str, version: str) -> str:
    """The Ray Serve application that hosts one model version."""
    return f"model-{model}-{version}"


@dataclass(slots=True)
class Prediction:
    """Raw output arrays; each transport encodes them its own way."""

    outputs: Arrays
    manifest: Manifest
    model: str
    version: str
    batch_size: int
    # Stage name → seconds, in the order the stages ran.
    timings: dict[str, float] = field(default_factory=dict)
    # Why default features were used ("<view>:<outcome>:<entity>"); empty when not.
    degraded: list[str] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        dep: DeploymentFile,
        settings: Settings,
        handles: HandleFactory,
        features: RedisFeatureStore | None = None,
    ) -> None:
        self._settings = settings
        self._dep = dep
        self._handles_factory = handles
        self._handles: dict[tuple[str, str], ReplicaHandle] = {}
        registry = Registry(dep.registry)
        # Manifests are read once; a bad one fails start-up with the file named.
        self.manifests: dict[tuple[str, str], Manifest] = {
            (m, v): registry.get(m, v).manifest
            for m, cfg in dep.models.items()
            for v in cfg.versions
        }
        # Column sources of feature-backed models, resolved once.
        self._columns = {
            key: m.features.resolve_columns(m.inputs[0].columns or [])
            for key, m in self.manifests.items()
            if m.features is not None
        }
        if features is None and self._columns:
            features = RedisFeatureStore(
                settings.redis_url,
                settings.feature_namespace,
                timeout_s=settings.feature_timeout_s,
                cache_ttl_s=settings.feature_cache_ttl_s,
                max_connections=settings.redis_max_connections,
            )
        self._features = features

    # ---- routing -------------------------------------------------------------------
    def resolve(self, model: str, version: str | None) -> tuple[str, Manifest]:
        cfg = self._dep.models.get(model)
        if cfg is None:
            known = ", ".join(sorted(self._dep.models)) or "none"
            raise NotFound(f"model {model!r} not found (served: {known})", field="model")
        v = version or cfg.default
        manifest = self.manifests.get((model, v))
        if manifest is None:
            known = ", ".join(sorted(cfg.versions))
            raise NotFound(
                f"version {v!r} of model {model!r} not found (served: {known})", field="version"
            )
        return v, manifest

    def _handle(self, model: str, version: str) -> ReplicaHandle:
        key = (model, version)
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = self._handles_factory(model, version)
        return h

    # ---- predict -------------------------------------------------------------------
    async def predict(
        self,
        model: str,
        version: str | None,
        instances: Any,
        *,
        timeout_s: float | None = None,
        protocol: str = "http",
    ) -> Prediction:
        """v1: TF-Serving-style JSON instances."""
        return await self._predict(model, version, instances, None, timeout_s, protocol)

    async def predict_tensors(
        self,
        model: str,
        version: str | None,
        tensors: Arrays,
        *,
        timeout_s: float | None = None,
        protocol: str = "v2",
    ) -> Prediction:
        """Open Inference Protocol: batch-first arrays keyed by input name (for a
        feature-backed model, keyed by instance field: entity keys and request fields)."""
        return await self._predict(model, version, None, tensors, timeout_s, protocol)

    async def _predict(
        self,
        model: str,
        version: str | None,
        instances: Any,
        tensors: Arrays | None,
        timeout_s: float | None,
        protocol: str,
    ) -> Prediction:
        t0 = time.perf_counter()
        deadline = min(
            timeout_s or self._settings.request_timeout_s, self._settings.request_timeout_s
        )
        limit = self._settings.max_instances
        v = version
        code = "ok"
        degraded: list[str] = []
        t_features = 0.0
        try:
            v, manifest = self.resolve(model, version)
            if manifest.features is None:
                arrays = (
                    decode_instances(manifest.inputs, instances, limit)
                    if tensors is None
                    else validate_tensors(manifest.inputs, tensors, limit)
                )
            else:
                raw = decode_records(
                    manifest.features,
                    instances if tensors is None else tensors_to_records(tensors),
                    limit,
                )
                tf = time.perf_counter()
                arrays, degraded = await self._with_features(model, v, manifest, raw)
                t_features = time.perf_counter() - tf
            t_decoded = time.perf_counter()
            result = await self._call(model, v, "predict", deadline - (t_decoded - t0), arrays)
            t_end = time.perf_counter()
        except ServingError as exc:
            code = exc.code
            raise
        finally:
            metrics().requests.inc(
                1, tags={"model": model, "version": v or "", "protocol": protocol, "code": code}
            )
        timings = {
            "decode": t_decoded - t0 - t_features,
            "features": t_features,
            "queue": result.queue_s,
            "infer": result.infer_s,
            # Ray's hop there and back plus what the replica spends outside the batch.
            "hop": max(t_end - t_decoded - result.queue_s - result.infer_s, 0.0),
            "total": t_end - t0,
        }
        m = metrics()
        tags = {"model": model, "version": v}
        m.latency.observe(timings["total"], tags={**tags, "protocol": protocol})
        for stage, secs in timings.items():
            if stage != "total":
                m.stage.observe(secs, tags={**tags, "stage": stage})
        if degraded:
            m.degraded.inc(1, tags={**tags, "reason": degraded[0].split(":")[1]})
        return Prediction(result.outputs, manifest, model, v, result.batch_size, timings, degraded)

    async def _with_features(
        self, model: str, version: str, manifest: Manifest, raw: list[dict[str, Any]]
    ) -> tuple[Arrays, list[str]]:
        """Validated records → stored features (one round trip) → vectors, applying the
        model's policy to whatever was missing, stale or unreachable."""
        cfg = manifest.features
        assert cfg is not None and self._features is not None
        stored, problems = await self._features.lookup(cfg, raw)
        degraded: list[str] = []
        if problems:
            if cfg.policy == "reject":
                raise _rejection(cfg.view(problems[0].view).entity, problems)
            degraded = [f"{p.view}:{p.outcome}:{p.entity}" for p in problems[:10]]
        vectors = build_vectors(
            self._columns[(model, version)], raw, stored, manifest.inputs[0].dtype
        )
        return {cfg.input: vectors}, degraded

    async def _call(
        self, model: str, version: str, method: str, timeout_s: float, *args: Any
    ) -> Any:
        """Call a replica method with a deadline, mapping Ray's failures to ours."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if timeout_s <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")
        try:
            handle = self._handle(model, version)
            response = getattr(handle, method).remote(*args)
        except Exception as exc:  # the version's application is not deployed (yet)
            raise NotReady(f"{model}/{version} is not available: {exc}") from None
        try:
            return await asyncio.wait_for(_wait(response), timeout_s)
        except TimeoutError:
            response.cancel()
            raise DeadlineExceeded(
                f"{model}/{version} did not answer within {timeout_s * 1000:.0f} ms"
            ) from None
        except BackPressureError:
            raise Overloaded(f"{model}/{version} is overloaded; retry later") from None
        except DeploymentUnavailableError:
            raise NotReady(f"{model}/{version} is not available") from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, ServingError) else None
            if cause is not None:
                raise cause from None
            raise ModelError(f"{model}/{version} failed: {exc.cause!r}") from None
        except RayActorError:
            raise NotReady(f"{model}/{version} replica died; retry") from None

    # ---- readiness -----------------------------------------------------------------
    async def version_ready(self, model: str, version: str) -> bool:
        try:
            return bool(
                await self._call(model, version, "ready", self._settings.ready_probe_timeout_s)
            )
        except ServingError:
            return False

    async def readiness(self) -> dict[tuple[str, str], bool]:
        keys = list(self.manifests)
        states = await asyncio.gather(*(self.version_ready(m, v) for m, v in keys))
        return dict(zip(keys, states))

    async def batching(self, model: str, version: str) -> dict[str, Any]:
        self.resolve(model, version)
        result: dict[str, Any] = await self._call(
            model, version, "batching", self._settings.ready_probe_timeout_s
        )
        return result

    def default_version(self, model: str) -> str:
        return self._dep.models[model].default

    def served_versions(self, model: str) -> list[str]:
        return list(self._dep.models[model].versions)


def _rejection(entity_field: str, problems: list[Problem]) -> Exception:
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


async def _wait(response: Any) -> Any:
    return await response
