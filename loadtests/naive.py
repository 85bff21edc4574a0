"""Baseline (a): the naive Ray Serve application, Ray's defaults everywhere.

A FastAPI ingress deployment (`@serve.ingress`) calls one unbatched model deployment per
model through a DeploymentHandle. Deployed as the Serve application `naive` under the
route prefix /naive, in the same Ray cluster as the gateway, from the same Serve config
(`build_app` is its import path).

No `from __future__ import annotations` here: FastAPI must see the real `Request` type
on the ingress methods, or it takes `request` for a query parameter (422).
"""

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from loadtests import baselines

APP_NAME = "naive"
ROUTE_PREFIX = "/naive"

api = FastAPI()


@serve.deployment
class NaiveModel:
    """One model version, one request at a time (no batching)."""

    def __init__(self, registry: str, model: str, version: str) -> None:
        self._input = baselines.manifest(Path(registry), model, version).inputs[0].name
        self._runtime = baselines.runtime(Path(registry), model, version)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self._runtime.predict({self._input: x})


@serve.deployment
@serve.ingress(api)
class NaiveIngress:
    def __init__(
        self,
        fraud: DeploymentHandle,
        digits: DeploymentHandle,
        registry: str,
        fraud_version: str,
        digits_version: str,
        redis_url: str,
        namespace: str,
    ) -> None:
        self._fraud = fraud
        self._digits = digits
        reg = Path(registry)
        self._fraud_features = baselines.FeatureModel(
            baselines.manifest(reg, "fraud", fraud_version), redis_url, namespace
        )
        self._digits_manifest = baselines.manifest(reg, "digits", digits_version)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "alive"}

    @api.post("/fraud")
    async def fraud(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        x = await self._fraud_features.vectors(body["instances"])
        return baselines.answer(await self._fraud.remote(x))

    @api.post("/digits")
    async def digits(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        x = baselines.tensor_input(self._digits_manifest, body["instances"])
        return baselines.answer(await self._digits.remote(x))


def build_app(args: dict[str, Any]) -> Application:
    """Serve config builder. args: registry, fraud_version, digits_version, redis_url,
    namespace."""
    reg = args["registry"]
    fraud = NaiveModel.options(name="NaiveFraud").bind(reg, "fraud", args["fraud_version"])
    digits = NaiveModel.options(name="NaiveDigits").bind(reg, "digits", args["digits_version"])
    app: Application = NaiveIngress.bind(
        fraud,
        digits,
        reg,
        args["fraud_version"],
        args["digits_version"],
        args["redis_url"],
        args["namespace"],
    )
    return app


def app_config(
    registry: Path, fraud_version: str, digits_version: str, redis_url: str, namespace: str
) -> dict[str, Any]:
    """This application's entry in a Serve config (ServeDeploySchema `applications`)."""
    return {
        "name": APP_NAME,
        "route_prefix": ROUTE_PREFIX,
        "import_path": "loadtests.naive:build_app",
        # Replicas import `loadtests` from the checkout (the package is not installed).
        "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}},
        "args": {
            "registry": str(registry),
            "fraud_version": fraud_version,
            "digits_version": digits_version,
            "redis_url": redis_url,
            "namespace": namespace,
        },
    }
