"""Every Redis key the gateway uses, and every TTL they carry: built here and nowhere else.

All keys start with the namespace (`SERVING_REDIS_NAMESPACE`), so several projects can
share one Redis:

    <ns>:fv:<view>:<entity>               hash: one entity's stored features (+ `_ts`)
    <ns>:routing:<model>                  JSON RoutingTable
    <ns>:routing-updates                  pub/sub channel: a model name per change
    <ns>:rollout:<model>                  JSON RolloutState
    <ns>:rollout:<model>:history          list of JSON Decisions, newest first
    <ns>:rollout:<model>:analyzed         when the analysis last looked, and its leader
    <ns>:rollout-leader                   the analysis leader lock (one ingress replica)
    <ns>:stats:<model>:<version>:<second> hash: per-arm counters of one 1 s bucket
    <ns>:stats-batch:<id>                 marks a statistics batch applied (exactly once)
    <ns>:pred:<request id>                hash: a prediction record awaiting its label
    <ns>:acc:<model>:<version>:<minute>   hash: labelled / correct counts of one minute
    <ns>:psi:<model>:<version>            hash: ingress replica -> its latest feature PSIs
    <ns>:retrain:<model>                  JSON: the model's latest retraining run
    <ns>:retrain:<model>:history          list of JSON retraining runs, newest first
"""

from __future__ import annotations

STATS_TTL_S = 3600  # per-arm statistics buckets; also the `analyzed` stamp and batch marks
ACCURACY_TTL_S = 2 * 24 * 3600  # accuracy minute buckets (the 1 h window, a day back)
LEADER_TTL_MS = 5000  # the analysis leader lock, renewed while the leader lives
HISTORY_MAX = 200  # rollout decisions kept per model (a list, trimmed; not a TTL)
PSI_TTL_S = 60  # a version's published PSIs (refreshed every few seconds by each replica)
# Prediction records live `SERVING_PREDICTION_TTL_S` (settings): how long labels may lag.


def feature(ns: str, view: str, entity: str) -> str:
    return f"{ns}:fv:{view}:{entity}"


def routing(ns: str, model: str) -> str:
    return f"{ns}:routing:{model}"


def routing_channel(ns: str) -> str:
    return f"{ns}:routing-updates"


def rollout(ns: str, model: str) -> str:
    return f"{ns}:rollout:{model}"


def history(ns: str, model: str) -> str:
    return f"{ns}:rollout:{model}:history"


def analyzed(ns: str, model: str) -> str:
    return f"{ns}:rollout:{model}:analyzed"


def leader(ns: str) -> str:
    return f"{ns}:rollout-leader"


def stats(ns: str, model: str, version: str, bucket: int) -> str:
    return f"{ns}:stats:{model}:{version}:{bucket}"


def stats_batch(ns: str, batch_id: str) -> str:
    return f"{ns}:stats-batch:{batch_id}"


def prediction(ns: str, request_id: str) -> str:
    return f"{ns}:pred:{request_id}"


def accuracy(ns: str, model: str, version: str, minute: int) -> str:
    return f"{ns}:acc:{model}:{version}:{minute}"


def psi(ns: str, model: str, version: str) -> str:
    return f"{ns}:psi:{model}:{version}"


def retrain(ns: str, model: str) -> str:
    return f"{ns}:retrain:{model}"


def retrain_history(ns: str, model: str) -> str:
    return f"{ns}:retrain:{model}:history"
