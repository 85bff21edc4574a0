"""`serving up` (start Ray, deploy, wait until warm, serve), `serving config render`
and `serving redis ensure`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlparse

import httpx
import typer
from rich.markup import escape

from serving import keys
from serving.cli.common import ConfigOpt, cli_settings, console, err, fail
from serving.errors import ConfigError
from serving.listeners import is_loopback
from serving.settings import DeploymentFile, Settings, load_deployment, platform_settings

config_app = typer.Typer(help="Deployment configuration.", no_args_is_help=True)
redis_app = typer.Typer(help="Redis helpers.", no_args_is_help=True)

SUPERVISED = "SERVING_UP_SUPERVISED"  # set in the `serving up` that a supervisor runs
STOP_GRACE_S = 20.0  # from the first stop signal to killing everything left


def supervise() -> int:
    """Run `serving up` in a session of its own and hand it each stop signal, as SIGTERM
    to it alone: it then drains and stops Ray in order. A terminal's Ctrl-C or a
    supervisor's SIGTERM reach a whole process group, and Ray's own processes (which
    `ray.init` starts in the driver's group) would otherwise die first, leaving the
    driver to wait for them (30-60 s). A second signal, or the child still running
    STOP_GRACE_S after the first, kills its whole group. The child dies with this
    process (SIGTERM on parent death)."""
    env = {**os.environ, SUPERVISED: "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *sys.argv[1:]],
        env=env,
        start_new_session=True,
        preexec_fn=_terminate_with_parent,
    )
    stop_at: float | None = None

    def kill_all(why: str) -> None:
        err.print(f"[yellow]{why}: killing serving up and Ray[/]")
        _kill_group(child.pid)

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop_at
        if stop_at is not None:
            kill_all(f"second {signal.Signals(signum).name}")
            return
        stop_at = time.monotonic()
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            code = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stop_at is not None and time.monotonic() - stop_at > STOP_GRACE_S:
                kill_all(f"not stopped within {STOP_GRACE_S:g} s")
    _kill_group(child.pid)  # anything of Ray's left behind
    return code if code >= 0 else 1


def _terminate_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def up(
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 300.0,
) -> None:
    """Start (or join RAY_ADDRESS) Ray, deploy every configured model version and the
    HTTP ingress, wait until all are warm, then serve until Ctrl-C / SIGTERM."""
    if os.environ.get(SUPERVISED) != "1" and sys.platform == "linux":
        raise typer.Exit(supervise())
    try:
        # A managed cloud's environment (Vertex AI, Azure ML; SageMaker: `serve`).
        settings = platform_settings(cli_settings(config), os.environ)
    except ConfigError as exc:
        fail(str(exc))
    if settings.platform != "none":
        console.print(
            f"platform {settings.platform}: HTTP port {settings.http_port}, predict "
            f"{settings.platform_predict_route}, health {settings.platform_health_route}, "
            f"artifacts {settings.registry_dir}"
        )
    if settings.ray_address is None:
        # A local cluster is this machine's alone: Ray's servers (GCS, raylet, workers,
        # agents, the metrics endpoint) listen on loopback. Ray takes the loopback
        # address as the node's only when told no other node will join, and reads
        # that when it is imported.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if settings.http_mode == "haproxy":
            use_haproxy()
    import ray
    from ray import serve

    from serving import deploy
    from serving.auth import ensure_token

    try:
        dep = load_deployment(settings.config, settings.registry_dir)
        # Versions with an MLflow `source` into the registry first: the config reads them.
        from serving.models.mlflow_source import import_sources

        import_sources(dep, settings.mlflow_tracking_uri, lambda m: console.print(escape(m)))
        ensure_token(settings, "feedback")  # the trusted label source's token file
        cfg = deploy.serve_config(
            settings, dep, ensure_token(settings), routed_versions(settings, list(dep.models))
        )
    except ConfigError as exc:
        fail(f"{exc}\nBuild the demo models with `make models` if they are missing.")

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        console.print(f"\n[yellow]received {signal.Signals(signum).name}, shutting down…[/]")
        stop.set()

    ports_free(settings)
    try:
        bootstrap_feature_tables(settings, dep)
    except Exception as exc:  # Redis down or a bad table: say so, but still serve
        err.print(f"[yellow]warning:[/] feature tables not loaded: {exc}")

    joined = settings.ray_address is not None
    console.print(
        f"[bold]serving up[/] config={settings.config} registry={dep.registry} "
        f"ray={'join ' + str(settings.ray_address) if joined else 'local'}"
    )
    t0 = time.monotonic()
    ray.init(
        # "local": a new cluster of our own, never one a `ray start` left on this machine.
        address=settings.ray_address or "local",
        num_cpus=None if joined else settings.ray_num_cpus,
        # One Prometheus endpoint per node for every replica on it (local cluster only;
        # a joined cluster keeps the port it was started with).
        **({} if joined else {"_metrics_export_port": settings.metrics_port}),
        include_dashboard=False,
        log_to_driver=True,
    )
    try:
        serve.start(http_options={"host": settings.http_host, "port": settings.proxy_port()})
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        deploy.apply_config(cfg)
        names = deploy.app_names(dep)
        last: dict[str, str] = {}

        def progress(states: dict[str, str]) -> None:
            nonlocal last
            if states != last:
                waiting = [f"{n}={s}" for n, s in states.items() if s != "RUNNING"]
                what = ("deploying: " + ", ".join(waiting)) if waiting else "all running"
                console.print(f"  [{time.monotonic() - t0:5.1f}s] {what}")
                last = dict(states)

        deploy.wait_until_running(names, timeout, progress)
        doors = front_doors(settings, joined)
        for url in doors:
            _wait_ready(url, timeout - (time.monotonic() - t0))
        console.print(
            f"[bold green]ready[/] in {time.monotonic() - t0:.1f}s: "
            f"HTTP {', '.join(doors)}  (docs {doors[0]}/docs)  "
            + (
                f"gRPC {settings.grpc_target()}\n"
                if doors == [settings.gateway_url()]
                else f"gRPC port {settings.grpc_port} on each\n"
            )
            + ("" if joined else f"metrics http://127.0.0.1:{settings.metrics_port}/metrics\n")
            + f"admin token file: {settings.admin_token_file}\n"
            + f"feedback token file: {settings.feedback_token_file}\nCtrl-C to stop."
        )
        while not stop.wait(1.0):
            pass
    except (ConfigError, TimeoutError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        if joined:
            for n in deploy.app_names(dep):
                serve.delete(n, _blocking=False)
        else:
            serve.shutdown()
        ray.shutdown()
        console.print("stopped.")


def use_haproxy() -> None:
    """Ray Serve's HAProxy ingress for the local cluster (Ray reads these when imported,
    and its processes inherit them): the machine's haproxy unless a binary is named."""
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    if not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        binary = shutil.which("haproxy")
        if binary is None:
            fail(
                "SERVING_HTTP_MODE=haproxy needs an haproxy binary (Debian: apt-get install "
                "haproxy), or RAY_SERVE_HAPROXY_BINARY_PATH naming one"
            )
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary


