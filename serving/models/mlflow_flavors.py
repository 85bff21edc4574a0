"""An MLflow model folder (what `log_model` wrote: the `MLmodel` file and each flavor's
files) turned into what the gateway serves: one artifact, its runtime, and the inputs
and outputs its manifest declares. serving.models.mlflow_source fetches the folder and
writes the registry entry; this module only reads the folder and fills `dest`.

Flavors, in order of preference when a model has several:
- `onnx`: the `.onnx` file is copied (with the external-data files it names, which must
  lie inside the model's folder): runtime `onnx`.
- `pytorch`: a torch.export program (`data/model.pt2`, MLflow's default format outside
  Databricks, serialization_format="pt2") → runtime `torch_export`, checked to hold no
  pickled member; a TorchScript archive (a scripted module, which MLflow writes with
  torch.jit.save) → `torchscript`. A pickled module (torch.save of the Python object)
  is refused: loading it would run code from the artifact.
- `sklearn`: converted to ONNX with skl2onnx as the demo models are (zipmap off, so a
  classifier answers `label` and `probabilities`), and the converted graph checked
  against the estimator. Converting needs the estimator in memory, i.e. unpickling it
  (pickle, cloudpickle, or skops trusting what the file names), so only when the caller
  trusts the registry (`allow_pickle`).

Inputs and outputs come from the MLflow signature (serving.models.mlflow_meta); for an
ONNX artifact the graph names the tensors and fixes their dtypes. `check_runs` then
loads the result with its runtime and runs it once.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from serving.errors import ConfigError
from serving.models.mlflow_meta import reconcile, signature_entries, signature_specs
from serving.models.registry import ModelVersion, TensorSpec

MLMODEL = "MLmodel"
ONNX_ARTIFACT = "model.onnx"
# The sklearn conversion's opsets and tolerance, as for the demo models
# (serving.demo.train_fraud).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
TOLERANCE = 1e-4
# ONNX Runtime's type names → numpy dtype names (TensorSpec.dtype).
ORT_DTYPES = {
    "tensor(bool)": "bool",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}

PICKLED_TORCH = (
    "{where}: the pytorch flavor holds a pickled module (torch.save of the Python object, "
    "serialization_format='pickle'); loading it would run code from the artifact, so the "
    "gateway never does. Log a torch.export program instead: mlflow.pytorch.log_model(model, "
    "name=..., input_example=<a batch of 2 or more rows>, serialization_format='pt2') "
    "(MLflow's default outside Databricks), or log torch.jit.script(model) (TorchScript)"
)
SKLEARN_NEEDS_PICKLE = (
    "{where}: a scikit-learn model is served after converting it to ONNX, which needs the "
    "estimator in memory: loading it ({fmt}) can run code from the artifact. Pass "
    "--allow-pickle (`allow_pickle: true` in the deployment file) if you trust this "
    "registry, or log the model as ONNX (skl2onnx.to_onnx, then mlflow.onnx.log_model), "
    "which imports without it"
)


@dataclass(frozen=True)
class Materialized:
    """What `materialize` put in `dest`, and how to describe it in the manifest."""

    flavor: str  # e.g. "onnx", "pytorch (torch.export)", "sklearn → onnx"
    runtime: Literal["onnx", "torchscript", "torch_export"]
    artifact: str  # file name inside `dest`
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    notes: dict[str, str] = field(default_factory=dict)  # for the manifest's `training`


def read_mlmodel(folder: Path, where: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load((folder / MLMODEL).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: no readable MLmodel file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise ConfigError(f"{where}: the MLmodel file names no flavors")
    return doc


def materialize(folder: Path, dest: Path, *, allow_pickle: bool, where: str) -> Materialized:
    """Put the artifact of the MLflow model in `folder` into `dest`; see the module."""
    mlmodel = read_mlmodel(folder, where)
    flavors: dict[str, Any] = mlmodel["flavors"]
    sig_in = signature_specs(signature_entries(mlmodel, "inputs"), "inputs")
    sig_out = signature_specs(signature_entries(mlmodel, "outputs"), "outputs")
    if "onnx" in flavors:
        src = _inside(folder, flavors["onnx"].get("data") or ONNX_ARTIFACT, where)
        _copy_onnx(src, dest, where)
        graph_in, graph_out = graph_specs(dest / ONNX_ARTIFACT, where)
        return Materialized(
            "onnx",
            "onnx",
            ONNX_ARTIFACT,
            reconcile(sig_in, graph_in, "inputs", where),
            reconcile(sig_out, graph_out, "outputs", where),
        )
    if "pytorch" in flavors:
        return _pytorch(folder, dest, flavors["pytorch"], sig_in, sig_out, where)
    if "sklearn" in flavors:
        return _sklearn(folder, dest, flavors["sklearn"], sig_in, allow_pickle, where)
    raise ConfigError(
        f"{where}: flavors {', '.join(sorted(flavors))}: none the gateway serves (onnx, "
        "pytorch as a torch.export program or TorchScript, sklearn via ONNX)"
    )


def _inside(folder: Path, rel: str, where: str) -> Path:
    """A file the MLmodel file names, which must lie inside the model's folder."""
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ConfigError(f"{where}: the MLmodel file names {rel!r}, outside the model's folder")
    if not path.exists():
        raise ConfigError(f"{where}: {rel!r}, named in the MLmodel file, is missing")
    return path


