"""GPU check: the demo models (fraud v2, digits v1 and v2) on CUDA (onnxruntime's CUDA
provider, torch on CUDA) against the CPU, batched throughput side by side in one run.

    python -m loadtests.gpu_check [--seconds 2] [--out loadtests/results/gpu_check.json]

Uses the same runtimes as the gateway (serving.runtimes), so a pass here means the
gateway's GPU path works; the figures go into the README's benchmark section. Each model
is checked on its own: one whose framework has no CUDA (a CPU-only onnxruntime, a CPU
torch) is reported as skipped with the reason, the others still run, and the exit
status is 2 when any model could not run on CUDA (0 when all did).

CPU figures use the replicas' settings (one intra-op thread), so they are per CPU core.
Each batch's time includes the host-to-device copy of the inputs and the copy of the
outputs back, as in the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import ConfigError
from serving.models.registry import Registry
from serving.models.runtimes import RuntimeOptions, load_runtime

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 32, 128, 512, 2048)
MODELS = (("fraud", "v2"), ("digits", "v1"), ("digits", "v2"))


def _throughput(rt: Any, name: str, x: np.ndarray, seconds: float) -> list[dict[str, float]]:
    out = []
    for bs in BATCHES:
        batch = {name: np.ascontiguousarray(np.resize(x, (bs, *x.shape[1:])))}
        for _ in range(5):
            rt.predict(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            rt.predict(batch)
            n += 1
        elapsed = time.perf_counter() - start
        out.append({"batch": bs, "rows_per_s": bs * n / elapsed, "batch_ms": 1000 * elapsed / n})
    return out


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=2.0, help="per batch size and device")
    p.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "gpu_check.json")
    args = p.parse_args(argv)
    reg = Registry(args.registry)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": _gpu_name(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_threads_per_runtime": 1,
        **_versions(),
        "models": {},
        "skipped": {},
    }
    for model, version in MODELS:
        key = f"{model}/{version}"
        mv = reg.get(model, version)
        try:  # the runtime says why it cannot run on CUDA here (no provider, no device)
            gpu = load_runtime(mv, RuntimeOptions(device="cuda"))
        except ConfigError as exc:
            print(f"gpu_check: {key}: skipped, {exc}", file=sys.stderr, flush=True)
            results["skipped"][key] = str(exc)
            continue
        runtimes = {"cpu": load_runtime(mv, RuntimeOptions(device="cpu")), "cuda": gpu}
        x = np.load(args.registry / model / "heldout.npz")["X"]
        name = mv.manifest.inputs[0].name
        row: dict[str, Any] = {"runtime": mv.manifest.runtime}
        for device, rt in runtimes.items():
            row[device] = {"device": rt.device, "batches": _throughput(rt, name, x, args.seconds)}
            best = max(row[device]["batches"], key=lambda b: b["rows_per_s"])
            print(
                f"{key} {device:4s} ({rt.device}): best {best['rows_per_s']:,.0f} rows/s "
                f"at batch {best['batch']}",
                flush=True,
            )
        cpu_best = max(b["rows_per_s"] for b in row["cpu"]["batches"])
        gpu_best = max(b["rows_per_s"] for b in row["cuda"]["batches"])
        row["speedup_best"] = gpu_best / cpu_best
        print(f"{key}: GPU/CPU best throughput {row['speedup_best']:.1f}x", flush=True)
        results["models"][key] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 2 if results["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
