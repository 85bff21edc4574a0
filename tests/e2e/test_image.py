"""The CPU image is built with podman from the project's Dockerfile (on a local
Debian bookworm base, the build arg standing in for python:3.11-slim-bookworm), run
beside a Redis on the host's network, and answers: /readyz, its HEALTHCHECK, a v1 and a
gRPC prediction from inside the container, and a prompt exit on SIGTERM. The GPU
Dockerfile's own stages (apt-pinned Python on a CUDA base) are built on the same base;
its CUDA base and torch's CUDA build cannot be fetched here, so the rest is linted
(tests/integration/packaging/test_dockerfiles.py)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port
from tests.e2e.containers import Podman, build_args, host_pip_sources, wait_ready
from tests.e2e.test_cli import ROOT

IMAGE = "localhost/serving-test:cpu"
TOKEN = "image-test-token"
ZEROS = json.dumps([[[0.0] * 8] * 8])


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def build(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The options every build of this module shares (base, package sources)."""
    work = tmp_path_factory.mktemp("image")
    base = podman.base_image(work)
    mounts, args = host_pip_sources(work)
    yield ["build", "--format", "docker", "--network", "host", *mounts,
           *build_args({**args, "BASE_IMAGE": base})]  # fmt: skip
    # Keep the tagged images (the next run's layer cache); drop the dangling ones.
    podman.run("image", "prune", "-f", check=False, timeout=300)


@pytest.fixture(scope="module")
def image(podman: Podman, build: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    log = tmp_path_factory.mktemp("build") / "build.log"
    podman.run(*build, "-t", IMAGE, "-f", "Dockerfile", str(ROOT), timeout=1800, log=log)
    return IMAGE


def test_the_image_is_built_as_specified(podman: Podman, image: str) -> None:
    (info,) = json.loads(podman.run("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "10001:10001"  # numeric, non-root
    assert config["Entrypoint"] == ["serving"] and config["Cmd"] == ["up"]
    assert info["Healthcheck"]["Test"] == ["CMD", "serving", "health"]
    assert {"8000/tcp", "9000/tcp", "8080/tcp"} <= set(config["ExposedPorts"])
    probe = (
        "import importlib.metadata as m, pathlib, sys\n"
        "names = {d.metadata['Name'].lower() for d in m.distributions()}\n"
        "print(json.dumps({'onnx': sorted(n for n in names if n.startswith('onnxruntime')),\n"
        "  'train': sorted(names & {'scikit-learn', 'skl2onnx'}),\n"
        "  'models': sorted(str(p) for p in pathlib.Path('/app/models').glob('*/v*/model.yaml')),\n"
        "  'config': pathlib.Path('/app/deployments/local.yaml').is_file(),\n"
        "  'torch': m.version('torch')}))"
    )
    out = podman.run("run", "--rm", "--entrypoint", "python3", image, "-c",
                     "import json\n" + probe).stdout  # fmt: skip
    found = json.loads(out)
    assert found["onnx"] == ["onnxruntime"]  # the cpu extra, never onnxruntime-gpu
    assert found["train"] == []  # the training extra stays in the build stage
    assert "/app/models/digits/v1/model.yaml" in found["models"]
    assert "/app/models/fraud/v2/model.yaml" in found["models"]
    assert found["config"] and found["torch"].startswith("2.13.0")


def test_dependencies_are_a_layer_below_the_source(
    podman: Podman, build: list[str], image: str, tmp_path: Path
) -> None:
    """An edit to the source leaves the dependency stage as it was (cached)."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(ROOT / "serving", context / "serving",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    with (context / "serving" / "__init__.py").open("a") as f:
        f.write("# an edit\n")

    def deps_id(where: Path) -> str:
        ids = tmp_path / "iid"
        podman.run(*build, "--target", "deps", "--iidfile", str(ids), str(where), timeout=600)
        return ids.read_text().strip()

    assert deps_id(context) == deps_id(ROOT)


def test_the_image_serves_beside_redis(
    podman: Podman, image: str, redis_server: RedisServer
) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {
        "SERVING_REDIS_URL": redis_server.url,
        "SERVING_HTTP_PORT": http,
        "SERVING_GRPC_PORT": grpc,
        "SERVING_METRICS_PORT": metrics,
        "SERVING_ADMIN_TOKEN": TOKEN,
    }
    opts = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    name = f"serving-test-{http}"
    with podman.container(image, name, "--shm-size", "1g", *opts):
        wait_ready(podman, name, f"http://127.0.0.1:{http}/readyz")
        assert podman.run("healthcheck", "run", name, check=False).returncode == 0
        for protocol in ("v1", "grpc"):
            out = podman.run(
                "exec", name, "serving", "predict", "digits", "-i", ZEROS, "--json",
                "--protocol", protocol, timeout=60,
            ).stdout  # fmt: skip
            assert "predictions" in out or "outputs" in out, out
        answer = json.loads(
            podman.run("exec", name, "serving", "predict", "digits", "-i", ZEROS, "--json").stdout
        )
        assert answer["version"] == "v1" and 0 <= answer["predictions"][0]["label"] <= 9
        # SIGTERM (docker stop): drained and gone well within the grace period.
        start = time.monotonic()
        podman.run("stop", "-t", "30", name, timeout=60)
        stopped_in = time.monotonic() - start
        state = json.loads(podman.run("inspect", name).stdout)[0]["State"]
        assert stopped_in < 20, stopped_in
        assert state["ExitCode"] == 0, (state, podman.logs(name))


def test_the_gpu_dockerfile_python_stage_builds(podman: Podman, build: list[str]) -> None:
    """Dockerfile.gpu's apt-pinned Python, on the local Debian base (its CUDA base
    cannot be pulled here): the version pin resolves and makes a working venv."""
    podman.run(*build, "--build-arg", "PYTHON_VERSION=3.11", "--target", "python",
               "-t", "localhost/serving-test:gpu-python", "-f", "Dockerfile.gpu", str(ROOT),
               timeout=600)  # fmt: skip
    out = podman.run("run", "--rm", "--entrypoint", "python3", "localhost/serving-test:gpu-python",
                     "-c", "import sys, venv; print(sys.version_info[:2])").stdout  # fmt: skip
    assert out.strip() == "(3, 11)"
