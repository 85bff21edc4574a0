"""Load shedding: past `ingress.max_ongoing_requests` inference requests in flight, an
ingress replica answers 503 `overloaded` with Retry-After at once (v1 and v2 formats)
instead of queueing. Real direct HTTP server, real app and data plane, the real digits
runtime in-process behind a gate that holds answers back (no Ray, no Redis: Serve's
batcher needs a replica context, so the gate calls the runtime itself)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from serving.dataplane import DataPlane
from serving.models.registry import Registry
from serving.models.runtimes import RuntimeOptions, load_runtime
from serving.models.worker import ReplicaResult
from serving.settings import Settings, load_deployment
from serving.transport.direct_http import DirectHttpServer
from serving.transport.http_app import build_http_app
from tests.conftest import free_port

IMAGE = np.zeros((8, 8)).tolist()


class GatedWorker:
    """A fused version's interface over the real runtime; `predict` waits for the gate."""

    def __init__(self, registry: Path) -> None:
        mv = Registry(registry).get("digits", "v1")
        self.runtime = load_runtime(mv, RuntimeOptions(device="cpu"))
        self.gate = asyncio.Event()
        self.waiting = 0

    async def predict(self, inputs: Any, alone: bool = False) -> ReplicaResult:
        self.waiting += 1
        await self.gate.wait()
        t = time.perf_counter()
        outputs = self.runtime.predict(inputs)
        infer_s = time.perf_counter() - t
        return ReplicaResult(outputs, 0.0, infer_s, 1)


def _no_ray(*args: Any) -> Any:
    raise AssertionError("the fused version must not need a Ray handle")


async def test_requests_past_the_limit_are_shed_at_once(
    registry_root: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "dep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "registry": str(registry_root),
                "ingress": {"max_ongoing_requests": 2},
                "models": {"digits": {"default": "v1", "versions": {"v1": {"placement": "fused"}}}},
            }
        )
    )
    dep = load_deployment(cfg)
    settings = Settings(config=cfg)
    worker = GatedWorker(registry_root)
    plane = DataPlane(dep, settings, _no_ray, local={("digits", "v1"): worker})
    app = build_http_app(plane, settings, admin_digest=None)
    server = DirectHttpServer(app, "127.0.0.1", free_port())
    await server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
            held = [
                asyncio.create_task(
                    client.post("/v1/models/digits:predict", json={"instances": [IMAGE]})
                )
                for _ in range(2)
            ]
            for _ in range(500):
                if worker.waiting == 2:
                    break
                await asyncio.sleep(0.01)
            assert worker.waiting == 2

            shed = await client.post("/v1/models/digits:predict", json={"instances": [IMAGE]})
            assert shed.status_code == 503
            assert shed.headers["retry-after"] == "1"
            assert shed.headers["x-serving-error-code"] == "overloaded"
            assert shed.json()["error"]["code"] == "overloaded"
            assert "max_ongoing_requests" in shed.json()["error"]["message"]
            assert shed.headers["x-request-id"]

            v2 = await client.post(
                "/v2/models/digits/infer",
                json={
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1, 8, 8],
                            "datatype": "FP32",
                            "data": np.zeros(64).tolist(),
                        }
                    ]
                },
            )
            assert v2.status_code == 503
            assert v2.headers["retry-after"] == "1"
            assert v2.headers["x-serving-error-code"] == "overloaded"
            assert "max_ongoing_requests" in v2.json()["error"]

            health = await client.get("/healthz")  # health is never shed
            assert health.status_code == 200

            worker.gate.set()
            answers = await asyncio.gather(*held)
            assert [r.status_code for r in answers] == [200, 200], answers[0].text
            # Capacity is back once they are answered.
            again = await client.post("/v1/models/digits:predict", json={"instances": [IMAGE]})
            assert again.status_code == 200
    finally:
        await server.stop()
