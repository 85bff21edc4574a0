"""A rendered (portable) config runs with what the replicas' environment says: the Redis
URL, namespace, registry, ports and admin token come from SERVING_* where the replica
runs (here: the application's runtime_env, as a pod's env would be), not from the
machine that rendered it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serving import deploy, keys
from serving.settings import Settings, load_deployment
from tests.conftest import RedisServer, free_port
from tests.e2e.conftest import RayServe

APP = "gateway-portable"


@pytest.fixture
def portable_gateway(
    ray_serve: RayServe, redis_server: RedisServer, registry_root: Path, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    from ray import serve

    cfg = tmp_path / "portable.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                # A registry path that does not exist here: the replica's
                # SERVING_REGISTRY_DIR must win.
                "registry": "no-such-registry",
                "ingress": {"num_cpus": 0},
                "models": {"digits": {"default": "v1", "versions": {"v1": {"placement": "fused"}}}},
            }
        )
    )
    dep = load_deployment(cfg)
    rendered = deploy.serve_config(Settings(config=cfg), dep, None, portable=True)
    text = yaml.safe_dump(rendered)
    assert "127.0.0.1" not in text and str(registry_root) not in text
    gateway = rendered["applications"][0]
    token_file = tmp_path / "admin-token"
    token_file.write_text("portable-secret\n")
    port = free_port()
    gateway.update(
        name=APP,
        route_prefix="/portable",
        runtime_env={
            "env_vars": {
                "SERVING_REDIS_URL": redis_server.url,
                "SERVING_REDIS_NAMESPACE": "portable",
                "SERVING_REGISTRY_DIR": str(registry_root),
                "SERVING_HTTP_PORT": str(port),
                "SERVING_GRPC_PORT": str(free_port()),
                "SERVING_ADMIN_TOKEN_FILE": str(token_file),
            }
        },
    )
    config = deploy.deployed_config()
    config["applications"].append(gateway)
    deploy.apply_config(config)
    url = f"http://127.0.0.1:{port}"
    try:
        deploy.wait_until_running([APP], 180)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, "portable-secret"
    finally:
        serve.delete(APP)


def test_a_portable_config_takes_its_settings_from_the_replicas_environment(
    portable_gateway: tuple[str, str], redis_server: RedisServer, registry_root: Path
) -> None:
    url, token = portable_gateway
    image = np.load(registry_root / "digits" / "heldout.npz")["X"][0].tolist()
    r = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [image]}, timeout=30)
    assert r.status_code == 200, r.text
    # The prediction record went to the Redis and namespace of the replica's environment.
    record = keys.prediction("portable", r.json()["request_id"])
    deadline = time.monotonic() + 10
    while not redis_server.client().exists(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert redis_server.client().exists(record)
    # The admin token is the one in the file SERVING_ADMIN_TOKEN_FILE names.
    status = f"{url}/admin/v1/models/digits/rollout"
    assert httpx.get(status, timeout=10).status_code == 401
    bad = httpx.get(status, headers={"authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401
    good = httpx.get(status, headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert good.status_code == 200, good.text
    # Nothing of the token in what Ray holds.
    assert token not in yaml.safe_dump(deploy.deployed_config())
