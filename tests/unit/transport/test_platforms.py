"""What each managed cloud's environment implies for the gateway's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.errors import ConfigError
from serving.settings import VERTEX_MAX_BODY_BYTES, Settings
from serving.settings import platform_settings as from_environment


def test_no_platform_changes_nothing() -> None:
    s = Settings()
    assert from_environment(s, {}) == s


def test_sagemaker() -> None:
    s = from_environment(Settings(platform="sagemaker"), {})
    assert (s.http_port, s.registry_dir) == (8080, Path("/opt/ml/model"))
    assert s.metrics_port != 8080  # Ray's metrics endpoint moves off SageMaker's port
    assert (s.platform_health_route, s.platform_predict_route) == ("/ping", "/invocations")
    s = from_environment(Settings(platform="sagemaker"), {"SAGEMAKER_BIND_TO_PORT": "9123"})
    assert s.http_port == 9123 and s.metrics_port == 8080
    # What the user sets explicitly wins.
    s = from_environment(Settings(platform="sagemaker", http_port=7000), {})
    assert s.http_port == 7000


def test_vertex_is_found_by_its_environment() -> None:
    env = {
        "AIP_HTTP_PORT": "8090",
        "AIP_HEALTH_ROUTE": "/v1/health",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
        "AIP_STORAGE_URI": "/mnt/models/fraud",
    }
    s = from_environment(Settings(), env)
    assert s.platform == "vertex" and s.http_port == 8090
    assert s.platform_health_route == s.platform_ready_route == "/v1/health"
    assert s.platform_predict_route == env["AIP_PREDICT_ROUTE"]
    assert s.registry_dir == Path("/mnt/models/fraud")
    assert s.max_body_bytes == VERTEX_MAX_BODY_BYTES
    with pytest.raises(ConfigError, match="only a local or mounted path"):
        from_environment(Settings(), {**env, "AIP_STORAGE_URI": "gs://bucket/model"})


def test_azureml_is_found_by_its_environment() -> None:
    s = from_environment(Settings(), {"AZUREML_MODEL_DIR": "/var/azureml-app/model"})
    assert s.platform == "azureml" and s.registry_dir == Path("/var/azureml-app/model")
    assert (s.platform_health_route, s.platform_ready_route, s.platform_predict_route) == (
        "/",
        "/ready",
        "/score",
    )
    routes = Settings(platform_predict_route="/v2/score")
    s = from_environment(routes, {"AZUREML_MODEL_DIR": "/m"})
    assert s.platform_predict_route == "/v2/score"
