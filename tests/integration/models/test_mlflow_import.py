"""Importing MLflow model versions into the registry, against a real `mlflow server`
(SQLite backend store, local artifact root; tests/conftest.py): the demo fraud model
as ONNX and as a scikit-learn pipeline, a small torch model as a torch.export program,
as TorchScript and pickled (refused). Each import is loaded with load_version, run by
the gateway's runtime and compared with the original model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

from serving.errors import ConfigError
from serving.models.mlflow_source import MlflowUnavailable, import_sources, import_version
from serving.models.registry import load_version
from serving.models.runtimes import RuntimeOptions, load_runtime
from serving.settings import DeploymentFile
from tests.conftest import ROOT, MlflowServer, Touch, free_port
from tests.conftest import run_serving as run_cli


class TinyNet(torch.nn.Module):  # type: ignore[misc]
    """4 features → (label, probabilities over 3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(self.linear(x), dim=-1)
        return p.argmax(dim=-1), p


class Booby(TinyNet):
    """TinyNet carrying an object whose unpickling creates a file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.touch = Touch(path)


@dataclass
class Logged:
    server: MlflowServer
    fraud_x: np.ndarray
    fraud_columns: list[str]
    fraud_features: dict[str, Any]
    sklearn_model: Any
    net: TinyNet
    net_x: np.ndarray
    booby: Path
    onnx_version: str  # of it-fraud-onnx


def _log(log_model: Any, model: Any, name: str, **kw: Any) -> str:
    """Log under a run, register as `name`; the new version's number. Requirements are
    given, not inferred (MLflow would load the model in a subprocess for each)."""
    with mlflow.start_run():
        info = log_model(model, name="model", registered_model_name=name, pip_requirements=[], **kw)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def logged(
    mlflow_server: MlflowServer, registry_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Logged:
    import onnx
    import pandas as pd  # type: ignore[import-untyped]
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    mlflow.set_tracking_uri(mlflow_server.url)
    client = mlflow.MlflowClient()
    v1 = yaml.safe_load((registry_root / "fraud" / "v1" / "model.yaml").read_text())
    columns = v1["inputs"][0]["columns"]
    held = np.load(registry_root / "fraud" / "heldout.npz")
    x, y = held["X"].astype(np.float32), held["y"]
    # Column-based, as a DataFrame with the demo's column names gives.
    frame_sig = infer_signature(pd.DataFrame(x[:5], columns=columns))

    # The demo fraud v1 (scikit-learn → ONNX) as the onnx flavor, manifest keys as tags.
    onnx_version = _log(
        mlflow.onnx.log_model,
        onnx.load(str(registry_root / "fraud" / "v1" / "model.onnx")),
        "it-fraud-onnx",
        signature=frame_sig,
    )
    client.set_model_version_tag(
        "it-fraud-onnx",
        onnx_version,
        "serving.manifest",
        yaml.safe_dump({"features": v1["features"]}),
    )
    client.set_model_version_tag(
        "it-fraud-onnx", onnx_version, "serving.batching.max_batch_size", "64"
    )
    client.set_registered_model_tag("it-fraud-onnx", "serving.description", "fraud: from MLflow")
    client.set_registered_model_alias("it-fraud-onnx", "champion", onnx_version)

    # The same pipeline as the demo's v1, as the sklearn flavor (skops and cloudpickle).
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    pipe.fit(x, y)
    sk = _log(mlflow.sklearn.log_model, pipe, "it-fraud-sk", signature=frame_sig)
    client.set_registered_model_alias("it-fraud-sk", "challenger", sk)
    _log(
        mlflow.sklearn.log_model,
        pipe,
        "it-fraud-sk",
        signature=frame_sig,
        serialization_format="cloudpickle",
    )

    # A small torch model: torch.export (pt2, MLflow's default), TorchScript, pickled.
    net = TinyNet().eval()
    net_x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 4), "x")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype("int64"), (-1,), "label"),
                TensorSpec(np.dtype("float32"), (-1, 3), "probabilities"),
            ]
        ),
    )
    _log(mlflow.pytorch.log_model, net, "it-torch-pt2", signature=sig, input_example=net_x[:3])
    _log(
        mlflow.pytorch.log_model,
        torch.jit.script(net),
        "it-torch-ts",
        signature=sig,
        input_example=net_x[:3],
        serialization_format="pickle",
    )
    booby = tmp_path_factory.mktemp("booby") / "unpickled"
    _log(
        mlflow.pytorch.log_model,
        Booby(booby),
        "it-torch-pickle",
        signature=sig,
        serialization_format="pickle",
    )
    booby.unlink(missing_ok=True)  # MLflow may have loaded it back while logging
    return Logged(mlflow_server, x, columns, v1["features"], pipe, net, net_x, booby, onnx_version)


def predict(root: Path, name: str, version: str, inputs: dict[str, np.ndarray]) -> Any:
    mv = load_version(root / name / version)
    return mv, load_runtime(mv, RuntimeOptions(device="cpu")).predict(inputs)


def test_onnx_by_alias_then_by_number_is_the_same_version(logged: Logged, tmp_path: Path) -> None:
    import onnxruntime as ort

    url = logged.server.url
    said: list[str] = []
    mv = import_version(
        "models:/it-fraud-onnx@champion", tmp_path, "fraud", "v3", tracking_uri=url,
        progress=said.append,
    )  # fmt: skip
    m = mv.manifest
    assert (m.runtime, m.artifact, m.training["flavor"]) == ("onnx", "model.onnx", "onnx")
    assert m.inputs[0].name == "features" and m.inputs[0].columns == logged.fraud_columns
    assert [(o.name, o.dtype, o.shape) for o in m.outputs] == [
        ("label", "int64", []),
        ("probabilities", "float32", [2]),
    ]
    # Manifest keys from tags: the version's batching and features, the model's description.
    assert m.batching.max_batch_size == 64 and m.batching.batch_wait_timeout_s == 0.002
    assert m.features is not None
    assert m.features.model_dump(mode="json", exclude_none=True) == logged.fraud_features
    assert m.description == "fraud: from MLflow"
    assert m.training["source"] == "models:/it-fraud-onnx@champion"
    assert m.training["mlflow_version"] == logged.onnx_version and m.training["mlflow_run_id"]
    assert any("imported" in s for s in said)

    _, out = predict(tmp_path, "fraud", "v3", {"features": logged.fraud_x})
    ref = ort.InferenceSession(str(ROOT / "models" / "fraud" / "v1" / "model.onnx"))
    label, proba = ref.run(["label", "probabilities"], {"features": logged.fraud_x})
    assert np.array_equal(out["label"], label) and np.allclose(out["probabilities"], proba)

    # Again, by alias or by number: nothing to do (the same MLflow version).
    stamp = (mv.path / "model.yaml").stat().st_mtime_ns
    said.clear()
    import_version(
        f"models:/it-fraud-onnx/{logged.onnx_version}", tmp_path, "fraud", "v3",
        tracking_uri=url, progress=said.append,
    )  # fmt: skip
    assert any("nothing to do" in s for s in said)
    assert (mv.path / "model.yaml").stat().st_mtime_ns == stamp
    assert not (tmp_path / ".incoming").exists()  # staging cleaned up


def test_overrides_win_and_a_change_rewrites_only_the_manifest(
    logged: Logged, tmp_path: Path
) -> None:
    url, uri = logged.server.url, "models:/it-fraud-onnx@champion"
    mv = import_version(uri, tmp_path, "fraud", "v3", {"batching": {"max_batch_size": 8}}, url)
    assert mv.manifest.batching.max_batch_size == 8
    artifact = (mv.artifact_path.stat().st_ino, mv.artifact_path.stat().st_mtime_ns)
    said: list[str] = []
    mv = import_version(
        uri, tmp_path, "fraud", "v3", {"warmup": {"iterations": 1}}, url, progress=said.append
    )
    assert any("manifest keys updated" in s for s in said)
    assert mv.manifest.batching.max_batch_size == 64 and mv.manifest.warmup.iterations == 1
    assert (mv.artifact_path.stat().st_ino, mv.artifact_path.stat().st_mtime_ns) == artifact
    with pytest.raises(ConfigError, match=r"overrides.*runtime"):
        import_version(uri, tmp_path, "fraud", "v4", {"runtime": "onnx"}, url)


def test_another_model_at_the_version_is_replaced_only_with_force(
    logged: Logged, tmp_path: Path
) -> None:
    url = logged.server.url
    import_version("models:/it-fraud-onnx@champion", tmp_path, "fraud", "v3", tracking_uri=url)
    with pytest.raises(ConfigError, match="already holds models:/it-fraud-onnx@champion"):
        import_version("models:/it-torch-pt2/1", tmp_path, "fraud", "v3", tracking_uri=url)
    mv = import_version("models:/it-torch-pt2/1", tmp_path, "fraud", "v3", None, url, force=True)
    assert mv.manifest.runtime == "torch_export" and not (tmp_path / ".incoming").exists()


def test_sklearn_needs_allow_pickle_then_matches_the_pipeline(
    logged: Logged, tmp_path: Path
) -> None:
    url = logged.server.url
    with pytest.raises(ConfigError, match="--allow-pickle") as refused:
        import_version("models:/it-fraud-sk@challenger", tmp_path, tracking_uri=url)
    assert "skops" in str(refused.value) and not (tmp_path / "it-fraud-sk").exists()
    x = logged.fraud_x
    for uri in ("models:/it-fraud-sk@challenger", "models:/it-fraud-sk/2"):  # skops, cloudpickle
        mv = import_version(uri, tmp_path, tracking_uri=url, allow_pickle=True)
        m = mv.manifest
        assert (m.name, m.runtime, m.training["flavor"]) == (
            "it-fraud-sk",
            "onnx",
            "sklearn → onnx",
        )
        assert m.training["estimator"] == "LogisticRegression"
        assert m.inputs[0].columns == logged.fraud_columns
        assert [(o.name, o.dtype, o.shape) for o in m.outputs] == [
            ("label", "int64", []),
            ("probabilities", "float32", [2]),
        ]
        _, out = predict(tmp_path, m.name, m.version, {"features": x})
        proba = logged.sklearn_model.predict_proba(x)
        assert float(np.abs(out["probabilities"] - proba).max()) < 1e-4
        assert np.array_equal(out["label"], logged.sklearn_model.predict(x))
    assert sorted(p.name for p in (tmp_path / "it-fraud-sk").iterdir()) == ["m1", "m2"]


@pytest.mark.parametrize(("name", "runtime"), [("it-torch-pt2", "torch_export"),
                                               ("it-torch-ts", "torchscript")])  # fmt: skip
def test_pytorch_programs_and_torchscript_serve_as_logged(
    logged: Logged, tmp_path: Path, name: str, runtime: str
) -> None:
    mv = import_version(f"models:/{name}/1", tmp_path, tracking_uri=logged.server.url)
    assert mv.manifest.runtime == runtime and mv.manifest.version == "m1"
    assert [(s.name, s.shape) for s in mv.manifest.inputs] == [("x", [4])]
    _, out = predict(tmp_path, name, "m1", {"x": logged.net_x})
    with torch.inference_mode():
        label, proba = logged.net(torch.from_numpy(logged.net_x))
    assert np.array_equal(out["label"], label.numpy())
    assert np.allclose(out["probabilities"], proba.numpy(), atol=1e-6)


def test_a_pickled_torch_module_is_refused_unopened(logged: Logged, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pickled module") as refused:
        import_version("models:/it-torch-pickle/1", tmp_path, tracking_uri=logged.server.url)
    assert "serialization_format='pt2'" in str(refused.value)
    assert not logged.booby.exists(), "the import unpickled the model"
    assert not (tmp_path / "it-torch-pickle").exists()


def _onnx_model_folder(folder: Path, location: str | None) -> None:
    """An MLflow onnx-flavor folder (as log_model writes it) holding `y = x + w`, with
    `w` kept in an external-data file at `location` (None: inside the graph)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True)
    if location is None:
        onnx.save_model(model, str(folder / "model.onnx"))
    else:
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        (folder / location).write_bytes(np.arange(4, dtype=np.float32).tobytes())
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": {"onnx": {"data": "model.onnx"}}}))


