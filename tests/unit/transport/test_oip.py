"""Open Inference Protocol conversions (serving.transport.oip) without Ray: datatypes, JSON and raw
tensors, gRPC request decoding, metadata shapes and the error → status table."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from serving.errors import InvalidInput, MalformedRequest
from serving.models.registry import Manifest
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.transport import oip

NUMERIC = [d for d in oip.DATATYPES if d != "BYTES"]


# ---- datatypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_datatype_round_trips_through_numpy(datatype: str) -> None:
    assert oip.to_datatype(oip.numpy_dtype(datatype)) == datatype


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        ("bool", "BOOL"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("uint8", "UINT8"),
        ("uint16", "UINT16"),
        ("uint32", "UINT32"),
        ("uint64", "UINT64"),
        ("float16", "FP16"),
        ("float32", "FP32"),
        ("float64", "FP64"),
        (object, "BYTES"),
        ("S5", "BYTES"),
        ("U3", "BYTES"),
    ],
)
def test_numpy_to_datatype(dtype: Any, datatype: str) -> None:
    assert oip.to_datatype(dtype) == datatype


def test_unknown_datatypes_are_named() -> None:
    with pytest.raises(InvalidInput, match=r"x: unknown datatype 'FP8'") as e:
        oip.numpy_dtype("FP8", "x")
    assert e.value.field == "x"
    with pytest.raises(ValueError, match="complex64"):
        oip.to_datatype(np.complex64)


# ---- JSON data ---------------------------------------------------------------------------
def test_json_data_flat_or_nested_is_row_major() -> None:
    flat = oip.decode_values("x", "FP32", [2, 3], [1, 2, 3, 4, 5, 6.5])
    nested = oip.decode_values("x", "FP32", [2, 3], [[1, 2, 3], [4, 5, 6.5]])
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)
    assert flat[1, 2] == np.float32(6.5)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("FP32", [1.0, 2.0], r"x: shape \[3\] needs 3 elements, got 2"),
        ("FP32", [1.0, "a", 2.0], "must be numbers"),
        ("FP32", [[1.0], [2.0, 3.0]], "ragged"),
        ("INT32", [1, 2.5, 3], "must be integers"),
        ("INT8", [1, 2, 300], r"out of range for INT8 \[-128, 127\]"),
        ("UINT8", [1, 2, -1], "out of range for UINT8"),
        ("BOOL", [1, 0, 1], "BOOL data must be true/false"),
        ("INT64", [True, False, True], "must be integers"),
        ("FP16", [1.0, 2.0, 1e6], "out of range for FP16"),
        ("BYTES", ["a", 2, "c"], "BYTES elements must be strings"),
    ],
)
def test_json_data_must_fit_the_datatype(datatype: str, data: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as e:
        oip.decode_values("x", datatype, [3], data)
    assert e.value.field == "x"


@pytest.mark.parametrize("shape", [[-1, 2], "2", [2.0], [True]])
def test_shapes_must_be_non_negative_integers(shape: Any) -> None:
    with pytest.raises(InvalidInput, match="shape must be a list of non-negative integers"):
        oip.decode_values("x", "FP32", shape, [1.0, 2.0])


def test_json_bool_fp16_and_bytes_decode_and_encode() -> None:
    b = oip.decode_values("b", "BOOL", [3], [True, False, True])
    assert b.dtype == np.bool_ and b.tolist() == [True, False, True]
    h = oip.decode_values("h", "FP16", [2], [0.5, 1.5])
    assert h.dtype == np.float16 and h.tolist() == [0.5, 1.5]
    s = oip.decode_values("s", "BYTES", [2, 1], [["u1"], ["zé"]])
    assert s.dtype == object and s.shape == (2, 1)
    assert s.reshape(-1).tolist() == [b"u1", "zé".encode()]
    # Encoding: flat, row-major; orjson writes numpy numbers, BYTES as strings.
    as_json = {
        name: orjson.loads(orjson.dumps(oip.json_data(arr), option=orjson.OPT_SERIALIZE_NUMPY))
        for name, arr in (("b", b), ("h", h), ("s", s))
    }
    assert as_json == {"b": [True, False, True], "h": [0.5, 1.5], "s": ["u1", "zé"]}
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert orjson.loads(orjson.dumps(oip.json_data(ints), option=orjson.OPT_SERIALIZE_NUMPY)) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]


# ---- raw data ----------------------------------------------------------------------------
def test_raw_numeric_is_little_endian() -> None:
    raw = struct.pack("<3f", 1.5, -2.0, 3.25)
    arr = oip.decode_raw("x", "FP32", [1, 3], raw)
    assert arr.dtype == np.float32 and arr.tolist() == [[1.5, -2.0, 3.25]]
    assert arr.flags.writeable
    assert oip.decode_raw("i", "INT64", [2], struct.pack("<2q", -1, 2**40)).tolist() == [
        -1,
        2**40,
    ]
    assert oip.encode_raw(np.array([1, 258], dtype=">u2")) == struct.pack("<2H", 1, 258)


def test_raw_bytes_are_length_prefixed() -> None:
    raw = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0) + struct.pack("<I", 2) + b"\x00\xff"
    arr = oip.decode_raw("s", "BYTES", [3], raw)
    assert arr.tolist() == [b"abc", b"", b"\x00\xff"]
    assert oip.encode_raw(arr) == raw
    with pytest.raises(InvalidInput, match="longer than the data"):
        oip.decode_raw("s", "BYTES", [1], struct.pack("<I", 9) + b"abc")
    with pytest.raises(InvalidInput, match="truncated"):
        oip.decode_raw("s", "BYTES", [1], b"\x01\x00")
    with pytest.raises(InvalidInput, match=r"shape \[2\] needs 2 elements, got 3"):
        oip.decode_raw("s", "BYTES", [2], raw)


def test_raw_size_and_bool_values_are_checked() -> None:
    with pytest.raises(InvalidInput, match=r"x: shape \[2, 2\] of FP32 needs 16 bytes, got 12"):
        oip.decode_raw("x", "FP32", [2, 2], b"\x00" * 12)
    assert oip.decode_raw("b", "BOOL", [3], b"\x01\x00\x01").tolist() == [True, False, True]
    with pytest.raises(InvalidInput, match="0 or 1"):
        oip.decode_raw("b", "BOOL", [1], b"\x02")


@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_raw_round_trip_is_exact(datatype: str) -> None:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        arr = np.array([b"x", b"", "é".encode(), b"\x00" * 3], dtype=object).reshape(2, 2)
    elif datatype == "BOOL":
        arr = rng.random((2, 3)) > 0.5
    else:
        dt = oip.numpy_dtype(datatype)
        if dt.kind == "f":
            arr = rng.standard_normal((2, 3)).astype(dt)
        else:
            info = np.iinfo(dt)
            arr = np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dt)
    back = oip.decode_raw("x", datatype, list(arr.shape), oip.encode_raw(arr))
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


# ---- gRPC requests -----------------------------------------------------------------------
def _request(raw: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="fraud")
    keys = np.array([b"u1", b"u2"], dtype=object)
    amount = np.array([10.5, 99.0], dtype=np.float32)
    t = req.inputs.add(name="user_id", datatype="BYTES", shape=[2])
    if raw:
        req.raw_input_contents.append(oip.encode_raw(keys))
    else:
        t.contents.bytes_contents.extend(keys.tolist())
    t = req.inputs.add(name="amount", datatype="FP32", shape=[2])
    if raw:
        req.raw_input_contents.append(oip.encode_raw(amount))
    else:
        t.contents.fp32_contents.extend(amount.tolist())
    return pb.ModelInferRequest.FromString(req.SerializeToString())


@pytest.mark.parametrize("raw", [True, False])
def test_grpc_inputs_decode_from_raw_or_typed_contents(raw: bool) -> None:
    inputs = oip.decode_inputs(_request(raw))
    assert list(inputs) == ["user_id", "amount"]
    assert inputs["user_id"].tolist() == [b"u1", b"u2"]
    assert inputs["amount"].dtype == np.float32 and inputs["amount"].tolist() == [10.5, 99.0]


def test_grpc_inputs_reject_mixed_or_miscounted_raw_contents() -> None:
    req = _request(raw=True)
    req.inputs[0].contents.bytes_contents.append(b"u1")
    with pytest.raises(InvalidInput, match="contents given although raw_input_contents"):
        oip.decode_inputs(req)
    req = _request(raw=True)
    del req.raw_input_contents[1]
    with pytest.raises(InvalidInput, match="holds 1 tensors for 2 inputs"):
        oip.decode_inputs(req)
    req = pb.ModelInferRequest()
    req.inputs.add(name="h", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="FP16 has no typed contents"):
        oip.decode_inputs(req)
    req = _request(raw=False)
    req.inputs[1].name = "user_id"
    with pytest.raises(InvalidInput, match="given twice"):
        oip.decode_inputs(req)


def test_request_parameters() -> None:
    assert oip.timeout_from_parameters({}) is None
    assert oip.timeout_from_parameters({"timeout": 250_000, "priority": 1}) == 0.25
    with pytest.raises(InvalidInput, match="timeout"):
        oip.timeout_from_parameters({"timeout": -1})
    with pytest.raises(InvalidInput, match="sequence"):
        oip.timeout_from_parameters({"sequence_id": 7})


# ---- metadata ----------------------------------------------------------------------------
def _manifest(**extra: Any) -> Manifest:
    return Manifest.model_validate(
        {
            "name": "m",
            "version": "v1",
            "runtime": "onnx",
            "artifact": "model.onnx",
            "inputs": [{"name": "image", "dtype": "float32", "shape": [8, -1]}],
            "outputs": [
                {"name": "label", "dtype": "int64", "shape": []},
                {"name": "probabilities", "dtype": "float32", "shape": [10]},
            ],
            **extra,
        }
    )


def test_metadata_puts_minus_one_for_the_batch_and_variable_axes() -> None:
    meta = oip.model_metadata("m", ["v1", "v2"], _manifest())
    assert meta == {
        "name": "m",
        "versions": ["v1", "v2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, -1]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }


@pytest.mark.parametrize(
    ("runtime", "platform"),
    [
        ("torchscript", "pytorch_libtorch"),
        ("torch_export", "pytorch_torch_export"),
        ("torch_aoti", "pytorch_aotinductor"),
    ],
)
def test_metadata_names_each_runtime_s_platform(runtime: str, platform: str) -> None:
    meta = oip.model_metadata("m", ["v1"], _manifest(runtime=runtime, artifact="model.pt2"))
    assert meta["platform"] == platform


def test_metadata_of_a_feature_backed_model_lists_instance_fields() -> None:
    m = _manifest(
        inputs=[
            {
                "name": "features",
                "dtype": "float32",
                "shape": [3],
                "columns": ["amount", "hour", "u.n"],
            }
        ],
        features={
            "input": "features",
            "request": [{"name": "amount", "dtype": "float32"}, {"name": "hour", "dtype": "int64"}],
            "views": [
                {"name": "u", "entity": "user_id", "features": [{"name": "n"}]},
                {"name": "u2", "entity": "user_id", "features": [{"name": "k"}]},
            ],
        },
    )
    assert [t.to_dict() for t in oip.input_metadata(m)] == [
        {"name": "user_id", "datatype": "BYTES", "shape": [-1]},
        {"name": "amount", "datatype": "FP32", "shape": [-1]},
        {"name": "hour", "datatype": "INT64", "shape": [-1]},
    ]


def test_requested_outputs_are_selected_in_order_or_named_if_unknown() -> None:
    m = _manifest()
    assert [s.name for s in oip.select_outputs(m, None)] == ["label", "probabilities"]
    assert [s.name for s in oip.select_outputs(m, ["probabilities", "label"])] == [
        "probabilities",
        "label",
    ]
    with pytest.raises(InvalidInput, match="unknown output 'nope' \\(model outputs: label, prob"):
        oip.select_outputs(m, ["nope"])


def test_empty_requests_are_malformed() -> None:
    with pytest.raises(MalformedRequest):
        oip.add_input({}, "", np.zeros(1))
