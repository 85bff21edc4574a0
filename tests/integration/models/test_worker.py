"""A model worker that is idle runs a request at once as a batch of one, without Ray's
batch queue, and on the event loop itself when its batch of one is fast enough (timed
at start-up). Real worker and runtime; no Ray cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.models.registry import Registry
from serving.models.runtimes import RuntimeOptions, load_runtime
from serving.models.worker import ModelWorker

OPTS = {"device": "cpu", "onnx_intra_op_threads": 1, "torch_threads": 1}


def worker(registry_root: Path, inline_max_s: float) -> ModelWorker:
    return ModelWorker(
        "fraud", "v2", str(registry_root), {**OPTS, "inline_infer_max_s": inline_max_s}
    )


def test_inline_only_for_a_model_faster_than_the_limit(registry_root: Path) -> None:
    assert worker(registry_root, 0.005)._inline  # trees, ~0.02 ms a row: well under 5 ms
    assert not worker(registry_root, 1e-9)._inline  # nothing is that fast
    assert not worker(registry_root, 0.0)._inline  # 0 turns it off


async def test_an_idle_worker_answers_like_the_runtime(registry_root: Path) -> None:
    x = np.load(registry_root / "fraud" / "heldout.npz")["X"][:1].astype(np.float32)
    mv = Registry(registry_root).get("fraud", "v2")
    name = mv.manifest.inputs[0].name
    expected = load_runtime(mv, RuntimeOptions(device="cpu")).predict({name: x})
    # On the loop; on the inference thread (others on their way; inline turned off).
    for inline_max_s, alone in ((0.005, True), (0.005, False), (0.0, True)):
        w = worker(registry_root, inline_max_s)
        result = await w.predict({name: x}, alone)
        assert result.batch_size == 1
        assert result.queue_s < 0.005  # no batch wait, no batch queue
        for k, v in expected.items():
            np.testing.assert_array_equal(result.outputs[k], v)
        assert (await w.batching())["inline_when_idle"] is w._inline


async def test_an_idle_worker_runs_a_large_request_piece_by_piece_at_once(
    registry_root: Path,
) -> None:
    mv = Registry(registry_root).get("fraud", "v2")
    name = mv.manifest.inputs[0].name
    rows = 2 * mv.manifest.batching.max_batch_size + 5  # three pieces
    x = np.load(registry_root / "fraud" / "heldout.npz")["X"][:rows].astype(np.float32)
    expected = load_runtime(mv, RuntimeOptions(device="cpu")).predict({name: x})
    w = worker(registry_root, 0.005)
    w.reconfigure({"batch_wait_timeout_s": 0.05})  # a queued piece would wait 50 ms
    result = await w.predict({name: x}, True)
    assert result.batch_size == mv.manifest.batching.max_batch_size
    assert result.queue_s < 0.02  # the last, partial piece waited for no company
    for k, v in expected.items():
        np.testing.assert_array_equal(result.outputs[k], v)
