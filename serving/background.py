"""Periodic background work inside a replica's event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `step` every `seconds` until cancelled. A failing step is logged and the loop
    goes on: a background loop must never die (its task is held, so nothing would say)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
