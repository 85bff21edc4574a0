"""Reading the prediction log back: accuracy over any window, and training data.

Accuracy is one SQL query (ACCURACY_SQL): predictions of a model in [since, until), each
joined with the latest label of its (request_id, idx); an instance counts as correct
when its `label` output equals that label (jsonb equality: 1 = 1.0).

An export is one row per logged instance: request_id, idx, ts, version, arm, one column
per input element, one per output, the label (null when unlabelled), latency_ms and
degraded. Inputs whose elements are named (`columns` in the manifest) give a column per
name (`amount`, `user_stats.txn_count_30d`, ...), other inputs a column named after the
input; outputs are `output.<name>`; each group in name order. A name clashing with
another column is qualified (`<input>.<column>`, `input.<input>`). Scalars keep their
type (a JSON number column whose values are all whole is int64, else float64); arrays
and objects are JSON strings.
Rows stream from a server-side cursor, batch by batch, inside one REPEATABLE READ
snapshot, so the columns found first and the rows read next agree.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from serving.quality import schema

CONNECT_TIMEOUT_S = 5
BATCH_ROWS = 5000
Format = Literal["parquet", "csv"]
FIXED = ("request_id", "idx", "ts", "version", "arm", "label", "latency_ms", "degraded")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# Each prediction row with its latest label ({join}: LEFT JOIN for all rows, JOIN for
# labelled ones only), in the window every query shares.
_LABELLED = """
FROM predictions p
{join} LATERAL (
    SELECT label FROM labels
    WHERE labels.request_id = p.request_id AND labels.idx = p.idx
    ORDER BY labels.ts DESC LIMIT 1
) l ON true
WHERE p.model = %(model)s AND p.ts >= %(since)s
  AND (%(until)s::timestamptz IS NULL OR p.ts < %(until)s)
  AND (%(version)s::text IS NULL OR p.version = %(version)s)
"""
_ROWS = (
    """
SELECT p.request_id, p.idx, p.ts, p.version, p.arm, p.inputs, p.outputs, l.label,
       p.latency_ms, p.degraded"""
    + _LABELLED
)

ACCURACY_SQL = (
    """
SELECT p.version,
       count(*) AS predictions,
       count(l.label) AS labelled,
       count(*) FILTER (WHERE p.outputs -> 'label' = l.label) AS correct"""
    + _LABELLED.replace("{join}", "LEFT JOIN")
    + "GROUP BY p.version ORDER BY p.version\n"
)

# Every column an export will have, with the JSON types of its values: one pass on the
# server over the window's rows.
_INTEGRAL = (
    "CASE WHEN jsonb_typeof({v}) = 'number' THEN mod({v}::numeric, 1) = 0"
    " AND abs({v}::numeric) < 9e18 ELSE true END"
)
_LAYOUT = f"""
WITH r AS ({{rows}})
SELECT part, input, col, array_agg(DISTINCT t) AS types, bool_and(integral) AS integral
FROM (
    SELECT 'input' AS part, i.key AS input, c.key AS col, jsonb_typeof(c.value) AS t,
           {_INTEGRAL.format(v="c.value")} AS integral
    FROM r, jsonb_each(r.inputs) i,
         jsonb_each(CASE WHEN jsonb_typeof(i.value) = 'object' THEN i.value
                    ELSE jsonb_build_object() END) c
    UNION ALL
    SELECT 'input', i.key, NULL, jsonb_typeof(i.value), {_INTEGRAL.format(v="i.value")}
    FROM r, jsonb_each(r.inputs) i
    WHERE jsonb_typeof(i.value) <> 'object'
    UNION ALL
    SELECT 'output', o.key, NULL, jsonb_typeof(o.value), {_INTEGRAL.format(v="o.value")}
    FROM r, jsonb_each(r.outputs) o
    UNION ALL
    SELECT 'label', NULL, NULL, jsonb_typeof(r.label), {_INTEGRAL.format(v="r.label")}
    FROM r
) x
GROUP BY part, input, col
"""


class NoRows(Exception):
    """The window holds no (labelled) prediction of the model."""


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """`15m`, `2h`, `1d`, `1w` (that long before now) or an ISO 8601 timestamp (UTC when
    it names no zone)."""
    m = _DURATION.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m[1]) * _UNITS[m[2]])
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a duration (15m, 2h, 1d) or an ISO timestamp, got {text!r}"
        ) from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def describe(dsn: str) -> str:
    """Where a DSN points, without its password: host:port/dbname."""
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    host = d.get("host") or d.get("hostaddr") or "localhost"
    return f"{host}:{d.get('port') or 5432}/{d.get('dbname') or d.get('user') or ''}"


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    conn = psycopg.connect(
        dsn,
        connect_timeout=CONNECT_TIMEOUT_S,
        application_name="serving-log",
        options="-c TimeZone=UTC",
    )
    set_json_loads(orjson.loads, conn)
    return conn


def migrate(dsn: str) -> tuple[list[int], int]:
    """Apply missing migrations: (versions applied now, schema version)."""
    with connect(dsn) as conn:
        return schema.migrate(conn), schema.latest()


@dataclass(frozen=True)
class Window:
    """Which rows: a model's predictions in [since, until), of one version or all."""

    model: str
    since: datetime
    until: datetime | None = None
    version: str | None = None

    def params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "since": self.since,
            "until": self.until,
            "version": self.version,
        }


