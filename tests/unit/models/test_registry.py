from pathlib import Path

import pytest
import yaml

from serving.errors import ConfigError
from serving.models.registry import Registry, load_version
from serving.settings import load_deployment

GOOD = {
    "name": "m",
    "version": "v1",
    "runtime": "onnx",
    "artifact": "model.onnx",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [2], "columns": ["a", "b"]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": []}],
}


def _write(root: Path, manifest: dict, artifact: str = "model.onnx") -> Path:
    folder = root / manifest.get("name", "m") / manifest.get("version", "v1")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    (folder / artifact).write_bytes(b"x")
    return folder


def test_valid_manifest_loads_with_defaults(tmp_path: Path) -> None:
    mv = load_version(_write(tmp_path, GOOD))
    assert mv.manifest.batching.max_batch_size == 32
    assert mv.artifact_path == (tmp_path / "m" / "v1" / "model.onnx").resolve()
    assert Registry(tmp_path).list() == {"m": ["v1"]}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"runtime": "tensorflow"}, "runtime"),
        ({"inputs": [{"name": "x", "dtype": "complex64", "shape": [2]}]}, "inputs.0.dtype"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [0]}]}, "inputs.0.shape"),
        (
            {"inputs": [{"name": "x", "dtype": "float32", "shape": [3], "columns": ["a"]}]},
            "columns need shape [1]",
        ),
        ({"artifact": "../other/model.onnx"}, "artifact"),
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
        ({"resources": {"num_gpus": -1}}, "resources.num_gpus"),
        ({"outputs": []}, "outputs"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_manifest_names_file_and_field(tmp_path: Path, change: dict, fragment: str) -> None:
    folder = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(ConfigError) as e:
        load_version(folder)
    assert str(folder / "model.yaml") in str(e.value)
    assert fragment in str(e.value)


def test_missing_artifact_and_mismatched_folder(tmp_path: Path) -> None:
    folder = _write(tmp_path, GOOD)
    (folder / "model.onnx").unlink()
    with pytest.raises(ConfigError, match=r"artifact: file .* not found"):
        load_version(folder)
    other = _write(tmp_path / "x", {**GOOD, "version": "v1"})
    renamed = other.parent / "v7"
    other.rename(renamed)
    with pytest.raises(ConfigError, match="must match the folder"):
        load_version(renamed)


def test_artifact_symlink_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    folder = _write(tmp_path, GOOD)
    (folder / "model.onnx").unlink()
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x")
    (folder / "model.onnx").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the version folder"):
        load_version(folder)


def test_registry_rejects_path_like_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid model name"):
        Registry(tmp_path).get("../etc", "v1")


def test_deployment_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"default": "v2", "versions": {"v1": {}}}}}))
    with pytest.raises(ConfigError) as e:
        load_deployment(path)
    assert "models.m" in str(e.value) and "default version 'v2'" in str(e.value)
    path.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_deployment(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_deployment(tmp_path / "missing.yaml")
