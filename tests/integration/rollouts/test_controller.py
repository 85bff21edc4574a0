"""Rollout status across ingress replicas (two controllers, a real redis-server; no Ray)."""

from __future__ import annotations

from typing import Any

from serving.rollouts.controller import RolloutController
from tests.conftest import RedisServer


async def _nothing(*_: Any) -> None:
    return None


async def test_status_shows_the_table_that_goes_with_the_state(
    redis_server: RedisServer,
) -> None:
    """A replica whose copy of the table lags (its reload has not run yet) still answers
    status with the table the last decision wrote beside the state, never a mix."""
    ns = "status-test"
    leader = RolloutController(redis_server.url, ns, {"m": "v1"}, _nothing, _nothing)
    other = RolloutController(redis_server.url, ns, {"m": "v1"}, _nothing, _nothing)
    other.ensure_started = _nothing  # type: ignore[method-assign]  # no reloads: it lags
    try:
        await leader.run("m", "start", {"to": "v2", "steps": [50, 100], "interval_s": 3600})
        assert other.router.tables["m"].canary is None  # its own copy is behind
        status = await other.status("m")
        assert status["rollout"]["status"] == "running"
        assert status["routing"]["canary"] == "v2" and status["routing"]["canary_weight"] == 50
        assert status["window"]["figures"].keys() == {"v1", "v2"}
    finally:
        await leader.close()
        await other.close()


async def test_redis_down_or_hung_is_a_503_not_a_500(own_redis: RedisServer) -> None:
    """Admin rollout calls wait for Redis at most ADMIN_TIMEOUT_S, and say what failed."""
    import os
    import signal
    import time

    import pytest

    from serving.errors import StateStoreUnavailable
    from serving.rollouts import view as view_module

    ctl = RolloutController(own_redis.url, "down-test", {"m": "v1"}, _nothing, _nothing)
    try:
        assert (await ctl.status("m"))["rollout"]["status"] == "idle"
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # hung: connections open, no answers
        old = view_module.ADMIN_TIMEOUT_S
        view_module.ADMIN_TIMEOUT_S = 0.5
        try:
            t0 = time.monotonic()
            with pytest.raises(StateStoreUnavailable, match="rollout status: Redis"):
                await ctl.status("m")
            assert time.monotonic() - t0 < 2.5
        finally:
            view_module.ADMIN_TIMEOUT_S = old
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        own_redis.stop()  # down: connections refused
        with pytest.raises(StateStoreUnavailable, match="rollout command: Redis unavailable"):
            await ctl.run("m", "set_weight", {"percent": 10})
    finally:
        await ctl.close()


async def test_concurrent_commands_through_two_replicas_lose_no_update(
    redis_server: RedisServer, monkeypatch: Any
) -> None:
    """50 commands at once (set-weight, pause, resume and the automatic analysis's
    advance) through two controllers: every change is a compare-and-set on the
    table's revision, so each accepted command is in the history exactly once, the
    revision grows by one per change, and the final table and state are what the last
    decisions say (no command's write replaced by a stale copy)."""
    import asyncio
    import random

    from serving.errors import Conflict
    from serving.rollouts import controller as controller_module
    from serving.rollouts.analysis import Decision

    monkeypatch.setattr(controller_module, "analyze", lambda *_: ("advance", "test says go"))
    ns = "cas-test"
    a = RolloutController(redis_server.url, ns, {"m": "v1"}, _nothing, _nothing)
    b = RolloutController(redis_server.url, ns, {"m": "v1"}, _nothing, _nothing)
    for c in (a, b):  # no background analysis: the test fires it itself
        c._analyze = _nothing  # type: ignore[method-assign]
    try:
        steps = [float(s) for s in range(1, 100)]
        await a.run("m", "start", {"to": "v2", "steps": steps, "interval_s": 0.001})
        rng = random.Random(7)

        async def command(i: int) -> str | None:
            ctl = (a, b)[i % 2]
            kind = rng.choice(["set_weight", "pause", "resume", "analysis"])
            try:
                if kind == "analysis":
                    await ctl.ensure_started()
                    await ctl.router.reload(["m"])
                    await ctl.analyze_once("m")
                else:
                    body = {"percent": rng.randint(0, 100)} if kind == "set_weight" else {}
                    await ctl.run("m", kind, body)
            except Conflict:
                return None  # e.g. pause while paused: refused, nothing changed
            return kind

        done = await asyncio.gather(*(command(i) for i in range(50)))
        status = await a.status("m")
        r = redis_server.client()
        history = [
            Decision.model_validate_json(d) for d in r.lrange(f"{ns}:rollout:m:history", 0, -1)
        ]
        history.reverse()  # oldest first
        revisions = [d.revision for d in history]
        # One decision per change, revisions consecutive: nothing overwritten.
        assert revisions == list(range(1, len(history) + 1)), revisions
        assert status["routing"]["revision"] == len(history)
        admin = [k for k in done if k in ("set_weight", "pause", "resume")]
        recorded = [d.action for d in history if d.actor == "admin"][1:]  # after start
        assert sorted(recorded) == sorted(admin)
        last = history[-1]
        assert status["routing"]["canary_weight"] == last.weight
        advances = sum(d.action == "advance" for d in history)
        assert status["rollout"]["step"] == advances
        paused = [d.action for d in history if d.action in ("pause", "resume")]
        assert status["rollout"]["status"] == (
            "paused" if paused and paused[-1] == "pause" else "running"
        )
    finally:
        await a.close()
        await b.close()
