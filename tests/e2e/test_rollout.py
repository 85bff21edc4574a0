"""Canary rollouts end to end on the `rollme` model (real Ray, Redis and HTTP).

The tests run in order and share the model's history: v2 is promoted, then the faulty
v3bad and the slow v4slow are rolled back, then shadowing and a restart are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import TOKEN, GatewayUnderTest

MODEL = "rollme"


def images(registry: Path, n: int, faulty_share: float = 0.0) -> list[list[list[float]]]:
    x = np.load(registry / "digits" / "heldout.npz")["X"][:n].copy()
    x[:, 0, 0] = 0.0
    x[: int(n * faulty_share), 0, 0] = 1.0  # v3bad fails on these (a whole batch does)
    return x.tolist()


def admin(gw: GatewayUnderTest, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"{gw.url}/admin/v1/models/{MODEL}/rollout"
    if body is None:
        r = httpx.get(url, headers=gw.admin(), timeout=30)
    else:
        r = httpx.post(url, headers=gw.admin(), json=body, timeout=600)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


class Traffic:
    """Background clients sending one image per request, each with a user header."""

    def __init__(self, gw: GatewayUnderTest, imgs: list[Any], clients: int = 3) -> None:
        self.gw, self.imgs = gw, imgs
        self.stop = threading.Event()
        self.results: list[tuple[int, str, str, float, str]] = []  # status, version, arm, s, user
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                i = int(rng.integers(len(self.imgs)))
                user = f"user-{rng.integers(1_000_000)}"
                t0 = time.monotonic()
                r = c.post(
                    f"{self.gw.url}/v1/models/{MODEL}:predict",
                    json={"instances": [self.imgs[i]]},
                    headers={"x-user": user},
                )
                body = r.json()
                with self.lock:
                    self.results.append(
                        (
                            r.status_code,
                            body.get("version", ""),
                            body.get("arm", ""),
                            time.monotonic() - t0,
                            user,
                        )
                    )

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def snapshot(self) -> list[tuple[int, str, str, float, str]]:
        with self.lock:
            return list(self.results)


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; last seen: {last!r}")


def wait_status(gw: GatewayUnderTest, want: str, timeout_s: float) -> dict[str, Any]:
    """Poll the rollout until its status is `want`; fail at once, with the state, when
    it ends any other way (a decision the test did not expect) or on the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = admin(gw)
        status = s["rollout"]["status"]
        if status == want:
            return s
        if status not in ("running", "paused") or time.monotonic() > deadline:
            what = f"status {status!r}" if status not in ("running", "paused") else "timeout"
            pytest.fail(f"waiting for {want!r}: {what}\n{json.dumps(s, indent=1)[:4000]}")
        time.sleep(0.5)


def app_names() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


