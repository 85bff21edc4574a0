"""The direct channel's wire format: arrays, answers and errors survive the trip, frames
come out whole however the bytes are cut, and anything but numbers is refused."""

from __future__ import annotations

import numpy as np
import pytest

from serving.models import wire


def test_arrays_round_trip_exactly() -> None:
    arrays = {
        "image": np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8),
        "ids": np.array([1, -2], dtype=np.int64),
        "flags": np.array([[True], [False]]),
        "scalar_rows": np.zeros((3,), dtype=np.float16),
        "empty": np.zeros((0, 4), dtype=np.uint8),
    }
    decoded, _ = wire.decode_arrays(b"".join(wire.encode_arrays(arrays)))
    assert list(decoded) == list(arrays)
    for name, arr in arrays.items():
        assert decoded[name].dtype == arr.dtype and decoded[name].shape == arr.shape
        np.testing.assert_array_equal(decoded[name], arr)
        assert decoded[name].flags.writeable  # runtimes may write into inputs


def test_a_non_contiguous_view_is_sent_as_its_values() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    decoded, _ = wire.decode_arrays(b"".join(wire.encode_arrays({"x": base[:, ::2]})))
    np.testing.assert_array_equal(decoded["x"], base[:, ::2])


def test_results_and_errors_round_trip() -> None:
    outputs = {"label": np.array([3]), "probabilities": np.full((1, 10), 0.1, np.float32)}
    frames = wire.FrameReader().feed(wire.encode_result(7, outputs, 0.25, 0.5, 12))
    assert [(f.request_id, f.kind) for f in frames] == [(7, wire.RESULT)]
    got, queue_s, infer_s, batch = wire.decode_result(frames[0].body)
    assert (queue_s, infer_s, batch) == (0.25, 0.5, 12)
    np.testing.assert_array_equal(got["probabilities"], outputs["probabilities"])
    (err,) = wire.FrameReader().feed(wire.encode_error(8, "overloaded", "büsy"))
    assert (err.request_id, err.kind) == (8, wire.ERROR)
    assert wire.decode_error(err.body) == ("overloaded", "büsy")


def test_frames_come_out_whole_however_the_stream_is_cut() -> None:
    stream = b"".join(
        wire.frame(i, wire.PREDICT, wire.encode_arrays({"x": np.full(i, i, np.int32)}), 1, 50)
        for i in range(1, 6)
    )
    for step in (1, 3, 7, 64, len(stream)):
        reader = wire.FrameReader()
        frames = []
        for at in range(0, len(stream), step):
            frames += reader.feed(stream[at : at + step])
        assert [(f.request_id, f.flags, f.deadline_ms) for f in frames] == [
            (i, 1, 50) for i in range(1, 6)
        ]
        assert [int(wire.decode_arrays(f.body)[0]["x"].sum()) for f in frames] == [
            i * i for i in range(1, 6)
        ]


def test_only_numbers_cross() -> None:
    with pytest.raises(wire.WireError, match="cannot cross"):
        wire.encode_arrays({"s": np.array([b"u1"], dtype=object)})
    good = b"".join(wire.encode_arrays({"x": np.zeros(4, np.float32)}))
    with pytest.raises(wire.WireError):
        wire.decode_arrays(good[:-3])  # the data is shorter than its shape says
    with pytest.raises(wire.WireError):
        wire.decode_arrays(good.replace(b"<f4", b"|O8"))  # objects would unpickle
    with pytest.raises(wire.WireError, match="frame of"):
        wire.FrameReader().feed(wire.HEADER.pack(wire.MAX_BODY + 1, 1, wire.PREDICT, 0, 0))
