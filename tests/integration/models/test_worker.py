"""A model worker: an idle one runs a request at once (on the event loop itself when its
batch of one is fast enough, timed at start-up), a burst forms batches, and the inline
choice neither flips between start-ups nor resists a setting. Real worker and runtime;
no Ray cluster."""

from __future__ import annotations

import asyncio
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


def test_the_inline_choice_does_not_flip_between_start_ups(registry_root: Path) -> None:
    """The batch of one is timed as the fastest of several runs: start-up noise only
    adds, so three start-ups agree, and the measured time is shown."""
    for model, version in (("fraud", "v2"), ("digits", "v1")):
        workers = [
            ModelWorker(model, version, str(registry_root), {**OPTS, "inline_infer_max_s": 0.0005})
            for _ in range(3)
        ]
        assert len({w._inline for w in workers}) == 1, model
        times = [w._batch_of_one_s for w in workers]
        assert all(t is not None and 0 < t < 0.05 for t in times), times


async def test_the_inline_choice_can_be_set_per_version(registry_root: Path) -> None:
    w = worker(registry_root, 0.005)
    assert w._inline
    w.reconfigure({"inline_when_idle": False})
    shown = await w.batching()
    assert shown["inline_when_idle"] is False and shown["batch_of_one_ms"] > 0
    w.reconfigure({})  # back to what was measured
    assert (await w.batching())["inline_when_idle"] is True


async def test_a_burst_forms_batches(registry_root: Path) -> None:
    mv = Registry(registry_root).get("digits", "v1")
    x = np.load(registry_root / "digits" / "heldout.npz")["X"][:64].astype(np.float32)
    w = ModelWorker("digits", "v1", str(registry_root), {**OPTS, "inline_infer_max_s": 0.005})
    name = mv.manifest.inputs[0].name
    results = await asyncio.gather(*(w.predict({name: x[i : i + 1]}) for i in range(64)))
    sizes = [r.batch_size for r in results]
    assert max(sizes) > 1 and max(sizes) <= mv.manifest.batching.max_batch_size, sizes
    expected = load_runtime(mv, RuntimeOptions(device="cpu")).predict({name: x})
    got = np.concatenate([r.outputs["label"] for r in results])
    np.testing.assert_array_equal(got, expected["label"])
