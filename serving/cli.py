"""`serving` command line: up, predict, models, config, redis."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlparse

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table

from serving.errors import ConfigError
from serving.feature_cli import features_app
from serving.settings import DeploymentFile, Settings, load_deployment

app = typer.Typer(help="Low-latency model serving gateway.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect and tune served models.", no_args_is_help=True)
config_app = typer.Typer(help="Deployment configuration.", no_args_is_help=True)
redis_app = typer.Typer(help="Redis helpers.", no_args_is_help=True)
rollout_app = typer.Typer(
    help="Canary rollouts: weighted, sticky and shadow routing with automatic analysis.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(redis_app, name="redis")
app.add_typer(features_app, name="features")
app.add_typer(rollout_app, name="rollout")

console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway URL (default from settings).")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Deployment YAML (default deployments/local.yaml)."),
]


def _settings(config: Path | None = None) -> Settings:
    s = Settings()
    return s.model_copy(update={"config": config}) if config is not None else s


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _request(method: str, url: str, **kw: Any) -> httpx.Response:
    try:
        return httpx.request(method, url, timeout=kw.pop("timeout", 30.0), **kw)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the gateway at {url}: {exc}. Is `serving up` running?")


def _show_error(resp: httpx.Response) -> None:
    try:
        e = resp.json()["error"]
        where = f" (field {e['field']})" if e.get("field") else ""
        _fail(f"{resp.status_code} {e['code']}: {e['message']}{where}")
    except (ValueError, KeyError, TypeError):
        _fail(f"{resp.status_code}: {resp.text[:500]}")


# ---- up ------------------------------------------------------------------------------
@app.command()
def up(
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 300.0,
) -> None:
    """Start (or join RAY_ADDRESS) Ray, deploy every configured model version and the
    HTTP ingress, wait until all are warm, then serve until Ctrl-C / SIGTERM."""
    import ray
    from ray import serve

    from serving import app as serving_app
    from serving.auth import ensure_token

    settings = _settings(config)
    try:
        dep = load_deployment(settings.config, settings.registry_dir)
        cfg = serving_app.serve_config(
            settings, dep, ensure_token(settings), routed_versions(settings, list(dep.models))
        )
    except ConfigError as exc:
        _fail(f"{exc}\nBuild the demo models with `make models` if they are missing.")

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        console.print(f"\n[yellow]received {signal.Signals(signum).name}, shutting down…[/]")
        stop.set()

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
        address=settings.ray_address,
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
        serving_app.apply_config(cfg)
        names = serving_app.app_names(dep)
        last: dict[str, str] = {}

        def progress(states: dict[str, str]) -> None:
            nonlocal last
            if states != last:
                waiting = [f"{n}={s}" for n, s in states.items() if s != "RUNNING"]
                what = ("deploying: " + ", ".join(waiting)) if waiting else "all running"
                console.print(f"  [{time.monotonic() - t0:5.1f}s] {what}")
                last = dict(states)

        serving_app.wait_until_running(names, timeout, progress)
        _wait_ready(settings.gateway_url(), timeout - (time.monotonic() - t0))
        console.print(
            f"[bold green]ready[/] in {time.monotonic() - t0:.1f}s: "
            f"HTTP {settings.gateway_url()}  (docs {settings.gateway_url()}/docs)  "
            f"gRPC {settings.grpc_target()}\n"
            + ("" if joined else f"metrics http://127.0.0.1:{settings.metrics_port}/metrics\n")
            + f"admin token file: {settings.admin_token_file}\nCtrl-C to stop."
        )
        while not stop.wait(1.0):
            pass
    except (ConfigError, TimeoutError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        if joined:
            for n in serving_app.app_names(dep):
                serve.delete(n, _blocking=False)
        else:
            serve.shutdown()
        ray.shutdown()
        console.print("stopped.")


def routed_versions(settings: Settings, models: list[str]) -> dict[str, set[str]]:
    """Versions the routing tables in Redis send traffic to (a promoted canary must be
    deployed again after a restart). Empty when Redis does not answer."""
    import redis

    from serving.routing import RoutingTable

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        docs = client.mget([f"{settings.redis_namespace}:routing:{m}" for m in models])
    except redis.RedisError:
        return {}
    return {m: RoutingTable.model_validate_json(d).versions() for m, d in zip(models, docs) if d}


def bootstrap_feature_tables(settings: Settings, dep: DeploymentFile) -> None:
    """Load each of the deployment's feature tables whose first entity is absent."""
    import redis

    from serving import materialize
    from serving.features import redis_key

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    for table in dep.feature_tables:
        view = materialize.find_view(dep.registry, table.view)
        first = next(iter(materialize.read_rows(table.path)), None)
        if first is None:
            continue
        entity = materialize.normalize_entity(first[1][table.entity_column or view.entity])
        if entity is not None and client.exists(
            redis_key(settings.redis_namespace, view.name, entity)
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


# ---- predict -------------------------------------------------------------------------
@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="Model name.")],
    instances: Annotated[
        str, typer.Option("--instances", "-i", help="JSON list of instances, or @file.json.")
    ],
    version: Annotated[str | None, typer.Option("--version", "-v")] = None,
    url: UrlOpt = None,
    raw: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            "-p",
            help="v1 (TF-Serving REST), v2 (Open Inference Protocol REST) or grpc (OIP).",
        ),
    ] = "v1",
    grpc_target: Annotated[
        str | None,
        typer.Option("--grpc-target", help="host:port of the gRPC service (default settings)."),
    ] = None,
) -> None:
    """Send one prediction request and print the answer."""
    if protocol not in ("v1", "v2", "grpc"):
        _fail(f"--protocol must be v1, v2 or grpc, not {protocol!r}")
    text = Path(instances[1:]).read_text() if instances.startswith("@") else instances
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--instances is not valid JSON: {exc}")
    if isinstance(parsed, dict) and "instances" in parsed:
        parsed = parsed["instances"]
    if protocol != "v1":
        _predict_oip(protocol, model, version, parsed, url, grpc_target, raw)
        return
    base = url or _settings().gateway_url()
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    resp = _request("POST", base + path, json={"instances": parsed})
    if resp.status_code != 200:
        _show_error(resp)
    body = resp.json()
    if raw:
        console.print_json(data=body)
        return
    _print_predictions(
        f"{body['model']} {body['version']}  request {body['request_id']}",
        body["predictions"],
        resp.headers.get("server-timing", ""),
    )