def serve(
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 300.0,
) -> None:
    """`serving up` under SageMaker's container contract (SageMaker starts the image
    with `serve`): HTTP on 8080 (or SAGEMAKER_BIND_TO_PORT), `GET /ping`,
    `POST /invocations`, model artifacts in /opt/ml/model."""
    os.environ["SERVING_PLATFORM"] = "sagemaker"
    up(config, timeout)


def front_doors(settings: Settings, joined: bool) -> list[str]:
    """Where the gateway answers: its own address on a local cluster; on a joined one,
    each node that runs an ingress replica (when it listens on all addresses)."""
    if not joined or settings.http_host not in ("0.0.0.0", "::"):
        return [settings.gateway_url()]
    from serving import deploy

    nodes = deploy.ingress_nodes()
    return [f"http://{ip}:{settings.http_port}" for ip in nodes] or [settings.gateway_url()]


def ports_free(settings: Settings) -> None:
    """Fail at once, naming the culprit, when a port this gateway would serve on is
    taken: by another gateway (its ingress replicas claim their ports; see
    serving.transport.claims) or by any other program."""
    from serving.transport import claims

    ports = {settings.grpc_port: ("gRPC", "SERVING_GRPC_PORT")}
    if settings.http_mode == "direct":
        ports[settings.http_port] = ("HTTP", "SERVING_HTTP_PORT")
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    for port, (what, setting) in ports.items():
        taken = claims.foreign(port, None)
        if taken:
            fail(claims.describe(taken, what, setting))
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            fail(f"{what} port {port} on {host} is in use by another program ({setting})")


