"""Shadow traffic: a sampled copy of an answered request goes to the shadow version;
its answer is compared with the served one. Copies never delay the answer and their
failures never reach the client; past MAX_IN_FLIGHT copies in flight they are dropped
(counted)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import numpy as np

from serving.dataplane.invoke import VersionCaller
from serving.models.registry import Arrays, Manifest
from serving.observability.metrics import metrics

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32


class ShadowStats(Protocol):
    def shadow(self, model: str, version: str, *, error: bool, agree: bool) -> None: ...


class ShadowSender:
    def __init__(self, caller: VersionCaller, stats: ShadowStats | None, timeout_s: float) -> None:
        self._caller = caller
        self._stats = stats
        self._timeout_s = timeout_s
        self._slots: asyncio.Semaphore | None = None  # made inside the running loop
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until done

    def send(
        self, model: str, version: str, manifest: Manifest, arrays: Arrays, served: Arrays
    ) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        if self._slots.locked():
            metrics().shadow.inc(1, tags={"model": model, "version": version, "outcome": "dropped"})
            return
        task = asyncio.create_task(self._copy(model, version, manifest, arrays, served))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy(
        self, model: str, version: str, manifest: Manifest, arrays: Arrays, served: Arrays
    ) -> None:
        assert self._slots is not None
        async with self._slots:
            error, agree = False, False
            try:
                result = await self._caller.call(model, version, "predict", self._timeout_s, arrays)
                agree = all(agreement(served, result.outputs, [o.name for o in manifest.outputs]))
            except Exception as exc:  # never reaches the client: counted and logged
                error = True
                log.debug("shadow %s/%s failed: %s", model, version, exc)
            if self._stats is not None:
                self._stats.shadow(model, version, error=error, agree=agree)
            outcome = "error" if error else ("agree" if agree else "disagree")
            metrics().shadow.inc(1, tags={"model": model, "version": version, "outcome": outcome})


def agreement(a: dict[str, Any], b: dict[str, Any], names: list[str]) -> list[bool]:
    """Per instance, whether two answers agree: on `label` when the model has one,
    else on every output within a small tolerance."""
    keys = ["label"] if "label" in names else names
    n = len(next(iter(a.values())))
    agree = np.ones(n, dtype=bool)
    for k in keys:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape:
            return [False] * n
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            close = np.isclose(x, y, rtol=1e-3, atol=1e-4)
        else:
            close = x == y
        agree &= close.reshape(n, -1).all(axis=1)
    return [bool(v) for v in agree]
