"""The gRPC server on the event loop (serving/transport/grpc_h2.py) against grpcio's
own server with the same servicers, spoken to by grpcio's client: unary calls with
metadata both ways, deadlines, status codes from abort and from set_code, large
messages both ways (flow control), the message size bound, the in-flight bound,
reflection (a streaming method) and the drain."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.transport.grpc import SERVICE
from tests.integration.transport.grpc_servers import LIMIT, MAX_MESSAGE, Running


@pytest.fixture
def stub(running: Running) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_unary_calls_with_metadata_and_deadline(stub: Any) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    answer, call = stub.ModelInfer.with_call(
        pb.ModelInferRequest(model_name="m", id="10"),
        metadata=(("x-request-id", "abc"), ("x-blob-bin", b"\x00\x01\xff")),
        timeout=5,
    )  # fmt: skip
    assert answer.model_name == "m" and answer.raw_output_contents[0] == b"x" * 10
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "abc"
    assert trailing["blob"] == "0001ff"  # binary metadata arrives as bytes
    assert 4.0 < float(trailing["remaining"]) <= 5.1  # grpc-timeout became the deadline
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name="slow"), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_status_codes(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no model 'missing' ü"
    assert dict(err.value.trailing_metadata())["x-request-id"] == "r1"
    with pytest.raises(grpc.RpcError) as err:  # the generated base: set_code, then raise
        stub.ServerReady(pb.ServerReadyRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_large_messages_and_the_size_bound(stub: Any) -> None:
    big = stub.ModelInfer(pb.ModelInferRequest(model_name="m", id=str(3_000_000)))
    assert len(big.raw_output_contents[0]) == 3_000_000
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"y" * (MAX_MESSAGE // 2)])
    assert stub.ModelInfer(request).model_name == "m"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(raw_input_contents=[b"y" * (MAX_MESSAGE + 1)]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # the connection carries on


def test_calls_in_flight_are_bounded(stub: Any) -> None:
    futures = [stub.ModelInfer.future(pb.ModelInferRequest(model_name="slow")) for _ in range(6)]
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert codes.count(grpc.StatusCode.OK) == LIMIT
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6 - LIMIT


def test_reflection_lists_the_service(running: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        answers = list(reflect.ServerReflectionInfo(iter(asked)))
    assert SERVICE in [s.name for s in answers[0].list_services_response.service]
    assert answers[1].file_descriptor_response.file_descriptor_proto


def test_drain_finishes_calls_in_flight(running: Running, stub: Any) -> None:
    slow = stub.ModelInfer.future(pb.ModelInferRequest(model_name="slow", id="3"))
    time.sleep(0.2)  # the call is in flight (it takes 0.5 s)
    running.call(running.server.stop(5.0))
    assert slow.result().raw_output_contents[0] == b"xxx"
    with pytest.raises(grpc.RpcError) as err:
        stub.ServerLive(pb.ServerLiveRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
