"""`serving rollout`: canary rollouts (start, status, pause, resume, promote, rollback,
set-weight, shadow) through the gateway's admin API."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from serving.cli.common import (
    UrlOpt,
    admin_headers,
    cli_settings,
    console,
    fail,
    request,
    show_error,
)

rollout_app = typer.Typer(
    help="Canary rollouts: weighted, sticky and shadow routing with automatic analysis.",
    no_args_is_help=True,
)


def parse_duration(text: str) -> float:
    """'60s', '2m', '500ms', '1h' or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, suffix = text, "s"
    try:
        value = float(number) * units[suffix]
    except ValueError:
        raise typer.BadParameter(f"not a duration: {text!r} (e.g. 60s, 2m, 500ms)") from None
    if value <= 0:
        raise typer.BadParameter("must be positive")
    return value


def _rollout(model: str, url: str | None, body: dict[str, Any] | None) -> dict[str, Any]:
    base = (url or cli_settings().gateway_url()) + f"/admin/v1/models/{model}/rollout"
    if body is None:
        resp = request("GET", base, headers=admin_headers())
    else:
        resp = request("POST", base, headers=admin_headers(), json=body, timeout=600.0)
    if resp.status_code != 200:
        show_error(resp)
    result: dict[str, Any] = resp.json()
    return result


def _print_status(status: dict[str, Any]) -> None:
    r, ro = status["routing"], status["rollout"]
    canary = f"{r['canary']} at {r['canary_weight']:g}%" if r["canary"] else "none"
    shadow = f"{r['shadow']} on {r['shadow_sample']:.0%}" if r["shadow"] else "none"
    console.print(
        f"[bold]{status['model']}[/]  stable [bold]{r['stable']}[/]  canary {canary}  "
        f"shadow {shadow}  sticky {r['sticky_key'] or 'random'}"
    )
    spec = ro.get("spec")
    if spec:
        steps = ", ".join(f"{s:g}" for s in spec["steps"])
        console.print(
            f"rollout [bold]{ro['status']}[/] to {spec['to']}{_source(status)}: "
            f"step {ro['step'] + 1}/"
            f"{len(spec['steps'])} of [{steps}]%, every {spec['interval_s']:g}s; "
            f"max error rate {spec['max_error_rate']:.2%}"
            + (f", max p99 {spec['max_p99_ms']:g} ms" if spec.get("max_p99_ms") else "")
            + f", min {spec['min_requests']} requests per arm"
        )
    analysis = status.get("analysis")
    if ro["status"] == "running":
        last = (
            f"last ran {time.time() - analysis['at']:.0f}s ago (leader {analysis['leader']})"
            if analysis
            else "[bold red]has not run[/]"
        )
        console.print(f"analysis {last}")
    table = Table(title="current window")
    for col in ("version", "requests", "errors", "error rate", "p99 ms", "shadow agreement"):
        table.add_column(col)
    for version, f in status["window"]["figures"].items():
        sh = f.get("shadow")
        table.add_row(
            version,
            str(f["requests"]),
            str(f["errors"]),
            f"{f['error_rate']:.2%}",
            f"{f['p99_ms']:g}",
            f"{sh['agreement']:.2%} of {sh['requests']}" if sh else "",
        )
    console.print(table)
    hist = Table(title="decisions (newest first)")
    for col in ("time", "action", "by", "weight", "reason"):
        hist.add_column(col)
    for d in status["history"][:20]:
        hist.add_row(
            time.strftime("%H:%M:%S", time.localtime(d["ts"])),
            d["action"],
            d["actor"],
            f"{d['weight']:g}%",
            d["reason"],
        )
    console.print(hist)


def _source(status: dict[str, Any]) -> str:
    """` (from models:/...)` when the rollout's canary was imported from MLflow: its
    start decision (the latest) records the URI (serving.models.mlflow_source)."""
    start = next((d for d in status["history"] if d["action"] == "start"), None)
    source = ((start or {}).get("figures") or {}).get("source")
    return f" (from {source})" if source else ""


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument()],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The canary version, or an MLflow model version (models:/NAME@ALIAS, "
            "models:/NAME/3) that the gateway imports as m<number> first.",
        ),
    ],
    steps: Annotated[str, typer.Option(help="Canary weights, percent.")] = "5,25,50,100",
    interval: Annotated[str, typer.Option(help="Analysis interval (60s, 2m).")] = "60s",
    max_error_rate: Annotated[float, typer.Option()] = 0.01,
    max_p99_ms: Annotated[float | None, typer.Option()] = None,
    min_requests: Annotated[int, typer.Option(help="Per arm, before any decision.")] = 100,
    sticky_key: Annotated[
        str | None, typer.Option(help="Instance field (user_id) or header:<name>.")
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="--to models:/...: trust the registry with a scikit-learn model (unpickled "
            "to convert it to ONNX).",
        ),
    ] = False,
    url: UrlOpt = None,
) -> None:
    """Deploy the canary (stable keeps serving) and start stepping its weight."""
    try:
        weights = [float(x) for x in steps.split(",") if x.strip()]
    except ValueError:
        fail(f"--steps must be comma-separated percentages, got {steps!r}")
    body = {
        "action": "start",
        "to": to,
        "steps": weights,
        "interval_s": parse_duration(interval),
        "max_error_rate": max_error_rate,
        "max_p99_ms": max_p99_ms,
        "min_requests": min_requests,
        "sticky_key": sticky_key,
    }
    if allow_pickle:
        body["allow_pickle"] = True
    mlflow = to.startswith("models:/")
    what = f"importing {to} (unless present) and deploying it" if mlflow else f"deploying {to}"
    console.print(f"{what} as {model}'s canary and starting the rollout…")
    _print_status(_rollout(model, url, body))


@rollout_app.command("status")
def rollout_status(
    model: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: UrlOpt = None,
) -> None:
    """Weights, current step, canary vs stable figures and the decision history."""
    status = _rollout(model, url, None)
    if as_json:
        console.print_json(data=status)
    else:
        _print_status(status)


def _simple(action: str, help_text: str) -> None:
    def command(model: Annotated[str, typer.Argument()], url: UrlOpt = None) -> None:
        _print_status(_rollout(model, url, {"action": action}))

    command.__doc__ = help_text
    rollout_app.command(action)(command)


_simple("pause", "Stop the automatic analysis; weights stay as they are.")
_simple("resume", "Restart the automatic analysis with a fresh window.")
_simple("promote", "Make the canary the stable version and retire the old one.")
_simple("rollback", "Send all traffic to stable and retire the canary.")


@rollout_app.command("set-weight")
def rollout_set_weight(
    model: Annotated[str, typer.Argument()],
    percent: Annotated[float, typer.Argument(help="Canary share, 0-100 (0.01 steps).")],
    url: UrlOpt = None,
) -> None:
    """Set the canary's share of traffic by hand."""
    _print_status(_rollout(model, url, {"action": "set_weight", "percent": percent}))


@rollout_app.command("shadow")
def rollout_shadow(
    model: Annotated[str, typer.Argument()],
    version: Annotated[str | None, typer.Option("--version", "-v")] = None,
    sample: Annotated[float | None, typer.Option(help="Fraction of requests copied.")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadowing.")] = False,
    url: UrlOpt = None,
) -> None:
    """Copy a sample of requests to a shadow version and compare its answers."""
    if off:
        body: dict[str, Any] = {"action": "shadow", "off": True}
    elif version is None or sample is None:
        fail("give --version and --sample, or --off")
    else:
        body = {"action": "shadow", "version": version, "sample": sample}
    _print_status(_rollout(model, url, body))
