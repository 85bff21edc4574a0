"""MLflow as a registry source, the parts that need no server: URIs, signatures as
TensorSpecs (in the JSON form the MLmodel file stores, and as MLflow itself writes it),
how a signature pairs with an ONNX graph, and where manifest keys come from."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serving.errors import ConfigError
from serving.models.mlflow_meta import (
    manifest_keys,
    merge,
    reconcile,
    signature_specs,
    tag_keys,
)
from serving.models.mlflow_source import import_sources, is_mlflow_uri, parse_uri
from serving.models.registry import TensorSpec
from serving.settings import DeploymentFile, VersionConfig


# ---- URIs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("models:/fraud/3", ("fraud", "3", None)),
        ("models:/fraud@champion", ("fraud", None, "champion")),
        ("models:/fraud-detector_2@challenger-b", ("fraud-detector_2", None, "challenger-b")),
        (" models:/fraud/12 ", ("fraud", "12", None)),
    ],
)
def test_uris_name_a_version_or_an_alias(uri: str, want: tuple[str, Any, Any]) -> None:
    assert parse_uri(uri) == want


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("fraud/3", "models:/NAME/VERSION"),
        ("models:/fraud", "models:/NAME/VERSION"),
        ("models:/fraud/3/model", "models:/NAME/VERSION"),
        ("models:/fraud/Production", "stages"),
        ("models:/fraud/latest", "stages"),
        ("models:/fraud@cham pion", "alias"),
        ("models:/@champion", "models:/NAME/VERSION"),
        ("runs:/abc/model", "models:/NAME/VERSION"),
    ],
)
def test_other_uris_are_refused_saying_what_to_write(uri: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_uri(uri)


@pytest.mark.parametrize(
    "uri",
    ["models:/fraud/3", "models:/fraud@champion", "models:/a_b-c/10", "models:/fraud/latest",
     "models:/fraud", "models:/fraud@a/b", "models:/fraud@x y", "s3://bucket/model"],
)  # fmt: skip
def test_the_deployment_file_accepts_what_the_importer_does(uri: str) -> None:
    """The deployment file checks `source` with a pattern of its own (settings cannot
    import the importer): both must accept the same URIs."""
    try:
        parse_uri(uri)
        parsed = True
    except ConfigError:
        parsed = False
    try:
        VersionConfig(source=uri)
        accepted = True
    except ValidationError:
        accepted = False
    assert parsed == accepted


def test_is_mlflow_uri() -> None:
    assert is_mlflow_uri("models:/fraud@champion")
    assert not is_mlflow_uri("v3") and not is_mlflow_uri(None) and not is_mlflow_uri(3)


# ---- signatures -------------------------------------------------------------------------
def tensor(dtype: str, shape: list[int], name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}}
    if name is not None:
        entry["name"] = name
    return entry


def test_tensors_lose_their_batch_axis() -> None:
    specs = signature_specs([tensor("float32", [-1, 8, 8], "image")], "inputs")
    assert specs == [TensorSpec(name="image", dtype="float32", shape=[8, 8])]
    specs = signature_specs([tensor("int64", [-1])], "outputs")
    assert specs == [TensorSpec(name="output", dtype="int64", shape=[])]


def test_unnamed_tensors_are_numbered_and_inner_variable_axes_kept() -> None:
    specs = signature_specs([tensor("float32", [-1, -1, 4]), tensor("int32", [-1, 2])], "inputs")
    assert specs is not None
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("input_0", "float32", [-1, 4]),
        ("input_1", "int32", [2]),
    ]


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        ([tensor("float32", [1, 4])], "first axis is the batch"),
        ([tensor("float32", [])], "first axis is the batch"),
        ([tensor("object", [-1])], "object"),
        ([tensor("float32", [-1, 0])], "positive"),
        ([tensor("float32", [-1]), {"type": "double", "name": "a"}], "mixes"),
        ([{"type": "string", "name": "country"}], "country"),
        ([{"type": "double"}], "no name"),
    ],
)
def test_signatures_that_cannot_be_served_are_refused(
    entries: list[dict[str, Any]], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        signature_specs(entries, "inputs")


def test_columns_become_one_float_vector_naming_them() -> None:
    entries: list[dict[str, Any]] = [
        {"type": "double", "name": "amount", "required": True},
        {"type": "long", "name": "hour"},
        {"type": "boolean", "name": "is_foreign"},
        {"type": "float", "name": "user_stats.txn_count_30d"},
    ]
    spec = TensorSpec(
        name="features",
        dtype="float32",
        shape=[4],
        columns=["amount", "hour", "is_foreign", "user_stats.txn_count_30d"],
    )
    assert signature_specs(entries, "inputs") == [spec]
    assert signature_specs(None, "inputs") is None


def test_the_json_form_is_what_mlflow_writes() -> None:
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    models = pytest.importorskip("mlflow.models")
    types = pytest.importorskip("mlflow.types")
    frame = pd.DataFrame({"amount": [1.5], "hour": [3.0]})
    sig = models.infer_signature(frame, np.array([1]))
    d = sig.to_dict()
    assert signature_specs(json.loads(d["inputs"]), "inputs") == [
        TensorSpec(name="features", dtype="float32", shape=[2], columns=["amount", "hour"])
    ]
    assert signature_specs(json.loads(d["outputs"]), "outputs") == [
        TensorSpec(name="output", dtype="int64", shape=[])
    ]
    sig = models.ModelSignature(
        inputs=types.Schema([types.TensorSpec(np.dtype("float32"), (-1, 8, 8), "image")])
    )
    assert signature_specs(json.loads(sig.to_dict()["inputs"]), "inputs") == [
        TensorSpec(name="image", dtype="float32", shape=[8, 8])
    ]


# ---- a signature with an ONNX graph -----------------------------------------------------
GRAPH_IN = [TensorSpec(name="features", dtype="float32", shape=[-1])]
GRAPH_OUT = [
    TensorSpec(name="label", dtype="int64", shape=[]),
    TensorSpec(name="probabilities", dtype="float32", shape=[2]),
]


def test_the_graph_names_and_types_the_signature_adds_columns() -> None:
    sig = signature_specs([{"type": "double", "name": c} for c in "abc"], "inputs")
    assert reconcile(sig, GRAPH_IN, "inputs", "m") == [
        TensorSpec(name="features", dtype="float32", shape=[3], columns=["a", "b", "c"])
    ]
    assert reconcile(None, GRAPH_IN, "inputs", "m") == GRAPH_IN
    with pytest.raises(ConfigError, match="one graph input of shape"):
        reconcile(sig, [TensorSpec(name="x", dtype="float32", shape=[4])], "inputs", "m")


def test_tensors_pair_by_name_else_by_position() -> None:
    graph = [
        TensorSpec(name="a", dtype="float32", shape=[-1, 3]),
        TensorSpec(name="b", dtype="int64", shape=[2]),
    ]
    named = [
        TensorSpec(name="b", dtype="int32", shape=[-1]),
        TensorSpec(name="a", dtype="float64", shape=[5, 3]),
    ]
    assert reconcile(named, graph, "inputs", "m") == [
        TensorSpec(name="b", dtype="int64", shape=[2]),
        TensorSpec(name="a", dtype="float32", shape=[5, 3]),
    ]
    unnamed = signature_specs([tensor("float64", [-1, 4, 3]), tensor("int64", [-1, 2])], "inputs")
    assert [s.name for s in reconcile(unnamed, graph, "inputs", "m")] == ["a", "b"]
    with pytest.raises(ConfigError, match="'a' is \\[4\\] per instance"):
        reconcile([named[1].model_copy(update={"shape": [4]})], graph[:1], "inputs", "m")
    with pytest.raises(ConfigError, match="declares 1 inputs, the graph has 2"):
        reconcile(named[:1], graph, "inputs", "m")


def test_an_output_signature_that_does_not_pair_describes_the_pyfunc() -> None:
    """A classifier's pyfunc answers one label column; its graph answers two tensors."""
    pyfunc = signature_specs([{"type": "long", "name": "label"}], "outputs")
    assert reconcile(pyfunc, GRAPH_OUT, "outputs", "m") == GRAPH_OUT
    one = signature_specs([tensor("int64", [-1])], "outputs")
    assert reconcile(one, GRAPH_OUT, "outputs", "m") == GRAPH_OUT


