"""A canary rollout to an MLflow alias, end to end (real Ray, Redis, HTTP and an MLflow
server): `serving rollout start fraud --to models:/e2e-fraud@challenger` makes the
control plane import that model version into the registry as `m<number>`, deploy it
and route to it; the gateway's answers then come from the imported version.

The session's gateway was deployed before this module's MLflow server existed, so its
control plane is pointed at the server the way an operator would: MLFLOW_TRACKING_URI
in the RolloutControl deployment's environment (Serve restarts that one replica only),
taken back at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, MlflowServer
from tests.e2e.conftest import TOKEN, GatewayUnderTest
from tests.e2e.test_gateway import records

MODEL = "fraud"
URI = "models:/e2e-fraud@challenger"


def _controller_env(env: dict[str, str] | None) -> None:
    """Set (or, with None, drop) the RolloutControl deployment's env_vars and wait until
    a replica started with them runs and the old one is gone."""
    from ray.serve.context import _get_global_client

    from serving import deploy

    def replicas(name: str = "RolloutControl") -> dict[str, str]:
        details = _get_global_client().get_serve_details()
        gateway = details["applications"][deploy.GATEWAY_APP]["deployments"]
        return {r["replica_id"]: r["state"] for r in gateway[name]["replicas"]}

    old, ingress = set(replicas()), replicas("Gateway")
    config = deploy.deployed_config()
    app = next(a for a in config["applications"] if a["name"] == deploy.GATEWAY_APP)
    control = next(d for d in app["deployments"] if d["name"] == "RolloutControl")
    options = control.setdefault("ray_actor_options", {})
    if env is None:
        options.pop("runtime_env", None)
    else:
        options["runtime_env"] = {"env_vars": env}
    deploy.apply_config(config)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas()
        if now and not set(now) & old and set(now.values()) == {"RUNNING"}:
            assert replicas("Gateway") == ingress, "the ingress replicas were restarted too"
            return
        time.sleep(0.2)
    pytest.fail(f"RolloutControl not replaced within 120 s: {replicas()}")


@pytest.fixture(scope="module")
def control_sees_mlflow(gateway: GatewayUnderTest, mlflow_server: MlflowServer) -> Iterator[None]:
    _controller_env({"MLFLOW_TRACKING_URI": mlflow_server.url})
    yield
    _controller_env(None)


@pytest.fixture(scope="module")
def challenger(mlflow_server: MlflowServer, gateway: GatewayUnderTest) -> str:
    """The demo fraud v1 (ONNX) logged to MLflow with a column signature, its serving
    keys (online features) as a tag, aliased `challenger`: its version number."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    v1 = yaml.safe_load((gateway.registry / MODEL / "v1" / "model.yaml").read_text())
    signature = ModelSignature(
        inputs=Schema([ColSpec("float", c) for c in v1["inputs"][0]["columns"]])
    )
    mlflow.set_tracking_uri(mlflow_server.url)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            onnx.load(str(gateway.registry / MODEL / "v1" / "model.onnx")),
            name="model",
            registered_model_name="e2e-fraud",
            signature=signature,
            pip_requirements=[],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tag = yaml.safe_dump({"features": v1["features"], "description": "fraud v1, via MLflow"})
    client.set_model_version_tag("e2e-fraud", version, "serving.manifest", tag)
    client.set_registered_model_alias("e2e-fraud", "challenger", version)
    return version


def admin(gw: GatewayUnderTest, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"{gw.url}/admin/v1/models/{MODEL}/rollout"
    r = (
        httpx.post(url, headers=gw.admin(), json=body, timeout=300)
        if body is not None
        else httpx.get(url, headers=gw.admin(), timeout=30)
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_a_rollout_to_an_alias_serves_the_imported_version(
    gateway: GatewayUnderTest, control_sees_mlflow: None, challenger: str
) -> None:
    version = f"m{challenger}"
    # All traffic to the canary at once; the analysis never decides (no stable traffic).
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "rollout", "start", MODEL, "--to", URI,
         "--steps", "100", "--interval", "1h", "--min-requests", "1000000",
         "--url", gateway.url],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", "SERVING_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        assert out.returncode == 0, out.stderr
        assert f"importing {URI}" in out.stdout
        assert f"rollout running to {version} (from {URI})" in out.stdout
        manifest = yaml.safe_load((gateway.registry / MODEL / version / "model.yaml").read_text())
        assert manifest["training"]["source"] == URI
        assert manifest["description"] == "fraud v1, via MLflow"

        status = admin(gateway)
        assert status["routing"]["canary"] == version
        assert status["rollout"]["spec"]["to"] == version
        start = status["history"][0]
        assert start["action"] == "start" and start["figures"]["source"] == URI
        assert URI in start["reason"]

        # Every answer comes from the imported version, and it answers as fraud v1
        # (the same ONNX graph, the same features from Redis).
        recs = records(gateway.registry, 16)
        with httpx.Client(timeout=30) as client:
            answers = [
                client.post(f"{gateway.url}/v1/models/{MODEL}:predict", json={"instances": recs})
                for _ in range(5)
            ]
            direct = client.post(
                f"{gateway.url}/v1/models/{MODEL}/versions/v1:predict", json={"instances": recs}
            )
        assert direct.status_code == 200, direct.text
        for r in answers:
            assert r.status_code == 200, r.text
            assert (r.json()["version"], r.json()["arm"]) == (version, "canary")
            got = [p["probabilities"] for p in r.json()["predictions"]]
            want = [p["probabilities"] for p in direct.json()["predictions"]]
            assert np.allclose(got, want)

        # Starting again from the same alias imports nothing new.
        assert admin(gateway, {"action": "rollback"})["rollout"]["status"] == "rolled_back"
        again = admin(gateway, {"action": "start", "to": URI, "steps": [100]})
        assert again["routing"]["canary"] == version
    finally:
        if admin(gateway)["rollout"]["status"] in ("running", "paused"):
            admin(gateway, {"action": "rollback"})
    assert admin(gateway)["routing"]["stable"] == "v2"


def test_a_bad_uri_is_refused_naming_it(
    gateway: GatewayUnderTest, control_sees_mlflow: None
) -> None:
    url = f"{gateway.url}/admin/v1/models/{MODEL}/rollout"
    body = {"action": "start", "to": "models:/e2e-nope@challenger"}
    r = httpx.post(url, headers=gateway.admin(), json=body, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "to" and "not found" in error["message"]
    assert admin(gateway)["rollout"]["status"] != "running"
