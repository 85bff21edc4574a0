"""One local Ray cluster and one deployed gateway for the whole e2e session.

Readiness is awaited by polling /readyz, never by sleeping; the statuses seen on the
way are kept so a test can check that the gateway said 503 before it said 200.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import PostgresServer, RedisServer, free_port

__all__ = ["FEEDBACK_TOKEN", "TOKEN", "GatewayUnderTest", "free_port"]
TOKEN = "e2e-admin-token"
FEEDBACK_TOKEN = "e2e-feedback-token"
# v4slow / scaleme: seconds per batch, well above the 200 ms p99 and 100 ms SLO that
# the rollout and autoscaling tests hold them to.
SLOW_BATCH_S = 0.4


@dataclass
class GatewayUnderTest:
    url: str
    token: str
    registry: Path
    redis: RedisServer
    readiness_log: list[tuple[int, Any]] = field(default_factory=list)
    metrics_port: int = 0
    grpc_target: str = ""  # host:port of the gateway's gRPC (Open Inference Protocol)
    log_dsn: str = ""  # the prediction log (a database of the tests' own PostgreSQL)

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


@dataclass
class RayServe:
    proxy_port: int  # Ray Serve's own proxy; the gateway serves HTTP directly elsewhere
    metrics_port: int


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[RayServe]:
    import ray
    from ray import serve

    ports = RayServe(free_port(), free_port())
    # Logical CPUs beyond the 2 real cores let every replica be scheduled at once;
    # metrics are reported every second so a Prometheus test need not wait long.
    ray.init(
        address="local",  # never a cluster a `ray start` left on this machine
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=ports.metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": ports.proxy_port})
    yield ports
    serve.shutdown()
    ray.shutdown()


def _registry_copy(src: Path, dst: Path) -> Path:
    """The demo registry plus fraud `v1strict`: v1 with the `reject` feature policy."""
    for name in ("fraud", "digits"):
        shutil.copytree(src / name, dst / name)
    strict = dst / "fraud" / "v1strict"
    shutil.copytree(dst / "fraud" / "v1", strict)
    manifest = yaml.safe_load((strict / "model.yaml").read_text())
    manifest["version"] = "v1strict"
    manifest["features"]["policy"] = "reject"
    (strict / "model.yaml").write_text(yaml.safe_dump(manifest))
    build_rollout_model(dst / "digits" / "v1", dst / "rollme")
    _copy_version(dst / "digits" / "v1", dst / "digits" / "v1fused")
    _copy_version(dst / "digits" / "v1", dst / "killme" / "v1")
    # The model-quality loop's two models (tests/e2e/test_quality_loop.py).
    for name in ("fraudloop", "fraudbad"):
        _copy_version(dst / "fraud" / "v2", dst / name / "v1")
    scaleme = dst / "scaleme" / "v1"
    scaleme.mkdir(parents=True)
    shutil.copy(dst / "rollme" / "v4slow" / "model.pt", scaleme / "model.pt")
    manifest = yaml.safe_load((dst / "rollme" / "v4slow" / "model.yaml").read_text())
    (scaleme / "model.yaml").write_text(
        yaml.safe_dump({**manifest, "name": "scaleme", "version": "v1"})
    )
    return dst


def quality_loop_model(extra: list[str] | None = None, **triggers: Any) -> dict[str, Any]:
    """A fraud v2 copy whose retrain policy trains the demo's model from the log (the
    labelled, drifted traffic the loop test sends) and canaries the result, judged on
    accuracy from labels. Tight timings: the whole loop must fit in minutes."""
    command = [
        "{python}", "-m", "models.train_fraud", "--from-log", "{log_dsn}", "--base", "{base}",
        "--since", "{since}", "--out", "{output}", "--min-rows", "300", *(extra or []),
    ]  # fmt: skip
    return {
        "default": "v1",
        "versions": {"v1": {"placement": "fused"}},
        "retrain": {
            "command": command,
            "timeout_s": 180,
            "check_every_s": 2,
            "data_since_s": 3600,
            **triggers,
            "rollout": {
                "steps": [50, 100],
                "interval_s": 3,
                "min_requests": 20,
                "max_error_rate": 0.05,
                "max_accuracy_drop": 0.05,
                "min_labels": 30,
                "require_labels": True,
            },
        },
    }


def _copy_version(src: Path, dst: Path) -> None:
    """A byte-identical copy of a version under another name or model."""
    shutil.copytree(src, dst)
    manifest = yaml.safe_load((dst / "model.yaml").read_text())
    manifest.update(name=dst.parent.name, version=dst.name)
    (dst / "model.yaml").write_text(yaml.safe_dump(manifest))


def build_rollout_model(digits: Path, root: Path) -> None:
    """`rollme`: v1 and v2 are the digits CNN; v3bad fails on images whose first pixel
    is set; v4slow answers correctly but spends ~SLOW_BATCH_S per batch on this machine
    (its busy loop is sized here, single-threaded as in a replica, so the latency
    checks that use it hold on a fast CPU as on a slow one)."""
    import torch

    inner = torch.jit.load(str(digits / "model.pt"))

    class Faulty(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if bool((image[:, 0, 0] > 0.5).any()):
                raise RuntimeError("injected fault")
            return self.inner(image)

    class Slow(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, iterations: int) -> None:
            super().__init__()
            self.inner = inner
            self.iterations = iterations
            self.w = torch.nn.Parameter(torch.eye(384) * 0.5, requires_grad=False)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.ones(384, 384)
            for _ in range(self.iterations):
                x = torch.relu(x @ self.w)
            label, probs = self.inner(image)
            return label, probs + x[0, 0] * 0.0

    manifest = yaml.safe_load((digits / "model.yaml").read_text())
    for version, module in (
        ("v1", None),
        ("v2", None),
        ("v3bad", Faulty(inner)),
        ("v4slow", Slow(inner, _slow_iterations(torch))),
    ):
        folder = root / version
        folder.mkdir(parents=True)
        if module is None:
            shutil.copy(digits / "model.pt", folder / "model.pt")
        else:
            torch.jit.save(torch.jit.script(module), str(folder / "model.pt"))
        (folder / "model.yaml").write_text(
            yaml.safe_dump({**manifest, "name": "rollme", "version": version})
        )


def _slow_iterations(torch: Any) -> int:
    """Iterations of a 384x384 matmul that take SLOW_BATCH_S on one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, x = torch.eye(384) * 0.5, torch.ones(384, 384)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                x = torch.relu(x @ w)
            best = min(best, (time.perf_counter() - t0) / 20)
    finally:
        torch.set_num_threads(threads)
    return max(20, round(SLOW_BATCH_S / best))


