"""GPU check: both demo models on CUDA (onnxruntime's CUDA provider, torch on CUDA)
against the CPU, batched throughput side by side in one run.

    python -m loadtests.gpu_check [--seconds 2] [--out loadtests/results/gpu_check.json]

Exits 2 with a clear message when no CUDA device (or no CUDA onnxruntime / torch) is
present. Uses the same runtimes as the gateway (serving.runtimes), so a pass here means
the gateway's GPU path works; the figures go into the README's benchmark section.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import ConfigError
from serving.registry import Registry
from serving.runtimes import RuntimeOptions, load_runtime

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 32, 128, 512)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "gpu_check.json")
    args = p.parse_args(argv)
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; nothing to compare", file=sys.stderr)
        return 2
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("gpu_check: onnxruntime has no CUDA provider (pip install '.[gpu]')", file=sys.stderr)
        return 2
    reg = Registry(args.registry)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "models": {},
    }
    for model, version in (("fraud", "v2"), ("digits", "v1")):
        mv = reg.get(model, version)
        x = np.load(args.registry / model / "heldout.npz")["X"]
        name = mv.manifest.inputs[0].name
        row: dict[str, Any] = {}
        for device in ("cpu", "cuda"):
            try:
                rt = load_runtime(mv, RuntimeOptions(device=device))  # type: ignore[arg-type]
            except ConfigError as exc:
                print(f"gpu_check: {model}/{version} on {device}: {exc}", file=sys.stderr)
                return 2
            row[device] = {"device": rt.device, "batches": _throughput(rt, name, x, args.seconds)}
            best = max(b["rows_per_s"] for b in row[device]["batches"])
            print(f"{model}/{version} {device:4s} ({rt.device}): best {best:,.0f} rows/s")
        cpu_best = max(b["rows_per_s"] for b in row["cpu"]["batches"])
        gpu_best = max(b["rows_per_s"] for b in row["cuda"]["batches"])
        row["speedup_best"] = gpu_best / cpu_best
        print(f"{model}/{version}: GPU/CPU best throughput {row['speedup_best']:.1f}x")
        results["models"][f"{model}/{version}"] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
