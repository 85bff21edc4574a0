"""How the gateway's asyncio Redis clients connect.

A pooled connection whose server went away (a restart, a failover) is only found dead
when next used: its command fails once with "Connection closed by server", even though
the server now answers. Every client here redoes such a command once, at once, on a
fresh connection; nothing else is retried (timeouts are not, and a refused connection
fails again immediately), so no deadline grows.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


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
