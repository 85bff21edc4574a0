"""Open Inference Protocol over gRPC: `inference.GRPCInferenceService`.

The server runs inside each Gateway replica, on the replica's own event loop, so a gRPC
request costs no Ray hop more than an HTTP one (it skips Ray's HTTP proxy). It binds
`http_host:grpc_port` with SO_REUSEPORT (gRPC's default on Linux): the ingress replicas
of one node share the port and the kernel spreads connections across them. Server
reflection is on, so `grpcurl` works without the .proto file.

Requests decode into the same arrays as REST (`serving.transport.oip`) and run the same
data plane; a failure leaves as its gRPC status (serving.transport.errors.to_grpc):
a ServingError's own code and message, anything else INTERNAL naming the request id
that the log line carries.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from serving.dataplane import DataPlane
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.settings import Settings
from serving.transport import oip
from serving.transport.context import (
    FEEDBACK_KEY,
    REQUEST_ID,
    RequestContext,
    given_request_id,
    server_timing,
)
from serving.transport.errors import to_grpc
from serving.transport.grpc_h2 import H2GrpcServer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_T = TypeVar("_T")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _request_id(context: grpc.aio.ServicerContext, fallback: str = "") -> str:
    return given_request_id(_metadata(context).get(REQUEST_ID) or fallback)


def request_context(
    request: pb.ModelInferRequest,
    context: grpc.aio.ServicerContext,
    metadata: dict[str, str],
    request_id: str,
) -> RequestContext:
    """The context of a ModelInfer call: metadata as headers, the smallest of the gRPC
    deadline and the `timeout` parameter."""
    started = time.perf_counter()
    ctx = RequestContext(
        request_id=request_id,
        protocol="grpc",
        headers=metadata,
        started=started,
        arrived=started,
        timeout_s=context.time_remaining(),
        body_id=request.id,
    )
    ctx.lower_timeout(oip.timeout_from_parameters(_parameters(request.parameters)))
    return ctx


def _parameters(params: Any) -> dict[str, Any]:
    """InferParameter map → plain values."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def _set_parameters(target: Any, values: dict[str, Any]) -> None:
    for key, v in values.items():
        if isinstance(v, bool):
            target[key].bool_param = v
        elif isinstance(v, int):
            target[key].int64_param = v
        elif isinstance(v, float):
            target[key].double_param = v
        else:
            target[key].string_param = str(v)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        rid: str,
        call: Callable[[], Awaitable[_T]],
    ) -> _T:
        """Run one RPC, mapping every failure to a status (context.abort raises)."""
        try:
            return await call()
        except Exception as exc:
            code, message = to_grpc(exc, rid)
            await context.abort(code, message, trailing_metadata=((REQUEST_ID, rid),))
            raise  # unreachable: abort raises

    # ---- health and metadata ----------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        async def call() -> pb.ServerReadyResponse:
            states = await self._plane.monitor.readiness()
            return pb.ServerReadyResponse(ready=all(states.values()))

        return await self._run(context, _request_id(context), call)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            v, _ = self._plane.catalog.resolve(request.name, request.version or None)
            ready = await self._plane.monitor.version_ready(request.name, v)
            return pb.ModelReadyResponse(ready=ready)

        return await self._run(context, _request_id(context), call)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            version = request.version or None
            v, manifest = self._plane.catalog.resolve(request.name, version)
            versions = self._plane.catalog.served_versions(request.name) if version is None else [v]
            meta = oip.model_metadata(request.name, versions, manifest)
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
            )

        return await self._run(context, _request_id(context), call)

    # ---- inference --------------------------------------------------------------------
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        metadata = _metadata(context)
        rid = given_request_id(metadata.get(REQUEST_ID) or request.id)
        return await self._run(context, rid, lambda: self._infer(request, context, metadata, rid))

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext,
        metadata: dict[str, str],
        rid: str,
    ) -> pb.ModelInferResponse:
        ctx = request_context(request, context, metadata, rid)
        inputs = oip.require_inputs(oip.decode_inputs(request))
        pred = await self._plane.predict(
            ctx, request.model_name, request.model_version or None, tensors=inputs
        )
        outputs = oip.outputs(pred, [o.name for o in request.outputs])
        encode_started = time.perf_counter()
        response = pb.ModelInferResponse(
            model_name=pred.model, model_version=pred.version, id=request.id
        )
        _set_parameters(response.parameters, oip.answer_parameters(pred))
        # Raw answers raw, as Triton does; FP16 has no typed contents field.
        raw = bool(request.raw_input_contents) or any(o.datatype == "FP16" for o in outputs)
        for o in outputs:
            t = response.outputs.add(name=o.name, datatype=o.datatype, shape=o.array.shape)
            if raw:
                response.raw_output_contents.append(oip.encode_raw(o.array))
            else:
                getattr(t.contents, oip.CONTENTS_FIELD[o.datatype]).extend(
                    oip.contents_values(o.array)
                )
        ctx.close_stages(pred.timings, encode_started)
        context.set_trailing_metadata(
            (
                (REQUEST_ID, ctx.request_id),
                ("server-timing", server_timing(pred.timings)),
                ("x-serving-batch-size", str(pred.batch_size)),
                *(((FEEDBACK_KEY, pred.feedback_key),) if pred.feedback_key else ()),
            )
        )
        return response


