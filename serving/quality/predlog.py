"""The durable prediction and label log: every (sampled) prediction and every label,
one row per instance, in PostgreSQL, for accuracy over any window and for training data.

The request path only appends to memory: `prediction` and `label` keep references to
what they are given (no copy, no encoding, no I/O) and return. A background task of
the event loop, started on first use, turns what accumulated into rows every
`flush_every_s` and sends them with COPY in one transaction per flush (at most
MAX_ROWS_PER_FLUSH rows; the rest follow at once) over one connection it keeps open.

PostgreSQL down or hung never reaches the request path. Every database step runs under
a deadline; rows a flush could not deliver stay buffered, oldest first, and go with the
next one (retries back off up to MAX_BACKOFF_S); one warning per outage and one at
recovery. The buffer is bounded: past `max_buffer` rows (those being sent included) a
new request's rows are dropped whole and counted (`dropped`, and
`serving_dropped_rows_total` kinds `prediction_log` and `label_log`). Delivery is at
least once: a flush whose commit was sent but not acknowledged is sent again.

Sampling is per request id (a CRC32 of it against `sample_rate`), the same in every
process, so a request is logged whole or not at all. Labels are never sampled away: a
label without its prediction costs little and the join simply finds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import orjson
import psycopg

from serving.observability.metrics import metrics
from serving.quality.schema import migrate_async

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0  # libpq's (and psycopg's) smallest connect_timeout
FLUSH_TIMEOUT_S = 5.0  # one flush: connect, migrations on the first, COPY, commit
CLOSE_TIMEOUT_S = 5.0
MAX_ROWS_PER_FLUSH = 10_000  # one transaction; a backlog goes in several
MAX_BACKOFF_S = 2.0  # longest pause between attempts while PostgreSQL fails
DROPPED_KIND = {"predictions": "prediction_log", "labels": "label_log"}

PREDICTION_COLUMNS = (
    "request_id", "idx", "model", "version", "arm", "ts",
    "inputs", "outputs", "latency_ms", "degraded",
)  # fmt: skip
LABEL_COLUMNS = ("request_id", "idx", "label", "ts")
_COPY = {
    "predictions": f"COPY predictions ({', '.join(PREDICTION_COLUMNS)}) FROM STDIN".encode(),
    "labels": f"COPY labels ({', '.join(LABEL_COLUMNS)}) FROM STDIN".encode(),
}
YIELD_EVERY_ROWS = 1000  # a long COPY lets the event loop's other work in this often
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class Prediction(NamedTuple):
    """One request's prediction as the request path handed it over (arrays by reference)."""

    request_id: str
    model: str
    version: str
    arm: str
    ts: float
    inputs: Mapping[str, np.ndarray]
    columns: Mapping[str, Sequence[str] | None]
    outputs: Mapping[str, np.ndarray]
    latency_s: float
    degraded: bool
    n: int


class Label(NamedTuple):
    request_id: str
    labels: Sequence[Any]
    ts: float


Row = tuple[Any, ...]


def sampled(request_id: str, sample_rate: float) -> bool:
    """Whether a request is logged: the same answer for the same id in every process."""
    if sample_rate >= 1.0:
        return True
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) < sample_rate * 2**32


