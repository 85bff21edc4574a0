"""The retrainer against a real Redis and real commands (subprocesses): a trigger
runs the command, a valid version starts a canary; failures, time-outs, the cool-down
and the cap on runs. The rollout controller is replaced by a recorder of what the
retrainer asks it (the whole loop with the real one: tests/e2e/test_quality_loop.py)."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import yaml

from serving.errors import Conflict, InvalidInput
from serving.models.mlflow_source import import_version
from serving.models.registry import load_version
from serving.observability.feedback import FeedbackStore
from serving.quality.retrain import Retrainer
from serving.settings import DeploymentFile
from tests.conftest import MlflowServer, RedisServer

# Copies the base version to the output folder under the new name (a "training").
COPY = (
    "import shutil, sys, yaml, pathlib\n"
    "base, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
    "shutil.copytree(base, out)\n"
    "m = yaml.safe_load((out / 'model.yaml').read_text())\n"
    "m.update(name=out.parent.name, version=out.name)\n"
    "(out / 'model.yaml').write_text(yaml.safe_dump(m))\n"
    "print('trained', out.name)\n"
)


class Controller:
    """Records the rollouts the retrainer starts."""

    def __init__(self) -> None:
        self.started: list[tuple[str, dict[str, Any]]] = []
        self.active = False

    async def leading(self) -> bool:
        return True

    async def rollout_active(self, model: str) -> bool:
        return self.active

    def stable_version(self, model: str) -> str:
        return "v1"

    async def start_rollout(self, model: str, body: dict[str, Any]) -> None:
        self.started.append((model, body))


def _registry(root: Path, tmp: Path) -> Path:
    reg = tmp / "registry"
    shutil.copytree(root / "fraud" / "v2", reg / "m" / "v1")
    manifest = yaml.safe_load((reg / "m" / "v1" / "model.yaml").read_text())
    manifest.update(name="m", version="v1")
    (reg / "m" / "v1" / "model.yaml").write_text(yaml.safe_dump(manifest))
    return reg


def _dep(reg: Path, command: list[str], **policy: Any) -> DeploymentFile:
    retrain = {
        "command": command,
        "check_every_s": 0.2,
        "accuracy": {"drop": 0.1, "min_labels": 50},
        "rollout": {"steps": [50, 100], "require_labels": True},
        **policy,
    }
    return DeploymentFile.model_validate(
        {
            "registry": str(reg),
            "models": {"m": {"default": "v1", "versions": {"v1": {}}, "retrain": retrain}},
        }
    )


async def _wrong_labels(redis: RedisServer, ns: str, n: int) -> None:
    """n predictions of m/v1, every one labelled wrong: accuracy 0 against 0.98."""
    store = FeedbackStore(redis.url, ns, ttl_s=600)
    try:
        for i in range(n):
            store.record(f"r{i}", "m", "v1", np.array([0]))
        await store.flush()
        await store.label([(f"r{i}", 1, None) for i in range(n)], trusted=True)
    finally:
        await store.close()


async def _until(cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@pytest.fixture
def ns() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"


async def test_an_accuracy_drop_trains_a_version_and_starts_its_canary(
    redis_server: RedisServer, registry_root: Path, tmp_path: Path, ns: str
) -> None:
    reg = _registry(registry_root, tmp_path)
    dep = _dep(reg, ["{python}", "-c", COPY, "{base}", "{output}"], cooldown_s=3600)
    ctl = Controller()
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rt = Retrainer(r, ns, dep, ctl, None)
    await rt.ensure_started()
    try:
        await asyncio.sleep(0.5)
        assert (await rt.status("m"))["last"] is None  # no labels: no trigger
        await _wrong_labels(redis_server, ns, 60)

        await _until(lambda: _done(rt))
        st = await rt.status("m")
        run = st["last"]
        assert run["status"] == "registered" and run["version"] == "r1", run
        assert run["reason"].startswith("accuracy 0.0% over the last 600s (60 labels)")
        assert "trained r1" in run["output"] and run["rollout"] == "canary started"
        assert (reg / "m" / "r1" / "model.onnx").is_file()
        assert ctl.started == [("m", {"to": "r1", "steps": [50, 100], "require_labels": True})]
        assert st["cooldown_left_s"] > 3500
        # The trigger still holds, but the cool-down keeps a second run from starting;
        # an admin's run does not wait for it, and makes the next version.
        await asyncio.sleep(1.0)
        assert len(await rt.history("m")) == 1
        started = await rt.run("m")
        assert started["version"] == "r2" and started["actor"] == "admin"
        with pytest.raises(Conflict, match="a retrain of m is running"):
            await rt.run("m")
        await _until(lambda: _done(rt))
        assert [h["version"] for h in await rt.history("m")] == ["r2", "r1"]
        # While a rollout runs, no run starts.
        ctl.active = True
        with pytest.raises(Conflict, match="rollout of m is in progress"):
            await rt.run("m")
        with pytest.raises(InvalidInput, match="no retrain policy"):
            await rt.status("other")
    finally:
        await rt.close()
        await r.aclose()


@pytest.mark.parametrize(
    ("command", "timeout_s", "status", "error"),
    [
        (["{python}", "-c", "print('no data'); raise SystemExit(3)"], 30, "failed", "exit code 3"),
        (["{python}", "-c", "import time; time.sleep(60)"], 1, "timed_out", "no result within 1s"),
        (
            [
                "{python}",
                "-c",
                "import pathlib, sys; pathlib.Path(sys.argv[1]).mkdir()",
                "{output}",
            ],
            30,
            "failed",
            "no valid version made",
        ),
    ],
)
async def test_a_run_that_makes_no_version_ends_recorded_and_leaves_nothing(
    redis_server: RedisServer,
    registry_root: Path,
    tmp_path: Path,
    ns: str,
    command: list[str],
    timeout_s: float,
    status: str,
    error: str,
) -> None:
    reg = _registry(registry_root, tmp_path)
    ctl = Controller()
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rt = Retrainer(r, ns, _dep(reg, command, timeout_s=timeout_s), ctl, None)
    try:
        t0 = time.monotonic()
        await rt.run("m")

        await _until(lambda: _done(rt))
        assert time.monotonic() - t0 < timeout_s + 10
        (run,) = await rt.history("m")
        assert run["status"] == status and error in run["error"], run
        assert not (reg / "m" / "r1").exists() and ctl.started == []
    finally:
        await rt.close()
        await r.aclose()


async def test_a_command_needing_the_log_without_one_fails_clearly(
    redis_server: RedisServer, registry_root: Path, tmp_path: Path, ns: str
) -> None:
    reg = _registry(registry_root, tmp_path)
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rt = Retrainer(r, ns, _dep(reg, ["{python}", "x.py", "{log_dsn}"]), Controller(), None)
    try:
        await rt.run("m")
        await _until(lambda: _done(rt))
        assert (await rt.history("m"))[0]["error"] == "the command needs SERVING_LOG_DSN"
    finally:
        await rt.close()
        await r.aclose()


async def _done(rt: Retrainer) -> bool:
    last = (await rt.status("m"))["last"]
    return last is not None and last["status"] != "running"


async def test_a_retrained_version_can_be_registered_in_mlflow_and_imported_back(
    redis_server: RedisServer,
    registry_root: Path,
    tmp_path: Path,
    ns: str,
    mlflow_server: MlflowServer,
) -> None:
    reg = _registry(registry_root, tmp_path)
    name = f"retrained-{uuid.uuid4().hex[:8]}"
    dep = _dep(
        reg,
        ["{python}", "-c", COPY, "{base}", "{output}"],
        register_to="mlflow",
        mlflow_name=name,
    )
    ctl = Controller()
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rt = Retrainer(r, ns, dep, ctl, None, mlflow_server.url)
    try:
        await rt.run("m", "drill")
        await _until(lambda: _done(rt), 60.0)
        (run,) = await rt.history("m")
        assert run["status"] == "registered", run
        assert run["registered_as"] == f"models:/{name}/1" and ctl.started
    finally:
        await rt.close()
        await r.aclose()
    # The alias names it; importing it back gives the same model and serving keys.
    back = import_version(
        f"models:/{name}@challenger", tmp_path / "back", "m", "r1", tracking_uri=mlflow_server.url
    )
    made = load_version(reg / "m" / "r1")
    assert back.manifest.features == made.manifest.features
    assert back.manifest.inputs == made.manifest.inputs
    assert back.artifact_path.read_bytes() == made.artifact_path.read_bytes()
    assert back.manifest.training["source"] == f"models:/{name}@challenger"
