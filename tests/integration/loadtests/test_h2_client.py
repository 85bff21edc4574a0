"""The generator's lean gRPC client (loadtests/h2_client.py) against grpcio's server and
the gateway's own server on the loop, both with the same servicers: many calls at once
on one connection, answers and requests past every flow-control window, status codes,
the client's timeout and a server that goes away (no call hangs)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from loadtests.h2_client import H2Error, H2GrpcClient
from serving.proto import grpc_predict_v2_pb2 as pb
from tests.integration.transport.grpc_servers import LIMIT, Running

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _message(model: str, answer_bytes: int = 0, send_bytes: int = 0) -> bytes:
    req = pb.ModelInferRequest(model_name=model, id=str(answer_bytes))
    if send_bytes:
        req.raw_input_contents.append(b"y" * send_bytes)
    return req.SerializeToString()


def test_many_calls_at_once_and_large_messages_both_ways(running: Running) -> None:
    async def run() -> None:
        msgs = [_message("m", 10), _message("m", 300_000), _message("m", 0, 200_000)]
        client = await H2GrpcClient.open("127.0.0.1", running.port, METHOD, msgs, b"xxxxxxxxxx")
        try:
            # Rounds of as many calls as the servers allow in flight (LIMIT), past their
            # windows (64 KiB by default, 1 MiB on ours) both sending (200 kB requests)
            # and receiving (300 kB answers).
            for n in range(10):
                calls = range(n * LIMIT, (n + 1) * LIMIT)
                replies = await asyncio.gather(*(client.call(i) for i in calls))
                assert [r.status for r in replies] == [0] * LIMIT
                assert all(r.ok and r.done >= r.sent for r in replies)
                assert [r.flagged for r in replies] == [i % 3 < 2 for i in calls]
        finally:
            await client.aclose()

    asyncio.run(run())


def test_status_codes_and_the_clients_timeout(running: Running) -> None:
    async def run() -> None:
        msgs = [_message("missing"), _message("slow")]
        client = await H2GrpcClient.open("127.0.0.1", running.port, METHOD, msgs, None)
        try:
            missing = await client.call(0)
            assert not missing.ok and missing.status == 5  # NOT_FOUND, trailers only
            client.timeout_s = 0.1
            with pytest.raises(TimeoutError):
                await client.call(1)
            client.timeout_s = 5.0
            assert (await client.call(0)).status == 5  # the connection is still usable
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_server_that_goes_away_fails_the_calls_in_flight(running: Running) -> None:
    async def run() -> None:
        client = await H2GrpcClient.open(
            "127.0.0.1", running.port, METHOD, [_message("slow")], None
        )
        pending = asyncio.ensure_future(client.call(0))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(running.call, running.server.stop(0.0))
        # Cancelled by the server (grpcio's answers CANCELLED), or cut off.
        with contextlib.suppress(H2Error, ConnectionError):
            assert not (await asyncio.wait_for(pending, 5)).ok
        with pytest.raises((H2Error, ConnectionError)):
            await client.call(0)
        await client.aclose()

    asyncio.run(run())