def accuracy(
    dsn: str,
    model: str,
    since: datetime,
    until: datetime | None = None,
    version: str | None = None,
) -> list[dict[str, Any]]:
    """Per version: predictions, labelled instances, correct ones and accuracy (None
    while nothing is labelled)."""
    window = Window(model, since, until, version)
    with connect(dsn) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(ACCURACY_SQL, window.params()).fetchall()
    for r in rows:
        r["accuracy"] = r["correct"] / r["labelled"] if r["labelled"] else None
    return rows


@dataclass(frozen=True)
class Column:
    """One export column: where its values come from and their Arrow type."""

    name: str
    part: Literal["fixed", "input", "output", "label"]
    input: str | None  # the input or output name
    key: str | None  # the element's name within a named input
    kind: Literal["int", "float", "str", "bool", "json", "fixed"]

    def arrow_type(self) -> pa.DataType:
        return {
            "int": pa.int64(),
            "float": pa.float64(),
            "bool": pa.bool_(),
            "str": pa.string(),
            "json": pa.string(),
        }[self.kind]


_FIXED_TYPES = {
    "request_id": pa.string(),
    "idx": pa.int32(),
    "ts": pa.timestamp("us", tz="UTC"),
    "version": pa.string(),
    "arm": pa.string(),
    "latency_ms": pa.float32(),
    "degraded": pa.bool_(),
}


def _kind(
    types: list[str | None], integral: bool
) -> Literal["int", "float", "str", "bool", "json"]:
    found = {t for t in types if t not in (None, "null")}
    if found == {"number"}:
        return "int" if integral else "float"
    if found == {"string"}:
        return "str"
    if found == {"boolean"}:
        return "bool"
    return "json"  # arrays, objects, a mix, or nothing but nulls


def _columns(found: list[dict[str, Any]]) -> list[Column]:
    """Name and type every column the window's rows have (see the module docstring)."""
    found = sorted(found, key=lambda r: (r["part"], r["input"] or "", r["col"] or ""))
    outputs = [r for r in found if r["part"] == "output"]
    inputs = [r for r in found if r["part"] == "input"]
    label = [r for r in found if r["part"] == "label"]
    taken = set(FIXED) | {f"output.{r['input']}" for r in outputs}
    bare = [r["col"] if r["col"] is not None else r["input"] for r in inputs]
    cols: list[Column] = []
    for r, name in zip(inputs, bare):
        if name in taken or bare.count(name) > 1:
            name = f"{r['input']}.{r['col']}" if r["col"] is not None else f"input.{r['input']}"
        kind = _kind(r["types"], r["integral"])
        cols.append(Column(name, "input", r["input"], r["col"], kind))
    head = [Column(n, "fixed", None, None, "fixed") for n in FIXED[:5]]
    tail = [Column(n, "fixed", None, None, "fixed") for n in FIXED[6:]]
    outs = [
        Column(f"output.{r['input']}", "output", r["input"], None, _kind(r["types"], r["integral"]))
        for r in outputs
    ]
    lab = Column("label", "label", None, None, _kind(label[0]["types"], label[0]["integral"]))
    return [*head, *cols, *outs, lab, *tail]


