"""The request flow shared by every transport.

decode (validate against the manifest) → choose the version → call the version's
replica with a deadline → encode. Each stage is timed; the timings go to metrics and,
through the transport, to the client (Server-Timing). Errors are ServingErrors only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serving.background import every
from serving.drift import DriftMonitor
from serving.errors import (
    ConfigError,
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
from serving.feedback import FeedbackStore
from serving.metrics import metrics
from serving.registry import Manifest, Registry
from serving.rollout import agreement
from serving.rollout_controller import RolloutController
from serving.routing import Arm
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
    arm: Arm = "stable"


# Outcomes that count against a version in rollout analysis (client mistakes do not).
SERVER_FAULTS = frozenset(
    {
        "model_error",
        "internal",
        "deadline_exceeded",
        "not_ready",
        "overloaded",
        "feature_store_unavailable",
    }
)
MAX_SHADOWS_IN_FLIGHT = 32
MONITOR_EVERY_S = 5.0


class Pipeline:
    def __init__(
        self,
        dep: DeploymentFile,
        settings: Settings,
        handles: HandleFactory,
        features: RedisFeatureStore | None = None,
        rollouts: RolloutController | None = None,
        feedback: FeedbackStore | None = None,
        local: Mapping[tuple[str, str], Any] | None = None,
    ) -> None:
        self._settings = settings
        self._dep = dep
        self._handles_factory = handles
        self._handles: dict[tuple[str, str], ReplicaHandle] = {}
        self._registry = Registry(dep.registry)
        # Configured versions are read at start-up (a bad manifest fails it, naming the
        # file); versions that rollouts bring in are read on first use.
        self.manifests: dict[tuple[str, str], Manifest] = {
            (m, v): self._registry.get(m, v).manifest
            for m, cfg in dep.models.items()
            for v in cfg.versions
        }
        self._columns: dict[tuple[str, str], list[tuple[str, str, float]]] = {}
        self._features = features
        self.rollouts = rollouts
        self.feedback = feedback
        # Fused versions: ModelWorkers in this process, called without a Ray hop.
        self._local = dict(local or {})
        self._drift: dict[tuple[str, str], DriftMonitor | None] = {}
        # Inference requests in flight in this ingress replica per model, all transports
        # (HTTP either mode, gRPC); past the limit in all they are shed with `Overloaded`.
        self._inflight: dict[str, int] = {}
        self._max_ongoing = dep.ingress.max_ongoing_requests
        self._monitor: asyncio.Task[None] | None = None
        self._shadow_slots: asyncio.Semaphore | None = None
        self._shadow_tasks: set[asyncio.Task[None]] = set()  # strong refs until done

    # ---- routing -------------------------------------------------------------------
    def served_versions(self, model: str) -> list[str]:
        """Versions that take traffic: those the routing table names, plus configured
        non-default versions (reachable when pinned). The configured default counts
        only while the table still routes to it: a promotion retires it."""
        cfg = self._dep.models[model]
        routed = self.rollouts.routed_versions(model) if self.rollouts else {cfg.default}
        return sorted(routed | (set(cfg.versions) - {cfg.default}))

    def default_version(self, model: str) -> str:
        if self.rollouts is not None and model in self.rollouts.tables:
            return self.rollouts.tables[model].stable
        return self._dep.models[model].default

    def manifest(self, model: str, version: str) -> Manifest:
        key = (model, version)
        m = self.manifests.get(key)
        if m is None:
            try:
                m = self.manifests[key] = self._registry.get(model, version).manifest
            except ConfigError as exc:
                raise NotReady(f"{model}/{version}: {exc}") from None
        return m

    def resolve(self, model: str, version: str | None) -> tuple[str, Manifest]:
        if model not in self._dep.models:
            known = ", ".join(sorted(self._dep.models)) or "none"
            raise NotFound(f"model {model!r} not found (served: {known})", field="model")
        v = version or self.default_version(model)
        served = self.served_versions(model)
        if v not in served:
            raise NotFound(
                f"version {v!r} of model {model!r} not found (served: {', '.join(served)})",
                field="version",
            )
        return v, self.manifest(model, v)

    def _route(
        self,
        model: str,
        version: str | None,
        pinned: str | None,
        instances: Any,
        tensors: Arrays | None,
        headers: Mapping[str, str],
    ) -> tuple[str | None, Arm]:
        """The version for this request: the path's version or the pin header win;
        else the routing table, sticky on the table's key when it has one."""
        if version is not None or pinned is not None:
            return version or pinned, "pinned"
        if self.rollouts is None:
            return None, "stable"
        key = self.rollouts.sticky_field(model)
        sticky: str | None = None
        if key is not None:
            if key.startswith("header:"):
                sticky = headers.get(key[7:].lower())
            elif tensors is not None and key in tensors and len(tensors[key]):
                first = tensors[key][0]
                sticky = first.decode() if isinstance(first, bytes) else str(first)
            elif isinstance(instances, list) and instances and isinstance(instances[0], dict):
                value = instances[0].get(key)
                sticky = None if value is None else str(value)
        return self.rollouts.route(model, sticky, None)

    def _feature_columns(self, key: tuple[str, str], m: Manifest) -> list[tuple[str, str, float]]:
        cols = self._columns.get(key)
        if cols is None:
            assert m.features is not None
            cols = self._columns[key] = m.features.resolve_columns(m.inputs[0].columns or [])
        return cols

    def _feature_store(self) -> RedisFeatureStore:
        if self._features is None:
            s = self._settings
            self._features = RedisFeatureStore(
                s.redis_url,
                s.redis_namespace,
                timeout_s=s.feature_timeout_s,
                cache_ttl_s=s.feature_cache_ttl_s,
                max_connections=s.redis_max_connections,
            )
        return self._features

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
        pinned: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> Prediction:
        """v1: TF-Serving-style JSON instances."""
        return await self._predict(
            model,
            version,
            instances,
            None,
            timeout_s,
            protocol,
            pinned,
            headers or {},
            request_id,
        )

    async def predict_tensors(
        self,
        model: str,
        version: str | None,
        tensors: Arrays,
        *,
        timeout_s: float | None = None,
        protocol: str = "v2",
        pinned: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> Prediction:
        """Open Inference Protocol: batch-first arrays keyed by input name (for a
        feature-backed model, keyed by instance field: entity keys and request fields)."""
        return await self._predict(
            model,
            version,
            None,
            tensors,
            timeout_s,
            protocol,
            pinned,
            headers or {},
            request_id,
        )

    async def _predict(
        self,
        model: str,
        version: str | None,
        instances: Any,
        tensors: Arrays | None,
        timeout_s: float | None,
        protocol: str,
        pinned: str | None,
        headers: Mapping[str, str],
        request_id: str | None,
    ) -> Prediction:
        t0 = time.perf_counter()
        await self.ensure_started()
        if sum(self._inflight.values()) >= self._max_ongoing:
            # Load shedding: past the ingress's limit a request is answered at once
            # instead of queueing in this event loop. Not a version's fault, so it stays
            # out of rollout statistics.
            metrics().requests.inc(
                1,
                tags={
                    "model": model,
                    "version": version or "",
                    "arm": "none",
                    "protocol": protocol,
                    "code": Overloaded.code,
                },
            )
            raise Overloaded(
                f"gateway replica at its limit of {self._max_ongoing} requests in flight "
                "(ingress.max_ongoing_requests); retry later"
            )
        self._inflight[model] = self._inflight.get(model, 0) + 1
        deadline = min(
            timeout_s or self._settings.request_timeout_s, self._settings.request_timeout_s
        )
        limit = self._settings.max_instances
        v = version
        code = "ok"
        degraded: list[str] = []
        t_features = 0.0
        arm: Arm = "stable"
        try:
            v, arm = self._route(model, version, pinned, instances, tensors, headers)
            v, manifest = self.resolve(model, v)
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
            # `alone`: no other request for this model is in flight here, so a fast
            # version may answer it inline (serving.replica.ModelWorker.predict).
            alone = self._inflight[model] == 1
            result = await self._call(
                model, v, "predict", deadline - (t_decoded - t0), arrays, alone
            )
            t_end = time.perf_counter()
        except ServingError as exc:
            code = exc.code
            raise
        finally:
            self._inflight[model] -= 1
            metrics().requests.inc(
                1,
                tags={
                    "model": model,
                    "version": v or "",
                    "arm": arm,
                    "protocol": protocol,
                    "code": code,
                },
            )
            if self.rollouts is not None and v is not None and code != "not_found":
                self.rollouts.recorder.request(
                    model, v, time.perf_counter() - t0, code in SERVER_FAULTS
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
        if request_id and self.feedback is not None and "label" in result.outputs:
            self.feedback.record(request_id, model, v, np.asarray(result.outputs["label"]))
        monitor = self._drift_monitor(model, v, manifest)
        if monitor is not None:
            monitor.observe(arrays.get(manifest.inputs[0].name), result.outputs)
        if self.rollouts is not None and arm != "pinned":
            shadow = self.rollouts.shadow_for(model)
            if shadow is not None and shadow != v:
                self._start_shadow(model, shadow, manifest, arrays, result.outputs)
        # What the bookkeeping above cost (metrics, records, drift, shadow dispatch):
        # a stage of its own so that Server-Timing accounts for it.
        t_done = time.perf_counter()
        total = timings.pop("total")
        timings["record"] = t_done - t_end
        timings["total"] = total + timings["record"]
        return Prediction(
            result.outputs, manifest, model, v, result.batch_size, timings, degraded, arm
        )

    # ---- monitoring ------------------------------------------------------------------
    async def ensure_started(self) -> None:
        """Background work, started once from the running loop: rollout state and the
        gauges for accuracy, drift and in-flight requests (every few seconds)."""
        if self._monitor is not None:
            return
        self._monitor = asyncio.create_task(
            every(MONITOR_EVERY_S, self._publish_gauges, "publishing monitoring gauges")
        )
        if self.rollouts is not None:
            await self.rollouts.ensure_started()

    def _drift_monitor(self, model: str, version: str, m: Manifest) -> DriftMonitor | None:
        key = (model, version)
        if key not in self._drift:
            self._drift[key] = (
                DriftMonitor(m.drift, m.inputs[0].columns) if m.drift is not None else None
            )
        return self._drift[key]

    async def monitoring(self, model: str, version: str) -> dict[str, Any]:
        """What the accuracy and drift gauges hold for one version (this replica)."""
        self.resolve(model, version)
        out: dict[str, Any] = {"model": model, "version": version}
        if self.feedback is not None:
            out["accuracy"] = await self.feedback.accuracy(model, version)
        monitor = self._drift.get((model, version))
        if monitor is not None:
            features, prediction = monitor.psi()
            out["psi"] = {"features": features, "prediction": prediction}
        return out

    async def _publish_gauges(self) -> None:
        m = metrics()
        for model, n in self._inflight.items():
            m.inflight.set(n, tags={"model": model})
        for (model, version), monitor in self._drift.items():
            if monitor is None:
                continue
            features, prediction = monitor.psi()
            for name, value in features.items():
                m.feature_psi.set(value, tags={"model": model, "version": version, "feature": name})
            if prediction is not None:
                m.prediction_psi.set(prediction, tags={"model": model, "version": version})
        if self.feedback is not None:
            for model in self._dep.models:
                for version in self.served_versions(model):
                    for window, acc in (await self.feedback.accuracy(model, version)).items():
                        if acc is not None:
                            m.accuracy.set(
                                acc, tags={"model": model, "version": version, "window": window}
                            )

    # ---- shadow ----------------------------------------------------------------------
    def _start_shadow(
        self, model: str, version: str, manifest: Manifest, arrays: Arrays, served: Arrays
    ) -> None:
        """Send a copy to the shadow version without delaying the answer; its result is
        compared with the served one and its failures never reach the client."""
        if self._shadow_slots is None:
            self._shadow_slots = asyncio.Semaphore(MAX_SHADOWS_IN_FLIGHT)
        if self._shadow_slots.locked():
            metrics().shadow.inc(1, tags={"model": model, "version": version, "outcome": "dropped"})
            return
        task = asyncio.create_task(self._shadow(model, version, manifest, arrays, served))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self, model: str, version: str, manifest: Manifest, arrays: Arrays, served: Arrays
    ) -> None:
        assert self._shadow_slots is not None and self.rollouts is not None
        async with self._shadow_slots:
            error, agree = False, False
            try:
                result = await self._call(
                    model, version, "predict", self._settings.request_timeout_s, arrays
                )
                agree = all(agreement(served, result.outputs, [o.name for o in manifest.outputs]))
            except Exception as exc:  # never reaches the client: counted and logged
                error = True
                log.debug("shadow %s/%s failed: %s", model, version, exc)
            self.rollouts.recorder.shadow(model, version, error=error, agree=agree)
            outcome = "error" if error else ("agree" if agree else "disagree")
            metrics().shadow.inc(1, tags={"model": model, "version": version, "outcome": outcome})

    async def _with_features(
        self, model: str, version: str, manifest: Manifest, raw: list[dict[str, Any]]
    ) -> tuple[Arrays, list[str]]:
        """Validated records → stored features (one round trip) → vectors, applying the
        model's policy to whatever was missing, stale or unreachable."""
        cfg = manifest.features
        assert cfg is not None
        stored, problems = await self._feature_store().lookup(cfg, raw)
        degraded: list[str] = []
        if problems:
            if cfg.policy == "reject":
                raise _rejection(cfg.view(problems[0].view).entity, problems)
            degraded = [f"{p.view}:{p.outcome}:{p.entity}" for p in problems[:10]]
        vectors = build_vectors(
            self._feature_columns((model, version), manifest), raw, stored, manifest.inputs[0].dtype
        )
        return {cfg.input: vectors}, degraded

    async def _call(
        self, model: str, version: str, method: str, timeout_s: float, *args: Any
    ) -> Any:
        """Call a replica method with a deadline, mapping Ray's failures to ours."""
        if timeout_s <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")
        local = self._local.get((model, version))
        if local is not None:
            return await self._call_local(local, model, version, method, timeout_s, *args)
        try:
            handle = self._handle(model, version)
            response = getattr(handle, method).remote(*args)
        except Exception as exc:  # the version's application is not deployed (yet)
            raise NotReady(f"{model}/{version} is not available: {exc}") from None
        try:
            async with asyncio.timeout(timeout_s):
                return await _wait(response)
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

    async def _call_local(
        self, worker: Any, model: str, version: str, method: str, timeout_s: float, *args: Any
    ) -> Any:
        try:
            # asyncio.timeout, not wait_for: the call runs in this task, no new one.
            async with asyncio.timeout(timeout_s):
                return await getattr(worker, method)(*args)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{model}/{version} did not answer within {timeout_s * 1000:.0f} ms"
            ) from None
        except ServingError:
            raise
        except Exception as exc:
            raise ModelError(f"{model}/{version} failed: {exc!r}") from None

    # ---- readiness -----------------------------------------------------------------
    async def version_ready(self, model: str, version: str) -> bool:
        try:
            return bool(
                await self._call(model, version, "ready", self._settings.ready_probe_timeout_s)
            )
        except ServingError:
            return False

    async def readiness(self) -> dict[tuple[str, str], bool]:
        await self.ensure_started()
        keys = [(m, v) for m in self._dep.models for v in self.served_versions(m)]
        states = await asyncio.gather(*(self.version_ready(m, v) for m, v in keys))
        return dict(zip(keys, states))

    async def batching(self, model: str, version: str) -> dict[str, Any]:
        self.resolve(model, version)
        result: dict[str, Any] = await self._call(
            model, version, "batching", self._settings.ready_probe_timeout_s
        )
        return result


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
