"""The benchmark run: start every system side by side, measure each scenario on each, tear
everything down (also on Ctrl-C or an error), write the report.

Systems, all serving the same artifacts from the demo registry with the same Redis data:
  gateway  our gateway (serving.app config: FastAPI ingress + batched model replicas)
  naive    baseline (a): FastAPI ingress + unbatched model deployment, Ray's defaults
  uvicorn  baseline (b): one uvicorn process, runtimes in-process
  ceiling  baseline (c): the runtime alone at its best batch size, no server
The gateway and the naive app are Serve applications of one local Ray cluster; the
load generator runs in its own process (loadtests/worker.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from loadtests import cores
from loadtests.scenarios import REGISTRY, ROOT, SCENARIOS, Scenario

SYSTEMS: dict[str, str] = {
    "gateway": "our gateway over HTTP: served by the ingress replica itself (direct), "
    "default versions fused into it",
    "gateway-grpc": "our gateway over gRPC (OIP ModelInfer, served in the ingress replica)",
    "gateway-replica": "the same gateway over HTTP, the same model as a Serve deployment of "
    "its own (placement replica, one replica), reached over the direct channel",
    "gateway-replica-grpc": "the replica placement over gRPC",
    "gateway-ray-proxy": "the same gateway (fused) over HTTP through Ray Serve's own proxy on "
    "the same Ray cluster (the classic proxy actor; Ray's HAProxy ingress when the run sets "
    "--ray-env RAY_SERVE_ENABLE_HA_PROXY=1): the front door `SERVING_HTTP_MODE=proxy` uses",
    "naive": "naive Ray Serve: FastAPI ingress → unbatched model deployment, defaults",
    "uvicorn": "one uvicorn process, FastAPI, runtime in-process",
    "ceiling": "runtime alone in a tight loop at its best batch size",
}
GATEWAYS = (
    "gateway",
    "gateway-grpc",
    "gateway-replica",
    "gateway-replica-grpc",
    "gateway-ray-proxy",
)
SERVED = (*GATEWAYS, "naive", "uvicorn")
# A GPU scenario's replica: one GPU, large batches.
GPU_VERSION = {
    "placement": "replica",
    "resources": {"num_gpus": 1, "num_cpus": 1},
    "batching": {"max_batch_size": 2048, "batch_wait_timeout_s": 0.002},
}
# The gateway's port each system reaches (one gateway serves every placement).
PORT_OF = {
    "gateway-replica": "gateway",
    "gateway-replica-grpc": "gateway-grpc",
    "gateway-ray-proxy": "proxy",
}
# Logical CPUs of the local Ray: more than the 2 real cores so that every replica of both
# Serve applications can be scheduled at once (they are mostly idle, one system at a time
# is under load).
RAY_NUM_CPUS = 8


@dataclass(frozen=True)
class Plan:
    serial_n: int
    serial_warmup: int
    closed_steps: tuple[int, ...]
    closed_s: float
    closed_warmup_s: float
    rates: tuple[float, ...]
    open_s: float
    open_warmup_s: float
    ceiling_s: float  # per batch size
    floor_serial_n: int
    slo_ms: float = 50.0
    # The gateway (HTTP, default placement) also gets an open loop at this many times its
    # capacity (0: none).
    overload_x: float = 3.0
    # The generator's gRPC client: "lean" (raw HTTP/2, as the HTTP client is raw HTTP/1.1)
    # or "grpcio" (what most users' clients are; its own cost is ~0.4 ms per call).
    grpc_client: str = "lean"


FULL = Plan(
    serial_n=300,
    serial_warmup=50,
    closed_steps=(1, 2, 4, 8, 16, 32, 64),
    closed_s=3.0,
    closed_warmup_s=0.5,
    rates=(10, 25, 50, 100, 200, 400, 800),
    open_s=4.0,
    open_warmup_s=0.5,
    ceiling_s=0.4,
    floor_serial_n=1000,
)
QUICK = Plan(
    serial_n=60,
    serial_warmup=10,
    closed_steps=(1, 8),
    closed_s=1.2,
    closed_warmup_s=0.3,
    rates=(25, 100),
    open_s=1.5,
    open_warmup_s=0.3,
    ceiling_s=0.1,
    floor_serial_n=300,
)


@dataclass
class Options:
    out: Path
    quick: bool = False
    scenarios: list[str] = field(default_factory=lambda: ["fraud", "digits"])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    ray_env: dict[str, str] = field(default_factory=dict)
    slo_ms: float = 50.0
    log_dsn: str | None = None  # the gateway's prediction log (None: off)
    grpc_client: str = "lean"


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- processes we start ------------------------------------------------------------------
def _stop(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """Terminate one child we started (its own session, so Ctrl-C never reached it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Worker:
    """The generator process; one JSON command per line (loadtests/worker.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtests.worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited (code {self.proc.poll()})")
        out = json.loads(line)
        if not out["ok"]:
            raise RuntimeError(f"load generator: {out['error']}")
        result: dict[str, Any] = out["result"]
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        _stop(self.proc)


@contextlib.contextmanager
def worker() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.close()


class Child:
    """A server subprocess in its own session (a terminal's Ctrl-C reaches only us, and
    we stop it in order); stderr goes to a temporary file shown if it fails."""

    def __init__(self, args: list[str], name: str, log: Any) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )

    def wait_ready(self, url: str, timeout_s: float = 120) -> None:
        _wait_http(url, timeout_s, self.proc, self.name, self.log)


@contextlib.contextmanager
def child(args: list[str], name: str) -> Iterator[Child]:
    with tempfile.TemporaryFile() as log:
        c = Child(args, name, log)
        try:
            yield c
        finally:
            _stop(c.proc)


def _wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen[Any] | None, name: str, log: Any = None
) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                err = ""
                if log is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{err}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready at {url} after {timeout_s:.0f}s")
            time.sleep(0.1)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port (never the shared one on 6379)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    import redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.02)
        client.close()
        yield url
    finally:
        _stop(proc)


def load_features(url: str, namespace: str, scenario: Scenario, registry: Path) -> int:
    from serving.features import materialize
    from serving.models.registry import Registry

    features = Registry(registry).get(scenario.model, scenario.version).manifest.features
    rows = 0
    for view in features.views if features else []:
        path = registry / scenario.model / "features" / f"{view.name}.csv"
        spec = materialize.find_view(registry, view.name)
        rows += materialize.load(url, namespace, spec, path, view.entity).rows
    return rows


@contextlib.contextmanager
def ray_cluster(env: dict[str, str]) -> Iterator[int]:
    """A local Ray with Serve's HTTP proxy on a free port; shut down on the way out."""
    os.environ.update(env)  # Ray's processes inherit it (e.g. RAY_SERVE_* flags)
    import ray
    from ray import serve

    port = free_port()
    try:
        ray.init(
            address="local",  # never a cluster a `ray start` left on this machine
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def gateway_deployment(scenarios: list[Scenario], registry: Path) -> Any:
    """deployments/local.yaml (what `make up` serves), restricted to the versions the
    scenarios use so no idle replica shares the machine (a rollout deploys its own)."""
    from serving.settings import VersionConfig, load_deployment

    dep = load_deployment(ROOT / "deployments" / "local.yaml", registry)
    wanted = {(s.model, s.version) for s in scenarios}
    models = {}
    for name, cfg in dep.models.items():
        versions = {v: c for v, c in cfg.versions.items() if (name, v) in wanted}
        # A version compiled in the run is served as the one it was compiled from.
        for s in scenarios:
            for new, old in s.compile_aoti.items():
                if s.model == name and old in cfg.versions:
                    versions[new] = cfg.versions[old]
        if not versions:
            continue
        # The replica placement of the same model: its copy as a deployment of its own,
        # batched the same way.
        for s in scenarios:
            if s.model == name and s.replica_version and s.version in versions:
                fused = versions[s.version]
                versions[s.replica_version] = (
                    VersionConfig.model_validate(GPU_VERSION)
                    if s.gpu
                    else VersionConfig(
                        placement="replica", batching=fused.batching, warmup=fused.warmup
                    )
                )
        default = cfg.default if cfg.default in versions else next(iter(versions))
        models[name] = cfg.model_copy(update={"versions": versions, "default": default})
    return dep.model_copy(update={"models": models, "feature_tables": []})


@contextlib.contextmanager
def gateway_registry(scenarios: list[Scenario]) -> Iterator[Path]:
    """The demo registry itself, or, when a scenario needs versions it lacks, a temporary
    copy holding them too (byte-identical copies of existing versions, renamed, and
    AOTInductor packages compiled here)."""
    extra = {(s.model, new, old) for s in scenarios for new, old in s.extra_versions.items()}
    aoti = {(s.model, new, old) for s in scenarios for new, old in s.compile_aoti.items()}
    if not extra and not aoti:
        yield REGISTRY
        return
    import yaml

    with tempfile.TemporaryDirectory(prefix="loadtests-registry-") as tmp:
        root = Path(tmp)
        for model in {s.model for s in scenarios} | {m for m, _, _ in extra}:
            shutil.copytree(REGISTRY / model, root / model)
        for model, new, old in extra:
            shutil.copytree(root / model / old, root / model / new)
            manifest = root / model / new / "model.yaml"
            data = yaml.safe_load(manifest.read_text())
            data["version"] = new
            manifest.write_text(yaml.safe_dump(data, sort_keys=False))
        for model, new, old in aoti:
            compile_aoti(root / model / old, root / model / new)
        yield root


def compile_aoti(program: Path, out: Path) -> None:
    """An AOTInductor package (runtime torch_aoti) from a torch_export version, compiled
    for this machine, as version `out.name`: the same manifest otherwise."""
    import torch
    import yaml

    manifest = yaml.safe_load((program / "model.yaml").read_text())
    out.mkdir()
    torch._inductor.aoti_compile_and_package(
        torch.export.load(str(program / manifest["artifact"])),
        package_path=str(out / "model.pt2"),
    )
    manifest.update(version=out.name, runtime="torch_aoti", artifact="model.pt2")
    manifest["description"] = f"{manifest.get('description', '')} Compiled with AOTInductor."
    (out / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def cxx_compiler() -> str | None:
    """The C++ compiler AOTInductor would use (CXX, else g++), if there is one."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _as_runnable_here(s: Scenario, cuda: bool) -> Scenario:
    """The scenario, marked skipped with the reason where this machine cannot run it."""
    if s.gpu and not cuda:
        return replace(s, skip="no CUDA device on this machine (runs where one is)")
    if s.compile_aoti and cxx_compiler() is None:
        return replace(s, skip="no C++ compiler (CXX or g++) to build AOTInductor packages")
    return s


@dataclass
class Env:
    """Where the systems answer once started."""

    ports: dict[str, int] = field(default_factory=dict)
    admin_token: str = ""
    registry: Path = REGISTRY  # the demo registry, or the run's copy with extra versions


def rollout(env: Env, s: Scenario, commands: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """Post rollout commands to the gateway, in order; returns the rollout status (routing
    table, and requests per version in the current window)."""
    url = f"http://127.0.0.1:{env.ports['gateway']}/admin/v1/models/{s.model}/rollout"
    headers = {"authorization": f"Bearer {env.admin_token}"}
    # A command may deploy a version first (minutes on a loaded 2-core machine).
    with httpx.Client(timeout=360.0, headers=headers) as client:
        for cmd in commands:
            r = client.post(url, json=cmd)
            if r.status_code >= 300:
                raise RuntimeError(f"rollout {cmd['action']}: {r.status_code} {r.text[:300]}")
        status: dict[str, Any] = client.get(url).json()
    return status


# ---- measuring -----------------------------------------------------------------------------
def measure(
    w: Worker,
    plan: Plan,
    progress: Progress,
    label: str,
    target: dict[str, Any],
    overload_x: float = 0.0,
) -> dict[str, Any]:
    """Serial latency, the closed-loop sweep and the open-loop sweep of one system on one
    scenario; with `overload_x`, an open loop at that many times its capacity."""
    slo = plan.slo_ms
    s = w.call({**target, "mode": "serial", "n": plan.serial_n, "warmup": plan.serial_warmup})
    lat = s["latency_ms"]
    progress(
        f"{label} serial: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms ({s['errors']} errors)"
    )
    closed: list[dict[str, Any]] = []
    best = 0.0
    for c in plan.closed_steps:
        r = _closed_step(w, plan, target, c)
        closed.append(r)
        thr, p99 = r["throughput_rps"], r["latency_ms"]["p99"]
        progress(f"{label} closed-loop {c:3d} clients: {thr:7.1f} req/s, p99 {p99:.1f} ms")
        # Past the knee: more clients only add queueing.
        if p99 > 4 * slo and thr < 1.05 * best:
            break
        best = max(best, thr)
    peak = max(closed, key=lambda r: r["throughput_rps"])
    within = [r for r in closed if r["errors"] == 0 and r["latency_ms"]["p99"] <= slo]
    at_slo = max(within, key=lambda r: r["throughput_rps"]) if within else None
    opened: list[dict[str, Any]] = []
    skipped: list[float] = []
    for rate in plan.rates:
        # Far beyond what the closed loop could get, an open loop only builds a queue.
        if rate > 1.25 * peak["throughput_rps"] or (
            opened and opened[-1]["latency_ms"]["p99"] > 20 * slo
        ):
            skipped.append(rate)
            continue
        r = w.call(
            {
                **target,
                "mode": "open",
                "rate": rate,
                "duration_s": plan.open_s,
                "warmup_s": plan.open_warmup_s,
            }
        )
        opened.append(r)
        lat = r["latency_ms"]
        progress(
            f"{label} open-loop {rate:5g} req/s: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f}"
            f" ms, achieved {r['throughput_rps']:.0f} req/s, {r['errors']} errors"
        )
    if skipped:
        progress(f"{label} open-loop skipped {skipped} req/s (over 1.25x closed-loop peak)")
    open_ok = [
        r
        for r in opened
        if r["errors"] == 0
        and r["latency_ms"]["p99"] is not None
        and r["latency_ms"]["p99"] <= slo
        and r["throughput_rps"] >= 0.95 * r["offered_rps"]
    ]
    # Server CPU per request where the system works hardest within the SLO (else at its
    # peak): every process but the generator's, per request.
    busiest = at_slo or peak
    overload = None
    if overload_x:
        overload = measure_overload(w, plan, progress, label, target, peak, overload_x)
    return {
        "overload": overload,
        "serial": s,
        "closed": closed,
        "open": opened,
        "open_skipped_rps": skipped,
        "peak_rps": peak["throughput_rps"],
        "peak_concurrency": peak["concurrency"],
        "rps_at_slo": at_slo["throughput_rps"] if at_slo else 0.0,
        "concurrency_at_slo": at_slo["concurrency"] if at_slo else None,
        "open_rps_at_slo": max((r["offered_rps"] for r in open_ok), default=0.0),
        "server_cpu_ms_per_request": busiest.get("server_cpu_ms_per_request"),
    }


def _closed_step(w: Worker, plan: Plan, target: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return w.call(
        {
            **target,
            "mode": "closed",
            "concurrency": concurrency,
            "duration_s": plan.closed_s,
            "warmup_s": plan.closed_warmup_s,
        }
    )


def measure_overload(
    w: Worker,
    plan: Plan,
    progress: Progress,
    label: str,
    target: dict[str, Any],
    peak: dict[str, Any],
    times: float,
) -> dict[str, Any]:
    """Open loop at `times` the capacity: how fast refusals come, how the admitted
    requests fare, and goodput (answered per second over capacity). Both the capacity
    (the closed loop at the peak's concurrency) and the overload are measured with the
    served system and the generator on cores apart (loadtests.cores), so the generator
    can offer the load without queueing behind the server for a core."""
    with cores.apart(w.proc.pid) as split:
        if split is None:
            capacity = peak["throughput_rps"]
        else:
            capacity = _closed_step(w, plan, target, peak["concurrency"])["throughput_rps"]
        r = w.call(
            {
                **target,
                "mode": "open",
                "rate": times * capacity,
                "duration_s": 2 * plan.open_s,
                "warmup_s": plan.open_warmup_s,
            }
        )
    out = {
        "cores": None
        if split is None
        else {"system": sorted(split[0]), "generator": sorted(split[1])},
        "capacity_rps": capacity,
        "offered_rps": r["offered_rps"],
        "goodput_rps": r["throughput_rps"],
        "goodput_ratio": r["throughput_rps"] / capacity if capacity else None,
        "admitted_ms": r["admitted_ms"],
        "rejected": r["rejected"],
        "rejected_ms": r["rejected_ms"],
        "statuses": r["statuses"],
        "send_lag_ms": r.get("send_lag_ms"),
        "server_cpu_ms_per_request": r.get("server_cpu_ms_per_request"),
    }

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    progress(
        f"{label} overload {times:g}x ({r['offered_rps']:.0f} req/s): goodput "
        f"{out['goodput_ratio']:.2f} of capacity, admitted p99 {ms(r['admitted_ms']['p99'])} "
        f"ms, {r['rejected']} refused (p99 {ms(r['rejected_ms']['p99'])} ms), generator lag "
        f"p99 {ms((r.get('send_lag_ms') or {}).get('p99'))} ms"
    )
    return out


def measure_generator(
    plan: Plan, progress: Progress, w: Worker, systems: Sequence[str] = ()
) -> dict[str, Any]:
    """The generator against the floor server: its own cost per request and the lowest
    latency it can report on this machine."""
    port = free_port()
    args = [sys.executable, "-m", "loadtests.floor", "--port", str(port)]
    target = {
        "op": "load",
        "host": "127.0.0.1",
        "port": port,
        "path": "/",
        "scenario": "digits",
    }
    with child(args, "floor server") as floor:
        floor.wait_ready(f"http://127.0.0.1:{port}/")
        s = w.call({**target, "mode": "serial", "n": plan.floor_serial_n, "warmup": 50})
        c = w.call(
            {**target, "mode": "closed", "concurrency": 8, "duration_s": 1.5, "warmup_s": 0.2}
        )
        o = w.call({**target, "mode": "open", "rate": 1000, "duration_s": 1.5, "warmup_s": 0.2})
    progress(
        f"generator floor: serial p50 {s['latency_ms']['p50']:.3f} ms, "
        f"{s['client_cpu_us_per_request']:.0f} us CPU/request serial, "
        f"{c['client_cpu_us_per_request']:.0f} us/request at {c['throughput_rps']:.0f} req/s "
        f"closed-loop; open-loop 1000 req/s send lag p99 {o['send_lag_ms']['p99']:.2f} ms"
    )
    out = {"serial": s, "closed": c, "open_1000": o}
    if any(sys_.endswith("grpc") for sys_ in systems):
        out["grpc"] = _grpc_floor(plan, progress, w)
    return out


def _floors(generator: dict[str, Any] | None) -> tuple[float, float] | None:
    if not generator or "grpc" not in generator:
        return None
    return (
        generator["serial"]["latency_ms"]["p50"],
        generator["grpc"]["serial"]["latency_ms"]["p50"],
    )


def _grpc_floor(plan: Plan, progress: Progress, w: Worker) -> dict[str, Any]:
    """The gRPC client (plan.grpc_client) against the cheapest gRPC server
    (loadtests.floor --grpc)."""
    import grpc

    port = free_port()
    args = [sys.executable, "-m", "loadtests.floor", "--grpc", "--port", str(port)]
    target = {"op": "load", "kind": "grpc", "host": "127.0.0.1", "port": port,
              "path": "digits", "scenario": "digits", "grpc_client": plan.grpc_client}  # fmt: skip
    with child(args, "gRPC floor server"), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        s = w.call({**target, "mode": "serial", "n": plan.floor_serial_n, "warmup": 50})
        c = w.call(
            {**target, "mode": "closed", "concurrency": 8, "duration_s": 1.5, "warmup_s": 0.2}
        )
    progress(
        f"gRPC generator floor: serial p50 {s['latency_ms']['p50']:.3f} ms, "
        f"{s['client_cpu_us_per_request']:.0f} us CPU/request serial, "
        f"{c['throughput_rps']:.0f} req/s closed-loop at 8"
    )
    return {"serial": s, "closed": c}


def machine_info() -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "absent"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    redis_v = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        redis_v = out.stdout.split()[2].removeprefix("v=") if out.stdout else "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": version("ray"),
        "onnxruntime": version("onnxruntime"),
        "torch": version("torch"),
        "fastapi": version("fastapi"),
        "uvicorn": version("uvicorn"),
        "redis_server": redis_v,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
    }


def ratios(
    scenario: dict[str, Any], floors: tuple[float, float] | None = None
) -> dict[str, float | None]:
    """Our gateway against the naive Ray Serve baseline (and, for context, uvicorn).
    `floors`: the generator's serial p50 against the cheapest HTTP and gRPC servers."""
    systems = scenario["systems"]
    out: dict[str, float | None] = {}

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def p50(m: dict[str, Any]) -> float | None:
        v: float | None = m["serial"]["latency_ms"]["p50"]
        return v

    nv, uv = systems.get("naive"), systems.get("uvicorn")
    for system, prefix in PREFIX.items():
        gw = systems.get(system)
        if gw and nv:
            out[prefix + "throughput_at_slo_vs_naive"] = div(gw["rps_at_slo"], nv["rps_at_slo"])
            out[prefix + "peak_throughput_vs_naive"] = div(gw["peak_rps"], nv["peak_rps"])
            out[prefix + "serial_p50_vs_naive"] = div(p50(gw), p50(nv))
        if gw and uv:
            out[prefix + "serial_p50_vs_uvicorn"] = div(p50(gw), p50(uv))
            out[prefix + "throughput_at_slo_vs_uvicorn"] = div(gw["rps_at_slo"], uv["rps_at_slo"])
            out[prefix + "cpu_per_request_vs_uvicorn"] = div(
                gw.get("server_cpu_ms_per_request"), uv.get("server_cpu_ms_per_request")
            )
    # Placement and transport, side by side: replica / fused, gRPC / HTTP.
    for fused, replica, prefix in (
        ("gateway", "gateway-replica", ""),
        ("gateway-grpc", "gateway-replica-grpc", "grpc_"),
    ):
        f, r = systems.get(fused), systems.get(replica)
        if f and r:
            out[prefix + "replica_vs_fused_serial_p50"] = div(p50(r), p50(f))
            out[prefix + "replica_vs_fused_throughput_at_slo"] = div(
                r["rps_at_slo"], f["rps_at_slo"]
            )
    # Front doors: Ray's proxy against the ingress serving HTTP itself (direct).
    d, p = systems.get("gateway"), systems.get("gateway-ray-proxy")
    if d and p:
        out["ray_proxy_vs_direct_serial_p50"] = div(p50(p), p50(d))
        out["ray_proxy_vs_direct_throughput_at_slo"] = div(p["rps_at_slo"], d["rps_at_slo"])
        out["ray_proxy_vs_direct_cpu_per_request"] = div(
            p.get("server_cpu_ms_per_request"), d.get("server_cpu_ms_per_request")
        )
    for http, grpc, prefix in (
        ("gateway", "gateway-grpc", ""),
        ("gateway-replica", "gateway-replica-grpc", "replica_"),
    ):
        h, g = systems.get(http), systems.get(grpc)
        if h and g:
            out[prefix + "grpc_vs_http_serial_p50"] = div(p50(g), p50(h))
            if floors is not None and p50(g) is not None and p50(h) is not None:
                # The server's own time per transport: each p50 less its client's floor.
                out[prefix + "grpc_vs_http_serial_p50_above_floor"] = div(
                    p50(g) - floors[1], p50(h) - floors[0]
                )
    return out


# Ratio keys of each gateway system against the baselines.
PREFIX = {
    "gateway": "",
    "gateway-grpc": "grpc_",
    "gateway-replica": "replica_",
    "gateway-replica-grpc": "replica_grpc_",
}


def gpu_figures(
    sc: dict[str, Any], scenario: Scenario, ceiling: dict[str, Any] | None
) -> dict[str, Any]:
    """Rows per second through the gateway against the runtime alone on the same GPU."""
    best = ceiling["best"]["rows_per_s"] if ceiling else None
    out: dict[str, Any] = {"rows_per_request": scenario.rows_per_request, "ceiling": best}
    for system, m in sc["systems"].items():
        rows = m["peak_rps"] * scenario.rows_per_request
        out[system] = {"rows_per_s": rows, "vs_ceiling": rows / best if best else None}
    return out


def _cuda_device() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def versus(sc: dict[str, Any], plain: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per system, this scenario's figures over the plain scenario's (e.g. what a canary
    and a shadow cost)."""
    out: dict[str, dict[str, float | None]] = {}
    for system, m in sc["systems"].items():
        p = plain["systems"].get(system)
        if p is None:
            continue
        a, b = m["serial"]["latency_ms"]["p50"], p["serial"]["latency_ms"]["p50"]
        out[system] = {
            "serial_p50": a / b if a is not None and b else None,
            "peak_throughput": m["peak_rps"] / p["peak_rps"] if p["peak_rps"] else None,
            "throughput_at_slo": m["rps_at_slo"] / p["rps_at_slo"] if p["rps_at_slo"] else None,
        }
    return out


# ---- the run -------------------------------------------------------------------------------
def run(opts: Options) -> dict[str, Any]:
    """Start everything, measure, write the report; whatever was started is stopped on the
    way out, whatever happened. A partial report is written when the run is cut short."""
    from loadtests import report

    plan = Plan(
        **{
            **asdict(QUICK if opts.quick else FULL),
            "slo_ms": opts.slo_ms,
            "grpc_client": opts.grpc_client,
        }
    )
    progress = Progress()
    cuda = _cuda_device()
    scenarios = [_as_runnable_here(SCENARIOS[n], cuda) for n in opts.scenarios]
    runnable = [s for s in scenarios if s.skip is None]
    results: dict[str, Any] = {
        "meta": {
            **machine_info(),
            "quick": opts.quick,
            "plan": asdict(plan),
            "systems": {s: SYSTEMS[s] for s in opts.systems},
            "ray_env": opts.ray_env,
            "prediction_log": "on" if opts.log_dsn else "off",
            "ray_num_cpus": RAY_NUM_CPUS,
        },
        "generator": None,
        "ceiling": {},
        "scenarios": {
            s.name: {
                "description": s.description,
                "skip": s.skip,
                "systems": {},
                **(
                    {"format": s.model_format, "compare_with": s.compare_with}
                    if s.model_format
                    else {}
                ),
            }
            for s in scenarios
        },
    }
    for s in scenarios:
        if s.skip:
            progress(f"scenario {s.name}: {s.skip}")
    progress(
        f"{'quick' if opts.quick else 'full'} run: scenarios {[s.name for s in runnable]}, "
        f"systems {opts.systems}"
    )
    # SIGTERM unwinds like Ctrl-C, so every `finally` below runs; SIGINT is reinstated in
    # case a parent shell started us with it ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with contextlib.ExitStack() as stack:
            env = _start(stack, opts, progress, runnable, results["meta"])
            w = stack.enter_context(worker())
            # Measured once everything is up and idle: the conditions of the runs below.
            results["generator"] = measure_generator(plan, progress, w, opts.systems)
            if "ceiling" in opts.systems:
                # One per model version and device (scenarios may share one).
                for s in {(s.model, s.version, s.gpu): s for s in runnable}.values():
                    results["ceiling"][s.name] = c = w.call(
                        {
                            "op": "ceiling",
                            "scenario": s.name,
                            "seconds_per_size": plan.ceiling_s,
                            "registry": str(env.registry),
                        }
                    )
                    b = c["best"]
                    progress(
                        f"ceiling {s.name}: best batch {b['batch_size']}, "
                        f"{b['rows_per_s']:,.0f} rows/s, {b['batch_p50_ms']:.3f} ms/batch"
                    )
            # Rollout scenarios change the gateway's routing for good: they run last.
            for s in sorted(runnable, key=lambda s: bool(s.rollout)):
                systems = [x for x in opts.systems if x in SERVED and x in s.paths]
                staged = bool(s.rollout) and any(x in GATEWAYS for x in systems)
                if staged:
                    progress(f"scenario {s.name}: setting up the rollout")
                    try:
                        status = rollout(env, s, s.rollout)
                    except (RuntimeError, httpx.HTTPError, ValueError) as exc:
                        results["scenarios"][s.name]["skip"] = f"rollout set-up failed: {exc}"
                        progress(f"scenario {s.name}: rollout set-up failed, skipped: {exc}")
                        continue
                    results["scenarios"][s.name]["rollout_status"] = status
                    progress(f"scenario {s.name}: routing {status.get('routing', status)}")
                for system in systems:
                    out = _measure_system(w, plan, progress, s, system, env.ports)
                    results["scenarios"][s.name]["systems"][system] = out
                if staged:
                    with contextlib.suppress(RuntimeError, httpx.HTTPError, ValueError):
                        after = rollout(env, s)
                        results["scenarios"][s.name]["rollout_status_after"] = after
                        figures = after.get("window", {}).get("figures", {})
                        progress(f"scenario {s.name}: per version since the start {figures}")
    except BaseException as exc:
        results["aborted"] = f"{type(exc).__name__}: {exc}"
        progress(f"aborted: {results['aborted']}; everything started was stopped")
        raise
    finally:
        results["meta"]["elapsed_s"] = round(progress.elapsed(), 1)
        results["meta"]["loadavg_end"] = os.getloadavg()
        for name, sc in results["scenarios"].items():
            if not sc["skip"]:
                sc["ratios"] = ratios(sc, _floors(results.get("generator")))
                if SCENARIOS[name].gpu:
                    sc["gpu"] = gpu_figures(sc, SCENARIOS[name], results["ceiling"].get(name))
                plain = results["scenarios"].get(SCENARIOS[name].compare_with or "")
                if plain is not None:
                    sc["vs_plain"] = versus(sc, plain)
        report.write(results, opts.out)
        progress(f"wrote {opts.out}/results.json, results.md and plots")
    return results


def _measure_system(
    w: Worker, plan: Plan, progress: Progress, s: Scenario, system: str, ports: dict[str, int]
) -> dict[str, Any]:
    path = s.paths[system]
    target = {
        "op": "load",
        "kind": "grpc" if system.endswith("grpc") else "http",
        "grpc_client": plan.grpc_client,
        "host": "127.0.0.1",
        "port": ports[PORT_OF.get(system, system)],
        "path": path,
        "scenario": s.name,
        "timing": system in GATEWAYS,
    }
    overload = plan.overload_x if system == "gateway" else 0.0
    out = measure(w, plan, progress, f"{system}/{s.name}", target, overload)
    st = out["serial"].get("server_timing")
    if st:
        progress(
            f"{system}/{s.name} Server-Timing covers {100 * st['coverage']:.0f}% of client "
            f"latency ({100 * st['coverage_without_inbound']:.0f}% without `inbound`); "
            f"outside every stage: {st['outside_mean_ms']:.2f} ms"
        )
    return out


def _start(
    stack: contextlib.ExitStack,
    opts: Options,
    progress: Progress,
    scenarios: list[Scenario],
    meta: dict[str, Any],
) -> Env:
    """The run's registry (a copy when versions are added or compiled), Redis, then the
    uvicorn baseline and the Ray cluster starting side by side; returns once all answer.
    What was deployed goes into `meta`."""
    from serving.settings import Settings

    systems = [x for x in opts.systems if x in SERVED]
    env = Env()
    if not scenarios:
        return env
    if any(s.compile_aoti for s in scenarios):
        progress("compiling AOTInductor packages (tens of seconds)")
    env.registry = registry = stack.enter_context(gateway_registry(scenarios))
    if not systems:
        return env
    redis_url = stack.enter_context(redis_server())
    namespace = Settings(redis_url=redis_url).redis_namespace
    unique = {(s.model, s.version): s for s in scenarios}.values()
    rows = sum(load_features(redis_url, namespace, s, registry) for s in unique)
    progress(f"redis on {redis_url}: loaded {rows} feature rows")
    # The versions the baselines serve: those of the scenarios they take part in.
    baselines = {"naive", "uvicorn"}
    versions = {s.model: s.version for s in scenarios if baselines & s.paths.keys()}
    fraud_v, digits_v = versions.get("fraud", "v2"), versions.get("digits", "v1")
    uvicorn: Child | None = None
    if "uvicorn" in systems:
        env.ports["uvicorn"] = free_port()
        args = [
            sys.executable, "-m", "loadtests.uvicorn_app", "--port", str(env.ports["uvicorn"]),
            "--redis-url", redis_url, "--namespace", namespace,
            "--fraud-version", fraud_v, "--digits-version", digits_v,
        ]  # fmt: skip
        uvicorn = stack.enter_context(child(args, "uvicorn baseline"))
    if any(x in systems for x in ("naive", *GATEWAYS)):
        port = stack.enter_context(ray_cluster(opts.ray_env))
        # Ray Serve's proxy (naive) on `port`; our gateway serves HTTP itself (direct).
        env.ports.update(
            {"proxy": port, "gateway": free_port(), "naive": port, "gateway-grpc": free_port()}
        )
        env.admin_token = secrets.token_hex(16)
        progress(f"ray started ({RAY_NUM_CPUS} logical CPUs), serve proxy on port {port}")
        meta["serve_config"] = _deploy(
            env,
            registry,
            systems,
            scenarios,
            redis_url,
            namespace,
            fraud_v,
            digits_v,
            progress,
            opts.log_dsn,
        )
    if uvicorn is not None:
        uvicorn.wait_ready(f"http://127.0.0.1:{env.ports['uvicorn']}/healthz")
        progress(f"uvicorn baseline on port {env.ports['uvicorn']}")
    return env


def _deploy(
    env: Env,
    registry: Path,
    systems: list[str],
    scenarios: list[Scenario],
    redis_url: str,
    namespace: str,
    fraud_v: str,
    digits_v: str,
    progress: Progress,
    log_dsn: str | None = None,
) -> dict[str, Any]:
    """The gateway's applications and the naive one from one declarative Serve config,
    deployed together; returns the config (less the admin token) for the report."""
    from loadtests import naive
    from serving import deploy
    from serving.settings import Settings

    port = env.ports["gateway"]
    config: dict[str, Any] = {"applications": []}
    names: list[str] = []
    ready: list[str] = []
    if any(x in systems for x in GATEWAYS):
        settings = Settings(
            http_port=port,
            ray_proxy_port=env.ports["proxy"],
            # Never the default 9000: another gateway on this machine may hold it.
            grpc_port=env.ports["gateway-grpc"],
            redis_url=redis_url,
            redis_namespace=namespace,
            registry_dir=registry,
            log_dsn=log_dsn,
        )
        dep = gateway_deployment(scenarios, registry)
        config = deploy.serve_config(settings, dep, env.admin_token)
        names += deploy.app_names(dep)
        ready.append(f"http://127.0.0.1:{port}/readyz")
    if "naive" in systems:
        config["applications"].append(
            naive.app_config(REGISTRY, fraud_v, digits_v, redis_url, namespace)
        )
        names.append(naive.APP_NAME)
        ready.append(f"http://127.0.0.1:{env.ports['naive']}{naive.ROUTE_PREFIX}/healthz")
    deploy.apply_config(config)
    seen: dict[str, str] = {}

    def show(states: dict[str, str]) -> None:
        if states != seen:
            seen.clear()
            seen.update(states)
            progress("serve: " + ", ".join(f"{k} {v}" for k, v in states.items()))

    deploy.wait_until_running(names, timeout_s=300, progress=show)
    for url in ready:
        _wait_http(url, 120, None, url)
    progress("all Serve applications running and ready")
    return {"applications": [_shown(app) for app in config["applications"]]}


def _shown(app: dict[str, Any]) -> dict[str, Any]:
    """An application's config as the report shows it: no token digests, no DSN (it
    may hold a password)."""
    args = {k: v for k, v in app["args"].items() if not k.endswith("_token_sha256")}
    if isinstance(args.get("settings"), dict) and args["settings"].get("log_dsn"):
        args["settings"] = {**args["settings"], "log_dsn": "(set)"}
    return {**app, "args": args}
