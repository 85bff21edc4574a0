"""`serving demo build DIR`: the demo models and their deployment file, anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.common import console, fail

demo_app = typer.Typer(help="The demo models.", no_args_is_help=True)


@demo_app.command("build")
def demo_build(
    root: Annotated[Path, typer.Argument(help="Folder to build the demo registry in.")],
    force: Annotated[bool, typer.Option(help="Rebuild models already present.")] = False,
) -> None:
    """Train the demo models (seeded, ~20 s) into ROOT and write ROOT/deployment.yaml;
    then `serving up --config ROOT/deployment.yaml`. Needs the `train` extra."""
    try:
        from serving.demo.build import build_all, write_deployment

        build_all(root, force)
    except ImportError as exc:
        fail(
            f"training the demo models needs the train extra ({exc}): pip install 'serving[train]'"
        )
    console.print(f"deployment file: {write_deployment(root)}")
