"""Decoding: inputs as a transport parsed them → validated arrays, one per model input.

`decode_instances` takes TF-Serving-style instances (v1), `validate_tensors` batch-first
tensors (Open Inference Protocol), `decode_records` the instances of a feature-backed
model (entity keys and request fields; `tensors_to_records` turns OIP tensors into
those). The fast path is vectorised; only when it fails do we walk the instances one by
one, to name the exact field that is wrong.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serving.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from serving.features.spec import FeatureConfig
from serving.models.registry import Arrays, TensorSpec


def _shape_ok(got: tuple[int, ...], want: list[int]) -> bool:
    return len(got) == len(want) and all(w == -1 or g == w for g, w in zip(got, want))


def _fmt_shape(shape: list[int] | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _spec_kind(spec: TensorSpec) -> str:
    return np.dtype(spec.dtype).kind  # 'b', 'i', 'u' or 'f'


def _field(i: int, spec: TensorSpec, single_bare: bool, column: str | None = None) -> str:
    base = f"instances[{i}]" if single_bare else f"instances[{i}].{spec.name}"
    return f"instances[{i}].{column}" if column is not None else base


def _check_value(value: Any, spec: TensorSpec, where: str) -> None:
    """Slow-path check of one instance's value; raises InvalidInput naming `where`."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InvalidInput(
            f"{where}: ragged nested lists; expected shape {_fmt_shape(spec.shape)}",
            field=where,
        ) from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidInput(
            f"{where}: expected {spec.dtype} numbers, got {_describe(value)}", field=where
        )
    if not _shape_ok(arr.shape, spec.shape):
        raise InvalidInput(
            f"{where}: expected shape {_fmt_shape(spec.shape)}, got {_fmt_shape(arr.shape)}",
            field=where,
        )
    _check_numbers(arr, spec, where)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"string {value!r:.40}"
    if isinstance(value, list):
        for v in value:
            if isinstance(v, list):
                return _describe(v)
            if not isinstance(v, (int, float)):
                return f"a list holding {_describe(v)}"
        return "a list"
    return type(value).__name__


def _check_numbers(arr: np.ndarray, spec: TensorSpec, where: str) -> None:
    kind = _spec_kind(spec)
    if arr.dtype.kind == "b" and kind != "b":
        raise InvalidInput(f"{where}: expected {spec.dtype} numbers, got booleans", field=where)
    if kind == "f":
        if not spec.allow_nan and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidInput(f"{where}: NaN or infinity is not allowed", field=where)
        return
    if kind == "b":
        if arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
            raise InvalidInput(f"{where}: expected booleans", field=where)
        return
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or (arr != np.round(arr)).any()):
        raise InvalidInput(f"{where}: expected integers ({spec.dtype})", field=where)
    info = np.iinfo(np.dtype(spec.dtype))
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise InvalidInput(
            f"{where}: value out of range for {spec.dtype} [{info.min}, {info.max}]",
            field=where,
        )


def _gather(instances: list[Any], specs: list[TensorSpec]) -> tuple[dict[str, list[Any]], bool]:
    """Split instances into per-input value lists; checks the instance envelope only."""
    single = len(specs) == 1
    names = [s.name for s in specs]
    columns = specs[0].columns if single else None
    values: dict[str, list[Any]] = {n: [] for n in names}
    bare = False
    for i, inst in enumerate(instances):
        if isinstance(inst, dict):
            if columns is not None and names[0] not in inst:
                missing = [c for c in columns if c not in inst]
                if missing:
                    raise InvalidInput(
                        f"instances[{i}]: missing field {missing[0]!r} "
                        f"(expected {', '.join(columns)})",
                        field=f"instances[{i}].{missing[0]}",
                    )
                extra = set(inst) - set(columns)
                if extra:
                    bad = sorted(extra)[0]
                    raise InvalidInput(
                        f"instances[{i}]: unknown field {bad!r}", field=f"instances[{i}].{bad}"
                    )
                values[names[0]].append([inst[c] for c in columns])
                continue
            for n in names:
                if n not in inst:
                    raise InvalidInput(
                        f"instances[{i}]: missing input {n!r}", field=f"instances[{i}].{n}"
                    )
                values[n].append(inst[n])
            if len(inst) != len(names):
                bad = sorted(set(inst) - set(names))[0]
                raise InvalidInput(
                    f"instances[{i}]: unknown input {bad!r}", field=f"instances[{i}].{bad}"
                )
        elif single:
            bare = True
            values[names[0]].append(inst)
        else:
            raise InvalidInput(
                f"instances[{i}]: expected an object with inputs {', '.join(names)}",
                field=f"instances[{i}]",
            )
    return values, bare


def _check_envelope(instances: Any, max_instances: int) -> list[Any]:
    if not isinstance(instances, list):
        raise MalformedRequest("'instances' must be a list", field="instances")
    if not instances:
        raise InvalidInput("'instances' must not be empty", field="instances")
    if len(instances) > max_instances:
        raise PayloadTooLarge(
            f"{len(instances)} instances exceed the limit of {max_instances} per request",
            field="instances",
        )
    return instances


