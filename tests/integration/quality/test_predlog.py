"""The prediction and label log against a real PostgreSQL: migrations, COPY, the
accuracy query, exports, the CLI, and PostgreSQL killed or hung under the request path."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from serving.cli import app
from serving.quality import queries, schema
from serving.quality.predlog import PredictionLog
from tests.conftest import PostgresServer, free_port

COLUMNS = ["amount", "hour", "user_stats.txn_count_30d"]
NOW = time.time()  # each test's "now" (reset before each: windows like --since 15m)


@pytest.fixture(autouse=True)
def _now() -> None:
    global NOW
    NOW = time.time()


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query.encode()).fetchall()


def _predict(
    log: PredictionLog, rid: str, labels: list[int], version: str = "v2", ts: float | None = None
) -> None:
    n = len(labels)
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 0.5
    log.prediction(
        rid,
        "fraud",
        version,
        "canary" if version == "v3" else "stable",
        NOW if ts is None else ts,
        {"features": x},
        {"features": COLUMNS},
        {"label": np.array(labels, np.int64), "probabilities": np.full((n, 2), 0.5, np.float32)},
        0.004,
        rid.endswith("degraded"),
    )


async def test_migrations_apply_once_with_concurrent_appliers(log_dsn: str) -> None:
    conns = [await psycopg.AsyncConnection.connect(log_dsn) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(schema.migrate_async(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    versions = [m.version for m in schema.migrations()]
    assert sorted(applied, key=len) == [[], [], versions]  # one applied; the others waited
    with psycopg.connect(log_dsn) as conn:
        assert schema.migrate(conn) == []
    assert [r[0] for r in _rows(log_dsn, "SELECT version FROM serving_schema_migrations")] == (
        versions
    )
    indexes = {r[0] for r in _rows(log_dsn, "SELECT indexname FROM pg_indexes")}
    assert {"predictions_model_ts", "predictions_request", "labels_request"} <= indexes


async def test_rows_land_with_copy(log_dsn: str) -> None:
    log = PredictionLog(log_dsn, flush_every_s=0.02)
    _predict(log, "r1", [1, 0, 1])
    _predict(log, "r2-degraded", [0])
    log.label("r1", [1, 1, 0], NOW + 5)
    deadline = time.monotonic() + 10
    while log.buffered and time.monotonic() < deadline:  # the background task sends them
        await asyncio.sleep(0.02)
    assert log.buffered == 0
    await log.close()
    rows = _rows(
        log_dsn,
        "SELECT request_id, idx, model, version, arm, ts, inputs, outputs, latency_ms, degraded"
        " FROM predictions ORDER BY request_id, idx",
    )
    assert [r[:5] for r in rows] == [
        ("r1", 0, "fraud", "v2", "stable"),
        ("r1", 1, "fraud", "v2", "stable"),
        ("r1", 2, "fraud", "v2", "stable"),
        ("r2-degraded", 0, "fraud", "v2", "stable"),
    ]
    assert rows[1][5] == datetime.fromtimestamp(NOW, UTC)
    assert rows[1][6] == {"features": {"amount": 3.5, "hour": 4.5, "user_stats.txn_count_30d": 5.5}}
    assert rows[1][7] == {"label": 0, "probabilities": [0.5, 0.5]}
    assert rows[0][8] == pytest.approx(4.0) and [r[9] for r in rows] == [False] * 3 + [True]
    labels = _rows(log_dsn, "SELECT request_id, idx, label FROM labels ORDER BY idx")
    assert labels == [("r1", 0, 1), ("r1", 1, 1), ("r1", 2, 0)]


async def _fill_for_queries(dsn: str) -> None:
    """v2: 4 labelled instances, 3 correct (one relabelled: the latest label counts),
    one unlabelled; v3: 2 labelled, 1 correct; one v2 row outside the window."""
    log = PredictionLog(dsn)
    _predict(log, "a", [1, 0], "v2")
    _predict(log, "b", [1, 1], "v2")
    _predict(log, "c", [0], "v2")  # never labelled
    _predict(log, "d", [0, 0], "v3")
    _predict(log, "old", [1], "v2", ts=NOW - 7200)
    log.label("a", [1, 1], NOW)  # a/1 wrong ...
    log.label("a", [1, 0], NOW + 1)  # ... relabelled: now right
    log.label("b", [1, 0], NOW)  # b/1 wrong
    log.label("d", [0, 1], NOW)  # d/1 wrong
    log.label("old", [1], NOW)
    assert await log.flush()
    await log.close()


async def test_accuracy_is_one_query_over_any_window(log_dsn: str) -> None:
    await _fill_for_queries(log_dsn)
    since = datetime.fromtimestamp(NOW - 60, UTC)
    got = queries.accuracy(log_dsn, "fraud", since)
    assert got == [
        {"version": "v2", "predictions": 5, "labelled": 4, "correct": 3, "accuracy": 0.75},
        {"version": "v3", "predictions": 2, "labelled": 2, "correct": 1, "accuracy": 0.5},
    ]
    assert [r["version"] for r in queries.accuracy(log_dsn, "fraud", since, version="v3")] == ["v3"]
    wider = queries.accuracy(log_dsn, "fraud", since - timedelta(hours=3))
    assert wider[0]["labelled"] == 5 and wider[0]["correct"] == 4  # "old" counts now
    until = datetime.fromtimestamp(NOW - 60, UTC)
    assert (
        queries.accuracy(log_dsn, "fraud", since - timedelta(hours=3), until)[0]["predictions"] == 1
    )
    assert queries.accuracy(log_dsn, "other", since) == []


async def test_export_writes_training_data(log_dsn: str, tmp_path: Path) -> None:
    await _fill_for_queries(log_dsn)
    since = datetime.fromtimestamp(NOW - 60, UTC)
    path = tmp_path / "train.parquet"
    n = queries.export(log_dsn, "fraud", since, None, None, False, path, "parquet")
    table = pq.read_table(path)
    assert n == table.num_rows == 7
    assert table.column_names == [
        "request_id", "idx", "ts", "version", "arm",
        "amount", "hour", "user_stats.txn_count_30d",
        "output.label", "output.probabilities", "label", "latency_ms", "degraded",
    ]  # fmt: skip
    rows = table.to_pylist()
    assert rows[0]["amount"] == 0.5 and rows[0]["output.probabilities"] == "[0.5,0.5]"
    by_key = {(r["request_id"], r["idx"]): r for r in rows}
    assert by_key[("a", 1)]["label"] == 0 and by_key[("c", 0)]["label"] is None
    assert str(table.schema.field("label").type) == "int64"
    assert str(table.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert rows[0]["ts"] == datetime.fromtimestamp(NOW, UTC).replace(
        microsecond=rows[0]["ts"].microsecond
    )

    csv = tmp_path / "v3.csv"
    assert queries.export(log_dsn, "fraud", since, None, "v3", True, csv, "csv") == 2
    back = pcsv.read_csv(csv)
    assert back.column("request_id").to_pylist() == ["d", "d"]
    assert back.column("label").to_pylist() == [0, 1]
    with pytest.raises(queries.NoRows, match="no labelled predictions of model fraud"):
        queries.export(log_dsn, "fraud", since, None, "v9", True, tmp_path / "x.csv", "csv")
    assert not (tmp_path / "x.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet", "v3.csv"]


async def test_postgres_killed_then_back(
    own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The request path never waits or fails: rows wait in a bounded buffer, the excess
    is dropped and counted, and what was kept arrives once PostgreSQL is back."""
    dsn = own_postgres.dsn
    log = PredictionLog(dsn, max_buffer=50, flush_every_s=0.02, timeout_s=1.0)
    with caplog.at_level(logging.WARNING, logger="serving.quality.predlog"):
        _predict(log, "warm", [0])
        assert await log.flush()  # connected, migrated
        own_postgres.stop(kill=True)
        slowest = 0.0
        for i in range(60):  # 60 rows into a buffer of 50
            t0 = time.perf_counter()
            _predict(log, f"r{i}", [1])
            slowest = max(slowest, time.perf_counter() - t0)
            await asyncio.sleep(0.005)  # the background flush runs (and fails) meanwhile
        assert slowest < 0.05  # never waits on PostgreSQL (that would be ~1 s here)
        assert (log.buffered, log.dropped) == (50, 10)
        own_postgres.start()
        deadline = time.monotonic() + 15
        while log.buffered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert log.buffered == 0
    await log.close()
    ids = [r[0] for r in _rows(dsn, "SELECT request_id FROM predictions ORDER BY ts, request_id")]
    assert sorted(ids) == sorted(["warm", *(f"r{i}" for i in range(50))])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("waits in memory" in m for m in messages) == 1
    assert sum("reaches PostgreSQL again" in m for m in messages) == 1


