"""`serving` command line: up, predict, models, rollout, features, config, redis."""

from __future__ import annotations

import typer

from serving.cli import features, models, predict, rollout, up

app = typer.Typer(help="Low-latency model serving gateway.", no_args_is_help=True)
app.command()(up.up)
app.command()(predict.predict)
app.add_typer(models.models_app, name="models")
app.add_typer(up.config_app, name="config")
app.add_typer(up.redis_app, name="redis")
app.add_typer(features.features_app, name="features")
app.add_typer(rollout.rollout_app, name="rollout")


def main() -> None:
    app()
