"""The ONNX Runtime extras resolve to exactly one ONNX Runtime package each: `cpu` to
onnxruntime, `gpu` to onnxruntime-gpu (both installed, the CPU package would shadow the
GPU one). Resolved by pip against the package index, nothing installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("extra", "wanted", "unwanted"),
    [("cpu", "onnxruntime", "onnxruntime-gpu"), ("gpu", "onnxruntime-gpu", "onnxruntime")],
)
def test_an_extra_brings_exactly_its_own_onnx_runtime(
    extra: str, wanted: str, unwanted: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
            "--quiet", "--report", str(report), "-c", "constraints.txt", f".[{extra}]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "serving" in names and "ray" in names
    assert wanted in names and unwanted not in names, sorted(n for n in names if "onnx" in n)
