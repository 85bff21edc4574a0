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
    from serving.rollouts import controller as controller_module

    ctl = RolloutController(own_redis.url, "down-test", {"m": "v1"}, _nothing, _nothing)
    try:
        assert (await ctl.status("m"))["rollout"]["status"] == "idle"
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # hung: connections open, no answers
        old = controller_module.ADMIN_TIMEOUT_S
        controller_module.ADMIN_TIMEOUT_S = 0.5
        try:
            t0 = time.monotonic()
            with pytest.raises(StateStoreUnavailable, match="rollout status: Redis"):
                await ctl.status("m")
            assert time.monotonic() - t0 < 2.5
        finally:
            controller_module.ADMIN_TIMEOUT_S = old
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        own_redis.stop()  # down: connections refused
        with pytest.raises(StateStoreUnavailable, match="rollout command: Redis unavailable"):
            await ctl.run("m", "set_weight", {"percent": 10})
    finally:
        await ctl.close()
