"""`x-request-start` → the `inbound` stage: the stamp's formats and what is refused."""

from __future__ import annotations

import time

import pytest

from serving.http import inbound_s


def _stamp_ago(seconds: float) -> tuple[int, float]:
    """(ns since the epoch `seconds` ago, perf_counter() now)."""
    return time.time_ns() - int(seconds * 1e9), time.perf_counter()


@pytest.mark.parametrize(
    "fmt",
    [
        lambda ns: f"t={ns / 1e9:.3f}",  # nginx: t=${msec}
        lambda ns: f"{ns / 1e9:.6f}",  # seconds, no prefix
        lambda ns: f"t={ns // 1_000_000}",  # milliseconds (Heroku: no prefix, same unit)
        lambda ns: f"t={ns // 1000}",  # microseconds (Apache's %t)
        lambda ns: f"t={ns}",  # nanoseconds
    ],
)
def test_formats_give_the_time_since_the_stamp(fmt: object) -> None:
    ns, arrived = _stamp_ago(0.250)
    got = inbound_s(fmt(ns), arrived)  # type: ignore[operator]
    assert got is not None and 0.248 < got < 0.260


def test_arrival_counts_not_the_handler() -> None:
    # The request was read 0.1 s after the stamp and handled later: 0.1 s inbound.
    ns, _ = _stamp_ago(0.3)
    arrived = time.perf_counter() - 0.2
    got = inbound_s(f"t={ns // 1000}", arrived)
    assert got is not None and 0.098 < got < 0.11


@pytest.mark.parametrize("raw", [None, "", "t=", "t=abc", "t=nan", "t=inf", "t=-5", "0"])
def test_garbage_is_ignored(raw: str | None) -> None:
    assert inbound_s(raw, time.perf_counter()) is None


def test_clocks_that_disagree_are_not_believed() -> None:
    now = time.perf_counter()
    ahead = time.time_ns() + 50_000_000  # the sender's clock runs 50 ms ahead
    assert inbound_s(f"t={ahead // 1000}", now) is None
    slightly = time.time_ns() + 200_000  # within the slack: counts as no time at all
    assert inbound_s(f"t={slightly // 1000}", now) == 0.0
    stale = time.time_ns() - 3600 * 10**9  # an hour old: a broken clock, not the network
    assert inbound_s(f"t={stale // 1000}", now) is None
