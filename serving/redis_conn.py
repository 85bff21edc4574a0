"""How the gateway's asyncio Redis clients connect.

A pooled connection whose server went away (a restart, a failover) is only found dead
when next used: its command fails once with "Connection closed by server", even though
the server now answers. Every client here redoes such a command once, at once, on a
fresh connection; nothing else is retried (timeouts are not, and a refused connection
fails again immediately), so no deadline grows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from serving.errors import StateStoreUnavailable


@contextlib.asynccontextmanager
async def state_store(what: str, timeout_s: float | None) -> AsyncIterator[None]:
    """Redis work an admin or feedback call waits for: all of it within `timeout_s`
    (None: each Redis call within the client's socket timeout, for a call that also
    waits for other things, such as a deployment), and Redis down or hung is a clear
    503 (StateStoreUnavailable), not a 500."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            yield
    except RedisError as exc:  # redis-py's own timeouts and connection errors too
        why = str(exc) or type(exc).__name__
        raise StateStoreUnavailable(f"{what}: Redis unavailable: {why}") from None
    except TimeoutError:
        if not deadline.expired():
            raise  # not ours (e.g. a deployment that did not come up): as it is
        raise StateStoreUnavailable(
            f"{what}: Redis did not answer within {timeout_s:g} s; nothing changed, retry"
        ) from None


def reconnect_once() -> dict[str, Any]:
    """Connection options: one immediate retry on a connection error."""
    return {"retry_on_error": [RedisConnectionError], "retry": Retry(NoBackoff(), 1)}


def client(url: str) -> aioredis.Redis:
    """A client for background work and admin calls (not the request path's lookups,
    which have their own deadline-sized pool: serving.feature_store)."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        decode_responses=True,
        **reconnect_once(),
    )


class LazyClient:
    """One `client(url)` shared by a replica's background parts (routing tables,
    statistics, rollout commands), made on first use: inside the running loop."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: aioredis.Redis | None = None

    def __call__(self) -> aioredis.Redis:
        if self._client is None:
            self._client = client(self._url)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
