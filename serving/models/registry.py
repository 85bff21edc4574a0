"""Model registry on disk: `<root>/<name>/<version>/model.yaml` plus the artifact.

The manifest is the single source of truth for a version's inputs, outputs, runtime,
batching defaults, resources and the held-out metrics recorded at training time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.errors import ConfigError
from serving.features.spec import FeatureConfig
from serving.observability.drift import DriftReference
from serving.settings import WarmupConfig, read_yaml, validate_file

MANIFEST = "model.yaml"
# Tensors keyed by the manifest's names, batch axis first: what runtimes take and give.
Arrays = dict[str, np.ndarray]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# Numeric and boolean dtypes a tensor may have, by numpy name.
DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
DType = Literal[
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
]


class TensorSpec(BaseModel):
    """One named tensor, shape given per instance (the batch axis is implicit)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: DType
    shape: list[int] = Field(default_factory=list, description="-1 marks a variable axis")
    # For a 1-D input, the names of its elements: an instance may then give them as
    # an object of named fields instead of a list.
    columns: list[str] | None = None
    allow_nan: bool = False

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in shape):
            raise ValueError("dimensions must be positive or -1")
        return shape

    @model_validator(mode="after")
    def _columns_match(self) -> TensorSpec:
        if self.columns is not None and self.shape != [len(self.columns)]:
            raise ValueError(f"columns need shape [{len(self.columns)}], got {self.shape}")
        return self


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0, le=10)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    runtime: Literal["onnx", "torchscript", "torch_export", "torch_aoti"]
    artifact: str
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    batching: Batching = Batching()
    resources: Resources = Resources()
    warmup: WarmupConfig = WarmupConfig()
    # Online features: when set, instances carry entity keys and request fields, and the
    # gateway builds the input named `features.input` from them and the feature store.
    features: FeatureConfig | None = None
    # Training-time histograms of inputs and predictions, for drift (PSI) monitoring.
    drift: DriftReference | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, str | int | float] = Field(default_factory=dict)

    @field_validator("name", "version")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 63)")
        return v

    @field_validator("artifact")
    @classmethod
    def _artifact_inside(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError("must be a path inside the version's folder")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Manifest:
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique")
        return self

    @model_validator(mode="after")
    def _features_fill_one_input(self) -> Manifest:
        if self.features is None:
            return self
        if len(self.inputs) != 1 or self.inputs[0].name != self.features.input:
            raise ValueError("features.input must name the model's only input")
        columns = self.inputs[0].columns
        if columns is None:
            raise ValueError("features.input needs `columns` naming each element")
        self.features.resolve_columns(columns)
        return self


class ModelVersion(BaseModel):
    """A manifest together with the folder it was read from."""

    manifest: Manifest
    path: Path

    @property
    def artifact_path(self) -> Path:
        return self.path / self.manifest.artifact


def load_version(folder: Path) -> ModelVersion:
    """Load and validate `folder/model.yaml`; errors name the file and the field."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{mf}: manifest not found")
    manifest: Manifest = validate_file(mf, Manifest, read_yaml(mf))
    if manifest.name != folder.parent.name or manifest.version != folder.name:
        raise ConfigError(
            f"{mf}: name/version ({manifest.name}/{manifest.version}) must match the "
            f"folder ({folder.parent.name}/{folder.name})"
        )
    artifact = (folder / manifest.artifact).resolve()
    if not artifact.is_relative_to(folder.resolve()):
        raise ConfigError(f"{mf}: artifact: resolves outside the version folder")
    if not artifact.is_file():
        raise ConfigError(f"{mf}: artifact: file {artifact} not found")
    return ModelVersion(manifest=manifest, path=folder.resolve())


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write a manifest (used by the training scripts), validated on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    data = manifest.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Registry:
    """Read-only view of a registry folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str, version: str) -> ModelVersion:
        if not _NAME.match(name) or not _NAME.match(version):
            raise ConfigError(f"invalid model name or version: {name!r}/{version!r}")
        folder = self.root / name / version
        if not folder.is_dir():
            raise ConfigError(f"{folder}: model version not found in registry {self.root}")
        return load_version(folder)

    def list(self) -> dict[str, list[str]]:
        """Model names to their versions (folders holding a manifest)."""
        out: dict[str, list[str]] = {}
        if not self.root.is_dir():
            return out
        for mf in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            out.setdefault(mf.parent.parent.name, []).append(mf.parent.name)
        return out
