"""Managed clouds' container contracts: the same image answers the routes, port and
artifact location each platform documents, chosen by the environment.

- SageMaker (`serving serve`, as SageMaker starts a container): HTTP on 8080 or
  SAGEMAKER_BIND_TO_PORT; `GET /ping` (200 once ready); `POST /invocations` with
  `application/json` (`{"instances": [...]}`) or `text/csv` (one instance per line);
  model artifacts in /opt/ml/model; Ray's metrics endpoint moves off 8080.
- Vertex AI (AIP_HTTP_PORT set): health on AIP_HEALTH_ROUTE, predictions on
  AIP_PREDICT_ROUTE with `{"instances": [...], "parameters": {...}}` answered as
  `{"predictions": [...]}`; artifacts from AIP_STORAGE_URI (a local or mounted path);
  bodies up to Vertex's 1.5 MB.
- Azure ML managed online endpoints (AZUREML_MODEL_DIR set): model files there;
  liveness, readiness and scoring routes (SERVING_PLATFORM_*_ROUTE, defaults below).

Each predict route serves one model (SERVING_PLATFORM_MODEL, default the deployment's
first) through the same data plane as the v1 API; every other route stays as it is.
What each platform's environment implies for the settings is
serving.settings.platform_settings (read before Ray is imported).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.dataplane import DataPlane
from serving.errors import InvalidInput, MalformedRequest
from serving.settings import Settings
from serving.transport import http
from serving.transport.http import json_response, parse_json, read_body
from serving.transport.rest_v1 import (
    encode_predictions,
    error_response,
    parse_predict_body,
    readiness,
)


def build_router(plane: DataPlane, settings: Settings) -> APIRouter | None:
    """The platform's routes, or None when the gateway runs on no platform."""
    if settings.platform == "none":
        return None
    router = APIRouter(tags=[settings.platform])
    model = settings.platform_model or plane.catalog.models[0]

    async def health(request: Request) -> Response:
        return json_response({"status": "alive"})

    async def ready(request: Request) -> Response:
        return await readiness(plane)

    async def predict(request: Request) -> Response:
        try:
            ctx = http.context(request, "http")
            body = await read_body(request, settings.max_body_bytes, ctx.headers)
            version = None
            content_type = ctx.headers.get("content-type", "application/json")
            if content_type.split(";")[0].strip().lower() == "text/csv":
                instances = _csv_instances(plane, model, body)
            else:
                instances, version = _json_instances(parse_json(body))
            pred = await plane.predict(ctx, model, version, instances=instances)
            return json_response(
                {"predictions": encode_predictions(pred.manifest.outputs, pred.outputs)}
            )
        except Exception as exc:
            return error_response(request, exc)

    health_route = settings.platform_health_route or "/ping"
    ready_route = settings.platform_ready_route or health_route
    router.add_api_route(health_route, ready if ready_route == health_route else health)
    if ready_route != health_route:
        router.add_api_route(ready_route, ready)
    predict_route = settings.platform_predict_route or "/invocations"
    router.add_api_route(predict_route, predict, methods=["POST"])
    return router


def _json_instances(body: Any) -> tuple[Any, str | None]:
    """Instances (TF-Serving's `instances`, or Azure's `data`) and a version pinned by
    Vertex-style `parameters: {"version": ...}`."""
    if isinstance(body, dict) and "data" in body and "instances" not in body:
        body = {**body, "instances": body["data"]}
    instances = parse_predict_body(body)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MalformedRequest("'parameters' must be an object", field="parameters")
    version = parameters.get("version")
    if version is not None and not isinstance(version, str):
        raise InvalidInput("parameters.version must be a string", field="parameters.version")
    return instances, version


def _csv_instances(plane: DataPlane, model: str, body: bytes) -> list[Any]:
    """One instance per CSV line, for a model with one numeric input: the line's values
    in the input's shape (e.g. 64 numbers for an 8x8 image)."""
    manifest = plane.catalog.manifest(model, plane.catalog.default_version(model))
    if len(manifest.inputs) != 1 or manifest.features is not None:
        raise InvalidInput(
            f"text/csv needs a model with one numeric input; {model} takes named fields: "
            "send application/json"
        )
    shape = list(manifest.inputs[0].shape)  # per instance (the batch axis is implicit)
    if any(d < 0 for d in shape[1:]):
        raise InvalidInput(f"text/csv needs {model}'s input to have a fixed shape")
    try:
        rows = [r for r in csv.reader(io.StringIO(body.decode("utf-8"))) if r]
        values = [[float(x) for x in r] for r in rows]
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedRequest(f"text/csv: every value must be a number ({exc})") from None
    width = math.prod(shape) if shape and shape[0] >= 0 else None
    out: list[Any] = []
    for i, row in enumerate(values):
        if width is not None and len(row) != width:
            raise InvalidInput(f"text/csv line {i + 1}: {len(row)} values, expected {width}")
        out.append(_reshape(row, shape))
    return out


def _reshape(flat: list[float], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return flat
    step = math.prod(shape[1:])
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
