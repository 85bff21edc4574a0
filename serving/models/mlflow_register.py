"""Registering a local registry version in MLflow: what the retraining loop does with a
version it trained when its policy says `register: mlflow` (serving.quality.retrain).

The version is logged in a run of its own as MLflow's `onnx` flavor (ONNX versions
only: the other runtimes' artifacts have no flavor MLflow loads without pickles), with
the manifest's serving keys as the `serving.manifest` tag and its held-out metrics as
the run's metrics, registered under the model's name, and given an alias. Importing it
back (`serving models import models:/<name>@<alias>`) gives the same version.
"""

from __future__ import annotations

import json
from typing import Any

from serving.errors import ConfigError
from serving.models.mlflow_source import _answers, _mlflow
from serving.models.registry import ModelVersion

# Manifest keys carried in the `serving.manifest` tag: what the signature cannot say.
CARRIED = ("description", "batching", "resources", "warmup", "features", "drift")


def register(
    mv: ModelVersion,
    name: str,
    alias: str | None,
    tracking_uri: str | None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log and register `mv` as a new version of MLflow model `name`, point `alias` at
    it; returns `models:/<name>/<number>`. Blocking (network): run it in a thread."""
    m = mv.manifest
    if m.runtime != "onnx":
        raise ConfigError(
            f"{m.name}/{m.version}: only ONNX versions register in MLflow (runtime {m.runtime})"
        )
    mlflow = _mlflow()
    import onnx

    tracking = tracking_uri or mlflow.environment_variables.MLFLOW_TRACKING_URI.get()
    if not tracking:
        raise ConfigError(
            "registering in MLflow needs SERVING_MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_URI)"
        )
    where = f"models:/{name}"
    keys: dict[str, Any] = m.model_dump(mode="json", include=set(CARRIED), exclude_none=True)
    with _answers(where, tracking):
        mlflow.set_tracking_uri(tracking)
        client = mlflow.MlflowClient(tracking_uri=tracking)
        with mlflow.start_run(run_name=f"{m.name}-{m.version}"):
            mlflow.log_metrics({k: float(v) for k, v in m.metrics.items()})
            mlflow.log_params({k: str(v)[:500] for k, v in m.training.items()})
            info = mlflow.onnx.log_model(
                onnx.load(str(mv.artifact_path)),
                name="model",
                registered_model_name=name,
                signature=_signature(mv),
            )
        version = str(info.registered_model_version)
        client.set_model_version_tag(name, version, "serving.manifest", json.dumps(keys))
        client.set_model_version_tag(name, version, "retrain.base_version", m.version)
        for k, v in (tags or {}).items():
            client.set_model_version_tag(name, version, k, v)
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}"


def _signature(mv: ModelVersion) -> Any:
    """A column signature for a one-input model whose elements are named (the graph
    does not say the names; importing it back needs them), else none."""
    inputs = mv.manifest.inputs
    if len(inputs) != 1 or inputs[0].columns is None:
        return None
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    kind = "float" if inputs[0].dtype == "float32" else "double"
    return ModelSignature(inputs=Schema([ColSpec(kind, c) for c in inputs[0].columns]))
