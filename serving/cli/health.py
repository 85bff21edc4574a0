"""`serving health`: the container health check (the images' HEALTHCHECK)."""

from __future__ import annotations

import os
from typing import Annotated

import httpx
import typer

from serving.cli.common import UrlOpt, cli_settings, console, err
from serving.errors import ConfigError
from serving.settings import platform_settings


def health(
    url: UrlOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 3.0,
) -> None:
    """Exit 0 when the gateway on this host is ready (`/readyz` answers 200: every model
    version warm), else 1. The port follows the same settings as `serving up`, platform
    modes included (SageMaker's 8080, Vertex AI's AIP_HTTP_PORT)."""
    if url is None:
        try:
            url = platform_settings(cli_settings(), os.environ).gateway_url()
        except ConfigError as exc:
            err.print(f"unhealthy: {exc}")
            raise typer.Exit(1) from None
    try:
        resp = httpx.get(f"{url.rstrip('/')}/readyz", timeout=timeout)
    except httpx.HTTPError as exc:
        err.print(f"unhealthy: {url}/readyz: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        err.print(f"unhealthy: {url}/readyz answered {resp.status_code}: {resp.text[:300]}")
        raise typer.Exit(1)
    console.print(f"healthy: {url}/readyz")
