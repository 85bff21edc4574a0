"""The measurement floor: the cheapest HTTP server we can write (raw asyncio protocol,
fixed answer). What the generator measures against it is the generator's own cost plus
the loopback; run as `python -m loadtests.floor --port N`.

With `--grpc`, the same for gRPC: the gateway's own gRPC server (HTTP/2 framed by
serving.transport.h2wire, on uvloop; cheaper here than grpcio's C core) answering
ModelInfer with one fixed, pre-serialized answer (and ModelMetadata with digits', which
the generator's gRPC client asks for first): what the gRPC client and HTTP/2 cost on
this machine before any server does any work."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

ANSWER = b'{"predictions":[0]}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


class _Echo(asyncio.Protocol):
    """Answers every complete request (head + content-length body) on the connection."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self._buf) < end + 4 + length:
                return
            del self._buf[: end + 4 + length]
            assert self._t is not None
            self._t.write(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def serve_grpc(port: int) -> None:
    import grpc

    from serving.proto import grpc_predict_v2_pb2 as pb

    meta = pb.ModelMetadataResponse(name="digits", versions=["v1"], platform="floor")
    meta.inputs.add(name="image", datatype="FP32", shape=[-1, 8, 8])
    answer = pb.ModelInferResponse(model_name="digits", model_version="v1")
    answer.outputs.add(name="label", datatype="INT64", shape=[1]).contents.int64_contents.append(0)
    fixed = answer.SerializeToString()

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return fixed

    async def metadata(request: object, context: grpc.aio.ServicerContext) -> object:
        return meta

    def same(b: bytes) -> bytes:
        return b

    from serving.transport.grpc_h2 import H2GrpcServer

    server = H2GrpcServer("127.0.0.1", port, 1 << 20, 4 << 20)
    service = "inference.GRPCInferenceService"
    server.registry.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service,
                {
                    "ModelInfer": grpc.unary_unary_rpc_method_handler(
                        infer, request_deserializer=same, response_serializer=same
                    ),
                    "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                        metadata,
                        request_deserializer=pb.ModelMetadataRequest.FromString,
                        response_serializer=pb.ModelMetadataResponse.SerializeToString,
                    ),
                },
            ),
        )
    )
    await server.start()
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--grpc", action="store_true", help="a gRPC floor server instead")
    args = p.parse_args()
    coro = serve_grpc(args.port) if args.grpc else serve(args.port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


if __name__ == "__main__":
    main()
