"""The rollout controller inside each ingress replica.

- Holds every model's routing table in memory for the request path, kept current from
  Redis by pub/sub and by a reload every second (a missed message costs at most 1 s).
- Executes admin commands (start, pause, resume, promote, rollback, set-weight, shadow):
  deploys or retires version applications and writes the new state to Redis.
- Flushes per-arm request statistics to Redis once a second.
- Runs the analysis loop when it holds the leader lock (one replica at a time), so
  decisions are made once, from the statistics of all replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving import redis_conn
from serving.background import every
from serving.errors import Conflict, InvalidInput, NotFound
from serving.metrics import metrics
from serving.rollout import (
    STATS_TTL_S,
    ArmStats,
    Decision,
    RolloutSpec,
    RolloutState,
    StatsRecorder,
    analyze,
    bucket_start,
    window_buckets,
)
from serving.routing import Arm, RoutingTable, choose, sample_shadow

log = logging.getLogger(__name__)

Deploy = Callable[[str, list[str]], Awaitable[None]]  # model, versions to have running
Retire = Callable[[str, list[str]], Awaitable[None]]  # model, versions to remove
HISTORY_MAX = 200
LEADER_TTL_MS = 5000


class RolloutController:
    def __init__(
        self,
        redis_url: str,
        namespace: str,
        defaults: dict[str, str],
        deploy: Deploy,
        retire: Retire,
        *,
        propagation_s: float = 1.5,
    ) -> None:
        self._url = redis_url
        self._ns = namespace
        self.tables = {m: RoutingTable(model=m, stable=v) for m, v in defaults.items()}
        self._deploy = deploy
        self._retire = retire
        self._propagation_s = propagation_s
        self.recorder = StatsRecorder()
        self._id = uuid.uuid4().hex
        self._client: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._op_lock: asyncio.Lock | None = None

    # ---- keys ------------------------------------------------------------------------
    def _k_table(self, model: str) -> str:
        return f"{self._ns}:routing:{model}"

    def _k_state(self, model: str) -> str:
        return f"{self._ns}:rollout:{model}"

    def _k_history(self, model: str) -> str:
        return f"{self._ns}:rollout:{model}:history"

    def _k_analyzed(self, model: str) -> str:
        return f"{self._ns}:rollout:{model}:analyzed"

    def _k_stats(self, model: str, version: str, bucket: int) -> str:
        return f"{self._ns}:stats:{model}:{version}:{bucket}"

    @property
    def _channel(self) -> str:
        return f"{self._ns}:routing-updates"

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_conn.client(self._url)
        return self._client

    # ---- lifecycle -------------------------------------------------------------------
    async def ensure_started(self) -> None:
        """Start the background loops once, from the running event loop, after one
        attempt to load the tables (so a restarted replica routes as before)."""
        if self._started:
            return
        self._started = True
        self._op_lock = asyncio.Lock()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.reload(), 2.0)
        for coro in (
            self._subscribe(),
            every(1.0, self.reload, "routing reload"),
            every(1.0, self._flush_stats, "flushing rollout statistics"),
            every(0.5, self._analyze, "rollout analysis"),
        ):
            self._tasks.append(asyncio.create_task(coro))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._client is not None:
            await self._client.aclose()

    async def reload(self, models: list[str] | None = None) -> None:
        """Tables (and, for the gauges, rollout states) from Redis: one MGET."""
        names = models or list(self.tables)
        raw = await self._redis().mget(
            [self._k_table(m) for m in names] + [self._k_state(m) for m in names]
        )
        for m, doc, state in zip(names, raw[: len(names)], raw[len(names) :]):
            if doc:
                table = RoutingTable.model_validate_json(doc)
                if table.revision >= self.tables[m].revision:
                    self.tables[m] = table
            # Gauges are re-set on every reload: Ray exports a gauge only while set.
            metrics().canary_weight.set(self.tables[m].canary_weight, tags={"model": m})
            status = RolloutState.model_validate_json(state).status if state else "idle"
            _set_state_gauge(m, status)

    async def _subscribe(self) -> None:
        while True:
            pubsub = self._redis().pubsub()
            try:
                await pubsub.subscribe(self._channel)
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

    async def _flush_stats(self) -> None:
        """This replica's last second of per-arm statistics, in one pipeline."""
        pending = self.recorder.drain()
        if not pending:
            return
        bucket = bucket_start(time.time())
        pipe = self._redis().pipeline(transaction=False)
        for (model, version), stats in pending.items():
            key = self._k_stats(model, version, bucket)
            for f, v in stats.to_fields().items():
                pipe.hincrby(key, f, v)
            pipe.expire(key, STATS_TTL_S)
        await pipe.execute()

    # ---- request path (memory only) ----------------------------------------------------
    def route(self, model: str, sticky: str | None, pinned: str | None) -> tuple[str | None, Arm]:
        if pinned is not None:
            return pinned, "pinned"
        table = self.tables.get(model)
        if table is None:
            return None, "stable"
        return choose(table, sticky)

    def sticky_field(self, model: str) -> str | None:
        table = self.tables.get(model)
        return table.sticky_key if table else None

    def shadow_for(self, model: str) -> str | None:
        table = self.tables.get(model)
        return sample_shadow(table) if table else None

    def routed_versions(self, model: str) -> set[str]:
        table = self.tables.get(model)
        return table.versions() if table else set()

    # ---- state -----------------------------------------------------------------------
    async def _state(self, model: str) -> RolloutState:
        return _parse_state(model, await self._redis().get(self._k_state(model)))

    async def _save(
        self, table: RoutingTable, state: RolloutState, decision: Decision | None
    ) -> None:
        table = table.model_copy(update={"revision": self.tables[table.model].revision + 1})
        pipe = self._redis().pipeline(transaction=True)
        pipe.set(self._k_table(table.model), table.model_dump_json())
        pipe.set(self._k_state(table.model), state.model_dump_json())
        if decision is not None:
            pipe.lpush(self._k_history(table.model), decision.model_dump_json())
            pipe.ltrim(self._k_history(table.model), 0, HISTORY_MAX - 1)
        pipe.publish(self._channel, table.model)
        await pipe.execute()
        self.tables[table.model] = table
        metrics().canary_weight.set(table.canary_weight, tags={"model": table.model})
        _set_state_gauge(table.model, state.status)
        if decision is not None:
            metrics().rollout_decisions.inc(
                1, tags={"model": table.model, "action": decision.action}
            )
            log.info("rollout %s: %s (%s)", table.model, decision.action, decision.reason)

    def _table(self, model: str) -> RoutingTable:
        table = self.tables.get(model)
        if table is None:
            raise NotFound(f"model {model!r} not found", field="model")
        return table

    async def window(self, model: str, version: str, start: float, end: float) -> ArmStats:
        keys = [self._k_stats(model, version, b) for b in window_buckets(start, end)]
        pipe = self._redis().pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        total = ArmStats()
        for raw in await pipe.execute():
            if raw:
                total.add(ArmStats.from_fields(raw))
        return total

    # ---- commands --------------------------------------------------------------------
    async def run(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """One admin command, serialised per replica."""
        await self.ensure_started()
        assert self._op_lock is not None
        async with self._op_lock:
            await self.reload([model])
            handler = {
                "start": self._start,
                "pause": self._pause,
                "resume": self._resume,
                "promote": self._promote_cmd,
                "rollback": self._rollback_cmd,
                "set_weight": self._set_weight,
                "shadow": self._shadow,
            }.get(action)
            if handler is None:
                raise InvalidInput(f"unknown action {action!r}", field="action")
            await handler(model, body)
        return await self.status(model)

    def _decision(
        self,
        action: Any,
        actor: Any,
        reason: str,
        weight: float,
        figures: dict[str, Any] | None = None,
    ) -> Decision:
        return Decision(
            ts=time.time(),
            action=action,
            actor=actor,
            reason=reason,
            weight=weight,
            figures=figures or {},
        )

    async def _start(self, model: str, body: dict[str, Any]) -> None:
        table = self._table(model)
        try:
            spec = RolloutSpec.model_validate(body)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        state = await self._state(model)
        if state.status in ("running", "paused"):
            raise Conflict(
                f"a rollout of {model} to {state.spec.to if state.spec else '?'} "
                "is in progress; promote or roll it back first"
            )
        if spec.to == table.stable:
            raise InvalidInput(f"{spec.to} is already the stable version", field="to")
        await self._deploy(model, [table.stable, spec.to])  # stable keeps serving meanwhile
        now = time.time()
        new_table = table.model_copy(
            update={
                "canary": spec.to,
                "canary_weight": spec.steps[0],
                "sticky_key": spec.sticky_key,
            }
        )
        state = RolloutState(
            model=model, status="running", spec=spec, stable=table.stable, step=0, window_start=now
        )
        await self._save(
            new_table,
            state,
            self._decision(
                "start",
                "admin",
                f"canary {spec.to} deployed; {spec.steps[0]:g}% of traffic",
                spec.steps[0],
            ),
        )

    async def _pause(self, model: str, body: dict[str, Any]) -> None:
        state = await self._require(model, ("running",))
        state.status = "paused"
        table = self._table(model)
        await self._save(
            table,
            state,
            self._decision("pause", "admin", "analysis paused; weights kept", table.canary_weight),
        )

    async def _resume(self, model: str, body: dict[str, Any]) -> None:
        state = await self._require(model, ("paused",))
        state.status, state.window_start = "running", time.time()
        table = self._table(model)
        await self._save(
            table, state, self._decision("resume", "admin", "analysis resumed", table.canary_weight)
        )

    async def _require(self, model: str, statuses: tuple[str, ...]) -> RolloutState:
        state = await self._state(model)
        if state.status not in statuses:
            raise Conflict(
                f"no rollout of {model} is {' or '.join(statuses)} (status {state.status})"
            )
        return state

    async def _promote_cmd(self, model: str, body: dict[str, Any]) -> None:
        await self.promote(model, "admin", "promoted by an operator")

    async def _rollback_cmd(self, model: str, body: dict[str, Any]) -> None:
        await self.rollback(model, "admin", "rolled back by an operator")

    async def promote(
        self, model: str, actor: str, reason: str, figures: dict[str, Any] | None = None
    ) -> None:
        """The canary becomes stable; the old stable's replicas are retired once every
        ingress has the new table (in-flight requests finish on the old replicas)."""
        table = self._table(model)
        if table.canary is None:
            raise Conflict(f"{model} has no canary to promote")
        state = await self._state(model)
        old = table.stable
        new_table = table.model_copy(
            update={"stable": table.canary, "canary": None, "canary_weight": 0.0}
        )
        state.status, state.stable = "completed", table.canary
        action = "complete" if actor == "auto" else "promote"
        await self._save(new_table, state, self._decision(action, actor, reason, 100.0, figures))
        await asyncio.sleep(self._propagation_s)
        if old not in new_table.versions():
            await self._retire(model, [old])

    async def rollback(
        self, model: str, actor: str, reason: str, figures: dict[str, Any] | None = None
    ) -> None:
        table = self._table(model)
        if table.canary is None:
            raise Conflict(f"{model} has no canary to roll back")
        state = await self._state(model)
        canary = table.canary
        new_table = table.model_copy(update={"canary": None, "canary_weight": 0.0})
        state.status = "rolled_back"
        await self._save(new_table, state, self._decision("rollback", actor, reason, 0.0, figures))
        await asyncio.sleep(self._propagation_s)
        if canary not in new_table.versions():
            await self._retire(model, [canary])

    async def _set_weight(self, model: str, body: dict[str, Any]) -> None:
        table = self._table(model)
        if table.canary is None:
            raise Conflict(f"{model} has no canary; start a rollout first")
        try:
            pct = float(body["percent"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInput("set_weight needs 'percent' (0-100)", field="percent") from None
        if not 0 <= pct <= 100:
            raise InvalidInput("percent must be within 0-100", field="percent")
        state = await self._state(model)
        await self._save(
            table.model_copy(update={"canary_weight": round(pct, 2)}),
            state,
            self._decision("set_weight", "admin", f"canary weight set to {pct:g}%", pct),
        )

    async def _shadow(self, model: str, body: dict[str, Any]) -> None:
        table = self._table(model)
        state = await self._state(model)
        if body.get("off"):
            old = table.shadow
            await self._save(
                table.model_copy(update={"shadow": None, "shadow_sample": 0.0}),
                state,
                self._decision("shadow", "admin", "shadow off", table.canary_weight),
            )
            if old is not None and old not in self.tables[model].versions():
                await asyncio.sleep(self._propagation_s)
                await self._retire(model, [old])
            return
        version, sample = body.get("version"), body.get("sample")
        if not isinstance(version, str) or not isinstance(sample, (int, float)):
            raise InvalidInput("shadow needs 'version' and 'sample' (0-1), or 'off'")
        if not 0 < sample <= 1:
            raise InvalidInput("sample must be within (0, 1]", field="sample")
        if version == table.stable:
            raise InvalidInput("the shadow must differ from the stable version", field="version")
        await self._deploy(model, sorted(table.versions() | {version}))
        await self._save(
            table.model_copy(update={"shadow": version, "shadow_sample": sample}),
            state,
            self._decision(
                "shadow",
                "admin",
                f"shadow {version} on {sample:.0%} of requests",
                table.canary_weight,
            ),
        )

    async def status(self, model: str) -> dict[str, Any]:
        await self.ensure_started()
        table = self._table(model)
        # Table and state from one read: a decision writes both in one transaction, so
        # they agree (this replica's copy of the table may lag a decision by a moment).
        doc, raw_state, analyzed = await self._redis().mget(
            [self._k_table(model), self._k_state(model), self._k_analyzed(model)]
        )
        if doc:
            table = RoutingTable.model_validate_json(doc)
        state = _parse_state(model, raw_state)
        history = [
            Decision.model_validate_json(d).model_dump()
            for d in await self._redis().lrange(self._k_history(model), 0, 49)
        ]
        now = time.time()
        start = state.window_start if state.status == "running" else now - 60
        figures = {
            v: (await self.window(model, v, start, now)).summary() for v in sorted(table.versions())
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

    # ---- analysis ----------------------------------------------------------------------
    async def _leader(self) -> bool:
        r = self._redis()
        key = f"{self._ns}:rollout-leader"
        if await r.set(key, self._id, nx=True, px=LEADER_TTL_MS):
            return True
        if await r.get(key) == self._id:
            await r.pexpire(key, LEADER_TTL_MS)
            return True
        return False

    async def _analyze(self) -> None:
        if await self._leader():
            for model in list(self.tables):
                await self._tick(model)

    async def _tick(self, model: str) -> None:
        assert self._op_lock is not None
        async with self._op_lock:
            state = await self._state(model)
            if state.status != "running" or state.spec is None:
                return
            now = time.time()
            await self._redis().set(
                self._k_analyzed(model),
                json.dumps({"at": now, "leader": self._id[:12]}),
                ex=STATS_TTL_S,
            )
            if now - state.window_start < state.spec.interval_s:
                return
            table = self._table(model)
            if table.canary is None:
                return
            canary = await self.window(model, table.canary, state.window_start, now)
            stable = await self.window(model, table.stable, state.window_start, now)
            action, reason = analyze(state.spec, state.step, canary, stable)
            figures = {"canary": canary.summary(), "stable": stable.summary()}
            if action == "rollback":
                await self.rollback(model, "auto", reason, figures)
            elif action == "complete":
                await self.promote(model, "auto", reason, figures)
            elif action == "advance":
                state.step += 1
                state.window_start = now
                weight = state.spec.steps[state.step]
                await self._save(
                    table.model_copy(update={"canary_weight": weight}),
                    state,
                    self._decision(
                        "advance", "auto", f"{reason}; now {weight:g}%", weight, figures
                    ),
                )
            else:  # hold: the window keeps growing; record the first hold only
                last = await self._redis().lindex(self._k_history(model), 0)
                if last is None or Decision.model_validate_json(last).action != "hold":
                    await self._save(
                        table,
                        state,
                        self._decision("hold", "auto", reason, table.canary_weight, figures),
                    )


def _parse_state(model: str, doc: str | bytes | None) -> RolloutState:
    return RolloutState.model_validate_json(doc) if doc else RolloutState(model=model)


def _set_state_gauge(model: str, current: str) -> None:
    for status in ("idle", "running", "paused", "completed", "rolled_back"):
        metrics().rollout_state.set(int(status == current), tags={"model": model, "status": status})
