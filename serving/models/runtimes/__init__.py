"""Model runtimes: load an artifact once, then `predict(batch)` many times.

The same code path serves CPU and GPU; the device is chosen once at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from serving.errors import ConfigError
from serving.models.registry import Arrays, ModelVersion

__all__ = ["Arrays", "Runtime", "RuntimeOptions", "load_runtime", "wants_gpu"]


@dataclass(frozen=True)
class RuntimeOptions:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    onnx_intra_op_threads: int = 1
    torch_threads: int = 1


class Runtime(Protocol):
    device: str

    def predict(self, inputs: Arrays) -> Arrays:
        """Run one batch; inputs and outputs keyed by the manifest's tensor names."""
        ...


def wants_gpu(mv: ModelVersion, opts: RuntimeOptions) -> bool:
    """GPU only when asked for: device=cuda, or auto with GPUs in the resources."""
    if opts.device == "cpu":
        return False
    return opts.device == "cuda" or mv.manifest.resources.num_gpus > 0


def load_runtime(mv: ModelVersion, opts: RuntimeOptions) -> Runtime:
    if mv.manifest.runtime == "onnx":
        try:
            from serving.models.runtimes.onnx import OnnxRuntime
        except ImportError as exc:
            # onnxruntime comes with an extra: `cpu` or `gpu` (never both: the CPU
            # package would shadow the GPU one).
            m = mv.manifest
            raise ConfigError(
                f"{m.name}/{m.version} needs ONNX Runtime, which is not installed ({exc}): "
                "pip install 'serving[cpu]' (or 'serving[gpu]' on a GPU host)"
            ) from None
        return OnnxRuntime(mv, opts)
    if mv.manifest.runtime == "torch_export":
        from serving.models.runtimes.torch_export import TorchExportRuntime

        return TorchExportRuntime(mv, opts)
    if mv.manifest.runtime == "torch_aoti":
        from serving.models.runtimes.torch_export import AotiRuntime

        return AotiRuntime(mv, opts)
    from serving.models.runtimes.torch import TorchScriptRuntime

    return TorchScriptRuntime(mv, opts)
