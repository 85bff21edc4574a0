"""Settings, read in one place.

Process-level settings come from the environment (prefix `SERVING_`) through
`Settings`; the topology of a deployment (which model versions run, how many replicas,
batching overrides) comes from one YAML file under `deployments/`, validated by
`DeploymentFile`. Nothing else in the package reads `os.environ` or YAML config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.errors import ConfigError
from serving.quality.policy import RetrainPolicy


class Settings(BaseSettings):
    """Process settings; every field can be set as `SERVING_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="SERVING_", extra="ignore", populate_by_name=True)

    config: Path = Path("deployments/local.yaml")
    registry_dir: Path | None = None  # overrides the deployment file's `registry`

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # `direct`: each ingress replica serves HTTP on http_port itself (no proxy hop) and
    # Ray Serve's proxy listens on ray_proxy_port; `proxy`: Ray's proxy on http_port;
    # `haproxy`: Ray's HAProxy ingress on http_port (RAY_SERVE_ENABLE_HA_PROXY=1, which
    # `serving up` sets for the local cluster it starts; a joined cluster must run so).
    http_mode: Literal["direct", "proxy", "haproxy"] = "direct"
    ray_proxy_port: int = 8001
    grpc_port: int = 9000  # gRPC (Open Inference Protocol), in every ingress replica
    # `h2`: gRPC's HTTP/2 served on the replica's event loop (transport/grpc_h2.py);
    # `grpcio`: grpc.aio's server (its C core, with a polling thread of its own).
    grpc_server: Literal["h2", "grpcio"] = "h2"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Join an existing Ray cluster when set (RAY_ADDRESS is honoured too); otherwise
    # `serving up` starts a local one sized by ray_num_cpus (None: all cores).
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("SERVING_RAY_ADDRESS", "RAY_ADDRESS")
    )
    ray_num_cpus: float | None = None

    # Request limits: bodies and instance counts above these get 413.
    max_body_bytes: int = 4 * 1024 * 1024
    max_instances: int = 1024
    # Deadline for one prediction, end to end inside the gateway; a client may ask for
    # less with the `x-request-timeout-ms` header, never for more.
    request_timeout_s: float = 10.0
    # Connections (direct HTTP): a request's headers and body (and a new connection's
    # first request) must arrive within http_read_timeout_s; idle keep-alive connections
    # close after http_idle_timeout_s. Stopping, an ingress replica answers what it has
    # read (HTTP and gRPC) within drain_timeout_s.
    http_read_timeout_s: float = Field(default=10.0, gt=0)
    http_idle_timeout_s: float = Field(default=75.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, ge=0)
    # How long readiness probes wait for a model replica before calling it not ready.
    ready_probe_timeout_s: float = 1.0

    # Runtime threads per replica. Small by default: replicas share a small machine.
    onnx_intra_op_threads: int = 1
    torch_threads: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A version whose batch of one runs faster than this (measured at start-up) answers a
    # request that is alone on the event loop itself: for such a model the hand-off to
    # the inference thread and back costs about what the model does, and a lone request
    # has no company to batch with. 0: never.
    inline_infer_max_ms: float = Field(default=0.5, ge=0)
    # How the ingress reaches model versions on replicas: `direct` (each replica's own
    # endpoint, which Serve publishes; a Serve handle until it has) or `handle` (Ray
    # Serve handles only).
    replica_channel: Literal["direct", "handle"] = "direct"

    # Prefix of every key the gateway keeps in Redis (serving.keys): features, routing
    # and rollout state, statistics, prediction records. SERVING_FEATURE_NAMESPACE,
    # its first name, is still read when SERVING_REDIS_NAMESPACE is not set.
    redis_namespace: str = Field(
        default="serving",
        validation_alias=AliasChoices(
            "SERVING_REDIS_NAMESPACE", "SERVING_FEATURE_NAMESPACE", "redis_namespace"
        ),
    )
    # Online features (Redis).
    # Deadline for one request's feature round trip; past it the model's policy applies.
    feature_timeout_s: float = 0.020
    # In-process cache of looked-up entities (seconds; 0 turns it off).
    feature_cache_ttl_s: float = 0.0
    redis_max_connections: int = 16

    # Prediction records kept for joining delayed labels (POST /v1/feedback).
    prediction_ttl_s: float = 24 * 3600.0
    # The durable prediction and label log (serving.quality.predlog): a PostgreSQL DSN
    # (None: no log), the share of requests logged (decided per request id, so a
    # request is logged whole or not; labels are always logged) and the rows an ingress
    # replica buffers while PostgreSQL is slow or down (beyond: dropped and counted).
    log_dsn: str | None = None
    log_sample_rate: float = Field(default=1.0, ge=0, le=1)
    log_max_buffer: int = Field(default=50_000, ge=1)
    # Ray's per-node metrics endpoint (every replica on the node), for Prometheus.
    metrics_port: int = 8080

    # Managed clouds' container contracts (serving.transport.platforms): `none`, or
    # the platform whose routes, port and artifact location the gateway follows
    # (`serving serve` is SageMaker's; Vertex AI and Azure ML are found by their
    # environment). The platform's predict route serves platform_model (default: the
    # deployment's first model).
    platform: Literal["none", "sagemaker", "vertex", "azureml"] = "none"
    platform_model: str | None = None
    platform_health_route: str | None = None
    platform_ready_route: str | None = None
    platform_predict_route: str | None = None

    admin_token: str | None = None
    admin_token_file: Path = Path.home() / ".config" / "serving" / "admin-token"
    # Where `models:/...` sources are imported from (serving.models.mlflow_source).
    # None: MLflow's own MLFLOW_TRACKING_URI.
    mlflow_tracking_uri: str | None = None
    # A trusted label source (a batch job joining outcomes) posts labels for any
    # prediction with this bearer token; any other caller needs each answer's own
    # feedback key. Never the admin token.
    feedback_token: str | None = None
    feedback_token_file: Path = Path.home() / ".config" / "serving" / "feedback-token"

    def runtime_options(self) -> dict[str, Any]:
        """How a model version's runtime is set up (serving.models.worker)."""
        return {
            "device": self.device,
            "onnx_intra_op_threads": self.onnx_intra_op_threads,
            "torch_threads": self.torch_threads,
            "inline_infer_max_s": self.inline_infer_max_ms / 1000,
        }

    def proxy_port(self) -> int:
        """Where Ray Serve's own HTTP proxy listens."""
        return self.ray_proxy_port if self.http_mode == "direct" else self.http_port

    def gateway_url(self) -> str:
        """Where a client on this host reaches the gateway: a wildcard bind address
        (all interfaces) is reached on loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            self.http_host, self.http_host
        )
        return (
            f"http://[{host}]:{self.http_port}"
            if ":" in host
            else f"http://{host}:{self.http_port}"
        )

    def grpc_target(self) -> str:
        """host:port of the Open Inference Protocol gRPC service."""
        return f"{self.http_host}:{self.grpc_port}"


class BatchingOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0, le=10)
    # A lone one-row request runs on the event loop itself (no thread hand-off): None
    # decides by the batch of one's time at start-up (SERVING_INLINE_INFER_MAX_MS).
    inline_when_idle: bool | None = None


class WarmupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(default=3, ge=0)
    # Keep warming for at least this long (lets allocators and JITs settle).
    min_seconds: float = Field(default=0.0, ge=0)


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    # With an SLO, the latency-aware policy (serving.autoscale) decides instead of
    # Ray's default queue-length policy: scale up while queue wait + inference p95 is
    # above it, down when it is well below.
    latency_slo_ms: float | None = Field(default=None, gt=0)
    upscale_delay_s: float = Field(default=3.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ResourcesOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)


class VersionConfig(BaseModel):
    """Deployment-side settings for one model version; unset fields use the manifest."""

    model_config = ConfigDict(extra="forbid")

    # `replica`: the version is its own Ray Serve deployment (scaled on its own);
    # `fused`: it runs inside every ingress replica, one Ray hop less per request.
    placement: Literal["replica", "fused"] = "replica"
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    batching: BatchingOverride = BatchingOverride()
    resources: ResourcesOverride = ResourcesOverride()
    warmup: WarmupConfig | None = None
    # Ray Serve queues without bound by default; a bound turns overload into a fast 503.
    max_queued_requests: int = Field(default=256, ge=1)
    # An MLflow model version (models:/NAME/VERSION, models:/NAME@ALIAS) that `serving up`
    # imports as this one, with these manifest keys over its tags; allow_pickle: trust it
    # with a scikit-learn model (unpickled to convert). See serving.models.mlflow_source.
    source: str | None = Field(default=None, pattern=r"^models:/[^/@]+(/[0-9]+|@[\w-]+)$")
    manifest: dict[str, Any] = Field(default_factory=dict)
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _fused_scales_with_ingress(self) -> VersionConfig:
        if self.placement == "fused" and (self.autoscaling is not None or self.num_replicas != 1):
            raise ValueError("a fused version scales with the ingress: no replicas/autoscaling")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str
    versions: dict[str, VersionConfig]
    retrain: RetrainPolicy | None = None

    @model_validator(mode="after")
    def _default_is_served(self) -> ModelConfig:
        if self.default not in self.versions:
            raise ValueError(f"default version {self.default!r} is not among versions")
        return self


class IngressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    max_ongoing_requests: int = Field(default=512, ge=1)
    # The in-flight limit adapts below max_ongoing_requests so that requests queue no
    # longer than this (serving.dataplane.admission).
    target_queue_delay_ms: float = Field(default=20.0, gt=0)
    # ... and so that the replica's event loop runs late by no more than this (a probe
    # every few ms measures it): what a refusal or any read waits for.
    target_loop_lag_ms: float = Field(default=5.0, gt=0)
    # Placement in a cluster: at most this many ingress replicas per node, and custom
    # Ray resources each one asks for (a node group that offers them hosts the ingress).
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    custom_resources: dict[str, float] = Field(default_factory=dict)


class FeatureTable(BaseModel):
    """A feature table `serving up` loads into Redis when its entities are absent."""

    model_config = ConfigDict(extra="forbid")

    view: str
    path: Path
    entity_column: str | None = None


class DeploymentFile(BaseModel):
    """Schema of `deployments/*.yaml`."""

    model_config = ConfigDict(extra="forbid")

    registry: Path = Path("models")
    feature_tables: list[FeatureTable] = Field(default_factory=list)
    ingress: IngressConfig = IngressConfig()
    models: dict[str, ModelConfig]
    # Retraining commands running at once, all models together (the rest wait).
    retrain_max_concurrent: int = Field(default=1, ge=1)


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def validate_file(path: Path, model: type[BaseModel], data: Any) -> Any:
    """Validate `data` read from `path`, raising ConfigError naming file and fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from exc


def load_deployment(path: Path, registry_override: Path | None = None) -> DeploymentFile:
    """Read a deployment file; a relative registry path is taken from the CWD."""
    dep: DeploymentFile = validate_file(path, DeploymentFile, read_yaml(path))
    if registry_override is not None:
        dep = dep.model_copy(update={"registry": registry_override})
    return dep


# ---- managed clouds' environments (serving.transport.platforms serves their routes) ----
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
VERTEX_MAX_BODY_BYTES = 1_500_000  # Vertex AI's documented online prediction limit
# Routes each platform answers: (health or liveness, readiness, predict).
ROUTES = {
    "sagemaker": ("/ping", "/ping", "/invocations"),
    "vertex": ("/health", "/health", "/predict"),
    "azureml": ("/", "/ready", "/score"),
}


def platform_settings(s: Settings, env: Mapping[str, str]) -> Settings:
    """The settings a platform's environment implies, where the user set nothing else
    (an explicit SERVING_* always wins). `platform` comes from SERVING_PLATFORM, from
    `serving serve` (SageMaker), or from the variables Vertex and Azure ML set."""
    platform = s.platform
    if platform == "none":
        if "AIP_HTTP_PORT" in env:
            platform = "vertex"
        elif "AZUREML_MODEL_DIR" in env:
            platform = "azureml"
        else:
            return s
    explicit = s.model_fields_set
    update: dict[str, Any] = {"platform": platform}

    def default(field: str, value: Any) -> None:
        if field not in explicit and value is not None:
            update[field] = value

    health, ready, predict = ROUTES[platform]
    if platform == "sagemaker":
        default("http_port", int(env.get("SAGEMAKER_BIND_TO_PORT", "8080")))
        default("registry_dir", SAGEMAKER_MODEL_DIR)
    elif platform == "vertex":
        default("http_port", int(env["AIP_HTTP_PORT"]) if "AIP_HTTP_PORT" in env else None)
        health = env.get("AIP_HEALTH_ROUTE", health)
        ready = health
        predict = env.get("AIP_PREDICT_ROUTE", predict)
        uri = env.get("AIP_STORAGE_URI")
        if uri and "://" in uri:
            raise ConfigError(
                f"AIP_STORAGE_URI={uri}: only a local or mounted path is read (mount the "
                "bucket, e.g. with Cloud Storage FUSE, or copy the artifacts into the image)"
            )
        default("registry_dir", Path(uri) if uri else None)
        if s.max_body_bytes > VERTEX_MAX_BODY_BYTES and "max_body_bytes" not in explicit:
            update["max_body_bytes"] = VERTEX_MAX_BODY_BYTES
    else:
        azure = env.get("AZUREML_MODEL_DIR")
        default("registry_dir", Path(azure) if azure else None)
    default("platform_health_route", health)
    default("platform_ready_route", ready)
    default("platform_predict_route", predict)
    s = s.model_copy(update=update)
    # The platform's port is the gateway's; Ray's metrics endpoint must not take it.
    if s.metrics_port == s.http_port and "metrics_port" not in explicit:
        s = s.model_copy(update={"metrics_port": s.http_port + 1})
    # A deployment file shipped with the artifacts wins over the default one.
    shipped = (s.registry_dir / "deployment.yaml") if s.registry_dir else None
    if shipped is not None and shipped.is_file() and "config" not in explicit:
        s = s.model_copy(update={"config": shipped})
    return s
