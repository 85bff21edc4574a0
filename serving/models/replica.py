"""ModelReplica: a model version as its own Ray Serve deployment (one per version).

Warm-up happens in `__init__` (ModelWorker's), so Ray marks a replica healthy only
once it is warm; `reconfigure` applies the deployment's `user_config` (batching) in
place, without a restart. Predictions reach it two ways: Serve handle calls, and the
direct channel (serving.models.endpoint), whose address it publishes in Serve's replica
metadata; both go through the same batching.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve

from serving.listeners import keep_replica_grpc_on_loopback
from serving.models.endpoint import ReplicaEndpoint
from serving.models.worker import ModelWorker
from serving.observability import buffered
from serving.settings import Settings


@serve.deployment(name="ModelReplica")
class ModelReplica(ModelWorker):
    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self,
        model: str,
        version: str,
        registry: str,
        runtime: dict[str, Any] | None,
        warmup: dict[str, Any] | None = None,
        max_in_flight: int = 1024,
    ) -> None:
        keep_replica_grpc_on_loopback()
        # A portable config leaves the runtime options, and may leave the registry, to
        # this process's environment (SERVING_REGISTRY_DIR wins over the config's).
        env = Settings()
        registry = str(env.registry_dir or registry)
        runtime = runtime if runtime is not None else env.runtime_options()
        ModelWorker.__init__(self, model, version, registry, runtime, warmup)
        self._endpoint = ReplicaEndpoint(self, max_in_flight)
        await self._endpoint.start(ray.util.get_node_ip_address())
        buffered.ensure_flushing()  # the batch sizes it records reach Ray

    def record_replica_metadata(self) -> dict[str, Any]:
        """Called by Serve once, after __init__: where the direct channel answers."""
        return self._endpoint.metadata()

    async def __del__(self) -> None:
        """Serve's graceful shutdown: let the direct channel drain."""
        await self._endpoint.stop()

    def identity(self) -> str:
        return str(serve.get_replica_context().replica_id.unique_id)