# ---- manifest keys ----------------------------------------------------------------------
def test_tags_give_manifest_keys_specific_tags_winning() -> None:
    tags = {
        "serving.manifest": json.dumps(
            {"batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}, "description": "x"}
        ),
        "serving.batching.max_batch_size": "64",
        "serving.resources": "{num_cpus: 0.5}",
        "serving.description": "Card fraud: gradient-boosted trees",  # text, not YAML
        "mlflow.source.type": "whatever",  # not ours: ignored
        "team": "risk",
    }
    assert tag_keys(tags, "m") == {
        "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.01},
        "description": "Card fraud: gradient-boosted trees",
        "resources": {"num_cpus": 0.5},
    }


@pytest.mark.parametrize(
    ("tags", "says"),
    [
        ({"serving.manifest": "[1, 2]"}, "mapping"),
        ({"serving.manifest": "{a: [1"}, "not YAML"),
        ({"serving.manifest": "{runtime: onnx}"}, "runtime: not manifest keys"),
        ({"serving.batchin.max_batch_size": "3"}, "batchin"),
        ({"serving.batching": "{a: [1"}, "serving.batching: not a YAML value"),
    ],
)
def test_bad_tags_are_named(tags: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        tag_keys(tags, "models:/fraud/3")


def test_overrides_then_version_tags_then_model_tags_then_run_metrics() -> None:
    keys = manifest_keys(
        overrides={"batching": {"max_batch_size": 16}},
        version_tags={
            "serving.batching.max_batch_size": "64",
            "serving.batching.batch_wait_timeout_s": "0.005",
            "serving.metrics.auc": "0.9",
        },
        model_tags={
            "serving.batching": "{batch_wait_timeout_s: 0.05, max_batch_size: 128}",
            "serving.description": "fraud model",
            "serving.resources.num_cpus": "2",
        },
        run_metrics={"auc": 0.8, "loss": 0.1, "bad": math.nan},
        where="m",
    )
    assert keys == {
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
        "description": "fraud model",
        "resources": {"num_cpus": 2},
        "metrics": {"auc": 0.9, "loss": 0.1},
    }
    with pytest.raises(ConfigError, match=r"overrides.*runtime"):
        manifest_keys({"runtime": "onnx"}, {}, {}, {}, "m")
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 3}, "d": [2]}) == {
        "a": {"b": 3, "c": 2},
        "d": [2],
    }


