"""Which replicas each model version runs, as Ray Serve's controller says, and where
their direct channels answer.

The controller pushes a deployment's running replicas to whoever long-polls for them
(the way Serve's own handles learn of them): a new list whenever a replica starts,
stops, dies or is replaced. Each replica's published metadata (serving.models.replica)
names its direct endpoint. One long poll per version, started on first use.

This reads Ray Serve internals (`LongPollClient`, `DeploymentTargetInfo`) of the Ray
release pyproject pins (2.60); `start` reports False where they are missing, and the
caller keeps using Serve handles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Endpoints = dict[str, tuple[str, int, str]]  # replica id → (host, port, token)
OnUpdate = Callable[[str, str, Endpoints], None]


class ReplicaWatch:
    def __init__(self, deployment: str, app_name: Callable[[str, str], str]) -> None:
        self._deployment = deployment
        self._app_name = app_name
        self._clients: dict[tuple[str, str], Any] = {}

    def start(self, model: str, version: str, on_update: OnUpdate) -> bool:
        """Follow a version's replicas (once; later calls do nothing). False when this
        Ray cannot be followed this way."""
        key = (model, version)
        if key in self._clients:
            return self._clients[key] is not None
        try:
            import ray
            from ray.serve._private.common import DeploymentID
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
            from ray.serve._private.long_poll import LongPollClient, LongPollNamespace

            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            dep_id = DeploymentID(name=self._deployment, app_name=self._app_name(model, version))

            def targets(info: Any) -> None:
                on_update(model, version, _endpoints(info))

            self._clients[key] = LongPollClient(
                controller,
                {(LongPollNamespace.DEPLOYMENT_TARGETS, dep_id): targets},
                call_in_event_loop=asyncio.get_running_loop(),
                client_id=f"serving-direct:{dep_id}",
            )
        except Exception as exc:  # no Ray Serve here, or internals that moved
            log.warning("cannot follow %s/%s replicas (%s): using Serve handles", *key, exc)
            self._clients[key] = None
            return False
        return True

    def stop(self) -> None:
        for client in self._clients.values():
            if client is not None:
                client.stop()
        self._clients.clear()


def _endpoints(info: Any) -> Endpoints:
    """Direct endpoints from a DeploymentTargetInfo: replicas that publish one."""
    out: Endpoints = {}
    if not getattr(info, "is_available", False):
        return out
    for r in info.running_replicas:
        meta = r.replica_metadata or {}
        address, token = meta.get("direct"), meta.get("token")
        if not isinstance(address, str) or not isinstance(token, str):
            continue
        host, _, port = address.rpartition(":")
        if port.isdigit():
            out[r.replica_id.unique_id] = (host.strip("[]"), int(port), token)
    return out
