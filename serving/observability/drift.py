"""Drift: reference histograms from training vs what the gateway sees now.

The manifest's `drift` section holds, per input feature (a column of the model's 1-D
input) and for the predictions, the training-time histogram: bin edges (numeric) or
categories, and the share of training rows in each bin. The monitor keeps the bin of
the last `window` rows per version in a ring buffer (numpy, no per-row objects) and
computes the population stability index, PSI = Σ (a − e) · ln(a / e), on demand.
Rule of thumb: < 0.1 stable, 0.1–0.2 moderate shift, > 0.2 significant shift.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

EPS = 1e-4
FOLD_ROWS = 256  # requests are binned in bulk once this many rows are pending


class RefHistogram(BaseModel):
    """`edges` (inner cut points, n−1 for n bins) or `categories` (one per bin)."""

    model_config = ConfigDict(extra="forbid")

    edges: list[float] | None = None
    categories: list[int] | None = None
    probs: list[float]

    @model_validator(mode="after")
    def _shape(self) -> RefHistogram:
        if (self.edges is None) == (self.categories is None):
            raise ValueError("give either edges or categories")
        bins = len(self.edges) + 1 if self.edges is not None else len(self.categories or [])
        if len(self.probs) != bins:
            raise ValueError(f"probs needs {bins} entries")
        return self

    def bins(self, values: np.ndarray) -> np.ndarray:
        if self.edges is not None:
            return np.searchsorted(np.asarray(self.edges), values, side="right")
        cats = np.asarray(self.categories)
        idx = np.searchsorted(cats, values)
        idx = np.clip(idx, 0, len(cats) - 1)
        return np.where(cats[idx] == values, idx, len(cats))  # unseen category: extra bin

    @classmethod
    def from_values(cls, values: np.ndarray, bins: int = 10) -> RefHistogram:
        """Quantile bins of a numeric training column (fewer when values repeat)."""
        cuts = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = np.bincount(np.searchsorted(cuts, values, side="right"), minlength=len(cuts) + 1)
        return cls(edges=cuts.tolist(), probs=(counts / counts.sum()).round(6).tolist())

    @classmethod
    def from_categories(cls, values: np.ndarray) -> RefHistogram:
        cats, counts = np.unique(values, return_counts=True)
        return cls(
            categories=[int(c) for c in cats], probs=(counts / counts.sum()).round(6).tolist()
        )


class PredictionRef(RefHistogram):
    """The histogram of one output: `index` picks a column of a 2-D output (e.g. the
    positive-class probability)."""

    output: str
    index: int | None = None


class DriftReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: dict[str, RefHistogram] = Field(default_factory=dict)
    prediction: PredictionRef | None = None


def psi(expected: list[float], counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    e = np.asarray(expected, dtype=np.float64)
    if len(counts) > len(e):  # an unseen-category bin
        e = np.append(e, 0.0)
    a = counts / total
    e = np.clip(e, EPS, None)
    a = np.clip(a, EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Bins of the last `window` rows for each monitored feature of one version."""

    def __init__(self, ref: DriftReference, columns: list[str] | None, window: int = 2000):
        self.ref = ref
        self.window = window
        # Column index of each monitored feature in the model's input vector.
        self.features = [
            (name, columns.index(name), hist)
            for name, hist in ref.features.items()
            if columns is not None and name in columns
        ]
        n = len(self.features) + (1 if ref.prediction is not None else 0)
        self._bins = np.full((window, max(n, 1)), -1, dtype=np.int16)
        self._next = 0
        self._seen = 0
        # Requests observed but not binned yet: binning many rows at once costs about
        # what one request's rows cost, so the request path only appends.
        self._pending: list[tuple[np.ndarray | None, dict[str, np.ndarray]]] = []
        self._pending_rows = 0

    def observe(self, vectors: np.ndarray | None, outputs: dict[str, np.ndarray]) -> None:
        """Note one request's input vectors and outputs (binned later, in bulk)."""
        self._pending.append((vectors, outputs))
        self._pending_rows += len(next(iter(outputs.values())))
        if self._pending_rows >= FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return
        if len(pending) > 1 and all(v is not None for v, _ in pending):
            keys = pending[0][1].keys()
            vectors = np.concatenate([v for v, _ in pending if v is not None])
            outputs = {k: np.concatenate([o[k] for _, o in pending]) for k in keys}
            self._bin(vectors, outputs)
        else:
            for v, o in pending:
                self._bin(v, o)

    def _bin(self, vectors: np.ndarray | None, outputs: dict[str, np.ndarray]) -> None:
        rows = len(next(iter(outputs.values())))
        if rows > self.window:
            vectors = None if vectors is None else vectors[-self.window :]
            outputs = {k: v[-self.window :] for k, v in outputs.items()}
            rows = self.window
        block = np.empty((rows, self._bins.shape[1]), dtype=np.int16)
        for j, (_, col, hist) in enumerate(self.features):
            block[:, j] = hist.bins(vectors[:, col]) if vectors is not None else -1
        pred = self.ref.prediction
        if pred is not None:
            out = np.asarray(outputs[pred.output])
            values = out[:, pred.index] if pred.index is not None else out
            block[:, len(self.features)] = pred.bins(values.reshape(rows))
        idx = (self._next + np.arange(rows)) % self.window
        self._bins[idx] = block
        self._next = (self._next + rows) % self.window
        self._seen += rows

    @property
    def rows(self) -> int:
        """Rows in the window now (what the PSIs are computed over)."""
        return min(self._seen + self._pending_rows, self.window)

    def psi(self) -> tuple[dict[str, float], float | None]:
        """PSI per feature and for the predictions over the rows in the window."""
        self._fold()
        filled = self._bins[: min(self._seen, self.window)]
        out: dict[str, float] = {}
        for j, (name, _, hist) in enumerate(self.features):
            col = filled[:, j]
            col = col[col >= 0]
            out[name] = psi(hist.probs, np.bincount(col, minlength=len(hist.probs)))
        pred_psi = None
        if self.ref.prediction is not None:
            col = filled[:, len(self.features)]
            col = col[col >= 0]
            pred_psi = psi(
                self.ref.prediction.probs,
                np.bincount(col, minlength=len(self.ref.prediction.probs)),
            )
        return out, pred_psi
