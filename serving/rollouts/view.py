"""What every ingress replica knows of rollouts: the routing tables (kept current from
Redis), the per-arm statistics it records and flushes, and the rollout status (a read).
Only the control plane (serving.rollouts.controller, one replica) changes rollout
state; an ingress forwards commands to it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from serving import keys
from serving.background import every
from serving.errors import NotFound
from serving.redis_conn import LazyClient, state_store
from serving.rollouts.analysis import Decision, RolloutState
from serving.rollouts.stats import StatsStore
from serving.rollouts.table import RoutingTable
from serving.rollouts.tables import TableRouter

ADMIN_TIMEOUT_S = 5.0  # all the Redis work of one rollout status call


class RolloutView:
    def __init__(self, redis_url: str, namespace: str, defaults: dict[str, str]) -> None:
        self._ns = namespace
        self._redis = LazyClient(redis_url)
        # What the data plane reads: the routing tables and the statistics recorder.
        self.router = TableRouter(self._redis, namespace, defaults)
        self.stats = StatsStore(self._redis, namespace)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    async def ensure_started(self) -> None:
        """Start the loops once, from the running event loop: the routing tables' and
        the statistics flush."""
        if self._started:
            return
        self._started = True
        await self.router.ensure_started()
        self._tasks.append(
            asyncio.create_task(every(1.0, self.stats.flush, "flushing rollout statistics"))
        )

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.router.close()
        await self._redis.aclose()

    async def _state(self, model: str) -> RolloutState:
        return _parse_state(model, await self._redis().get(keys.rollout(self._ns, model)))

    def _table(self, model: str) -> RoutingTable:
        table = self.router.tables.get(model)
        if table is None:
            raise NotFound(f"model {model!r} not found", field="model")
        return table

    async def status(self, model: str) -> dict[str, Any]:
        """Routing, rollout state, window figures and history; Redis down or hung is a
        503."""
        async with state_store("rollout status", ADMIN_TIMEOUT_S):
            return await self._status(model)

    async def _status(self, model: str) -> dict[str, Any]:
        await self.ensure_started()
        table = self._table(model)
        # Table and state from one read: a decision writes both in one transaction, so
        # they agree (this replica's copy of the table may lag a decision by a moment).
        doc, raw_state, analyzed = await self._redis().mget(
            [
                keys.routing(self._ns, model),
                keys.rollout(self._ns, model),
                keys.analyzed(self._ns, model),
            ]
        )
        if doc:
            table = RoutingTable.model_validate_json(doc)
        state = _parse_state(model, raw_state)
        history = [
            Decision.model_validate_json(d).model_dump()
            for d in await self._redis().lrange(keys.history(self._ns, model), 0, 49)
        ]
        now = time.time()
        start = state.window_start if state.status == "running" else now - 60
        figures = {
            v: (await self.stats.window(model, v, start, now)).summary()
            for v in sorted(table.versions())
        }
        return {
            "model": model,
            "routing": table.model_dump(),
            "rollout": state.model_dump(),
            "window": {"since": start, "figures": figures},
            # When the analysis last looked at this rollout, and which ingress replica
            # (the leader) did: a running rollout whose analysis stopped shows here.
            "analysis": json.loads(analyzed) if analyzed else None,
            "history": history,
        }


def _parse_state(model: str, doc: str | bytes | None) -> RolloutState:
    return RolloutState.model_validate_json(doc) if doc else RolloutState(model=model)
