"""REST v1's envelope: the body's `instances`, and one prediction per instance."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import MalformedRequest
from serving.models.registry import TensorSpec
from serving.transport.rest_v1 import encode_predictions, parse_predict_body


def test_the_body_must_hold_instances() -> None:
    assert parse_predict_body({"instances": [1]}) == [1]
    with pytest.raises(MalformedRequest, match="missing 'instances'"):
        parse_predict_body({"foo": 1})
    with pytest.raises(MalformedRequest, match="JSON object"):
        parse_predict_body([1, 2])
    with pytest.raises(MalformedRequest, match="columnar"):
        parse_predict_body({"inputs": {"x": [1]}})


def test_encode_predictions() -> None:
    label = TensorSpec(name="label", dtype="int64", shape=[])
    probs = TensorSpec(name="probabilities", dtype="float32", shape=[2])
    outs = {"label": np.array([0, 1]), "probabilities": np.array([[0.9, 0.1], [0.2, 0.8]])}
    assert encode_predictions([label, probs], outs) == [
        {"label": 0, "probabilities": [0.9, 0.1]},
        {"label": 1, "probabilities": [0.2, 0.8]},
    ]
    assert encode_predictions([label], outs) == [0, 1]
