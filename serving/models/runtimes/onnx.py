"""ONNX Runtime: CUDA provider when a GPU is requested and present, else CPU."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from serving.errors import ConfigError
from serving.models.registry import ModelVersion
from serving.models.runtimes import Arrays, RuntimeOptions, wants_gpu

log = logging.getLogger(__name__)


def _preload_cuda_libraries() -> None:
    """CUDA/cuDNN from pip's nvidia-* packages: onnxruntime-gpu does not find them on its
    own unless torch loaded them first (onnxruntime >= 1.21; a no-op when they are on the
    loader's path anyway). A failure here surfaces as the provider's own load error."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # the session reports the real failure
            log.warning("onnxruntime.preload_dlls failed: %s", exc)


class OnnxRuntime:
    def __init__(self, mv: ModelVersion, opts: RuntimeOptions) -> None:
        so = ort.SessionOptions()
        # A small machine is shared by several replicas: fixed, small thread pools and
        # no spinning (spinning threads steal cores from everything else).
        so.intra_op_num_threads = opts.onnx_intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if wants_gpu(mv, opts):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
                _preload_cuda_libraries()
            elif opts.device == "cuda":
                raise ConfigError(
                    f"{mv.path}: device=cuda but onnxruntime has no CUDA provider "
                    "(install the 'gpu' extra)"
                )
            else:
                log.warning("%s: GPU requested but not available; using CPU", mv.path)
        self._session = ort.InferenceSession(str(mv.artifact_path), so, providers=providers)
        self.device = "cuda" if self._session.get_providers()[0].startswith("CUDA") else "cpu"
        m = mv.manifest
        graph_inputs = {i.name for i in self._session.get_inputs()}
        graph_outputs = {o.name for o in self._session.get_outputs()}
        for spec in m.inputs:
            if spec.name not in graph_inputs:
                raise ConfigError(f"{mv.path}/model.yaml: inputs: {spec.name!r} not in graph")
        for spec in m.outputs:
            if spec.name not in graph_outputs:
                raise ConfigError(f"{mv.path}/model.yaml: outputs: {spec.name!r} not in graph")
        self._in = [(s.name, np.dtype(s.dtype)) for s in m.inputs]
        self._out = [s.name for s in m.outputs]
        self._out_dtypes = [np.dtype(s.dtype) for s in m.outputs]

    def predict(self, inputs: Arrays) -> Arrays:
        feed = {n: np.ascontiguousarray(inputs[n], dtype=dt) for n, dt in self._in}
        results = self._session.run(self._out, feed)
        return {
            n: np.asarray(r).astype(dt, copy=False)
            for n, r, dt in zip(self._out, results, self._out_dtypes)
        }
