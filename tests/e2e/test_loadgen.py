"""The benchmark's clients against the real gateway (a few seconds; nothing is timed).

Checks what the report's Server-Timing table rests on: both transports get answers
with the stages, and the stages fit inside the latency the client measured.
"""

from __future__ import annotations

import pytest

from loadtests import loadgen, worker
from tests.e2e.conftest import GatewayUnderTest


@pytest.mark.parametrize("kind", ["http", "grpc"])
async def test_serial_run_over_each_transport_reports_server_timing(
    gateway: GatewayUnderTest, kind: str
) -> None:
    if kind == "http":
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        path = "/v1/models/digits:predict"
    else:
        host, port = gateway.grpc_target.rsplit(":", 1)
        path = "digits"
    cmd = {"scenario": "digits", "host": host, "port": port, "path": path, "kind": kind}
    client = await worker.make_client(cmd)
    try:
        result = (await loadgen.serial(client, 40, warmup=5, keep_timing=True)).summary()
    finally:
        await client.aclose()
    assert result["errors"] == 0 and result["ok"] == 40, result["statuses"]
    st = result["server_timing"]
    assert st["requests"] == 40
    assert {"decode", "queue", "infer", "encode", "total"} <= set(st["stages_mean_ms"])
    if kind == "http":
        assert "http" in st["stages_mean_ms"]
    # The server's stages happen within the client's measurement.
    assert 0.2 < st["coverage"] <= 1.0
    assert 0 < st["stages_mean_ms"]["total"] <= st["client_mean_ms"]
