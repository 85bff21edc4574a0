"""`serving` command line: up, serve, predict, health, models, rollout, retrain, features,
config, redis, log."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Annotated

import typer

from serving.cli import demo, features, health, log, models, predict, retrain, rollout, up

app = typer.Typer(
    help="Low-latency model serving gateway.", no_args_is_help=True, pretty_exceptions_enable=False
)


def _version(value: bool) -> None:
    if value:
        print(f"serving {metadata.version('serving')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Low-latency model serving gateway."""


app.command()(up.up)
app.command()(up.serve)
app.command()(predict.predict)
app.command()(health.health)
app.add_typer(models.models_app, name="models")
app.add_typer(up.config_app, name="config")
app.add_typer(up.redis_app, name="redis")
app.add_typer(features.features_app, name="features")
app.add_typer(rollout.rollout_app, name="rollout")
app.add_typer(retrain.retrain_app, name="retrain")
app.add_typer(demo.demo_app, name="demo")
app.add_typer(log.log_app, name="log")


def main() -> None:
    """Every error the commands do not name themselves still ends as one line on stderr
    and exit status 1, never a traceback (SERVING_CLI_TRACEBACK=1 shows it)."""
    try:
        app()
    except Exception as exc:
        if os.environ.get("SERVING_CLI_TRACEBACK") == "1":
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {message}".rstrip(": "), file=sys.stderr)
        raise SystemExit(1) from None