def _predict_oip(
    protocol: str,
    model: str,
    version: str | None,
    instances: Any,
    url: str | None,
    grpc_target: str | None,
    raw: bool,
) -> None:
    """`predict` over the Open Inference Protocol: REST v2 or gRPC."""
    from serving import oip_client

    s = _settings()
    try:
        if protocol == "grpc":
            target = grpc_target or s.grpc_target()
            body, timing = oip_client.predict_grpc(target, model, version, instances)
        else:
            base = url or s.gateway_url()
            body, timing = oip_client.predict_rest(base, model, version, instances)
    except oip_client.OipClientError as exc:
        _fail(str(exc))
    if raw:
        console.print_json(data=body)
        return
    _print_predictions(
        f"{body['model_name']} {body['model_version']}  ({protocol})",
        oip_client.predictions(body),
        timing,
    )


def _print_predictions(title: str, predictions: list[Any], timing: str) -> None:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("prediction")
    for i, p in enumerate(predictions):
        table.add_row(str(i), json.dumps(p))
    console.print(table)
    console.print(f"[dim]server-timing: {timing}[/]")


# ---- models --------------------------------------------------------------------------
@models_app.command("list")
def models_list(url: UrlOpt = None) -> None:
    """Served models, their versions and states."""
    base = url or _settings().gateway_url()
    resp = _request("GET", base + "/v1/models")
    if resp.status_code != 200:
        _show_error(resp)
    table = Table(title="models")
    for col in ("model", "version", "default", "state", "runtime", "held-out metrics"):
        table.add_column(col)
    for m in resp.json()["models"]:
        for v in m["versions"]:
            metrics = ", ".join(f"{k}={val:.4g}" for k, val in v["metrics"].items())
            table.add_row(
                m["name"],
                v["version"],
                "yes" if v["version"] == m["default_version"] else "",
                v["state"],
                v["runtime"],
                metrics,
            )
    console.print(table)


def _admin_headers() -> dict[str, str]:
    from serving.auth import read_token

    token = read_token(_settings())
    if not token:
        _fail("no admin token: set SERVING_ADMIN_TOKEN or start the gateway with `serving up`")
    return {"authorization": f"Bearer {token}"}


