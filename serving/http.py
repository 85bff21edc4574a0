"""FastAPI ingress: v1 (TF-Serving-style) predict, model status, health, admin.

Bodies are parsed with orjson straight from bytes (the documented pydantic schemas
serve OpenAPI only), and every error leaves through one handler as
`{"error": {"code", "message", "field"?}}` with the status its class carries.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import (
    InvalidInput,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    ServingError,
    Unauthenticated,
)
from serving.pipeline import Pipeline, Prediction
from serving.schemas import (
    PredictRequest,
    PredictResponse,
    encode_predictions,
    parse_predict_body,
)
from serving.settings import BatchingOverride, Settings

log = logging.getLogger(__name__)

PREDICT = "/v1/models/{name}:predict"
PREDICT_VERSION = "/v1/models/{name}/versions/{version}:predict"
FastHandler = Callable[[Request, dict[str, str]], Awaitable[Response]]


class FastRoutes:
    """POST routes the direct HTTP server answers as plain ASGI, beside the FastAPI app
    that declares them too (for OpenAPI and for the proxy mode): the same handlers,
    without FastAPI's routing, dependency solving and middleware layers (~0.1 ms per
    request on the reference machine, against a ~1.5 ms answer). A handler answers its
    own errors. `__call__` returns False for a request no route takes."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], FastHandler]] = []

    def add(self, path: str, handler: FastHandler) -> None:
        """`path` is a Starlette path template; a `{param}` matches `[^/]+` as there."""
        parts = re.split(r"\{(\w+)\}", path)
        rx = "".join(f"(?P<{p}>[^/]+)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
        self._routes.append((re.compile(f"^{rx}$"), handler))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> bool:
        if scope["method"] != "POST":
            return False
        for rx, handler in self._routes:
            if m := rx.match(scope["path"]):
                request = Request(scope, receive)
                response = await handler(request, m.groupdict())
                write = scope.get(WRITE)
                if write is None:
                    await response(scope, receive, send)
                    return True
                headers = [(k, v) for k, v in response.raw_headers if k != b"server-timing"]
                stamped = scope.get(TIMINGS)
                timing = None if stamped is None else _timing_at_write(*stamped)
                if response.background is None:
                    await write(response.status_code, headers, response.body, timing)
                else:  # a task to run after the answer: Starlette's send runs it
                    if timing is not None:
                        headers.append((b"server-timing", timing()))
                    response.raw_headers = headers
                    await response(scope, receive, send)
                return True
        return False


def _timing_at_write(timings: dict[str, float], arrived: float) -> Callable[[], bytes]:
    """Server-Timing's value for a one-write answer, `encode` and `total` extended to
    the moment it is asked for: the writer asks last, with the rest of the response
    assembled, so only the write itself is left outside the clock. Every other stage
    is formatted here, ahead."""
    encode_before = timings["encode"] - timings["total"]  # encode = this + total
    done = server_timing({k: v for k, v in timings.items() if k not in ("encode", "total")})
    head = f"{done}, " if done else ""

    def value() -> bytes:
        total = time.perf_counter() - arrived
        encode = (encode_before + total) * 1000
        return f"{head}encode;dur={encode:.3f}, total;dur={total * 1000:.3f}".encode()

    return value


Reconfigure = Callable[[str, str, BatchingOverride], Awaitable[None]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


# Request ids: 80 random bits per process (drawn again in a forked child), then a
# counter: as unique as uuid4 across processes and restarts, without a system call per
# request.
_ID_PREFIX = ""
_ID_COUNTER = itertools.count(1)


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = os.urandom(10).hex(), itertools.count(1)


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id() -> str:
    """A fresh request id, 32 hex digits (the shape of uuid4().hex)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


def request_id(request: Request) -> str:
    """The request's id. The header is always present: Ray Serve's proxy, or in direct
    mode serving.direct_http.RequestIdMiddleware, adds one when the client did not and
    echoes it in the response, so handlers never set it themselves."""
    rid = request.headers.get("x-request-id")
    return rid[:128] if rid else new_request_id()


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timings.items())


ARRIVAL = "serving.arrival"  # ASGI scope key: perf_counter() when the server got the request


def account_arrival(request: Request, t0: float, timings: dict[str, float]) -> float:
    """Put the time between the server receiving the request and our handler starting
    (ASGI, routing) in an `http` stage, first, after `inbound` when the request carries
    `x-request-start`; returns when the request arrived."""
    arrived = float(request.scope.get(ARRIVAL, t0))
    lead = {"http": max(t0 - arrived, 0.0)}
    inbound = inbound_s(request.headers.get(REQUEST_START), arrived)
    if inbound is not None:
        lead = {"inbound": inbound, **lead}
    put_first(timings, lead)
    return arrived


def put_first(timings: dict[str, float], lead: dict[str, float]) -> None:
    """Stages in `lead` before the others (Server-Timing lists them in order)."""
    ordered = {**lead, **timings}
    timings.clear()
    timings.update(ordered)


# Request header a client or a proxy in front of the gateway sets to when it sent the
# request (nginx: `proxy_set_header X-Request-Start "t=${msec}"`), as APMs read it.
REQUEST_START = "x-request-start"
MAX_INBOUND_S = 60.0  # a later stamp is taken for a broken clock, not a slow network
CLOCK_SLACK_S = 0.001  # clocks may disagree this much: an earlier arrival counts as 0


def inbound_s(stamp: str | None, arrived: float) -> float | None:
    """Seconds from the `x-request-start` stamp to `arrived` (perf_counter() when the
    request's first bytes were read): the way in, which no clock of ours sees.

    The stamp is wall-clock time since the epoch, optionally after `t=`: seconds with a
    fraction (nginx's `$msec`), or whole milliseconds, microseconds or nanoseconds, told
    apart by magnitude. Absent, unparseable or implausible (the clocks disagree) gives
    None: the header is telemetry, never a reason to refuse a request."""
    if not stamp:
        return None
    try:
        value = float(stamp[2:] if stamp[:2] in ("t=", "T=") else stamp)
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    for limit, ns_per_unit in ((1e11, 1e9), (1e14, 1e6), (1e17, 1e3)):
        if value < limit:
            value *= ns_per_unit
            break
    arrived_ns = time.time_ns() - (time.perf_counter() - arrived) * 1e9
    inbound = (arrived_ns - value) / 1e9
    if inbound < -CLOCK_SLACK_S or inbound > MAX_INBOUND_S:
        return None
    return max(inbound, 0.0)


TIMINGS = "serving.timings"  # ASGI scope key: (stages, arrival) of the answer being sent
# ASGI scope key, set by a server that can write a whole response in one go (the direct
# server): `await scope[WRITE](status, headers, body, timing)`, `timing` None or a
# callable giving the Server-Timing value, called last. See FastRoutes.
WRITE = "serving.write_response"


def timing_header(request: Request, timings: dict[str, float], arrived: float, t_enc: float) -> str:
    """Close the `encode` stage and `total` now, for the Server-Timing header. The stages
    stay in the scope: a server that writes the response itself extends both to the
    moment it writes and formats the header then (FastRoutes), so here it is left empty."""
    done = time.perf_counter()
    timings["encode"] = done - t_enc
    timings["total"] = done - arrived
    request.scope[TIMINGS] = (timings, arrived)
    return "" if WRITE in request.scope else server_timing(timings)


def _timeout_s(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout-ms")
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise MalformedRequest(
            "x-request-timeout-ms must be a number of milliseconds",
            field="x-request-timeout-ms",
        ) from None
    if not ms > 0:
        raise MalformedRequest(
            "x-request-timeout-ms must be positive", field="x-request-timeout-ms"
        )
    return ms / 1000


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing more than `max_bytes` (413) or an empty one (400)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {max_bytes}")
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise MalformedRequest(f"content-encoding {encoding!r} is not supported")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    if not body:
        raise MalformedRequest("request body is empty; expected JSON")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Error path only: the stdlib parser accepts NaN/Infinity literals (as Python's
        # json.dumps writes them), so validation can name the field that holds one.
        try:
            return json.loads(body)
        except ValueError:
            raise MalformedRequest(f"body is not valid JSON: {exc}") from None


async def _read_json(request: Request, max_bytes: int) -> Any:
    return parse_json(await read_body(request, max_bytes))


class BatchingUpdate(BaseModel):
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None


def build_http_app(
    pipeline: Pipeline,
    settings: Settings,
    *,
    admin_token: str | None,
    reconfigure: Reconfigure | None = None,
) -> FastAPI:
    app = FastAPI(
        title="serving gateway",
        description="Low-latency model serving: TF-Serving-style v1 API, health, admin.",
        version="0.1.0",
    )

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> Response:
        return _json(exc.to_dict(), exc.http_status, exc.http_headers())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        err = MalformedRequest(f"{where or 'body'}: {first['msg']}", field=where or None)
        return await _serving_error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: ServingError = NotFound(f"no route {request.method} {request.url.path}")
        else:
            err = ServingError(str(exc.detail))
            err.http_status = exc.status_code
            err.code = "http_error"
        return await _serving_error(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        rid = request_id(request)
        log.exception("unhandled error in request %s", rid)
        return _json(
            {"error": {"code": "internal", "message": f"internal error (request {rid})"}},
            500,
        )

    def _answer(request: Request, pred: Prediction, rid: str) -> Response:
        """The answer without Server-Timing: `_predict` adds it once `encode` is known."""
        body: dict[str, Any] = {
            "predictions": encode_predictions(pred.manifest.outputs, pred.outputs),
            "model": pred.model,
            "version": pred.version,
            "arm": pred.arm,
            "request_id": rid,
        }
        if pred.degraded:
            body["degraded"] = True
            body["degraded_reasons"] = pred.degraded
        return _json(
            body,
            headers={"x-serving-batch-size": str(pred.batch_size)},
        )

    async def _predict(request: Request, name: str, version: str | None) -> Response:
        rid = request_id(request)
        t0 = time.perf_counter()
        timeout = _timeout_s(request)
        body = await _read_json(request, settings.max_body_bytes)
        instances = parse_predict_body(body)
        read_s = time.perf_counter() - t0
        pred = await pipeline.predict(
            name,
            version,
            instances,
            timeout_s=timeout,
            pinned=request.headers.get("x-serving-version"),
            headers=request.headers,
            request_id=rid,
        )
        # Reading and parsing the body counts as decode time.
        pred.timings["decode"] += read_s
        t_enc = time.perf_counter()  # from here on, what the answer costs counts as encode
        arrived = account_arrival(request, t0, pred.timings)
        response = _answer(request, pred, rid)
        response.headers["server-timing"] = timing_header(request, pred.timings, arrived, t_enc)
        return response

    predict_doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    }

    @app.post(
        PREDICT,
        response_model=PredictResponse,
        openapi_extra=predict_doc,
        tags=["predict"],
    )
    async def predict(name: str, request: Request) -> Response:
        """Predict with the model's default version."""
        return await _predict(request, name, None)

    @app.post(
        PREDICT_VERSION,
        response_model=PredictResponse,
        openapi_extra=predict_doc,
        tags=["predict"],
    )
    async def predict_version(name: str, version: str, request: Request) -> Response:
        """Predict with one version of the model."""
        return await _predict(request, name, version)

    async def fast_predict(request: Request, params: dict[str, str]) -> Response:
        try:
            return await _predict(request, params["name"], params.get("version"))
        except ServingError as exc:
            return await _serving_error(request, exc)
        except Exception as exc:
            return await _unexpected(request, exc)

    fast = FastRoutes()
    fast.add(PREDICT, fast_predict)
    fast.add(PREDICT_VERSION, fast_predict)
    app.state.fast_path = fast

    def _status(name: str, version: str, ready: bool) -> dict[str, Any]:
        return {
            "version": version,
            "state": "AVAILABLE" if ready else "LOADING",
            "status": {"error_code": "OK", "error_message": ""},
        }

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> Response:
        """Every served model with its versions, default version and state."""
        ready = await pipeline.readiness()
        models: dict[str, dict[str, Any]] = {}
        for (m, v), manifest in pipeline.manifests.items():
            entry = models.setdefault(
                m, {"name": m, "default_version": pipeline.default_version(m), "versions": []}
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
        return _json({"models": list(models.values())})

    @app.get("/v1/models/{name}", tags=["models"])
    async def model_status(name: str) -> Response:
        """TF Serving's model status: `model_version_status` per served version."""
        pipeline.resolve(name, None)
        versions = pipeline.served_versions(name)
        states = [await pipeline.version_ready(name, v) for v in versions]
        return _json(
            {"model_version_status": [_status(name, v, r) for v, r in zip(versions, states)]}
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        """The ingress is alive (says nothing about models)."""
        return _json({"status": "alive"})

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """200 only when every configured version is loaded and warm; else 503."""
        ready = await pipeline.readiness()
        waiting = [f"{m}/{v}" for (m, v), ok in ready.items() if not ok]
        if waiting:
            return _json(
                {
                    "status": "not_ready",
                    "waiting_for": waiting,
                    "error": {
                        "code": "not_ready",
                        "message": "not warmed up yet: " + ", ".join(waiting),
                    },
                },
                503,
            )
        return _json({"status": "ready", "versions": [f"{m}/{v}" for m, v in ready]})

    def _check_admin(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if (
            admin_token is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(token.encode(), admin_token.encode())
        ):
            raise Unauthenticated("admin API needs 'Authorization: Bearer <token>'")

    @app.post("/v1/feedback", tags=["feedback"])
    async def feedback(request: Request) -> Response:
        """Delayed labels: `{"request_id": "...", "label": 1}` or a list of them (a
        multi-instance request takes a list of labels). Unknown or expired ids: 404."""
        body = await _read_json(request, settings.max_body_bytes)
        items = body if isinstance(body, list) else [body]
        pairs: list[tuple[str, Any]] = []
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
            pairs.append((rid, label))
        if not pairs:
            raise MalformedRequest("no labels given")
        if pipeline.feedback is None:
            raise ServingError("feedback is not available in this process")
        return _json({"results": await pipeline.feedback.label(pairs)})

    @app.get("/admin/v1/models/{name}/versions/{version}/monitoring", tags=["admin"])
    async def monitoring(name: str, version: str, request: Request) -> Response:
        """Accuracy from delayed labels and drift (PSI) as this replica sees them."""
        _check_admin(request)
        return _json(await pipeline.monitoring(name, version))

    @app.get("/admin/v1/models/{name}/rollout", tags=["admin"])
    async def rollout_status(name: str, request: Request) -> Response:
        """Routing table, rollout state, canary vs stable figures and decision history."""
        _check_admin(request)
        pipeline.resolve(name, None)
        assert pipeline.rollouts is not None
        return _json(await pipeline.rollouts.status(name))

    @app.post("/admin/v1/models/{name}/rollout", tags=["admin"])
    async def rollout_command(name: str, request: Request) -> Response:
        """Rollout commands: `{"action": "start", "to": "v3", "steps": [5, 25, 50, 100],
        "interval_s": 60, "max_error_rate": 0.01, "max_p99_ms": 50, "min_requests": 100,
        "sticky_key": "user_id"}`, or action `pause`, `resume`, `promote`, `rollback`,
        `set_weight` (`percent`), `shadow` (`version`, `sample`, or `off: true`)."""
        _check_admin(request)
        pipeline.resolve(name, None)
        body = await _read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            raise MalformedRequest("body must be an object with an 'action'", field="action")
        assert pipeline.rollouts is not None
        action = body.pop("action")
        return _json(await pipeline.rollouts.run(name, action, body))

    @app.get("/admin/v1/models/{name}/versions/{version}/batching", tags=["admin"])
    async def get_batching(name: str, version: str, request: Request) -> Response:
        """Batching parameters a replica of this version runs with now."""
        _check_admin(request)
        return _json(await pipeline.batching(name, version))

    @app.put("/admin/v1/models/{name}/versions/{version}/batching", tags=["admin"])
    async def put_batching(
        name: str, version: str, update: BatchingUpdate, request: Request
    ) -> Response:
        """Change batching on the running deployment (Ray Serve reconfigure; no restart)."""
        _check_admin(request)
        pipeline.resolve(name, version)
        try:
            override = BatchingOverride.model_validate(update.model_dump())
        except ValueError as exc:
            raise MalformedRequest(str(exc)) from None
        if reconfigure is None:
            raise ServingError("reconfiguration is not available in this process")
        await reconfigure(name, version, override)
        return _json({"model": name, "version": version, **override.model_dump(exclude_none=True)})

    # Open Inference Protocol REST routes (imported here: that module imports this one).
    from serving.oip_rest import build_v2_router

    app.include_router(build_v2_router(pipeline, settings, fast))
    return app
