"""`serving models`: list the served models; show or change a version's batching;
import a version from an MLflow registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from serving.cli.common import (
    ConfigOpt,
    UrlOpt,
    admin_headers,
    cli_settings,
    console,
    fail,
    request,
    show_error,
)
from serving.errors import ConfigError

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


@models_app.command("import")
def models_import(
    uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS")],
    as_: Annotated[
        str | None,
        typer.Option(
            "--as",
            help="NAME/VERSION in the registry (default: the MLflow name, version m<number>).",
        ),
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(help="Registry folder (default: SERVING_REGISTRY_DIR, else the config's)."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow server (default: SERVING_MLFLOW_TRACKING_URI, MLFLOW_TRACKING_URI)."
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="YAML of manifest keys (batching, features, ...) over the tags'."),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Trust the registry: unpickle a scikit-learn model to convert it to ONNX.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace another model already at NAME/VERSION.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Import an MLflow model version into the registry: its ONNX or PyTorch artifact
    (scikit-learn converted to ONNX), inputs and outputs from its signature, manifest
    keys from its `serving.*` tags. Deploy it like any other version afterwards."""
    from serving.models.mlflow_source import import_version
    from serving.settings import load_deployment, read_yaml

    settings = cli_settings(config)
    name, _, version = (as_ or "").partition("/")
    if as_ is not None and (not name or "/" in version):
        fail(f"--as {as_}: write NAME/VERSION (or NAME alone: version m<MLflow number>)")
    try:
        root = registry or settings.registry_dir
        if root is None:
            root = load_deployment(settings.config).registry if settings.config.is_file() else None
        overrides = read_yaml(manifest) if manifest is not None else None
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{manifest}: must hold a mapping of manifest keys")
        mv = import_version(
            uri,
            root or Path("models"),
            name or None,
            version or None,
            overrides,
            tracking_uri or settings.mlflow_tracking_uri,
            allow_pickle=allow_pickle,
            force=force,
            progress=lambda msg: console.print(escape(msg)),
        )
    except ConfigError as exc:
        fail(str(exc))
    m = mv.manifest
    console.print(
        f"[bold]{m.name}/{m.version}[/]: flavor {m.training.get('flavor')}, runtime "
        f"{m.runtime}, artifact {m.artifact}"
    )
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            cols = f" columns {', '.join(s.columns)}" if s.columns else ""
            console.print(escape(f"  {kind} {s.name}: {s.dtype} {s.shape}{cols}"))
    console.print(escape(f"  path {mv.path}"))
