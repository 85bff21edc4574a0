"""Open Inference Protocol over REST: `/v2/...` routes.

Errors on these routes leave as the protocol's `{"error": "<message>"}`, with our error
code in the `x-serving-error-code` header. The binary tensor data extension is
supported both ways: a request body may be a JSON header of `Inference-Header-Content-Length`
bytes followed by the inputs' raw data (each input's `parameters.binary_data_size` long,
in input order); outputs asked for with `parameters.binary_data` (or all, with the
request parameter `binary_data_output`) come back the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from serving.dataplane import DataPlane
from serving.errors import MalformedRequest
from serving.models.registry import Arrays
from serving.settings import Settings
from serving.transport import http, oip
from serving.transport.context import FEEDBACK_KEY
from serving.transport.errors import to_http
from serving.transport.http import FastRoutes, json_response, parse_json, read_body

HEADER_LENGTH = "inference-header-content-length"
INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
_ORJSON = orjson.OPT_SERIALIZE_NUMPY


def error_response(request: Request, exc: Exception) -> Response:
    """The protocol's error format, `{"error": "<message>"}`, for any failure (logged
    when unexpected); our code goes in a header (as on every error answer)."""
    err = to_http(exc, http.request_id(request), f"{request.method} {request.url.path}")
    return json_response({"error": err.message}, err.http_status, err.http_headers())


class _V2Route(APIRoute):
    """Every failure on a v2 route answers in the protocol's error format."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(request, exc)

        return handle