def decode_instances(specs: list[TensorSpec], instances: Any, max_instances: int) -> Arrays:
    """Validate `instances` against the input specs and return one array per input."""
    instances = _check_envelope(instances, max_instances)
    values, bare = _gather(instances, specs)
    out: Arrays = {}
    for spec in specs:
        vals = values[spec.name]
        arr: np.ndarray | None
        try:
            arr = np.asarray(vals)
        except ValueError:
            arr = None
        if (
            arr is None
            or arr.dtype == object
            or arr.dtype.kind not in "biuf"
            or not _shape_ok(arr.shape[1:], spec.shape)
        ):
            arr = None
        else:
            try:
                _check_numbers(arr, spec, spec.name)
            except InvalidInput:
                arr = None
        if arr is None:
            _locate_error(vals, spec, bare)
            # Each instance is valid alone but they disagree (e.g. variable shapes).
            raise InvalidInput(f"{spec.name}: instances differ in shape or type", field=spec.name)
        out[spec.name] = arr.astype(spec.dtype, copy=False)
    return out


def _locate_error(vals: list[Any], spec: TensorSpec, bare: bool) -> None:
    """Walk instances to raise the first precise error (slow path, errors only)."""
    for i, v in enumerate(vals):
        if spec.columns is not None and isinstance(v, list) and len(v) == len(spec.columns):
            for j, c in enumerate(spec.columns):
                _check_value(
                    v[j],
                    spec.model_copy(update={"shape": [], "columns": None}),
                    _field(i, spec, bare, c),
                )
        _check_value(v, spec, _field(i, spec, bare))


def decode_records(cfg: FeatureConfig, instances: Any, max_instances: int) -> list[dict[str, Any]]:
    """Validate instances of a feature-backed model: entity keys plus request fields."""
    instances = _check_envelope(instances, max_instances)
    keys = list(dict.fromkeys(v.entity for v in cfg.views))
    allowed = set(cfg.instance_fields())
    out: list[dict[str, Any]] = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise InvalidInput(
                f"instances[{i}]: expected an object with fields "
                + ", ".join(cfg.instance_fields()),
                field=f"instances[{i}]",
            )
        extra = set(inst) - allowed
        if extra:
            bad = sorted(extra)[0]
            raise InvalidInput(
                f"instances[{i}]: unknown field {bad!r}", field=f"instances[{i}].{bad}"
            )
        rec: dict[str, Any] = {}
        for k in keys:
            v = inst.get(k)
            where = f"instances[{i}].{k}"
            if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
                got = "missing" if k not in inst else _describe(v)
                raise InvalidInput(
                    f"{where}: expected a non-empty id string, got {got}", field=where
                )
            if len(str(v)) > 256:
                raise InvalidInput(f"{where}: id longer than 256 characters", field=where)
            rec[k] = str(v)
        for f in cfg.request:
            where = f"instances[{i}].{f.name}"
            if f.name not in inst:
                raise InvalidInput(f"{where}: missing field", field=where)
            v = inst[f.name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidInput(f"{where}: expected a number, got {_describe(v)}", field=where)
            if not math.isfinite(v):
                raise InvalidInput(f"{where}: NaN or infinity is not allowed", field=where)
            if f.dtype.startswith("int") and v != int(v):
                raise InvalidInput(f"{where}: expected an integer", field=where)
            if (f.min is not None and v < f.min) or (f.max is not None and v > f.max):
                raise InvalidInput(f"{where}: {v} is outside [{f.min}, {f.max}]", field=where)
            rec[f.name] = v
        out.append(rec)
    return out


def validate_tensors(specs: list[TensorSpec], tensors: Arrays, max_instances: int) -> Arrays:
    """Check batch-first tensors (Open Inference Protocol) against the input specs."""
    names = [sp.name for sp in specs]
    for name in tensors:
        if name not in names:
            raise InvalidInput(f"unknown input {name!r} (expected {', '.join(names)})", field=name)
    out: Arrays = {}
    rows: int | None = None
    for spec in specs:
        if spec.name not in tensors:
            raise InvalidInput(f"missing input {spec.name!r}", field=spec.name)
        arr = np.asarray(tensors[spec.name])
        want = [-1, *spec.shape]
        if arr.ndim != len(want) or not _shape_ok(arr.shape[1:], spec.shape):
            raise InvalidInput(
                f"{spec.name}: expected shape {_fmt_shape(want)}, got {_fmt_shape(arr.shape)}",
                field=spec.name,
            )
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise InvalidInput(
                f"{spec.name}: expected {spec.dtype} numbers, got {arr.dtype}", field=spec.name
            )
        _check_numbers(arr, spec, spec.name)
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            raise InvalidInput(
                f"{spec.name}: {arr.shape[0]} rows, other inputs have {rows}", field=spec.name
            )
        out[spec.name] = arr.astype(spec.dtype, copy=False)
    if not rows:
        raise InvalidInput("inputs hold no instances", field=names[0])
    if rows > max_instances:
        raise PayloadTooLarge(
            f"{rows} instances exceed the limit of {max_instances} per request", field=names[0]
        )
    return out


def tensors_to_records(tensors: Arrays) -> list[dict[str, Any]]:
    """One-value-per-instance tensors (entity keys as BYTES, request fields as numbers)
    turned into records for `decode_records`, which validates them."""
    columns: dict[str, list[Any]] = {}
    rows: int | None = None
    for name, t in tensors.items():
        arr = np.asarray(t)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise InvalidInput(
                f"{name}: expected one value per instance (shape [-1]), "
                f"got {_fmt_shape(arr.shape)}",
                field=name,
            )
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            raise InvalidInput(f"{name}: {arr.shape[0]} rows, other inputs have {rows}", field=name)
        columns[name] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in arr.tolist()
        ]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]