def schema_of(columns: list[Column]) -> pa.Schema:
    return pa.schema(
        [
            pa.field(c.name, _FIXED_TYPES[c.name] if c.kind == "fixed" else c.arrow_type())
            for c in columns
        ]
    )


def _value(c: Column, row: tuple[Any, ...]) -> Any:
    """A column's value in a result row of _ROWS."""
    if c.part == "input":
        v = row[5].get(c.input)
        if c.key is not None:
            v = v.get(c.key) if isinstance(v, dict) else None
        elif isinstance(v, dict):
            v = None  # this row had named elements: they are in columns of their own
    elif c.part == "output":
        v = row[6].get(c.input)
    else:
        v = row[7]
    if v is None:
        return None
    if c.kind == "json":
        return orjson.dumps(v).decode()
    if c.kind == "float":
        return float(v)
    return int(v) if c.kind == "int" else v


# Where each fixed column is in a result row of _ROWS.
_FIXED_AT = dict(request_id=0, idx=1, ts=2, version=3, arm=4, latency_ms=8, degraded=9)


def _batch(
    columns: list[Column], schema_: pa.Schema, rows: list[tuple[Any, ...]]
) -> pa.RecordBatch:
    arrays = []
    for c, field in zip(columns, schema_):
        if c.kind == "fixed":
            values = [r[_FIXED_AT[c.name]] for r in rows]
        else:
            values = [_value(c, r) for r in rows]
        arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema_)


def batches(
    dsn: str, window: Window, labelled_only: bool = False, batch_rows: int = BATCH_ROWS
) -> tuple[list[Column], Generator[pa.RecordBatch, None, None]]:
    """The window's columns, then its rows in Arrow batches (ts order), streamed from a
    server-side cursor. Raises NoRows, before anything is read, when there are none."""
    rows_sql = sql.SQL(_ROWS).format(join=sql.SQL("JOIN" if labelled_only else "LEFT JOIN"))
    conn = connect(dsn)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute(sql.SQL(_LAYOUT).format(rows=rows_sql), window.params()).fetchall()
        if not found:
            what = "labelled predictions" if labelled_only else "predictions"
            raise NoRows(
                f"no {what} of model {window.model} since {window.since:%Y-%m-%d %H:%M:%S %Z}"
            )
    except BaseException:
        conn.close()
        raise
    columns = _columns(found)
    schema_ = schema_of(columns)

    def stream() -> Generator[pa.RecordBatch, None, None]:
        try:
            with conn.cursor(name="serving_log_export") as cur:
                cur.itersize = batch_rows
                cur.execute(
                    rows_sql + sql.SQL(" ORDER BY p.ts, p.request_id, p.idx"), window.params()
                )
                while rows := cur.fetchmany(batch_rows):
                    yield _batch(columns, schema_, rows)
        finally:
            conn.close()

    return columns, stream()


def read_table(
    dsn: str, window: Window, labelled_only: bool = False
) -> tuple[list[Column], pa.Table]:
    """The whole window as one Arrow table (training data)."""
    columns, stream = batches(dsn, window, labelled_only)
    return columns, pa.Table.from_batches(list(stream), schema=schema_of(columns))


def export(
    dsn: str,
    model: str,
    since: datetime,
    until: datetime | None,
    version: str | None,
    labelled_only: bool,
    path: Path,
    fmt: Format = "parquet",
) -> int:
    """Write the window's rows to `path` (Parquet or CSV); returns how many. The file
    appears whole or not at all (written beside it, then renamed)."""
    columns, stream = batches(dsn, Window(model, since, until, version), labelled_only)
    schema_ = schema_of(columns)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer: Any = pq.ParquetWriter(tmp, schema_)
    else:
        import pyarrow.csv as pcsv

        writer = pcsv.CSVWriter(tmp, schema_)
    try:
        with writer, contextlib.closing(stream):  # closing: the connection, also on errors
            for b in stream:
                writer.write_batch(b)
                written += b.num_rows
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written
