"""The GPU check on a machine without CUDA: every model skipped with its reason, exit 2,
and the JSON still written (on a GPU host the same script produces the figures)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from loadtests import gpu_check


def test_without_cuda_each_model_is_skipped_with_its_reason(
    registry_root: Path, tmp_path: Path
) -> None:
    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA framework is present: this test is for CPU-only hosts")
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--registry", str(registry_root), "--seconds", "0.01", "--out", str(out)])
    assert rc == 2
    report = json.loads(out.read_text())
    assert report["models"] == {}
    assert "no CUDA provider" in report["skipped"]["fraud/v2"]
    assert "sees no CUDA device" in report["skipped"]["digits/v1"]
    assert report["gpu"] is None
