"""The compose stack (deployments/compose/compose.yaml) as a file: its services, health
checks and ports agree with the gateway's defaults, and what it mounts exists and
passes promtool (no container engine runs here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "deployments" / "compose" / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each read-only bind mount."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        out[container] = (COMPOSE.parent / host).resolve()
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    for container, host in mounts(service).items():
        if container_path.startswith(container + "/"):
            return host / container_path.removeprefix(container + "/")
    raise AssertionError(f"{container_path} is not under a mount of the service")


def test_services_and_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        assert service["network_mode"] == "host", name
    gateway = services["gateway"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == "Dockerfile"
    assert (COMPOSE.parent / gateway["build"]["context"] / "Dockerfile").is_file()
    # The image's health check (/readyz on the port the gateway serves on: see
    # tests/integration/cli/test_health.py), and Redis where it runs.
    assert gateway["healthcheck"]["test"] == ["CMD", "serving", "health"]
    redis_port = services["redis"]["command"][services["redis"]["command"].index("--port") + 1]
    assert gateway["environment"]["SERVING_REDIS_URL"] == f"redis://127.0.0.1:{redis_port}/0"
    # The admin token from a file that is never committed.
    token = compose["secrets"][gateway["secrets"][0]]["file"]
    assert gateway["environment"]["SERVING_ADMIN_TOKEN_FILE"].endswith(gateway["secrets"][0])
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(COMPOSE.parent / token)], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, f"{token} must be git-ignored"


def test_prometheus_gets_the_shipped_config_and_it_passes_promtool(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = host_path(prometheus, flag.split("=", 1)[1])
    assert config == ROOT / "deployments" / "prometheus" / "prometheus.yml"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (make test installs Debian's prometheus)")
    out = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # It scrapes the gateway's Ray metrics endpoint where the container exports it.
    targets = yaml.safe_load(config.read_text())["scrape_configs"][0]["static_configs"][0]
    assert f"127.0.0.1:{Settings().metrics_port}" in targets["targets"]


def test_grafana_gets_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    provisioning = host_path(grafana, env["GF_PATHS_PROVISIONING"])
    assert (provisioning / "datasources" / "prometheus.yml").is_file()
    providers = yaml.safe_load((provisioning / "dashboards" / "serving.yml").read_text())
    for provider in providers["providers"]:
        assert list(host_path(grafana, provider["options"]["path"]).glob("*.json"))
    assert host_path(grafana, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    listen = next(a for a in compose["services"]["prometheus"]["command"] if "listen" in a)
    assert url == "http://" + listen.split("=", 1)[1]
