"""Drift monitor: requests are binned in bulk, later; the window and PSI must be the
same as binning each request as it comes (real fraud model, reference and rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.models.registry import Registry
from serving.models.runtimes import RuntimeOptions, load_runtime
from serving.observability.drift import FOLD_ROWS, DriftMonitor


def test_bulk_binning_keeps_the_window_and_psi(registry_root: Path) -> None:
    mv = Registry(registry_root).get("fraud", "v2")
    m = mv.manifest
    assert m.drift is not None
    x = np.load(registry_root / "fraud" / "heldout.npz")["X"][:3000].astype(np.float32)
    name = m.inputs[0].name
    outputs = load_runtime(mv, RuntimeOptions(device="cpu")).predict({name: x})

    def monitor() -> DriftMonitor:
        return DriftMonitor(m.drift, m.inputs[0].columns, window=2000)  # type: ignore[arg-type]

    one_by_one = monitor()
    for i in range(len(x)):
        one_by_one.observe(x[i : i + 1], {k: v[i : i + 1] for k, v in outputs.items()})
    assert one_by_one._pending_rows < FOLD_ROWS  # folded along the way, bounded
    last_window = monitor()
    last_window.observe(x[-2000:], {k: v[-2000:] for k, v in outputs.items()})

    features, prediction = one_by_one.psi()
    expected_features, expected_prediction = last_window.psi()
    assert features.keys() == expected_features.keys() and features
    for k, v in expected_features.items():
        assert abs(features[k] - v) < 1e-12, k
    assert prediction is not None and expected_prediction is not None
    assert abs(prediction - expected_prediction) < 1e-12
