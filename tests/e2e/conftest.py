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

from tests.conftest import RedisServer, free_port

__all__ = ["TOKEN", "GatewayUnderTest", "free_port"]
TOKEN = "e2e-admin-token"


@dataclass
class GatewayUnderTest:
    url: str
    token: str
    registry: Path
    redis: RedisServer
    readiness_log: list[tuple[int, Any]] = field(default_factory=list)

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[int]:
    import ray
    from ray import serve

    port = free_port()
    # Logical CPUs beyond the 2 real cores let every replica be scheduled at once.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
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
    return dst


@pytest.fixture(scope="session")
def gateway(
    ray_serve: int,
    registry_root: Path,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> GatewayUnderTest:
    from serving import app as serving_app
    from serving import materialize
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
                            # A wider wait makes batching under concurrency certain.
                            "v2": {
                                "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.01}
                            },
                        },
                    },
                    # Long warm-up: /readyz must say 503 while it runs.
                    "digits": {
                        "default": "v1",
                        "versions": {"v1": {"warmup": {"iterations": 3, "min_seconds": 6}}},
                    },
                },
            }
        )
    )
    settings = Settings(
        config=cfg_path,
        http_port=ray_serve,
        admin_token=TOKEN,
        redis_url=redis_server.url,
        # Generous for a loaded 2-core CI machine; the fault test checks the bound.
        feature_timeout_s=0.5,
    )
    for view, key in (("user_stats", "user_id"), ("merchant_stats", "merchant_id")):
        materialize.load(
            redis_server.url,
            settings.feature_namespace,
            materialize.find_view(registry, view),
            registry / "fraud" / "features" / f"{view}.csv",
            key,
        )
    dep = load_deployment(cfg_path)
    serving_app.apply_config(serving_app.serve_config(settings, dep, TOKEN))
    gw = GatewayUnderTest(settings.gateway_url(), TOKEN, registry, redis_server)
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
