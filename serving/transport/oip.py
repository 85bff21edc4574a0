"""Open Inference Protocol (KServe v2): the part both transports share.

Tensors arrive as (name, datatype, shape) plus their data in one of three forms: a
JSON `data` list (REST), typed `contents` (gRPC) or raw little-endian bytes (gRPC
`raw_input_contents`, REST binary tensor extension). Each decodes here into one numpy
array; `outputs` picks the requested outputs of an answer; metadata comes from the
manifest. The transports (`rest_v2`, `grpc`) only move bytes.

BYTES tensors are numpy object arrays of `bytes`; raw BYTES elements are each a 4-byte
little-endian length followed by the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import __version__
from serving.dataplane import Prediction
from serving.errors import InvalidInput, MalformedRequest
from serving.models.registry import Arrays, Manifest, TensorSpec

SERVER_NAME = "serving"
# REST extensions beyond the core protocol (gRPC raw contents are core).
EXTENSIONS = ["binary_tensor_data"]

# Protocol datatype → numpy dtype (BYTES: object arrays holding `bytes`).
_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPE = {dt.name: name for name, dt in _NUMPY.items() if name != "BYTES"}
DATATYPES = tuple(_NUMPY)

# gRPC InferTensorContents field per datatype. FP16 has none: it travels raw only.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Triton's platform names, which OIP tools know; Triton has none for the torch.export
# formats, so theirs follow its pattern.
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
    "torch_export": "pytorch_torch_export",
    "torch_aoti": "pytorch_aotinductor",
}

_LEN = struct.Struct("<I")


# ---- datatypes ---------------------------------------------------------------------------
def numpy_dtype(datatype: str, name: str = "datatype") -> np.dtype[Any]:
    """The numpy dtype of a protocol datatype; InvalidInput naming `name` if unknown."""
    dt = _NUMPY.get(datatype)
    if dt is None:
        raise InvalidInput(
            f"{name}: unknown datatype {datatype!r} (expected one of {', '.join(DATATYPES)})",
            field=name,
        )
    return dt


def to_datatype(dtype: Any) -> str:
    """The protocol datatype of a numpy dtype (or dtype name); strings are BYTES."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE[dt.name]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no Open Inference Protocol datatype") from None


# ---- decoding ----------------------------------------------------------------------------
def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(
            f"{name}: shape must be a list of non-negative integers, got {shape!r:.80}",
            field=name,
        )
    return tuple(shape)


def _count(name: str, shape: tuple[int, ...], got: int) -> None:
    want = math.prod(shape)
    if got != want:
        raise InvalidInput(
            f"{name}: shape {list(shape)} needs {want} elements, got {got}", field=name
        )


def _flatten(data: Any, out: list[Any]) -> list[Any]:
    if isinstance(data, (list, tuple)):
        for d in data:
            _flatten(d, out)
    else:
        out.append(data)
    return out


def _bytes_array(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def decode_values(name: str, datatype: str, shape: Any, data: Any) -> np.ndarray:
    """A tensor from its elements: a JSON `data` list (flat, row-major, or nested) or
    the values of a gRPC `contents` field. Values must fit the datatype exactly."""
    dt = numpy_dtype(datatype, name)
    dims = _shape(name, shape)
    if not isinstance(data, (list, tuple)):
        try:
            if isinstance(data, (str, bytes, dict)):
                raise TypeError
            data = list(data)  # a gRPC repeated field
        except TypeError:
            raise InvalidInput(f"{name}: data must be a list", field=name) from None
    if datatype == "BYTES":
        flat = _flatten(data, [])
        values = []
        for v in flat:
            if isinstance(v, str):
                values.append(v.encode("utf-8"))
            elif isinstance(v, bytes):
                values.append(v)
            else:
                raise InvalidInput(f"{name}: BYTES elements must be strings", field=name)
        _count(name, dims, len(values))
        return _bytes_array(values).reshape(dims)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"{name}: ragged or non-numeric data", field=name) from None
    _count(name, dims, arr.size)
    kind = arr.dtype.kind if arr.size else dt.kind
    if dt.kind == "b":
        if kind != "b":
            raise InvalidInput(f"{name}: BOOL data must be true/false", field=name)
    elif dt.kind in "iu":
        if kind not in "iu":
            raise InvalidInput(f"{name}: {datatype} data must be integers", field=name)
        info = np.iinfo(dt)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InvalidInput(
                f"{name}: value out of range for {datatype} [{info.min}, {info.max}]",
                field=name,
            )
    elif kind not in "iuf":
        raise InvalidInput(f"{name}: {datatype} data must be numbers", field=name)
    with np.errstate(over="ignore"):
        out = arr.astype(dt, copy=False).reshape(dims)
    # Narrowing may overflow to infinity; a non-finite input stays for validation.
    narrowed = dt.kind == "f" and arr.dtype.kind == "f" and dt.itemsize < arr.dtype.itemsize
    if narrowed and (np.isinf(out) & np.isfinite(arr.reshape(dims))).any():
        raise InvalidInput(f"{name}: value out of range for {datatype}", field=name)
    return out