# ---- ONNX -------------------------------------------------------------------------------
def _copy_onnx(src: Path, dest: Path, where: str) -> None:
    shutil.copyfile(src, dest / ONNX_ARTIFACT)
    for rel in _external_data(src, where):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / rel, dest / rel)


def _external_data(src: Path, where: str) -> list[str]:
    """The external-data files an ONNX model names (large models keep weights beside
    the graph), each of which must lie inside the model's folder. Without the `onnx`
    package none are copied: ONNX Runtime checks the paths itself when it loads the
    model, and a file left behind makes the import's check fail, naming it."""
    try:
        import onnx
        from onnx import external_data_helper as ext
    except ImportError:
        return []
    model = onnx.load(str(src), load_external_data=False)
    found = set()
    for tensor in ext._get_all_tensors(model):
        if not ext.uses_external_data(tensor):
            continue
        loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
        path = (src.parent / loc).resolve()
        if not loc or Path(loc).is_absolute() or not path.is_relative_to(src.parent.resolve()):
            raise ConfigError(
                f"{where}: {src.name}: tensor {tensor.name!r} keeps its data at {loc!r}, "
                "outside the model's folder: refused"
            )
        if not path.is_file():
            raise ConfigError(f"{where}: {src.name}: external data file {loc!r} is missing")
        found.add(loc)
    return sorted(found)


def _onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise ConfigError(
            "an ONNX model needs ONNX Runtime, which is not installed: "
            "pip install 'serving[cpu]' (or 'serving[gpu]')"
        ) from None


def graph_specs(path: Path, where: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An ONNX graph's inputs and outputs, per instance (batch axis removed)."""
    ort = _onnxruntime()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConfigError(f"{where}: ONNX Runtime cannot load the model: {_first(exc)}") from None

    def spec(arg: Any, kind: str) -> TensorSpec:
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            hint = " (a ZipMap? convert with zipmap disabled)" if "map" in arg.type else ""
            raise ConfigError(f"{where}: graph {kind} {arg.name!r} is {arg.type}{hint}")
        shape = list(arg.shape or [])
        if not shape or (isinstance(shape[0], int) and shape[0] > 0):
            raise ConfigError(
                f"{where}: graph {kind} {arg.name!r} has shape {shape}: its first axis must "
                "be the batch, left open (None or a symbolic name)"
            )
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]
        return TensorSpec(name=arg.name, dtype=dtype, shape=dims)  # type: ignore[arg-type]

    return (
        [spec(a, "input") for a in session.get_inputs()],
        [spec(a, "output") for a in session.get_outputs()],
    )