async def test_postgres_hung_is_cut_off_by_the_deadline(own_postgres: PostgresServer) -> None:
    log = PredictionLog(own_postgres.dsn, flush_every_s=3600, timeout_s=0.5)
    _predict(log, "a", [1])
    assert await log.flush()
    own_postgres.pause()
    try:
        _predict(log, "b", [1, 0])
        t0 = time.monotonic()
        assert await log.flush() is False
        assert time.monotonic() - t0 < 1.5
        assert log.buffered == 2
    finally:
        own_postgres.resume()
    assert await log.flush()  # a new connection; the rows go now
    await log.close()
    assert _rows(own_postgres.dsn, "SELECT count(*) FROM predictions") == [(3,)]


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["log", *args], env={"SERVING_LOG_DSN": ""})


async def test_cli_migrate_accuracy_export(log_dsn: str, tmp_path: Path) -> None:
    r = _cli("migrate", "--dsn", log_dsn)
    assert r.exit_code == 0 and "applied migration(s) 1" in r.stdout
    r = _cli("migrate", "--dsn", log_dsn)
    assert r.exit_code == 0 and "up to date" in r.stdout
    await _fill_for_queries(log_dsn)

    r = _cli("accuracy", "fraud", "--since", "15m", "--dsn", log_dsn, "--json")
    assert r.exit_code == 0, r.output
    assert '"accuracy": 0.75' in r.stdout
    r = _cli("accuracy", "fraud", "--since", "15m", "--dsn", log_dsn)
    assert r.exit_code == 0 and "0.7500" in r.stdout and "0.5000" in r.stdout

    out = tmp_path / "train.parquet"
    r = _cli("export", "fraud", "--since", "1h", "--format", "parquet", "-o", str(out),
             "--dsn", log_dsn)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"wrote 7 rows to {out}" in r.stdout
    assert pq.read_table(out).num_rows == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("accuracy", "fraud", "--since", "yesterday"), "--since: expected a duration"),
        (("export", "fraud", "--since", "1h", "-f", "xml"), "--format: expected parquet or csv"),
        (
            ("export", "nope", "--since", "1h", "-o", "/tmp/x.parquet"),
            "no predictions of model nope",
        ),
        (("accuracy", "nope", "--since", "1h"), "no predictions of model nope"),
        (("export", "fraud", "--since", "1h", "-o", "/no/such/dir/x.csv"), "-o: no folder"),
    ],
)
def test_cli_errors_are_one_line(log_dsn: str, args: tuple[str, ...], message: str) -> None:
    with psycopg.connect(log_dsn) as conn:
        schema.migrate(conn)
    r = _cli(*args, "--dsn", log_dsn)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_without_a_reachable_log() -> None:
    r = _cli("accuracy", "fraud")
    assert r.exit_code == 2 and "set SERVING_LOG_DSN or pass --dsn" in r.stderr
    dsn = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x"
    r = _cli("export", "fraud", "--since", "1h", "--dsn", dsn)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach PostgreSQL at 127.0.0.1" in lines[0]
    assert "secret" not in r.stderr
    r = _cli("accuracy", "fraud", "--dsn", "password=secret nonsense")
    assert r.exit_code == 2 and "not a PostgreSQL DSN" in r.stderr and "secret" not in r.stderr
