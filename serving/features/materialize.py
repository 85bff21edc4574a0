"""Materialization: bulk-load a feature view's values from a CSV or Parquet file into Redis.

A load is all or nothing at the validation level: every row is checked first and, if any
row is bad, nothing is written. Writes are plain HSETs (layout in serving/features/spec.py),
so loading the same file again gives the same content: a load is safe to repeat, e.g.
after Redis went away half way through.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from serving import keys
from serving.errors import ConfigError
from serving.features.spec import TS_FIELD, FeatureView
from serving.models.registry import Registry

# Columns that may carry a row's update time (unix seconds), in order of preference.
TS_COLUMNS = (TS_FIELD, "updated_at")
# Key under which read_rows puts the fields of a CSV row beyond the header's width.
EXTRA_KEY = "\x00extra"
# A timestamp further ahead than this is taken for a unit mistake (e.g. milliseconds).
MAX_FUTURE_S = 86_400.0

_INT_BOUNDS = {"int32": 2.0**31, "int64": 2.0**63}
_FLOAT32_MAX = 3.4028234663852886e38

Location = int | str
Row = tuple[str, dict[str, float], float | None]
Progress = Callable[[int, int], None]


class MaterializeError(Exception):
    """Rows failed validation; nothing was written. `errors` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(f"{len(errors)} validation error(s): " + "; ".join(errors[:3]))
        self.errors = errors


@dataclass(frozen=True)
class LoadReport:
    rows: int  # entities written (duplicate ids in the file count once)
    seconds: float  # the whole load: reading, validating and writing
    rows_per_s: float


# ---- the view ------------------------------------------------------------------------
def find_view(registry_root: Path, view: str) -> FeatureView:
    """The view named `view` in any manifest of the registry; manifests that share a view
    must declare it identically, since they read the same Redis keys."""
    registry = Registry(registry_root)
    found: FeatureView | None = None
    found_in = ""
    existing: set[str] = set()
    for name, versions in registry.list().items():
        for version in versions:
            features = registry.get(name, version).manifest.features
            if features is None:
                continue
            existing.update(v.name for v in features.views)
            for v in features.views:
                if v.name != view:
                    continue
                where = f"{name}/{version}"
                if found is None:
                    found, found_in = v, where
                elif v != found:
                    raise ConfigError(
                        f"view {view!r} is declared differently in {found_in} and {where} "
                        f"(registry {registry_root}); make the two specs identical"
                    )
    if found is None:
        known = ", ".join(sorted(existing)) or "none"
        raise ConfigError(
            f"no feature view {view!r} in registry {registry_root} (views there: {known})"
        )
    return found


# ---- reading -------------------------------------------------------------------------
def read_rows(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Each row with its location: the file line (int) for CSV, "row N" for Parquet."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    raise ConfigError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .parquet")


