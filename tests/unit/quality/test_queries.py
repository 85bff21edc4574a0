"""The log's read side without a database: time windows, export column naming and
types, and the shipped migrations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from serving.quality import schema
from serving.quality.queries import Column, _columns, describe, parse_time

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "ago"),
    [("15m", timedelta(minutes=15)), ("2h", timedelta(hours=2)), ("1d", timedelta(days=1)),
     ("90s", timedelta(seconds=90)), (" 1.5h ", timedelta(minutes=90)), ("1w", timedelta(days=7))],
)  # fmt: skip
def test_durations_count_back_from_now(text: str, ago: timedelta) -> None:
    assert parse_time(text, NOW) == NOW - ago


def test_iso_timestamps_default_to_utc() -> None:
    assert parse_time("2026-01-02T10:00:00") == datetime(2026, 1, 2, 10, tzinfo=UTC)
    assert parse_time("2026-01-02T10:00:00+02:00") == datetime(
        2026, 1, 2, 10, tzinfo=timezone(timedelta(hours=2))
    )
    assert parse_time("2026-01-02") == datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "15", "1y", "", "-1h"])
def test_anything_else_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_time(text)


def test_a_dsn_is_shown_without_its_password() -> None:
    assert describe("postgresql://u:pw@db.example:6543/log") == "db.example:6543/log"
    assert describe("host=h dbname=d password=pw") == "h:5432/d"
    assert "pw" not in describe("postgresql://u:pw@h/d")


def _found(
    part: str, input: str | None, col: str | None, types: list[str], whole: bool = True
) -> dict[str, Any]:
    return {"part": part, "input": input, "col": col, "types": types, "integral": whole}


def test_export_columns_are_named_and_typed_from_what_was_logged() -> None:
    cols = _columns(
        [
            _found("label", None, None, ["number", "null"]),
            _found("output", "probabilities", None, ["array"]),
            _found("output", "label", None, ["number"]),
            _found("input", "features", "hour", ["number"]),
            _found("input", "features", "amount", ["number"], whole=False),
            _found("input", "features", "label", ["number"]),  # clashes with the label
            _found("input", "extra", "amount", ["number"]),  # clashes with features' amount
            _found("input", "image", None, ["array"]),
            _found("input", "note", None, ["string", "null"]),
            _found("input", "flags", "on", ["boolean"]),
            _found("input", "mixed", "v", ["number", "string"]),
        ]
    )
    assert [(c.name, c.kind) for c in cols] == [
        ("request_id", "fixed"), ("idx", "fixed"), ("ts", "fixed"), ("version", "fixed"),
        ("arm", "fixed"),
        ("extra.amount", "int"), ("features.amount", "float"), ("hour", "int"),
        ("features.label", "int"), ("on", "bool"), ("image", "json"), ("v", "json"),
        ("note", "str"),
        ("output.label", "int"), ("output.probabilities", "json"),
        ("label", "int"), ("latency_ms", "fixed"), ("degraded", "fixed"),
    ]  # fmt: skip
    assert cols[7] == Column("hour", "input", "features", "hour", "int")


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    found = schema.migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert schema.latest() == found[-1].version
    first = found[0].sql
    for table in ("predictions", "labels"):
        assert f"CREATE TABLE {table}" in first
