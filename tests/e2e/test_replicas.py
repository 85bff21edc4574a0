"""Model replicas behind the ingress: the direct channel in use, bursts that batch
whatever the placement, and a replica killed under load that costs no request."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from typing import Any

import httpx
import numpy as np
import orjson

from tests.e2e.conftest import GatewayUnderTest
from tests.e2e.test_gateway import direct, heldout


def _batching(gw: GatewayUnderTest, model: str, version: str) -> dict[str, Any]:
    url = f"{gw.url}/admin/v1/models/{model}/versions/{version}/batching"
    r = httpx.get(url, headers=gw.admin(), timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _wait_direct(gw: GatewayUnderTest, model: str, version: str, replicas: int) -> dict[str, Any]:
    """Send a request, then poll until the ingress reaches the version directly."""
    image = heldout(gw.registry, "digits")[0][:1].tolist()
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(
            f"{gw.url}/v1/models/{model}/versions/{version}:predict",
            json={"instances": image},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        ingress = _batching(gw, model, version)["ingress"]
        if ingress.get("channel") == "direct" and ingress["replicas"] == replicas:
            return ingress
        assert time.monotonic() < deadline, f"never direct: {ingress}"
        time.sleep(0.2)


def test_a_replica_version_answers_over_the_direct_channel(gateway: GatewayUnderTest) -> None:
    _wait_direct(gateway, "digits", "v1", 1)
    x = heldout(gateway.registry, "digits")[0][:20]
    r = httpx.post(
        f"{gateway.url}/v1/models/digits/versions/v1:predict",
        json={"instances": x.tolist()},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    # The connection opens on the first request that goes direct.
    ingress = _batching(gateway, "digits", "v1")["ingress"]
    assert ingress["placement"] == "replica" and ingress["connected"] == 1, ingress
    got = [p["label"] for p in r.json()["predictions"]]
    np.testing.assert_array_equal(got, direct(gateway.registry, "digits", "v1", x)["label"])
    assert _batching(gateway, "digits", "v1fused")["ingress"] == {"placement": "fused"}


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer's head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    return head, await reader.readexactly(length)


async def _burst_over_open_connections(
    url: str, path: str, body: bytes, n: int, ingress_pid: int
) -> list[int]:
    """Open `n` keep-alive connections and use each once (so the server has accepted
    them all), then write one request on each while the ingress process is held still
    (SIGSTOP): when it resumes all of them wait in its sockets, a burst however slowly
    this client writes. The batch size each answer ran in."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    for reader, writer in conns:
        writer.write(f"GET /healthz HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        head, _ = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200"), head
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    os.kill(ingress_pid, signal.SIGSTOP)
    try:
        for _, writer in conns:
            writer.write(request)  # small: the kernel takes it now, no drain needed
        await asyncio.sleep(0.05)
    finally:
        os.kill(ingress_pid, signal.SIGCONT)
    sizes = []
    for reader, writer in conns:
        head, _ = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200"), head
        sizes.append(int(re.search(rb"x-serving-batch-size: (\d+)", head).group(1)))  # type: ignore[union-attr]
        writer.close()
    return sizes


def _batches_over_one(gw: GatewayUnderTest, version: str) -> float:
    """Batches of more than one instance that digits `version` has run (Ray's metrics
    endpoint, every replica on this node)."""
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).text
    total = ones = 0.0
    for line in text.splitlines():
        if not line.startswith("ray_serving_batch_size_") or f'version="{version}"' not in line:
            continue
        if 'model="digits"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("ray_serving_batch_size_count"):
            total += value
        elif line.startswith("ray_serving_batch_size_bucket") and 'le="1.0"' in line:
            ones += value
    return total - ones


def test_a_burst_batches_whatever_the_placement(gateway: GatewayUnderTest) -> None:
    image = heldout(gateway.registry, "digits")[0][:1].tolist()
    body = orjson.dumps({"instances": image})
    _wait_direct(gateway, "digits", "v1", 1)
    # A fused version runs in the ingress's own process: its pid is the ingress's.
    ingress_pid = int(_batching(gateway, "digits", "v1fused")["replica"].rsplit("@", 1)[1])
    for version in ("v1fused", "v1"):
        before = _batches_over_one(gateway, version)
        for _ in range(3):  # every burst batches, not one in a while
            sizes = asyncio.run(
                _burst_over_open_connections(
                    gateway.url,
                    f"/v1/models/digits/versions/{version}:predict",
                    body,
                    64,
                    ingress_pid,
                )
            )
            assert max(sizes) > 1, (version, sizes)
        # The batch-size metric agrees with the header (exported every second).
        deadline = time.monotonic() + 30
        while _batches_over_one(gateway, version) < before + 3:
            assert time.monotonic() < deadline, f"{version}: no batch > 1 in the metrics"
            time.sleep(0.5)


def _replica_actors(app: str) -> list[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"]["ModelReplica"]["replicas"]
    return [r["actor_name"] for r in replicas if r["state"] == "RUNNING"]


def test_a_replica_killed_under_load_costs_no_request(gateway: GatewayUnderTest) -> None:
    import ray

    _wait_direct(gateway, "killme", "v1", 2)
    actors = _replica_actors("model-killme-v1")
    assert len(actors) == 2
    x = heldout(gateway.registry, "digits")[0][:8].tolist()
    stop = threading.Event()
    answers: list[int] = []
    failures: list[str] = []

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                r = client.post(
                    f"{gateway.url}/v1/models/killme:predict", json={"instances": [x[i % 8]]}
                )
                answers.append(r.status_code)
                if r.status_code != 200:
                    failures.append(r.text[:200])
                i += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(answers) < 200:  # load is flowing over both replicas
            assert time.monotonic() < deadline and not failures, failures[:3]
            time.sleep(0.05)
        ray.kill(ray.get_actor(actors[0], namespace="serve"), no_restart=True)
        killed_at = len(answers)
        while len(answers) < killed_at + 300:  # and keeps flowing past the kill
            assert time.monotonic() < deadline, f"{len(answers) - killed_at} answers since"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [], failures[:5]
    assert set(answers) == {200}
    # Serve replaces the replica; the ingress follows.
    _wait_direct(gateway, "killme", "v1", 2)
