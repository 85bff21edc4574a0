"""Baseline (c), the ceiling: the runtime alone in a tight loop, no server, no features.

For each batch size in 1..256 (powers of two) it runs the model back to back on held-out
rows and reports rows/s and the per-batch latency; the best batch size is the one with
the most rows/s. Inputs are the vectors built offline, so no feature lookups count.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import baselines
from loadtests.loadgen import percentile
from loadtests.scenarios import REGISTRY, Scenario

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPU_BATCH_SIZES = (*BATCH_SIZES, 512, 1024, 2048)


def _rows(registry: Path, model: str, n: int) -> np.ndarray:
    x = np.load(registry / model / "heldout.npz", allow_pickle=False)["X"]
    reps = -(-n // len(x))
    return np.concatenate([x] * reps)[:n] if reps > 1 else x[:n]


def measure(
    scenario: Scenario, seconds_per_size: float, registry: Path = REGISTRY
) -> dict[str, Any]:
    device = "cuda" if scenario.gpu else "cpu"
    rt = baselines.runtime(registry, scenario.model, scenario.version, device)
    spec = baselines.manifest(registry, scenario.model, scenario.version).inputs[0]
    batch_sizes = GPU_BATCH_SIZES if scenario.gpu else BATCH_SIZES
    rows = _rows(registry, scenario.model, max(batch_sizes)).astype(spec.dtype)
    sizes: list[dict[str, Any]] = []
    for bs in batch_sizes:
        batch = {spec.name: np.ascontiguousarray(rows[:bs])}
        for _ in range(3):
            rt.predict(batch)
        lat: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds_per_size or len(lat) < 10:
            t = time.perf_counter()
            rt.predict(batch)
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        sizes.append(
            {
                "batch_size": bs,
                "rows_per_s": bs * len(lat) / elapsed,
                "batch_p50_ms": 1000 * percentile(lat, 50),
                "batch_p99_ms": 1000 * percentile(lat, 99),
                "iterations": len(lat),
            }
        )
    best = max(sizes, key=lambda s: s["rows_per_s"])
    return {
        "model": f"{scenario.model}/{scenario.version}",
        "device": rt.device,
        "best": best,
        "sizes": sizes,
    }