# ---- PyTorch ----------------------------------------------------------------------------
def _pytorch(
    folder: Path,
    dest: Path,
    conf: dict[str, Any],
    sig_in: list[TensorSpec] | None,
    sig_out: list[TensorSpec] | None,
    where: str,
) -> Materialized:
    data = _inside(folder, conf.get("model_data") or "data", where)
    pt2, pth = (data / "model.pt2", data / "model.pth") if data.is_dir() else (data, data)
    if pt2.is_file() and pt2.suffix == ".pt2":
        from serving.models.runtimes.torch_export import PROGRAM, check_unpickled, read_archive

        check_unpickled(pt2, read_archive(pt2, PROGRAM))  # names a pickled member, if any
        flavor, runtime, artifact = "pytorch (torch.export)", "torch_export", "model.pt2"
        shutil.copyfile(pt2, dest / artifact)
    elif pth.is_file() and is_torchscript(pth):
        flavor, runtime, artifact = "pytorch (TorchScript)", "torchscript", "model.pt"
        shutil.copyfile(pth, dest / artifact)
    elif pth.is_file():
        raise ConfigError(PICKLED_TORCH.format(where=where))
    else:
        raise ConfigError(f"{where}: the pytorch flavor's data holds no model.pt2 or model.pth")
    if sig_in is None or sig_out is None:
        raise ConfigError(
            f"{where}: a PyTorch model needs a signature (inputs and outputs) to be served: "
            "log it with an input_example or signature="
        )
    return Materialized(flavor, runtime, artifact, sig_in, sig_out)  # type: ignore[arg-type]


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (torch.jit.save) carries its code and constants; a pickled
    module (torch.save) neither, and the old torch.save format is no zip at all."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.partition("/")[2] for n in z.namelist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return "constants.pkl" in names and any(n.startswith("code/") for n in names)


# ---- scikit-learn -----------------------------------------------------------------------
def _sklearn(
    folder: Path,
    dest: Path,
    conf: dict[str, Any],
    sig_in: list[TensorSpec] | None,
    allow_pickle: bool,
    where: str,
) -> Materialized:
    fmt = str(conf.get("serialization_format") or "cloudpickle")
    if not allow_pickle:
        raise ConfigError(SKLEARN_NEEDS_PICKLE.format(where=where, fmt=fmt))
    try:
        skl2onnx = importlib.import_module("skl2onnx")
        data_types = importlib.import_module("skl2onnx.common.data_types")
        sklearn_base = importlib.import_module("sklearn.base")
    except ImportError:
        raise ConfigError(
            "converting a scikit-learn model needs scikit-learn, skl2onnx and onnx: "
            "pip install 'serving[train]'"
        ) from None
    model = _load_estimator(_inside(folder, conf.get("pickled_model") or "model.pkl", where), fmt)
    n, name = _features_in(sig_in, model, where)
    classifier = bool(sklearn_base.is_classifier(model))
    try:
        onx = skl2onnx.to_onnx(
            model,
            initial_types=[(name, data_types.FloatTensorType([None, n]))],
            options={id(model): {"zipmap": False}} if classifier else None,
            target_opset=TARGET_OPSET,
        )
    except Exception as exc:
        raise ConfigError(f"{where}: skl2onnx cannot convert it: {_first(exc)}") from None
    artifact = dest / ONNX_ARTIFACT
    artifact.write_bytes(onx.SerializeToString())
    graph_in, graph_out = graph_specs(artifact, where)
    _check_conversion(artifact, model, name, _sample(folder, n), classifier, where)
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    return Materialized(
        "sklearn → onnx",
        "onnx",
        ONNX_ARTIFACT,
        reconcile(sig_in, graph_in, "inputs", where),
        graph_out,
        {"estimator": type(final).__name__, "converter": f"skl2onnx {skl2onnx.__version__}"},
    )


def _load_estimator(path: Path, fmt: str) -> Any:
    """Unpickle the estimator (the caller trusts the registry: see SKLEARN_NEEDS_PICKLE)."""
    try:
        if fmt == "skops":
            sio = importlib.import_module("skops.io")
            return sio.load(path, trusted=sio.get_untrusted_types(file=path))
        loader = importlib.import_module("cloudpickle") if fmt == "cloudpickle" else pickle
    except ImportError as exc:
        package = (exc.name or fmt).partition(".")[0]
        raise ConfigError(f"loading a {fmt} model needs {package}: pip install {package}") from None
    with path.open("rb") as f:
        return loader.load(f)


