"""What an MLflow model version says about itself, read without MLflow (pure: unit
tests need no server): its signature, as the gateway's TensorSpecs, and the manifest
keys its tags set (serving.models.mlflow_source imports the version with them).

Signatures, as the MLmodel file stores them (a JSON list per part):
- tensor-based: one TensorSpec per tensor, dtype and shape as declared with the first
  (batch) axis removed; that axis must be -1, since the gateway batches requests.
- column-based: one 1-D float32 input whose `columns` name the columns, in order (a
  request may then give an instance as an object of named fields).
For an ONNX graph, `reconcile` pairs the signature with the graph's own tensors.

Manifest keys (MANIFEST_KEYS), by precedence: the caller's overrides (the
deployment file), the model version's tags, the registered model's tags, then (for
`metrics` only) the run's metrics. Tags: `serving.manifest` holds a YAML/JSON mapping
of keys; `serving.<key>[.<sub>...]` one value each, YAML (so
`serving.batching.max_batch_size: "64"` is the number 64; `serving.description` is
text); a specific tag wins over `serving.manifest`. Mappings merge key by key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from serving.errors import ConfigError
from serving.models.registry import TensorSpec

# The manifest keys an import takes from the deployment file or tags (the rest comes
# from the MLflow model itself).
MANIFEST_KEYS = ("description", "batching", "resources", "warmup", "features", "drift", "metrics")
TAG_PREFIX = "serving."
MANIFEST_TAG = "serving.manifest"
# Signature column types that can be served, as elements of one float32 vector.
NUMERIC_COLUMNS = frozenset({"boolean", "integer", "long", "float", "double"})


# ---- signatures ---------------------------------------------------------------------------
def signature_entries(mlmodel: dict[str, Any], kind: str) -> list[dict[str, Any]] | None:
    """A signature's `inputs` or `outputs` as the MLmodel file stores them (a JSON list
    in a string), or None when the model has no signature or no such part."""
    raw = (mlmodel.get("signature") or {}).get(kind)
    entries = json.loads(raw) if isinstance(raw, str) else raw
    return entries if isinstance(entries, list) and entries else None


def _default_name(kind: str, i: int, n: int) -> str:
    base = "input" if kind == "inputs" else "output"
    return base if n == 1 else f"{base}_{i}"


def signature_specs(entries: list[dict[str, Any]] | None, kind: str) -> list[TensorSpec] | None:
    """TensorSpecs from a signature's inputs or outputs. Tensor-based: one spec per
    tensor, dtype and shape as declared with the first (batch) axis removed, which must
    be -1; unnamed tensors become `input`/`output` (`input_0`, ... when several).
    Column-based: one 1-D float32 tensor (`features`) whose `columns` are the column
    names, in order. None when there is no signature."""
    if not entries:
        return None
    tensors = [e.get("type") == "tensor" for e in entries]
    if any(tensors) and not all(tensors):
        raise ConfigError(f"signature {kind}: mixes tensors and columns")
    if all(tensors):
        specs = []
        for i, e in enumerate(entries):
            t = e.get("tensor-spec") or {}
            name = e.get("name") or _default_name(kind, i, len(entries))
            shape, dtype = list(t.get("shape") or []), str(t.get("dtype"))
            if not shape or shape[0] != -1:
                raise ConfigError(
                    f"signature {kind}: {name!r} has shape {shape}: the first axis is the "
                    "batch and must be -1 (the gateway batches requests)"
                )
            try:
                specs.append(TensorSpec(name=name, dtype=dtype, shape=shape[1:]))  # type: ignore[arg-type]
            except ValidationError as exc:
                why = exc.errors()[0]["msg"]
                raise ConfigError(f"signature {kind}: {name!r} ({dtype} {shape}): {why}") from None
        return specs
    columns = []
    for i, e in enumerate(entries):
        name, ctype = e.get("name"), e.get("type")
        if not name:
            raise ConfigError(f"signature {kind}: column {i} has no name")
        if ctype not in NUMERIC_COLUMNS:
            raise ConfigError(
                f"signature {kind}: column {name!r} is {ctype}; only numeric and boolean "
                "columns can be served"
            )
        columns.append(str(name))
    base = "features" if kind == "inputs" else "output"
    return [TensorSpec(name=base, dtype="float32", shape=[len(columns)], columns=columns)]


def reconcile(
    sig: list[TensorSpec] | None, graph: list[TensorSpec], kind: str, where: str
) -> list[TensorSpec]:
    """An ONNX graph's tensors with what the signature adds. The graph's names and
    dtypes win (ONNX Runtime feeds and answers those); the signature adds column names
    and fixes dimensions the graph leaves open. Tensors pair by name when the signature
    names them all as the graph does, else by position. An output signature that does
    not pair (e.g. a classifier's pyfunc answer, one `long` column, against the graph's
    `label` and `probabilities`) describes the pyfunc, not the graph: the graph's own
    outputs are used."""
    if sig is None:
        return graph
    if kind == "outputs" and (len(sig) != len(graph) or sig[0].columns is not None):
        return graph
    if sig[0].columns is not None:
        n = len(sig[0].columns)
        if len(graph) != 1 or len(graph[0].shape) != 1 or graph[0].shape[0] not in (-1, n):
            got = ", ".join(f"{g.name} {g.shape}" for g in graph)
            raise ConfigError(
                f"{where}: the signature's {n} columns need one graph input of shape [{n}] "
                f"per instance; the graph takes {got}"
            )
        g = graph[0]
        return [TensorSpec(name=g.name, dtype=g.dtype, shape=[n], columns=sig[0].columns)]
    if len(sig) != len(graph):
        raise ConfigError(
            f"{where}: the signature declares {len(sig)} {kind}, the graph has {len(graph)}"
        )
    by_name = {g.name: g for g in graph}
    named = all(s.name in by_name for s in sig)
    out = []
    for i, s in enumerate(sig):
        g = by_name[s.name] if named else graph[i]
        if len(s.shape) != len(g.shape) or any(
            a != b and -1 not in (a, b) for a, b in zip(s.shape, g.shape)
        ):
            raise ConfigError(
                f"{where}: {kind}: {g.name!r} is {s.shape} per instance in the signature, "
                f"{g.shape} in the graph"
            )
        shape = [b if b != -1 else a for a, b in zip(s.shape, g.shape)]
        out.append(TensorSpec(name=g.name, dtype=g.dtype, shape=shape))
    return out


# ---- manifest keys ------------------------------------------------------------------------
def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, mappings merged key by key (anything else replaced)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _known(keys: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(keys) - set(MANIFEST_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: {', '.join(unknown)}: not manifest keys the deployment may set "
            f"({', '.join(MANIFEST_KEYS)})"
        )
    return dict(keys)


def tag_keys(tags: Mapping[str, str], where: str) -> dict[str, Any]:
    """Manifest keys from tags (see the module): `serving.manifest`, then each
    `serving.<key>[.<sub>...]` over it. Other tags are ignored."""
    out: dict[str, Any] = {}
    if MANIFEST_TAG in tags:
        try:
            doc = yaml.safe_load(tags[MANIFEST_TAG])
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: tag {MANIFEST_TAG}: not YAML/JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: tag {MANIFEST_TAG}: must hold a mapping of keys")
        out = _known(doc, f"{where}: tag {MANIFEST_TAG}")
    for tag in sorted(t for t in tags if t.startswith(TAG_PREFIX) and t != MANIFEST_TAG):
        path = tag.removeprefix(TAG_PREFIX).split(".")
        _known({path[0]: None}, f"{where}: tag {tag}")
        try:
            value: Any = tags[tag] if path == ["description"] else yaml.safe_load(tags[tag])
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: tag {tag}: not a YAML value ({exc})") from None
        for key in reversed(path):
            value = {key: value}
        out = merge(out, value)
    return out


def manifest_keys(
    overrides: Mapping[str, Any] | None,
    version_tags: Mapping[str, str],
    model_tags: Mapping[str, str],
    run_metrics: Mapping[str, float],
    where: str,
) -> dict[str, Any]:
    """Our manifest keys for an imported version, by precedence (see the module)."""
    metrics = {k: float(v) for k, v in run_metrics.items() if np.isfinite(v)}
    out: dict[str, Any] = {"metrics": metrics} if metrics else {}
    out = merge(out, tag_keys(model_tags, f"{where} (registered model tags)"))
    out = merge(out, tag_keys(version_tags, f"{where} (model version tags)"))
    return merge(out, _known(overrides or {}, f"{where} (overrides)"))
