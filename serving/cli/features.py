"""`serving features`: load a feature view into Redis, look up one entity."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import redis
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from serving.cli.common import console, err, fail
from serving.errors import ConfigError
from serving.features import materialize
from serving.features.spec import TS_FIELD, FeatureView
from serving.settings import Settings, load_deployment

features_app = typer.Typer(help="Online features in Redis.", no_args_is_help=True)

MAX_ERRORS_SHOWN = 20

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Deployment YAML naming the registry (default from settings)."
    ),
]


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    p = urlparse(url)
    if p.password is None:
        return url
    netloc = f"{p.username or ''}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
    return p._replace(netloc=netloc).geturl()


def _view(settings: Settings, config: Path | None, name: str) -> FeatureView:
    try:
        dep = load_deployment(config or settings.config, settings.registry_dir)
        return materialize.find_view(dep.registry, name)
    except ConfigError as exc:
        fail(str(exc))


def _age(seconds: float) -> str:
    if seconds < 0:
        return "in the future"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s ago"
    if s < 3600:
        return f"{s // 60}m {s % 60}s ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    return f"{s // 86400}d {s % 86400 // 3600}h ago"


@features_app.command("load")
def load(
    path: Annotated[Path, typer.Argument(help="CSV or Parquet file, one row per entity.")],
    view: Annotated[str, typer.Option("--view", help="Feature view (from a manifest).")],
    entity_column: Annotated[
        str | None,
        typer.Option(
            "--entity-column", help="Column holding the entity id (default: the view's entity)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="HSETs per pipeline round trip.")] = 1000,
    config: ConfigOpt = None,
) -> None:
    """Load a CSV or Parquet file into a feature view.

    Every row is validated first: if any is bad, nothing is written. Safe to repeat.
    """
    settings = Settings()
    fv = _view(settings, config, view)
    url = settings.redis_url
    written = 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no bar in logs and pipes
    ) as bar:
        task = bar.add_task(f"validating {escape(path.name)}", total=None)

        def progress(done: int, total: int) -> None:
            nonlocal written
            written = done
            bar.update(task, description=f"writing {escape(fv.name)}", completed=done, total=total)

        try:
            report = materialize.load(
                url, settings.redis_namespace, fv, path, entity_column, batch_size, progress
            )
        except ConfigError as exc:
            bar.stop()
            fail(str(exc))
        except materialize.MaterializeError as exc:
            bar.stop()
            for line in exc.errors[:MAX_ERRORS_SHOWN]:
                err.print(escape(line), highlight=False)
            if len(exc.errors) > MAX_ERRORS_SHOWN:
                err.print(f"... and {len(exc.errors) - MAX_ERRORS_SHOWN} more")
            fail(f"{len(exc.errors)} error(s) in {path}; nothing was written")
        except redis.RedisError as exc:
            bar.stop()
            if written:
                fail(
                    f"Redis at {_safe_url(url)} failed after {written} rows were written "
                    f"({exc}); loading the file again is safe"
                )
            fail(f"cannot reach Redis at {_safe_url(url)}: {exc}")
    console.print(
        f"loaded {report.rows} rows into view {escape(fv.name)} in {report.seconds:.2f} s "
        f"({report.rows_per_s:.0f} rows/s)",
        highlight=False,
    )


@features_app.command("get")
def get(
    view: Annotated[str, typer.Argument(help="Feature view.")],
    entity_id: Annotated[str, typer.Argument(metavar="ID", help="Entity id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show one entity's stored features and their age."""
    settings = Settings()
    fv = _view(settings, config, view)
    try:
        stored = materialize.get(settings.redis_url, settings.redis_namespace, fv, entity_id)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis at {_safe_url(settings.redis_url)}: {exc}")
    if stored is None:
        fail(f"no entity {entity_id} in view {view}")
    ts = stored.pop(TS_FIELD, None)
    age = None if ts is None else time.time() - ts
    stale = age is not None and fv.max_age_s is not None and age > fv.max_age_s
    if as_json:
        body = {
            "view": fv.name,
            "entity_id": entity_id,
            "features": stored,
            "ts": ts,
            "age_s": age,
            "stale": stale,
        }
        console.print_json(json.dumps(body))
        return
    table = Table(title=f"{escape(fv.name)} {escape(entity_id)}")
    table.add_column("feature")
    table.add_column("value", justify="right")
    for f in fv.features:
        value = stored.get(f.name)
        shown = f"{value:g}" if value is not None else f"[dim](absent: default {f.default:g})[/]"
        table.add_row(escape(f.name), shown)
    for name in sorted(set(stored) - {f.name for f in fv.features}):
        table.add_row(f"[dim]{escape(name)} (not in view)[/]", f"{stored[name]:g}")
    console.print(table)
    if ts is None or age is None:
        console.print("[yellow]no _ts: age unknown[/]")
    else:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        note = f"  [bold red]stale (max_age_s {fv.max_age_s:g})[/]" if stale else ""
        console.print(f"updated {when} ({_age(age)}){note}", highlight=False)
