"""The REST API as one ASGI app: v1, v2 (Open Inference Protocol) and admin routes.

Errors outside a route's own handling (a missing route, FastAPI's request validation,
anything unexpected) answer in the v1 format through one handler. The inference routes
are also registered on `app.state.fast_path` (FastRoutes), which the direct server
answers without FastAPI's layers.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.dataplane import DataPlane
from serving.errors import ServingError
from serving.settings import Settings
from serving.transport import platforms, rest_admin, rest_v1, rest_v2
from serving.transport.http import FastRoutes


def build_http_app(
    plane: DataPlane,
    settings: Settings,
    *,
    admin_digest: str | None,
    feedback_digest: str | None = None,
    rollouts: rest_admin.Rollouts | None = None,
    labels: rest_v1.Labels | None = None,
    reconfigure: rest_admin.Reconfigure | None = None,
) -> FastAPI:
    app = FastAPI(
        title="serving gateway",
        description="Low-latency model serving: TF-Serving-style v1 API, the Open Inference "
        "Protocol (v2), health, admin.",
        version="0.1.0",
    )

    async def answer_error(request: Request, exc: Exception) -> Response:
        return rest_v1.error_response(request, exc)

    # One handler; Starlette dispatches these classes separately (Exception last, in
    # its outermost middleware).
    for cls in (ServingError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, answer_error)

    fast = FastRoutes()
    app.include_router(rest_v1.build_router(plane, settings, fast, labels, feedback_digest))
    app.include_router(
        rest_admin.build_router(
            plane, settings, admin_digest=admin_digest, rollouts=rollouts, reconfigure=reconfigure
        )
    )
    app.include_router(rest_v2.build_router(plane, settings, fast))
    platform = platforms.build_router(plane, settings)
    if platform is not None:
        app.include_router(platform)
    app.state.fast_path = fast
    return app
