"""The managed clouds' container contracts against a running gateway (`serving up` or
`serving serve`, its own local Ray), each spoken as the platform documents it."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import RedisServer
from tests.e2e.test_cli import start_serving_up


def artifacts(registry_root: Path, root: Path) -> Path:
    """What a platform mounts as the model directory: the digits versions, and a
    deployment file beside them (digits served inside the ingress)."""
    shutil.copytree(registry_root / "digits", root / "digits")
    (root / "deployment.yaml").write_text(
        yaml.safe_dump(
            {
                "registry": str(root),
                "models": {"digits": {"default": "v1", "versions": {"v1": {"placement": "fused"}}}},
            }
        )
    )
    return root


@pytest.fixture
def image(registry_root: Path) -> np.ndarray:
    x: np.ndarray = np.load(registry_root / "digits" / "heldout.npz")["X"][:2]
    return x


def stop(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sagemaker(
    registry_root: Path, redis_server: RedisServer, tmp_path: Path, image: np.ndarray
) -> None:
    model_dir = artifacts(registry_root, tmp_path / "opt-ml-model")
    proc, port, lines = start_serving_up(
        tmp_path,
        redis_server.url,
        "sagemaker",
        command="serve",
        port_env="SAGEMAKER_BIND_TO_PORT",
        SERVING_REGISTRY_DIR=str(model_dir),  # /opt/ml/model in a real endpoint
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert any("platform sagemaker" in line for line in lines), lines
        assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
        r = httpx.post(f"{url}/invocations", json={"instances": image.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        as_json = r.json()["predictions"]
        assert len(as_json) == 2 and {"label", "probabilities"} <= set(as_json[0])
        # text/csv: one instance per line, the image's 64 values.
        text = "\n".join(",".join(str(int(v)) for v in img.ravel()) for img in image)
        r = httpx.post(
            f"{url}/invocations", content=text, headers={"content-type": "text/csv"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in as_json]
        r = httpx.post(
            f"{url}/invocations", content="1,2,3", headers={"content-type": "text/csv"}, timeout=30
        )
        assert r.status_code == 422 and "expected 64" in r.text
    finally:
        stop(proc)


def test_vertex_ai(
    registry_root: Path, redis_server: RedisServer, tmp_path: Path, image: np.ndarray
) -> None:
    storage = artifacts(registry_root, tmp_path / "storage")
    health, predict = "/v1/health", "/v1/endpoints/123/deployedModels/456:predict"
    proc, port, _ = start_serving_up(
        tmp_path,
        redis_server.url,
        "vertex",
        port_env="AIP_HTTP_PORT",
        AIP_HEALTH_ROUTE=health,
        AIP_PREDICT_ROUTE=predict,
        AIP_STORAGE_URI=str(storage),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(url + health, timeout=10).status_code == 200
        r = httpx.post(
            url + predict,
            json={"instances": image.tolist(), "parameters": {"version": "v1"}},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert list(r.json()) == ["predictions"] and len(r.json()["predictions"]) == 2
        # Vertex AI's request limit (1.5 MB).
        big = httpx.post(url + predict, json={"instances": [[0.0] * 200_000] * 3}, timeout=30)
        assert big.status_code == 413, big.text
    finally:
        stop(proc)


def test_azure_ml(
    registry_root: Path, redis_server: RedisServer, tmp_path: Path, image: np.ndarray
) -> None:
    model_dir = artifacts(registry_root, tmp_path / "azureml-model")
    proc, port, _ = start_serving_up(
        tmp_path, redis_server.url, "azureml", AZUREML_MODEL_DIR=str(model_dir)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(url + "/", timeout=10).status_code == 200  # liveness
        assert httpx.get(url + "/ready", timeout=10).status_code == 200
        r = httpx.post(url + "/score", json={"data": image.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2
    finally:
        stop(proc)
