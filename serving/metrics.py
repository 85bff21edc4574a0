"""Every metric the gateway exports, defined once.

Metrics are Ray metrics (`ray.util.metrics`), so every replica on a node is exported
through that node's one metrics endpoint. They are created lazily, once per process,
on first use: never at import time and never in a constructor.
Label sets are bounded: model, version, protocol, code, stage. Never a request id.
"""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Histogram

LATENCY_BUCKETS_S = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
]  # fmt: skip
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "serving_requests_total",
            description="Prediction requests answered, by outcome code.",
            tag_keys=("model", "version", "protocol", "code"),
        )
        self.latency = Histogram(
            "serving_request_duration_seconds",
            description="End-to-end latency inside the gateway, per request.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model", "version", "protocol"),
        )
        self.stage = Histogram(
            "serving_stage_duration_seconds",
            description="Time per request stage (decode, queue, infer, hop, encode).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model", "version", "stage"),
        )
        self.feature_lookups = Counter(
            "serving_feature_lookups_total",
            description="Feature entity lookups by view and outcome "
            "(hit, miss, stale, timeout, error).",
            tag_keys=("view", "outcome"),
        )
        self.feature_latency = Histogram(
            "serving_feature_lookup_duration_seconds",
            description="One request's pipelined feature round trip to Redis.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.degraded = Counter(
            "serving_degraded_responses_total",
            description="Answers given with default features, by the first reason.",
            tag_keys=("model", "version", "reason"),
        )
        self.batch_size = Histogram(
            "serving_batch_size",
            description="Instances per batch run by a model replica.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model", "version"),
        )


@cache
def metrics() -> Metrics:
    """The process's metrics, created on first use."""
    return Metrics()
