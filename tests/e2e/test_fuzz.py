"""Property-based fuzzing of every public route and the gRPC service: whatever a client
sends (bodies of any shape, hostile JSON, names of any text), the answer is never a
5xx / INTERNAL and never a hang.

Deterministic in `make test` (derandomized, SERVING_FUZZ_EXAMPLES examples per test,
default 60); `make fuzz` runs the same tests with many more, randomized."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayUnderTest

EXAMPLES = int(os.environ.get("SERVING_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("SERVING_FUZZ_RANDOM") == "1"
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=not RANDOM,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
TIMEOUT_S = 30.0  # a hang is a failure: no answer within this
MODELS = ["fraud", "digits", "nope", ""]
VERSIONS = ["v1", "v2", "v1fused", "v9"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
names = st.sampled_from(MODELS) | st.text(min_size=1, max_size=10)
field_names = st.sampled_from(
    ["user_id", "merchant_id", "amount", "hour", "is_foreign", "card_present", "image", "x"]
) | st.text(max_size=8)
instances = st.lists(
    st.dictionaries(field_names, values, max_size=7) | values, min_size=0, max_size=4
)
tensor = st.fixed_dictionaries(
    {
        "name": field_names,
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "FP16", "X"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=9), max_size=4),
        "data": values,
    },
    optional={"parameters": st.dictionaries(st.text(max_size=8), scalars, max_size=3)},
)
hostile = st.sampled_from(
    [
        b"[" * 5000,
        b'{"instances": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"instances": [[1' + b"0" * 400 + b"]]}",
        b'{"instances": [{"user_id": "\\ud800"}]}',
        b'{"inputs": [{"name": "\\udfff", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
        b"\xff\xfe\x00",
        b"",
        b"null",
        b'{"request_id": "\\ud800", "label": 1}',
    ]
)


def _path_name(name: str) -> str:
    return quote(name, safe="")


def _check(r: httpx.Response, what: Any) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:300])


# What Ray's log files show when a request hit an error nobody handled: ours
# (serving.transport.errors), uvicorn's, asyncio's, grpcio's.
UNHANDLED = (
    "unhandled error in request",
    "Exception in ASGI application",
    "Task exception was never retrieved",
    "Exception in callback",
    "Unexpected error in RPC handling",
)


def _ray_logs() -> dict[Path, int]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return {p: p.stat().st_size for p in (session / "logs").rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def no_unhandled_errors(gateway: GatewayUnderTest) -> Iterator[None]:
    """After every fuzz test of this module: no new unhandled-error line in any of the
    cluster's log files (the gateway's replicas, their workers)."""
    before = _ray_logs()
    assert any("gateway" in p.name for p in before)  # the replicas' logs are found
    yield
    time.sleep(1.0)  # log lines reach the files asynchronously
    found = []
    for path, size in _ray_logs().items():
        with path.open("rb") as f:
            f.seek(before.get(path, 0) if before.get(path, 0) <= size else 0)
            for line in f.read().decode("utf-8", "replace").splitlines():
                if any(marker in line for marker in UNHANDLED):
                    found.append(f"{path.name}: {line[:300]}")
    assert not found, "\n".join(found[:10])


@pytest.fixture(scope="module")
def client(gateway: GatewayUnderTest) -> Any:
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT_S) as c:
        yield c


@FUZZ
@given(
    model=names,
    version=st.none() | st.sampled_from(VERSIONS) | st.text(min_size=1, max_size=6),
    body=st.fixed_dictionaries({"instances": instances}) | values,
)
def test_v1_predict(client: httpx.Client, model: str, version: str | None, body: Any) -> None:
    path = f"/v1/models/{_path_name(model)}"
    path += f"/versions/{_path_name(version)}:predict" if version else ":predict"
    _check(client.post(path, content=json.dumps(body).encode()), (path, body))


@FUZZ
@given(
    model=names,
    version=st.none() | st.sampled_from(VERSIONS),
    body=st.fixed_dictionaries(
        {"inputs": st.lists(tensor, max_size=3)},
        optional={
            "id": st.text(max_size=10),
            "outputs": st.lists(st.fixed_dictionaries({"name": field_names}), max_size=2),
            "parameters": st.dictionaries(st.text(max_size=8), scalars, max_size=3),
        },
    )
    | values,
)
def test_v2_infer(client: httpx.Client, model: str, version: str | None, body: Any) -> None:
    path = f"/v2/models/{_path_name(model)}"
    path += f"/versions/{_path_name(version)}/infer" if version else "/infer"
    _check(client.post(path, content=json.dumps(body).encode()), (path, body))


@FUZZ
@given(
    route=st.sampled_from(["/v1/models/digits:predict", "/v2/models/digits/infer", "/v1/feedback"]),
    raw=hostile | st.binary(max_size=64),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/octet-stream"]
    ),
)
def test_raw_bodies(client: httpx.Client, route: str, raw: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    _check(client.post(route, content=raw, headers=headers), (route, raw[:60]))


@FUZZ
@given(
    body=st.lists(
        st.fixed_dictionaries({"request_id": st.text(max_size=10) | values, "label": values}),
        max_size=4,
    )
    | values
)
def test_feedback(client: httpx.Client, body: Any) -> None:
    _check(client.post("/v1/feedback", content=json.dumps(body).encode()), body)


@FUZZ
@given(
    model=names,
    version=st.none() | st.sampled_from(VERSIONS) | st.text(min_size=1, max_size=6),
    request_id=st.text(max_size=200),
)
def test_reads_and_headers(
    client: httpx.Client, model: str, version: str | None, request_id: str
) -> None:
    m = _path_name(model)
    paths = [f"/v1/models/{m}", f"/v2/models/{m}", f"/v2/models/{m}/ready"]
    if version:
        v = _path_name(version)
        paths += [f"/v2/models/{m}/versions/{v}", f"/v2/models/{m}/versions/{v}/ready"]
    raw = request_id.encode("utf-8", "replace")
    # What an HTTP client can send at all: no control characters but tab.
    rid = bytes(c for c in raw if c == 0x09 or (c >= 0x20 and c != 0x7F)).strip()
    headers = {"x-request-id": rid}
    for path in paths:
        _check(client.get(path, headers=headers), path)


@FUZZ
@given(model=names, action=st.text(max_size=10) | values, body=values)
def test_admin_without_and_with_the_token(
    gateway: GatewayUnderTest, client: httpx.Client, model: str, action: Any, body: Any
) -> None:
    m = _path_name(model)
    payload = {"action": action, **(body if isinstance(body, dict) else {"x": body})}
    for headers in ({}, gateway.admin()):
        for method, path, content in (
            ("POST", f"/admin/v1/models/{m}/rollout", payload),
            ("PUT", f"/admin/v1/models/{m}/versions/v1/batching", body),
        ):
            r = client.request(
                method,
                path,
                content=json.dumps(payload if content is payload else content).encode(),
                headers=headers,
            )
            _check(r, (method, path, content))
            if not headers:  # refused before anything is read (404: no such route)
                assert r.status_code in (401, 404), r.text


@pytest.fixture(scope="module")
def stub(gateway: GatewayUnderTest) -> Any:
    channel = grpc.insecure_channel(gateway.grpc_target)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@FUZZ
@given(
    model=names,
    version=st.sampled_from(["", *VERSIONS]),
    inputs=st.lists(
        st.tuples(
            field_names,
            st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "FP16", "UINT8", "X"]),
            st.lists(st.integers(min_value=0, max_value=9), max_size=4),
            st.binary(max_size=48),
        ),
        max_size=3,
    ),
)
def test_grpc_model_infer(
    stub: Any, model: str, version: str, inputs: list[tuple[str, str, list[int], bytes]]
) -> None:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, raw in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
    try:
        stub.ModelInfer(req, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() not in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ), (model, version, inputs, exc.code(), exc.details())


# ---- every route of the OpenAPI document (schemathesis) ------------------------------
@pytest.fixture(scope="module")
def openapi(gateway: GatewayUnderTest) -> Any:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    # Admin routes are called without the token: 401, never a 5xx (with it they would
    # start rollouts and change batching under the other tests' feet).
    return schema


def test_openapi_routes(openapi: Any) -> None:
    """Requests generated from the gateway's own OpenAPI document (valid and not), on
    every operation: never a 5xx. (Schemathesis' pytest plugin does not run on this
    pytest, so each operation's strategy runs under hypothesis directly.)"""
    from schemathesis.checks import not_a_server_error

    operations = [result.ok() for result in openapi.get_all_operations()]
    assert len(operations) >= 15  # every route of the API is in the document
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=TIMEOUT_S)

        fuzz()
