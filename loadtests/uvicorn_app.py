"""Baseline (b): one uvicorn process, FastAPI, the runtimes called in-process.

Same request handling as the naive Ray Serve app (loadtests/baselines.py), no Ray.
Run as `python -m loadtests.uvicorn_app --port N --redis-url URL`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from loadtests import baselines
from loadtests.scenarios import REGISTRY


def create_app(
    registry: Path, fraud_version: str, digits_version: str, redis_url: str, namespace: str
) -> FastAPI:
    fraud_manifest = baselines.manifest(registry, "fraud", fraud_version)
    fraud_features = baselines.FeatureModel(fraud_manifest, redis_url, namespace)
    fraud_runtime = baselines.runtime(registry, "fraud", fraud_version)
    digits_manifest = baselines.manifest(registry, "digits", digits_version)
    digits_runtime = baselines.runtime(registry, "digits", digits_version)
    digits_input = digits_manifest.inputs[0].name
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.post("/fraud")
    async def fraud(request: Request) -> dict[str, Any]:
        body = await request.json()
        x = await fraud_features.vectors(body["instances"])
        return baselines.answer(fraud_runtime.predict({fraud_features.input: x}))

    @app.post("/digits")
    async def digits(request: Request) -> dict[str, Any]:
        body = await request.json()
        x = baselines.tensor_input(digits_manifest, body["instances"])
        return baselines.answer(digits_runtime.predict({digits_input: x}))

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--namespace", default="serving")
    p.add_argument("--registry", type=Path, default=REGISTRY)
    p.add_argument("--fraud-version", default="v2")
    p.add_argument("--digits-version", default="v1")
    a = p.parse_args()
    app = create_app(a.registry, a.fraud_version, a.digits_version, a.redis_url, a.namespace)
    # uvicorn's defaults (uvloop and httptools when installed) minus the access log.
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
