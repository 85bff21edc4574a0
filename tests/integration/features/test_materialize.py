"""Materialization against a real redis-server (the private one from conftest), in-process
and through the CLI in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from serving.features.materialize import MaterializeError, get, load
from serving.features.spec import FeatureView
from tests.conftest import ROOT, RedisServer, free_port
from tests.unit.features.test_materialize_validation import USER_VIEW, manifest, write_registry

VIEW = FeatureView.model_validate(USER_VIEW)


@pytest.fixture
def ns() -> str:
    """A namespace of its own per test, so tests sharing the server do not interfere."""
    return f"t{uuid.uuid4().hex[:10]}"


def write_csv(path: Path, n: int, ts: bool = False, start: int = 0) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "txn_count_30d", "avg_amount_30d"] + (["_ts"] if ts else []))
        for i in range(start, start + n):
            w.writerow([f"u{i}", i % 97, i / 8] + ([1_700_000_000 + i] if ts else []))
    return path


def keys(client: redis.Redis, ns: str) -> set[str]:
    return set(client.scan_iter(match=f"{ns}:fv:user:*", count=10_000))


def contents(client: redis.Redis, ns: str) -> dict[str, dict[str, str]]:
    pipe = client.pipeline(transaction=False)
    names = sorted(keys(client, ns))
    for k in names:
        pipe.hgetall(k)
    return dict(zip(names, pipe.execute(), strict=True))


def test_load_100k_rows(redis_server: RedisServer, ns: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "users.csv", 100_000)
    calls: list[tuple[int, int]] = []
    t0 = time.monotonic()
    report = load(
        redis_server.url, ns, VIEW, path, None, progress=lambda d, t: calls.append((d, t))
    )
    elapsed = time.monotonic() - t0
    assert report.rows == 100_000 and report.rows_per_s > 0
    assert elapsed < 20, f"100k rows took {elapsed:.1f}s"
    assert calls[0] == (0, 100_000) and calls[-1] == (100_000, 100_000) and len(calls) == 101
    client = redis_server.client()
    assert len(keys(client, ns)) == 100_000
    for i in (0, 1, 4242, 99_999):
        stored = get(redis_server.url, ns, VIEW, f"u{i}")
        assert stored is not None
        assert stored["txn_count_30d"] == i % 97 and stored["avg_amount_30d"] == i / 8
        assert abs(stored["_ts"] - time.time()) < 60  # no _ts column: the load time
    # Stored as decimal strings that float() reads back exactly.
    assert client.hget(f"{ns}:fv:user:u3", "avg_amount_30d") == "0.375"
    assert client.hget(f"{ns}:fv:user:u3", "txn_count_30d") == "3.0"


def test_load_twice_is_idempotent(redis_server: RedisServer, ns: str, tmp_path: Path) -> None:
    client = redis_server.client()
    with_ts = write_csv(tmp_path / "ts.csv", 2_000, ts=True)
    load(redis_server.url, ns, VIEW, with_ts, None, batch_size=300)
    first = contents(client, ns)
    load(redis_server.url, ns, VIEW, with_ts, None, batch_size=300)
    assert contents(client, ns) == first and len(first) == 2_000
    assert first[f"{ns}:fv:user:u5"]["_ts"] == "1700000005.0"

    # Without a timestamp column only `_ts` (the load time) moves.
    ns2 = ns + "b"
    no_ts = write_csv(tmp_path / "plain.csv", 2_000)
    load(redis_server.url, ns2, VIEW, no_ts, None)
    a = contents(client, ns2)
    load(redis_server.url, ns2, VIEW, no_ts, None)
    b = contents(client, ns2)
    assert {k: {f: v for f, v in h.items() if f != "_ts"} for k, h in a.items()} == {
        k: {f: v for f, v in h.items() if f != "_ts"} for k, h in b.items()
    }


def test_bad_rows_write_nothing(redis_server: RedisServer, ns: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", 5_000)
    lines = path.read_text().splitlines()
    lines[1233] = "u1232,lots,1.0"  # file line 1234
    lines[4000] = ",1,1.0"  # file line 4001
    path.write_text("\n".join(lines) + "\n")
    client = redis_server.client()
    before = client.dbsize()
    with pytest.raises(MaterializeError) as e:
        load(redis_server.url, ns, VIEW, path, None)
    assert e.value.errors == [
        "line 1234: txn_count_30d: 'lots' is not a number",
        "line 4001: user_id is empty",
    ]
    assert client.dbsize() == before


def test_parquet_and_get(redis_server: RedisServer, ns: str, tmp_path: Path) -> None:
    path = tmp_path / "users.parquet"
    table = pa.table(
        {
            "user_id": pa.array([7, 8, 9, 7], pa.int64()),
            "txn_count_30d": pa.array([1, 2, 3, 4], pa.int32()),
            "avg_amount_30d": pa.array([0.5, 1.5, 2.5, 3.5], pa.float32()),
            "updated_at": pa.array([1_700_000_000.0] * 4),
        }
    )
    pq.write_table(table, path, row_group_size=3)
    report = load(redis_server.url, ns, VIEW, path, None)
    assert report.rows == 3  # id 7 twice: the last row wins
    assert get(redis_server.url, ns, VIEW, "7") == {
        "txn_count_30d": 4.0,
        "avg_amount_30d": 3.5,
        "_ts": 1_700_000_000.0,
    }
    assert get(redis_server.url, ns, VIEW, "8") == {
        "txn_count_30d": 2.0,
        "avg_amount_30d": 1.5,
        "_ts": 1_700_000_000.0,
    }
    assert get(redis_server.url, ns, VIEW, "10") is None


def test_unreachable_redis_raises_redis_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "u.csv", 10)
    with pytest.raises(redis.ConnectionError):
        load(f"redis://127.0.0.1:{free_port()}/0", "x", VIEW, path, None)


# ---- CLI -----------------------------------------------------------------------------
@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """A deployment file whose registry holds one manifest that declares the `user` view."""
    registry = write_registry(tmp_path / "registry", [manifest("fraud", "v1", [USER_VIEW])])
    dep = tmp_path / "deploy.yaml"
    dep.write_text(
        yaml.safe_dump(
            {
                "registry": str(registry),
                "models": {"fraud": {"default": "v1", "versions": {"v1": {}}}},
            }
        )
    )
    return dep


def cli(url: str, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SERVING_REDIS_URL": url,
        "SERVING_REDIS_NAMESPACE": ns,
        "COLUMNS": "200",
    }
    env.pop("SERVING_REGISTRY_DIR", None)
    code = "from serving.cli.features import features_app; features_app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_load_and_get(
    redis_server: RedisServer, ns: str, tmp_path: Path, deployment: Path
) -> None:
    path = write_csv(tmp_path / "users.csv", 3_000)
    r = cli(redis_server.url, ns, "load", str(path), "--view", "user", "--config", str(deployment))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loaded 3000 rows into view user in " in r.stdout and "rows/s)" in r.stdout
    assert len(keys(redis_server.client(), ns)) == 3_000

    r = cli(redis_server.url, ns, "get", "user", "u42", "--json", "--config", str(deployment))
    assert r.returncode == 0, r.stderr
    body: dict[str, Any] = json.loads(r.stdout)
    assert body["features"] == {"txn_count_30d": 42.0, "avg_amount_30d": 5.25}
    assert 0 <= body["age_s"] < 60 and body["stale"] is False

    r = cli(redis_server.url, ns, "get", "user", "u42", "--config", str(deployment))
    assert r.returncode == 0, r.stderr
    assert "avg_amount_30d" in r.stdout and "5.25" in r.stdout and " ago" in r.stdout

    r = cli(redis_server.url, ns, "get", "user", "nobody", "--config", str(deployment))
    assert r.returncode == 1 and "no entity nobody in view user" in r.stderr


def test_cli_bad_file(redis_server: RedisServer, ns: str, tmp_path: Path, deployment: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", 100)
    lines = path.read_text().splitlines()
    for i in range(10, 40):  # 30 bad rows: lines 11..40
        lines[i] = f"u{i},1.5,1"
    path.write_text("\n".join(lines) + "\n")
    client = redis_server.client()
    before = client.dbsize()
    r = cli(redis_server.url, ns, "load", str(path), "--view", "user", "--config", str(deployment))
    assert r.returncode == 1
    assert "line 11: txn_count_30d: '1.5' is not an integer (int64)" in r.stderr
    assert "line 30: " in r.stderr and "line 31: " not in r.stderr  # the first 20 only
    assert "... and 10 more" in r.stderr and "nothing was written" in r.stderr
    assert client.dbsize() == before


def test_cli_errors_are_one_line(tmp_path: Path, deployment: Path) -> None:
    path = write_csv(tmp_path / "u.csv", 10)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    r = cli(dead, "x", "load", str(path), "--view", "user", "--config", str(deployment))
    assert r.returncode == 1 and "cannot reach Redis" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout

    r = cli(dead, "x", "load", str(path), "--view", "device", "--config", str(deployment))
    assert r.returncode == 1 and "no feature view 'device'" in r.stderr and "user" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
