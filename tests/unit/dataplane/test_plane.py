"""The data plane's flow with stand-in versions (no Ray, no Redis, no model file): the
route and arm, the stages it times, load shedding, deadlines, failures mapped to
ServingErrors, per-arm statistics and the shadow copy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from serving.dataplane import DataPlane
from serving.dataplane.routing import OTHER, Arm
from serving.errors import DeadlineExceeded, ModelError, NotFound, Overloaded
from serving.models.worker import ReplicaResult
from serving.observability.metrics import metrics
from serving.settings import DeploymentFile, Settings
from serving.transport.context import RequestContext

MANIFEST = {
    "runtime": "onnx",
    "artifact": "model.onnx",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": []}],
}


class Doubler:
    """A version's worker: y = 2 * sum(x), after an optional pause or failure."""

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor
        self.pause_s = 0.0
        self.fail: Exception | None = None
        self.calls: list[bool] = []  # `alone` per call

    async def predict(self, inputs: dict[str, np.ndarray], alone: bool = False) -> ReplicaResult:
        self.calls.append(alone)
        if self.pause_s:
            await asyncio.sleep(self.pause_s)
        if self.fail is not None:
            raise self.fail
        y = self.factor * inputs["x"].sum(axis=1)
        return ReplicaResult({"y": y}, 0.001, 0.002, len(y))

    async def ready(self) -> bool:
        return True


class Canary:
    """A Router that sends everything to `to` and copies every request to `shadow`."""

    def __init__(self, to: str, shadow: str | None = None) -> None:
        self.to, self.shadow = to, shadow

    def route(self, model: str, sticky: str | None) -> tuple[str, Arm]:
        return self.to, "canary"

    def stable(self, model: str) -> str:
        return "v1"

    def sticky_field(self, model: str) -> str | None:
        return None

    def shadow_for(self, model: str) -> str | None:
        return self.shadow

    def routed_versions(self, model: str) -> set[str]:
        return {"v1", self.to} | ({self.shadow} if self.shadow else set())

    async def ensure_started(self) -> None:
        return None


class Stats:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bool]] = []
        self.shadows: list[tuple[str, bool, bool]] = []

    def request(self, model: str, version: str, latency_s: float, error: bool) -> None:
        self.requests.append((model, version, error))

    def shadow(self, model: str, version: str, *, error: bool, agree: bool) -> None:
        self.shadows.append((version, error, agree))


def _deployment(root: Path, versions: list[str], limit: int = 512) -> DeploymentFile:
    for v in versions:
        folder = root / "m" / v
        folder.mkdir(parents=True)
        (folder / "model.yaml").write_text(yaml.safe_dump({**MANIFEST, "name": "m", "version": v}))
        (folder / "model.onnx").write_bytes(b"not read: the worker stands in for the runtime")
    return DeploymentFile.model_validate(
        {
            "registry": str(root),
            "ingress": {"max_ongoing_requests": limit},
            "models": {"m": {"default": "v1", "versions": {v: {} for v in versions}}},
        }
    )


def _no_ray(*args: Any) -> Any:
    raise AssertionError("every version here is local")


def ctx(**headers: str) -> RequestContext:
    now = time.perf_counter()
    return RequestContext("rid", "http", headers, now, now, "http", None)


async def test_an_answer_with_its_route_and_stages(tmp_path: Path) -> None:
    worker = Doubler()
    plane = DataPlane(
        _deployment(tmp_path, ["v1"]), Settings(), _no_ray, local={("m", "v1"): worker}
    )
    pred = await plane.predict(ctx(), "m", None, instances=[[1, 2], [3, 4]])
    np.testing.assert_allclose(pred.outputs["y"], [6.0, 14.0])
    assert (pred.model, pred.version, pred.arm, pred.batch_size) == ("m", "v1", "stable", 2)
    assert list(pred.timings) == ["decode", "features", "queue", "infer", "hop", "record", "total"]
    assert pred.timings["queue"] == 0.001 and pred.timings["infer"] == 0.002
    assert pred.timings["total"] >= pred.timings["decode"] + pred.timings["record"]
    assert worker.calls == [True]  # alone: nothing else in flight


async def test_pins_and_unknown_names(tmp_path: Path) -> None:
    local = {("m", "v1"): Doubler(), ("m", "v2"): Doubler(10)}
    plane = DataPlane(_deployment(tmp_path, ["v1", "v2"]), Settings(), _no_ray, local=local)
    pinned = await plane.predict(
        ctx(**{"x-serving-version": "v2"}), "m", None, tensors={"x": np.ones((1, 2), np.float32)}
    )
    assert (pinned.version, pinned.arm) == ("v2", "pinned") and pinned.outputs["y"][0] == 20
    by_path = await plane.predict(ctx(), "m", "v2", instances=[[1, 1]])
    assert (by_path.version, by_path.arm) == ("v2", "pinned")
    with pytest.raises(NotFound, match="version 'v9'"):
        await plane.predict(ctx(), "m", "v9", instances=[[1, 1]])
    with pytest.raises(NotFound, match="model 'nope'"):
        await plane.predict(ctx(), "nope", None, instances=[[1, 1]])
    assert plane.admission.inflight == {"m": 0, OTHER: 0}