def _features_in(sig: list[TensorSpec] | None, model: Any, where: str) -> tuple[int, str]:
    """How many features the converted graph takes, and its input's name."""
    if sig is not None:
        if len(sig) != 1 or len(sig[0].shape) != 1 or sig[0].shape[0] == -1:
            shapes = ", ".join(f"{s.name} {s.shape}" for s in sig)
            raise ConfigError(
                f"{where}: converting needs one input of n features (a [-1, n] tensor or n "
                f"named columns); the signature has {shapes}"
            )
        return sig[0].shape[0], sig[0].name
    n = getattr(model, "n_features_in_", None)
    if not isinstance(n, int):
        raise ConfigError(f"{where}: no signature and no n_features_in_: how many features?")
    return n, "features"


def _sample(folder: Path, n: int) -> np.ndarray:
    """Rows to compare sklearn and ONNX on: the logged input example (when there is one
    of n numeric columns), and seeded random rows around it."""
    base = np.zeros((1, n), dtype=np.float32)
    try:
        from mlflow.models import Model

        example = Model.load(str(folder)).load_input_example(str(folder))
        rows = np.asarray(example, dtype=np.float32).reshape(-1, n)
        if len(rows):
            base = rows
    except Exception:  # no example, or not numeric: random rows only
        pass
    rng = np.random.default_rng(0)
    scale = np.maximum(np.abs(base).max(axis=0), 1.0)
    noise = rng.normal(size=(64, n)).astype(np.float32) * scale
    return np.concatenate([base, base[np.arange(64) % len(base)] + noise]).astype(np.float32)


def _check_conversion(
    artifact: Path, model: Any, name: str, x: np.ndarray, classifier: bool, where: str
) -> None:
    """The converted graph must answer as the estimator does: probabilities within
    TOLERANCE, labels equal wherever the top two classes are more than that apart."""
    session = _onnxruntime().InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {name: x})))
    with warnings.catch_warnings():  # e.g. "X does not have valid feature names"
        warnings.simplefilter("ignore")
        predicted = np.asarray(model.predict(x))
        proba = np.asarray(model.predict_proba(x)) if classifier else None
    if proba is not None:
        mine = got.get("probabilities")
        if mine is None or mine.shape != proba.shape:
            raise ConfigError(f"{where}: the converted graph has no probabilities like sklearn's")
        gap = float(np.abs(mine - proba).max())
        top = np.sort(proba, axis=1)
        clear = (top[:, -1] - top[:, -2]) > TOLERANCE if proba.shape[1] > 1 else np.ones(len(x))
        labels = got.get("label")
        if (
            gap > TOLERANCE
            or labels is None
            or not np.array_equal(
                labels.ravel()[clear.astype(bool)], predicted.ravel()[clear.astype(bool)]
            )
        ):
            raise ConfigError(
                f"{where}: the converted graph differs from the sklearn model "
                f"(probabilities by up to {gap:.2e})"
            )
        return
    out = np.asarray(got[names[0]], dtype=np.float64).reshape(predicted.shape)
    if not np.allclose(out, predicted, rtol=1e-3, atol=TOLERANCE):
        gap = float(np.abs(out - predicted).max())
        raise ConfigError(f"{where}: the converted graph differs from sklearn by up to {gap:.2e}")


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def check_runs(mv: ModelVersion, where: str) -> None:
    """Load the version with its runtime (on the CPU) and run a batch of two
    instances of zeros: the outputs must be the declared ones, with a batch axis."""
    from serving.models.runtimes import RuntimeOptions, load_runtime

    m = mv.manifest
    batch = {
        s.name: np.zeros([2, *(d if d > 0 else 1 for d in s.shape)], dtype=s.dtype)
        for s in m.inputs
    }
    try:
        out = load_runtime(mv, RuntimeOptions(device="cpu")).predict(batch)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            f"{where}: the imported model fails on a batch of zeros: {type(exc).__name__}: {exc}"
        ) from None
    for s in m.outputs:
        got = out.get(s.name)
        shape = list(got.shape) if got is not None else None
        if (
            shape is None
            or shape[0] != 2
            or len(shape) != 1 + len(s.shape)
            or any(want not in (-1, dim) for want, dim in zip(s.shape, shape[1:]))
        ):
            raise ConfigError(
                f"{where}: output {s.name!r} is {s.shape} per instance in the manifest; "
                f"a batch of 2 gave {shape}"
            )
