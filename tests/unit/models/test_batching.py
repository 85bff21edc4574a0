import numpy as np
import pytest

from serving.models import batching


def _req(n: int, start: int, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)}


def test_merge_split_roundtrip_keeps_rows_in_order() -> None:
    parts = [_req(1, 0), _req(4, 100), _req(2, 200)]
    merged, counts = batching.merge(parts)
    assert counts == [1, 4, 2]
    assert merged["x"].shape == (7, 3)
    back = batching.split({"y": merged["x"] * 2}, counts)
    for part, out in zip(parts, back):
        np.testing.assert_array_equal(out["y"], part["x"] * 2)


def test_split_rejects_wrong_row_count() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        batching.split({"y": np.zeros((2, 1))}, [1, 2])


def test_chunk_and_concat() -> None:
    req = _req(10, 0)
    pieces = batching.chunk(req, 4)
    assert [batching.rows(p) for p in pieces] == [4, 4, 2]
    np.testing.assert_array_equal(batching.concat_outputs(pieces)["x"], req["x"])
    assert batching.chunk(req, 10) == [req]


def test_group_compatible_separates_variable_shapes() -> None:
    parts = [_req(1, 0, 3), _req(1, 0, 5), _req(2, 0, 3)]
    assert batching.group_compatible(parts) == [[0, 2], [1]]
