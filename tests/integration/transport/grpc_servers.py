"""Two gRPC servers with the same servicers, each on a loop of its own thread: the
gateway's own (serving/transport/grpc_h2.py) and grpcio's, the reference it must behave
like. The `running` fixture (registered in tests/integration/conftest.py) gives each in
turn; tests/integration/transport/test_grpc_h2.py and the generator's lean client's
tests use it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.transport.grpc import SERVICE
from serving.transport.grpc_h2 import H2GrpcServer

LIMIT = 4
MAX_MESSAGE = 4 * 1024 * 1024


class Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        metadata = dict(context.invocation_metadata())
        if request.model_name == "missing":
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "no model 'missing' ü", (("x-request-id", "r1"),)
            )
        if request.model_name == "slow":
            await asyncio.sleep(0.5)
        remaining = context.time_remaining()
        blob = metadata.get("x-blob-bin", b"")
        context.set_trailing_metadata(
            (
                ("x-request-id", metadata.get("x-request-id", "")),
                ("remaining", str(remaining)),
                ("blob", blob.hex() if isinstance(blob, bytes) else "text"),
            )
        )
        answer = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        answer.raw_output_contents.append(b"x" * int(request.id or 0))
        return answer


class Running:
    """A server of either kind on a loop of its own thread, with the same servicers:
    grpcio's is the reference the loop's own server must behave like."""

    def __init__(self, kind: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server: Any = self.call(self._make(kind))
        self.port: int = self.server.port

    async def _make(self, kind: str) -> Any:
        names = (SERVICE, "grpc.reflection.v1alpha.ServerReflection")
        reflection = ReflectionServicer(names, pool=pb.DESCRIPTOR.pool)
        if kind == "h2":
            server = H2GrpcServer("127.0.0.1", 0, LIMIT, MAX_MESSAGE)
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server.registry)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection, server.registry)
            await server.start()
            return server
        aio = grpc.aio.server(
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
            maximum_concurrent_rpcs=LIMIT,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), aio)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection, aio)
        port = aio.add_insecure_port("127.0.0.1:0")
        await aio.start()
        return _Aio(aio, port)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class _Aio:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server, self.port = server, port

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


@pytest.fixture(params=["h2", "grpcio"])
def running(request: pytest.FixtureRequest) -> Iterator[Running]:
    r = Running(request.param)
    yield r
    r.call(r.server.stop(1.0))
    r.loop.call_soon_threadsafe(r.loop.stop)
