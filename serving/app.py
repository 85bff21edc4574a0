"""Composition root: the deployments the Serve config names, and what each is made of.

`Gateway` (the ingress) wires the data plane to its parts (routing tables, statistics,
prediction records, fused model workers), the transports to the data plane, and the
servers to the app's lifespan. `RolloutControl`, beside it in the gateway
application, is the control plane: one replica that owns rollout state and deploys
and retires model applications. `gateway_app` and `model_app` are the application
builders the Serve config names (serving.deploy).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving import deploy, redis_conn
from serving.auth import read_token, token_digest
from serving.dataplane import DataPlane
from serving.dataplane.invoke import ReplicaHandle
from serving.dataplane.replicas import ReplicaWatch
from serving.dataplane.routing import served_versions
from serving.errors import ConfigError, InvalidInput, NotReady, ServingError
from serving.listeners import keep_replica_grpc_on_loopback
from serving.models.mlflow_source import MlflowUnavailable, is_mlflow_uri, rollout_body
from serving.models.registry import Registry
from serving.models.replica import ModelReplica
from serving.models.worker import ModelWorker
from serving.observability.feedback import FeedbackStore
from serving.quality.predlog import PredictionLog
from serving.quality.retrain import Retrainer
from serving.rollouts.controller import RolloutController
from serving.rollouts.view import RolloutView
from serving.settings import BatchingOverride, DeploymentFile, Settings
from serving.transport.claims import PortClaims
from serving.transport.direct_http import (
    ConnectionLimits,
    DirectHttpServer,
    Service,
    with_servers,
)
from serving.transport.grpc import GrpcServer
from serving.transport.http_app import build_http_app


def _replica_handle(model: str, version: str) -> ReplicaHandle:
    handle: ReplicaHandle = serve.get_deployment_handle(
        "ModelReplica", app_name=deploy.model_app_name(model, version)
    )
    return handle


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """The HTTP and gRPC ingress; the ASGI app is built after __init__ inside the replica."""

    def __init__(
        self,
        settings: dict[str, Any],
        deployment: dict[str, Any],
        admin_token_sha256: str | None,
        control: DeploymentHandle,
        feedback_token_sha256: str | None = None,
    ) -> None:
        keep_replica_grpc_on_loopback()
        s, self._dep = _configured(settings, deployment)
        self._settings = s
        # This gateway's ports, or a clear start-up error if another gateway has them.
        ports = {s.grpc_port: ("gRPC", "SERVING_GRPC_PORT")}
        if s.http_mode == "direct":
            ports[s.http_port] = ("HTTP", "SERVING_HTTP_PORT")
        self._claims = PortClaims(ports, _gateway_identity())
        self._claims.claim()
        # Routing tables and statistics; rollout commands go to the control plane.
        self._rollouts = RolloutView(
            s.redis_url, s.redis_namespace, {m: cfg.default for m, cfg in self._dep.models.items()}
        )
        self._control = control
        # The durable prediction and label log, when a PostgreSQL DSN is set.
        self._log = (
            PredictionLog(s.log_dsn, s.log_sample_rate, s.log_max_buffer) if s.log_dsn else None
        )
        self._feedback = FeedbackStore(
            s.redis_url, s.redis_namespace, s.prediction_ttl_s, self._log
        )
        # Fused versions run here, warmed before this replica reports healthy.
        self._local = {
            (m, v): _fused_worker(s, self._dep, m, v)
            for m, cfg in self._dep.models.items()
            for v, vcfg in cfg.versions.items()
            if vcfg.placement == "fused"
        }
        self._plane = DataPlane(
            self._dep,
            s,
            _replica_handle,
            router=self._rollouts.router,
            local=self._local,
            stats=self._rollouts.stats.recorder,
            records=self._feedback,
            log=self._log,
            accuracy=self._feedback,
            watch=(
                ReplicaWatch("ModelReplica", deploy.model_app_name)
                if s.replica_channel == "direct"
                else None
            ),
        )
        # Without a digest in the config (a portable one), the token comes from this
        # process's environment: SERVING_ADMIN_TOKEN, or the file that
        # SERVING_ADMIN_TOKEN_FILE names (e.g. a mounted Kubernetes Secret).
        token = None if admin_token_sha256 else read_token(s)
        self._admin_digest = token_digest(token) if token else admin_token_sha256
        token = None if feedback_token_sha256 else read_token(s, "feedback")
        self._feedback_digest = token_digest(token) if token else feedback_token_sha256
        self._lock: asyncio.Lock | None = None  # made lazily inside the running loop

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Batching of fused versions, from the gateway deployment's `user_config`
        (`{"batching": {"<model>/<version>": {...}}}`): a lightweight update."""
        for key, batching in ((user_config or {}).get("batching") or {}).items():
            model, _, version = key.partition("/")
            worker = self._local.get((model, version))
            if worker is not None:
                worker.reconfigure(batching)

    async def _reconfigure(self, model: str, version: str, override: BatchingOverride) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await _call(self._control.update_batching, model, version, override.model_dump())
            await self._await_batching(model, version, override)

    async def _await_batching(self, model: str, version: str, want: BatchingOverride) -> None:
        """Poll until a replica reports the new values (the controller applies them
        asynchronously); give up quietly after 15 s."""
        deadline = time.monotonic() + 15
        wanted = want.model_dump(exclude_none=True)
        while time.monotonic() < deadline:
            try:
                now = await self._plane.monitor.batching(model, version)
            except Exception:
                now = {}
            if all(now.get(k) == v for k, v in wanted.items()):
                return
            await asyncio.sleep(0.1)

    def __serve_build_asgi_app__(self) -> Any:
        s = self._settings
        app = build_http_app(
            self._plane,
            s,
            admin_digest=self._admin_digest,
            feedback_digest=self._feedback_digest,
            rollouts=_Rollouts(self._rollouts, self._control),
            labels=self._feedback,
            reconfigure=self._reconfigure,
        )
        # The servers and the background loops live as long as the app: Ray Serve runs
        # the app's lifespan on the replica's event loop at start-up and again at
        # graceful shutdown (serving.transport.direct_http.with_servers).
        servers: list[Service] = [
            self._claims,
            GrpcServer(self._plane, s, self._dep.ingress.max_ongoing_requests),
        ]
        if s.http_mode == "direct":
            limits = ConnectionLimits(
                s.http_read_timeout_s, s.http_idle_timeout_s, s.drain_timeout_s
            )
            servers.append(
                DirectHttpServer(app, s.http_host, s.http_port, self._plane.admission, limits)
            )
        lifespan = with_servers(
            app.router.lifespan_context,
            servers,
            _Background(self._rollouts, self._plane, self._log),
        )
        app.router.lifespan_context = lifespan
        return app