def decode_raw(name: str, datatype: str, shape: Any, raw: bytes) -> np.ndarray:
    """A tensor from raw little-endian bytes (gRPC raw contents, REST binary data)."""
    dt = numpy_dtype(datatype, name)
    dims = _shape(name, shape)
    if datatype == "BYTES":
        values = deserialize_bytes(name, raw)
        _count(name, dims, len(values))
        return _bytes_array(values).reshape(dims)
    want = math.prod(dims) * dt.itemsize
    if len(raw) != want:
        raise InvalidInput(
            f"{name}: shape {list(dims)} of {datatype} needs {want} bytes, got {len(raw)}",
            field=name,
        )
    if dt.kind == "b":
        flags = np.frombuffer(raw, dtype=np.uint8)
        if (flags > 1).any():
            raise InvalidInput(f"{name}: BOOL bytes must be 0 or 1", field=name)
        return flags.astype(np.bool_).reshape(dims)
    # A writable, native-order copy: runtimes may not take read-only buffers.
    return np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt).reshape(dims)


def deserialize_bytes(name: str, raw: bytes) -> list[bytes]:
    """Elements of a raw BYTES tensor: each a 4-byte little-endian length, then data."""
    out: list[bytes] = []
    view = memoryview(raw)
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidInput(f"{name}: truncated BYTES element length", field=name)
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidInput(f"{name}: BYTES element longer than the data", field=name)
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


def decode_inputs(request: Any) -> Arrays:
    """The input tensors of a gRPC ModelInferRequest, from raw_input_contents or typed
    contents (each tensor one way; raw answers are raw)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs",
            field="raw_input_contents",
        )
    inputs: Arrays = {}
    for i, t in enumerate(request.inputs):
        name = t.name or f"inputs[{i}]"
        if raw:
            if t.HasField("contents"):
                raise InvalidInput(
                    f"{name}: contents given although raw_input_contents is used", field=name
                )
            arr = decode_raw(name, t.datatype, list(t.shape), raw[i])
        else:
            field = contents_field(name, t.datatype)
            arr = decode_values(name, t.datatype, list(t.shape), getattr(t.contents, field))
        add_input(inputs, t.name, arr)
    return inputs


# ---- encoding ----------------------------------------------------------------------------
def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    return str(v).encode("utf-8")


def encode_raw(arr: np.ndarray) -> bytes:
    """Raw little-endian bytes of a tensor, row-major."""
    if to_datatype(arr.dtype) == "BYTES":
        return b"".join(_LEN.pack(len(b)) + b for b in map(_as_bytes, arr.reshape(-1)))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def json_data(arr: np.ndarray) -> Any:
    """A tensor's elements for a JSON `data` field: flat, row-major. Numeric tensors
    stay numpy (orjson serializes them natively); BYTES become UTF-8 strings."""
    if to_datatype(arr.dtype) == "BYTES":
        return [_as_bytes(v).decode("utf-8", "replace") for v in arr.reshape(-1)]
    return np.ascontiguousarray(arr).reshape(-1)


def contents_values(arr: np.ndarray) -> list[Any]:
    """A tensor's elements for its gRPC `contents` field (see CONTENTS_FIELD)."""
    if to_datatype(arr.dtype) == "BYTES":
        return [_as_bytes(v) for v in arr.reshape(-1)]
    values: list[Any] = arr.reshape(-1).tolist()
    return values