@pytest.fixture(scope="session")
def gateway(
    ray_serve: RayServe,
    registry_root: Path,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> GatewayUnderTest:
    from serving import deploy
    from serving.features import materialize
    from serving.settings import Settings, load_deployment

    registry = _registry_copy(registry_root, tmp_path_factory.mktemp("registry"))
    cfg_path = tmp_path_factory.mktemp("deploy") / "e2e.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "registry": str(registry),
                "models": {
                    "fraud": {
                        "default": "v2",
                        "versions": {
                            "v1": {},
                            "v1strict": {},
                            # Fused into the ingress (the low-latency path); a wider
                            # wait makes batching under concurrency certain.
                            "v2": {
                                "placement": "fused",
                                "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.01},
                            },
                        },
                    },
                    "rollme": {"default": "v1", "versions": {"v1": {}}},
                    # The slow digits copy under a tight SLO: load must scale it up.
                    "scaleme": {
                        "default": "v1",
                        "versions": {
                            "v1": {
                                "autoscaling": {
                                    "min_replicas": 1,
                                    "max_replicas": 2,
                                    "latency_slo_ms": 100,
                                    "upscale_delay_s": 1,
                                    "downscale_delay_s": 3,
                                }
                            }
                        },
                    },
                    # Long warm-up: /readyz must say 503 while it runs. v1 is a replica,
                    # v1fused the same model inside the ingress (no feature lookup that
                    # yields: a burst must batch all the same), v2 the same model saved
                    # with torch.export, also inside the ingress.
                    "digits": {
                        "default": "v1",
                        "versions": {
                            # Long enough to outlast the ingress's own start-up (its
                            # fused versions warm first) on a loaded 2-core machine.
                            "v1": {"warmup": {"iterations": 3, "min_seconds": 15}},
                            "v1fused": {"placement": "fused"},
                            "v2": {"placement": "fused"},
                        },
                    },
                    # Two replicas: one is killed under load, and no request may fail.
                    "killme": {"default": "v1", "versions": {"v1": {"num_replicas": 2}}},
                    # Copies of fraud v2 that retrain themselves from the prediction log:
                    # on accuracy (fraudloop) and on drift, with a deliberately worse
                    # command (fraudbad).
                    "fraudloop": quality_loop_model(accuracy={"drop": 0.1, "min_labels": 300}),
                    "fraudbad": quality_loop_model(
                        ["--invert-labels"], drift={"psi": 0.2, "for_s": 5}
                    ),
                },
            }
        )
    )
    settings = Settings(
        config=cfg_path,
        http_port=free_port(),
        ray_proxy_port=ray_serve.proxy_port,
        admin_token=TOKEN,
        feedback_token=FEEDBACK_TOKEN,
        log_dsn=postgres_server.create_database("e2e_log"),
        grpc_port=free_port(),
        redis_url=redis_server.url,
        # Generous for a loaded 2-core CI machine; the fault test checks the bound.
        feature_timeout_s=0.5,
    )
    for view, key in (("user_stats", "user_id"), ("merchant_stats", "merchant_id")):
        materialize.load(
            redis_server.url,
            settings.redis_namespace,
            materialize.find_view(registry, view),
            registry / "fraud" / "features" / f"{view}.csv",
            key,
        )
    dep = load_deployment(cfg_path)
    deploy.apply_config(deploy.serve_config(settings, dep, TOKEN))
    gw = GatewayUnderTest(
        settings.gateway_url(),
        TOKEN,
        registry,
        redis_server,
        log_dsn=settings.log_dsn or "",
        metrics_port=ray_serve.metrics_port,
        grpc_target=settings.grpc_target(),
    )
    deadline = time.monotonic() + 240
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(gw.url + "/readyz")
                body = r.json() if r.headers.get("content-type") == "application/json" else r.text
                gw.readiness_log.append((r.status_code, body))
                if r.status_code == 200:
                    return gw
            except httpx.HTTPError as exc:
                gw.readiness_log.append((0, str(exc)))
            time.sleep(0.1)
    pytest.fail(f"gateway never became ready: {gw.readiness_log[-3:]}")