def routed_versions(settings: Settings, models: list[str]) -> dict[str, set[str]]:
    """Versions the routing tables in Redis send traffic to (a promoted canary must be
    deployed again after a restart). Empty when Redis does not answer."""
    import redis

    from serving.rollouts.table import RoutingTable

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        docs = client.mget([keys.routing(settings.redis_namespace, m) for m in models])
    except redis.RedisError:
        return {}
    return {m: RoutingTable.model_validate_json(d).versions() for m, d in zip(models, docs) if d}


def bootstrap_feature_tables(settings: Settings, dep: DeploymentFile) -> None:
    """Load each of the deployment's feature tables whose first entity is absent."""
    import redis

    from serving.features import materialize

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    for table in dep.feature_tables:
        view = materialize.find_view(dep.registry, table.view)
        first = next(iter(materialize.read_rows(table.path)), None)
        if first is None:
            continue
        entity = materialize.normalize_entity(first[1][table.entity_column or view.entity])
        if entity is not None and client.exists(
            keys.feature(settings.redis_namespace, view.name, entity)
        ):
            console.print(f"features: view {view.name} already loaded")
            continue
        report = materialize.load(
            settings.redis_url, settings.redis_namespace, view, table.path, table.entity_column
        )
        console.print(
            f"features: loaded {report.rows} rows into {view.name} "
            f"({report.rows_per_s:,.0f} rows/s)"
        )


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + max(timeout_s, 5.0)
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"gateway not ready: {last}")


class RenderFormat(StrEnum):
    serve = "serve"
    rayservice = "rayservice"


@config_app.command("render")
def config_render(
    config: ConfigOpt = None,
    format: Annotated[
        RenderFormat,
        typer.Option(
            "--format",
            "-f",
            help="`serve`: a Ray Serve config; `rayservice`: a KubeRay RayService.",
        ),
    ] = RenderFormat.serve,
    name: Annotated[str, typer.Option(help="RayService: its name.")] = "serving-gateway",
    image: Annotated[str, typer.Option(help="RayService: the CPU image.")] = (
        "serving-gateway:latest"
    ),
    gpu_image: Annotated[str, typer.Option(help="RayService: the GPU image.")] = (
        "serving-gateway:latest-gpu"
    ),
    secret: Annotated[
        str, typer.Option(help="RayService: the Secret with `redis-url` and `admin-token`.")
    ] = "serving-gateway",
) -> None:
    """Print the deployment as a portable Ray Serve config (what a RayService's
    serveConfigV2 holds) or as a whole KubeRay RayService. Nothing of this machine goes
    in: no address, no absolute path, no token; each replica reads SERVING_* (Redis
    URL, registry, admin token, ports) where it runs."""
    from serving import deploy, kuberay

    settings = cli_settings(config)
    try:
        dep = load_deployment(settings.config, settings.registry_dir)
        from serving.models.mlflow_source import import_sources

        import_sources(dep, settings.mlflow_tracking_uri, lambda m: err.print(escape(m)))
        if format is RenderFormat.serve:
            doc = deploy.serve_config(settings, dep, None, portable=True)
        else:
            dep = kuberay.for_cluster(dep)
            spec = kuberay.ClusterSpec(name=name, image=image, gpu_image=gpu_image, secret=secret)
            doc = kuberay.rayservice(
                deploy.serve_config(settings, dep, None, portable=True), dep, settings, spec
            )
    except ConfigError as exc:
        hint = (
            "\nRun it from the project directory, or name a deployment file with --config."
            if not settings.config.exists()
            else ""
        )
        fail(f"{exc}{hint}")
    sys.stdout.write(kuberay.dump(doc))


@redis_app.command("ensure")
def redis_ensure(
    wait: Annotated[float, typer.Option(help="Seconds to wait for a started server.")] = 10.0,
) -> None:
    """Make sure SERVING_REDIS_URL answers; start a local redis-server if it does not
    and the URL points at this machine."""
    import redis

    url = cli_settings().redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)

    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    if ping():
        console.print(f"redis: {url} answers")
        return
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    binary = shutil.which("redis-server")
    if not is_loopback(host) or binary is None:
        fail(f"redis at {url} does not answer and no local redis-server can be started")
    console.print(f"redis: {url} does not answer; starting {binary} on port {port}")
    subprocess.run(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
        ],
        check=True,
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if ping():
            console.print(f"redis: started, {url} answers")
            return
        time.sleep(0.1)
    fail(f"started redis-server but {url} still does not answer")
