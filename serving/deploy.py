"""The Serve config: the declarative document that deploys the gateway, and the calls
that apply it, change it and wait for it.

Every model version is its own Serve *application* (`model-<name>-<version>`, no HTTP
route), and the ingress is the `gateway` application. All are deployed together from one
declarative Serve config (the same shape a KubeRay RayService embeds), so:
- changing a version's `user_config` (batching) is a lightweight update: replicas are
  reconfigured in place, never restarted;
- adding or retiring a version touches only that version's application.
The import paths it names (`serving.app:gateway_app`, `serving.app:model_app`,
`serving.observability.autoscale:LatencyPolicy`) are where Ray finds the code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve

from serving.auth import read_token, token_digest
from serving.errors import ConfigError
from serving.models.registry import Registry
from serving.settings import (
    BatchingOverride,
    DeploymentFile,
    IngressConfig,
    Settings,
    VersionConfig,
)

GATEWAY_APP = "gateway"


def model_app_name(model: str, version: str) -> str:
    """The Ray Serve application that hosts one model version."""
    return f"model-{model}-{version}"


def model_app_config(
    settings: Settings | None, registry_root: Path, model: str, version: str, vcfg: VersionConfig
) -> dict[str, Any]:
    """The Serve application hosting one model version. Without `settings` (a portable
    config) the replica takes its runtime options from its own environment."""
    manifest = Registry(registry_root).get(model, version).manifest
    max_batch = vcfg.batching.max_batch_size or manifest.batching.max_batch_size
    max_ongoing = max(2 * max_batch, 16)
    d: dict[str, Any] = {
        "name": "ModelReplica",
        # Requests per replica, not instances: keep room for a full batch of
        # single-instance requests plus the next one queueing (ray #43288).
        "max_ongoing_requests": max_ongoing,
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
        a = vcfg.autoscaling
        # Our policies, from what each replica reports itself (record_autoscaling_stats):
        # Ray's default one counts only handle calls, not the direct channel's requests.
        policy, kwargs = (
            ("LatencyPolicy", {"slo_ms": a.latency_slo_ms})
            if a.latency_slo_ms is not None
            else ("OngoingPolicy", {"target": a.target_ongoing_requests})
        )
        d["autoscaling_config"] = {
            **a.model_dump(exclude={"latency_slo_ms"}),
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
            "policy": {
                "policy_function": f"serving.observability.autoscale:{policy}",
                "policy_kwargs": {"model": model, "version": version, **kwargs},
            },
        }
    else:
        d["num_replicas"] = vcfg.num_replicas
    return {
        "name": model_app_name(model, version),
        "route_prefix": None,
        "import_path": "serving.app:model_app",
        "args": {
            "model": model,
            "version": version,
            "registry": str(registry_root),
            "runtime": settings.runtime_options() if settings is not None else None,
            "warmup": vcfg.warmup.model_dump() if vcfg.warmup else None,
            # The direct channel's bound: what Serve would hold, running or queued.
            "max_in_flight": max_ongoing + vcfg.max_queued_requests,
        },
        "deployments": [d],
    }


def resolved(dep: DeploymentFile) -> DeploymentFile:
    """The deployment with its paths made absolute against this process's directory
    (the registry, each retrain command's working directory): what replicas on any
    node, started anywhere, must be given."""
    models = {}
    for name, mcfg in dep.models.items():
        if mcfg.retrain is not None:
            workdir = (mcfg.retrain.workdir or Path(".")).resolve()
            retrain = mcfg.retrain.model_copy(update={"workdir": workdir})
            mcfg = mcfg.model_copy(update={"retrain": retrain})
        models[name] = mcfg
    return dep.model_copy(update={"registry": dep.registry.resolve(), "models": models})


def version_config(dep: DeploymentFile, model: str, version: str) -> VersionConfig:
    """A version's deployment settings: its own, else those of the model's default."""
    versions = dep.models[model].versions
    return versions.get(version) or versions[dep.models[model].default]


def serve_config(
    settings: Settings,
    dep: DeploymentFile,
    admin_token: str | None,
    extra_versions: dict[str, set[str]] | None = None,
    *,
    portable: bool = False,
) -> dict[str, Any]:
    """The declarative Serve config for the whole gateway (ServeDeploySchema shape).
    `extra_versions` adds versions that rollouts route to (read back from Redis).

    `serving up` bakes its own settings into the config (every replica, on any node,
    runs with the driver's). A `portable` config (`serving config render`, for another
    machine or a cluster) holds no process settings, no absolute path and no token:
    each replica reads SERVING_* (Redis URL, registry, admin token, ports) from the
    environment it runs in, and paths stay as the deployment file writes them."""
    if not portable:
        dep = resolved(dep)
    feedback = read_token(settings, "feedback")
    apps: list[dict[str, Any]] = [
        {
            "name": GATEWAY_APP,
            "route_prefix": "/",
            "import_path": "serving.app:gateway_app",
            "args": {
                "settings": (
                    {}
                    if portable
                    else settings.model_dump(mode="json", exclude={"admin_token", "feedback_token"})
                ),
                "deployment": dep.model_dump(mode="json", exclude_defaults=portable),
                "admin_token_sha256": (
                    token_digest(admin_token) if admin_token and not portable else None
                ),
                "feedback_token_sha256": (
                    token_digest(feedback) if feedback and not portable else None
                ),
            },
            "deployments": [
                _gateway_deployment(settings, dep.ingress),
                # The control plane (rollouts, deploying versions): one small replica,
                # wherever it fits (no CPU reserved: it mostly waits on Redis).
                {
                    "name": "RolloutControl",
                    "num_replicas": 1,
                    "ray_actor_options": {"num_cpus": 0},
                },
            ],
        }
    ]
    for model, mcfg in dep.models.items():
        fused = {v for v, c in mcfg.versions.items() if c.placement == "fused"}
        versions = set(mcfg.versions) | (extra_versions or {}).get(model, set())
        for version in sorted(versions - fused):
            apps.append(
                model_app_config(
                    None if portable else settings,
                    dep.registry,
                    model,
                    version,
                    version_config(dep, model, version),
                )
            )
    return {"applications": apps}


def _gateway_deployment(settings: Settings, ingress: IngressConfig) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": ingress.num_cpus}
    if ingress.custom_resources:
        actor["resources"] = dict(ingress.custom_resources)
    d: dict[str, Any] = {
        "name": "Gateway",
        "num_replicas": ingress.num_replicas,
        "max_ongoing_requests": ingress.max_ongoing_requests,
        "ray_actor_options": actor,
        # Serve checks for its own requests every wait_loop_s before it runs the app's
        # shutdown, which drains ours (direct HTTP, gRPC) within drain_timeout_s; then
        # it waits no longer than this.
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s + 5.0,
    }
    if ingress.max_replicas_per_node:
        d["max_replicas_per_node"] = ingress.max_replicas_per_node
    return d


def ensure_versions(
    settings: Settings, dep: DeploymentFile, model: str, versions: list[str], timeout_s: float
) -> None:
    """Deploy the versions' applications that are missing (others untouched) and wait
    until every one of them is running."""
    registry_root = dep.registry.resolve()
    config = deployed_config()
    present = {a["name"] for a in config["applications"]}
    missing = [v for v in versions if model_app_name(model, v) not in present]
    for v in missing:
        config["applications"].append(
            model_app_config(settings, registry_root, model, v, version_config(dep, model, v))
        )
    if missing:
        apply_config(config)
    wait_until_running([model_app_name(model, v) for v in versions], timeout_s)


def retire_versions(model: str, versions: list[str]) -> None:
    """Remove the versions' applications; Serve drains their in-flight requests."""
    names = {model_app_name(model, v) for v in versions}
    config = deployed_config()
    kept = [a for a in config["applications"] if a["name"] not in names]
    if len(kept) != len(config["applications"]):
        apply_config({"applications": kept})


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


def ingress_nodes() -> list[str]:
    """The addresses of the nodes that run a running ingress replica: the front doors
    (in a cluster each ingress replica serves HTTP and gRPC on its node's address)."""
    details = _client().get_serve_details()
    gateway = details.get("applications", {}).get(GATEWAY_APP, {})
    replicas = gateway.get("deployments", {}).get("Gateway", {}).get("replicas", [])
    return sorted({r["node_ip"] for r in replicas if r.get("state") == "RUNNING"})


def update_batching(model: str, version: str, override: BatchingOverride) -> None:
    """Merge a batching change into the version's user_config and re-apply the config:
    a lightweight update that reaches every replica through `reconfigure`."""
    config = deployed_config()
    name = model_app_name(model, version)
    change = override.model_dump(exclude_none=True)
    for app in config["applications"]:
        if app["name"] == name:
            dep = app["deployments"][0]
            dep["user_config"] = {**(dep.get("user_config") or {}), **change}
            break
    else:
        # A fused version: its batching lives in the gateway deployment's user_config.
        gateway = next(a for a in config["applications"] if a["name"] == GATEWAY_APP)
        models = DeploymentFile.model_validate(gateway["args"]["deployment"]).models
        vcfg = models[model].versions.get(version) if model in models else None
        if vcfg is None or vcfg.placement != "fused":
            raise ConfigError(f"application {name} is not deployed")
        deployments = gateway.setdefault("deployments", [{"name": "Gateway"}])
        user = deployments[0].setdefault("user_config", {}) or {}
        key = f"{model}/{version}"
        user.setdefault("batching", {})[key] = {**user.get("batching", {}).get(key, {}), **change}
        deployments[0]["user_config"] = user
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
            n: _failure(status.applications[n])
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


def _failure(app: Any) -> str:
    """An application's failure: its message, and each failed deployment's last line
    (the exception a replica raised, not Serve's whole traceback)."""
    why = [app.message]
    for name, d in app.deployments.items():
        if d.status.value in ("DEPLOY_FAILED", "UNHEALTHY") and d.message:
            lines = [line.strip() for line in d.message.strip().splitlines() if line.strip()]
            why.append(f"{name}: {lines[-1]}")
    return "; ".join(why)


def app_names(dep: DeploymentFile) -> list[str]:
    """The Serve applications a deployment file makes (fused versions have none)."""
    return [GATEWAY_APP] + [
        model_app_name(m, v)
        for m, cfg in dep.models.items()
        for v, vcfg in cfg.versions.items()
        if vcfg.placement != "fused"
    ]
