"""REST v1: TensorFlow-Serving-style predict, model status, health and feedback.

Bodies are parsed with orjson straight from bytes (the pydantic models below document
the API in OpenAPI; parsing is manual). Errors answer as
`{"error": {"code", "message", "field"?}}` with the status their class carries.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from serving.auth import bearer_ok
from serving.dataplane import DataPlane, Prediction
from serving.errors import (
    InvalidInput,
    MalformedRequest,
    NotReady,
    ServingError,
    Unauthenticated,
)
from serving.models.registry import TensorSpec
from serving.settings import Settings
from serving.transport import http
from serving.transport.context import FEEDBACK_KEY
from serving.transport.errors import to_http
from serving.transport.http import FastRoutes, json_response, read_json

PREDICT = "/v1/models/{name}:predict"
PREDICT_VERSION = "/v1/models/{name}/versions/{version}:predict"


class PredictRequest(BaseModel):
    """`POST /v1/models/{name}:predict` body (documentation schema; parsing is manual)."""

    instances: list[Any] = Field(
        description="One item per example: an object of named inputs (or, for a 1-D "
        "input with named columns, an object of those columns), or a bare value when "
        "the model has a single input.",
        examples=[[{"features": [1.0, 2.0]}], [[[0.0] * 8] * 8]],
    )


class PredictResponse(BaseModel):
    predictions: list[Any]
    model: str
    version: str
    request_id: str


class Labels(Protocol):
    """Joins delayed labels with prediction records (serving.observability.feedback)."""

    async def label(
        self, items: list[tuple[str, Any, str | None]], trusted: bool = False
    ) -> list[dict[str, Any]]: ...


def error_response(request: Request, exc: Exception) -> Response:
    """The v1 error format, for any failure (logged when unexpected)."""
    err = to_http(exc, http.request_id(request), f"{request.method} {request.url.path}")
    return json_response(err.to_dict(), err.http_status, err.http_headers())


def parse_predict_body(body: Any) -> Any:
    """Return the `instances` of a v1 body, or raise MalformedRequest."""
    if not isinstance(body, dict):
        raise MalformedRequest("request body must be a JSON object with 'instances'")
    if "instances" not in body:
        if "inputs" in body:
            raise MalformedRequest(
                "the columnar 'inputs' format is not supported; send 'instances'",
                field="inputs",
            )
        raise MalformedRequest("request body is missing 'instances'", field="instances")
    return body["instances"]


def encode_predictions(specs: list[TensorSpec], outputs: dict[str, Any]) -> list[Any]:
    """One prediction per instance: a bare value for single-output models, else an
    object of named outputs."""
    if len(specs) == 1:
        return list(outputs[specs[0].name].tolist())
    cols = [outputs[s.name].tolist() for s in specs]
    names = [s.name for s in specs]
    return [dict(zip(names, row)) for row in zip(*cols)]


def build_router(
    plane: DataPlane,
    settings: Settings,
    fast: FastRoutes,
    labels: Labels | None,
    feedback_digest: str | None = None,
) -> APIRouter:
    """The v1 routes; the two predict routes are also added to `fast`."""
    router = APIRouter()

    async def _predict(request: Request, name: str, version: str | None) -> Response:
        ctx = http.context(request, "http")
        body = await read_json(request, settings.max_body_bytes, ctx.headers)
        pred = await plane.predict(ctx, name, version, instances=parse_predict_body(body))
        encode_started = time.perf_counter()
        response = json_response(_answer(pred, ctx.request_id), headers=_headers(pred))
        response.headers["server-timing"] = http.timing_header(
            request, ctx, pred.timings, encode_started
        )
        return response

    doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    }

    @router.post(PREDICT, response_model=PredictResponse, openapi_extra=doc, tags=["predict"])
    async def predict(name: str, request: Request) -> Response:
        """Predict with the model's default version."""
        return await _predict(request, name, None)

    @router.post(
        PREDICT_VERSION, response_model=PredictResponse, openapi_extra=doc, tags=["predict"]
    )
    async def predict_version(name: str, version: str, request: Request) -> Response:
        """Predict with one version of the model."""
        return await _predict(request, name, version)

    async def fast_predict(request: Request, params: dict[str, str]) -> Response:
        return await _predict(request, params["name"], params.get("version"))

    fast.add(PREDICT, fast_predict, error_response)
    fast.add(PREDICT_VERSION, fast_predict, error_response)

    @router.get("/v1/models", tags=["models"])
    async def list_models() -> Response:
        """Every served model with its versions, default version and state."""
        ready = await plane.monitor.readiness()
        catalog = plane.catalog
        models: dict[str, dict[str, Any]] = {}
        for (m, v), manifest in catalog.manifests.items():
            entry = models.setdefault(
                m, {"name": m, "default_version": catalog.default_version(m), "versions": []}
            )
            entry["versions"].append(
                {
                    "version": v,
                    "state": "AVAILABLE" if ready[(m, v)] else "LOADING",
                    "runtime": manifest.runtime,
                    "inputs": [s.model_dump(exclude_defaults=True) for s in manifest.inputs],
                    "outputs": [s.model_dump(exclude_defaults=True) for s in manifest.outputs],
                    "metrics": manifest.metrics,
                }
            )
        return json_response({"models": list(models.values())})

    @router.get("/v1/models/{name}", tags=["models"])
    async def model_status(name: str) -> Response:
        """TF Serving's model status: `model_version_status` per served version."""
        plane.catalog.resolve(name, None)
        versions = plane.catalog.served_versions(name)
        states = [await plane.monitor.version_ready(name, v) for v in versions]
        return json_response(
            {"model_version_status": [_status(v, ready) for v, ready in zip(versions, states)]}
        )

    @router.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        """The ingress is alive (says nothing about models)."""
        return json_response({"status": "alive"})

    @router.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """200 only when every configured version is loaded and warm; else 503."""
        return await readiness(plane)

    @router.post("/v1/feedback", tags=["feedback"])
    async def feedback(request: Request) -> Response:
        """Delayed labels: `{"request_id": "...", "label": 1, "feedback_key": "..."}` or a
        list of them (a multi-instance request takes a list of labels). The key is the
        one the answer gave; the trusted label source sends `Authorization: Bearer
        <feedback token>` instead. Unknown or expired ids: 404; a key that does not
        match: 403; neither key nor token: 401."""
        items = _label_items(await read_json(request, settings.max_body_bytes))
        if labels is None:
            raise ServingError("feedback is not available in this process")
        authorization = request.headers.get("authorization", "")
        trusted = bearer_ok(authorization, feedback_digest)
        if authorization and not trusted:
            raise Unauthenticated("the bearer token is not the feedback token")
        if not trusted and any(key is None for _, _, key in items):
            raise Unauthenticated(
                "each label needs the 'feedback_key' its answer gave (the x-serving-"
                "feedback-key header), or 'Authorization: Bearer <feedback token>'",
                field="feedback_key",
            )
        return json_response({"results": await labels.label(items, trusted)})

    return router


