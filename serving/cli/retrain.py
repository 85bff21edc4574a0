"""`serving retrain status|run|history MODEL`: the model-quality loop's retraining,
through the gateway's admin API (serving.quality.retrain runs it in the control plane)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from serving.cli.common import UrlOpt, admin_headers, cli_settings, console, request, show_error

retrain_app = typer.Typer(
    help="Retraining on accuracy or drift: the policy's state, a run now, past runs.",
    no_args_is_help=True,
)


def _call(method: str, model: str, url: str | None, suffix: str = "") -> Any:
    base = (url or cli_settings().gateway_url()) + f"/admin/v1/models/{model}/retrain{suffix}"
    resp = request(method, base, headers=admin_headers(), timeout=60.0)
    if resp.status_code != 200:
        show_error(resp)
    return resp.json()


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _run_line(run: dict[str, Any]) -> str:
    took = f" in {run['finished'] - run['started']:.0f}s" if run.get("finished") else ""
    parts = [
        f"{run['version']} ({run['actor']}) {run['status']}{took}",
        f"started {_when(run['started'])} from {run['base']}",
        f"reason: {run['reason']}",
    ]
    if run.get("error"):
        parts.append(f"error: {run['error']}")
    if run.get("registered_as"):
        parts.append(f"registered as {run['registered_as']}")
    if run.get("rollout"):
        parts.append(f"rollout: {run['rollout']}")
    return "\n  ".join(escape(p) for p in parts)


@retrain_app.command("status")
def status(model: str, url: UrlOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """The model's retrain policy, its latest run and the cool-down left."""
    st = _call("GET", model, url)
    if as_json:
        console.print_json(json.dumps(st))
        return
    p = st["policy"]
    triggers = []
    if p.get("accuracy"):
        a = p["accuracy"]
        triggers.append(
            f"accuracy {a['drop']:.1%} below the {a['reference']} reference "
            f"(>= {a['min_labels']} labels in {a['window_s']:g}s)"
        )
    if p.get("drift"):
        triggers.append(f"PSI > {p['drift']['psi']:g} for {p['drift']['for_s']:g}s")
    console.print(f"[bold]{escape(model)}[/]: retrain on " + escape("; or ".join(triggers)))
    console.print("command: " + escape(" ".join(p["command"])))
    console.print(
        f"running: {'yes' if st['running'] else 'no'}   "
        f"cool-down left: {st['cooldown_left_s']:.0f}s"
    )
    console.print("last run: " + (_run_line(st["last"]) if st["last"] else "none"))


@retrain_app.command("run")
def run(
    model: str,
    url: UrlOpt = None,
    wait: bool = typer.Option(False, "--wait", help="Wait until the run ends."),
    timeout: float = typer.Option(1800.0, help="Seconds --wait waits at most."),
) -> None:
    """Retrain now with the model's policy; a canary rollout of the result follows."""
    started = _call("POST", model, url)
    console.print(f"retraining {escape(model)} as {escape(started['version'])}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = _call("GET", model, url)["last"]
        if last and last["version"] == started["version"] and last["status"] != "running":
            console.print(_run_line(last))
            if last["status"] != "registered":
                raise typer.Exit(1)
            return
        time.sleep(2.0)
    console.print(f"still running after {timeout:g}s")
    raise typer.Exit(1)


@retrain_app.command("history")
def history(model: str, url: UrlOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Past runs, newest first."""
    runs = _call("GET", model, url, "/history")["runs"]
    if as_json:
        console.print_json(json.dumps(runs))
        return
    table = Table("version", "started", "by", "outcome", "reason", "rollout")
    for r in runs:
        outcome = r["status"] + (f": {r['error']}" if r.get("error") else "")
        table.add_row(
            r["version"], _when(r["started"]), r["actor"], outcome, r["reason"], r["rollout"]
        )
    console.print(table if runs else "no retraining runs yet")
