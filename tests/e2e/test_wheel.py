"""The built wheel runs anywhere: installed into a fresh virtual environment and run
from a folder outside the project, it builds the demo models, renders its config,
serves and answers. (Its dependencies come from the project's environment through a
.pth file, so nothing is downloaded; the `serving` package is the wheel's.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import yaml

from tests.conftest import RedisServer
from tests.e2e.test_cli import ROOT, start_serving_up


def run(args: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "RAY_"))}
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out.stdout


def test_the_wheel_runs_outside_the_project(tmp_path: Path, redis_server: RedisServer) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", dist, ROOT], cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("serving-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in (
        "serving/demo/deployment.yaml",
        "serving/demo/build.py",
        "serving/proto/grpc_predict_v2.proto",
    ):
        assert packaged in names, packaged
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site / "project-deps.pth").write_text(f"{deps}\n")
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        cwd=tmp_path)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    serving = venv / "bin" / "serving"
    located = run([venv / "bin" / "python", "-c", "import serving; print(serving.__file__)"],
                  cwd=elsewhere)  # fmt: skip
    assert located.strip().startswith(str(site)), located
    assert run([serving, "--version"], cwd=elsewhere).strip() == "serving 0.1.0"

    demo = elsewhere / "demo"
    run([serving, "demo", "build", demo], cwd=elsewhere)
    config = demo / "deployment.yaml"
    assert yaml.safe_load(config.read_text())["registry"] == str(demo)
    rendered = yaml.safe_load(run([serving, "config", "render", "--config", config], cwd=elsewhere))
    assert {a["name"] for a in rendered["applications"]} >= {"gateway", "model-fraud-v1"}

    proc, port, _ = start_serving_up(
        tmp_path,
        redis_server.url,
        "wheel",
        serving=[str(serving)],
        cwd=elsewhere,
        SERVING_CONFIG=str(config),
    )
    try:
        instance = {"user_id": "u1042", "merchant_id": "m77", "amount": 912.5, "hour": 3,
                    "is_foreign": 1, "card_present": 0}  # fmt: skip
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/models/fraud:predict",
            json={"instances": [instance]},
            timeout=30,
        )
        assert r.status_code == 200 and "degraded" not in r.json(), r.text
        url = f"http://127.0.0.1:{port}"
        listed = json.loads(run([serving, "models", "list", "--json", "--url", url], elsewhere))
        assert {m["name"] for m in listed["models"]} == {"fraud", "digits"}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
