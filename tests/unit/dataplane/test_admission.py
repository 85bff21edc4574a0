"""The adaptive in-flight limit (no Ray, no Redis)."""

from __future__ import annotations

import time

import pytest

from serving.dataplane import admission
from serving.dataplane.admission import MIN_LIMIT, START_LIMIT, Admission
from serving.errors import Overloaded


def _answer(a: Admission, queued_s: float) -> None:
    a.enter("m")
    a.leave("m", queued_s)


def _busy(a: Admission) -> None:
    """As many requests in flight as the limit allows, less one."""
    while a.total < a.limit - 1:
        a.enter("m")


def _interval(a: Admission, queued_s: list[float]) -> None:
    """One interval's answers (of requests held in flight); the first answer after it
    (queued as its last) is when the interval is judged."""
    for q in queued_s:
        a.leave("m", q)
    time.sleep(0.0012)
    a.leave("m", queued_s[-1])


def test_a_standing_queue_cuts_the_limit_down_to_its_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission, "INTERVAL_S", 0.001)
    a = Admission(512, target_queue_s=0.010)
    assert a.limit == START_LIMIT
    _busy(a)  # all but one of the limit in flight
    time.sleep(0.0012)
    a.leave("m", 0.0)  # judges the interval so far (one answer: nothing) and starts one
    _interval(a, [0.011] * 8)  # every answer just past the target: a tenth off
    assert a.limit == pytest.approx(0.9 * START_LIMIT, rel=1e-3)
    _interval(a, [0.050] * 8)  # five times the target: half off
    assert a.limit == pytest.approx(0.45 * START_LIMIT, rel=1e-3)
    for _ in range(12):
        _interval(a, [0.050] * 8)
    assert a.limit == MIN_LIMIT


def test_a_burst_that_drains_cuts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause of the process: many answers queued long, but some of each interval
    did not (the queue drained), so the limit stays."""
    monkeypatch.setattr(admission, "INTERVAL_S", 0.001)
    a = Admission(512, target_queue_s=0.010)
    _busy(a)
    for _ in range(10):
        _interval(a, [0.0] + [0.050] * 9)
    assert a.limit >= START_LIMIT


def test_a_long_wait_under_light_load_is_not_a_standing_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission, "INTERVAL_S", 0.001)
    a = Admission(512, target_queue_s=0.001)
    for _ in range(20):  # one request at a time, each after a pause of the process
        time.sleep(0.0012)
        _answer(a, 0.050)
    assert a.limit == START_LIMIT


def test_answers_without_queueing_raise_the_limit_only_while_it_is_used() -> None:
    a = Admission(int(START_LIMIT) + 16, target_queue_s=0.010)
    _answer(a, 0.0)  # one request in flight: the limit is not binding
    assert a.limit == START_LIMIT
    _busy(a)
    for _ in range(20):  # answered while the limit was nearly used
        a.leave("m", 0.001)
    assert START_LIMIT < a.limit <= START_LIMIT + 16
    while a.total:
        a.leave("m")
    for _ in range(200):
        for _ in range(int(a.limit) - 1):
            a.enter("m")
        for _ in range(int(a.limit) - 1):
            a.leave("m", 0.0)
    assert a.limit == START_LIMIT + 16  # never past max_ongoing_requests


def test_past_the_limit_a_request_is_refused_and_waiting_ones_count_as_full() -> None:
    a = Admission(2)
    a.enter("m")
    assert not a.full()
    a.waiting = 1
    assert a.full()
    a.waiting = 0
    a.enter("n")
    with pytest.raises(Overloaded, match="limit of 2"):
        a.enter("m")
    a.leave("m")  # not answered: no signal either way
    assert a.limit == 2 and a.total == 1 and a.inflight == {"m": 0, "n": 1}


class _Clock:
    """Wall and loop-thread CPU time as the test says they pass: a real busy loop on a
    loaded machine gets less than LOOP_BUSY of a CPU and would look starved."""

    def __init__(self) -> None:
        self.wall = self.cpu = 1000.0

    def monotonic(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(admission, "time", c)
    return c


def _probes(a: Admission, clock: _Clock, lags_s: list[float], busy: bool = True) -> None:
    """One interval's probes, the loop's thread running (busy) or waiting through it;
    the first probe after it is when it is judged."""
    for lag in lags_s:
        a.observe_lag(lag)
    clock.wall += 0.005  # well past the (patched) 1 ms interval
    if busy:
        clock.cpu += 0.005
    a.observe_lag(lags_s[-1])


def test_a_loop_late_at_every_probe_cuts_the_limit(
    monkeypatch: pytest.MonkeyPatch, clock: _Clock
) -> None:
    monkeypatch.setattr(admission, "INTERVAL_S", 0.001)
    a = Admission(512, target_queue_s=0.020, target_lag_s=0.005)
    a.enter("m")  # something in flight: the lateness is the requests' doing
    _probes(a, clock, [0.0])  # starts an interval
    _probes(a, clock, [0.010] * 6)  # twice the target at every probe: half off (the most)
    assert a.limit == pytest.approx(0.5 * START_LIMIT, rel=1e-3)
    _probes(a, clock, [0.0055] * 6)  # just past it: a tenth off
    assert a.limit == pytest.approx(0.45 * START_LIMIT, rel=1e-3)


def test_a_timely_probe_an_idle_or_starved_loop_or_few_probes_cut_nothing(
    monkeypatch: pytest.MonkeyPatch, clock: _Clock
) -> None:
    monkeypatch.setattr(admission, "INTERVAL_S", 0.001)
    a = Admission(512, target_lag_s=0.005)
    _probes(a, clock, [0.0])
    _probes(a, clock, [0.050] * 6)  # late, but nothing in flight: nothing to refuse
    a.enter("m")
    _probes(a, clock, [0.0] + [0.050] * 5)  # one probe on time: no standing backlog
    _probes(a, clock, [0.050] * 2)  # too few probes to say
    _probes(a, clock, [0.050] * 6, busy=False)  # late while the thread waited: starved, not busy
    assert a.limit == START_LIMIT
    _probes(a, clock, [0.050] * 6)  # the same, busy: cut
    assert a.limit < START_LIMIT


async def test_the_probe_reports_how_late_the_loop_runs() -> None:
    import asyncio

    a = Admission(512)
    seen: list[float] = []
    a.observe_lag = seen.append  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(a.probe())
    await asyncio.sleep(0.02)
    time.sleep(0.03)  # the loop blocked: the next probe wakes ~30 ms late
    await asyncio.sleep(0.02)
    task.cancel()
    assert len(seen) >= 3 and max(seen) >= 0.02 and min(seen) < 0.005
