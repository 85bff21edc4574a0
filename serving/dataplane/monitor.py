"""What the data plane reports about itself: readiness of the served versions, the
batching a version runs with, accuracy and drift, and the gauges exported every few
seconds (in-flight requests, PSI, accuracy); it also keeps the request-path metrics
flowing to Ray (serving.observability.buffered)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from serving.background import every
from serving.dataplane.admission import Admission
from serving.dataplane.hooks import AfterPredict
from serving.dataplane.invoke import VersionCaller
from serving.dataplane.routing import Catalog
from serving.errors import ServingError
from serving.observability import buffered
from serving.observability.metrics import metrics

EVERY_S = 5.0


class Accuracy(Protocol):
    """Accuracy from delayed labels, and where the PSIs go for the retraining trigger
    (serving.observability.feedback.FeedbackStore)."""

    async def accuracy(self, model: str, version: str) -> dict[str, float | None]: ...

    async def publish_psi(
        self, model: str, version: str, features: dict[str, float], rows: int
    ) -> None: ...


class Monitor:
    def __init__(
        self,
        catalog: Catalog,
        caller: VersionCaller,
        hooks: AfterPredict,
        admission: Admission,
        probe_timeout_s: float,
        accuracy: Accuracy | None = None,
    ) -> None:
        self._catalog = catalog
        self._caller = caller
        self._hooks = hooks
        self._admission = admission
        self._probe_timeout_s = probe_timeout_s
        self._accuracy = accuracy
        self._task: asyncio.Task[None] | None = None

    async def ensure_started(self) -> None:
        """Background work, started once from the running loop: the routing tables
        and the gauges."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(every(EVERY_S, self._publish, "publishing gauges"))
        buffered.ensure_flushing()
        await self._catalog.router.ensure_started()

    async def version_ready(self, model: str, version: str) -> bool:
        try:
            return bool(await self._caller.call(model, version, "ready", self._probe_timeout_s))
        except ServingError:
            return False

    async def readiness(self) -> dict[tuple[str, str], bool]:
        """Every served version of every configured model: warm or not."""
        await self.ensure_started()
        c = self._catalog
        keys = [(m, v) for m in c.models for v in c.served_versions(m)]
        states = await asyncio.gather(*(self.version_ready(m, v) for m, v in keys))
        return dict(zip(keys, states))

    async def batching(self, model: str, version: str) -> dict[str, Any]:
        """The batching a replica of the version runs with now."""
        self._catalog.resolve(model, version)
        result: dict[str, Any] = await self._caller.call(
            model, version, "batching", self._probe_timeout_s
        )
        return {**result, "ingress": self._caller.channel_state(model, version)}

    async def monitoring(self, model: str, version: str) -> dict[str, Any]:
        """What the accuracy and drift gauges hold for one version (this replica)."""
        self._catalog.resolve(model, version)
        out: dict[str, Any] = {"model": model, "version": version}
        if self._accuracy is not None:
            out["accuracy"] = await self._accuracy.accuracy(model, version)
        drift = self._hooks.drift.get((model, version))
        if drift is not None:
            features, prediction = drift.psi()
            out["psi"] = {"features": features, "prediction": prediction}
        return out

    async def _publish(self) -> None:
        m = metrics()
        for model, n in self._admission.inflight.items():
            m.inflight.set(n, tags={"model": model})
        for (model, version), drift in self._hooks.drift.items():
            if drift is None:
                continue
            features, prediction = drift.psi()
            for name, value in features.items():
                m.feature_psi.set(value, tags={"model": model, "version": version, "feature": name})
            if self._accuracy is not None and features:
                await self._accuracy.publish_psi(model, version, features, drift.rows)
            if prediction is not None:
                m.prediction_psi.set(prediction, tags={"model": model, "version": version})
        if self._accuracy is not None:
            for model in self._catalog.models:
                for version in self._catalog.served_versions(model):
                    for window, acc in (await self._accuracy.accuracy(model, version)).items():
                        if acc is not None:
                            m.accuracy.set(
                                acc, tags={"model": model, "version": version, "window": window}
                            )