def _configured(
    settings: dict[str, Any], deployment: dict[str, Any]
) -> tuple[Settings, DeploymentFile]:
    """A replica's settings (what the config carries wins; the rest, all of it for a
    portable config, from this process's environment) and deployment (whose registry
    SERVING_REGISTRY_DIR overrides)."""
    s = Settings(**settings)
    dep = DeploymentFile.model_validate(deployment)
    if s.registry_dir is not None:
        dep = dep.model_copy(update={"registry": s.registry_dir})
    return s, dep


def _gateway_identity() -> str:
    """The same for every ingress replica of this gateway (its Ray cluster and Serve
    application), different for any other."""
    import ray

    where = f"{ray.get_runtime_context().gcs_address}/{serve.get_replica_context().app_name}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


class _Rollouts:
    """Rollout commands for the admin API: status is read here, commands run in the
    control plane (one replica of RolloutControl), whose errors arrive as they were
    raised there."""

    def __init__(self, view: RolloutView, control: DeploymentHandle) -> None:
        self._view = view
        self._control = control

    async def status(self, model: str) -> dict[str, Any]:
        return await self._view.status(model)

    async def run(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await _call(self._control.run, model, action, body)
        return result

    async def retrain(self, model: str, action: str) -> Any:
        return await _call(self._control.retrain, model, action)


async def _mlflow_source(
    dep: DeploymentFile, s: Settings, model: str, action: str, body: dict[str, Any]
) -> dict[str, Any]:
    """A rollout command naming an MLflow model version (`"to": "models:/fraud@challenger"`,
    or a shadow's `version`): the version is imported into the registry as `m<number>`
    unless there, and the command names that version, with the URI as `source`
    (serving.models.mlflow_source.rollout_body). Any other command passes unchanged."""
    key = {"start": "to", "shadow": "version"}.get(action)
    if key is None or not is_mlflow_uri(body.get(key)):
        return body
    try:
        return await asyncio.to_thread(
            rollout_body, body, key, dep.registry, model, s.mlflow_tracking_uri
        )
    except MlflowUnavailable as exc:
        raise NotReady(str(exc)) from None
    except ConfigError as exc:
        raise InvalidInput(str(exc), field=key) from None


async def _call(method: Any, *args: Any) -> Any:
    """A call to the control plane; a ServingError raised there is raised here."""
    try:
        return await method.remote(*args)
    except RayTaskError as exc:
        if isinstance(exc.cause, ServingError):
            raise exc.cause from None
        raise


@serve.deployment(name="RolloutControl", num_replicas=1)
class RolloutControl:
    """The control plane: the one owner of rollout state and of deploying and retiring
    model applications (serving.rollouts.controller). One replica, restarted by Serve
    if it dies; a new one resumes running rollouts from Redis."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self, settings: dict[str, Any], deployment: dict[str, Any]
    ) -> None:
        keep_replica_grpc_on_loopback()
        s, self._dep = _configured(settings, deployment)
        self._settings = s
        self._ctl = RolloutController(
            s.redis_url,
            s.redis_namespace,
            {m: cfg.default for m, cfg in self._dep.models.items()},
            self._deploy_versions,
            self._retire_versions,
        )
        await self._ctl.ensure_started()
        self._batching_lock = asyncio.Lock()
        # Retraining policies, acted on while this replica leads the analysis.
        self._retrainer = Retrainer(
            redis_conn.client(s.redis_url),
            s.redis_namespace,
            self._dep,
            self._ctl,
            s.log_dsn,
            s.mlflow_tracking_uri,
        )
        await self._retrainer.ensure_started()

    async def run(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        body = await _mlflow_source(self._dep, self._settings, model, action, body)
        return await self._ctl.run(model, action, body)

    async def retrain(self, model: str, action: str) -> Any:
        """`status`, `history` or `run` (serving.quality.retrain)."""
        async with redis_conn.state_store("retrain", 5.0):
            if action == "status":
                return await self._retrainer.status(model)
            if action == "history":
                return await self._retrainer.history(model)
            if action == "run":
                return await self._retrainer.run(model)
        raise InvalidInput(f"unknown retrain action {action!r}", field="action")

    async def update_batching(self, model: str, version: str, change: dict[str, Any]) -> None:
        async with self._batching_lock:
            override = BatchingOverride.model_validate(change)
            await asyncio.to_thread(deploy.update_batching, model, version, override)

    async def __del__(self) -> None:
        await self._retrainer.close()
        await self._ctl.close()

    async def _deploy_versions(self, model: str, versions: list[str]) -> None:
        # Fused versions run inside the ingress replicas: no application to deploy.
        configured = self._dep.models[model].versions
        versions = [
            v for v in versions if v not in configured or configured[v].placement != "fused"
        ]
        registry = Registry(self._dep.registry)
        for v in versions:
            try:
                registry.get(model, v)
            except ConfigError as exc:
                raise InvalidInput(str(exc), field="to") from None
        try:
            await asyncio.to_thread(
                deploy.ensure_versions, self._settings, self._dep, model, versions, 300.0
            )
        except (ConfigError, TimeoutError) as exc:
            raise NotReady(f"could not deploy {model} {versions}: {exc}") from None

    async def _retire_versions(self, model: str, versions: list[str]) -> None:
        # Never retire what still takes traffic (e.g. a configured, pinned version).
        served = served_versions(self._dep.models[model], self._ctl.router.routed_versions(model))
        gone = [v for v in versions if v not in served]
        if gone:
            await asyncio.to_thread(deploy.retire_versions, model, gone)


class _Background:
    """The routing tables' and statistics' loops and the loop-lag probe, started before
    the servers take requests; on the way out, after they stopped, those and the data
    plane's connections to replicas."""

    def __init__(
        self, rollouts: RolloutView, plane: DataPlane, log: PredictionLog | None = None
    ) -> None:
        self._rollouts = rollouts
        self._plane = plane
        self._log = log
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._rollouts.ensure_started()
        self._probe = asyncio.get_running_loop().create_task(self._plane.admission.probe())

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._rollouts.close()
        self._plane.caller.close()
        if self._log is not None:  # what is still buffered, within its deadline
            await self._log.close()


def _fused_worker(s: Settings, dep: DeploymentFile, model: str, version: str) -> ModelWorker:
    vcfg = dep.models[model].versions[version]
    worker = ModelWorker(
        model,
        version,
        str(dep.registry),
        s.runtime_options(),
        vcfg.warmup.model_dump() if vcfg.warmup else None,
    )
    worker.reconfigure(vcfg.batching.model_dump(exclude_none=True))
    return worker


# ---- application builders (import paths named in the Serve config) -------------------
def gateway_app(args: dict[str, Any]) -> Application:
    # `bind` is added by @serve.deployment, which mypy cannot see through.
    settings = args.get("settings") or {}
    control = RolloutControl.bind(settings, args["deployment"])  # type: ignore[attr-defined]
    app: Application = Gateway.bind(  # type: ignore[attr-defined]
        settings,
        args["deployment"],
        _admin_digest(args),
        control,
        args.get("feedback_token_sha256"),
    )
    return app


def _admin_digest(args: dict[str, Any]) -> str | None:
    """The admin token's digest from the app's args (`serving up` puts it there); a
    plain `admin_token` (a config written by hand) is hashed here, so the replica
    never keeps it. None: the replica reads it from its own environment."""
    if args.get("admin_token_sha256"):
        return str(args["admin_token_sha256"])
    return token_digest(args["admin_token"]) if args.get("admin_token") else None


def model_app(args: dict[str, Any]) -> Application:
    app: Application = ModelReplica.bind(  # type: ignore[attr-defined]
        args["model"],
        args["version"],
        args["registry"],
        args.get("runtime"),
        args.get("warmup"),
        args.get("max_in_flight", 1024),
    )
    return app
