"""Both runtimes on the demo artifacts and on small models built here."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serving.errors import ConfigError
from serving.models.registry import Registry, load_version
from serving.models.runtimes import RuntimeOptions, load_runtime

CPU = RuntimeOptions(device="cpu")


def test_onnx_runtime_on_fraud(registry_root: Path) -> None:
    mv = Registry(registry_root).get("fraud", "v2")
    rt = load_runtime(mv, CPU)
    x = np.load(registry_root / "fraud" / "heldout.npz")["X"][:50]
    out = rt.predict({"features": x})
    assert rt.device == "cpu"
    assert out["label"].dtype == np.int64 and out["label"].shape == (50,)
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (50, 2)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(axis=1))
    # Batched and one-by-one inference agree.
    one = np.concatenate(
        [rt.predict({"features": x[i : i + 1]})["probabilities"] for i in range(5)]
    )
    np.testing.assert_allclose(one, out["probabilities"][:5], rtol=1e-6)


def test_torchscript_runtime_on_digits(registry_root: Path) -> None:
    mv = Registry(registry_root).get("digits", "v1")
    rt = load_runtime(mv, CPU)
    data = np.load(registry_root / "digits" / "heldout.npz")
    out = rt.predict({"image": data["X"]})
    assert out["label"].dtype == np.int64
    assert float(np.mean(out["label"] == data["y"])) >= 0.95
    assert mv.manifest.metrics["accuracy"] >= 0.95


class _Affine(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": a + b, "double": a * 2}


def _torch_version(tmp_path: Path) -> Path:
    folder = tmp_path / "affine" / "v1"
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(_Affine()), str(folder / "model.pt"))
    (folder / "model.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "affine",
                "version": "v1",
                "runtime": "torchscript",
                "artifact": "model.pt",
                "inputs": [
                    {"name": "a", "dtype": "float32", "shape": [2]},
                    {"name": "b", "dtype": "float32", "shape": [2]},
                ],
                "outputs": [
                    {"name": "double", "dtype": "float64", "shape": [2]},
                    {"name": "sum", "dtype": "float32", "shape": [2]},
                ],
            }
        )
    )
    return folder


def test_torchscript_dict_outputs_follow_manifest_names_and_dtypes(tmp_path: Path) -> None:
    rt = load_runtime(load_version(_torch_version(tmp_path)), CPU)
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    out = rt.predict({"a": a, "b": np.ones_like(a)})
    np.testing.assert_array_equal(out["sum"], a + 1)
    assert out["double"].dtype == np.float64
    np.testing.assert_array_equal(out["double"], a * 2)


def test_onnx_manifest_naming_missing_graph_input_fails(
    registry_root: Path, tmp_path: Path
) -> None:
    src = registry_root / "fraud" / "v1"
    folder = tmp_path / "fraud" / "v1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes((src / "model.onnx").read_bytes())
    manifest = yaml.safe_load((src / "model.yaml").read_text())
    manifest["inputs"][0] = {"name": "wrong", "dtype": "float32", "shape": [11]}
    manifest.pop("features")
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match="'wrong' not in graph"):
        load_runtime(load_version(folder), CPU)


def test_cuda_requested_without_gpu_fails_clearly(registry_root: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mv = Registry(registry_root).get("digits", "v1")
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_runtime(mv, RuntimeOptions(device="cuda"))