def test_onnx_external_data_is_copied_only_from_inside_the_folder(tmp_path: Path) -> None:
    from serving.models.mlflow_flavors import check_runs, materialize
    from serving.models.registry import Manifest, write_manifest

    _onnx_model_folder(tmp_path / "inside", "weights/w.bin")
    dest = tmp_path / "reg" / "m" / "v1"
    dest.mkdir(parents=True)
    made = materialize(tmp_path / "inside", dest, allow_pickle=False, where="inside")
    assert (dest / "weights" / "w.bin").is_file()
    write_manifest(
        dest,
        Manifest(
            name="m", version="v1", runtime="onnx", artifact=made.artifact,
            inputs=made.inputs, outputs=made.outputs,
        ),
    )  # fmt: skip
    check_runs(load_version(dest), "inside")
    x = np.ones((3, 4), dtype=np.float32)
    assert np.array_equal(predict(tmp_path / "reg", "m", "v1", {"x": x})[1]["y"], x + np.arange(4))

    _onnx_model_folder(tmp_path / "escape", "../secret.bin")  # the file exists, outside
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match="outside the model's folder: refused"):
        materialize(tmp_path / "escape", out, allow_pickle=False, where="escape")


def test_unknown_models_and_aliases_are_named(logged: Logged, tmp_path: Path) -> None:
    url = logged.server.url
    with pytest.raises(ConfigError, match=r"it-nope.*not found"):
        import_version("models:/it-nope/1", tmp_path, tracking_uri=url)
    with pytest.raises(ConfigError, match=r"@nobody.*not found"):
        import_version("models:/it-fraud-onnx@nobody", tmp_path, tracking_uri=url)


