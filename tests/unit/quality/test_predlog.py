"""The prediction log's request-path side, without a database: sampling, the bounded
buffer and its drop counter, and how a request becomes rows."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
import pytest

from serving.observability.metrics import metrics
from serving.quality.predlog import (
    Label,
    Prediction,
    PredictionLog,
    label_rows,
    prediction_rows,
    sampled,
)

COLUMNS = ["amount", "hour", "user_stats.txn_count_30d"]
# A Unix socket that does not exist: connecting fails at once, without a network socket.
NOWHERE = "host=/nonexistent-serving-test dbname=x"


def _dropped_metric(kind: str) -> float:
    return metrics().dropped_rows._pending.get((kind,), 0.0)


def _predict(log: PredictionLog, rid: str, n: int = 1, **kw: Any) -> None:
    log.prediction(
        rid,
        "fraud",
        "v2",
        "stable",
        kw.get("ts", 1_700_000_000.0),
        kw.get("inputs", {"features": np.ones((n, 3), np.float32)}),
        {"features": COLUMNS},
        kw.get("outputs", {"label": np.zeros(n, np.int64)}),
        0.0042,
        False,
    )


def test_sampling_is_decided_by_the_request_id_alone() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    first = [sampled(r, 0.3) for r in ids]
    assert first == [sampled(r, 0.3) for r in ids]  # the same answer every time
    assert 0.28 < sum(first) / len(ids) < 0.32
    assert all(sampled(r, 1.0) for r in ids[:100])
    assert not any(sampled(r, 0.0) for r in ids[:100])
    # A lower rate logs a subset of what a higher one logs.
    assert all(sampled(r, 0.5) for r, s in zip(ids, first) if s)


def test_a_sampled_out_request_leaves_nothing_but_its_labels_stay() -> None:
    log = PredictionLog(NOWHERE, sample_rate=0.5)
    ids = [f"r{i}" for i in range(200)]
    for rid in ids:
        _predict(log, rid, n=2)
        log.label(rid, [1, 0], time.time())
    kept = sum(sampled(r, 0.5) for r in ids)
    assert 50 < kept < 150
    assert log.buffered == 2 * kept + 2 * len(ids)
    assert log.dropped == 0


def test_the_buffer_is_bounded_and_drops_are_counted() -> None:
    log = PredictionLog(NOWHERE, max_buffer=10)
    before = _dropped_metric("prediction_log"), _dropped_metric("label_log")
    _predict(log, "a", n=4)
    _predict(log, "b", n=4)
    _predict(log, "c", n=4)  # 12 > 10: dropped whole, not in part
    assert (log.buffered, log.dropped) == (8, 4)
    log.label("a", [1, 0], time.time())  # 10: fits exactly
    log.label("b", [1], time.time())
    assert (log.buffered, log.dropped) == (10, 5)
    assert _dropped_metric("prediction_log") - before[0] == 4
    assert _dropped_metric("label_log") - before[1] == 1


def test_the_request_path_is_cheap() -> None:
    log = PredictionLog(NOWHERE, max_buffer=10**9)
    inputs = {"features": np.ones((1, 3), np.float32)}
    outputs = {"label": np.zeros(1, np.int64), "probabilities": np.ones((1, 2), np.float32)}
    t0 = time.perf_counter()
    for i in range(20_000):
        _predict(log, f"r{i}", inputs=inputs, outputs=outputs)
    per_call = (time.perf_counter() - t0) / 20_000
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per prediction()"


def test_bad_input_never_raises_on_the_request_path() -> None:
    log = PredictionLog(NOWHERE)
    scalar: Any = {"label": np.float32(1)}  # no batch axis
    log.prediction("x", "m", "v", "stable", 0.0, {}, {}, scalar, 0.0, False)
    log.label("y", None, 0.0)  # type: ignore[arg-type]
    assert log.buffered == 0


def test_named_inputs_become_objects_and_outputs_are_per_instance() -> None:
    x = np.array([[12.3, 22, 4], [0.5, 3, 1]], np.float32)
    image = np.arange(8, dtype=np.float64).reshape(2, 2, 2)
    p = Prediction(
        "rid\x00",
        "fraud",
        "v2",
        "canary",
        1_700_000_000.5,
        {"features": x, "image": image},
        {"features": COLUMNS, "image": None},
        {
            "label": np.array([1, 0]),
            "probabilities": np.array([[0.2, 0.8], [0.9, 0.1]], np.float32),
        },
        0.0125,
        True,
        2,
    )
    rows = prediction_rows(p)
    assert [r[:5] for r in rows] == [
        ("rid\ufffd", i, "fraud", "v2", "canary") for i in range(2)
    ]  # NUL replaced: PostgreSQL text refuses it
    assert rows[0][5].timestamp() == 1_700_000_000.5
    inputs, outputs = json.loads(rows[0][6]), json.loads(rows[1][7])
    # float32 values in their shortest form: they read back as the same float32
    assert inputs == {
        "features": {"amount": 12.3, "hour": 22.0, "user_stats.txn_count_30d": 4.0},
        "image": [[0.0, 1.0], [2.0, 3.0]],
    }
    assert np.float32(inputs["features"]["amount"]) == x[0, 0]
    assert outputs == {"label": 0, "probabilities": [0.9, 0.1]}
    assert rows[1][8:] == (pytest.approx(12.5), True)


def test_columns_that_do_not_fit_keep_the_nested_list() -> None:
    p = Prediction(
        "r", "m", "v", "stable", 0.0,
        {"x": np.ones((1, 2)), "s": np.array([["a\x00b"]], dtype=object)},
        {"x": ["a", "b", "c"]},  # three names for two elements: not used
        {"y": np.array([[1.5, np.nan]])}, 0.0, False, 1,
    )  # fmt: skip
    (row,) = prediction_rows(p)
    assert json.loads(row[6]) == {"x": [1.0, 1.0], "s": ["a\ufffdb"]}
    assert json.loads(row[7]) == {"y": [1.5, None]}  # NaN is JSON null


def test_rows_must_match_the_instance_count() -> None:
    p = Prediction(
        "r", "m", "v", "stable", 0.0, {"x": np.ones((3, 2))}, {}, {"y": np.ones(2)},
        0.0, False, 2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="3 rows"):
        prediction_rows(p)


def test_labels_are_one_row_per_instance() -> None:
    rows = label_rows(Label("r", [1, np.int64(0), {"k": 2}], 1_700_000_000.0))
    assert [(r[0], r[1], json.loads(r[2])) for r in rows] == [
        ("r", 0, 1),
        ("r", 1, 0),
        ("r", 2, {"k": 2}),
    ]


async def test_unsendable_rows_stay_buffered_and_a_bad_request_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = PredictionLog(NOWHERE, flush_every_s=3600)
    _predict(log, "good", n=2)
    # Inputs with 3 rows for 2 instances: it cannot become rows, so it is dropped, counted.
    _predict(log, "bad", n=2, inputs={"features": np.ones((3, 3), np.float32)})
    log.label("good", [1, 0], time.time())
    with caplog.at_level(logging.WARNING, logger="serving.quality.predlog"):
        assert await log.flush() is False
        assert await log.flush() is False
    assert (log.buffered, log.dropped) == (4, 2)
    waits = [r for r in caplog.records if "waits in memory" in r.getMessage()]
    assert len(waits) == 1  # one warning per outage, not per attempt
    assert any("'bad'" in r.getMessage() for r in caplog.records)
    await log.close(timeout_s=0.5)
    _predict(log, "late")  # after close: dropped and counted, never raised
    assert log.dropped == 3
    await asyncio.sleep(0)
