"""PyTorch runtimes' shared part (`inference_mode`, CUDA when requested and available),
and the TorchScript runtime.

A module takes the manifest's inputs positionally and returns a tensor, a tuple of
tensors in the manifest's output order, or a dict keyed by name. TorchScript artifacts
are archives (`torch.jit.load`) that hold no pickled Python objects to execute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.errors import ConfigError
from serving.models.registry import ModelVersion
from serving.models.runtimes import Arrays, RuntimeOptions, wants_gpu

log = logging.getLogger(__name__)


class TorchRuntime:
    """What every PyTorch format shares: the device, inputs as tensors in manifest order,
    outputs back under the manifest's names and dtypes. A format implements `_load`."""

    def __init__(self, mv: ModelVersion, opts: RuntimeOptions) -> None:
        torch.set_num_threads(opts.torch_threads)
        device = "cpu"
        if wants_gpu(mv, opts):
            if torch.cuda.is_available():
                device = "cuda"
            elif opts.device == "cuda":
                raise ConfigError(f"{mv.path}: device=cuda but torch sees no CUDA device")
            else:
                log.warning("%s: GPU requested but not available; using CPU", mv.path)
        self.device = device
        self._in = [(s.name, np.dtype(s.dtype)) for s in mv.manifest.inputs]
        self._out = [(s.name, np.dtype(s.dtype)) for s in mv.manifest.outputs]
        self._module = self._load(mv, opts)

    def _load(self, mv: ModelVersion, opts: RuntimeOptions) -> Callable[..., Any]:
        """The callable model, on `self.device` (which a format may still change)."""
        raise NotImplementedError

    def predict(self, inputs: Arrays) -> Arrays:
        on_gpu = self.device != "cpu"  # on the CPU, no device copies to make
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=dt)) for n, dt in self._in
            ]
            if on_gpu:
                args = [a.to(self.device) for a in args]
            result = self._module(*args)
        if isinstance(result, torch.Tensor):
            tensors = [result]
        elif isinstance(result, dict):
            tensors = [result[n] for n, _ in self._out]
        else:
            tensors = list(result)
        if len(tensors) != len(self._out):
            raise ConfigError(
                f"model returned {len(tensors)} outputs, manifest declares {len(self._out)}"
            )
        if on_gpu:
            tensors = [t.cpu() for t in tensors]
        return {n: t.numpy().astype(dt, copy=False) for (n, dt), t in zip(self._out, tensors)}


def artifact_error(path: Path, what: str, exc: BaseException | str) -> ConfigError:
    """The error for an artifact its runtime cannot load: the file, the format it should
    be, and why (the first line of the library's own message)."""
    detail = str(exc).strip().splitlines()
    reason = detail[0] if detail else type(exc).__name__
    return ConfigError(f"{path}: not a loadable {what}: {reason}")


class TorchScriptRuntime(TorchRuntime):
    def _load(self, mv: ModelVersion, opts: RuntimeOptions) -> Callable[..., Any]:
        try:
            module = torch.jit.load(str(mv.artifact_path), map_location=self.device)
        except RuntimeError as exc:
            raise artifact_error(mv.artifact_path, "TorchScript archive", exc) from None
        module.eval()
        return module  # type: ignore[no-any-return]
