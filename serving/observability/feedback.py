"""Delayed labels: prediction records, the label join and accuracy per version.

Every answered prediction of a model with a `label` output leaves a short-lived record
in Redis (serving.keys.prediction: model, version, predicted labels, a random feedback
key; TTL from settings). The first record under a request id wins: a later prediction
that reuses the id (a client may choose its ids) cannot take over its labels. Records
are buffered in memory and written in one pipeline every 50 ms, off the request path.
Records Redis does not take (down, hung) stay buffered and go with the next write; only
past MAX_PENDING buffered records are new ones dropped, and counted
(`serving_dropped_rows_total`, kind `prediction_records`).

`POST /v1/feedback` joins labels with records: the first label for a request counts, a
repeated identical one is a no-op, a different one is a conflict. Each label carries the
feedback key its answer gave (only who got the answer, or whom it told, can label it),
unless the caller is the trusted label source (the feedback token). Counts of labelled
and correct predictions go to minute buckets per version (serving.keys.accuracy) for
rolling accuracy, and to the rollout statistics so a canary's accuracy can be compared
with stable's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving import keys, redis_conn
from serving.background import every
from serving.errors import Conflict, Forbidden, InvalidInput, NotFound
from serving.features.resp import MultiplexedRedis, checked
from serving.observability.metrics import metrics
from serving.rollouts.stats import bucket_start

log = logging.getLogger(__name__)

ACCURACY_WINDOWS = {"5m": 300, "1h": 3600}
FLUSH_EVERY_S = 0.05
FLUSH_TIMEOUT_S = 2.0
LABEL_TIMEOUT_S = 2.0  # a feedback request's Redis work, all of it
MAX_PENDING = 50_000  # buffered records (~40 s at 1,300 req/s); beyond, new ones dropped


class LabelLog(Protocol):
    """The durable log's label side (serving.quality.predlog.PredictionLog)."""

    def label(self, request_id: str, labels: list[Any], ts: float) -> None: ...


