"""The generator process: reads one JSON command per line on stdin, answers one JSON line.

It runs apart from the orchestrator (which holds the Ray driver and its threads) so that
nothing else competes for its interpreter, and so its CPU time is its own. Commands:
  {"op": "load", "kind": "http"|"grpc", "mode": "serial"|"open"|"closed", "host",
   "port", "path" (gRPC: the model name), "scenario", then "n", "warmup" (serial) |
   "rate", "duration_s", "warmup_s" (open) | "concurrency", "duration_s", "warmup_s"
   (closed); optional "timing": keep Server-Timing, "grpc_client": "lean" (default)
   or "grpcio"}
  {"op": "ceiling", "scenario", "seconds_per_size", optional "registry"}
  {"op": "quit"}
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from loadtests import loadgen
from loadtests.scenarios import REGISTRY, SCENARIOS

_bodies: dict[str, list[bytes]] = {}


async def make_client(cmd: dict[str, Any]) -> loadgen.Client:
    scenario = SCENARIOS[cmd["scenario"]]
    if scenario.name not in _bodies:
        _bodies[scenario.name] = scenario.bodies()
    bodies = _bodies[scenario.name]
    host, port, path = cmd["host"], int(cmd["port"]), cmd["path"]
    if cmd.get("kind", "http") == "grpc":
        from loadtests import grpc_client

        if cmd.get("grpc_client", "lean") == "grpcio":
            return await grpc_client.GrpcClient.create(host, port, path, scenario, bodies)
        import grpc

        from loadtests.h2_client import H2GrpcClient

        with grpc.insecure_channel(f"{host}:{port}") as channel:  # for the metadata only
            msgs = await grpc_client.messages(channel, path, bodies)
        return await H2GrpcClient.open(
            host, port, grpc_client.METHOD, msgs, grpc_client.flag(scenario)
        )
    requests = [loadgen.http_request(host, port, path, b) for b in bodies]
    return loadgen.HttpClient(
        host, port, requests, flag=scenario.flag, max_connections=cmd.get("max_connections", 512)
    )


async def _load(cmd: dict[str, Any]) -> dict[str, Any]:
    client = await make_client(cmd)
    keep = bool(cmd.get("timing", False))
    try:
        mode = cmd["mode"]
        if mode == "serial":
            r = await loadgen.serial(client, cmd["n"], warmup=cmd["warmup"], keep_timing=keep)
        elif mode == "open":
            r = await loadgen.open_loop(
                client,
                cmd["rate"],
                cmd["duration_s"],
                warmup_s=cmd["warmup_s"],
                drain_s=cmd.get("drain_s", 10.0),
                keep_timing=keep,
            )
        elif mode == "closed":
            r = await loadgen.closed_loop(
                client,
                cmd["concurrency"],
                cmd["duration_s"],
                warmup_s=cmd["warmup_s"],
                keep_timing=keep,
            )
        else:
            raise ValueError(f"unknown mode {mode!r}")
    finally:
        await client.aclose()
    return r.summary()


def _run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """uvloop when available: cheaper, and its timers keep the schedule tighter."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def handle(cmd: dict[str, Any]) -> dict[str, Any]:
    if cmd["op"] == "load":
        return _run(_load(cmd))
    if cmd["op"] == "ceiling":
        from loadtests import ceiling

        registry = Path(cmd.get("registry", REGISTRY))
        return ceiling.measure(SCENARIOS[cmd["scenario"]], cmd["seconds_per_size"], registry)
    raise ValueError(f"unknown op {cmd['op']!r}")


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            out: dict[str, Any] = {"ok": True, "result": handle(cmd)}
        except Exception as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
