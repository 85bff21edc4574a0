"""Every runtime on the demo artifacts and on small models built here."""

import io
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serving.errors import ConfigError
from serving.models.registry import Registry, load_version
from serving.models.runtimes import RuntimeOptions, load_runtime
from tests.conftest import Touch

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


def _save_torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(_Affine()), str(path))


def _program() -> torch.export.ExportedProgram:
    # Two tensors: one passed twice would be exported as one aliased input.
    a, b, batch = torch.ones(3, 2), torch.ones(3, 2), torch.export.Dim("batch")
    return torch.export.export(_Affine(), (a, b), dynamic_shapes=({0: batch}, {0: batch}))


def _save_program(path: Path) -> None:
    torch.export.save(_program(), str(path))


def _save_aoti(path: Path) -> None:
    torch._inductor.aoti_compile_and_package(_program(), package_path=str(path))


def _affine_version(
    root: Path, runtime: str, artifact: str, save: Callable[[Path], None] | None
) -> Path:
    folder = root / "affine" / runtime
    folder.mkdir(parents=True)
    if save is not None:
        save(folder / artifact)
    (folder / "model.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "affine",
                "version": runtime,
                "runtime": runtime,
                "artifact": artifact,
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


def _check_affine(folder: Path) -> None:
    rt = load_runtime(load_version(folder), CPU)
    for n in (1, 2, 5):
        a = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
        out = rt.predict({"a": a, "b": np.ones_like(a)})
        np.testing.assert_array_equal(out["sum"], a + 1)
        assert out["double"].dtype == np.float64
        np.testing.assert_array_equal(out["double"], a * 2)


@pytest.mark.parametrize(
    ("runtime", "artifact", "save"),
    [("torchscript", "model.pt", _save_torchscript), ("torch_export", "model.pt2", _save_program)],
)
def test_dict_outputs_follow_manifest_names_and_dtypes(
    tmp_path: Path, runtime: str, artifact: str, save: Callable[[Path], None]
) -> None:
    _check_affine(_affine_version(tmp_path, runtime, artifact, save))


def test_an_aotinductor_package(tmp_path: Path) -> None:
    """Compiled here (a C++ compiler at hand, ~10 s): the same answers as the program, and
    each .pt2 kind refused by the other's runtime, naming the right one."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("AOTInductor needs a C++ compiler to build the package")
    package = _affine_version(tmp_path, "torch_aoti", "model.pt2", _save_aoti)
    _check_affine(package)
    program = _affine_version(tmp_path, "torch_export", "model.pt2", _save_program)
    swapped = [(package, program, "torch_export"), (program, package, "torch_aoti")]
    artifacts = {folder: (other / "model.pt2").read_bytes() for folder, other, _ in swapped}
    for folder, _, runtime in swapped:
        (folder / "model.pt2").write_bytes(artifacts[folder])
        with pytest.raises(ConfigError, match=f"use `runtime: {runtime}`"):
            load_runtime(load_version(folder), CPU)


def test_torch_export_on_digits_equals_torchscript(registry_root: Path) -> None:
    """digits v2 is v1's model as an exported program: the same answers, any batch size."""
    registry = Registry(registry_root)
    script, program = (load_runtime(registry.get("digits", v), CPU) for v in ("v1", "v2"))
    x = np.load(registry_root / "digits" / "heldout.npz")["X"]
    for n in (1, 3, 32, len(x)):
        want, got = script.predict({"image": x[:n]}), program.predict({"image": x[:n]})
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
        assert got["label"].dtype == np.int64 and got["probabilities"].dtype == np.float32
    assert registry.get("digits", "v2").manifest.runtime == "torch_export"


def _rewritten(src: Path, dst: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith(member) else zin.read(info))


@pytest.mark.parametrize("kind", ["text", "torchscript", "truncated", "pickled"])
def test_a_bad_exported_program_fails_clearly(
    registry_root: Path, tmp_path: Path, kind: str
) -> None:
    folder = _affine_version(tmp_path, "torch_export", "model.pt2", None)
    artifact = folder / "model.pt2"
    digits = registry_root / "digits"
    marker = tmp_path / "unpickled"
    if kind == "text":
        artifact.write_text("not a model")
    elif kind == "torchscript":
        shutil.copy(digits / "v1" / "model.pt", artifact)
    elif kind == "truncated":
        artifact.write_bytes((digits / "v2" / "model.pt2").read_bytes()[:5000])
    else:  # sample inputs torch.export.load would unpickle in full (running code)
        buf = io.BytesIO()
        torch.save(Touch(marker), buf)
        _rewritten(digits / "v2" / "model.pt2", artifact, "sample_inputs/model.pt", buf.getvalue())
    with pytest.raises(ConfigError, match=r"model\.pt2: not a loadable exported program"):
        load_runtime(load_version(folder), CPU)
    assert not marker.exists()


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


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cuda_requested_without_gpu_fails_clearly(registry_root: Path, version: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mv = Registry(registry_root).get("digits", version)
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_runtime(mv, RuntimeOptions(device="cuda"))