class GrpcServer:
    """The gRPC server of one Gateway replica. `start` and `stop` must run on the
    replica's event loop (grpc.aio binds to the loop it is created in)."""

    def __init__(self, plane: DataPlane, settings: Settings, max_concurrent: int) -> None:
        self._plane = plane
        self._settings = settings
        self._max_concurrent = max_concurrent
        self._server: grpc.aio.Server | None = None
        self._h2: H2GrpcServer | None = None
        self.port: int | None = None

    @property
    def target(self) -> str:
        return self._settings.grpc_target()

    async def start(self) -> None:
        if self._settings.grpc_server == "h2":
            await self._start_h2()
            return
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", self._settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
            ],
            # Past this many RPCs in flight gRPC answers RESOURCE_EXHAUSTED at once.
            maximum_concurrent_rpcs=self._max_concurrent,
        )
        self._add_services(server)
        try:
            port = server.add_insecure_port(self.target)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC cannot listen on {self.target}: {exc}") from None
        if not port:
            raise RuntimeError(f"gRPC cannot listen on {self.target}")
        await server.start()
        self._server, self.port = server, port
        log.info("gRPC (Open Inference Protocol) listening on %s", self.target)

    def _add_services(self, server: Any) -> None:
        """The inference service and reflection, on grpc.aio's server or on the loop's
        own (its registry stands for a server in the generated `add_*_to_server`)."""
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self._plane), server)
        # Our messages live in a private descriptor pool (see proto/generate.py);
        # reflection serves from it, so it needs the reflection service there too.
        pool = pb.DESCRIPTOR.pool
        with contextlib.suppress(TypeError):  # already added by an earlier replica start
            pool.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
        names = (SERVICE, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(names, pool=pool), server
        )

    async def _start_h2(self) -> None:
        s = self._settings
        h2 = H2GrpcServer(s.http_host, s.grpc_port, self._max_concurrent, s.max_body_bytes)
        self._add_services(h2.registry)
        await h2.start()
        self._h2, self.port = h2, h2.port
        log.info("gRPC (Open Inference Protocol, h2 on the loop) listening on %s", self.target)

    async def stop(self) -> None:
        """Refuse new calls (GOAWAY) and finish those in flight within the drain time."""
        if self._h2 is not None:
            h2, self._h2 = self._h2, None
            await h2.stop(self._settings.drain_timeout_s)
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(self._settings.drain_timeout_s)
            log.info("gRPC server on %s stopped", self.target)