@pytest.fixture(autouse=True)
def _no_rollout_left_by_a_failure(
    gateway: GatewayUnderTest, request: pytest.FixtureRequest
) -> Iterator[None]:
    """A test that fails mid-rollout has it rolled back, so the next test does not fail
    on the 409 it would leave (the first failure is the one to read). Passing tests hand
    their state on: the tests run in order."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        return
    if admin(gateway)["rollout"]["status"] in ("running", "paused"):
        admin(gateway, {"action": "rollback"})


def test_admin_calls_need_the_token(gateway: GatewayUnderTest) -> None:
    url = f"{gateway.url}/admin/v1/models/{MODEL}/rollout"
    assert httpx.get(url, timeout=10).status_code == 401
    r = httpx.post(
        url, json={"action": "rollback"}, timeout=10, headers={"authorization": "Bearer wrong"}
    )
    assert r.status_code == 401


def test_healthy_canary_walks_every_step_and_becomes_stable(gateway: GatewayUnderTest) -> None:
    imgs = images(gateway.registry, 40)
    with Traffic(gateway, imgs) as traffic:
        wait_for(lambda: len(traffic.snapshot()) > 5, 60, "traffic")
        status = admin(
            gateway,
            {
                "action": "start",
                "to": "v2",
                "steps": [20, 60, 100],
                "interval_s": 3,
                "min_requests": 10,
                "sticky_key": "header:x-user",
            },
        )
        assert status["routing"]["canary"] == "v2"
        assert status["routing"]["canary_weight"] == 20
        started_at = status["rollout"]["window_start"]
        # The status says when the analysis last looked (and who leads it).
        seen = wait_for(
            lambda: (a := admin(gateway)["analysis"]) and a["at"] >= started_at and a,
            20,
            "the analysis to run",
        )
        assert seen["leader"]
        started = len(traffic.snapshot())
        done = wait_status(gateway, "completed", 180)
        after_start = traffic.snapshot()[started:]
    assert done["routing"]["stable"] == "v2" and done["routing"]["canary"] is None
    actions = [d["action"] for d in reversed(done["history"])]
    assert actions[0] == "start" and actions.count("advance") == 2 and actions[-1] == "complete"
    # Traffic split at the first step, and nothing failed during deploy and promote.
    arms = Counter(arm for _, _, arm, _, _ in after_start)
    assert arms["canary"] > 0 and arms["stable"] > 0
    assert {status for status, *_ in traffic.snapshot()} == {200}
    wait_for(lambda: "model-rollme-v1" not in app_names(), 60, "v1 to be retired")
    r = httpx.post(f"{gateway.url}/v1/models/{MODEL}:predict", json={"instances": imgs[:1]})
    assert r.json()["version"] == "v2" and r.json()["arm"] == "stable"


def test_faulty_canary_is_rolled_back_within_two_intervals(gateway: GatewayUnderTest) -> None:
    imgs = images(gateway.registry, 40, faulty_share=0.3)
    with Traffic(gateway, imgs) as traffic:
        status = admin(
            gateway,
            {
                "action": "start",
                "to": "v3bad",
                "steps": [50, 100],
                "interval_s": 4,
                "min_requests": 10,
                "max_error_rate": 0.05,
            },
        )
        t0 = time.monotonic()
        assert status["routing"]["canary"] == "v3bad"
        done = wait_status(gateway, "rolled_back", 60)
        elapsed = time.monotonic() - t0
        # Requests in flight at the rollback still complete.
        mark = len(traffic.snapshot())
        wait_for(lambda: len(traffic.snapshot()) > mark + 20, 60, "more traffic")
        after = traffic.snapshot()[mark + 5 :]
    assert elapsed < 2 * 4 + 4  # two intervals plus the time the decision takes to land
    last = done["history"][0]
    assert last["action"] == "rollback" and last["actor"] == "auto"
    assert "error rate" in last["reason"]
    assert done["routing"]["canary"] is None and done["routing"]["stable"] == "v2"
    assert {v for _, v, _, _, _ in after} == {"v2"}
    assert {s for s, *_ in after} == {200}
    wait_for(lambda: "model-rollme-v3bad" not in app_names(), 60, "v3bad to be retired")


def test_slow_canary_is_rolled_back(gateway: GatewayUnderTest) -> None:
    imgs = images(gateway.registry, 40)
    with Traffic(gateway, imgs):
        admin(
            gateway,
            {
                "action": "start",
                "to": "v4slow",
                "steps": [50, 100],
                "interval_s": 4,
                "min_requests": 8,
                "max_p99_ms": 200,
            },
        )
        done = wait_status(gateway, "rolled_back", 90)
    assert "p99" in done["history"][0]["reason"]
    assert done["routing"]["stable"] == "v2"


def test_shadow_failures_stay_invisible(gateway: GatewayUnderTest) -> None:
    imgs = images(gateway.registry, 40, faulty_share=0.5)
    status = admin(gateway, {"action": "shadow", "version": "v3bad", "sample": 1.0})
    assert status["routing"]["shadow"] == "v3bad"

    def both_kinds() -> dict[str, Any] | None:
        """The shadow's figures once they hold failed copies and answered ones (v3bad
        fails a whole batch that holds a faulty image, so answered ones may lag)."""
        f = admin(gateway)["window"]["figures"].get("v3bad", {}).get("shadow")
        return f if f and 0 < f["errors"] < f["requests"] else None

    with Traffic(gateway, imgs) as traffic:
        wait_for(lambda: len(traffic.snapshot()) > 60, 120, "traffic")
        shadow = wait_for(both_kinds, 60, "shadow figures with errors and answers")
    results = traffic.snapshot()
    assert {s for s, *_ in results} == {200}
    assert {v for _, v, _, _, _ in results} == {"v2"}
    assert 0 < shadow["agreement"] <= 1, shadow
    status = admin(gateway, {"action": "shadow", "off": True})
    assert status["routing"]["shadow"] is None


def test_pin_header_and_cli(gateway: GatewayUnderTest) -> None:
    imgs = images(gateway.registry, 1)
    admin(gateway, {"action": "start", "to": "v1", "steps": [30], "interval_s": 3600})
    r = httpx.post(
        f"{gateway.url}/v1/models/{MODEL}:predict",
        json={"instances": imgs},
        headers={"x-serving-version": "v1"},
        timeout=30,
    )
    assert (r.json()["version"], r.json()["arm"]) == ("v1", "pinned")
    env = {**os.environ, "SERVING_ADMIN_TOKEN": TOKEN, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "serving.cli", "rollout"]
    out = subprocess.run(
        [*cli, "set-weight", MODEL, "45.5", "--url", gateway.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [*cli, "status", MODEL, "--url", gateway.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0 and "v1 at 45.5%" in out.stdout, out.stdout + out.stderr
    assert "analysis last ran" in out.stdout, out.stdout
    out = subprocess.run(
        [*cli, "start", MODEL, "--to", "v2", "--url", gateway.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1 and "409" in out.stderr  # one rollout at a time


def _ingress_process(gw: GatewayUnderTest) -> str:
    """Which process answers: fraud v2 is fused, so its worker is the ingress's own."""
    r = httpx.get(
        f"{gw.url}/admin/v1/models/fraud/versions/v2/batching", headers=gw.admin(), timeout=10
    )
    assert r.status_code == 200, r.text
    replica: str = r.json()["replica"]  # "fraud/v2@<pid>"
    return replica


