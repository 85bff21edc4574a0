"""What every `serving` command shares: settings, consoles, errors, gateway calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from serving.settings import Settings

# soft_wrap: result lines stay one line each, whatever the terminal width (scripts grep them).
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway URL (default from settings).")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Deployment YAML (default deployments/local.yaml)."),
]


def cli_settings(config: Path | None = None) -> Settings:
    s = Settings()
    return s.model_copy(update={"config": config}) if config is not None else s


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def request(method: str, url: str, **kw: Any) -> httpx.Response:
    try:
        return httpx.request(method, url, timeout=kw.pop("timeout", 30.0), **kw)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {url}: {exc}. Is `serving up` running?")


def show_error(resp: httpx.Response) -> NoReturn:
    try:
        e = resp.json()["error"]
        where = f" (field {e['field']})" if e.get("field") else ""
        message = f"{resp.status_code} {e['code']}: {e['message']}{where}"
    except (ValueError, KeyError, TypeError):
        message = f"{resp.status_code}: {resp.text[:500]}"
    fail(message)


def admin_headers() -> dict[str, str]:
    from serving.auth import read_token

    token = read_token(cli_settings())
    if not token:
        fail("no admin token: set SERVING_ADMIN_TOKEN or start the gateway with `serving up`")
    return {"authorization": f"Bearer {token}"}
