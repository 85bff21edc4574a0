"""The rollout control plane: one owner of rollout state, in its own one-replica
deployment (serving.app.RolloutControl), separate from the ingress.

- Executes admin commands (start, pause, resume, promote, rollback, set-weight, shadow)
  that ingress replicas forward to it: deploys or retires version applications and
  writes the new state to Redis, where every ingress replica's routing tables
  (serving.rollouts.tables) pick it up.
- Runs the analysis loop while it holds the leader lock (so a replica Serve starts in
  place of a dead one, or one overlapping it in an update, never decides twice), from
  the statistics every ingress replica flushes. A restarted controller resumes a
  rollout where it was: its whole state is in Redis.
- Every change is a compare-and-set on the routing table's revision: a command or an
  analysis step that lost a race to another writer re-reads and decides again.
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

from serving import keys
from serving.background import every
from serving.errors import Conflict, InvalidInput
from serving.observability.metrics import metrics
from serving.redis_conn import state_store
from serving.rollouts.analysis import Decision, RolloutSpec, RolloutState, analyze
from serving.rollouts.table import RoutingTable
from serving.rollouts.view import RolloutView

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 20  # a command re-read and re-applied after losing a race, at most

# A decision is a compare-and-set on the routing table's revision: table, state and
# history change together only if nobody changed the table since the command read it.
# KEYS: routing, rollout state, history; ARGV: expected revision, table, state,
# decision ('' for none), history length, channel, model. 1: applied, 0: stale.
_SAVE_IF_CURRENT = """
local current = redis.call('GET', KEYS[1])
local revision = 0
if current then revision = cjson.decode(current)['revision'] or 0 end
if revision ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""

# The analysis leader: take the lock if free, or renew it if this controller holds it.
_LEAD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

Deploy = Callable[[str, list[str]], Awaitable[None]]  # model, versions to have running
Retire = Callable[[str, list[str]], Awaitable[None]]  # model, versions to remove


class StaleRevision(Exception):
    """Another writer changed the table since this command read it."""


class RolloutController(RolloutView):
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
        super().__init__(redis_url, namespace, defaults)
        self._deploy = deploy
        self._retire = retire
        self._propagation_s = propagation_s
        self._id = uuid.uuid4().hex
        self._op_lock: asyncio.Lock | None = None  # made inside the running loop

    async def ensure_started(self) -> None:
        """The view's loops, and the analysis."""
        if self._op_lock is not None:
            return
        self._op_lock = asyncio.Lock()
        await super().ensure_started()
        self._tasks.append(asyncio.create_task(every(0.5, self._analyze, "rollout analysis")))

    # ---- state -----------------------------------------------------------------------
    async def _save(
        self, table: RoutingTable, state: RolloutState, decision: Decision | None
    ) -> None:
        """Write the table (one revision on from the one the command read), the state
        and the decision at once, or raise StaleRevision if the table moved on."""
        expected = table.revision
        table = table.model_copy(update={"revision": expected + 1})
        if decision is not None:
            decision = decision.model_copy(update={"revision": table.revision})
        applied = await self._redis().eval(
            _SAVE_IF_CURRENT,
            3,
            keys.routing(self._ns, table.model),
            keys.rollout(self._ns, table.model),
            keys.history(self._ns, table.model),
            expected,
            table.model_dump_json(),
            state.model_dump_json(),
            decision.model_dump_json() if decision is not None else "",
            keys.HISTORY_MAX,
            keys.routing_channel(self._ns),
            table.model,
        )
        if not applied:
            raise StaleRevision(table.model)
        self.router.put(table)
        self.router.export(table.model, state.status)
        if decision is not None:
            metrics().rollout_decisions.inc(
                1, tags={"model": table.model, "action": decision.action}
            )
            log.info("rollout %s: %s (%s)", table.model, decision.action, decision.reason)

    # ---- commands --------------------------------------------------------------------
    async def run(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """One admin command, serialised per replica; Redis down or hung is a 503. No
        overall deadline: a command may wait for a deployment (each Redis call has the
        client's socket timeout, and a deployment is not cut off half way)."""
        async with state_store("rollout command", None):
            return await self._run(model, action, body)

    async def _run(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        await self.ensure_started()
        assert self._op_lock is not None
        async with self._op_lock:
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
            # Read, decide, compare-and-set; lost a race: read again and decide anew
            # (the command may now be refused, e.g. pause after another pause).
            for _ in range(CAS_ATTEMPTS):
                await self.router.reload([model])
                try:
                    await handler(model, body)
                    break
                except StaleRevision:
                    continue
            else:
                raise Conflict(f"{model}'s rollout kept changing under this command; retry")
        return await self._status(model)

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
        # `source`: the MLflow URI the canary was imported from (serving.app), recorded
        # in the decision so that status and history show both.
        source = body.get("source")
        try:
            spec = RolloutSpec.model_validate({k: v for k, v in body.items() if k != "source"})
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
                f"canary {spec.to}{f' ({source})' if source else ''} deployed; "
                f"{spec.steps[0]:g}% of traffic",
                spec.steps[0],
                {"source": source} if source else None,
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
            if old is not None and old not in self.router.tables[model].versions():
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

    # ---- analysis ----------------------------------------------------------------------
    async def _leader(self) -> bool:
        lead = await self._redis().eval(
            _LEAD, 1, keys.leader(self._ns), self._id, keys.LEADER_TTL_MS
        )
        return bool(lead)

    async def _analyze(self) -> None:
        if await self._leader():
            for model in list(self.router.tables):
                await self.analyze_once(model)

    async def analyze_once(self, model: str) -> None:
        """One look at a running rollout (the leader's, every 0.5 s)."""
        with contextlib.suppress(StaleRevision):  # a command got there first
            await self._tick(model)

    async def _tick(self, model: str) -> None:
        assert self._op_lock is not None
        async with self._op_lock:
            state = await self._state(model)
            if state.status != "running" or state.spec is None:
                return
            now = time.time()
            await self._redis().set(
                keys.analyzed(self._ns, model),
                json.dumps({"at": now, "leader": self._id[:12]}),
                ex=keys.STATS_TTL_S,
            )
            if now - state.window_start < state.spec.interval_s:
                return
            table = self._table(model)
            if table.canary is None:
                return
            canary = await self.stats.window(model, table.canary, state.window_start, now)
            stable = await self.stats.window(model, table.stable, state.window_start, now)
            action, reason = analyze(state.spec, state.step, canary, stable, state.stable_accuracy)
            if stable.labeled >= state.spec.min_labels:
                state.stable_accuracy = stable.accuracy
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
                last = await self._redis().lindex(keys.history(self._ns, model), 0)
                if last is None or Decision.model_validate_json(last).action != "hold":
                    await self._save(
                        table,
                        state,
                        self._decision("hold", "auto", reason, table.canary_weight, figures),
                    )

    # ---- what the retraining trigger asks (serving.quality.retrain.Host) ----------------
    async def leading(self) -> bool:
        return await self._leader()

    async def rollout_active(self, model: str) -> bool:
        return (await self._state(model)).status in ("running", "paused")

    def stable_version(self, model: str) -> str:
        return self._table(model).stable

    async def start_rollout(self, model: str, body: dict[str, Any]) -> None:
        await self.run(model, "start", body)
