"""What happens after a prediction, off the answer's critical work but inside its
`record` stage: request metrics, per-arm rollout statistics, prediction records for
delayed labels, the durable prediction log, drift windows and the shadow copy."""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from serving.dataplane.invoke import VersionCaller
from serving.dataplane.routing import OTHER, Router
from serving.dataplane.shadow import ShadowSender, ShadowStats
from serving.models.registry import Arrays, Manifest
from serving.models.worker import ReplicaResult
from serving.observability.drift import DriftMonitor
from serving.observability.metrics import metrics

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


class RequestStats(ShadowStats, Protocol):
    """Per-arm counters that rollout analysis reads (serving.rollouts.stats)."""

    def request(self, model: str, version: str, latency_s: float, error: bool) -> None: ...


class PredictionRecords(Protocol):
    """Prediction records kept for delayed labels (serving.observability.feedback)."""

    def record(self, request_id: str, model: str, version: str, labels: np.ndarray) -> str: ...


class PredictionLogSink(Protocol):
    """The durable prediction log (serving.quality.predlog): memory only here."""

    def prediction(
        self,
        request_id: str,
        model: str,
        version: str,
        arm: str,
        ts: float,
        inputs: Arrays,
        columns: dict[str, list[str] | None],
        outputs: dict[str, Any],
        latency_s: float,
        degraded: bool,
    ) -> None: ...


class AfterPredict:
    def __init__(
        self,
        router: Router,
        caller: VersionCaller,
        timeout_s: float,
        stats: RequestStats | None = None,
        records: PredictionRecords | None = None,
        log: PredictionLogSink | None = None,
    ) -> None:
        self._router = router
        self._stats = stats
        self._records = records
        self._log = log
        self.drift: dict[tuple[str, str], DriftMonitor | None] = {}
        self.shadow = ShadowSender(caller, stats, timeout_s)

    def outcome(
        self, model: str, version: str, arm: str, protocol: str, code: str, latency_s: float
    ) -> None:
        """Every request that reached the data plane, answered or not. Shed requests
        (arm "none") and unknown names are no version's fault: not in rollout figures."""
        metrics().requests.add(1, model, version, arm, protocol, code)
        if (
            self._stats is not None
            and version not in ("", OTHER)
            and arm != "none"
            and code != "not_found"
        ):
            self._stats.request(model, version, latency_s, code in SERVER_FAULTS)

    def answered(
        self,
        record_id: str,
        model: str,
        version: str,
        arm: str,
        protocol: str,
        manifest: Manifest,
        arrays: Arrays,
        result: ReplicaResult,
        timings: dict[str, float],
        degraded: list[str],
    ) -> str:
        """A successful answer: latency and stage metrics, prediction record and log
        row, drift window, and a shadow copy when this request is sampled for one.
        Returns the feedback key for the answer ("" when no record was made)."""
        m = metrics()
        m.latency.record(timings["total"], model, version, protocol)
        for stage, secs in timings.items():
            if stage != "total":
                m.stage.record(secs, model, version, stage)
        if degraded:
            m.degraded.add(1, model, version, degraded[0].split(":")[1])
        key = ""
        if record_id and self._records is not None and "label" in result.outputs:
            key = self._records.record(
                record_id, model, version, np.asarray(result.outputs["label"])
            )
        if self._log is not None:
            self._log.prediction(
                record_id,
                model,
                version,
                arm,
                time.time(),
                arrays,
                _columns(manifest),
                result.outputs,
                timings["total"],
                bool(degraded),
            )
        monitor = self._drift_monitor(model, version, manifest)
        if monitor is not None:
            monitor.observe(arrays.get(manifest.inputs[0].name), result.outputs)
        if arm != "pinned":
            shadow = self._router.shadow_for(model)
            if shadow is not None and shadow != version:
                self.shadow.send(model, shadow, manifest, arrays, result.outputs)
        return key

    def _drift_monitor(self, model: str, version: str, m: Manifest) -> DriftMonitor | None:
        key = (model, version)
        if key not in self.drift:
            self.drift[key] = (
                DriftMonitor(m.drift, m.inputs[0].columns) if m.drift is not None else None
            )
        return self.drift[key]


# id(manifest) -> (the manifest, kept so that its id is never reused; its columns).
_COLUMNS: dict[int, tuple[Manifest, dict[str, list[str] | None]]] = {}


def _columns(m: Manifest) -> dict[str, list[str] | None]:
    """Each input's element names, made once per manifest (manifests are few and never
    changed)."""
    hit = _COLUMNS.get(id(m))
    if hit is None:
        hit = _COLUMNS[id(m)] = (m, {s.name: s.columns for s in m.inputs})
    return hit[1]