@models_app.command("batching")
def models_batching(
    model: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Option("--version", "-v")],
    max_batch_size: Annotated[int | None, typer.Option(help="Instances per batch.")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="Wait for a batch to fill.")] = None,
    url: UrlOpt = None,
) -> None:
    """Show, or change live (no restart), a version's batching parameters."""
    path = f"/admin/v1/models/{model}/versions/{version}/batching"
    base = (url or _settings().gateway_url()) + path
    if max_batch_size is None and batch_wait_ms is None:
        resp = _request("GET", base, headers=_admin_headers())
    else:
        body: dict[str, Any] = {}
        if max_batch_size is not None:
            body["max_batch_size"] = max_batch_size
        if batch_wait_ms is not None:
            body["batch_wait_timeout_s"] = batch_wait_ms / 1000
        resp = _request("PUT", base, headers=_admin_headers(), json=body, timeout=60.0)
    if resp.status_code != 200:
        _show_error(resp)
    console.print_json(data=resp.json())


# ---- rollout -------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """'60s', '2m', '500ms', '1h' or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, suffix = text, "s"
    try:
        value = float(number) * units[suffix]
    except ValueError:
        raise typer.BadParameter(f"not a duration: {text!r} (e.g. 60s, 2m, 500ms)") from None
    if value <= 0:
        raise typer.BadParameter("must be positive")
    return value


def _rollout(model: str, url: str | None, body: dict[str, Any] | None) -> dict[str, Any]:
    base = (url or _settings().gateway_url()) + f"/admin/v1/models/{model}/rollout"
    if body is None:
        resp = _request("GET", base, headers=_admin_headers())
    else:
        resp = _request("POST", base, headers=_admin_headers(), json=body, timeout=600.0)
    if resp.status_code != 200:
        _show_error(resp)
    result: dict[str, Any] = resp.json()
    return result