async def test_names_that_are_not_served_share_one_label(tmp_path: Path) -> None:
    """Unauthenticated callers choose the names in a path: only served ones may become
    metric label values or in-flight entries, whatever they send."""
    plane = DataPlane(
        _deployment(tmp_path, ["v1"]), Settings(), _no_ray, local={("m", "v1"): Doubler()}
    )
    requests = metrics().requests
    requests.flush()
    for i in range(300):
        for model, version in ((f"x{i}", None), ("\u00e9", f"w{i}"), ("m", f"w{i}")):
            with pytest.raises(NotFound):
                await plane.predict(ctx(), model, version, instances=[[1, 1]])
    await plane.predict(ctx(), "m", "v1", instances=[[1, 1]])
    labels = {(model, version) for model, version, *_ in requests._pending}
    assert labels == {(OTHER, ""), (OTHER, OTHER), ("m", OTHER), ("m", "v1")}
    assert set(plane.admission.inflight) == {"m", OTHER}


async def test_past_the_limit_requests_are_shed(tmp_path: Path) -> None:
    worker = Doubler()
    worker.pause_s = 0.2
    plane = DataPlane(
        _deployment(tmp_path, ["v1"], limit=1), Settings(), _no_ray, local={("m", "v1"): worker}
    )
    first = asyncio.create_task(plane.predict(ctx(), "m", None, instances=[[1, 1]]))
    while not worker.calls:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="max_ongoing_requests"):
        await plane.predict(ctx(), "m", None, instances=[[1, 1]])
    assert (await first).version == "v1"
    await plane.predict(ctx(), "m", None, instances=[[1, 1]])  # capacity is back


async def test_deadlines_and_failures_are_serving_errors(tmp_path: Path) -> None:
    worker = Doubler()
    plane = DataPlane(
        _deployment(tmp_path, ["v1"]), Settings(), _no_ray, local={("m", "v1"): worker}
    )
    worker.pause_s = 1.0
    late = ctx()
    late.timeout_s = 0.05
    with pytest.raises(DeadlineExceeded, match="did not answer within"):
        await plane.predict(late, "m", None, instances=[[1, 1]])
    worker.pause_s, worker.fail = 0.0, RuntimeError("boom")
    with pytest.raises(ModelError, match="boom"):
        await plane.predict(ctx(), "m", None, instances=[[1, 1]])


async def test_canary_statistics_and_the_shadow_copy(tmp_path: Path) -> None:
    local = {("m", "v1"): Doubler(), ("m", "v2"): Doubler(), ("m", "v3"): Doubler(3)}
    stats = Stats()
    plane = DataPlane(
        _deployment(tmp_path, ["v1", "v2", "v3"]),
        Settings(),
        _no_ray,
        router=Canary("v2", shadow="v3"),
        local=local,
        stats=stats,
    )
    pred = await plane.predict(ctx(), "m", None, instances=[[1, 2]])
    assert (pred.version, pred.arm) == ("v2", "canary")
    while not stats.shadows:  # the copy runs after the answer
        await asyncio.sleep(0.001)
    assert stats.requests == [("m", "v2", False)]
    assert stats.shadows == [("v3", False, False)]  # 9 against 6: they disagree
    local[("m", "v2")].fail = RuntimeError("boom")
    with pytest.raises(ModelError):
        await plane.predict(ctx(), "m", None, instances=[[1, 2]])
    assert stats.requests[-1] == ("m", "v2", True)  # a server fault counts against it


async def test_an_error_that_is_not_a_serving_error_counts_as_a_fault(tmp_path: Path) -> None:
    """A bug in the gateway itself (not a ServingError) is no success: `internal` in the
    metrics and a fault in the version's rollout statistics."""
    stats = Stats()
    plane = DataPlane(
        _deployment(tmp_path, ["v1"]),
        Settings(),
        _no_ray,
        local={("m", "v1"): Doubler()},
        stats=stats,
    )

    def broken(*args: Any) -> Any:
        raise KeyError("a bug")

    plane.caller.call = broken  # type: ignore[method-assign]
    requests = metrics().requests
    requests.flush()
    with pytest.raises(KeyError):
        await plane.predict(ctx(), "m", None, instances=[[1, 1]])
    assert stats.requests == [("m", "v1", True)]
    assert [key[-1] for key in requests._pending] == ["internal"]
