"""The gateway end to end: real Ray Serve, real HTTP, the demo models."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.models.registry import Registry
from serving.models.runtimes import RuntimeOptions, load_runtime
from tests.e2e.conftest import GatewayUnderTest


def heldout(registry: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(registry / model / "heldout.npz")
    return data["X"], data["y"]


RAW = ("user_id", "merchant_id", "amount", "hour", "is_foreign", "card_present")


def records(registry: Path, n: int) -> list[dict[str, object]]:
    """Held-out fraud transactions as a client sends them: entity keys + request fields."""
    data = np.load(registry / "fraud" / "heldout.npz")
    cols = {c: data[c][:n].tolist() for c in RAW}
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def direct(registry: Path, model: str, version: str, x: np.ndarray) -> dict[str, np.ndarray]:
    mv = Registry(registry).get(model, version)
    return load_runtime(mv, RuntimeOptions(device="cpu")).predict({mv.manifest.inputs[0].name: x})


def post(gw: GatewayUnderTest, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=30.0, **kw)  # type: ignore[arg-type]


def test_readyz_said_503_naming_the_warming_version_before_200(gateway: GatewayUnderTest) -> None:
    codes = [c for c, _ in gateway.readiness_log]
    assert codes[-1] == 200
    not_ready = [b for c, b in gateway.readiness_log if c == 503]
    assert not_ready, f"never saw 503 before ready: {gateway.readiness_log}"
    # digits v1 warms for at least 15 s: some 503 names it (others may finish later).
    assert any("digits/v1" in body["waiting_for"] for body in not_ready)
    assert codes.index(503) < codes.index(200)


@pytest.mark.parametrize(("model", "version"), [("fraud", "v1"), ("fraud", "v2")])
def test_fraud_from_entity_keys_equals_the_offline_vectors(
    gateway: GatewayUnderTest, model: str, version: str
) -> None:
    """Features come from Redis; the answer equals the runtime's on the vectors the
    training pipeline built offline from the same records."""
    x, _ = heldout(gateway.registry, model)
    want = direct(gateway.registry, model, version, x[:200])
    r = post(
        gateway,
        f"/v1/models/{model}/versions/{version}:predict",
        {"instances": records(gateway.registry, 200)},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == (model, version)
    assert "degraded" not in body
    got_probs = np.array([p["probabilities"] for p in body["predictions"]], dtype=np.float32)
    got_labels = np.array([p["label"] for p in body["predictions"]])
    np.testing.assert_allclose(got_probs, want["probabilities"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got_labels, want["label"])
    assert "features;dur=" in r.headers["server-timing"]


def _defaults_vector(gateway: GatewayUnderTest, rec: dict[str, object]) -> np.ndarray:
    from serving.features.spec import build_vectors

    manifest = Registry(gateway.registry).get("fraud", "v2").manifest
    assert manifest.features is not None
    columns = manifest.features.resolve_columns(manifest.inputs[0].columns or [])
    return build_vectors(columns, [rec], {"user_stats": [None], "merchant_stats": [None]})


def test_unknown_entity_follows_the_policy(gateway: GatewayUnderTest) -> None:
    rec = {**records(gateway.registry, 1)[0], "user_id": "u-unknown", "merchant_id": "m-nope"}
    r = post(gateway, "/v1/models/fraud/versions/v2:predict", {"instances": [rec]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True
    assert body["degraded_reasons"] == ["user_stats:miss:u-unknown", "merchant_stats:miss:m-nope"]
    want = direct(gateway.registry, "fraud", "v2", _defaults_vector(gateway, rec))
    np.testing.assert_allclose(
        body["predictions"][0]["probabilities"], want["probabilities"][0], rtol=1e-6
    )
    # The `reject` policy names the view and key instead.
    err = _error(
        post(
            gateway,
            "/v1/models/fraud/versions/v1strict:predict",
            {"instances": [records(gateway.registry, 1)[0], rec]},
        ),
        422,
    )
    assert err["field"] == "instances[1].user_id"
    assert "u-unknown" in err["message"] and "user_stats" in err["message"]


def test_redis_down_then_back(gateway: GatewayUnderTest) -> None:
    """Redis stopped: every answer within the deadline plus a margin, per policy.
    Redis restarted (empty, then reloaded): lookups recover without a gateway restart."""
    from serving.features import materialize

    recs = records(gateway.registry, 3)
    gateway.redis.stop()
    try:
        for _ in range(5):
            t0 = time.monotonic()
            r = post(gateway, "/v1/models/fraud/versions/v2:predict", {"instances": recs})
            elapsed = time.monotonic() - t0
            assert r.status_code == 200, r.text
            assert r.json()["degraded"] is True
            assert {x.split(":")[1] for x in r.json()["degraded_reasons"]} <= {"error", "timeout"}
            assert elapsed < 0.5 + 1.0  # the feature deadline plus a generous margin
            r = post(gateway, "/v1/models/fraud/versions/v1strict:predict", {"instances": recs})
            assert _error(r, 503)["code"] == "feature_store_unavailable"
        # What needs Redis itself (rollout state, labels) says so: a 503, never a 500.
        r = httpx.get(
            f"{gateway.url}/admin/v1/models/fraud/rollout", headers=gateway.admin(), timeout=30
        )
        assert _error(r, 503)["code"] == "state_store_unavailable"
        assert r.headers["retry-after"] == "1"
        r = post(gateway, "/v1/feedback", {"request_id": "any", "label": 1, "feedback_key": "k"})
        assert _error(r, 503)["code"] == "state_store_unavailable"
    finally:
        gateway.redis.start()
    for view, key in (("user_stats", "user_id"), ("merchant_stats", "merchant_id")):
        materialize.load(
            gateway.redis.url,
            "serving",
            materialize.find_view(gateway.registry, view),
            gateway.registry / "fraud" / "features" / f"{view}.csv",
            key,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = post(gateway, "/v1/models/fraud/versions/v2:predict", {"instances": recs}).json()
        if "degraded" not in body:
            break
    assert "degraded" not in body, body


def test_digits_accuracy_over_http(gateway: GatewayUnderTest) -> None:
    x, y = heldout(gateway.registry, "digits")
    labels: list[int] = []
    for i in range(0, len(x), 100):
        r = post(gateway, "/v1/models/digits:predict", {"instances": x[i : i + 100].tolist()})
        assert r.status_code == 200, r.text
        labels += [p["label"] for p in r.json()["predictions"]]
    accuracy = float(np.mean(np.array(labels) == y))
    assert accuracy >= 0.95
    want = direct(gateway.registry, "digits", "v1", x)["label"]
    np.testing.assert_array_equal(labels, want)


async def _burst(
    gw: GatewayUnderTest, rows: list[dict[str, object]], version: str
) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(max_connections=128)) as c:
        return list(
            await asyncio.gather(
                *(
                    c.post(
                        f"{gw.url}/v1/models/fraud/versions/{version}:predict",
                        json={"instances": [row]},
                    )
                    for row in rows
                )
            )
        )


def test_64_concurrent_requests_are_correct_and_batched(gateway: GatewayUnderTest) -> None:
    x, _ = heldout(gateway.registry, "fraud")
    want = direct(gateway.registry, "fraud", "v2", x[:64])
    responses = asyncio.run(_burst(gateway, records(gateway.registry, 64), "v2"))
    assert [r.status_code for r in responses] == [200] * 64
    assert not [r.json()["degraded_reasons"] for r in responses if "degraded" in r.json()]
    got = np.array([r.json()["predictions"][0]["probabilities"] for r in responses])
    np.testing.assert_allclose(got, want["probabilities"], rtol=1e-6, atol=1e-7)
    sizes = [int(r.headers["x-serving-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes


def test_a_lone_request_does_not_wait_for_a_batch(gateway: GatewayUnderTest) -> None:
    """fraud v2 waits up to 10 ms for company when busy; one request at a time finds it
    idle and leaves at once (the concurrent test above shows batching under load)."""
    recs = records(gateway.registry, 12)
    queue_ms = []
    for rec in recs:
        r = post(gateway, "/v1/models/fraud/versions/v2:predict", {"instances": [rec]})
        assert r.status_code == 200 and r.headers["x-serving-batch-size"] == "1"
        stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
        queue_ms.append(float(stages["queue"]))
    assert sorted(queue_ms)[len(queue_ms) // 2] < 5.0, queue_ms


def test_live_reconfigure_changes_batch_size_without_restart(gateway: GatewayUnderTest) -> None:
    base = f"{gateway.url}/admin/v1/models/fraud/versions/v2/batching"
    before = httpx.get(base, headers=gateway.admin(), timeout=10).json()
    r = httpx.put(base, headers=gateway.admin(), json={"max_batch_size": 1}, timeout=60)
    assert r.status_code == 200, r.text
    now = httpx.get(base, headers=gateway.admin(), timeout=10).json()
    assert now["max_batch_size"] == 1
    assert now["replica"] == before["replica"]  # reconfigured in place, not restarted
    recs = records(gateway.registry, 64)
    responses = asyncio.run(_burst(gateway, recs[:32], "v2"))
    assert {int(r.headers["x-serving-batch-size"]) for r in responses} == {1}
    r = httpx.put(base, headers=gateway.admin(), json={"max_batch_size": 64}, timeout=60)
    assert r.status_code == 200
    responses = asyncio.run(_burst(gateway, recs, "v2"))
    assert max(int(r.headers["x-serving-batch-size"]) for r in responses) > 1


def test_admin_needs_the_token(gateway: GatewayUnderTest) -> None:
    base = f"{gateway.url}/admin/v1/models/fraud/versions/v2/batching"
    assert httpx.get(base, timeout=10).status_code == 401
    wrong = {"authorization": "Bearer nope"}
    r = httpx.put(base, headers=wrong, json={"max_batch_size": 2}, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthenticated"
    # The token is checked before the body is read: a bad body without it is a 401 too.
    for body in (b"not json", b'{"max_batch_size": "many"}'):
        r = httpx.put(base, headers=wrong, content=body, timeout=10)
        assert r.status_code == 401, r.text
    # With it, a body of the wrong type is a 400 naming the field.
    admin = gateway.admin()
    r = httpx.put(base, headers=admin, json={"max_batch_size": "many"}, timeout=10)
    assert _error(r, 400)["field"] == "max_batch_size"


def test_the_admin_token_never_enters_rays_config(gateway: GatewayUnderTest) -> None:
    """Any Ray driver can read the Serve config (and Ray logs the apps' arguments): it
    holds the token's SHA-256, never the token, and the admin API still takes it."""
    import hashlib

    from ray.serve.context import _get_global_client

    details = json.dumps(_get_global_client().get_serve_details())
    assert gateway.token not in details
    assert hashlib.sha256(gateway.token.encode()).hexdigest() in details
    r = httpx.get(
        f"{gateway.url}/admin/v1/models/fraud/versions/v2/batching",
        headers=gateway.admin(),
        timeout=10,
    )
    assert r.status_code == 200, r.text


def _error(r: httpx.Response, status: int) -> dict[str, str]:
    assert r.status_code == status, r.text
    err: dict[str, str] = r.json()["error"]
    assert err["message"]
    assert r.headers["x-serving-error-code"] == err["code"]  # every error answer names it
    return err


def test_unknown_model_and_version_are_404(gateway: GatewayUnderTest) -> None:
    err = _error(post(gateway, "/v1/models/nope:predict", {"instances": [[1]]}), 404)
    assert "nope" in err["message"] and "fraud" in err["message"]
    err = _error(post(gateway, "/v1/models/fraud/versions/v9:predict", {"instances": [[1]]}), 404)
    assert "v9" in err["message"]
    _error(httpx.get(gateway.url + "/v1/models/nope", timeout=10), 404)
    _error(httpx.get(gateway.url + "/no/such/route", timeout=10), 404)


def test_bad_requests_get_the_right_4xx_naming_the_problem(gateway: GatewayUnderTest) -> None:
    url = gateway.url + "/v1/models/digits:predict"
    img = [[0.0] * 8] * 8

    def send(content: bytes) -> httpx.Response:
        return httpx.post(
            url, content=content, timeout=30, headers={"content-type": "application/json"}
        )

    assert "JSON" in _error(send(b'{"instances": [1,'), 400)["message"]
    assert _error(send(b'{"inputs": []}'), 400)["field"] == "inputs"
    assert _error(send(b"[]"), 400)["code"] == "malformed_request"
    err = _error(post(gateway, "/v1/models/digits:predict", {"instances": [img, "cat"]}), 422)
    assert err["field"] == "instances[1]" and "string" in err["message"]
    err = _error(post(gateway, "/v1/models/digits:predict", {"instances": [[[0.0] * 8] * 7]}), 422)
    assert "expected shape [8, 8], got [7, 8]" in err["message"]
    nan_img = [row[:] for row in img]
    nan_img[3][4] = math.nan
    err = _error(send(json.dumps({"instances": [img, nan_img]}).encode()), 422)
    assert err["field"] == "instances[1]" and "NaN" in err["message"]
    err = _error(send(b'{"instances": [{"features": [Infinity]}]}'), 422)
    err = _error(post(gateway, "/v1/models/fraud:predict", {"instances": [{"amount": 1.0}]}), 422)
    assert err["field"].startswith("instances[0].")
    too_many = {"instances": [img] * 1025}
    assert _error(post(gateway, "/v1/models/digits:predict", too_many), 413)["field"] == "instances"
    huge = b'{"instances": [' + b"0," * (3 * 1024 * 1024) + b"0]}"
    assert _error(send(huge), 413)["code"] == "payload_too_large"
    r = httpx.post(url, json={"instances": [img]}, headers={"x-request-timeout-ms": "x"})
    assert _error(r, 400)["field"] == "x-request-timeout-ms"


def test_hostile_input_is_a_4xx_never_a_5xx(gateway: GatewayUnderTest) -> None:
    """Each of these was a 500: the class (what the JSON parser refuses for nesting or
    surrogates, numbers beyond float range, names that may not become metric labels)."""
    json_type = {"content-type": "application/json"}
    nested = b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    huge = b'{"instances": [[' + b"1" + b"0" * 400 + b"]]}"
    surrogate = b'{"instances": [{"user_id": "\\ud800", "merchant_id": "m1", "amount": 1}]}'
    routes = ("/v1/models/digits:predict", "/v2/models/digits/infer", "/v1/feedback")
    for route in routes:
        for body in (nested, b"[" * 5000, surrogate):
            r = httpx.post(gateway.url + route, content=body, headers=json_type, timeout=30)
            assert 400 <= r.status_code < 500, (route, body[:40], r.status_code, r.text)
    r = httpx.post(
        gateway.url + "/v1/models/fraud:predict", content=surrogate, headers=json_type, timeout=30
    )
    assert _error(r, 400)["code"] == "malformed_request"
    r = httpx.post(
        gateway.url + "/v1/models/digits:predict", content=huge, headers=json_type, timeout=30
    )
    assert 400 <= r.status_code < 500, r.text
    for path in ("/v1/models/%C3%A9:predict", "/v1/models/digits/versions/%C3%A9:predict"):
        assert _error(post(gateway, path, {"instances": [[1]]}), 404)["code"] == "not_found"
    tensor = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    r = post(gateway, "/v2/models/%C3%A9/infer", {"inputs": [tensor]})
    assert r.status_code == 404, r.text


def test_request_ids_are_echoed_only_when_short_and_printable(gateway: GatewayUnderTest) -> None:
    body = {"instances": [[[0.0] * 8] * 8]}
    for given in ("x" * 129, "a b", "tab\there"):
        r = post(gateway, "/v1/models/digits:predict", body, headers={"x-request-id": given})
        assert r.status_code == 200, r.text
        echoed = r.headers["x-request-id"]
        assert echoed != given and len(echoed) == 32 and r.json()["request_id"] == echoed
    r = post(
        gateway, "/v1/models/digits:predict", body, headers={"x-request-id": "ok-" + "x" * 125}
    )
    assert r.headers["x-request-id"] == "ok-" + "x" * 125


def test_headers_request_id_and_server_timing(gateway: GatewayUnderTest) -> None:
    r = post(
        gateway,
        "/v1/models/fraud:predict",
        {"instances": records(gateway.registry, 1)},
        headers={"x-request-id": "abc-123"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    stages = {part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")}
    assert {"decode", "queue", "infer", "hop", "encode", "total"} <= stages
    assert "inbound" not in stages  # no x-request-start, no way to know the way in
    # A client (or proxy) stamp 40 ms ago: the way in is reported, first.
    sent = f"t={time.time_ns() // 1000 - 40_000}"
    r = post(
        gateway,
        "/v1/models/fraud:predict",
        {"instances": records(gateway.registry, 1)},
        headers={"x-request-start": sent},
    )
    first, *_ = r.headers["server-timing"].split(",")
    name, dur = first.split(";dur=")
    assert name == "inbound" and 40.0 <= float(dur) < 5000.0, first
    r = post(gateway, "/v1/models/nope:predict", {"instances": [[1]]})
    assert r.headers["x-request-id"]  # generated when the client sent none


def test_status_endpoints(gateway: GatewayUnderTest) -> None:
    assert httpx.get(gateway.url + "/healthz", timeout=10).json() == {"status": "alive"}
    models = httpx.get(gateway.url + "/v1/models", timeout=10).json()["models"]
    by_name = {m["name"]: m for m in models}
    assert by_name["fraud"]["default_version"] == "v2"
    assert {v["version"]: v["state"] for v in by_name["fraud"]["versions"]} == {
        "v1": "AVAILABLE",
        "v1strict": "AVAILABLE",
        "v2": "AVAILABLE",
    }
    status = httpx.get(gateway.url + "/v1/models/digits", timeout=10).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert httpx.get(gateway.url + "/docs", timeout=10).status_code == 200
    spec = httpx.get(gateway.url + "/openapi.json", timeout=10).json()
    assert "/v1/models/{name}:predict" in spec["paths"]
