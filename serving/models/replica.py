"""ModelReplica: a model version as its own Ray Serve deployment (one per version).

Warm-up happens in `__init__` (ModelWorker's), so Ray marks a replica healthy only
once it is warm; `reconfigure` applies the deployment's `user_config` (batching) in
place, without a restart.
"""

from __future__ import annotations

from ray import serve

from serving.models.worker import ModelWorker


@serve.deployment(name="ModelReplica")
class ModelReplica(ModelWorker):
    def identity(self) -> str:
        return str(serve.get_replica_context().replica_id.unique_id)