def contents_field(name: str, datatype: str) -> str:
    numpy_dtype(datatype, name)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(
            f"{name}: {datatype} has no typed contents; send it in raw_input_contents",
            field=name,
        )
    return field


# ---- parameters --------------------------------------------------------------------------
def timeout_from_parameters(params: dict[str, Any]) -> float | None:
    """Reject what we do not support; return the request's `timeout` (µs, as Triton's
    clients send it) in seconds, if any."""
    if params.get("sequence_id") not in (None, 0, ""):
        raise InvalidInput("sequence batching (sequence_id) is not supported", field="sequence_id")
    t = params.get("timeout")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise InvalidInput("parameter timeout must be a positive number of µs", field="timeout")
    return float(t) / 1e6


# ---- metadata ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TensorMeta:
    name: str
    datatype: str
    shape: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def input_metadata(manifest: Manifest) -> list[TensorMeta]:
    """What a client sends. A feature-backed model takes one value per instance per
    instance field (entity keys as BYTES, request fields as numbers); any other model
    takes its manifest inputs, batch first."""
    cfg = manifest.features
    if cfg is None:
        return [TensorMeta(s.name, to_datatype(s.dtype), [-1, *s.shape]) for s in manifest.inputs]
    keys = list(dict.fromkeys(v.entity for v in cfg.views))
    return [TensorMeta(k, "BYTES", [-1]) for k in keys] + [
        TensorMeta(f.name, to_datatype(f.dtype), [-1]) for f in cfg.request
    ]


def output_metadata(manifest: Manifest) -> list[TensorMeta]:
    return [TensorMeta(s.name, to_datatype(s.dtype), [-1, *s.shape]) for s in manifest.outputs]


def model_metadata(name: str, versions: list[str], manifest: Manifest) -> dict[str, Any]:
    """The OIP model metadata object (REST body; the gRPC servicer copies it)."""
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORMS.get(manifest.runtime, manifest.runtime),
        "inputs": [t.to_dict() for t in input_metadata(manifest)],
        "outputs": [t.to_dict() for t in output_metadata(manifest)],
    }


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


# ---- inference ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


def select_outputs(manifest: Manifest, requested: Sequence[str] | None) -> list[TensorSpec]:
    """The outputs to return: all of them, or those named, in the order named."""
    if not requested:
        return list(manifest.outputs)
    by_name = {s.name: s for s in manifest.outputs}
    out: list[TensorSpec] = []
    for n in requested:
        spec = by_name.get(n)
        if spec is None:
            raise InvalidInput(
                f"unknown output {n!r} (model outputs: {', '.join(by_name)})", field="outputs"
            )
        out.append(spec)
    return out


def add_input(inputs: Arrays, name: Any, arr: np.ndarray) -> None:
    if not isinstance(name, str) or not name:
        raise MalformedRequest("every input needs a non-empty 'name'", field="inputs")
    if name in inputs:
        raise InvalidInput(f"input {name!r} given twice", field=name)
    inputs[name] = arr


def require_inputs(inputs: Arrays) -> Arrays:
    """The decoded inputs of a request, which must name at least one."""
    if not inputs:
        raise MalformedRequest("request has no inputs", field="inputs")
    return inputs


def outputs(pred: Prediction, requested: Sequence[str] | None) -> list[OutputTensor]:
    """The answer's output tensors: all, or those named, in the order named. They are
    the outputs of the version that answered (routing may have picked a canary)."""
    specs = select_outputs(pred.manifest, requested)
    return [
        OutputTensor(s.name, to_datatype(s.dtype), np.asarray(pred.outputs[s.name])) for s in specs
    ]


def answer_parameters(pred: Prediction) -> dict[str, Any]:
    """Response parameters: the feedback key a delayed label presents, and whether the
    answer is degraded (empty when neither applies)."""
    params: dict[str, Any] = {}
    if pred.feedback_key:
        params["feedback_key"] = pred.feedback_key
    if pred.degraded:
        params["degraded"] = True
        params["degraded_reasons"] = ";".join(pred.degraded)
    return params