def _read_csv(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    try:
        # utf-8-sig: spreadsheets often start CSV files with a byte order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    extra = row.pop(None, None)  # type: ignore[call-overload]
                    if extra is not None:
                        row[EXTRA_KEY] = extra
                    # line_num is where the record ends; the header is line 1.
                    yield reader.line_num, row
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: line {reader.line_num + 1}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _read_parquet(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        pfile = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{path}: cannot read as Parquet: {exc}") from exc
    n = 0
    try:
        for batch in pfile.iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{path}: cannot read as Parquet after row {n}: {exc}") from exc


# ---- validation ----------------------------------------------------------------------
def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _check_value(name: str, value: Any, dtype: str) -> tuple[float | None, str | None]:
    """(the value, None) or (None, what is wrong with it)."""
    try:
        # str (CSV; float() ignores surrounding blanks) or a Parquet number.
        if not isinstance(value, str | bool | int | float | Decimal):
            raise TypeError
        x = float(value)
    except OverflowError:  # a huge int or Decimal
        x = math.inf
    except (TypeError, ValueError):
        if _is_empty(value):
            return None, f"{name} is empty"
        return None, f"{name}: {value!r} is not a number"
    if not math.isfinite(x):
        return None, f"{name}: {value!r} is not a finite number"
    if dtype in _INT_BOUNDS:
        if not x.is_integer():
            return None, f"{name}: {value!r} is not an integer ({dtype})"
        bound = _INT_BOUNDS[dtype]
        if not -bound <= x < bound:
            return None, f"{name}: {value!r} is out of range for {dtype}"
    elif dtype == "float32" and abs(x) > _FLOAT32_MAX:
        return None, f"{name}: {value!r} is out of range for float32"
    return x, None


def normalize_entity(value: Any) -> str | None:
    """An entity value as it appears in the Redis key (None when empty): surrounding
    blanks dropped, integral floats (Parquet id columns with nulls come out as doubles)
    written like the integers they are. Use it wherever a loaded file's ids are keyed."""
    if _is_empty(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def validate(
    view: FeatureView, rows: Iterable[tuple[Location, dict[str, Any]]], entity_column: str | None
) -> tuple[list[Row], list[str]]:
    """Check every row against the view. Returns the rows to write (one per entity id, the
    last row of an id wins) and the errors, each prefixed with its location."""
    entity = entity_column or view.entity
    out: dict[str, Row] = {}
    errors: list[str] = []
    missing: set[str] = set()
    ts_column: str | None = None
    now = time.time()
    features: list[tuple[str, str]] = []
    first = True
    for loc, row in rows:
        if first:
            # Header check, once: columns absent from the file are reported here only.
            first = False
            header = "line 1" if isinstance(loc, int) else "columns"
            required = [entity, *(f.name for f in view.features)]
            missing = {c for c in required if c not in row}
            errors.extend(f"{header}: missing column {c}" for c in required if c in missing)
            features = [(f.name, f.dtype) for f in view.features if f.name not in missing]
            ts_column = next((c for c in TS_COLUMNS if c in row), None)
        problems: list[str] = []
        if EXTRA_KEY in row:
            problems.append(f"{len(row[EXTRA_KEY])} more field(s) than the header")
        entity_id: str | None = None
        if entity not in missing:
            entity_id = normalize_entity(row.get(entity))
            if entity_id is None:
                problems.append(f"{entity} is empty")
        values: dict[str, float] = {}
        for name, dtype in features:
            x, problem = _check_value(name, row.get(name), dtype)
            if problem is not None:
                problems.append(problem)
            elif x is not None:
                values[name] = x
        ts: float | None = None
        if ts_column is not None:
            ts, problem = _check_value(ts_column, row.get(ts_column), "float64")
            if problem is None and ts is not None and (ts < 0 or ts > now + MAX_FUTURE_S):
                problem = f"{ts_column}: {row.get(ts_column)!r} is not unix seconds"
            if problem is not None:
                problems.append(problem)
        if problems:
            where = f"line {loc}" if isinstance(loc, int) else loc
            errors.extend(f"{where}: {p}" for p in problems)
        elif not missing and entity_id is not None:
            out[entity_id] = (entity_id, values, ts)  # a later row of the same id wins
    return list(out.values()), errors


# ---- Redis ---------------------------------------------------------------------------
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=5.0, socket_timeout=30.0, decode_responses=True
    )


def load(
    url: str,
    namespace: str,
    view: FeatureView,
    path: Path,
    entity_column: str | None = None,
    batch_size: int = 1000,
    progress: Progress | None = None,
) -> LoadReport:
    """Validate the whole file, then write it in pipelined batches of HSETs.

    Raises ConfigError (unreadable file), MaterializeError (bad rows; nothing written) or
    redis.RedisError (Redis unreachable, or failed part way: loading again is safe).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    t0 = time.monotonic()
    client = _client(url)
    try:
        client.ping()  # fail before reading a large file when Redis is not there
        rows, errors = validate(view, read_rows(path), entity_column)
        if errors:
            raise MaterializeError(errors)
        total = len(rows)
        if progress is not None:
            progress(0, total)
        load_ts = repr(time.time())
        for start in range(0, total, batch_size):
            pipe = client.pipeline(transaction=False)
            for entity_id, values, ts in rows[start : start + batch_size]:
                mapping: dict[FieldT, EncodableT] = {n: repr(x) for n, x in values.items()}
                mapping[TS_FIELD] = load_ts if ts is None else repr(ts)
                pipe.hset(keys.feature(namespace, view.name, entity_id), mapping=mapping)
            pipe.execute()
            if progress is not None:
                progress(min(start + batch_size, total), total)
    finally:
        client.close()
    seconds = time.monotonic() - t0
    return LoadReport(rows=total, seconds=seconds, rows_per_s=total / seconds if seconds else 0.0)


def get(url: str, namespace: str, view: FeatureView, entity_id: str) -> dict[str, float] | None:
    """The stored hash of one entity (features and `_ts`) or None when there is none."""
    client = _client(url)
    try:
        raw = client.hgetall(keys.feature(namespace, view.name, entity_id))
    finally:
        client.close()
    # decode_responses=True: keys and values are str.
    return {str(k): float(v) for k, v in raw.items()} if raw else None