def test_routing_state_survives_an_ingress_restart(gateway: GatewayUnderTest) -> None:
    import ray

    before = admin(gateway)["routing"]
    assert before["canary"] == "v1" and before["canary_weight"] == 45.5
    old = _ingress_process(gateway)
    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Gateway" in a["name"]
    ]
    assert names
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def routed() -> dict[str, Any]:
        """The routing as a new ingress process sees it: ray.kill returns before the
        old one is gone, and until then it still answers."""
        try:
            if _ingress_process(gateway) == old:
                return {}
            return admin(gateway)["routing"]
        except (AssertionError, httpx.HTTPError, KeyError):
            return {}

    after = wait_for(routed, 120, "the restarted ingress")
    assert (after["stable"], after["canary"], after["canary_weight"]) == ("v2", "v1", 45.5)
    versions = Counter(
        httpx.post(
            f"{gateway.url}/v1/models/{MODEL}:predict",
            json={"instances": images(gateway.registry, 1)},
            timeout=30,
        ).json()["version"]
        for _ in range(40)
    )
    assert versions["v1"] > 0 and versions["v2"] > 0
    status = admin(gateway, {"action": "rollback"})
    assert status["routing"]["canary"] is None


def test_a_killed_controller_resumes_the_rollout(gateway: GatewayUnderTest) -> None:
    """The control plane is one replica of its own: killed mid-rollout, Serve starts
    another, which takes the analysis over and walks the rollout on from where it was
    (its state is in Redis); the ingress keeps serving meanwhile."""
    import ray

    assert admin(gateway)["rollout"]["status"] not in ("running", "paused")
    stable = admin(gateway)["routing"]["stable"]
    to = "v1" if stable != "v1" else "v2"
    imgs = images(gateway.registry, 40)
    with Traffic(gateway, imgs) as traffic:
        wait_for(lambda: len(traffic.snapshot()) > 5, 60, "traffic")
        started = admin(
            gateway,
            {
                "action": "start",
                "to": to,
                "steps": [30, 60, 100],
                "interval_s": 3,
                "min_requests": 10,
            },
        )
        first = wait_for(lambda: admin(gateway)["analysis"], 20, "the analysis to run")
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "RolloutControl" in a["name"]
        ]
        assert len(names) == 1
        killed_at = time.time()
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        done = wait_status(gateway, "completed", 180)
    assert done["routing"]["stable"] == to
    history = list(reversed(done["history"]))
    last_start = max(i for i, d in enumerate(history) if d["action"] == "start")
    since_start = history[last_start:]
    after_kill = [d["action"] for d in since_start if d["ts"] > killed_at]
    assert "complete" in after_kill, since_start
    # Each decision one revision on from the one before: nothing overwritten.
    revisions = [d["revision"] for d in since_start]
    assert revisions == list(range(revisions[0], revisions[0] + len(revisions)))
    assert revisions[0] == started["routing"]["revision"]
    assert done["analysis"]["leader"] != first["leader"]  # a new controller decided
    assert {status for status, *_ in traffic.snapshot()} == {200}
