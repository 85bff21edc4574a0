"""The data plane: the one request flow behind every transport.

admission (load shedding) → route (choose the version) → decode (validate against the
manifest) → features (one Redis round trip, when the model has them) → call the version
under the request's deadline → after-predict hooks. Each stage is timed; the timings go
to metrics and, through the transport, to the client (Server-Timing). Errors are
ServingErrors only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.dataplane.admission import Admission
from serving.dataplane.decode import (
    decode_instances,
    decode_records,
    tensors_to_records,
    validate_tensors,
)
from serving.dataplane.features import FeatureSource, FeatureStep
from serving.dataplane.hooks import (
    AfterPredict,
    PredictionLogSink,
    PredictionRecords,
    RequestStats,
)
from serving.dataplane.invoke import HandleFactory, VersionCaller
from serving.dataplane.monitor import Accuracy, Monitor
from serving.dataplane.replicas import ReplicaWatch
from serving.dataplane.routing import Arm, Catalog, Router, StaticRouter
from serving.errors import Overloaded, ServingError
from serving.models.registry import Arrays, Manifest
from serving.settings import DeploymentFile, Settings


class RequestInfo(Protocol):
    """What the data plane needs to know of a request (transport.context.RequestContext)."""

    @property
    def protocol(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def started(self) -> float: ...
    @property
    def arrived(self) -> float: ...
    @property
    def timeout_s(self) -> float | None: ...
    @property
    def pinned(self) -> str | None: ...
    @property
    def record_id(self) -> str: ...


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
    # What the client presents with a delayed label for this answer ("" when the
    # answer keeps no prediction record: no `label` output).
    feedback_key: str = ""


class DataPlane:
    def __init__(
        self,
        dep: DeploymentFile,
        settings: Settings,
        handles: HandleFactory,
        *,
        router: Router | None = None,
        local: Mapping[tuple[str, str], Any] | None = None,
        stats: RequestStats | None = None,
        records: PredictionRecords | None = None,
        log: PredictionLogSink | None = None,
        accuracy: Accuracy | None = None,
        features: FeatureSource | None = None,
        watch: ReplicaWatch | None = None,
    ) -> None:
        self._settings = settings
        router = router or StaticRouter({m: c.default for m, c in dep.models.items()})
        self.catalog = Catalog(dep, router)
        self.caller = VersionCaller(handles, local or {}, watch)
        self.admission = Admission(
            dep.ingress.max_ongoing_requests,
            dep.ingress.target_queue_delay_ms / 1000.0,
            dep.ingress.target_loop_lag_ms / 1000.0,
        )
        self.admission.on_shed = self._shed
        self.admission.close_refused = dep.ingress.num_replicas > 1
        self.features = FeatureStep(settings, features)
        self.hooks = AfterPredict(
            router, self.caller, settings.request_timeout_s, stats, records, log
        )
        self.monitor = Monitor(
            self.catalog,
            self.caller,
            self.hooks,
            self.admission,
            settings.ready_probe_timeout_s,
            accuracy,
        )

    def _shed(self, model: str) -> None:
        """Count a prediction the HTTP server refused itself (the replica was full)."""
        tag, v = self.catalog.labels(model, None)
        self.hooks.outcome(tag, v, "none", "http", "overloaded", 0.0)

    async def predict(
        self,
        req: RequestInfo,
        model: str,
        version: str | None,
        *,
        instances: Any = None,
        tensors: Arrays | None = None,
    ) -> Prediction:
        """Instances (v1: TF-Serving-style JSON) or tensors (Open Inference Protocol:
        batch-first arrays by input name; for a feature-backed model, by instance
        field) → the answering version's outputs."""
        t0 = req.started
        await self.monitor.ensure_started()
        # Names as metric labels and admission keys: bounded (Catalog.labels).
        tag, v = self.catalog.labels(model, version)
        try:
            self.admission.enter(tag)
        except Overloaded as exc:
            self.hooks.outcome(tag, v, "none", req.protocol, exc.code, 0.0)
            raise
        s = self._settings
        deadline = min(req.timeout_s or s.request_timeout_s, s.request_timeout_s)
        arm, code = "stable", "ok"
        queued: float | None = None  # what admission learns from an answer
        try:
            v, arm, manifest = self.catalog.choose(
                model, version, req.pinned, instances, tensors, req.headers
            )
            arrays, degraded, t_features = await self._inputs(
                model, v, manifest, instances, tensors
            )
            t_decoded = time.perf_counter()
            result = await self.caller.call(
                model,
                v,
                "predict",
                deadline - (t_decoded - t0),
                arrays,
                # No other request for this model is in flight here: a fast version
                # may answer it inline (serving.models.worker.ModelWorker.predict).
                self.admission.alone(tag),
            )
            t_end = time.perf_counter()
            # Read but waiting for the busy event loop, then in the batcher's queue.
            queued = max(t0 - req.arrived, 0.0) + result.queue_s
        except ServingError as exc:
            code = exc.code
            raise
        except Exception:
            code = "internal"  # a bug, not a success: it counts against the version
            raise
        finally:
            self.admission.leave(tag, queued)
            self.hooks.outcome(tag, v, arm, req.protocol, code, time.perf_counter() - t0)
        timings = {
            "decode": t_decoded - t0 - t_features,
            "features": t_features,
            "queue": result.queue_s,
            "infer": result.infer_s,
            # Ray's hop there and back plus what the replica spends outside the batch.
            "hop": max(t_end - t_decoded - result.queue_s - result.infer_s, 0.0),
            "total": t_end - t0,
        }
        key = self.hooks.answered(
            req.record_id, model, v, arm, req.protocol, manifest, arrays, result, timings, degraded
        )
        # What the hooks cost (metrics, records, drift, shadow dispatch): a stage of its
        # own so that Server-Timing accounts for it.
        total = timings.pop("total")
        timings["record"] = time.perf_counter() - t_end
        timings["total"] = total + timings["record"]
        return Prediction(
            result.outputs, manifest, model, v, result.batch_size, timings, degraded, arm, key
        )

    async def _inputs(
        self,
        model: str,
        version: str,
        manifest: Manifest,
        instances: Any,
        tensors: Arrays | None,
    ) -> tuple[Arrays, list[str], float]:
        """Validated model inputs, why they are degraded, and the feature round trip's
        seconds (0 for a model without features)."""
        limit = self._settings.max_instances
        if manifest.features is None:
            arrays = (
                decode_instances(manifest.inputs, instances, limit)
                if tensors is None
                else validate_tensors(manifest.inputs, tensors, limit)
            )
            return arrays, [], 0.0
        raw = decode_records(
            manifest.features,
            instances if tensors is None else tensors_to_records(tensors),
            limit,
        )
        t = time.perf_counter()
        arrays, degraded = await self.features.vectors(model, version, manifest, raw)
        return arrays, degraded, time.perf_counter() - t
