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
from serving.errors import ConfigError
from serving.settings import Settings, load_deployment
from tests.conftest import RedisServer, free_port
from tests.e2e.conftest import GatewayUnderTest, RayServe

APP = "gateway-portable"


def deploy_portable(name: str, tmp_path: Path, env: dict[str, str]) -> None:
    """A config rendered as `serving config render` does (digits fused, a registry
    path that does not exist here), deployed as application `name` with `env` as its
    replicas' environment (as a pod's env would be)."""
    cfg = tmp_path / "portable.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "registry": "no-such-registry",  # SERVING_REGISTRY_DIR must win
                "ingress": {"num_cpus": 0},
                "models": {"digits": {"default": "v1", "versions": {"v1": {"placement": "fused"}}}},
            }
        )
    )
    rendered = deploy.serve_config(Settings(config=cfg), load_deployment(cfg), None, portable=True)
    assert "127.0.0.1" not in yaml.safe_dump(rendered)
    gateway = rendered["applications"][0]
    gateway.update(name=name, route_prefix=f"/{name}", runtime_env={"env_vars": env})
    config = deploy.deployed_config()
    config["applications"].append(gateway)
    deploy.apply_config(config)


@pytest.fixture
def portable_gateway(
    ray_serve: RayServe, redis_server: RedisServer, registry_root: Path, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    from ray import serve

    token_file = tmp_path / "admin-token"
    token_file.write_text("portable-secret\n")
    port = free_port()
    env = {
        "SERVING_REDIS_URL": redis_server.url,
        "SERVING_REDIS_NAMESPACE": "portable",
        "SERVING_REGISTRY_DIR": str(registry_root),
        "SERVING_HTTP_PORT": str(port),
        "SERVING_GRPC_PORT": str(free_port()),
        "SERVING_ADMIN_TOKEN_FILE": str(token_file),
    }
    deploy_portable(APP, tmp_path, env)
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


def test_a_second_gateway_on_a_port_in_use_fails_loudly(
    gateway: GatewayUnderTest, redis_server: RedisServer, registry_root: Path, tmp_path: Path
) -> None:
    """Another gateway (another application here; another Ray cluster alike) asked to
    serve on the session gateway's HTTP port fails to deploy, saying why, instead of
    sharing the port through SO_REUSEPORT; the session gateway keeps answering alone."""
    from ray import serve

    port = int(gateway.url.rsplit(":", 1)[1])
    env = {
        "SERVING_REDIS_URL": redis_server.url,
        "SERVING_REDIS_NAMESPACE": "intruder",
        "SERVING_REGISTRY_DIR": str(registry_root),
        "SERVING_HTTP_PORT": str(port),
        "SERVING_GRPC_PORT": str(free_port()),
    }
    name = "gateway-intruder"
    deploy_portable(name, tmp_path, env)
    try:
        with pytest.raises(ConfigError, match=f"HTTP port {port} is already served by another"):
            deploy.wait_until_running([name], 180)
    finally:
        serve.delete(name)
    for _ in range(20):
        assert httpx.get(gateway.url + "/readyz", timeout=5).status_code == 200
