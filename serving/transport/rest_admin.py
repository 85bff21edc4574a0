"""REST admin routes (bearer token): rollouts, live batching, monitoring of a version."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from serving.auth import bearer_ok
from serving.dataplane import DataPlane
from serving.errors import MalformedRequest, ServingError, Unauthenticated
from serving.settings import BatchingOverride, Settings
from serving.transport.http import json_response, read_json

Reconfigure = Callable[[str, str, BatchingOverride], Awaitable[None]]


class Rollouts(Protocol):
    """Rollout commands and status (serving.rollouts.controller.RolloutController)."""

    async def run(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def status(self, model: str) -> dict[str, Any]: ...

    async def retrain(self, model: str, action: str) -> Any:
        """Retraining (serving.quality.retrain): `status`, `history` or `run`."""


class BatchingUpdate(BaseModel):
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    inline_when_idle: bool | None = None


def build_router(
    plane: DataPlane,
    settings: Settings,
    *,
    admin_digest: str | None,
    rollouts: Rollouts | None,
    reconfigure: Reconfigure | None,
) -> APIRouter:
    router = APIRouter(tags=["admin"])

    def check(request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization", ""), admin_digest):
            raise Unauthenticated("admin API needs 'Authorization: Bearer <token>'")

    def available(what: str, part: Any) -> Any:
        if part is None:
            raise ServingError(f"{what} is not available in this process")
        return part

    @router.get("/admin/v1/models/{name}/versions/{version}/monitoring")
    async def monitoring(name: str, version: str, request: Request) -> Response:
        """Accuracy from delayed labels and drift (PSI) as this replica sees them."""
        check(request)
        return json_response(await plane.monitor.monitoring(name, version))

    @router.get("/admin/v1/models/{name}/rollout")
    async def rollout_status(name: str, request: Request) -> Response:
        """Routing table, rollout state, canary vs stable figures and decision history."""
        check(request)
        plane.catalog.resolve(name, None)
        return json_response(await available("rollouts", rollouts).status(name))

    @router.post("/admin/v1/models/{name}/rollout")
    async def rollout_command(name: str, request: Request) -> Response:
        """Rollout commands: `{"action": "start", "to": "v3", "steps": [5, 25, 50, 100],
        "interval_s": 60, "max_error_rate": 0.01, "max_p99_ms": 50, "min_requests": 100,
        "sticky_key": "user_id"}`, or action `pause`, `resume`, `promote`, `rollback`,
        `set_weight` (`percent`), `shadow` (`version`, `sample`, or `off: true`)."""
        check(request)
        plane.catalog.resolve(name, None)
        body = await read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            raise MalformedRequest("body must be an object with an 'action'", field="action")
        action = body.pop("action")
        return json_response(await available("rollouts", rollouts).run(name, action, body))

    @router.get("/admin/v1/models/{name}/retrain")
    async def retrain_status(name: str, request: Request) -> Response:
        """The model's retrain policy, its latest run and the cool-down left."""
        check(request)
        plane.catalog.resolve(name, None)
        return json_response(await available("rollouts", rollouts).retrain(name, "status"))

    @router.get("/admin/v1/models/{name}/retrain/history")
    async def retrain_history(name: str, request: Request) -> Response:
        """Past retraining runs, newest first: reason, outcome, output tail, rollout."""
        check(request)
        plane.catalog.resolve(name, None)
        runs = await available("rollouts", rollouts).retrain(name, "history")
        return json_response({"model": name, "runs": runs})

    @router.post("/admin/v1/models/{name}/retrain")
    async def retrain_run(name: str, request: Request) -> Response:
        """Retrain now with the model's policy (the cool-down does not apply; a run or
        rollout in progress, or the cap on runs at once, is a 409)."""
        check(request)
        plane.catalog.resolve(name, None)
        return json_response(await available("rollouts", rollouts).retrain(name, "run"))

    @router.get("/admin/v1/models/{name}/versions/{version}/batching")
    async def get_batching(name: str, version: str, request: Request) -> Response:
        """Batching parameters a replica of this version runs with now."""
        check(request)
        return json_response(await plane.monitor.batching(name, version))

    @router.put(
        "/admin/v1/models/{name}/versions/{version}/batching",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": BatchingUpdate.model_json_schema()}},
            }
        },
    )
    async def put_batching(name: str, version: str, request: Request) -> Response:
        """Change batching on the running deployment (Ray Serve reconfigure; no restart)."""
        check(request)  # before the body is read: no work for a caller without the token
        plane.catalog.resolve(name, version)
        body = await read_json(request, settings.max_body_bytes)
        try:
            update = BatchingUpdate.model_validate(body)
        except ValidationError as exc:  # answered as FastAPI's own body validation is
            raise RequestValidationError(exc.errors()) from None
        try:
            override = BatchingOverride.model_validate(update.model_dump())
        except ValueError as exc:
            raise MalformedRequest(str(exc)) from None
        await available("reconfiguration", reconfigure)(name, version, override)
        return json_response(
            {"model": name, "version": version, **override.model_dump(exclude_none=True)}
        )

    return router
