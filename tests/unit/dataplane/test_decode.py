import math

import numpy as np
import pytest

from serving.dataplane.decode import decode_instances
from serving.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from serving.models.registry import TensorSpec

VEC = TensorSpec(name="features", dtype="float32", shape=[3], columns=["a", "b", "c"])
PLAIN = TensorSpec(name="features", dtype="float32", shape=[3])
IMG = TensorSpec(name="image", dtype="float32", shape=[2, 2])
IDS = TensorSpec(name="ids", dtype="int8", shape=[-1])


def test_bare_lists_and_named_inputs_decode_the_same() -> None:
    bare = decode_instances([VEC], [[1, 2, 3], [4, 5, 6]], 10)
    named = decode_instances([VEC], [{"features": [1, 2, 3]}, {"features": [4, 5, 6]}], 10)
    cols = decode_instances([VEC], [{"a": 1, "b": 2, "c": 3}, {"c": 6, "b": 5, "a": 4}], 10)
    for got in (bare, named, cols):
        assert got["features"].dtype == np.float32
        np.testing.assert_array_equal(got["features"], [[1, 2, 3], [4, 5, 6]])


def test_multi_input_requires_objects() -> None:
    out = decode_instances([IMG, IDS], [{"image": [[0, 1], [2, 3]], "ids": [1, 2]}], 10)
    assert out["image"].shape == (1, 2, 2) and out["ids"].dtype == np.int8
    with pytest.raises(InvalidInput) as e:
        decode_instances([IMG, IDS], [[[0, 1], [2, 3]]], 10)
    assert e.value.field == "instances[0]"


@pytest.mark.parametrize(
    ("instances", "field", "fragment"),
    [
        ([[1, 2, 3], [1, "x", 3]], "instances[1]", "string 'x'"),
        ([[1, 2, 3], [1, 2]], "instances[1]", "expected shape [3], got [2]"),
        ([[1, 2, 3], [1, [2], 3]], "instances[1]", "ragged"),
        ([[1, 2, 3], [1, None, 3]], "instances[1]", "null"),
        ([[1, 2, math.nan]], "instances[0]", "NaN or infinity"),
        ([[1, 2, math.inf]], "instances[0]", "NaN or infinity"),
        ([{"a": 1, "b": 2}], "instances[0].c", "missing field 'c'"),
        ([{"a": 1, "b": 2, "c": 3, "d": 4}], "instances[0].d", "unknown field 'd'"),
        ([{"a": 1, "b": "2", "c": 3}], "instances[0].b", "expected float32"),
        ([{"a": 1, "b": 2, "c": math.nan}], "instances[0].c", "NaN"),
        ([[True, False, True]], "instances[0]", "booleans"),
    ],
)
def test_bad_values_name_the_field(instances: list, field: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as e:
        decode_instances([PLAIN if field.endswith("]") else VEC], instances, 10)
    assert e.value.field == field
    assert fragment in e.value.message
    assert e.value.http_status == 422


def test_bare_list_errors_name_the_column_when_columns_are_declared() -> None:
    with pytest.raises(InvalidInput) as e:
        decode_instances([VEC], [[1, 2, 3], [1, "x", 3]], 10)
    assert e.value.field == "instances[1].b"


def test_integer_inputs_check_range_and_integrality() -> None:
    assert decode_instances([IDS], [[1, -5, 100]], 10)["ids"].tolist() == [[1, -5, 100]]
    with pytest.raises(InvalidInput, match="out of range for int8"):
        decode_instances([IDS], [[1, 300]], 10)
    with pytest.raises(InvalidInput, match="expected integers"):
        decode_instances([IDS], [[1.5]], 10)


def test_envelope_errors() -> None:
    with pytest.raises(MalformedRequest):
        decode_instances([VEC], {"a": 1}, 10)
    with pytest.raises(InvalidInput, match="must not be empty"):
        decode_instances([VEC], [], 10)
    with pytest.raises(PayloadTooLarge) as e:
        decode_instances([VEC], [[1, 2, 3]] * 11, 10)
    assert e.value.http_status == 413
