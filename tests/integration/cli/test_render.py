"""`serving config render`: a portable Serve config and a KubeRay RayService that hold
nothing of the machine they were rendered on, and that validate against Ray's and
KubeRay's own schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving import kuberay

REPO = Path(__file__).resolve().parents[3]
# KubeRay's CRD schema for RayService (openAPIV3Schema of rayservices.ray.io, its
# title names the commit), kept with the tests so they run from any clone.
SCHEMA = REPO / "tests" / "data" / "rayservice.v1.schema.json"
TOKEN = "render-test-token-4f1d"


def render(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "config", "render", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            # What this machine would bake in if render took it from the settings.
            "SERVING_ADMIN_TOKEN": TOKEN,
            "SERVING_REDIS_URL": "redis://127.0.0.1:6399/3",
            "SERVING_HTTP_HOST": "127.0.0.1",
            **env,
        },
    )


def machine_specific(text: str) -> list[str]:
    """What a config rendered here must not hold: this machine's addresses, paths or
    the admin token (nor its digest)."""
    from serving.auth import token_digest

    needles = [
        "127.0.0.1",
        "localhost",
        str(REPO),
        str(Path.home()),
        TOKEN,
        token_digest(TOKEN),
    ]
    return [n for n in needles if n in text]


@pytest.fixture(scope="module")
def serve_yaml(registry_root: Path) -> str:
    out = render()
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def rayservice_yaml(registry_root: Path) -> str:
    out = render("--format", "rayservice", "--image", "example.org/serving:1.0")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_serve_config_holds_nothing_of_this_machine(serve_yaml: str) -> None:
    assert machine_specific(serve_yaml) == []
    doc = yaml.safe_load(serve_yaml)
    gateway = next(a for a in doc["applications"] if a["name"] == "gateway")
    # Process settings are read where each replica runs, not frozen here.
    assert gateway["args"]["settings"] == {}
    assert gateway["args"]["admin_token_sha256"] is None
    for app in doc["applications"][1:]:
        assert app["args"]["runtime"] is None
        assert not Path(app["args"]["registry"]).is_absolute()


def test_the_serve_config_is_a_valid_serve_deploy_schema(serve_yaml: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(serve_yaml))


def test_the_rayservice_validates_against_the_kuberay_crd(rayservice_yaml: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = json.loads(SCHEMA.read_text())
    doc = yaml.safe_load(rayservice_yaml)
    jsonschema.validate(doc, schema)  # the whole object
    jsonschema.validate(doc["spec"], schema["properties"]["spec"])  # and as `spec`
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert isinstance(doc["spec"]["serveConfigV2"], str)
    ServeDeploySchema.model_validate(serve)
    assert machine_specific(rayservice_yaml) == []


def test_the_rayservice_cluster(rayservice_yaml: str) -> None:
    doc = yaml.safe_load(rayservice_yaml)
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]
    gpu_pod = groups["gpu"]["template"]["spec"]
    gpu = gpu_pod["containers"][0]
    assert cpu["image"] == "example.org/serving:1.0"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    # Probes on the gateway's health routes where the ingress runs.
    assert cpu["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert cpu["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in cpu["ports"]}
    assert ports == {"serve": 8000, "grpc": 9000, "metrics": 8080}
    # The ingress asks for the resource only the CPU group's pods offer.
    offered = json.loads(json.loads(groups["cpu"]["rayStartParams"]["resources"]))
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    gateway = next(a for a in serve["applications"] if a["name"] == "gateway")
    asked = gateway["deployments"][0]["ray_actor_options"]["resources"]
    assert set(asked) == set(offered) == {kuberay.INGRESS_RESOURCE}
    # Environment from the Secret: the Redis URL as a variable, the token as a file.
    for container in (cpu, gpu):
        env = {e["name"]: e for e in container["env"]}
        assert env["SERVING_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
        assert env["SERVING_ADMIN_TOKEN_FILE"]["value"].startswith(kuberay.TOKEN_DIR)
        assert "SERVING_ADMIN_TOKEN" not in env
    volume = gpu_pod["volumes"][0]["secret"]
    assert volume["items"] == [{"key": "admin-token", "path": "admin-token"}]


def test_render_outside_the_project_says_what_to_do(tmp_path: Path) -> None:
    out = render(cwd=tmp_path)
    assert out.returncode == 1
    assert "deployments/local.yaml" in out.stderr and "--config" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_committed_kuberay_manifest_is_the_rendered_one(rayservice_yaml: str) -> None:
    committed = REPO / "deployments" / "kuberay" / "rayservice.yaml"
    fresh = render("--format", "rayservice").stdout
    assert committed.read_text() == fresh, "re-render: make kuberay"


def test_the_kustomization_is_complete() -> None:
    root = REPO / "deployments" / "kuberay"
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    kinds = set()
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((root / resource).read_text()):
            kinds.add(doc["kind"])
    assert {"RayService", "Service", "Deployment", "PodMonitor"} <= kinds
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            shipped = root / file
            source = REPO / "deployments" / "grafana" / file
            assert shipped.read_text() == source.read_text(), "refresh: make kuberay"


def test_the_packaged_demo_deployment_is_the_projects() -> None:
    """The wheel's demo deployment (serving/demo/deployment.yaml, which `serving demo
    build` fills in) is deployments/local.yaml."""
    packaged = REPO / "serving" / "demo" / "deployment.yaml"
    assert packaged.read_text() == (REPO / "deployments" / "local.yaml").read_text()