def test_a_down_tracking_server_fails_within_seconds(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(MlflowUnavailable, match="did not answer"):
        import_version("models:/fraud/1", tmp_path, tracking_uri=down)
    assert time.monotonic() - t0 < 5


def test_the_deployment_files_sources(logged: Logged, tmp_path: Path) -> None:
    """What `serving up` runs before it builds the Serve config."""
    dep = DeploymentFile.model_validate(
        {
            "registry": str(tmp_path),
            "models": {
                "fraud": {
                    "default": "v3",
                    "versions": {
                        "v3": {
                            "source": "models:/it-fraud-onnx@champion",
                            "manifest": {"batching": {"batch_wait_timeout_s": 0.01}},
                        },
                        "v4": {"source": "models:/it-fraud-sk@challenger", "allow_pickle": True},
                    },
                }
            },
        }
    )
    said: list[str] = []
    import_sources(dep, logged.server.url, said.append)
    assert said[0] == "importing models:/it-fraud-onnx@champion as fraud/v3 ..."
    v3 = load_version(tmp_path / "fraud" / "v3").manifest
    assert (v3.batching.max_batch_size, v3.batching.batch_wait_timeout_s) == (64, 0.01)
    assert load_version(tmp_path / "fraud" / "v4").manifest.training["flavor"] == "sklearn → onnx"


def test_an_outage_at_restart_serves_what_was_imported(logged: Logged, tmp_path: Path) -> None:
    def dep(*versions: str) -> DeploymentFile:
        source = {"source": "models:/it-fraud-onnx@champion"}
        return DeploymentFile.model_validate(
            {
                "registry": str(tmp_path),
                "models": {"fraud": {"default": "v3", "versions": dict.fromkeys(versions, source)}},
            }
        )

    import_sources(dep("v3"), logged.server.url)
    said: list[str] = []
    down = f"http://127.0.0.1:{free_port()}"
    import_sources(dep("v3"), down, said.append)
    assert any("did not answer" in s and "as imported before" in s for s in said)
    with pytest.raises(MlflowUnavailable):  # never imported: nothing to serve
        import_sources(dep("v3", "v5"), down)


def test_a_version_name_never_follows_a_moved_alias(logged: Logged, tmp_path: Path) -> None:
    client, url = mlflow.MlflowClient(logged.server.url), logged.server.url
    client.set_registered_model_alias("it-fraud-sk", "moving", "1")
    import_version(
        "models:/it-fraud-sk@moving", tmp_path, "fraud", "v5", None, url, allow_pickle=True
    )
    client.set_registered_model_alias("it-fraud-sk", "moving", "2")
    with pytest.raises(ConfigError, match=r"version 1\).*an alias that moved needs a new one"):
        import_version("models:/it-fraud-sk@moving", tmp_path, "fraud", "v5", None, url)
    assert load_version(tmp_path / "fraud" / "v5").manifest.training["mlflow_version"] == "1"


def test_the_cli_imports_and_says_what(logged: Logged, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("batching: {max_batch_size: 4}\n")
    out = run_cli(
        "models", "import", "models:/it-fraud-onnx@champion", "--as", "fraud/v7",
        "--registry", str(tmp_path), "--tracking-uri", logged.server.url,
        "--manifest", str(keys),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fraud/v7: flavor onnx, runtime onnx, artifact model.onnx" in out.stdout
    assert "input features: float32 [11] columns amount, hour" in out.stdout
    assert "output probabilities: float32 [2]" in out.stdout
    assert f"path {tmp_path / 'fraud' / 'v7'}" in out.stdout
    assert load_version(tmp_path / "fraud" / "v7").manifest.batching.max_batch_size == 4
    # The tracking server from the settings; the name from MLflow, the version m<number>.
    out = run_cli(
        "models", "import", "models:/it-torch-ts/1", "--registry", str(tmp_path),
        env={"SERVING_MLFLOW_TRACKING_URI": logged.server.url},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "it-torch-ts/m1: flavor pytorch (TorchScript), runtime torchscript" in out.stdout
    out = run_cli(
        "models", "import", "models:/it-fraud-sk/1", "--registry", str(tmp_path),
        "--tracking-uri", logged.server.url,
    )  # fmt: skip
    assert out.returncode == 1 and "--allow-pickle" in out.stderr
    t0 = time.monotonic()
    out = run_cli(
        "models", "import", "models:/it-fraud-onnx/1", "--as", "fraud/v8",
        "--registry", str(tmp_path), "--tracking-uri", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert out.returncode == 1 and "did not answer" in out.stderr
    assert time.monotonic() - t0 < 20  # most of it is the interpreter's start-up


def test_config_render_imports_the_sources_first(logged: Logged, tmp_path: Path) -> None:
    dep = tmp_path / "dep.yaml"
    dep.write_text(
        yaml.safe_dump(
            {
                "registry": str(tmp_path / "registry"),
                "models": {
                    "fraud": {
                        "default": "v3",
                        "versions": {"v3": {"source": "models:/it-fraud-onnx@champion"}},
                    }
                },
            }
        )
    )
    out = run_cli(
        "config", "render", "-c", str(dep), env={"SERVING_MLFLOW_TRACKING_URI": logged.server.url}
    )
    assert out.returncode == 0, out.stderr
    assert "importing models:/it-fraud-onnx@champion as fraud/v3" in out.stderr
    doc = yaml.safe_load(out.stdout)
    assert "model-fraud-v3" in {a["name"] for a in doc["applications"]}
