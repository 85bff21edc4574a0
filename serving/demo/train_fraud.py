"""Fraud demo model: v1 logistic regression, v2 gradient boosting, both exported to ONNX.

Both versions see the same seeded synthetic data and held-out split, so their recorded
metrics compare directly; v2 must beat v1 on ROC AUC and average precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from serving.demo import fraud_data
from serving.models.registry import Batching, Manifest, Resources, TensorSpec, write_manifest
from serving.observability.drift import DriftReference, PredictionRef, RefHistogram

NAME = "fraud"
VERSIONS = ("v1", "v2")
ARTIFACT = "model.onnx"
ARTIFACTS = dict.fromkeys(VERSIONS, ARTIFACT)  # version -> artifact (serving.demo.build)
HELDOUT = "heldout.npz"
FEATURES_DIR = "features"  # user_stats.csv, merchant_stats.csv for `serving features load`
N_TRANSACTIONS = 60_000
TEST_SIZE = 0.2
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# Largest allowed gap between ONNX Runtime's and sklearn's probabilities.
ONNX_TOLERANCE = 1e-4


def _candidates(seed: int) -> dict[str, tuple[Any, str]]:
    """Version -> (unfitted estimator, manifest description)."""
    return {
        "v1": (
            Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))]),
            "Card fraud score: logistic regression on standardized features (baseline).",
        ),
        # GradientBoostingClassifier rather than HistGradientBoosting: skl2onnx 1.20's
        # HistGradientBoosting converter emits boolean attributes that onnx 1.23 rejects.
        "v2": (
            GradientBoostingClassifier(
                n_estimators=150,
                learning_rate=0.06,
                max_depth=3,
                min_samples_leaf=100,
                subsample=0.5,
                random_state=seed,
            ),
            "Card fraud score: gradient-boosted trees (captures feature interactions).",
        ),
    }


def export_onnx(model: Any, n_features: int) -> onnx.ModelProto:
    """Convert with one float32 input `features` [None, F]; outputs `label`, `probabilities`."""
    onx: onnx.ModelProto = to_onnx(
        model,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options={id(model): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    outputs = {o.name: o.type.tensor_type.elem_type for o in onx.graph.output}
    expected = {"label": onnx.TensorProto.INT64, "probabilities": onnx.TensorProto.FLOAT}
    if outputs != expected:
        raise RuntimeError(f"unexpected ONNX outputs {outputs}, want {expected}")
    onnx.checker.check_model(onx)
    return onx


def onnx_predict(
    onx: onnx.ModelProto, x: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"features": x})
    return np.asarray(label), np.asarray(proba)


def check_onnx(onx: onnx.ModelProto, model: Any, x: npt.NDArray[np.float32]) -> None:
    """The exported graph must reproduce sklearn's predict_proba and predict."""
    label, proba = onnx_predict(onx, x)
    ref = model.predict_proba(x)
    gap = float(np.abs(proba - ref).max())
    if proba.shape != ref.shape or gap > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX probabilities differ from sklearn by {gap:.2e}")
    # Labels may only differ where the score sits on the decision boundary.
    clear = np.abs(ref[:, 1] - 0.5) > ONNX_TOLERANCE
    if label.dtype != np.int64 or not np.array_equal(label[clear], model.predict(x)[clear]):
        raise RuntimeError("ONNX labels differ from sklearn's")


def heldout_metrics(
    y: npt.NDArray[np.int64], label: np.ndarray, proba: np.ndarray
) -> dict[str, float]:
    return {
        "roc_auc": round(float(roc_auc_score(y, proba[:, 1])), 6),
        "average_precision": round(float(average_precision_score(y, proba[:, 1])), 6),
        "accuracy": round(float(accuracy_score(y, label)), 6),
        "fraud_rate": round(float(y.mean()), 6),
    }


def drift_reference(
    columns: list[str], x: npt.NDArray[np.float32], proba: np.ndarray
) -> DriftReference:
    """Drift references from training data: each input column, and the fraud probability."""
    return DriftReference(
        features={c: RefHistogram.from_values(x[:, j]) for j, c in enumerate(columns)},
        prediction=PredictionRef(
            output="probabilities", index=1, **RefHistogram.from_values(proba[:, 1]).model_dump()
        ),
    )


def build(root: Path, seed: int = 7) -> None:
    """Train, verify and write `root/fraud/{v1,v2}` and `root/fraud/heldout.npz`."""
    data = fraud_data.generate(N_TRANSACTIONS, seed)
    features = fraud_data.feature_config(data)
    x, y = fraud_data.flatten(data)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    x_train, x_test, y_train, y_test = x[idx_train], x[idx_test], y[idx_train], y[idx_test]
    n_features = len(fraud_data.COLUMNS)

    built: dict[str, tuple[onnx.ModelProto, Manifest]] = {}
    for version, (model, description) in _candidates(seed).items():
        model.fit(x_train, y_train)
        onx = export_onnx(model, n_features)
        check_onnx(onx, model, x_test)
        # Metrics come from the exported artifact, i.e. what will actually be served.
        metrics = heldout_metrics(y_test, *onnx_predict(onx, x_test))
        # Drift references: each input column and the fraud probability on training data.
        _, train_proba = onnx_predict(onx, x_train)
        drift = drift_reference(fraud_data.COLUMNS, x_train, train_proba)
        estimator = model.steps[-1][1] if isinstance(model, Pipeline) else model
        manifest = Manifest(
            name=NAME,
            version=version,
            runtime="onnx",
            artifact=ARTIFACT,
            description=description,
            inputs=[
                TensorSpec(
                    name="features",
                    dtype="float32",
                    shape=[n_features],
                    columns=fraud_data.COLUMNS,
                )
            ],
            features=features,
            outputs=[
                TensorSpec(name="label", dtype="int64", shape=[]),
                TensorSpec(name="probabilities", dtype="float32", shape=[2]),
            ],
            batching=Batching(max_batch_size=32, batch_wait_timeout_s=0.002),
            resources=Resources(num_cpus=0.5),
            metrics=metrics,
            drift=drift,
            training={
                "generator": "models.fraud_data",
                "seed": seed,
                "n_train": len(y_train),
                "n_test": len(y_test),
                "estimator": type(estimator).__name__,
            },
        )
        built[version] = (onx, manifest)

    v1, v2 = built["v1"][1].metrics, built["v2"][1].metrics
    for key in ("roc_auc", "average_precision"):
        assert v2[key] > v1[key] + 0.01, f"v2 {key} {v2[key]} does not beat v1 {v1[key]}"

    for version, (onx, manifest) in built.items():
        folder = root / NAME / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ARTIFACT).write_bytes(onx.SerializeToString())
        write_manifest(folder, manifest)
    # Held-out records in both forms: raw (what a client sends) and the vectors.
    raw = {
        c: np.asarray(data.transactions[c])[idx_test]
        for c in ("user_id", "merchant_id", *fraud_data.TXN_COLUMNS)
    }
    np.savez_compressed(root / NAME / HELDOUT, X=x_test, y=y_test, **raw)
    fraud_data.write_feature_tables(data, root / NAME / FEATURES_DIR)
