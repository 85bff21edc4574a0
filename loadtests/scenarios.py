"""Scenarios: what one request carries, and where each system takes it.

Every system gets byte-identical bodies (`{"instances": [one instance]}`, the gateway's
TF-Serving format) built from the held-out sets of the demo registry, so the systems
differ only in how they serve the same artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "models"
# Distinct bodies per scenario, cycled by the generator (entity keys vary across them).
N_BODIES = 512


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    version: str
    description: str
    # Path per system (gRPC: the model name); a system missing here skips the scenario.
    paths: dict[str, str]
    # Byte string whose presence in an answer is counted (e.g. degraded features).
    flag: bytes | None = None
    # Why the scenario cannot run yet; None when it can.
    skip: str | None = None
    # Whose request bodies to send (default: this scenario's own).
    bodies_from: str | None = None
    # Gateway set-up before the scenario runs: versions its registry must also hold
    # (name → the version copied), and rollout commands posted, in order, to
    # /admin/v1/models/<model>/rollout. Such scenarios run after the plain ones.
    extra_versions: dict[str, str] = field(default_factory=dict)
    rollout: tuple[dict[str, Any], ...] = ()
    # The plain scenario whose figures this one's are compared with in the report.
    compare_with: str | None = None
    # A copy of `version` (also in extra_versions) that the gateway serves from a model
    # replica of its own (placement `replica`): the `gateway-replica*` systems' path.
    replica_version: str | None = None
    # Runs only where a CUDA device is present; its replica takes one GPU.
    gpu: bool = False
    # Instances in each request (throughput in rows/s = requests/s times this).
    rows_per_request: int = 1
    # The model format, for the report's side-by-side table of formats.
    model_format: str | None = None
    # AOTInductor packages compiled at the start of the run from exported programs
    # (name → the torch_export version compiled), into the temporary registry copy.
    compile_aoti: dict[str, str] = field(default_factory=dict)
    # Part of a run that names no scenarios (`make bench`).
    default: bool = True

    def bodies(self, registry: Path = REGISTRY) -> list[bytes]:
        return BODIES[self.bodies_from or self.name](registry)


def _fraud_bodies(registry: Path) -> list[bytes]:
    d = np.load(registry / "fraud" / "heldout.npz", allow_pickle=False)
    out = []
    for i in range(min(N_BODIES, len(d["y"]))):
        inst = {
            "user_id": str(d["user_id"][i]),
            "merchant_id": str(d["merchant_id"][i]),
            "amount": float(d["amount"][i]),
            "hour": int(d["hour"][i]),
            "is_foreign": int(d["is_foreign"][i]),
            "card_present": int(d["card_present"][i]),
        }
        out.append(orjson.dumps({"instances": [inst]}))
    return out


def _digits_bodies(registry: Path) -> list[bytes]:
    x = np.load(registry / "digits" / "heldout.npz", allow_pickle=False)["X"]
    # Pixel values are integral (0..16): send them as the integers they are.
    return [
        orjson.dumps({"instances": [x[i].astype(np.int64).tolist()]})
        for i in range(min(N_BODIES, len(x)))
    ]


GPU_ROWS = 256  # images per request in the GPU scenario


HEAVY_ROWS = 16  # images per request in the model-bound overload scenario


def _digits_rows(rows: int) -> Callable[[Path], list[bytes]]:
    def bodies(registry: Path) -> list[bytes]:
        x = np.load(registry / "digits" / "heldout.npz", allow_pickle=False)["X"]
        x = x.astype(np.int64)
        return [
            orjson.dumps({"instances": x[np.arange(i, i + rows) % len(x)].tolist()})
            for i in range(0, 16 * rows, rows)
        ]

    return bodies


BODIES = {
    "fraud": _fraud_bodies,
    "digits": _digits_bodies,
    "digits-batch": _digits_rows(GPU_ROWS),
    "digits-x16": _digits_rows(HEAVY_ROWS),
}


def _digits_as(
    name: str, model_format: str, version: str, description: str, compiled_from: str = ""
) -> Scenario:
    """digits in another format, fused like v1 and sent the same bodies: against `digits`,
    what the format changes (through the gateway and in the runtime alone)."""
    return Scenario(
        name=name,
        model="digits",
        version=version,
        description=f"digits {version}: {description}",
        paths={"gateway": f"/v1/models/digits/versions/{version}:predict"},
        bodies_from="digits",
        compare_with="digits",
        model_format=model_format,
        compile_aoti={version: compiled_from} if compiled_from else {},
        default=False,
    )


SCENARIOS: dict[str, Scenario] = {
    "fraud": Scenario(
        name="fraud",
        model="fraud",
        version="v2",
        description="fraud v2 (ONNX trees), entity keys + request fields, 2 Redis views",
        paths={
            "gateway": "/v1/models/fraud:predict",
            "gateway-grpc": "fraud",
            "gateway-replica": "/v1/models/fraud/versions/v2r:predict",
            "gateway-replica-grpc": "fraud/v2r",
            "gateway-ray-proxy": "/v1/models/fraud:predict",
            "naive": "/naive/fraud",
            "uvicorn": "/fraud",
        },
        flag=b'"degraded":true',
        extra_versions={"v2r": "v2"},
        replica_version="v2r",
    ),
    "digits": Scenario(
        name="digits",
        model="digits",
        version="v1",
        description="digits v1 (TorchScript CNN), one 8x8 image per request",
        paths={
            "gateway": "/v1/models/digits:predict",
            "gateway-grpc": "digits",
            "gateway-replica": "/v1/models/digits/versions/v1r:predict",
            "gateway-replica-grpc": "digits/v1r",
            "gateway-ray-proxy": "/v1/models/digits:predict",
            "naive": "/naive/digits",
            "uvicorn": "/digits",
        },
        extra_versions={"v1r": "v1"},
        replica_version="v1r",
        model_format="TorchScript",
    ),
    # The same model in the torch.export formats (`--scenarios digits,digits-export,...`).
    "digits-export": _digits_as(
        "digits-export",
        "torch.export",
        "v2",
        "v1's model as a torch.export program (runtime torch_export)",
    ),
    "digits-aoti": _digits_as(
        "digits-aoti",
        "AOTInductor",
        "v2aoti",
        "v2 compiled here with AOTInductor (runtime torch_aoti)",
        compiled_from="v2",
    ),
    # Stable v2 with a 10% canary and a 10% shadow, held there for the whole run: the
    # analysis never decides (a window needs 10^9 requests), so the weights stay put.
    "fraud-canary-shadow": Scenario(
        name="fraud-canary-shadow",
        model="fraud",
        version="v2",
        description="fraud: stable v2, 10% canary v1 (random split), 10% shadow v1shadow "
        "(a copy of v1), same bodies as `fraud`",
        paths={"gateway": "/v1/models/fraud:predict", "gateway-grpc": "fraud"},
        flag=b'"degraded":true',
        bodies_from="fraud",
        extra_versions={"v1shadow": "v1"},
        rollout=(
            {
                "action": "start",
                "to": "v1",
                "steps": [10],
                "interval_s": 3600,
                "max_error_rate": 1.0,
                "min_requests": 10**9,
            },
            {"action": "shadow", "version": "v1shadow", "sample": 0.1},
        ),
        compare_with="fraud",
    ),
    # The model, not the ingress, is the bottleneck: 16 images per request, so that the
    # overload step's 3x capacity is a rate the generator can send on its own core.
    "digits-x16": Scenario(
        name="digits-x16",
        model="digits",
        version="v1",
        description=f"digits v1 (fused), {HEAVY_ROWS} images per request: model-bound",
        paths={"gateway": "/v1/models/digits:predict", "uvicorn": "/digits"},
        bodies_from="digits-x16",
        rows_per_request=HEAVY_ROWS,
        default=False,
    ),
    # The full gateway on a GPU: digits as a replica taking one GPU, large batches, every
    # request 256 images; against the runtime's own best on the same GPU.
    "digits-gpu": Scenario(
        name="digits-gpu",
        model="digits",
        version="v1",
        description=f"digits v1 on a GPU: a replica with num_gpus 1, batches up to 2048 rows, "
        f"{GPU_ROWS} images per request",
        paths={
            "gateway-replica": "/v1/models/digits/versions/v1gpu:predict",
            "gateway-replica-grpc": "digits/v1gpu",
        },
        bodies_from="digits-batch",
        extra_versions={"v1gpu": "v1"},
        replica_version="v1gpu",
        gpu=True,
        rows_per_request=GPU_ROWS,
    ),
}
