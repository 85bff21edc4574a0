"""Feature lookups in the request path: one pipelined Redis round trip per request.

Every unique (view, entity) of a request is fetched with HMGET in one pipelined round
trip under the request's feature deadline: over the ingress's one multiplexed connection
(serving.features.resp) for redis:// URLs, else over redis-py's pool. Nothing retries: a slow or
absent Redis yields `timeout` / `error` outcomes at once, and the model's policy decides
(defaults with `degraded`, or a 503/422). Either reconnects by itself once Redis is back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serving import keys, redis_conn
from serving.features.resp import MultiplexedRedis, checked
from serving.features.spec import TS_FIELD, FeatureConfig
from serving.observability.metrics import metrics

Outcome = Literal["hit", "miss", "stale", "timeout", "error"]
Stored = dict[str, list[dict[str, float] | None]]
_CACHE_MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Problem:
    view: str
    entity: str
    outcome: Outcome
    index: int  # first instance that refers to this entity


class RedisFeatureStore:
    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        timeout_s: float,
        cache_ttl_s: float = 0.0,
        max_connections: int = 64,
    ) -> None:
        self._url = url
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._cache_ttl_s = cache_ttl_s
        self._max_connections = max_connections
        self._client: aioredis.Redis | None = None  # made lazily inside the running loop
        # redis:// (the usual case): one multiplexed connection (serving.features.resp); other
        # URLs (TLS, unix sockets) go through redis-py's pool.
        self._mux = MultiplexedRedis(url) if MultiplexedRedis.supports(url) else None
        self._cache: dict[str, tuple[float, dict[str, float]]] = {}

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            # A bounded pool that makes callers wait for a free connection (within the
            # request's deadline) rather than opening a new one per concurrent request:
            # under a burst, connection set-up round trips cost more than waiting.
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                timeout=None,  # the caller's deadline bounds the wait
                socket_connect_timeout=self._timeout_s,
                socket_timeout=self._timeout_s,
                decode_responses=True,
                # A dead pooled connection is replaced at once; nothing else is retried
                # on the request path.
                **redis_conn.reconnect_once(),
            )
            self._client = aioredis.Redis(connection_pool=pool)
        return self._client

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def lookup(
        self, cfg: FeatureConfig, raw: Sequence[Mapping[str, Any]], timeout_s: float | None = None
    ) -> tuple[Stored, list[Problem]]:
        """Stored features for each record and view (None where absent), plus the
        entities that were not a fresh hit."""
        now = time.time()
        wanted: dict[str, tuple[str, str, list[str], int]] = {}  # key → view, id, fields, i
        ids: dict[str, list[str]] = {}
        for view in cfg.views:
            col = ids[view.name] = [str(r[view.entity]) for r in raw]
            fields = [f.name for f in view.features]
            for i, entity in enumerate(col):
                key = keys.feature(self._namespace, view.name, entity)
                if key not in wanted:
                    wanted[key] = (view.name, entity, fields, i)

        found: dict[str, dict[str, float] | None] = {}
        outcome: dict[str, Outcome] = {}
        to_fetch = []
        for key in wanted:
            cached = self._cache.get(key) if self._cache_ttl_s > 0 else None
            if cached is not None and cached[0] > now:
                found[key], outcome[key] = cached[1], "hit"
            else:
                to_fetch.append(key)

        if to_fetch:
            await self._fetch(to_fetch, wanted, cfg, found, outcome, now, timeout_s)

        m = metrics()
        problems: list[Problem] = []
        for key, (view_name, entity, _, i) in wanted.items():
            m.feature_lookups.add(1, view_name, outcome[key])
            if outcome[key] != "hit":
                problems.append(Problem(view_name, entity, outcome[key], i))
        stored: Stored = {
            view.name: [
                found.get(keys.feature(self._namespace, view.name, e)) for e in ids[view.name]
            ]
            for view in cfg.views
        }
        return stored, problems

    async def _fetch(
        self,
        keys: list[str],
        wanted: dict[str, tuple[str, str, list[str], int]],
        cfg: FeatureConfig,
        found: dict[str, dict[str, float] | None],
        outcome: dict[str, Outcome],
        now: float,
        timeout_s: float | None,
    ) -> None:
        t0 = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: no extra task per lookup (Python 3.11).
            async with asyncio.timeout(timeout_s or self._timeout_s):
                if self._mux is not None:
                    commands = [("HMGET", key, *wanted[key][2], TS_FIELD) for key in keys]
                    replies = checked(await self._mux.execute(commands))
                else:
                    pipe = self._redis().pipeline(transaction=False)
                    for key in keys:
                        pipe.hmget(key, [*wanted[key][2], TS_FIELD])
                    replies = await pipe.execute()
        except (TimeoutError, RedisTimeoutError):
            for key in keys:
                found[key], outcome[key] = None, "timeout"
            return
        except (RedisError, OSError):
            for key in keys:
                found[key], outcome[key] = None, "error"
            return
        finally:
            metrics().feature_latency.record(time.perf_counter() - t0)
        max_age = {v.name: v.max_age_s for v in cfg.views}
        for key, values in zip(keys, replies):
            view_name, _, fields, _ = wanted[key]
            if all(v is None for v in values):
                found[key], outcome[key] = None, "miss"
                continue
            try:
                row = {f: float(v) for f, v in zip(fields, values) if v is not None}
                ts = float(values[-1]) if values[-1] is not None else math.nan
            except ValueError:  # a value that is not a number: corrupt entry
                found[key], outcome[key] = None, "error"
                continue
            age_limit = max_age[view_name]
            if age_limit is not None and not (now - ts <= age_limit):
                found[key], outcome[key] = None, "stale"
                continue
            found[key], outcome[key] = row, "hit"
            if self._cache_ttl_s > 0:
                if len(self._cache) >= _CACHE_MAX_ENTRIES:
                    self._cache.clear()  # crude bound; the cache is for a hot minority
                self._cache[key] = (now + self._cache_ttl_s, row)
