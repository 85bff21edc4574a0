"""`torch.export` runtimes: exported programs (runtime `torch_export`) and AOTInductor
packages (runtime `torch_aoti`), both `.pt2` archives.

An exported program (`torch.export.save`) holds its graph as JSON and its weights as raw
tensor bytes, run by `torch.export.load(...).module()`. `torch.export.load` would also
unpickle what some archives carry (tensor-subclass weights, custom objects, and sample
inputs that fail `weights_only`), so the archive is checked first and refused if it
holds any of that: as with TorchScript, nothing is unpickled.

An AOTInductor package (`torch._inductor.aoti_compile_and_package`) is a shared library
compiled for the device and CPU instruction set it was built on: native code, trusted
as such, refused on a host whose CPU or device differs.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.errors import ConfigError
from serving.models.registry import ModelVersion
from serving.models.runtimes import RuntimeOptions
from serving.models.runtimes.torch import TorchRuntime, artifact_error

log = logging.getLogger(__name__)

PROGRAM = "exported program (torch.export.save)"
PACKAGE = "AOTInductor package (torch._inductor.aoti_compile_and_package)"


def read_archive(path: Path, what: str) -> dict[str, bytes]:
    """The members of a PT2 archive, keyed without the archive's root folder. Only the
    small ones the checks read are read (weights and libraries map to b"")."""

    def wanted(name: str) -> bool:
        return name.endswith(".json") or name.startswith(("archive_", "data/sample_inputs/"))

    try:
        with zipfile.ZipFile(path) as z:
            members = {
                name: z.read(entry) if wanted(name) else b""
                for entry in z.namelist()
                if (name := entry.partition("/")[2]) and not entry.endswith("/")
            }
    except (zipfile.BadZipFile, OSError) as exc:
        raise artifact_error(path, what, exc) from None
    if members.get("archive_format", b"").strip() != b"pt2":
        raise artifact_error(path, what, "no `archive_format: pt2` (not a .pt2 archive)")
    if what == PROGRAM and any(n.startswith("data/aotinductor/") for n in members):
        raise artifact_error(path, what, "an AOTInductor package: use `runtime: torch_aoti`")
    if what == PACKAGE and not any(n.startswith("data/aotinductor/") for n in members):
        raise artifact_error(path, what, "no compiled model: use `runtime: torch_export`")
    return members


def check_unpickled(path: Path, members: dict[str, bytes]) -> None:
    """Refuse an exported program that `torch.export.load` would unpickle any of."""
    models = [n for n in members if n.startswith("models/") and n.endswith(".json")]
    if len(models) != 1:
        raise artifact_error(path, PROGRAM, f"{len(models)} programs in the archive, want 1")
    name = models[0].removeprefix("models/").removesuffix(".json")

    def refused(what: str) -> ConfigError:
        return artifact_error(
            path, PROGRAM, f"holds pickled objects, which this server does not load ({what})"
        )

    for kind in ("weights", "constants"):
        # The legacy layout is one torch.save pickle of them all.
        if f"data/{kind}/{name}.pt" in members:
            raise refused(f"legacy {kind}")
        try:
            config = json.loads(members[f"data/{kind}/{name}_{kind}_config.json"])["config"]
            entries = [(fqn, meta, meta.get("path_name")) for fqn, meta in config.items()]
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise artifact_error(path, PROGRAM, f"{kind} config unreadable ({exc!r})") from None
        for fqn, meta, payload in entries:
            # Plain tensors only: raw bytes under weight_N / tensor_N, never a pickle.
            if meta.get("use_pickle") or not str(payload).startswith(("weight_", "tensor_")):
                raise refused(f"{kind} {fqn!r}")
    sample = members.get(f"data/sample_inputs/{name}.pt", b"")
    if sample:
        try:  # what torch tries first; its fallback on failure is a full unpickle
            torch.load(io.BytesIO(sample), weights_only=True)
        except Exception as exc:
            raise refused("sample inputs") from exc


def check_signature(mv: ModelVersion, program: Any) -> None:
    """The program's inputs against the manifest: count, dtype, rank, fixed dimensions,
    and a batch axis that is dynamic up to the manifest's max batch size."""
    m, where = mv.manifest, f"{mv.path}/model.yaml"
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user = [placeholders[n].meta["val"] for n in program.graph_signature.user_inputs]
    if len(user) != len(m.inputs):
        raise ConfigError(f"{where}: the program takes {len(user)} inputs, inputs: {len(m.inputs)}")
    for spec, val in zip(m.inputs, user):
        dtype = torch.from_numpy(np.empty(0, dtype=spec.dtype)).dtype
        dims = list(val.shape)
        if val.dtype != dtype or len(dims) != 1 + len(spec.shape):
            raise ConfigError(
                f"{where}: inputs: {spec.name!r} is {spec.dtype} {spec.shape} per instance, "
                f"the program takes {val.dtype} {dims} (batch axis first)"
            )
        batch = dims[0]
        if not isinstance(batch, torch.SymInt):
            raise ConfigError(
                f"{where}: inputs: {spec.name!r}: the program's batch axis is fixed at "
                f"{batch}; export with dynamic_shapes {{0: torch.export.Dim('batch')}}"
            )
        bound = program.range_constraints.get(batch.node.expr)
        if bound is not None and bool(bound.upper < m.batching.max_batch_size):
            raise ConfigError(
                f"{where}: inputs: {spec.name!r}: the program takes batches of at most "
                f"{bound.upper}, batching.max_batch_size is {m.batching.max_batch_size}"
            )
        for axis, (got, want) in enumerate(zip(dims[1:], spec.shape), start=1):
            if want != -1 and isinstance(got, int) and got != want:
                raise ConfigError(
                    f"{where}: inputs: {spec.name!r}: axis {axis} is {want} in the "
                    f"manifest, {got} in the program"
                )


