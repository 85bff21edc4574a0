"""Request-path metric records are written after the current event-loop step, in order,
exactly once; outside an event loop at once."""

from __future__ import annotations

import asyncio
from typing import Any

from serving.metrics import Soon, flush_pending


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, Any]] = []

    def inc(self, value: float = 1.0, tags: Any = None) -> None:
        self.calls.append(("inc", value, tags))

    def observe(self, value: float, tags: Any = None) -> None:
        self.calls.append(("observe", value, tags))


def test_outside_a_loop_records_at_once() -> None:
    r = Recorder()
    Soon(r).inc(2, tags={"a": "b"})  # type: ignore[arg-type]
    assert r.calls == [("inc", 2, {"a": "b"})]


async def test_inside_a_loop_records_after_the_step_in_order() -> None:
    r = Recorder()
    counter, histogram = Soon(r), Soon(r)  # type: ignore[arg-type]
    counter.inc(1, tags={"k": "1"})
    histogram.observe(0.5)
    counter.inc(3)
    assert r.calls == []  # nothing written inside this step
    await asyncio.sleep(0)
    assert r.calls == [("inc", 1, {"k": "1"}), ("observe", 0.5, None), ("inc", 3, None)]
    await asyncio.sleep(0)
    assert len(r.calls) == 3  # written once
    counter.inc(4)
    flush_pending()  # now, e.g. at shutdown
    assert r.calls[-1] == ("inc", 4, None)
    await asyncio.sleep(0)
    assert len(r.calls) == 4
