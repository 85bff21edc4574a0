"""Every metric the gateway exports, defined once.

Metrics are Ray metrics (`ray.util.metrics`), so every replica on a node is exported
through that node's one metrics endpoint. They are created lazily, once per process,
on first use: never at import time and never in a constructor. Those recorded per
request or per batch are summed in the process and handed to Ray once a second
(serving.observability.buffered); a histogram among them is exported as the
`_bucket`/`_sum`/`_count` series Prometheus reads as one.
Label sets are bounded: model, version, protocol, code, stage. Never a request id.
"""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Gauge

from serving.observability.buffered import BufferedCounter, BufferedHistogram

LATENCY_BUCKETS_S = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
]  # fmt: skip
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class Metrics:
    def __init__(self) -> None:
        self.requests = BufferedCounter(
            "serving_requests_total",
            description="Prediction requests answered, by outcome code.",
            tag_keys=("model", "version", "arm", "protocol", "code"),
        )
        self.latency = BufferedHistogram(
            "serving_request_duration_seconds",
            description="End-to-end latency inside the gateway, per request.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model", "version", "protocol"),
        )
        self.stage = BufferedHistogram(
            "serving_stage_duration_seconds",
            description="Time per request stage (decode, queue, infer, hop, encode).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model", "version", "stage"),
        )
        self.feature_lookups = BufferedCounter(
            "serving_feature_lookups_total",
            description="Feature entity lookups by view and outcome "
            "(hit, miss, stale, timeout, error).",
            tag_keys=("view", "outcome"),
        )
        self.feature_latency = BufferedHistogram(
            "serving_feature_lookup_duration_seconds",
            description="One request's pipelined feature round trip to Redis.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.degraded = BufferedCounter(
            "serving_degraded_responses_total",
            description="Answers given with default features, by the first reason.",
            tag_keys=("model", "version", "reason"),
        )
        self.canary_weight = Gauge(
            "serving_canary_weight_percent",
            description="Share of a model's traffic routed to its canary version.",
            tag_keys=("model",),
        )
        self.rollout_decisions = Counter(
            "serving_rollout_decisions_total",
            description="Rollout decisions (start, advance, hold, rollback, complete, ...).",
            tag_keys=("model", "action"),
        )
        self.shadow = BufferedCounter(
            "serving_shadow_requests_total",
            description="Shadow copies by outcome (agree, disagree, error, dropped).",
            tag_keys=("model", "version", "outcome"),
        )
        self.rollout_state = Gauge(
            "serving_rollout_state",
            description="1 for a model's current rollout status, 0 for the others.",
            tag_keys=("model", "status"),
        )
        self.inflight = Gauge(
            "serving_inflight_requests",
            description="Prediction requests inside this ingress replica right now.",
            tag_keys=("model",),
        )
        self.predictions = BufferedCounter(
            "serving_predictions_total",
            description="Predicted classes (the `label` output), the prediction distribution.",
            tag_keys=("model", "version", "label"),
        )
        self.labels = Counter(
            "serving_labels_total",
            description="Delayed labels joined with their predictions, correct or not.",
            tag_keys=("model", "version", "outcome"),
        )
        self.accuracy = Gauge(
            "serving_model_accuracy",
            description="Accuracy from delayed labels over a rolling window (5m, 1h).",
            tag_keys=("model", "version", "window"),
        )
        self.feature_psi = Gauge(
            "serving_feature_psi",
            description="Population stability index of an input feature vs training.",
            tag_keys=("model", "version", "feature"),
        )
        self.prediction_psi = Gauge(
            "serving_prediction_psi",
            description="Population stability index of the predictions vs training.",
            tag_keys=("model", "version"),
        )
        self.autoscaling_decisions = Counter(
            "serving_autoscaling_decisions_total",
            description="Latency-aware autoscaling decisions by direction (up, down, hold).",
            tag_keys=("model", "version", "direction"),
        )
        self.autoscaling_target = Gauge(
            "serving_autoscaling_target_replicas",
            description="Replicas the latency-aware policy asked for.",
            tag_keys=("model", "version"),
        )
        self.replica_p95 = Gauge(
            "serving_replica_latency_p95_seconds",
            description="Queue wait plus inference p95 in a replica (what the policy uses).",
            tag_keys=("model", "version"),
        )
        self.replica_retries = BufferedCounter(
            "serving_replica_retries_total",
            description="Predictions sent once more because their replica went away "
            "before answering (the direct channel).",
            tag_keys=("model", "version"),
        )
        self.dropped_rows = BufferedCounter(
            "serving_dropped_rows_total",
            description="Rows dropped: prediction records and rollout statistics (Redis "
            "unreachable longer than the buffer holds), prediction and label log rows "
            "(PostgreSQL: buffer full, or rows refused).",
            tag_keys=("kind",),
        )
        self.retrain_triggers = Counter(
            "serving_retrain_triggers_total",
            description="Retraining triggered, by reason (accuracy, drift, manual).",
            tag_keys=("model", "reason"),
        )
        self.retrains = Counter(
            "serving_retrains_total",
            description="Retraining runs finished, by outcome (registered, failed, timed_out).",
            tag_keys=("model", "outcome"),
        )
        self.retrain_running = Gauge(
            "serving_retrain_running",
            description="1 while a retraining command of the model runs.",
            tag_keys=("model",),
        )
        self.batch_size = BufferedHistogram(
            "serving_batch_size",
            description="Instances per batch run by a model replica.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model", "version"),
        )


@cache
def metrics() -> Metrics:
    """The process's metrics, created on first use."""
    return Metrics()