async def readiness(plane: DataPlane) -> Response:
    """The readiness answer (/readyz, and a platform's health route): 200 once every
    configured version is loaded and warm, else 503 naming those still warming."""
    ready = await plane.monitor.readiness()
    waiting = [f"{m}/{v}" for (m, v), ok in ready.items() if not ok]
    if waiting:
        err = NotReady("not warmed up yet: " + ", ".join(waiting))
        return json_response(
            {"status": "not_ready", "waiting_for": waiting, **err.to_dict()},
            err.http_status,
            err.http_headers(),
        )
    return json_response({"status": "ready", "versions": [f"{m}/{v}" for m, v in ready]})


def _answer(pred: Prediction, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "predictions": encode_predictions(pred.manifest.outputs, pred.outputs),
        "model": pred.model,
        "version": pred.version,
        "arm": pred.arm,
        "request_id": request_id,
    }
    if pred.feedback_key:
        body["feedback_key"] = pred.feedback_key
    if pred.degraded:
        body["degraded"] = True
        body["degraded_reasons"] = pred.degraded
    return body


def _headers(pred: Prediction) -> dict[str, str]:
    headers = {"x-serving-batch-size": str(pred.batch_size)}
    if pred.feedback_key:
        headers[FEEDBACK_KEY] = pred.feedback_key
    return headers


def _status(version: str, ready: bool) -> dict[str, Any]:
    return {
        "version": version,
        "state": "AVAILABLE" if ready else "LOADING",
        "status": {"error_code": "OK", "error_message": ""},
    }


def _label_items(body: Any) -> list[tuple[str, Any, str | None]]:
    """(request id, label or labels, feedback key or None) per item of a feedback
    body, validated."""
    items = body if isinstance(body, list) else [body]
    pairs: list[tuple[str, Any, str | None]] = []
    for i, item in enumerate(items):
        where = f"[{i}]" if isinstance(body, list) else ""
        if not isinstance(item, dict) or "request_id" not in item or "label" not in item:
            raise MalformedRequest(
                f"body{where} needs 'request_id' and 'label'", field=f"{where}request_id"
            )
        rid, label = item["request_id"], item["label"]
        labels = label if isinstance(label, list) else [label]
        if not isinstance(rid, str) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in labels
        ):
            raise InvalidInput(
                f"body{where}: request_id must be a string and label an integer class",
                field=f"{where}label",
            )
        key = item.get("feedback_key")
        if key is not None and not isinstance(key, str):
            raise InvalidInput(
                f"body{where}: feedback_key must be a string", field=f"{where}feedback_key"
            )
        pairs.append((rid, label, key))
    if not pairs:
        raise MalformedRequest("no labels given")
    return pairs