# ---- the deployment file ----------------------------------------------------------------
def test_deployment_file_sources_and_their_keys() -> None:
    v = VersionConfig(source="models:/fraud@champion", manifest={"batching": {"max_batch_size": 8}})
    assert v.source == "models:/fraud@champion" and not v.allow_pickle
    with pytest.raises(ValidationError, match="source"):
        VersionConfig(source="models:/fraud/Production")


def test_import_keys_without_a_source_are_refused_before_mlflow(tmp_path: Path) -> None:
    dep = DeploymentFile.model_validate(
        {
            "registry": str(tmp_path),
            "models": {"m": {"default": "v1", "versions": {"v1": {"manifest": {"x": 1}}}}},
        }
    )
    with pytest.raises(ConfigError, match="imported `source` only"):
        import_sources(dep, None)
    nothing = DeploymentFile.model_validate(
        {"registry": str(tmp_path), "models": {"m": {"default": "v1", "versions": {"v1": {}}}}}
    )
    import_sources(nothing, None)  # no source: MLflow is never touched


def test_without_mlflow_a_uri_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    from serving.models.mlflow_source import import_version

    with pytest.raises(ConfigError, match=r"pip install 'serving\[mlflow\]'"):
        import_version("models:/fraud/3", tmp_path, "fraud", "v3")
