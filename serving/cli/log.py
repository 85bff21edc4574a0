"""`serving log`: the prediction and label log in PostgreSQL (migrate, accuracy, export).

The database is `--dsn` or the `log_dsn` setting (SERVING_LOG_DSN). Problems the user
can fix (no DSN, a database that does not answer, no rows, a bad --since) end as one
line on stderr with exit status 2. The database client and Arrow are imported by the
commands that use them, not by every `serving` command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast

import typer
from rich.markup import escape
from rich.table import Table

from serving.cli.common import console, fail
from serving.settings import Settings

log_app = typer.Typer(help="The prediction and label log (PostgreSQL).", no_args_is_help=True)

USAGE = 2  # exit status for problems the user can fix
FORMATS = ("parquet", "csv")
T = TypeVar("T")

DsnOpt = Annotated[
    str | None,
    typer.Option("--dsn", help="PostgreSQL DSN (default: the log_dsn setting, SERVING_LOG_DSN)."),
]
SinceOpt = Annotated[
    str, typer.Option("--since", help="Start of the window: 15m, 2h, 1d or an ISO timestamp.")
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", help="End of the window (default: now); same forms as --since."),
]
VersionOpt = Annotated[
    str | None, typer.Option("--version", help="Only this model version (default: all).")
]


def _usage(message: str) -> NoReturn:
    fail(message, USAGE)


def _dsn(dsn: str | None) -> str:
    found = dsn or Settings().log_dsn
    if not found:
        _usage("no prediction log configured: set SERVING_LOG_DSN or pass --dsn")
    import psycopg.conninfo

    try:
        psycopg.conninfo.conninfo_to_dict(found)
    except psycopg.ProgrammingError:  # its message may quote the DSN, password and all
        _usage("not a PostgreSQL DSN: use postgresql://user@host:port/dbname or key=value pairs")
    return found


def _time(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    from serving.quality import queries

    try:
        return queries.parse_time(text)
    except ValueError as exc:
        _usage(f"{option}: {exc}")


def _run(dsn: str, call: Callable[[], T]) -> T:
    """Call the database; its failures as one line naming where."""
    import psycopg

    from serving.quality import queries

    where = queries.describe(dsn)
    try:
        return call()
    except psycopg.errors.UndefinedTable:
        _usage(f"no prediction log in {where}: run `serving log migrate` first")
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _usage(f"cannot reach PostgreSQL at {where}: {first}")
    except queries.NoRows as exc:
        _usage(str(exc))


@log_app.command("migrate")
def migrate(dsn: DsnOpt = None) -> None:
    """Create or update the log's tables (versioned migrations, each applied once)."""
    from serving.quality import queries

    url = _dsn(dsn)
    applied, latest = _run(url, lambda: queries.migrate(url))
    where = escape(queries.describe(url))
    if applied:
        shown = ", ".join(str(v) for v in applied)
        console.print(f"applied migration(s) {shown} to {where}: schema version {latest}")
    else:
        console.print(f"{where} is up to date: schema version {latest}", highlight=False)


@log_app.command("accuracy")
def accuracy(
    model: Annotated[str, typer.Argument(help="Model name.")],
    since: SinceOpt = "1h",
    until: UntilOpt = None,
    version: VersionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    dsn: DsnOpt = None,
) -> None:
    """Accuracy per version over a window.

    From the logged predictions and the latest label of each instance.
    """
    from serving.quality import queries

    url = _dsn(dsn)
    start, end = _time("--since", since), _time("--until", until)
    assert start is not None
    rows = _run(url, lambda: queries.accuracy(url, model, start, end, version))
    if not rows:
        _usage(f"no predictions of model {model} since {start:%Y-%m-%d %H:%M:%S} UTC")
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"{escape(model)} since {start:%Y-%m-%d %H:%M:%S} UTC")
    for col in ("version", "predictions", "labelled", "correct", "accuracy"):
        table.add_column(col, justify="left" if col == "version" else "right")
    for r in rows:
        acc: Any = r["accuracy"]
        shown = "-" if acc is None else f"{acc:.4f}"
        table.add_row(
            escape(r["version"]),
            *(str(r[k]) for k in ("predictions", "labelled", "correct")),
            shown,
        )
    console.print(table)


@log_app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="Model name.")],
    since: SinceOpt,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default MODEL.FORMAT).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="parquet or csv.")] = "parquet",
    until: UntilOpt = None,
    version: VersionOpt = None,
    labelled_only: Annotated[
        bool, typer.Option("--labelled-only", help="Only instances that have a label.")
    ] = False,
    dsn: DsnOpt = None,
) -> None:
    """Write training data: one row per logged instance, Parquet or CSV.

    Inputs (looked-up features included), outputs, the latest label, latency, degraded.
    """
    from serving.quality import queries

    if fmt not in FORMATS:
        _usage(f"--format: expected parquet or csv, got {fmt!r}")
    url = _dsn(dsn)
    start, end = _time("--since", since), _time("--until", until)
    assert start is not None
    path = output or Path(f"{model}.{fmt}")
    if not path.parent.is_dir():
        _usage(f"-o: no folder {path.parent}")
    kind = cast(queries.Format, fmt)
    n = _run(
        url, lambda: queries.export(url, model, start, end, version, labelled_only, path, kind)
    )
    console.print(f"wrote {n} rows to {escape(str(path))} ({fmt})", highlight=False)
