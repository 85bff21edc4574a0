"""The model-quality loop end to end, unattended, on real Ray, Redis and PostgreSQL:
drifted traffic with labels → a trigger (accuracy for `fraudloop`, PSI for `fraudbad`)
→ a new version trained from the prediction log → a canary judged on accuracy from
labels → promoted (fraudloop) or, with a deliberately worse retrain command (labels
inverted), rolled back (fraudbad). The whole loop must take under 5 minutes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import psycopg

from serving.quality.queries import accuracy, parse_time
from tests.e2e.conftest import TOKEN, GatewayUnderTest
from tests.e2e.test_gateway import records

LOOP_BUDGET_S = 300.0
AMOUNT_SCALE = 2.5  # the drift: amounts grow (PSI of `amount` rises)


def _drifted(gw: GatewayUnderTest, n: int) -> tuple[list[dict[str, Any]], float]:
    """Held-out transactions with larger amounts, and the new rule's threshold: from now
    on a transaction is "fraud" exactly when its amount is above the median (a concept
    the deployed model never learnt: its accuracy drops to about half)."""
    recs = records(gw.registry, n)
    for r in recs:
        r["amount"] = float(r["amount"]) * AMOUNT_SCALE  # type: ignore[arg-type]
    threshold = float(np.median([r["amount"] for r in recs]))
    return recs, threshold


def _predict_and_label(
    client: httpx.Client, model: str, batch: list[dict[str, Any]], threshold: float
) -> tuple[str, int, int]:
    """One prediction of a batch, then its labels under the new rule, presented with
    the answer's own feedback key. (version, labelled, correct)."""
    r = client.post(f"/v1/models/{model}:predict", json={"instances": batch})
    assert r.status_code == 200, r.text
    answer = r.json()
    truth = [int(float(x["amount"]) > threshold) for x in batch]
    body = {
        "request_id": answer["request_id"],
        "label": truth,
        "feedback_key": answer["feedback_key"],
    }
    f = client.post("/v1/feedback", json=body)
    assert f.status_code == 200, f.text
    got = [p["label"] for p in answer["predictions"]]
    return answer["version"], len(truth), sum(int(a == b) for a, b in zip(got, truth))


def _admin(client: httpx.Client, path: str) -> Any:
    r = client.get(path, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return r.json()


def _rollout(client: httpx.Client, model: str) -> dict[str, Any]:
    status: dict[str, Any] = _admin(client, f"/admin/v1/models/{model}/rollout")
    return status


def test_drift_retrains_canaries_and_promotes_or_rolls_back(gateway: GatewayUnderTest) -> None:
    recs, threshold = _drifted(gateway, 6000)
    t0 = time.monotonic()
    seen: dict[tuple[str, str], list[int]] = {}
    with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
        # Before any label: nothing to act on, and the policy is there to read.
        st = _admin(client, "/admin/v1/models/fraudloop/retrain")
        assert st["last"] is None and st["policy"]["accuracy"]["drop"] == 0.1
        done: dict[str, str] = {}
        i = 0
        while len(done) < 2:
            assert time.monotonic() - t0 < LOOP_BUDGET_S, (
                f"loop not closed in {LOOP_BUDGET_S:g}s: {done}; "
                f"fraudloop {_rollout(client, 'fraudloop')['rollout']}, "
                f"fraudbad {_rollout(client, 'fraudbad')['rollout']}"
            )
            # Bursts of 40 until the triggers have their labels, then 20 at a time.
            size = 40 if i < 40 else 20
            for model in ("fraudloop", "fraudbad"):
                if model in done:
                    continue
                batch = [recs[(i * size + k) % len(recs)] for k in range(size)]
                version, n, correct = _predict_and_label(client, model, batch, threshold)
                tally = seen.setdefault((model, version), [0, 0])
                tally[0] += n
                tally[1] += correct
                if i % 10 == 0:
                    status = _rollout(client, model)["rollout"]["status"]
                    if status in ("completed", "rolled_back"):
                        done[model] = status
            i += 1
        elapsed = time.monotonic() - t0
        assert done == {"fraudloop": "completed", "fraudbad": "rolled_back"}, done

        # fraudloop: an accuracy trigger, r1 trained from the log, canaried, promoted.
        (run,) = _admin(client, "/admin/v1/models/fraudloop/retrain/history")["runs"]
        assert run["status"] == "registered" and run["version"] == "r1", run
        assert run["reason"].startswith("accuracy") and run["actor"] == "auto"
        assert run["base"] == "v1" and run["rollout"] == "canary started"
        assert "training" in run["output"] or run["output"], run
        status = _rollout(client, "fraudloop")
        assert status["routing"]["stable"] == "r1" and status["routing"]["canary"] is None
        actions = [d["action"] for d in status["history"]]
        assert "complete" in actions and "rollback" not in actions
        # fraudbad: a drift trigger, its worse version rolled back on accuracy.
        (run,) = _admin(client, "/admin/v1/models/fraudbad/retrain/history")["runs"]
        assert run["reason"].startswith("PSI of feature") and run["status"] == "registered"
        status = _rollout(client, "fraudbad")
        assert status["routing"]["stable"] == "v1"
        rollback = next(d for d in status["history"] if d["action"] == "rollback")
        assert "canary accuracy" in rollback["reason"]

        # The promoted version answers the new rule far better than the old one did.
        before = seen[("fraudloop", "v1")]
        _, n, correct = _predict_and_label(client, "fraudloop", recs[:200], threshold)
        assert correct / n > before[1] / before[0] + 0.2, (correct / n, before)
    print(f"quality loop closed in {elapsed:.0f}s")

    # The durable log holds both versions' labelled predictions: accuracy is a query.
    by_version = {a["version"]: a for a in accuracy(gateway.log_dsn, "fraudloop", parse_time("1h"))}
    assert by_version["r1"]["accuracy"] > by_version["v1"]["accuracy"] + 0.2, by_version
    with psycopg.connect(gateway.log_dsn) as conn:
        (inputs,) = conn.execute(
            "SELECT inputs FROM predictions WHERE model = 'fraudloop' LIMIT 1"
        ).fetchone() or (None,)
    assert inputs is not None and "user_stats.txn_count_30d" in inputs["features"]  # looked up
    # The CLI reads the same history.
    env = {**os.environ, "SERVING_ADMIN_TOKEN": TOKEN}
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "retrain", "history", "fraudloop",
         "--url", gateway.url],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "r1" in out and "registered" in out
