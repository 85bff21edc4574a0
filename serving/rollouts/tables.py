"""Every model's routing table in memory, for the request path: the data plane's Router.

Tables are read from Redis at start-up, then kept current by pub/sub (a message names
the model that changed) and by a reload every second, so a missed message costs at most
a second. Only the rollout controller writes them (serving.rollouts.controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from serving import keys
from serving.background import every
from serving.observability.metrics import metrics
from serving.redis_conn import LazyClient
from serving.rollouts.analysis import RolloutState, Status
from serving.rollouts.table import Arm, RoutingTable, choose, sample_shadow

log = logging.getLogger(__name__)

RELOAD_EVERY_S = 1.0


class TableRouter:
    def __init__(self, redis: LazyClient, namespace: str, defaults: dict[str, str]) -> None:
        self._redis = redis
        self._ns = namespace
        self.tables = {m: RoutingTable(model=m, stable=v) for m, v in defaults.items()}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # ---- the Router interface (memory only) ----------------------------------------
    def route(self, model: str, sticky: str | None) -> tuple[str, Arm]:
        return choose(self.tables[model], sticky)

    def stable(self, model: str) -> str:
        return self.tables[model].stable

    def sticky_field(self, model: str) -> str | None:
        return self.tables[model].sticky_key

    def shadow_for(self, model: str) -> str | None:
        return sample_shadow(self.tables[model])

    def routed_versions(self, model: str) -> set[str]:
        return self.tables[model].versions()

    # ---- keeping current -----------------------------------------------------------
    async def ensure_started(self) -> None:
        """Once, from the running loop: one attempt to load the tables (so a restarted
        replica routes as before), then the subscription and the periodic reload."""
        if self._started:
            return
        self._started = True
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.reload(), 2.0)
        self._tasks = [
            asyncio.create_task(self._subscribe()),
            asyncio.create_task(every(RELOAD_EVERY_S, self.reload, "routing reload")),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def reload(self, models: list[str] | None = None) -> None:
        """Tables (and, for the gauges, rollout states) from Redis: one MGET."""
        names = models or list(self.tables)
        raw = await self._redis().mget(
            [keys.routing(self._ns, m) for m in names] + [keys.rollout(self._ns, m) for m in names]
        )
        for m, doc, state in zip(names, raw[: len(names)], raw[len(names) :]):
            if doc:
                self.put(RoutingTable.model_validate_json(doc))
            status = RolloutState.model_validate_json(state).status if state else "idle"
            # Gauges are set again on every reload: Ray exports a gauge only while set.
            self.export(m, status)

    def put(self, table: RoutingTable) -> None:
        """A table read or written here; an older revision never replaces a newer one."""
        if table.revision >= self.tables[table.model].revision:
            self.tables[table.model] = table

    def export(self, model: str, status: Status) -> None:
        """The canary-weight and rollout-state gauges of one model."""
        m = metrics()
        m.canary_weight.set(self.tables[model].canary_weight, tags={"model": model})
        for s in ("idle", "running", "paused", "completed", "rolled_back"):
            m.rollout_state.set(int(s == status), tags={"model": model, "status": s})

    async def _subscribe(self) -> None:
        channel = keys.routing_channel(self._ns)
        while True:
            pubsub = self._redis().pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    # Poll with a timeout: an idle subscription is not an error.
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("data") in self.tables:
                        await self.reload([msg["data"]])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the periodic reload covers the gap
                log.debug("routing subscription lost: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
