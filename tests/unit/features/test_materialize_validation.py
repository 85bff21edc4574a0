"""Validation of feature files before they reach Redis, and finding a view in the registry.
No Redis here."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from serving.errors import ConfigError
from serving.features.materialize import find_view, read_rows, validate
from serving.features.spec import FeatureView

USER_VIEW: dict[str, Any] = {
    "name": "user",
    "entity": "user_id",
    "features": [
        {"name": "txn_count_30d", "dtype": "int64"},
        {"name": "avg_amount_30d", "dtype": "float32"},
    ],
    "max_age_s": 86400,
}
MERCHANT_VIEW: dict[str, Any] = {
    "name": "merchant",
    "entity": "merchant_id",
    "features": [{"name": "fraud_rate_30d", "dtype": "float32"}],
}


def manifest(name: str, version: str, views: list[dict[str, Any]]) -> dict[str, Any]:
    """A minimal valid manifest whose one input reads every feature of `views`."""
    columns = ["amount"] + [f"{v['name']}.{f['name']}" for v in views for f in v["features"]]
    return {
        "name": name,
        "version": version,
        "runtime": "onnx",
        "artifact": "model.onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [len(columns)], "columns": columns}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": []}],
        "features": {"input": "x", "request": [{"name": "amount"}], "views": views},
    }


def write_registry(root: Path, manifests: list[dict[str, Any]]) -> Path:
    """A registry folder with these manifests and dummy artifacts (load_version needs one)."""
    for m in manifests:
        folder = root / m["name"] / m["version"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.yaml").write_text(yaml.safe_dump(m))
        (folder / m["artifact"]).write_bytes(b"dummy")
    return root


VIEW = FeatureView.model_validate(USER_VIEW)
HEADER = "user_id,txn_count_30d,avg_amount_30d"


def csv_rows(tmp_path: Path, text: str) -> list[tuple[int | str, dict[str, Any]]]:
    path = tmp_path / "f.csv"
    path.write_text(text)
    return list(read_rows(path))


def check_csv(tmp_path: Path, text: str) -> tuple[list[Any], list[str]]:
    return validate(VIEW, csv_rows(tmp_path, text), None)


# ---- reading -------------------------------------------------------------------------
def test_csv_locations_are_file_lines(tmp_path: Path) -> None:
    rows = csv_rows(tmp_path, f"{HEADER}\nu1,1,2.5\nu2,3,4\n")
    assert [loc for loc, _ in rows] == [2, 3]
    assert rows[0][1] == {"user_id": "u1", "txn_count_30d": "1", "avg_amount_30d": "2.5"}


def test_parquet_locations_are_1_based_rows(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    table = pa.table(
        {"user_id": ["a", "b", "c"], "txn_count_30d": [1, 2, 3], "avg_amount_30d": [1.0, 2.0, 3.0]}
    )
    pq.write_table(table, path, row_group_size=2)
    rows = list(read_rows(path))
    assert [loc for loc, _ in rows] == ["row 1", "row 2", "row 3"]
    assert rows[2][1] == {"user_id": "c", "txn_count_30d": 3, "avg_amount_30d": 3.0}


def test_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unsupported file type '\.json'"):
        read_rows(tmp_path / "f.json")


def test_unreadable_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        list(read_rows(tmp_path / "absent.csv"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="Parquet"):
        list(read_rows(bad))


# ---- validation ----------------------------------------------------------------------
def test_valid_rows(tmp_path: Path) -> None:
    rows, errors = check_csv(tmp_path, f"{HEADER}\nu1,1,2.5\n u2 , 3.0 ,-4e2\n")
    assert errors == []
    assert rows == [
        ("u1", {"txn_count_30d": 1.0, "avg_amount_30d": 2.5}, None),
        ("u2", {"txn_count_30d": 3.0, "avg_amount_30d": -400.0}, None),
    ]


def test_missing_columns_reported_once_from_the_header(tmp_path: Path) -> None:
    body = "".join(f"u{i},1\n" for i in range(50))
    rows, errors = check_csv(tmp_path, "user_id,txn_count_30d\n" + body)
    assert errors == ["line 1: missing column avg_amount_30d"]
    assert rows == []
    _, errors = check_csv(tmp_path, "id,txn_count_30d,avg_amount_30d\nu1,x,1\n")
    assert errors == [
        "line 1: missing column user_id",
        "line 2: txn_count_30d: 'x' is not a number",
    ]


def test_entity_column_override(tmp_path: Path) -> None:
    text = "uid,txn_count_30d,avg_amount_30d\nu1,1,2\n"
    rows, errors = validate(VIEW, csv_rows(tmp_path, text), "uid")
    assert errors == [] and rows[0][0] == "u1"


def test_bad_values_name_line_and_column(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "u1,1,2\n"  # line 2: fine
        "u2,abc,2\n"  # line 3
        ",1,2\n"  # line 4
        "u4,2.5,2\n"  # line 5: int64 must be integral
        "u5,1,nan\n"  # line 6
        "u6,1,inf\n"  # line 7
        "u7,1,-Infinity\n"  # line 8
        "u8,,2\n"  # line 9
        "u9,1,1e39\n"  # line 10: overflows float32
        "u10,1e19,1\n"  # line 11: overflows int64
    )
    rows, errors = check_csv(tmp_path, text)
    assert errors == [
        "line 3: txn_count_30d: 'abc' is not a number",
        "line 4: user_id is empty",
        "line 5: txn_count_30d: '2.5' is not an integer (int64)",
        "line 6: avg_amount_30d: 'nan' is not a finite number",
        "line 7: avg_amount_30d: 'inf' is not a finite number",
        "line 8: avg_amount_30d: '-Infinity' is not a finite number",
        "line 9: txn_count_30d is empty",
        "line 10: avg_amount_30d: '1e39' is out of range for float32",
        "line 11: txn_count_30d: '1e19' is out of range for int64",
    ]
    assert [r[0] for r in rows] == ["u1"]


def test_several_problems_in_one_row(tmp_path: Path) -> None:
    _, errors = check_csv(tmp_path, f"{HEADER}\n,x,y\n")
    assert errors == [
        "line 2: user_id is empty",
        "line 2: txn_count_30d: 'x' is not a number",
        "line 2: avg_amount_30d: 'y' is not a number",
    ]


def test_row_width_must_match_header(tmp_path: Path) -> None:
    _, errors = check_csv(tmp_path, f"{HEADER}\nu1,1\nu2,1,2,3\n")
    assert errors == ["line 2: avg_amount_30d is empty", "line 3: 1 more field(s) than the header"]


def test_line_numbers_count_quoted_newlines(tmp_path: Path) -> None:
    _, errors = check_csv(tmp_path, f'{HEADER}\n"u\n1",1,2\nu2,x,2\n')
    assert errors == ["line 4: txn_count_30d: 'x' is not a number"]


def test_duplicate_ids_last_wins(tmp_path: Path) -> None:
    rows, errors = check_csv(tmp_path, f"{HEADER}\nu1,1,1\nu2,2,2\nu1,3,3\n")
    assert errors == []
    assert sorted(rows) == [
        ("u1", {"txn_count_30d": 3.0, "avg_amount_30d": 3.0}, None),
        ("u2", {"txn_count_30d": 2.0, "avg_amount_30d": 2.0}, None),
    ]


@pytest.mark.parametrize("column", ["_ts", "updated_at"])
def test_timestamp_column(tmp_path: Path, column: str) -> None:
    rows, errors = check_csv(tmp_path, f"{HEADER},{column}\nu1,1,1,1700000000.5\n")
    assert errors == [] and rows[0][2] == 1700000000.5
    _, errors = check_csv(tmp_path, f"{HEADER},{column}\nu1,1,1,\nu2,1,1,1700000000000\n")
    assert errors == [
        f"line 2: {column} is empty",
        f"line 3: {column}: '1700000000000' is not unix seconds",
    ]


def test_parquet_values(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    table = pa.table(
        {
            "user_id": pa.array([1.0, 2.0, None, 4.0]),  # doubles, as pandas writes ids with nulls
            "txn_count_30d": pa.array([1, 2, 3, None], pa.int64()),
            "avg_amount_30d": pa.array([1.5, math.nan, 1.0, 1.0]),
        }
    )
    pq.write_table(table, path)
    rows, errors = validate(VIEW, read_rows(path), None)
    assert errors == [
        "row 2: avg_amount_30d: nan is not a finite number",
        "row 3: user_id is empty",
        "row 4: txn_count_30d is empty",
    ]
    assert rows == [("1", {"txn_count_30d": 1.0, "avg_amount_30d": 1.5}, None)]


def test_parquet_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "txn_count_30d": [1, 2]}), path)
    _, errors = validate(VIEW, read_rows(path), None)
    assert errors == ["columns: missing column avg_amount_30d"]


# ---- find_view -----------------------------------------------------------------------
def test_find_view(tmp_path: Path) -> None:
    root = write_registry(
        tmp_path,
        [
            manifest("fraud", "v1", [USER_VIEW]),
            manifest("fraud", "v2", [USER_VIEW, MERCHANT_VIEW]),
        ],
    )
    assert find_view(root, "user") == VIEW
    assert find_view(root, "merchant").entity == "merchant_id"
    with pytest.raises(ConfigError, match=r"no feature view 'device'.*merchant, user"):
        find_view(root, "device")


def test_find_view_conflicting_specs_name_both_manifests(tmp_path: Path) -> None:
    other = copy.deepcopy(USER_VIEW)
    other["features"][1]["default"] = 9.0
    root = write_registry(
        tmp_path,
        [
            manifest("fraud", "v1", [USER_VIEW]),
            manifest("risk", "v1", [other]),
        ],
    )
    with pytest.raises(ConfigError, match="declared differently in fraud/v1 and risk/v1"):
        find_view(root, "user")


def test_find_view_empty_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"views there: none"):
        find_view(tmp_path, "user")