def _split(headers: Mapping[str, str], body: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it (binary tensor data extension)."""
    raw = headers.get(HEADER_LENGTH)
    if raw is None:
        return body, b""
    if not raw.isdigit() or int(raw) > len(body):
        raise MalformedRequest(
            f"Inference-Header-Content-Length {raw!r} does not fit a body of {len(body)} bytes"
        )
    n = int(raw)
    return body[:n], body[n:]


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedRequest(f"{where} must be an object", field=where)
    return value


class _V2Request:
    """A decoded REST inference request."""

    def __init__(self, header: Any, binary: bytes) -> None:
        if not isinstance(header, dict):
            raise MalformedRequest("request body must be a JSON object with 'inputs'")
        rid = header.get("id", "")
        self.id = rid if isinstance(rid, str) else str(rid)
        params = _dict(header.get("parameters"), "parameters")
        self.timeout_s = oip.timeout_from_parameters(params)
        binary_default = params.get("binary_data_output") is True
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise MalformedRequest("'inputs' must be a non-empty list", field="inputs")
        self.inputs: Arrays = {}
        offset = 0
        for i, t in enumerate(inputs):
            if not isinstance(t, dict):
                raise MalformedRequest(f"inputs[{i}] must be an object", field=f"inputs[{i}]")
            name = t.get("name")
            where = name if isinstance(name, str) and name else f"inputs[{i}]"
            datatype = t.get("datatype")
            if not isinstance(datatype, str):
                raise MalformedRequest(f"{where}: missing 'datatype'", field=where)
            tparams = _dict(t.get("parameters"), f"{where}.parameters")
            size = tparams.get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise MalformedRequest(
                        f"{where}: binary_data_size {size!r} does not fit the "
                        f"{len(binary) - offset} binary bytes left",
                        field=where,
                    )
                arr = oip.decode_raw(
                    where, datatype, t.get("shape"), binary[offset : offset + size]
                )
                offset += size
            elif "data" in t:
                arr = oip.decode_values(where, datatype, t.get("shape"), t["data"])
            else:
                raise MalformedRequest(f"{where}: missing 'data'", field=where)
            oip.add_input(self.inputs, name, arr)
        if offset != len(binary):
            raise MalformedRequest(
                f"{len(binary) - offset} bytes of binary data belong to no input"
            )
        outputs = header.get("outputs")
        self.outputs: list[str] | None = None
        self.binary: dict[str, bool] = {}
        self.binary_default = binary_default
        if outputs is not None:
            if not isinstance(outputs, list):
                raise MalformedRequest("'outputs' must be a list", field="outputs")
            self.outputs = []
            for j, o in enumerate(outputs):
                name = o.get("name") if isinstance(o, dict) else None
                if not isinstance(name, str):
                    raise MalformedRequest(
                        f"outputs[{j}] must be an object with a 'name'", field=f"outputs[{j}]"
                    )
                oparams = _dict(o.get("parameters"), f"outputs[{j}].parameters")
                if oparams.get("classification"):
                    raise MalformedRequest(
                        "the classification extension is not supported", field=name
                    )
                self.outputs.append(name)
                self.binary[name] = bool(oparams.get("binary_data", binary_default))


def build_router(plane: DataPlane, settings: Settings, fast: FastRoutes) -> APIRouter:
    """The v2 routes; the two infer routes are also added to `fast`."""
    router = APIRouter(route_class=_V2Route, tags=["v2 (Open Inference Protocol)"])

    @router.get("/v2")
    async def server_metadata() -> Response:
        """Server name, version and protocol extensions."""
        return json_response(oip.server_metadata())

    @router.get("/v2/health/live")
    async def server_live() -> Response:
        """The server can answer (says nothing about models)."""
        return json_response({"live": True})

    @router.get("/v2/health/ready")
    async def server_ready() -> Response:
        """200 when every served model version is ready, else 503."""
        ready = all((await plane.monitor.readiness()).values())
        return json_response({"ready": ready}, 200 if ready else 503)

    async def _model_ready(name: str, version: str | None) -> Response:
        v, _ = plane.catalog.resolve(name, version)
        ready = await plane.monitor.version_ready(name, v)
        return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    @router.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        """200 when the model's default version is ready, else 503."""
        return await _model_ready(name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> Response:
        """200 when this version is ready, else 503."""
        return await _model_ready(name, version)

    def _metadata(name: str, version: str | None) -> Response:
        v, manifest = plane.catalog.resolve(name, version)
        versions = plane.catalog.served_versions(name) if version is None else [v]
        return json_response(oip.model_metadata(name, versions, manifest))

    @router.get("/v2/models/{name}")
    async def model_metadata(name: str) -> Response:
        """Inputs and outputs of the model's default version (-1: any size)."""
        return _metadata(name, None)

    @router.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(name: str, version: str) -> Response:
        """Inputs and outputs of one version (-1: any size)."""
        return _metadata(name, version)

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        ctx = http.context(request, "v2")
        body = await read_body(request, settings.max_body_bytes, ctx.headers)
        head, binary = _split(ctx.headers, body)
        req = _V2Request(parse_json(head), binary)
        ctx.lower_timeout(req.timeout_s)
        ctx.body_id = req.id
        pred = await plane.predict(ctx, name, version, tensors=oip.require_inputs(req.inputs))
        outputs = oip.outputs(pred, req.outputs)
        encode_started = time.perf_counter()
        tensors: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for o in outputs:
            entry: dict[str, Any] = {
                "name": o.name,
                "datatype": o.datatype,
                "shape": list(o.array.shape),
            }
            if req.binary.get(o.name, req.binary_default):
                raw = oip.encode_raw(o.array)
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = oip.json_data(o.array)
            tensors.append(entry)
        answer: dict[str, Any] = {"model_name": pred.model, "model_version": pred.version}
        if req.id:
            answer["id"] = req.id
        params = oip.answer_parameters(pred)
        if params:
            answer["parameters"] = params
        answer["outputs"] = tensors
        js = orjson.dumps(answer, option=_ORJSON)
        headers = {
            "server-timing": http.timing_header(request, ctx, pred.timings, encode_started),
            "x-serving-batch-size": str(pred.batch_size),
        }
        if pred.feedback_key:
            headers[FEEDBACK_KEY] = pred.feedback_key
        if not blobs:
            return Response(js, media_type="application/json", headers=headers)
        headers["inference-header-content-length"] = str(len(js))
        return Response(
            js + b"".join(blobs), media_type="application/octet-stream", headers=headers
        )

    infer_doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "required": ["inputs"]},
                    "example": {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "FP32",
                                "shape": [1, 8, 8],
                                "data": [0.0] * 64,
                            }
                        ]
                    },
                }
            },
        }
    }

    @router.post(INFER, openapi_extra=infer_doc)
    async def model_infer(name: str, request: Request) -> Response:
        """Inference with the model's default version."""
        return await _infer(request, name, None)

    @router.post(INFER_VERSION, openapi_extra=infer_doc)
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        """Inference with one version of the model."""
        return await _infer(request, name, version)

    async def fast_infer(request: Request, params: dict[str, str]) -> Response:
        return await _infer(request, params["name"], params.get("version"))

    fast.add(INFER, fast_infer, error_response)
    fast.add(INFER_VERSION, fast_infer, error_response)
    return router
