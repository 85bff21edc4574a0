"""The retraining trigger: a model's policy (serving.settings.RetrainPolicy) watched by
the control plane's analysis leader, acted on unattended.

Every `check_every_s` the leader looks at the model's stable version: accuracy from
delayed labels (the minute buckets in Redis) against the reference, and the feature
PSIs the ingress replicas publish. A trigger (or `serving retrain run`) runs the policy's
command with a timeout; the command fills a new version's folder in the local registry
(`{output}`); once that folder loads as a valid version, a canary rollout of it starts
with the policy's analysis settings, so promotion or rollback is the rollout's usual
evidence. A cool-down between runs and a cap on runs at once bound the cost.

Runs and their outcomes are kept in Redis (serving.keys.retrain*), so `status` and
`history` survive a restart of the control plane; a run its process did not live to
finish reads `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis
from pydantic import BaseModel

from serving import keys
from serving.background import every
from serving.errors import ConfigError, Conflict, InvalidInput, ServingError
from serving.models.mlflow_register import register
from serving.models.registry import Registry, load_version
from serving.observability.feedback import minute_counts
from serving.observability.metrics import metrics
from serving.quality.policy import (
    AccuracyTrigger,
    DriftTrigger,
    RetrainPolicy,
    accuracy_reason,
    command_line,
    next_version,
    worst_psi,
)
from serving.settings import DeploymentFile

log = logging.getLogger(__name__)

HISTORY_MAX = 50  # runs kept per model
OUTPUT_TAIL = 4000  # characters of the command's output kept with the run

Status = Literal["running", "registered", "failed", "timed_out", "interrupted"]


class RetrainRun(BaseModel):
    model: str
    version: str  # the version the run makes
    reason: str
    actor: Literal["auto", "admin"]
    status: Status = "running"
    started: float
    finished: float | None = None
    base: str = ""  # the stable version when it started
    exit_code: int | None = None
    output: str = ""  # the tail of the command's output
    error: str = ""
    rollout: str = ""  # what became of the canary rollout's start
    registered_as: str = ""  # the MLflow model version (register: mlflow)
    owner: str = ""  # the controller process running it


class Host(Protocol):
    """What the retrainer needs of the rollout controller."""

    async def leading(self) -> bool: ...

    async def rollout_active(self, model: str) -> bool: ...

    def stable_version(self, model: str) -> str: ...

    async def start_rollout(self, model: str, body: dict[str, Any]) -> None: ...


# ---- the retrainer ---------------------------------------------------------------------
class Retrainer:
    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        dep: DeploymentFile,
        host: Host,
        log_dsn: str | None,
        mlflow_tracking_uri: str | None = None,
    ) -> None:
        self._r = redis
        self._ns = namespace
        self._dep = dep
        self._host = host
        self._log_dsn = log_dsn
        self._mlflow_uri = mlflow_tracking_uri
        self._id = uuid.uuid4().hex[:12]
        self._policies = {m: c.retrain for m, c in dep.models.items() if c.retrain is not None}
        self._next_check: dict[str, float] = {}
        self._drift_since: dict[str, float] = {}
        self._recorded: dict[tuple[str, str], float | None] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def ensure_started(self) -> None:
        if self._task is None and self._policies:
            self._task = asyncio.create_task(every(1.0, self._check, "retraining trigger"))

    async def close(self) -> None:
        for task in [self._task, *self._running.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ---- admin ---------------------------------------------------------------------
    def policy(self, model: str) -> RetrainPolicy:
        policy = self._policies.get(model)
        if policy is None:
            raise InvalidInput(f"model {model!r} has no retrain policy in the deployment file")
        return policy

    async def status(self, model: str) -> dict[str, Any]:
        """The policy, the latest run and what the triggers read now."""
        policy = self.policy(model)
        last = await self._last(model)
        return {
            "model": model,
            "policy": policy.model_dump(mode="json"),
            "last": last.model_dump(mode="json") if last else None,
            "running": model in self._running,
            "cooldown_left_s": self._cooldown_left(policy, last),
            "drift_since": self._drift_since.get(model),
        }

    async def history(self, model: str) -> list[dict[str, Any]]:
        self.policy(model)
        docs = await self._r.lrange(keys.retrain_history(self._ns, model), 0, HISTORY_MAX - 1)
        return [json.loads(d) for d in docs]

    async def run(self, model: str, reason: str = "", actor: str = "admin") -> dict[str, Any]:
        """Start a run now (admin: regardless of the cool-down); 409 while the model
        has one running or a rollout in progress, or the cap on runs is reached."""
        self.policy(model)
        refusal = await self._refusal(model)
        if refusal:
            raise Conflict(refusal)
        run = await self._start(model, reason or "asked for by an admin", "admin", "manual")
        return run.model_dump(mode="json")

    # ---- the loop ------------------------------------------------------------------
    async def _check(self) -> None:
        if not await self._host.leading():
            return
        now = time.time()
        for model, policy in self._policies.items():
            if now < self._next_check.get(model, 0.0):
                continue
            self._next_check[model] = now + policy.check_every_s
            try:
                await self._check_model(model, policy, now)
            except ServingError as exc:
                log.warning("retrain check of %s: %s", model, exc)

    async def _check_model(self, model: str, policy: RetrainPolicy, now: float) -> None:
        last = await self._last(model)
        if last is not None and last.status == "running" and last.owner != self._id:
            # Started by a control plane that is gone: it will never finish.
            await self._finish(last, "interrupted", error="the control plane restarted")
            last = await self._last(model)
        trigger = await self._triggered(model, policy, now)
        if trigger is None:
            return
        reason, kind = trigger
        if self._cooldown_left(policy, last) > 0 or await self._refusal(model):
            return
        await self._start(model, reason, "auto", kind)

    async def _triggered(
        self, model: str, policy: RetrainPolicy, now: float
    ) -> tuple[str, str] | None:
        stable = self._host.stable_version(model)
        if policy.accuracy is not None:
            reason = await self._accuracy(model, stable, policy.accuracy, now)
            if reason:
                return reason, "accuracy"
        if policy.drift is not None:
            reason = await self._drift(model, stable, policy.drift, now)
            if reason:
                return reason, "drift"
        return None

    async def _accuracy(
        self, model: str, stable: str, policy: AccuracyTrigger, now: float
    ) -> str | None:
        window = await minute_counts(self._r, self._ns, model, stable, now - policy.window_s, now)
        if sum(b[1] for b in window) < policy.min_labels:
            return None  # before reading any reference
        if policy.reference == "training":
            reference = await self._training_accuracy(model, stable)
            what = f"training accuracy of {stable}"
        else:
            earlier = await minute_counts(
                self._r,
                self._ns,
                model,
                stable,
                now - policy.window_s - policy.reference_window_s,
                now - policy.window_s,
            )
            n, c = sum(b[1] for b in earlier), sum(b[2] for b in earlier)
            reference = c / n if n >= policy.min_labels else None
            what = f"accuracy of {stable} in the {policy.reference_window_s:g}s before"
        return accuracy_reason(policy, window, reference, what)

    async def _training_accuracy(self, model: str, version: str) -> float | None:
        """The held-out accuracy a version's manifest recorded, read once (parsing a
        manifest costs tens of ms; a version's manifest never changes)."""
        key = (model, version)
        if key not in self._recorded:
            try:
                mv = await asyncio.to_thread(Registry(self._dep.registry).get, model, version)
            except ConfigError:
                return None
            self._recorded[key] = mv.manifest.metrics.get("accuracy")
        return self._recorded[key]

    async def _drift(self, model: str, stable: str, policy: DriftTrigger, now: float) -> str | None:
        worst = worst_psi(await self._r.hgetall(keys.psi(self._ns, model, stable)), now)
        if worst is None or worst[1] <= policy.psi:
            self._drift_since.pop(model, None)
            return None
        since = self._drift_since.setdefault(model, now)
        if now - since < policy.for_s:
            return None
        return (
            f"PSI of feature {worst[0]!r} of {stable} is {worst[1]:.3f} > {policy.psi:g} "
            f"for {now - since:.0f}s"
        )

    # ---- runs ----------------------------------------------------------------------
    async def _refusal(self, model: str) -> str:
        """Why a run may not start now ('' when it may)."""
        if model in self._running:
            return f"a retrain of {model} is running"
        if len(self._running) >= self._dep.retrain_max_concurrent:
            return (
                f"{len(self._running)} retrains running, the most at once "
                f"(retrain_max_concurrent {self._dep.retrain_max_concurrent})"
            )
        if await self._host.rollout_active(model):
            return f"a rollout of {model} is in progress: finish it first"
        return ""

    def _cooldown_left(self, policy: RetrainPolicy, last: RetrainRun | None) -> float:
        if last is None:
            return 0.0
        return max(last.started + policy.cooldown_s - time.time(), 0.0)

    async def _last(self, model: str) -> RetrainRun | None:
        doc = await self._r.get(keys.retrain(self._ns, model))
        return RetrainRun.model_validate_json(doc) if doc else None

    async def _start(self, model: str, reason: str, actor: str, kind: str) -> RetrainRun:
        policy = self.policy(model)
        stable = self._host.stable_version(model)
        existing = Registry(self._dep.registry).list().get(model, [])
        run = RetrainRun(
            model=model,
            version=next_version(existing, policy.version_prefix),
            reason=reason,
            actor="auto" if actor == "auto" else "admin",
            started=time.time(),
            base=stable,
            owner=self._id,
        )
        await self._r.set(keys.retrain(self._ns, model), run.model_dump_json())
        metrics().retrain_triggers.inc(1, tags={"model": model, "reason": kind})
        metrics().retrain_running.set(1, tags={"model": model})
        log.warning("retraining %s as %s (%s): %s", model, run.version, actor, reason)
        self._running[model] = asyncio.create_task(self._execute(run, policy))
        return run

    async def _execute(self, run: RetrainRun, policy: RetrainPolicy) -> None:
        try:
            await self._command(run, policy)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a run must always end in a recorded state
            log.exception("retrain of %s failed", run.model)
            await self._finish(run, "failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._running.pop(run.model, None)
            metrics().retrain_running.set(0, tags={"model": run.model})

    async def _command(self, run: RetrainRun, policy: RetrainPolicy) -> None:
        registry = self._dep.registry.resolve()
        output = registry / run.model / run.version
        since = datetime.fromtimestamp(run.started - policy.data_since_s, UTC)
        values = {
            "python": sys.executable,
            "model": run.model,
            "version": run.version,
            "output": str(output),
            "base": str(registry / run.model / run.base),
            "registry": str(registry),
            "since": since.isoformat(),
            "log_dsn": self._log_dsn or "",
        }
        if self._log_dsn is None and any("{log_dsn}" in a for a in policy.command):
            await self._finish(run, "failed", error="the command needs SERVING_LOG_DSN")
            return
        argv = command_line(policy, values)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=policy.workdir,
            start_new_session=True,  # its whole process group goes on a timeout
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), policy.timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            _discard(output)
            await self._finish(
                run, "timed_out", error=f"no result within {policy.timeout_s:g}s", code=None
            )
            return
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        run.output = out.decode(errors="replace")[-OUTPUT_TAIL:]
        if proc.returncode != 0:
            _discard(output)
            await self._finish(
                run, "failed", error=f"exit code {proc.returncode}", code=proc.returncode
            )
            return
        try:
            made = load_version(output)
        except ConfigError as exc:
            _discard(output)
            await self._finish(run, "failed", error=f"no valid version made: {exc}", code=0)
            return
        if policy.register_to == "mlflow":
            try:
                run.registered_as = await asyncio.to_thread(
                    register,
                    made,
                    policy.mlflow_name or run.model,
                    policy.mlflow_alias,
                    self._mlflow_uri,
                    {"retrain.reason": run.reason[:500]},
                )
            except ConfigError as exc:
                _discard(output)
                await self._finish(run, "failed", error=f"MLflow: {exc}", code=0)
                return
        try:
            await self._host.start_rollout(run.model, {"to": run.version, **policy.rollout})
            run.rollout = "canary started"
        except ServingError as exc:
            run.rollout = f"not started: {exc}"
        await self._finish(run, "registered", code=0)

    async def _finish(
        self, run: RetrainRun, status: Status, *, error: str = "", code: int | None = None
    ) -> None:
        run.status = status
        run.finished = time.time()
        run.error = error
        run.exit_code = code
        doc = run.model_dump_json()
        pipe = self._r.pipeline(transaction=True)
        pipe.set(keys.retrain(self._ns, run.model), doc)
        pipe.lpush(keys.retrain_history(self._ns, run.model), doc)
        pipe.ltrim(keys.retrain_history(self._ns, run.model), 0, HISTORY_MAX - 1)
        await pipe.execute()
        outcome = "registered" if status == "registered" else status
        metrics().retrains.inc(1, tags={"model": run.model, "outcome": outcome})
        log.warning(
            "retrain of %s as %s: %s%s%s",
            run.model,
            run.version,
            status,
            f" ({error})" if error else "",
            f"; rollout {run.rollout}" if run.rollout else "",
        )


def _discard(folder: Path) -> None:
    """Remove what a failed run left of its version (never a folder it did not make)."""
    shutil.rmtree(folder, ignore_errors=True)
