"""`python -m models.train_fraud --from-log`: a registry version trained on the logged,
labelled fraud predictions, that loads and runs; shuffled labels train a worse one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models import train_fraud
from serving.demo import fraud_data
from serving.models.registry import load_version
from serving.quality.predlog import PredictionLog
from tests.conftest import ROOT

N_ROWS = 12_000
PER_REQUEST = 100


async def _fill(dsn: str, base: Path) -> np.ndarray:
    """Log N_ROWS fraud transactions as served by the base version, and their labels."""
    x, y = fraud_data.flatten(fraud_data.generate(N_ROWS, seed=11))
    sess = ort.InferenceSession(str(base / "model.onnx"), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"features": x})
    log = PredictionLog(dsn, max_buffer=N_ROWS * 2)
    now = time.time()
    for i in range(0, N_ROWS, PER_REQUEST):
        rid, part = f"req-{i}", slice(i, i + PER_REQUEST)
        log.prediction(
            rid, "fraud", "v2", "stable", now, {"features": x[part]},
            {"features": fraud_data.COLUMNS},
            {"label": label[part], "probabilities": proba[part]}, 0.003, False,
        )  # fmt: skip
        log.label(rid, y[part].tolist(), now + 1)
    assert await log.flush()
    await log.close()
    return x


def _train(dsn: str, base: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "models.train_fraud", "--from-log", dsn, "--base", str(base),
         "--since", "1h", "--out", str(out), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


async def test_retrain_from_the_log(
    log_dsn: str, registry_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = registry_root / "fraud" / "v2"
    x = await _fill(log_dsn, base)
    good, bad = tmp_path / "reg" / "fraud" / "v3", tmp_path / "reg" / "fraud" / "v4"
    inverted = tmp_path / "reg" / "fraud" / "v6"
    runs = [
        _train(log_dsn, base, good),
        _train(log_dsn, base, bad, "--shuffle-labels"),
        _train(log_dsn, base, inverted, "--invert-labels"),
    ]
    outputs = [p.communicate(timeout=120)[0] for p in runs]
    for p, out in zip(runs, outputs):
        assert p.returncode == 0, out
    assert f"read {N_ROWS} labelled rows" in outputs[0] and "held out" in outputs[0]

    v3, v4 = load_version(good), load_version(bad)
    m = v3.manifest
    assert (m.name, m.version) == ("fraud", "v3")
    assert m.inputs == load_version(base).manifest.inputs  # the same contract
    assert m.training["rows"] == N_ROWS and m.training["source"] == "prediction log"
    assert m.drift is not None and list(m.drift.features) == fraud_data.COLUMNS
    sess = ort.InferenceSession(str(v3.artifact_path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"features": x[:500]})
    assert label.shape == (500,) and proba.shape == (500, 2)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)

    # Shuffled labels: no signal left to learn; held-out metrics use the true labels.
    good_m, bad_m = m.metrics, v4.manifest.metrics
    assert good_m["roc_auc"] > 0.7
    assert bad_m["roc_auc"] < good_m["roc_auc"] - 0.15
    assert bad_m["average_precision"] < good_m["average_precision"]
    assert bad_m["accuracy"] <= good_m["accuracy"] + 0.002  # ~ the base rate at best
    assert v4.manifest.training["shuffled_labels"] == 1
    # Inverted labels: worse on accuracy too (it calls the common class the rare one).
    v6 = load_version(inverted).manifest
    assert v6.metrics["accuracy"] < 0.5 < good_m["accuracy"]
    assert v6.training["inverted_labels"] == 1 and v6.training["shuffled_labels"] == 0

    # Too few labelled rows: a clear refusal, nothing written.
    with pytest.raises(SystemExit) as exc:
        train_fraud.main(["--from-log", log_dsn, "--base", str(base), "--since", "1h",
                          "--out", str(tmp_path / "reg" / "fraud" / "v5"),
                          "--min-rows", str(N_ROWS + 1)])  # fmt: skip
    assert exc.value.code == 2
    assert f"{N_ROWS} labelled rows in the log, fewer than --min-rows" in capsys.readouterr().err
    assert not (tmp_path / "reg" / "fraud" / "v5").exists()
