"""Buffered metrics: sums per tag set reach Ray once per flush, and a histogram reaches
it as the cumulative bucket, sum and count series of a Prometheus histogram."""

from __future__ import annotations

from typing import Any

from serving.observability.buffered import BufferedCounter, BufferedHistogram


class Recorder:
    """Stands in for a Ray metric: what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, tags))


def test_a_counter_hands_over_one_sum_per_tag_set() -> None:
    c = BufferedCounter("serving_test_total", "test", ("model", "code"))
    c._counter = ray = Recorder()  # type: ignore[assignment]
    c.inc(1, tags={"model": "m", "code": "ok"})
    c.add(2, "m", "ok")
    c.add(1, "m", "internal")
    c.flush()
    assert sorted(ray.calls, key=lambda x: x[0]) == [
        (1, {"model": "m", "code": "internal"}),
        (3, {"model": "m", "code": "ok"}),
    ]
    c.flush()  # nothing new: nothing handed over
    assert len(ray.calls) == 2


def test_a_histogram_exports_cumulative_buckets_sum_and_count() -> None:
    h = BufferedHistogram("serving_test_seconds", "test", [0.001, 0.01, 0.1], ("model",))
    buckets, total, count = Recorder(), Recorder(), Recorder()
    h._buckets, h._sum, h._count = buckets, total, count  # type: ignore[assignment]
    for v in (0.0005, 0.001, 0.05, 0.05, 3.0):  # 0.001 falls in `le="0.001"`
        h.record(v, "m")
    h.observe(0.002, tags={"model": "n"})
    h.flush()
    by: dict[str, dict[str, float]] = {}
    for value, tags in buckets.calls:
        by.setdefault(tags["model"], {})[tags["le"]] = value
    assert by["m"] == {"0.001": 2, "0.01": 2, "0.1": 4, "+Inf": 5}
    assert by["n"] == {"0.001": 0, "0.01": 1, "0.1": 1, "+Inf": 1}
    sums: dict[str, Any] = {tags["model"]: v for v, tags in total.calls}
    assert abs(sums["m"] - 3.1015) < 1e-9 and sums["n"] == 0.002
    assert {tags["model"]: v for v, tags in count.calls} == {"m": 5, "n": 1}
    # Every series is set again at every flush (Ray drops gauges no longer set).
    h.flush()
    assert len(buckets.calls) == 16 and len(count.calls) == 4
