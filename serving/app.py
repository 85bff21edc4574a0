"""Composition root: builds the Ray Serve config and the deployments it names.

Every model version is its own Serve *application* (`model-<name>-<version>`, no HTTP
route), and the ingress is the `gateway` application. All are deployed together from one
declarative Serve config (the same shape a KubeRay RayService embeds), so:
- changing a version's `user_config` (batching) is a lightweight update: replicas are
  reconfigured in place, never restarted;
- adding or retiring a version touches only that version's application.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve import Application

from serving.errors import ConfigError
from serving.http import build_http_app
from serving.pipeline import Pipeline, ReplicaHandle, model_app_name
from serving.registry import Registry
from serving.replica import ModelReplica
from serving.settings import BatchingOverride, DeploymentFile, Settings

log = logging.getLogger(__name__)

GATEWAY_APP = "gateway"


def _replica_handle(model: str, version: str) -> ReplicaHandle:
    handle: ReplicaHandle = serve.get_deployment_handle(
        "ModelReplica", app_name=model_app_name(model, version)
    )
    return handle


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """The HTTP ingress; the ASGI app is built after __init__ inside the replica."""

    def __init__(
        self, settings: dict[str, Any], deployment: dict[str, Any], admin_token: str | None
    ) -> None:
        self._settings = Settings.model_validate(settings)
        self._dep = DeploymentFile.model_validate(deployment)
        self._pipeline = Pipeline(self._dep, self._settings, _replica_handle)
        self._admin_token = admin_token
        self._lock: asyncio.Lock | None = None  # made lazily inside the running loop

    async def _reconfigure(self, model: str, version: str, override: BatchingOverride) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await asyncio.to_thread(update_batching, model, version, override)
            await self._await_batching(model, version, override)

    async def _await_batching(self, model: str, version: str, want: BatchingOverride) -> None:
        """Poll until a replica reports the new values (the controller applies them
        asynchronously); give up quietly after 15 s."""
        deadline = time.monotonic() + 15
        wanted = want.model_dump(exclude_none=True)
        while time.monotonic() < deadline:
            try:
                now = await self._pipeline.batching(model, version)
            except Exception:
                now = {}
            if all(now.get(k) == v for k, v in wanted.items()):
                return
            await asyncio.sleep(0.1)

    def __serve_build_asgi_app__(self) -> Any:
        return build_http_app(
            self._pipeline,
            self._settings,
            admin_token=self._admin_token,
            reconfigure=self._reconfigure,
        )


# ---- application builders (import paths named in the Serve config) -------------------
def gateway_app(args: dict[str, Any]) -> Application:
    # `bind` is added by @serve.deployment, which mypy cannot see through.
    app: Application = Gateway.bind(  # type: ignore[attr-defined]
        args["settings"], args["deployment"], args.get("admin_token")
    )
    return app


def model_app(args: dict[str, Any]) -> Application:
    app: Application = ModelReplica.bind(  # type: ignore[attr-defined]
        args["model"], args["version"], args["registry"], args["runtime"], args.get("warmup")
    )
    return app


# ---- the Serve config ------------------------------------------------------------------
def serve_config(
    settings: Settings, dep: DeploymentFile, admin_token: str | None
) -> dict[str, Any]:
    """The declarative Serve config for the whole gateway (ServeDeploySchema shape)."""
    registry_root = dep.registry.resolve()
    dep = dep.model_copy(update={"registry": registry_root})
    registry = Registry(registry_root)
    runtime = {
        "device": settings.device,
        "onnx_intra_op_threads": settings.onnx_intra_op_threads,
        "torch_threads": settings.torch_threads,
    }
    apps: list[dict[str, Any]] = [
        {
            "name": GATEWAY_APP,
            "route_prefix": "/",
            "import_path": "serving.app:gateway_app",
            "args": {
                "settings": settings.model_dump(mode="json", exclude={"admin_token"}),
                "deployment": dep.model_dump(mode="json"),
                "admin_token": admin_token,
            },
            "deployments": [
                {
                    "name": "Gateway",
                    "num_replicas": dep.ingress.num_replicas,
                    "max_ongoing_requests": dep.ingress.max_ongoing_requests,
                    "ray_actor_options": {"num_cpus": dep.ingress.num_cpus},
                }
            ],
        }
    ]
    for model, mcfg in dep.models.items():
        for version, vcfg in mcfg.versions.items():
            manifest = registry.get(model, version).manifest
            max_batch = vcfg.batching.max_batch_size or manifest.batching.max_batch_size
            d: dict[str, Any] = {
                "name": "ModelReplica",
                # Requests per replica, not instances: keep room for a full batch of
                # single-instance requests plus the next one queueing (ray #43288).
                "max_ongoing_requests": max(2 * max_batch, 16),
                "max_queued_requests": vcfg.max_queued_requests,
                "user_config": vcfg.batching.model_dump(exclude_none=True),
                "ray_actor_options": {
                    "num_cpus": (
                        vcfg.resources.num_cpus
                        if vcfg.resources.num_cpus is not None
                        else manifest.resources.num_cpus
                    ),
                    "num_gpus": (
                        vcfg.resources.num_gpus
                        if vcfg.resources.num_gpus is not None
                        else manifest.resources.num_gpus
                    ),
                },
            }
            if vcfg.autoscaling is not None:
                d["autoscaling_config"] = vcfg.autoscaling.model_dump()
            else:
                d["num_replicas"] = vcfg.num_replicas
            apps.append(
                {
                    "name": model_app_name(model, version),
                    "route_prefix": None,
                    "import_path": "serving.app:model_app",
                    "args": {
                        "model": model,
                        "version": version,
                        "registry": str(registry_root),
                        "runtime": runtime,
                        "warmup": vcfg.warmup.model_dump() if vcfg.warmup else None,
                    },
                    "deployments": [d],
                }
            )
    return {"applications": apps}


# ---- talking to the Serve controller -----------------------------------------------------
def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def apply_config(config: dict[str, Any]) -> None:
    """Hand the whole config to the Serve controller (returns before it is running)."""
    from ray.serve.schema import ServeDeploySchema

    _client().deploy_apps(ServeDeploySchema.model_validate(config))


def deployed_config() -> dict[str, Any]:
    """The Serve config now in force, read back from the controller."""
    details = _client().get_serve_details()
    apps = [
        a["deployed_app_config"]
        for a in details.get("applications", {}).values()
        if a.get("deployed_app_config")
    ]
    return {"applications": apps}


def update_batching(model: str, version: str, override: BatchingOverride) -> None:
    """Merge a batching change into the version's user_config and re-apply the config:
    a lightweight update that reaches every replica through `reconfigure`."""
    config = deployed_config()
    name = model_app_name(model, version)
    for app in config["applications"]:
        if app["name"] == name:
            dep = app["deployments"][0]
            dep["user_config"] = {
                **(dep.get("user_config") or {}),
                **override.model_dump(exclude_none=True),
            }
            break
    else:
        raise ConfigError(f"application {name} is not deployed")
    apply_config(config)


def wait_until_running(
    app_names: list[str],
    timeout_s: float,
    progress: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Poll Serve until every app is RUNNING; raise with the controller's message if
    one fails to deploy or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status()
        states = {
            n: (status.applications[n].status.value if n in status.applications else "NOT_STARTED")
            for n in app_names
        }
        if progress is not None:
            progress(states)
        failed = {
            n: status.applications[n].message
            for n, s in states.items()
            if s in ("DEPLOY_FAILED", "UNHEALTHY")
        }
        if failed:
            raise ConfigError(
                "deployment failed:\n" + "\n".join(f"  {n}: {m}" for n, m in failed.items())
            )
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.25)


def app_names(dep: DeploymentFile) -> list[str]:
    return [GATEWAY_APP] + [
        model_app_name(m, v) for m, cfg in dep.models.items() for v in cfg.versions
    ]
