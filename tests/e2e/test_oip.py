"""The Open Inference Protocol end to end, with the real Triton clients (REST and gRPC),
grpc reflection and the `serving predict --protocol` command: answers must equal the
v1 API's for the same inputs, and every error class must reach a client as its status."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.transport import oip
from tests.e2e.conftest import GatewayUnderTest
from tests.e2e.test_cli import run
from tests.e2e.test_gateway import RAW, heldout, post, records

FIELD_TYPES = {
    "user_id": "BYTES",
    "merchant_id": "BYTES",
    "amount": "FP32",
    "hour": "INT64",
    "is_foreign": "INT64",
    "card_present": "INT64",
}


# ---- helpers -----------------------------------------------------------------------------
def http_client(gw: GatewayUnderTest) -> thttp.InferenceServerClient:
    return thttp.InferenceServerClient(gw.url.removeprefix("http://"), network_timeout=60.0)


def grpc_client(gw: GatewayUnderTest) -> tgrpc.InferenceServerClient:
    return tgrpc.InferenceServerClient(gw.grpc_target)


def fraud_columns(registry: Path, n: int) -> dict[str, np.ndarray]:
    """Held-out fraud transactions as OIP tensors: one 1-D tensor per instance field."""
    data = np.load(registry / "fraud" / "heldout.npz")
    cols: dict[str, np.ndarray] = {}
    for name in RAW:
        col = data[name][:n]
        if FIELD_TYPES[name] == "BYTES":
            cols[name] = np.array([s.encode() for s in col.tolist()], dtype=object)
        else:
            cols[name] = col.astype(oip.numpy_dtype(FIELD_TYPES[name]))
    return cols


def triton_inputs(module: Any, tensors: dict[str, np.ndarray], **kw: Any) -> list[Any]:
    out = []
    for name, arr in tensors.items():
        t = module.InferInput(name, list(arr.shape), oip.to_datatype(arr.dtype))
        t.set_data_from_numpy(arr, **kw)
        out.append(t)
    return out


def v1_answer(gw: GatewayUnderTest, model: str, version: str, instances: Any) -> dict[str, Any]:
    r = post(gw, f"/v1/models/{model}/versions/{version}:predict", {"instances": instances})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    return {
        "label": np.array([p["label"] for p in preds]),
        "probabilities": np.array([p["probabilities"] for p in preds], dtype=np.float32),
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-6, atol=1e-7)


def status_of(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.status()), str(e.value.message())


def load_features(gw: GatewayUnderTest) -> None:
    from serving.features import materialize

    for view, key in (("user_stats", "user_id"), ("merchant_stats", "merchant_id")):
        materialize.load(
            gw.redis.url,
            "serving",
            materialize.find_view(gw.registry, view),
            gw.registry / "fraud" / "features" / f"{view}.csv",
            key,
        )


# ---- health and metadata -----------------------------------------------------------------
def test_health_over_rest_and_grpc(gateway: GatewayUnderTest) -> None:
    for client in (http_client(gateway), grpc_client(gateway)):
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("fraud")
        assert client.is_model_ready("digits", "v1")
        assert client.is_model_ready("fraud", "v1strict")
        client.close()
    r = httpx.get(gateway.url + "/v2/health/live", timeout=10)
    assert r.status_code == 200 and r.json() == {"live": True}
    r = httpx.get(gateway.url + "/v2/models/fraud/versions/v1/ready", timeout=10)
    assert r.status_code == 200 and r.json() == {"name": "fraud", "ready": True}
    meta = grpc_client(gateway).get_server_metadata(as_json=True)
    assert meta["name"] == "serving" and "binary_tensor_data" in meta["extensions"]
    assert http_client(gateway).get_server_metadata()["name"] == "serving"


def test_model_metadata_over_rest_and_grpc(gateway: GatewayUnderTest) -> None:
    fraud_inputs = [{"name": n, "datatype": d, "shape": [-1]} for n, d in FIELD_TYPES.items()]
    outputs = {
        "fraud": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
        "digits": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }
    want = {
        "fraud": {"inputs": fraud_inputs, "outputs": outputs["fraud"]},
        "digits": {
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}],
            "outputs": outputs["digits"],
        },
    }
    rest, rpc = http_client(gateway), grpc_client(gateway)
    for model, w in want.items():
        m = rest.get_model_metadata(model)
        assert (m["name"], m["inputs"], m["outputs"]) == (model, w["inputs"], w["outputs"])
        g = rpc.get_model_metadata(model)
        assert g.name == model
        got = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in g.inputs]
        assert got == w["inputs"]
        assert [list(t.shape) for t in g.outputs] == [o["shape"] for o in w["outputs"]]
    m = rest.get_model_metadata("fraud", "v1")
    assert m["versions"] == ["v1"] and m["platform"] == "onnxruntime_onnx"
    assert set(rest.get_model_metadata("fraud")["versions"]) >= {"v1", "v1strict", "v2"}
    assert rpc.get_model_metadata("digits").platform == "pytorch_libtorch"


# ---- inference ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fraud_from_bytes_entity_keys_equals_v1(gateway: GatewayUnderTest, version: str) -> None:
    n = 64
    want = v1_answer(gateway, "fraud", version, records(gateway.registry, n))
    tensors = fraud_columns(gateway.registry, n)
    outputs = ["label", "probabilities"]
    rest = http_client(gateway)
    for binary in (True, False):  # binary tensor extension, then JSON `data`
        res = rest.infer(
            "fraud",
            triton_inputs(thttp, tensors, binary_data=binary),
            model_version=version,
            outputs=[thttp.InferRequestedOutput(o, binary_data=binary) for o in outputs],
        )
        assert res.get_response()["model_version"] == version
        assert_same({o: res.as_numpy(o) for o in outputs}, want)
    res = grpc_client(gateway).infer("fraud", triton_inputs(tgrpc, tensors), model_version=version)
    assert_same({o: res.as_numpy(o) for o in outputs}, want)


def test_digits_fp32_images_equal_v1(gateway: GatewayUnderTest) -> None:
    x, y = heldout(gateway.registry, "digits")
    x = x[:100]
    want = v1_answer(gateway, "digits", "v1", x.tolist())
    res = http_client(gateway).infer("digits", triton_inputs(thttp, {"image": x}))
    assert_same({o: res.as_numpy(o) for o in ("label", "probabilities")}, want)
    res = grpc_client(gateway).infer("digits", triton_inputs(tgrpc, {"image": x}))
    assert_same({o: res.as_numpy(o) for o in ("label", "probabilities")}, want)
    assert (res.as_numpy("label") == y[:100]).mean() > 0.9


def test_the_torch_export_version_answers_as_torchscript(gateway: GatewayUnderTest) -> None:
    """digits v2 is v1's model saved with torch.export: through the gateway (the v1 API
    and OIP over gRPC) it answers as v1 does, and its metadata names its format."""
    x = heldout(gateway.registry, "digits")[0][:64]
    want = v1_answer(gateway, "digits", "v1", x.tolist())
    assert_same(v1_answer(gateway, "digits", "v2", x.tolist()), want)
    rpc = grpc_client(gateway)
    res = rpc.infer("digits", triton_inputs(tgrpc, {"image": x}), model_version="v2")
    assert_same({o: res.as_numpy(o) for o in ("label", "probabilities")}, want)
    assert rpc.get_model_metadata("digits", "v2").platform == "pytorch_torch_export"


def test_raw_tensors_round_trip_exactly_and_agree_with_json(gateway: GatewayUnderTest) -> None:
    x = heldout(gateway.registry, "digits")[0][:16]
    res = grpc_client(gateway).infer(
        "digits",
        triton_inputs(tgrpc, {"image": x}),
        outputs=[tgrpc.InferRequestedOutput("probabilities")],
        request_id="raw-1",
    )
    response = res.get_response()
    assert response.id == "raw-1"
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert len(response.raw_output_contents) == 1
    assert not response.outputs[0].HasField("contents")
    raw = response.raw_output_contents[0]
    assert list(response.outputs[0].shape) == [16, 10] and len(raw) == 16 * 10 * 4
    # The same request as JSON over REST: the very same float32 values.
    r = httpx.post(
        gateway.url + "/v2/models/digits/infer",
        json={
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [16, 8, 8],
                    "data": x.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "probabilities"}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["shape"] == [16, 10]
    assert np.array(out["data"], dtype=np.float32).tobytes() == raw
    assert res.as_numpy("probabilities").tobytes() == raw


def test_grpc_typed_contents_answer_with_typed_contents(gateway: GatewayUnderTest) -> None:
    """Without raw inputs the answer uses typed contents (the other OIP encoding)."""
    cols = fraud_columns(gateway.registry, 8)
    want = v1_answer(gateway, "fraud", "v1", records(gateway.registry, 8))
    req = pb.ModelInferRequest(model_name="fraud", model_version="v1", id="typed")
    for name, arr in cols.items():
        t = req.inputs.add(name=name, datatype=FIELD_TYPES[name], shape=arr.shape)
        getattr(t.contents, oip.CONTENTS_FIELD[FIELD_TYPES[name]]).extend(arr.tolist())
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stamp = (("x-request-start", f"t={time.time_ns() // 1000 - 40_000}"),)
        resp, call = stub.ModelInfer.with_call(req, timeout=30, metadata=stamp)
    assert not resp.raw_output_contents and resp.id == "typed"
    by_name = {o.name: o for o in resp.outputs}
    got = {
        "label": np.array(by_name["label"].contents.int64_contents),
        "probabilities": np.array(
            by_name["probabilities"].contents.fp32_contents, np.float32
        ).reshape(list(by_name["probabilities"].shape)),
    }
    assert_same(got, want)
    trailing = dict(call.trailing_metadata())
    assert "infer;dur=" in trailing["server-timing"] and trailing["x-serving-batch-size"] == "8"
    name, dur = trailing["server-timing"].split(",")[0].split(";dur=")
    assert name == "inbound" and 40.0 <= float(dur) < 5000.0


def test_degraded_answers_say_so(gateway: GatewayUnderTest) -> None:
    cols = fraud_columns(gateway.registry, 1)
    cols["user_id"] = np.array([b"u-unknown"], dtype=object)
    res = grpc_client(gateway).infer("fraud", triton_inputs(tgrpc, cols), model_version="v2")
    params = res.get_response().parameters
    assert params["degraded"].bool_param is True
    assert "user_stats:miss:u-unknown" in params["degraded_reasons"].string_param


# ---- errors ------------------------------------------------------------------------------
def test_errors_reach_grpc_clients_as_their_status_codes(gateway: GatewayUnderTest) -> None:
    rpc = grpc_client(gateway)
    x = heldout(gateway.registry, "digits")[0]
    image = triton_inputs(tgrpc, {"image": x[:2]})
    code, msg = status_of(lambda: rpc.infer("nope", image))
    assert code == "StatusCode.NOT_FOUND" and "model 'nope' not found" in msg
    code, msg = status_of(lambda: rpc.infer("digits", image, model_version="v9"))
    assert code == "StatusCode.NOT_FOUND" and "version 'v9'" in msg
    code, msg = status_of(lambda: rpc.is_model_ready("nope"))
    assert code == "StatusCode.NOT_FOUND"
    for model, version in (("\u00e9", ""), ("digits", "\u00e9")):  # no metric label: 404
        code, msg = status_of(lambda m=model, v=version: rpc.infer(m, image, model_version=v))
        assert code == "StatusCode.NOT_FOUND", msg
    flat = triton_inputs(tgrpc, {"image": x[:2].reshape(2, 64)})
    code, msg = status_of(lambda: rpc.infer("digits", flat))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "image: expected shape [-1, 8, 8], got [2, 64]" in msg
    code, msg = status_of(
        lambda: rpc.infer("digits", image, outputs=[tgrpc.InferRequestedOutput("logits")])
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "unknown output 'logits'" in msg
    many = triton_inputs(tgrpc, {"image": np.resize(x, (1025, 8, 8)).astype(np.float32)})
    code, msg = status_of(lambda: rpc.infer("digits", many))
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    assert "1025 instances exceed the limit of 1024" in msg
    cols = fraud_columns(gateway.registry, 2)
    del cols["merchant_id"]
    code, msg = status_of(lambda: rpc.infer("fraud", triton_inputs(tgrpc, cols)))
    assert code == "StatusCode.INVALID_ARGUMENT" and "merchant_id" in msg


def test_errors_over_rest_use_the_protocol_format(gateway: GatewayUnderTest) -> None:
    r = httpx.get(gateway.url + "/v2/models/nope", timeout=10)
    assert r.status_code == 404
    assert list(r.json()) == ["error"] and r.json()["error"].startswith("model 'nope' not found")
    assert r.headers["x-serving-error-code"] == "not_found"
    r = httpx.post(gateway.url + "/v2/models/digits/infer", content=b"{", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(
        gateway.url + "/v2/models/digits/infer",
        json={"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [1]}]},
        timeout=10,
    )
    assert r.status_code == 422
    assert r.json()["error"] == "image: shape [1, 8, 8] needs 64 elements, got 1"
    code, msg = status_of(lambda: http_client(gateway).get_model_metadata("nope"))
    assert code == "404" and "not found" in msg


def test_feature_store_down_is_unavailable_for_the_reject_policy(
    gateway: GatewayUnderTest,
) -> None:
    cols = fraud_columns(gateway.registry, 2)
    rpc = grpc_client(gateway)
    gateway.redis.stop()
    try:
        code, msg = status_of(
            lambda: rpc.infer("fraud", triton_inputs(tgrpc, cols), model_version="v1strict")
        )
        assert code == "StatusCode.UNAVAILABLE" and "feature store" in msg
    finally:
        gateway.redis.start()
        load_features(gateway)
    deadline = time.monotonic() + 20
    while True:
        res = rpc.infer("fraud", triton_inputs(tgrpc, cols), model_version="v2")
        if "degraded" not in res.get_response().parameters or time.monotonic() > deadline:
            break
    assert "degraded" not in res.get_response().parameters


# ---- reflection and CLI --------------------------------------------------------------------
def test_reflection_lists_and_describes_the_service(gateway: GatewayUnderTest) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(gateway.grpc_target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in db.get_services()
        service = DescriptorPool(db).FindServiceByName("inference.GRPCInferenceService")
        assert {m.name for m in service.methods} == {
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        }


@pytest.mark.parametrize("protocol", ["grpc", "v2"])
def test_cli_predict_over_the_open_inference_protocol(
    gateway: GatewayUnderTest, tmp_path: Path, protocol: str
) -> None:
    target = ["--grpc-target", gateway.grpc_target, "--url", gateway.url]
    file = tmp_path / "req.json"
    recs = records(gateway.registry, 3)
    file.write_text(json.dumps({"instances": recs}))
    out = run("predict", "fraud", "-v", "v1", "-i", f"@{file}", "-p", protocol, "--json", *target)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert (body["model_name"], body["model_version"]) == ("fraud", "v1")
    got = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    assert_same(got, v1_answer(gateway, "fraud", "v1", recs))
    x = heldout(gateway.registry, "digits")[0][:2]
    out = run("predict", "digits", "-i", json.dumps(x.tolist()), "-p", protocol, *target)
    assert out.returncode == 0, out.stderr
    assert "digits v1" in out.stdout and "probabilities" in out.stdout
    out = run("predict", "nope", "-i", "[[1]]", "-p", protocol, *target)
    assert out.returncode == 1
    assert ("NOT_FOUND" if protocol == "grpc" else "404 not_found") in out.stderr
    assert "model 'nope' not found" in out.stderr


def test_grpc_answers_carry_the_id_their_labels_join_under(gateway: GatewayUnderTest) -> None:
    """The id a gRPC answer names (its `id`, else the x-request-id trailer) is the one
    its prediction record is stored under, so a label posted for it joins."""
    cols = fraud_columns(gateway.registry, 1)

    def infer(body_id: str, metadata: tuple[tuple[str, str], ...]) -> tuple[Any, dict[str, str]]:
        req = pb.ModelInferRequest(model_name="fraud", model_version="v1", id=body_id)
        for name, arr in cols.items():
            t = req.inputs.add(name=name, datatype=FIELD_TYPES[name], shape=arr.shape)
            getattr(t.contents, oip.CONTENTS_FIELD[FIELD_TYPES[name]]).extend(arr.tolist())
        with grpc.insecure_channel(gateway.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            resp, call = stub.ModelInfer.with_call(req, timeout=30, metadata=metadata)
        return resp, dict(call.trailing_metadata())

    def label(rid: str, resp: Any) -> httpx.Response:
        pred = {o.name: o for o in resp.outputs}["label"].contents.int64_contents[0]
        key = resp.parameters["feedback_key"].string_param
        body = {"request_id": rid, "label": int(pred), "feedback_key": key}
        return httpx.post(f"{gateway.url}/v1/feedback", json=body, timeout=30)

    resp, trailing = infer("", ())
    assert resp.id == "" and trailing["x-request-id"]
    assert trailing["x-serving-feedback-key"] == resp.parameters["feedback_key"].string_param
    r = label(trailing["x-request-id"], resp)
    assert r.status_code == 200 and r.json()["results"][0]["correct"] == 1, r.text

    body_id = f"grpc-body-{time.time_ns()}"
    resp, trailing = infer(body_id, (("x-request-id", f"meta-{body_id}"),))
    assert resp.id == body_id and trailing["x-request-id"] == f"meta-{body_id}"
    r = label(body_id, resp)
    assert r.status_code == 200 and r.json()["results"][0]["duplicate"] is False, r.text