def _print_status(status: dict[str, Any]) -> None:
    r, ro = status["routing"], status["rollout"]
    canary = f"{r['canary']} at {r['canary_weight']:g}%" if r["canary"] else "none"
    shadow = f"{r['shadow']} on {r['shadow_sample']:.0%}" if r["shadow"] else "none"
    console.print(
        f"[bold]{status['model']}[/]  stable [bold]{r['stable']}[/]  canary {canary}  "
        f"shadow {shadow}  sticky {r['sticky_key'] or 'random'}"
    )
    spec = ro.get("spec")
    if spec:
        steps = ", ".join(f"{s:g}" for s in spec["steps"])
        console.print(
            f"rollout [bold]{ro['status']}[/] to {spec['to']}: step {ro['step'] + 1}/"
            f"{len(spec['steps'])} of [{steps}]%, every {spec['interval_s']:g}s; "
            f"max error rate {spec['max_error_rate']:.2%}"
            + (f", max p99 {spec['max_p99_ms']:g} ms" if spec.get("max_p99_ms") else "")
            + f", min {spec['min_requests']} requests per arm"
        )
    analysis = status.get("analysis")
    if ro["status"] == "running":
        last = (
            f"last ran {time.time() - analysis['at']:.0f}s ago (leader {analysis['leader']})"
            if analysis
            else "[bold red]has not run[/]"
        )
        console.print(f"analysis {last}")
    table = Table(title="current window")
    for col in ("version", "requests", "errors", "error rate", "p99 ms", "shadow agreement"):
        table.add_column(col)
    for version, f in status["window"]["figures"].items():
        sh = f.get("shadow")
        table.add_row(
            version,
            str(f["requests"]),
            str(f["errors"]),
            f"{f['error_rate']:.2%}",
            f"{f['p99_ms']:g}",
            f"{sh['agreement']:.2%} of {sh['requests']}" if sh else "",
        )
    console.print(table)
    hist = Table(title="decisions (newest first)")
    for col in ("time", "action", "by", "weight", "reason"):
        hist.add_column(col)
    for d in status["history"][:20]:
        hist.add_row(
            time.strftime("%H:%M:%S", time.localtime(d["ts"])),
            d["action"],
            d["actor"],
            f"{d['weight']:g}%",
            d["reason"],
        )
    console.print(hist)


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument()],
    to: Annotated[str, typer.Option("--to", help="The canary version.")],
    steps: Annotated[str, typer.Option(help="Canary weights, percent.")] = "5,25,50,100",
    interval: Annotated[str, typer.Option(help="Analysis interval (60s, 2m).")] = "60s",
    max_error_rate: Annotated[float, typer.Option()] = 0.01,
    max_p99_ms: Annotated[float | None, typer.Option()] = None,
    min_requests: Annotated[int, typer.Option(help="Per arm, before any decision.")] = 100,
    sticky_key: Annotated[
        str | None, typer.Option(help="Instance field (user_id) or header:<name>.")
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Deploy the canary (stable keeps serving) and start stepping its weight."""
    try:
        weights = [float(x) for x in steps.split(",") if x.strip()]
    except ValueError:
        _fail(f"--steps must be comma-separated percentages, got {steps!r}")
    body = {
        "action": "start",
        "to": to,
        "steps": weights,
        "interval_s": parse_duration(interval),
        "max_error_rate": max_error_rate,
        "max_p99_ms": max_p99_ms,
        "min_requests": min_requests,
        "sticky_key": sticky_key,
    }
    console.print(f"deploying {model} {to} and starting the rollout…")
    _print_status(_rollout(model, url, body))


@rollout_app.command("status")
def rollout_status(
    model: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: UrlOpt = None,
) -> None:
    """Weights, current step, canary vs stable figures and the decision history."""
    status = _rollout(model, url, None)
    if as_json:
        console.print_json(data=status)
    else:
        _print_status(status)


def _simple(action: str, help_text: str) -> None:
    def command(model: Annotated[str, typer.Argument()], url: UrlOpt = None) -> None:
        _print_status(_rollout(model, url, {"action": action}))

    command.__doc__ = help_text
    rollout_app.command(action)(command)


_simple("pause", "Stop the automatic analysis; weights stay as they are.")
_simple("resume", "Restart the automatic analysis with a fresh window.")
_simple("promote", "Make the canary the stable version and retire the old one.")
_simple("rollback", "Send all traffic to stable and retire the canary.")


@rollout_app.command("set-weight")
def rollout_set_weight(
    model: Annotated[str, typer.Argument()],
    percent: Annotated[float, typer.Argument(help="Canary share, 0-100 (0.01 steps).")],
    url: UrlOpt = None,
) -> None:
    """Set the canary's share of traffic by hand."""
    _print_status(_rollout(model, url, {"action": "set_weight", "percent": percent}))


@rollout_app.command("shadow")
def rollout_shadow(
    model: Annotated[str, typer.Argument()],
    version: Annotated[str | None, typer.Option("--version", "-v")] = None,
    sample: Annotated[float | None, typer.Option(help="Fraction of requests copied.")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadowing.")] = False,
    url: UrlOpt = None,
) -> None:
    """Copy a sample of requests to a shadow version and compare its answers."""
    if off:
        body: dict[str, Any] = {"action": "shadow", "off": True}
    elif version is None or sample is None:
        _fail("give --version and --sample, or --off")
    else:
        body = {"action": "shadow", "version": version, "sample": sample}
    _print_status(_rollout(model, url, body))


# ---- config --------------------------------------------------------------------------
@config_app.command("render")
def config_render(config: ConfigOpt = None) -> None:
    """Print the Ray Serve config this deployment file produces (e.g. for a RayService's
    serveConfigV2). The admin token is left out."""
    from serving.app import serve_config

    settings = _settings(config)
    try:
        dep = load_deployment(settings.config, settings.registry_dir)
        cfg = serve_config(settings, dep, None)
    except ConfigError as exc:
        _fail(str(exc))
    sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False))


# ---- redis ---------------------------------------------------------------------------
@redis_app.command("ensure")
def redis_ensure(
    wait: Annotated[float, typer.Option(help="Seconds to wait for a started server.")] = 10.0,
) -> None:
    """Make sure SERVING_REDIS_URL answers; start a local redis-server if it does not
    and the URL points at this machine."""
    import redis

    url = _settings().redis_url
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
    if host not in ("127.0.0.1", "localhost", "::1") or binary is None:
        _fail(f"redis at {url} does not answer and no local redis-server can be started")
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
    _fail(f"started redis-server but {url} still does not answer")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
