"""`serving predict`: one prediction over v1 REST, v2 REST or gRPC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from serving.cli.common import UrlOpt, cli_settings, console, fail, request, show_error


def predict(
    model: Annotated[str, typer.Argument(help="Model name.")],
    instances: Annotated[
        str, typer.Option("--instances", "-i", help="JSON list of instances, or @file.json.")
    ],
    version: Annotated[str | None, typer.Option("--version", "-v")] = None,
    url: UrlOpt = None,
    raw: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            "-p",
            help="v1 (TF-Serving REST), v2 (Open Inference Protocol REST) or grpc (OIP).",
        ),
    ] = "v1",
    grpc_target: Annotated[
        str | None,
        typer.Option("--grpc-target", help="host:port of the gRPC service (default settings)."),
    ] = None,
) -> None:
    """Send one prediction request and print the answer."""
    if protocol not in ("v1", "v2", "grpc"):
        fail(f"--protocol must be v1, v2 or grpc, not {protocol!r}")
    text = instances
    if instances.startswith("@"):
        try:
            text = Path(instances[1:]).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--instances {instances}: cannot read the file: {exc}")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--instances is not valid JSON: {exc}")
    if isinstance(parsed, dict) and "instances" in parsed:
        parsed = parsed["instances"]
    if protocol != "v1":
        _predict_oip(protocol, model, version, parsed, url, grpc_target, raw)
        return
    base = url or cli_settings().gateway_url()
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    resp = request("POST", base + path, json={"instances": parsed})
    if resp.status_code != 200:
        show_error(resp)
    body = resp.json()
    if raw:
        console.print_json(data=body)
        return
    _print_predictions(
        f"{body['model']} {body['version']}  request {body['request_id']}",
        body["predictions"],
        resp.headers.get("server-timing", ""),
    )


def _predict_oip(
    protocol: str,
    model: str,
    version: str | None,
    instances: Any,
    url: str | None,
    grpc_target: str | None,
    raw: bool,
) -> None:
    """`predict` over the Open Inference Protocol: REST v2 or gRPC."""
    from serving.cli import oip_client

    s = cli_settings()
    try:
        if protocol == "grpc":
            target = grpc_target or s.grpc_target()
            body, timing = oip_client.predict_grpc(target, model, version, instances)
        else:
            base = url or s.gateway_url()
            body, timing = oip_client.predict_rest(base, model, version, instances)
    except oip_client.OipClientError as exc:
        fail(str(exc))
    if raw:
        console.print_json(data=body)
        return
    _print_predictions(
        f"{body['model_name']} {body['model_version']}  ({protocol})",
        oip_client.predictions(body),
        timing,
    )


def _print_predictions(title: str, predictions: list[Any], timing: str) -> None:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("prediction")
    for i, p in enumerate(predictions):
        table.add_row(str(i), json.dumps(p))
    console.print(table)
    console.print(f"[dim]server-timing: {timing}[/]")
