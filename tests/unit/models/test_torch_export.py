"""The torch.export runtimes' checks, on archives and programs built in memory: what a
.pt2 must hold (and must not: pickles), its signature against the manifest, and the
machine an AOTInductor package was compiled for."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.errors import ConfigError
from serving.models.registry import Manifest, ModelVersion
from serving.models.runtimes.torch_export import (
    PACKAGE,
    PROGRAM,
    check_machine,
    check_signature,
    check_unpickled,
    read_archive,
)
from tests.conftest import Touch

PATH = Path("m/v1/model.pt2")


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _payload(path_name: str, use_pickle: bool = False) -> dict[str, Any]:
    return {"path_name": path_name, "is_param": True, "use_pickle": use_pickle}


def _members(**change: bytes) -> dict[str, bytes]:
    """What torch.export.save writes, less the bytes nothing here reads."""
    members = {
        "archive_format": b"pt2",
        "models/model.json": b"{}",
        "data/weights/model_weights_config.json": json.dumps(
            {"config": {"fc.weight": _payload("weight_0")}}
        ).encode(),
        "data/constants/model_constants_config.json": b'{"config": {}}',
        "data/sample_inputs/model.pt": _saved(((torch.zeros(2, 3),), {})),
    }
    return {**members, **change}


def test_a_plain_program_passes() -> None:
    check_unpickled(PATH, _members())


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {
                "data/weights/model_weights_config.json": json.dumps(
                    {"config": {"w": _payload("weight_0", use_pickle=True)}}
                ).encode()
            },
            "weights 'w'",
        ),
        (
            {
                "data/constants/model_constants_config.json": json.dumps(
                    {"config": {"obj": _payload("custom_obj_0")}}
                ).encode()
            },
            "constants 'obj'",
        ),
        ({"data/weights/model.pt": b"legacy"}, "legacy weights"),
    ],
)
def test_pickled_payloads_are_refused(change: dict[str, bytes], why: str) -> None:
    with pytest.raises(ConfigError, match=f"holds pickled objects.*{why}"):
        check_unpickled(PATH, _members(**change))


def test_sample_inputs_that_need_a_full_unpickle_are_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    sample = _saved(Touch(marker))
    with pytest.raises(ConfigError, match="sample inputs"):
        check_unpickled(PATH, _members(**{"data/sample_inputs/model.pt": sample}))
    assert not marker.exists()


def test_an_archive_with_other_than_one_program_is_refused() -> None:
    members = _members()
    del members["models/model.json"]
    with pytest.raises(ConfigError, match="0 programs"):
        check_unpickled(PATH, members)


def _zip(path: Path, members: dict[str, bytes], root: str = "model") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data)
    return path


def test_read_archive_strips_the_root_folder(tmp_path: Path) -> None:
    members = read_archive(_zip(tmp_path / "a.pt2", _members(), root="anything"), PROGRAM)
    assert members == _members()


def test_read_archive_names_what_is_wrong(tmp_path: Path) -> None:
    text = tmp_path / "text.pt2"
    text.write_text("not a zip")
    with pytest.raises(ConfigError, match=r"text.pt2: not a loadable exported program"):
        read_archive(text, PROGRAM)
    other_zip = _zip(tmp_path / "b.pt2", {"data.pkl": b"x"})
    with pytest.raises(ConfigError, match=r"not a \.pt2 archive"):
        read_archive(other_zip, PROGRAM)
    package = _zip(tmp_path / "c.pt2", {"archive_format": b"pt2", "data/aotinductor/m/x.so": b""})
    with pytest.raises(ConfigError, match="runtime: torch_aoti"):
        read_archive(package, PROGRAM)
    assert read_archive(package, PACKAGE)
    with pytest.raises(ConfigError, match="runtime: torch_export"):
        read_archive(_zip(tmp_path / "d.pt2", _members()), PACKAGE)


# ---- the program against the manifest -----------------------------------------------------
class _Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _version(max_batch: int = 32, **spec: Any) -> ModelVersion:
    manifest = Manifest.model_validate(
        {
            "name": "m",
            "version": "v1",
            "runtime": "torch_export",
            "artifact": "model.pt2",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [3], **spec}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [3]}],
            "batching": {"max_batch_size": max_batch},
        }
    )
    return ModelVersion(manifest=manifest, path=Path("m/v1"))


def _program(batch: Any = "dynamic") -> Any:
    dims = ({0: torch.export.Dim("batch")},) if batch == "dynamic" else ({0: batch},)
    return torch.export.export(_Scale(), (torch.zeros(4, 3),), dynamic_shapes=dims)


@pytest.fixture(scope="module")
def program() -> Any:
    return _program()


def test_a_matching_signature_passes(program: Any) -> None:
    check_signature(_version(), program)
    check_signature(_version(shape=[-1]), program)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"dtype": "float64"}, "'x' is float64 \\[3\\] per instance, the program takes"),
        ({"shape": [3, 1]}, "the program takes torch.float32"),
        ({"shape": [4]}, "axis 1 is 4 in the manifest, 3 in the program"),
    ],
)
def test_a_signature_unlike_the_manifest_is_refused(
    program: Any, spec: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_signature(_version(**spec), program)


def test_a_fixed_or_too_small_batch_axis_is_refused() -> None:
    with pytest.raises(ConfigError, match="batch axis is fixed at 4"):
        check_signature(_version(), _program(batch=None))
    small = _program(batch=torch.export.Dim("batch", max=16))
    check_signature(_version(max_batch=16), small)
    with pytest.raises(ConfigError, match=r"batches of at most 16, batching\.max_batch_size is 32"):
        check_signature(_version(max_batch=32), small)


def test_the_input_count_must_match(program: Any) -> None:
    mv = _version()
    two = mv.manifest.model_copy(update={"inputs": [*mv.manifest.inputs] * 2})
    with pytest.raises(ConfigError, match="takes 1 inputs, inputs: 2"):
        check_signature(mv.model_copy(update={"manifest": two}), program)


# ---- the machine an AOTInductor package was compiled for ----------------------------------
HOST = {
    "AOTI_PLATFORM": "linux",
    "AOTI_MACHINE": "x86_64",
    "AOTI_CPU_ISA": "AVX512 AVX512_VNNI",
    "AOTI_COMPUTE_CAPABILITY": "",
}


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This machine as torch describes it, made an AVX512 one."""
    from torch._inductor import codecache

    monkeypatch.setattr(codecache, "get_device_information", lambda device: dict(HOST))
    return HOST


def test_a_package_for_this_machine_passes(host: dict[str, str]) -> None:
    check_machine(PATH, {**host, "AOTI_DEVICE_KEY": "cpu"}, "cpu")
    # A lesser instruction set runs here too.
    check_machine(PATH, {**host, "AOTI_CPU_ISA": "AVX2"}, "cpu")
    check_machine(PATH, {**host, "AOTI_CPU_ISA": "AVX512"}, "cpu")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("AOTI_MACHINE", "riscv64"),
        ("AOTI_PLATFORM", "darwin"),
        ("AOTI_CPU_ISA", "AVX512 AVX512_VNNI AMX"),
    ],
)
def test_a_package_for_another_machine_is_refused(
    host: dict[str, str], key: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"compiled for another machine.*{key}"):
        check_machine(PATH, {**host, key: value}, "cpu")
