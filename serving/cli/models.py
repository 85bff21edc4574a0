"""`serving models`: list the served models; show or change a version's batching."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from serving.cli.common import UrlOpt, admin_headers, cli_settings, console, request, show_error

models_app = typer.Typer(help="Inspect and tune served models.", no_args_is_help=True)


@models_app.command("list")
def models_list(
    url: UrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON answer.")] = False,
) -> None:
    """Served models, their versions and states."""
    base = url or cli_settings().gateway_url()
    resp = request("GET", base + "/v1/models")
    if resp.status_code != 200:
        show_error(resp)
    if as_json:
        sys.stdout.write(json.dumps(resp.json(), indent=1) + "\n")
        return
    table = Table(title="models")
    for col in ("model", "version", "default", "state", "runtime", "held-out metrics"):
        table.add_column(col)
    for m in resp.json()["models"]:
        for v in m["versions"]:
            metrics = ", ".join(f"{k}={val:.4g}" for k, val in v["metrics"].items())
            table.add_row(
                m["name"],
                v["version"],
                "yes" if v["version"] == m["default_version"] else "",
                v["state"],
                v["runtime"],
                metrics,
            )
    console.print(table)


@models_app.command("batching")
def models_batching(
    model: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Option("--version", "-v")],
    max_batch_size: Annotated[int | None, typer.Option(help="Instances per batch.")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="Wait for a batch to fill.")] = None,
    inline_when_idle: Annotated[
        bool | None,
        typer.Option(
            "--inline-when-idle/--no-inline-when-idle",
            help="A lone one-row request runs on the event loop (default: measured).",
        ),
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Show, or change live (no restart), a version's batching parameters."""
    path = f"/admin/v1/models/{model}/versions/{version}/batching"
    base = (url or cli_settings().gateway_url()) + path
    if max_batch_size is None and batch_wait_ms is None and inline_when_idle is None:
        resp = request("GET", base, headers=admin_headers())
    else:
        body: dict[str, Any] = {}
        if max_batch_size is not None:
            body["max_batch_size"] = max_batch_size
        if batch_wait_ms is not None:
            body["batch_wait_timeout_s"] = batch_wait_ms / 1000
        if inline_when_idle is not None:
            body["inline_when_idle"] = inline_when_idle
        resp = request("PUT", base, headers=admin_headers(), json=body, timeout=60.0)
    if resp.status_code != 200:
        show_error(resp)
    console.print_json(data=resp.json())