def instances(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> int:
    """Instances in a request: the batch axis of its first output (else input)."""
    for arrays in (outputs, inputs):
        for value in arrays.values():
            shape = getattr(value, "shape", None)
            return int(shape[0]) if shape else len(value)
    return 0


def _default(obj: Any) -> Any:
    """What orjson does not take itself: non-contiguous arrays, other numpy values."""
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    if isinstance(obj, bytes):  # BYTES tensors
        return obj.decode("utf-8", "replace")
    raise TypeError(f"cannot log a {type(obj).__name__}")


def _json(value: Any) -> str:
    data = orjson.dumps(value, default=_default, option=_JSON_OPTS)
    if b"\\u0000" in data:  # jsonb refuses NUL characters; one must not block the log
        data = data.replace(b"\\u0000", b"\\ufffd")
    return data.decode()


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _per_instance(
    value: np.ndarray, columns: Sequence[str] | None, n: int
) -> list[Any] | np.ndarray:
    """An input's value for each instance: {column: value} where its elements are named,
    else the instance's own (nested) array."""
    arr = np.asarray(value)
    if len(arr) != n:
        raise ValueError(f"{len(arr)} rows where the request has {n} instances")
    if columns is not None and arr.ndim == 2 and arr.shape[1] == len(columns):
        # numpy scalars, not tolist(): orjson writes a float32 in its shortest form
        return [dict(zip(columns, row)) for row in arr]
    return arr


def prediction_rows(p: Prediction) -> list[Row]:
    """A request's rows for the predictions table, one per instance (idx 0..n-1)."""
    inputs = {name: _per_instance(v, p.columns.get(name), p.n) for name, v in p.inputs.items()}
    outputs = {name: np.asarray(v) for name, v in p.outputs.items()}
    for name, arr in outputs.items():
        if len(arr) != p.n:
            raise ValueError(f"output {name!r}: {len(arr)} rows for {p.n} instances")
    rid, ts = _text(p.request_id), datetime.fromtimestamp(p.ts, UTC)
    head, tail = (p.model, p.version, p.arm, ts), (p.latency_s * 1000.0, p.degraded)
    return [
        (
            rid,
            i,
            *head,
            _json({name: v[i] for name, v in inputs.items()}),
            _json({name: v[i] for name, v in outputs.items()}),
            *tail,
        )
        for i in range(p.n)
    ]


def label_rows(lab: Label) -> list[Row]:
    ts = datetime.fromtimestamp(lab.ts, UTC)
    rid = _text(lab.request_id)
    return [(rid, i, _json(value), ts) for i, value in enumerate(lab.labels)]


def _shutdown(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut a connection's socket down (both ways): whatever waits on it wakes and fails."""
    with contextlib.suppress(OSError, psycopg.Error):
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class PredictionLog:
    """Buffers predictions and labels in memory and writes them to PostgreSQL in batches.

    Safe to create anywhere (no asyncio object is made before the first call on a
    running loop); `prediction` and `label` never block and never raise."""

    def __init__(
        self,
        dsn: str,
        sample_rate: float = 1.0,
        max_buffer: int = 50_000,
        flush_every_s: float = 0.2,
        timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self._dsn = dsn
        self.sample_rate = sample_rate
        self.max_buffer = max_buffer
        self._every = flush_every_s
        self._timeout_s = timeout_s
        # Handed over by the request path, not yet made into rows.
        self._new: dict[str, list[Any]] = {"predictions": [], "labels": []}
        # Rows made, waiting for (or between) attempts to send them: oldest first.
        self._rows: dict[str, list[Row]] = {"predictions": [], "labels": []}
        self._count = 0  # rows anywhere above or in a flush: the bounded quantity
        self._dropped = 0
        self._failing = False
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    # -- request path: memory only -------------------------------------------------

    def prediction(
        self,
        request_id: str,
        model: str,
        version: str,
        arm: str,
        ts: float,
        inputs: dict[str, np.ndarray],
        columns: dict[str, list[str] | None],
        outputs: dict[str, np.ndarray],
        latency_s: float,
        degraded: bool,
    ) -> None:
        """Log a request's prediction (arrays batch-axis first; kept by reference, so
        they must not be changed afterwards). Memory only."""
        try:
            if not sampled(request_id, self.sample_rate):
                return
            n = instances(inputs, outputs)
            if n and self._admit("predictions", n):
                rec = Prediction(request_id, model, version, arm, ts, inputs, columns,
                                 outputs, latency_s, degraded, n)  # fmt: skip
                self._new["predictions"].append(rec)
        except Exception as exc:  # never on the request path
            log.warning("prediction log: request %r not logged: %s", request_id, exc)

    def label(self, request_id: str, labels: list[Any], ts: float) -> None:
        """Log a request's labels, one per instance (never sampled away). Memory only."""
        try:
            if labels and self._admit("labels", len(labels)):
                self._new["labels"].append(Label(request_id, labels, ts))
        except Exception as exc:
            log.warning("prediction log: labels of %r not logged: %s", request_id, exc)

    def _admit(self, table: str, n: int) -> bool:
        self._start()
        if self._closed or self._count + n > self.max_buffer:
            self._dropped += n
            metrics().dropped_rows.add(n, DROPPED_KIND[table])
            return False
        self._count += n
        return True

    def _start(self) -> None:
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a script, a test): flush() by hand
                return
            self._task = loop.create_task(self._run())

    @property
    def buffered(self) -> int:
        """Rows not yet committed to PostgreSQL (those being sent included)."""
        return self._count

    @property
    def dropped(self) -> int:
        """Rows dropped because the buffer was full (or the log closed)."""
        return self._dropped

    # -- background: rows to PostgreSQL --------------------------------------------

    async def _run(self) -> None:
        delay = self._every
        while True:
            await asyncio.sleep(delay)
            try:
                ok = await self.flush()
            except Exception as exc:  # a background loop must never die
                log.warning("prediction log flush failed: %s", exc)
                ok = False
            delay = self._every if ok else min(max(delay, self._every) * 2, MAX_BACKOFF_S)

    def _shape(self) -> None:
        """What the request path handed over, made into rows (a request that cannot be
        made into rows is dropped and counted, not kept to fail again)."""
        predictions, self._new["predictions"] = self._new["predictions"], []
        for p in predictions:
            try:
                self._rows["predictions"].extend(prediction_rows(p))
            except Exception as exc:
                self._lose("predictions", p.n, f"request {p.request_id!r}: {exc}")
        labels, self._new["labels"] = self._new["labels"], []
        for lab in labels:
            try:
                self._rows["labels"].extend(label_rows(lab))
            except Exception as exc:
                self._lose("labels", len(lab.labels), f"request {lab.request_id!r}: {exc}")

    def _lose(self, table: str, n: int, why: str) -> None:
        self._count -= n
        self._dropped += n
        metrics().dropped_rows.add(n, DROPPED_KIND[table])
        log.warning("prediction log: %d %s rows dropped: %s", n, table, why)

    async def flush(self) -> bool:
        """Send what is buffered; True when everything was (False: it stays buffered)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._shape()
            while self._rows["predictions"] or self._rows["labels"]:
                if not await self._send_batch():
                    return False
            return True

    async def _send_batch(self) -> bool:
        budget = MAX_ROWS_PER_FLUSH
        batch: dict[str, list[Row]] = {}
        for table, rows in self._rows.items():
            batch[table], self._rows[table] = rows[:budget], rows[budget:]
            budget -= len(batch[table])
        try:
            await self._deliver(batch)
        except asyncio.CancelledError:  # close() stopping the task mid-flush: keep the rows
            for table, rows in batch.items():
                self._rows[table][:0] = rows
            await self._disconnect()
            raise
        except psycopg.DataError as exc:  # rows PostgreSQL refuses: never deliverable
            for table, rows in batch.items():
                if rows:
                    self._lose(table, len(rows), f"refused by PostgreSQL: {exc}")
            return True
        except (psycopg.Error, OSError, TimeoutError) as exc:
            for table, rows in batch.items():
                self._rows[table][:0] = rows  # again with the next flush, oldest first
            await self._disconnect()
            if not self._failing:
                log.warning(
                    "prediction log waits in memory (%d rows): PostgreSQL: %s",
                    self._count,
                    str(exc).strip() or type(exc).__name__,
                )
            self._failing = True
            return False
        self._count -= sum(len(rows) for rows in batch.values())
        if self._failing:
            log.warning("prediction log reaches PostgreSQL again")
        self._failing = False
        return True

    async def _deliver(self, batch: dict[str, list[Row]]) -> None:
        """One transaction: COPY the batch's rows, commit; all within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        async with asyncio.timeout_at(deadline):  # connecting: nothing to cancel yet
            conn, fresh = await self._connect()
        # Past the deadline the socket is shut down under psycopg, which then fails at
        # once. (Cancelling it instead makes it ask the server to cancel the query and
        # wait for that: about 10 s more when the server hangs.)
        severed = False

        def sever() -> None:
            nonlocal severed
            severed = True
            _shutdown(conn)

        timer = loop.call_at(deadline, sever)
        try:
            if fresh:  # every new connection: a database recreated meanwhile gets its tables
                applied = await migrate_async(conn)
                if applied:
                    log.info("prediction log: applied schema migrations %s", applied)
            async with conn.transaction(), conn.cursor() as cur:
                for table, rows in batch.items():
                    if rows:
                        async with cur.copy(_COPY[table]) as copy:
                            for i, row in enumerate(rows, 1):
                                await copy.write_row(row)
                                if i % YIELD_EVERY_ROWS == 0:
                                    await asyncio.sleep(0)
        except psycopg.Error as exc:
            if severed:
                raise TimeoutError(f"no answer within {self._timeout_s:g} s") from exc
            raise
        finally:
            timer.cancel()

    async def _connect(self) -> tuple[psycopg.AsyncConnection[tuple[Any, ...]], bool]:
        """The open connection, or a new one (True: new)."""
        if self._conn is not None and not self._conn.closed:
            return self._conn, False
        self._conn = await psycopg.AsyncConnection.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=int(CONNECT_TIMEOUT_S),
            application_name="serving-prediction-log",
        )
        return self._conn, True

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the background task, send what is buffered within `timeout_s`, close.
        Rows still buffered then are lost (and said so); later calls drop and count."""
        self._closed = True
        if self._task is not None:
            # Not in the middle of a flush (it ends by its own deadline): psycopg,
            # cancelled mid-query, asks the server to cancel it and waits for that.
            async with self._lock or contextlib.nullcontext():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Each flush ends by its own deadline; no cancelling one (see close's comment).
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._count and asyncio.get_running_loop().time() < deadline:
            if not await self.flush():
                break
        if self._count:
            log.warning("prediction log closed with %d rows not written", self._count)
        await self._disconnect()