class TorchExportRuntime(TorchRuntime):
    def _load(self, mv: ModelVersion, opts: RuntimeOptions) -> Callable[..., Any]:
        path = mv.artifact_path
        check_unpickled(path, read_archive(path, PROGRAM))
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch raises a bit of everything on a bad archive
            raise artifact_error(path, PROGRAM, exc) from None
        check_signature(mv, program)
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
        return program.module()  # type: ignore[no-any-return]


class AotiRuntime(TorchRuntime):
    def _load(self, mv: ModelVersion, opts: RuntimeOptions) -> Callable[..., Any]:
        from torch._inductor import aoti_load_package

        path = mv.artifact_path
        members = read_archive(path, PACKAGE)
        # What the package was compiled for, checked before its library is loaded.
        meta: dict[str, str] = {}
        for name, data in members.items():
            if name.startswith("data/aotinductor/") and name.endswith("wrapper_metadata.json"):
                meta = json.loads(data)
        built_for = meta.get("AOTI_DEVICE_KEY", "cpu")
        if built_for == "cpu" and self.device != "cpu":
            if opts.device == "cuda":
                raise ConfigError(f"{path}: device=cuda but the package was compiled for the CPU")
            log.warning("%s: GPU requested but the package was compiled for the CPU", mv.path)
            self.device = "cpu"
        elif built_for != self.device:
            raise ConfigError(f"{path}: compiled for {built_for}, this replica runs on the CPU")
        check_machine(path, meta, built_for)
        try:
            return aoti_load_package(str(path))  # type: ignore[no-any-return]
        except Exception as exc:
            raise artifact_error(path, PACKAGE, exc) from None


def check_machine(path: Path, meta: dict[str, str], device: str) -> None:
    """Refuse a package compiled for another platform, CPU instruction set or GPU
    architecture (its native code would crash the process or fail on every call)."""
    try:  # torch's own description of this machine, as it records it in a package
        from torch._inductor.codecache import get_device_information
    except ImportError:
        return
    here: dict[str, str] = get_device_information(device)
    built = {k: meta[k] for k in here if k in meta}
    isa = "AOTI_CPU_ISA"
    if isa in built:  # a subset will do; AVX512 machines also run AVX2 code
        have = set(here[isa].split()) | ({"AVX2"} if "AVX512" in here[isa].split() else set())
        if set(built[isa].split()) <= have:
            built[isa] = here[isa]
    differs = {k: f"{v} (package) vs {here[k]} (here)" for k, v in built.items() if v != here[k]}
    if differs:
        raise ConfigError(f"{path}: compiled for another machine: {differs}")
