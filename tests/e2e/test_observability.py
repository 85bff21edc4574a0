"""Observability end to end: delayed labels and accuracy, drift, autoscaling, and a real
Prometheus scraping the gateway's metrics port with every dashboard query returning data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import free_port
from tests.e2e.conftest import FEEDBACK_TOKEN, TOKEN, GatewayUnderTest
from tests.e2e.test_gateway import records

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deployments" / "grafana" / "dashboards" / "serving.json"


def predict(gw: GatewayUnderTest, model: str, version: str, instances: list[Any]) -> httpx.Response:
    r = httpx.post(
        f"{gw.url}/v1/models/{model}/versions/{version}:predict",
        json={"instances": instances},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r


def monitoring(gw: GatewayUnderTest, model: str, version: str) -> dict[str, Any]:
    r = httpx.get(
        f"{gw.url}/admin/v1/models/{model}/versions/{version}/monitoring",
        headers=gw.admin(),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def feedback(gw: GatewayUnderTest, body: Any, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{gw.url}/v1/feedback", json=body, headers=headers, timeout=30)


def test_accuracy_equals_the_fraction_from_the_labels_sent(gateway: GatewayUnderTest) -> None:
    x = np.load(gateway.registry / "digits" / "heldout.npz")["X"]
    sent: list[tuple[str, int, str]] = []
    for i in range(40):
        r = predict(gateway, "digits", "v1", [x[i].tolist()])
        answer = r.json()
        assert answer["feedback_key"] == r.headers["x-serving-feedback-key"]
        sent.append(
            (answer["request_id"], answer["predictions"][0]["label"], answer["feedback_key"])
        )
    # Without the answer's key (or the feedback token) nobody labels a prediction:
    # neither with no key, nor another answer's key, nor the admin token.
    rid0, pred0, key0 = sent[0]
    assert feedback(gateway, {"request_id": rid0, "label": pred0}).status_code == 401
    r = feedback(gateway, {"request_id": rid0, "label": pred0, "feedback_key": sent[1][2]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert feedback(gateway, {"request_id": rid0, "label": pred0}, TOKEN).status_code == 401
    # Label 30 correctly and 10 wrongly: accuracy must be exactly 0.75.
    body = [
        {"request_id": rid, "label": pred if i < 30 else (pred + 1) % 10, "feedback_key": key}
        for i, (rid, pred, key) in enumerate(sent)
    ]
    r = feedback(gateway, body)
    assert r.status_code == 200, r.text
    assert sum(x["correct"] for x in r.json()["results"]) == 30
    acc = monitoring(gateway, "digits", "v1")["accuracy"]
    assert acc["5m"] == pytest.approx(0.75) and acc["1h"] == pytest.approx(0.75)
    # Repeating a label is idempotent; a different one is a conflict.
    again = feedback(gateway, body[0])
    assert again.status_code == 200 and again.json()["results"][0]["duplicate"] is True
    other = feedback(gateway, {"request_id": rid0, "label": (pred0 + 3) % 10, "feedback_key": key0})
    assert other.status_code == 409
    # The trusted label source (the feedback token) needs no key: same conflict.
    other = feedback(gateway, {"request_id": rid0, "label": (pred0 + 3) % 10}, FEEDBACK_TOKEN)
    assert other.status_code == 409
    assert monitoring(gateway, "digits", "v1")["accuracy"]["5m"] == pytest.approx(0.75)
    # Unknown (or expired) ids: 404 naming the id, and nothing applied.
    r = feedback(
        gateway,
        [{"request_id": sent[1][0], "label": 1}, {"request_id": "no-such-id", "label": 1}],
        FEEDBACK_TOKEN,
    )
    assert r.status_code == 404 and "no-such-id" in r.json()["error"]["message"]
    r = feedback(gateway, {"request_id": 5})
    assert r.status_code == 400


def test_psi_rises_when_the_inputs_shift(gateway: GatewayUnderTest) -> None:
    recs = records(gateway.registry, 1200)
    for i in range(0, 1200, 100):
        predict(gateway, "fraud", "v1", recs[i : i + 100])
    calm = monitoring(gateway, "fraud", "v1")["psi"]
    assert calm["features"]["amount"] < 0.1, calm
    shifted = [{**r, "amount": float(r["amount"]) * 25 + 500} for r in recs] * 2
    for i in range(0, len(shifted), 100):
        predict(gateway, "fraud", "v1", shifted[i : i + 100])
    drift = monitoring(gateway, "fraud", "v1")["psi"]
    assert drift["features"]["amount"] > 0.25, drift
    assert drift["features"]["amount"] > 5 * calm["features"]["amount"]
    assert drift["prediction"] is not None


def _replicas(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments["ModelReplica"].replica_states
    return int(states.get("RUNNING", 0))


def test_latency_policy_scales_up_under_load_then_down(gateway: GatewayUnderTest) -> None:
    app = "model-scaleme-v1"
    assert _replicas(app) == 1
    img = np.load(gateway.registry / "digits" / "heldout.npz")["X"][:1].tolist()
    stop = threading.Event()
    sent = {"n": 0}

    def load() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                c.post(f"{gateway.url}/v1/models/scaleme:predict", json={"instances": img})
                sent["n"] += 1

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    peak = 1
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and peak < 2:
            time.sleep(1)
            peak = max(peak, _replicas(app))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert peak == 2, "never scaled up under load"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _replicas(app) > 1:
        assert _replicas(app) <= 2  # bounded by max_replicas
        time.sleep(1)
    assert _replicas(app) == 1, "did not scale down after the load stopped"


# ---- Prometheus ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus(
    gateway: GatewayUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (make test installs Debian's package)")
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (folder / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "serving",
                        "static_configs": [{"targets": [f"127.0.0.1:{gateway.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    assert r.status_code == 200, (expr, r.text)
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def wait_query(prom: str, expr: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(prom, expr)
        if result:
            return result
        time.sleep(1)
    return []


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for p in board["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    out = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t["expr"]
            # Grafana variables: every model; a fixed range for rate windows.
            expr = re.sub(r'(\w+)\s*=~?\s*"\$model"', r'\1=~".+"', expr)
            expr = expr.replace("$model", ".+")
            expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            expr = expr.replace("$__range", "1h")
            out.append((p.get("title", "?"), expr))
    return out


def test_request_counts_and_batch_sizes_in_prometheus(
    gateway: GatewayUnderTest, prometheus: str
) -> None:
    img = np.load(gateway.registry / "digits" / "heldout.npz")["X"][:1].tolist()

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            await asyncio.gather(
                *(
                    c.post(
                        f"{gateway.url}/v1/models/fraud/versions/v2:predict",
                        json={"instances": [r]},
                    )
                    for r in records(gateway.registry, 64)
                )
            )

    asyncio.run(burst())
    # `rollme` v1 serves only what this test sends it (its rollouts come later, in
    # test_rollout): the count must match.
    before = query(
        prometheus, 'sum(ray_serving_requests_total{model="rollme",version="v1",code="ok"})'
    )
    base = float(before[0]["value"][1]) if before else 0.0
    for _ in range(17):
        httpx.post(
            f"{gateway.url}/v1/models/rollme:predict",
            json={"instances": img},
            headers={"x-serving-version": "v1"},
            timeout=60,
        )
    expr = 'sum(ray_serving_requests_total{model="rollme",version="v1",code="ok"})'
    deadline = time.monotonic() + 60
    value = base
    while time.monotonic() < deadline:
        result = query(prometheus, expr)
        value = float(result[0]["value"][1]) if result else 0.0
        if value >= base + 17:
            break
        time.sleep(1)
    assert value == base + 17
    big = wait_query(
        prometheus,
        'sum(ray_serving_batch_size_count{model="fraud"})'
        ' - sum(ray_serving_batch_size_bucket{model="fraud",le="1.0"})',
    )
    assert big and float(big[0]["value"][1]) > 0, "no batch larger than 1 recorded"


def test_every_dashboard_query_returns_data(gateway: GatewayUnderTest, prometheus: str) -> None:
    # Make every kind of event the dashboard shows happen, twice where a panel shows a
    # counter's increase (a counter first seen at 1 has not increased yet).
    recs = records(gateway.registry, 20)
    rollout = f"{gateway.url}/admin/v1/models/fraud/rollout"
    for _ in range(3):
        predict(gateway, "fraud", "v2", recs)
    for round_ in range(2):
        on = {"action": "shadow", "version": "v1", "sample": 1.0}
        r = httpx.post(rollout, headers=gateway.admin(), json=on, timeout=120)
        assert r.status_code == 200, r.text
        for _ in range(5):
            httpx.post(
                f"{gateway.url}/v1/models/fraud:predict", json={"instances": recs}, timeout=60
            )
        off = {"action": "shadow", "off": True}
        httpx.post(rollout, headers=gateway.admin(), json=off, timeout=120)
        # A client error and a degraded answer (unknown entity).
        httpx.post(f"{gateway.url}/v1/models/fraud:predict", json={"instances": [{}]})
        predict(gateway, "fraud", "v2", [{**recs[0], "user_id": "u-none"}])
        if round_ == 0:  # Prometheus sees the counters once before the second round
            for counter in ("shadow_requests_total", "degraded_responses_total"):
                assert wait_query(prometheus, f'sum(ray_serving_{counter}{{model="fraud"}})')
    rid = predict(
        gateway,
        "digits",
        "v1",
        np.load(gateway.registry / "digits" / "heldout.npz")["X"][:1].tolist(),
    ).json()["request_id"]
    feedback(gateway, {"request_id": rid, "label": 1}, FEEDBACK_TOKEN)
    # Gauges are published every few seconds and scraped every second: poll all the
    # queries together until each has returned data once.
    pending = dict.fromkeys(dashboard_queries())
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        for title, expr in list(pending):
            if query(prometheus, expr):
                del pending[(title, expr)]
        time.sleep(2)
    empty = [f"{title}: {expr}" for title, expr in pending]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def _metric_total(gw: GatewayUnderTest, name: str, model: str, version: str) -> float:
    """The sum of every series of `name` for one version (all processes of the node)."""
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith(name + "{")
            and f'model="{model}"' in line
            and f'version="{version}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_histogram_sums_match_the_traffic_sent(gateway: GatewayUnderTest) -> None:
    """Every mean a dashboard computes is `_sum / _count`: after known traffic the
    batch-size histogram's sum grows by exactly the rows sent, its count by the batches."""
    from tests.e2e.test_gateway import heldout

    images = heldout(gateway.registry, "digits")[0]
    name = "ray_serving_batch_size"
    before_sum = _metric_total(gateway, name + "_sum", "digits", "v1fused")
    before_count = _metric_total(gateway, name + "_count", "digits", "v1fused")
    rows = 0
    for n in (1, 3, 5, 7):  # one request at a time: one batch each
        r = predict(gateway, "digits", "v1fused", images[:n].tolist())
        assert r.status_code == 200, r.text
        rows += n
    deadline = time.monotonic() + 30
    while True:
        grown = _metric_total(gateway, name + "_sum", "digits", "v1fused") - before_sum
        batches = _metric_total(gateway, name + "_count", "digits", "v1fused") - before_count
        if grown >= rows and batches >= 4:
            break
        assert time.monotonic() < deadline, f"sum grew {grown} of {rows}, count {batches}"
        time.sleep(0.5)
    assert (grown, batches) == (rows, 4)
