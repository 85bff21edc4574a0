"""Retrain the fraud demo model from the prediction log: a new registry version.

    python -m models.train_fraud --from-log DSN --base models/fraud/v2 --since 1h \\
        --out models/fraud/v3 [--until T] [--shuffle-labels | --invert-labels] [--seed N]
        [--min-rows N]

Reads the labelled predictions of the base version's model (every version of it) in
the window from the log (serving.quality: the inputs as served, looked-up features
included, and the latest label of each instance), trains the same kind of model as the
demo's v2 (gradient-boosted trees, fewer of them), measures it on a stratified 20 %
held out, and writes `model.onnx` and `model.yaml` into --out, which must be
`<registry>/<model>/<version>`: the base manifest with that name and version, the new
metrics, where the data came from (`training`) and a drift reference from the training
rows. `--shuffle-labels` trains on randomly permuted labels, `--invert-labels` on every
label flipped (held-out metrics still use the true ones): deliberately worse models, for
rollback tests (shuffled labels lower AUC but hardly accuracy when one class is rare;
inverted ones lower both).

Exit status 2, with one line saying why, when the log cannot be read or holds fewer
than --min-rows usable labelled rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import psycopg
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import train_test_split

from serving.demo.train_fraud import (
    check_onnx,
    drift_reference,
    export_onnx,
    heldout_metrics,
    onnx_predict,
)
from serving.errors import ConfigError
from serving.models.registry import Manifest, TensorSpec, load_version, write_manifest
from serving.quality.queries import NoRows, Window, describe, parse_time, read_table

ARTIFACT = "model.onnx"
TEST_SIZE = 0.2
MIN_PER_CLASS = 5  # labelled rows of each class, at the least (a held-out needs both)


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train_fraud", description=__doc__)
    p.add_argument("--from-log", required=True, metavar="DSN", help="the log's PostgreSQL DSN")
    p.add_argument("--base", type=Path, default=Path("models/fraud/v2"), help="base version")
    p.add_argument("--since", default="1d", help="window start: 15m, 2h, 1d or ISO time")
    p.add_argument("--until", default=None, help="window end (default: now)")
    p.add_argument("--out", type=Path, required=True, help="<registry>/<model>/<version>")
    worse = p.add_mutually_exclusive_group()
    worse.add_argument("--shuffle-labels", action="store_true", help="train on permuted labels")
    worse.add_argument("--invert-labels", action="store_true", help="train on flipped labels")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--min-rows", type=int, default=200, help="fewest labelled rows to train on")
    p.add_argument("--n-estimators", type=int, default=60)
    return p.parse_args(argv)


def _features_input(spec: list[TensorSpec]) -> TensorSpec:
    named = [s for s in spec if s.columns]
    if len(named) != 1 or named[0].name != "features":
        _fail("the base version needs one input `features` with named columns")
    return named[0]


def load_rows(
    dsn: str, model: str, columns: list[str], since: datetime, until: datetime | None
) -> tuple[np.ndarray, np.ndarray]:
    """The window's labelled rows: X (float32, `columns` order) and y (int64). Rows
    missing a column or with a label other than 0/1 are left out (and said so)."""
    try:
        found, table = read_table(dsn, Window(model, since, until), labelled_only=True)
    except NoRows:
        return np.empty((0, len(columns)), np.float32), np.empty(0, np.int64)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _fail(f"cannot read the prediction log at {describe(dsn)}: {first}")
    by_key = {c.key: c.name for c in found if c.part == "input" and c.input == "features"}
    missing = [c for c in columns if c not in by_key]
    if missing:
        _fail(f"the logged inputs lack column(s) {', '.join(missing)}")
    kinds = {c.key: c.kind for c in found if c.part == "input" and c.input == "features"}
    odd = [c for c in columns if kinds[c] not in ("int", "float", "bool")]
    if odd:
        _fail(f"logged input column(s) {', '.join(odd)} are not numbers")
    x = np.column_stack(
        [table[by_key[c]].to_numpy(zero_copy_only=False).astype(np.float64) for c in columns]
    )
    y = np.asarray(table["label"].to_pylist(), dtype=object)
    usable = np.isfinite(x).all(axis=1) & np.array([v in (0, 1) for v in y.tolist()], bool)
    if not usable.all():
        print(f"left out {int((~usable).sum())} rows (missing values or a label not 0/1)")
    return x[usable].astype(np.float32), y[usable].astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    t0 = time.monotonic()
    out = args.out.resolve()
    try:
        base = load_version(args.base)
        since = parse_time(args.since)
        until = parse_time(args.until) if args.until else None
        # The new version's name and version come from --out: valid ones, up front.
        Manifest.model_validate(
            base.manifest.model_dump() | {"name": out.parent.name, "version": out.name}
        )
    except (ConfigError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        _fail(" ".join(str(exc).split()))
    spec = _features_input(base.manifest.inputs)
    columns = list(spec.columns or [])
    model_name = base.manifest.name
    print(
        f"reading labelled predictions of {model_name} since {since:%Y-%m-%d %H:%M:%S %Z} "
        f"from {describe(args.from_log)}",
        flush=True,
    )
    x, y = load_rows(args.from_log, model_name, columns, since, until)
    positives = int(y.sum())
    print(f"read {len(y)} labelled rows ({positives} positive)", flush=True)
    if len(y) < args.min_rows:
        _fail(f"{len(y)} labelled rows in the log, fewer than --min-rows {args.min_rows}")
    if min(positives, len(y) - positives) < MIN_PER_CLASS:
        _fail(f"too few rows of one class ({positives} of {len(y)} positive) to train")

    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=args.seed
    )
    x_train, x_test, y_train, y_test = x[idx_train], x[idx_test], y[idx_train], y[idx_test]
    y_fit = y_train
    if args.shuffle_labels:
        y_fit = np.random.default_rng(args.seed).permutation(y_train)
    elif args.invert_labels:
        y_fit = 1 - y_train
    model = GradientBoostingClassifier(
        n_estimators=args.n_estimators,
        learning_rate=0.1,
        max_depth=3,
        min_samples_leaf=20,
        subsample=0.5,
        random_state=args.seed,
    )
    note = (
        " on shuffled labels"
        if args.shuffle_labels
        else " on inverted labels"
        if args.invert_labels
        else ""
    )
    print(f"training {type(model).__name__} on {len(y_train)} rows{note}", flush=True)
    model.fit(x_train, y_fit)
    onx = export_onnx(model, len(columns))
    check_onnx(onx, model, x_test)
    metrics = heldout_metrics(y_test, *onnx_predict(onx, x_test))  # the true labels
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"held out ({len(y_test)} rows): {shown}", flush=True)

    _, train_proba = onnx_predict(onx, x_train)
    m = base.manifest
    manifest = m.model_copy(
        update={
            "name": out.parent.name,
            "version": out.name,
            "artifact": ARTIFACT,
            "description": "Card fraud score: gradient-boosted trees retrained from the "
            f"prediction log{note} (base {m.name}/{m.version}).",
            "metrics": metrics,
            "drift": drift_reference(columns, x_train, train_proba),
            "training": {
                "source": "prediction log",
                "log": describe(args.from_log),
                "model": model_name,
                "base": f"{m.name}/{m.version}",
                "since": since.isoformat(),
                "until": until.isoformat() if until else "",
                "rows": len(y),
                "n_train": len(y_train),
                "n_test": len(y_test),
                "estimator": type(model).__name__,
                "n_estimators": args.n_estimators,
                "seed": args.seed,
                "shuffled_labels": int(args.shuffle_labels),
                "inverted_labels": int(args.invert_labels),
            },
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / ARTIFACT).write_bytes(onx.SerializeToString())
    write_manifest(out, manifest)  # last: a folder without it is no version
    load_version(out)  # what the registry will read back
    print(f"wrote {out} ({ARTIFACT}, model.yaml) in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