class FeedbackStore:
    def __init__(
        self, redis_url: str, namespace: str, ttl_s: float, log: LabelLog | None = None
    ) -> None:
        self._url = redis_url
        self._log = log
        self._ns = namespace
        self._ttl_s = int(ttl_s)
        self._client: aioredis.Redis | None = None
        # Records are written over a multiplexed connection of their own (redis://).
        self._mux = MultiplexedRedis(redis_url) if MultiplexedRedis.supports(redis_url) else None
        self._pending: list[tuple[str, str]] = []  # (key, json record)
        self._sending = 0  # records taken by a write whose outcome is not known yet
        self._failing = False  # the last write failed (logged once per outage)
        self._task: asyncio.Task[None] | None = None
        self._replica_id: str | None = None  # the field this replica's PSIs go under
        self.dropped = 0

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_conn.client(self._url)
        return self._client

    def record(self, request_id: str, model: str, version: str, labels: np.ndarray) -> str:
        """Queue one prediction record (request path: memory only); the feedback key
        the answer gives its client ("" when the record is dropped)."""
        if self._task is None:
            self._task = asyncio.create_task(
                every(FLUSH_EVERY_S, self.flush, "writing prediction records")
            )
        values = labels.tolist()
        if len(values) == 1:  # the common case, without np.unique
            counted: Iterable[tuple[Any, int]] = ((values[0], 1),)
        else:
            classes, counts = np.unique(labels, return_counts=True)
            counted = zip(classes.tolist(), counts.tolist())
        for cls, count in counted:
            metrics().predictions.add(count, model, version, str(cls))
        if len(self._pending) + self._sending >= MAX_PENDING:
            self.dropped += 1
            metrics().dropped_rows.add(1, "prediction_records")
            return ""
        key = os.urandom(16).hex()
        doc = json.dumps(
            {"model": model, "version": version, "pred": values, "ts": time.time(), "k": key}
        )
        self._pending.append((keys.prediction(self._ns, request_id), doc))
        return key

    @property
    def buffered(self) -> int:
        """Records not yet in Redis."""
        return len(self._pending) + self._sending

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._sending += len(pending)
        try:
            if self._mux is not None:  # the cheap way: pipelined over one connection
                ttl = str(self._ttl_s)
                commands = [c for key, doc in pending for c in _record(key, doc, ttl)]
                async with asyncio.timeout(FLUSH_TIMEOUT_S):
                    checked(await self._mux.execute(commands))
            else:
                pipe = self._redis().pipeline(transaction=False)
                for key, doc in pending:
                    pipe.hsetnx(key, "rec", doc)
                    pipe.expire(key, self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._pending[:0] = pending  # again with the next write, oldest first
            if not self._failing:
                log.warning("prediction records wait in memory: Redis: %s", exc or type(exc))
            self._failing = True
        else:
            if self._failing:
                log.warning("prediction records reach Redis again")
            self._failing = False
        finally:
            self._sending -= len(pending)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._mux is not None:
            await self._mux.aclose()

    async def label(
        self,
        items: Sequence[tuple[str, Any, str | None]],
        trusted: bool = False,
        timeout_s: float = LABEL_TIMEOUT_S,
    ) -> list[dict[str, Any]]:
        """Join labels (request id, label, feedback key) with their predictions, all or
        nothing: every id must exist, every key match its record unless `trusted`, and
        every label fit (404, 403, 422 or 409 naming the first that does not) before any
        is stored or counted. Redis down or not answering within `timeout_s` is a 503."""
        async with redis_conn.state_store("feedback", timeout_s):
            return await self._label(items, trusted)

    async def _label(
        self, items: Sequence[tuple[str, Any, str | None]], trusted: bool
    ) -> list[dict[str, Any]]:
        await self.flush()  # this replica's own recent predictions are joinable at once
        r = self._redis()
        pipe = r.pipeline(transaction=False)
        for rid, _, _ in items:
            pipe.hmget(keys.prediction(self._ns, rid), ["rec", "label"])
        docs = await pipe.execute()
        missing = [rid for (rid, _, _), (rec, _) in zip(items, docs) if rec is None]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10])
            raise NotFound(
                f"no prediction for request id {shown} (unknown or expired)", field="request_id"
            )
        # Check every item before storing any.
        checked_items: list[tuple[str, dict[str, Any], list[Any], list[Any], str, bool]] = []
        given: dict[str, str] = {}
        for (rid, label, key), (rec, old) in zip(items, docs):
            record = json.loads(rec)
            if not trusted and not hmac.compare_digest(str(record.get("k", "")), key or ""):
                raise Forbidden(
                    f"feedback_key does not match request {rid!r}: only the client that got "
                    "the answer (or the trusted label source) may label it",
                    field="feedback_key",
                )
            pred = record["pred"]
            labels = label if isinstance(label, list) else [label]
            if len(labels) != len(pred):
                raise InvalidInput(
                    f"request {rid!r} had {len(pred)} instances; got {len(labels)} labels",
                    field="label",
                )
            encoded = json.dumps(labels)
            if (old is not None and old != encoded) or given.get(rid, encoded) != encoded:
                raise Conflict(f"request {rid!r} already has a different label")
            known = old is not None or rid in given
            checked_items.append((rid, record, pred, labels, encoded, known))
            given[rid] = encoded
        # Claim every new label in one transaction (all or none of them stored); a
        # label a concurrent call claimed first is a duplicate here, not counted twice.
        tx = r.pipeline(transaction=True)
        for rid, _, _, _, encoded, known in checked_items:
            if not known:
                tx.hsetnx(keys.prediction(self._ns, rid), "label", encoded)
        claims = iter(await tx.execute() if len(tx) else [])
        results: list[dict[str, Any]] = []
        updates: list[tuple[str, str, str, int, int]] = []
        for rid, record, pred, labels, _, known in checked_items:
            if known or not next(claims):
                results.append({"request_id": rid, "duplicate": True})
                continue
            correct = sum(int(p == lab) for p, lab in zip(pred, labels))
            updates.append((rid, record["model"], record["version"], len(pred), correct))
            if self._log is not None:  # the label as it was counted, once
                self._log.label(rid, labels, time.time())
            results.append(
                {"request_id": rid, "duplicate": False, "correct": correct, "instances": len(pred)}
            )
        await self._count(updates)
        return results

    async def _count(self, updates: list[tuple[str, str, str, int, int]]) -> None:
        if not updates:
            return
        now = time.time()
        minute = int(now // 60) * 60
        second = bucket_start(now)
        pipe = self._redis().pipeline(transaction=False)
        for _, model, version, n, correct in updates:
            acc = keys.accuracy(self._ns, model, version, minute)
            pipe.hincrby(acc, "n", n)
            pipe.hincrby(acc, "c", correct)
            pipe.expire(acc, keys.ACCURACY_TTL_S)
            stats = keys.stats(self._ns, model, version, second)
            pipe.hincrby(stats, "ln", n)
            pipe.hincrby(stats, "lc", correct)
            pipe.expire(stats, keys.STATS_TTL_S)
            tags = {"model": model, "version": version}
            for outcome, count in (("correct", correct), ("incorrect", n - correct)):
                if count:  # Ray counters take positive increments only
                    metrics().labels.inc(count, tags={**tags, "outcome": outcome})
        await pipe.execute()

    async def accuracy(self, model: str, version: str) -> dict[str, float | None]:
        """Accuracy over each rolling window (None while no label arrived)."""
        now = int(time.time() // 60) * 60
        longest = max(ACCURACY_WINDOWS.values())
        counts = await minute_counts(self._redis(), self._ns, model, version, now - longest, now)
        out: dict[str, float | None] = {}
        for name, span in ACCURACY_WINDOWS.items():
            n = sum(cn for m, cn, _ in counts if m > now - span)
            c = sum(cc for m, _, cc in counts if m > now - span)
            out[name] = c / n if n else None
        return out

    async def publish_psi(
        self, model: str, version: str, features: dict[str, float], rows: int
    ) -> None:
        """This replica's latest feature PSIs of a version, for the retraining trigger
        (serving.quality.retrain): one field per replica, the key expiring unless
        refreshed. Best effort: a Redis error only skips this round."""
        if self._replica_id is None:
            self._replica_id = os.urandom(8).hex()
        key = keys.psi(self._ns, model, version)
        doc = json.dumps({"ts": time.time(), "features": features, "rows": rows})
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                pipe = self._redis().pipeline(transaction=False)
                pipe.hset(key, self._replica_id, doc)
                pipe.expire(key, keys.PSI_TTL_S)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            pass


async def minute_counts(
    r: aioredis.Redis, ns: str, model: str, version: str, after: float, until: float
) -> list[tuple[int, int, int]]:
    """(minute, labelled, correct) of each accuracy minute bucket in (after, until]."""
    first = int(after // 60) * 60 + 60
    minutes = list(range(first, int(until // 60) * 60 + 60, 60))
    pipe = r.pipeline(transaction=False)
    for m in minutes:
        pipe.hmget(keys.accuracy(ns, model, version, m), ["n", "c"])
    rows = await pipe.execute()
    return [(m, int(n or 0), int(c or 0)) for m, (n, c) in zip(minutes, rows)]


def _record(key: str, doc: str, ttl: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return ("HSETNX", key, "rec", doc), ("EXPIRE", key, ttl)
