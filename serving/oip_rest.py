"""Open Inference Protocol over REST: `/v2/...` routes.

Errors on these routes leave as the protocol's `{"error": "<message>"}`, with our error
code in the `x-serving-error-code` header. The binary tensor data extension is
supported both ways: a request body may be a JSON header of `Inference-Header-Content-Length`
bytes followed by the inputs' raw data (each input's `parameters.binary_data_size` long,
in input order); outputs asked for with `parameters.binary_data` (or all, with the
request parameter `binary_data_output`) come back the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute

from serving import oip
from serving.errors import MalformedRequest, ServingError
from serving.http import (
    FastRoutes,
    _timeout_s,
    account_arrival,
    parse_json,
    read_body,
    request_id,
    timing_header,
)
from serving.pipeline import Pipeline
from serving.schemas import Arrays
from serving.settings import Settings

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
ERROR_CODE_HEADER = "x-serving-error-code"
INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
_ORJSON = orjson.OPT_SERIALIZE_NUMPY


def _body(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=_ORJSON),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _error(
    request: Request,
    status: int,
    message: str,
    code: str,
    extra: dict[str, str] | None = None,
) -> Response:
    headers = {ERROR_CODE_HEADER: code, **(extra or {})}
    return _body({"error": message}, status, headers)


async def _answer_errors(request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
    """The handler's answer, or its failure in the protocol's error format."""
    try:
        return await handler()
    except ServingError as exc:
        return _error(request, exc.http_status, exc.message, exc.code, exc.http_headers())
    except RequestValidationError as exc:
        return _error(request, 400, f"invalid request: {exc.errors()!r:.300}", "malformed_request")
    except Exception:
        rid = request_id(request)
        log.exception("unhandled error in v2 request %s", rid)
        return _error(request, 500, f"internal error (request {rid})", "internal")


class _V2Route(APIRoute):
    """Every failure on a v2 route answers in the protocol's error format."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await _answer_errors(request, lambda: handler(request))

        return handle


def _split(request: Request, body: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it (binary tensor data extension)."""
    raw = request.headers.get(HEADER_LENGTH)
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


def build_v2_router(
    pipeline: Pipeline, settings: Settings, fast: FastRoutes | None = None
) -> APIRouter:
    """The v2 routes; the two infer routes are also added to `fast` when given."""
    router = APIRouter(route_class=_V2Route, tags=["v2 (Open Inference Protocol)"])

    @router.get("/v2")
    async def server_metadata() -> Response:
        """Server name, version and protocol extensions."""
        return _body(oip.server_metadata())

    @router.get("/v2/health/live")
    async def server_live() -> Response:
        """The server can answer (says nothing about models)."""
        return _body({"live": True})

    @router.get("/v2/health/ready")
    async def server_ready() -> Response:
        """200 when every served model version is ready, else 503."""
        ready = all((await pipeline.readiness()).values())
        return _body({"ready": ready}, 200 if ready else 503)

    async def _model_ready(name: str, version: str | None) -> Response:
        v, _ = pipeline.resolve(name, version)
        ready = await pipeline.version_ready(name, v)
        return _body({"name": name, "ready": ready}, 200 if ready else 503)

    @router.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        """200 when the model's default version is ready, else 503."""
        return await _model_ready(name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> Response:
        """200 when this version is ready, else 503."""
        return await _model_ready(name, version)

    def _metadata(name: str, version: str | None) -> Response:
        v, manifest = pipeline.resolve(name, version)
        versions = pipeline.served_versions(name) if version is None else [v]
        return _body(oip.model_metadata(name, versions, manifest))

    @router.get("/v2/models/{name}")
    async def model_metadata(name: str) -> Response:
        """Inputs and outputs of the model's default version (-1: any size)."""
        return _metadata(name, None)

    @router.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(name: str, version: str) -> Response:
        """Inputs and outputs of one version (-1: any size)."""
        return _metadata(name, version)

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        rid = request_id(request)
        t0 = time.perf_counter()
        header_timeout = _timeout_s(request)
        body = await read_body(request, settings.max_body_bytes)
        head, binary = _split(request, body)
        req = _V2Request(parse_json(head), binary)
        timeouts = [t for t in (header_timeout, req.timeout_s) if t is not None]
        read_s = time.perf_counter() - t0
        pred, outs = await oip.infer(
            pipeline,
            name,
            version,
            req.inputs,
            req.outputs,
            timeout_s=min(timeouts) if timeouts else None,
            protocol="v2",
            pinned=request.headers.get("x-serving-version"),
            headers=request.headers,
            request_id=req.id or rid,
        )
        pred.timings["decode"] += read_s
        t_enc = time.perf_counter()  # from here on, what the answer costs counts as encode
        arrived = account_arrival(request, t0, pred.timings)
        tensors: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for o in outs:
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
        params = oip.degraded_parameters(pred)
        if params:
            answer["parameters"] = params
        answer["outputs"] = tensors
        js = orjson.dumps(answer, option=_ORJSON)
        headers = {
            "server-timing": timing_header(request, pred.timings, arrived, t_enc),
            "x-serving-batch-size": str(pred.batch_size),
        }
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
        return await _answer_errors(
            request, lambda: _infer(request, params["name"], params.get("version"))
        )

    if fast is not None:
        fast.add(INFER, fast_infer)
        fast.add(INFER_VERSION, fast_infer)
    return router
