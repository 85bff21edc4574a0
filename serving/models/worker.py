"""ModelWorker: one model version's runtime, dynamic batching, warm-up and live
reconfiguration. It runs as a Ray Serve deployment of its own (serving.models.replica)
or, for versions placed `fused`, inside each ingress replica.

Requests are merged by a `Batcher` (serving.models.batcher) whose batch size counts
*instances* (not requests), so `max_batch_size` is what the runtime sees. A request
larger than a batch is cut into pieces first. Inference runs on one worker thread so
that the event loop keeps accepting and queueing requests for the next batch while this
one runs. Warm-up happens in `__init__`: a replica reports healthy only once it is warm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from serving.errors import ModelError
from serving.models import batching
from serving.models.batcher import Batcher
from serving.models.registry import Manifest, Registry
from serving.models.runtimes import Arrays, RuntimeOptions, load_runtime
from serving.observability.autoscale import ONGOING_METRIC, P95_METRIC
from serving.observability.metrics import metrics
from serving.settings import BatchingOverride, WarmupConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReplicaResult:
    outputs: Arrays
    queue_s: float  # longest wait in the batch queue among this request's pieces
    infer_s: float  # runtime time of the batch(es) this request ran in
    batch_size: int  # instances in the largest batch this request ran in


class _Item(NamedTuple):
    arrays: Arrays
    enqueued: float

    def rows(self) -> int:
        return batching.rows(self.arrays)


class _Done(NamedTuple):
    outputs: Arrays
    queue_s: float
    infer_s: float
    batch_size: int


def warmup_inputs(manifest: Manifest, n: int) -> Arrays:
    """Zeros of the declared shapes (variable axes as 1) for `n` instances."""
    return {
        s.name: np.zeros([n, *[d if d > 0 else 1 for d in s.shape]], dtype=s.dtype)
        for s in manifest.inputs
    }


class ModelWorker:
    """One model version: runtime, dynamic batching, warm-up, live reconfiguration."""

    def __init__(
        self,
        model: str,
        version: str,
        registry: str,
        runtime: dict[str, Any],
        warmup: dict[str, Any] | None = None,
    ) -> None:
        self._mv = Registry(Path(registry)).get(model, version)
        self._manifest = self._mv.manifest
        runtime = dict(runtime)
        inline_max_s = float(runtime.pop("inline_infer_max_s", 0.0))
        self._runtime = load_runtime(self._mv, RuntimeOptions(**runtime))
        self._max_batch = self._manifest.batching.max_batch_size
        self._tags = {"model": model, "version": version}
        # One inference thread: batches run one at a time, in arrival order.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model}-{version}")
        # Requests inside predict(): 0 means a new one would find the worker idle.
        self._inflight = 0
        # (monotonic time, queue wait + inference) per request: the autoscaling signal.
        self._recent: deque[tuple[float, float]] = deque(maxlen=8192)
        b = self._manifest.batching
        self._batcher: Batcher[_Item, _Done] = Batcher(
            self._run, _Item.rows, b.max_batch_size, b.batch_wait_timeout_s
        )
        self._warm(WarmupConfig(**warmup) if warmup else self._manifest.warmup)
        # Whether a lone request may run on the event loop itself: a batch of one must
        # take under `inline_max_s`. Measured once, after warm-up, as the fastest of
        # several runs (noise only adds to a run), so start-up noise does not flip it;
        # a version's `batching.inline_when_idle` overrides it.
        self._batch_of_one_s = self._time_batch_of_one(inline_max_s) if inline_max_s > 0 else None
        self._measured_inline = (
            self._batch_of_one_s is not None and self._batch_of_one_s < inline_max_s
        )
        self._apply_batching(BatchingOverride())
        log.info(
            "%s/%s ready on %s%s",
            model,
            version,
            self._runtime.device,
            " (a lone request runs inline)" if self._inline else "",
        )

    def _warm(self, cfg: WarmupConfig) -> None:
        sizes = sorted({1, self._max_batch})
        start = time.perf_counter()
        done = 0
        while done < cfg.iterations or time.perf_counter() - start < cfg.min_seconds:
            self._runtime.predict(warmup_inputs(self._manifest, sizes[done % len(sizes)]))
            done += 1

    def _time_batch_of_one(self, limit_s: float, runs: int = 20) -> float:
        """The fastest of `runs` batches of one; a model far slower than `limit_s` is
        not timed further (its first runs say enough)."""
        one = warmup_inputs(self._manifest, 1)
        best = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            self._runtime.predict(one)
            best = min(best, time.perf_counter() - t)
            if best > 10 * limit_s:
                break
        return best

    def _apply_batching(self, cfg: BatchingOverride) -> None:
        b = self._manifest.batching
        self._max_batch = cfg.max_batch_size or b.max_batch_size
        wait = cfg.batch_wait_timeout_s
        self._wait = b.batch_wait_timeout_s if wait is None else wait
        self._batcher.max_rows, self._batcher.wait_s = self._max_batch, self._wait
        inline = cfg.inline_when_idle
        self._inline = self._measured_inline if inline is None else inline

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Live batching changes from the deployment's `user_config`; no restart."""
        self._apply_batching(BatchingOverride.model_validate(user_config or {}))
        log.info("batching now max_batch_size=%d wait=%.4fs", self._max_batch, self._wait)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For serving.observability.autoscale: p95 of queue wait + inference over the
        last 10 s, and the requests in this replica now (handle and direct alike)."""
        cutoff = time.monotonic() - 10.0
        recent = [v for t, v in self._recent if t >= cutoff]
        p95 = float(np.percentile(recent, 95)) if recent else 0.0
        metrics().replica_p95.set(p95, tags=self._tags)
        return {P95_METRIC: p95, ONGOING_METRIC: float(self._inflight)}

    async def ready(self) -> bool:
        return True  # reachable only after __init__, i.e. after warm-up

    def identity(self) -> str:
        """Which process serves this version (shows that a reconfigure restarted nothing)."""
        return f"{self._tags['model']}/{self._tags['version']}@{os.getpid()}"

    async def batching(self) -> dict[str, Any]:
        """Current batching values and which replica answered (to show no restart)."""
        return {
            "max_batch_size": self._max_batch,
            "batch_wait_timeout_s": self._wait,
            "inline_when_idle": self._inline,
            "batch_of_one_ms": (
                None if self._batch_of_one_s is None else round(self._batch_of_one_s * 1000, 4)
            ),
            "replica": self.identity(),
        }

    async def predict(self, inputs: Arrays, alone: bool = False) -> ReplicaResult:
        """`alone`: the caller knows of no other request for this model in flight, so
        none is about to join a batch; a fast version then answers on the event loop."""
        t0 = time.perf_counter()
        pieces = batching.chunk(inputs, self._max_batch)
        self._inflight += 1
        try:
            if (
                self._inline
                and alone
                and self._inflight == 1
                and not self._batcher.busy
                and batching.rows(pieces[0]) == 1
            ):
                # Nothing runs or forms and no other request is on its way: a one-row
                # request to a fast model runs on the event loop itself, without the
                # hand-off to the inference thread and back.
                done = await self._batch([_Item(pieces[0], t0)], self._on_loop)
            elif len(pieces) == 1:
                done = [await self._batcher.submit(_Item(pieces[0], t0))]
            else:
                # A large request's pieces wait for no company: each is a batch already
                # (the last, partial one but for what joins it meanwhile).
                done = list(
                    await asyncio.gather(
                        *(self._batcher.submit(_Item(p, t0), hurry=True) for p in pieces)
                    )
                )
        finally:
            self._inflight -= 1
        return ReplicaResult(
            outputs=batching.concat_outputs([d.outputs for d in done]),
            queue_s=max(d.queue_s for d in done),
            infer_s=sum(d.infer_s for d in done),
            batch_size=max(d.batch_size for d in done),
        )

    async def _run(self, items: list[_Item]) -> list[_Done]:
        """One batch from the batcher: inference on the inference thread."""
        return await self._batch(items, self._on_thread)

    async def _on_thread(self, merged: Arrays) -> Arrays:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._runtime.predict, merged)

    async def _on_loop(self, merged: Arrays) -> Arrays:
        return self._runtime.predict(merged)  # never suspends: no loop step is taken

    async def _batch(
        self, items: list[_Item], predict: Callable[[Arrays], Awaitable[Arrays]]
    ) -> list[_Done]:
        started = time.perf_counter()
        out: list[_Done | None] = [None] * len(items)
        total = sum(it.rows() for it in items)
        for group in batching.group_compatible([it.arrays for it in items]):
            merged, counts = batching.merge([items[i].arrays for i in group])
            t = time.perf_counter()
            try:
                outputs = await predict(merged)
            except Exception as exc:  # a runtime fault on validated input
                log.exception("inference failed")
                raise ModelError(f"inference failed: {type(exc).__name__}: {exc}") from None
            infer_s = time.perf_counter() - t
            done_at = time.monotonic()
            for i, part in zip(group, batching.split(outputs, counts)):
                queue_s = started - items[i].enqueued
                out[i] = _Done(part, queue_s, infer_s, total)
                self._recent.append((done_at, queue_s + infer_s))
        metrics().batch_size.record(total, self._tags["model"], self._tags["version"])
        return [d for d in out if d is not None]
