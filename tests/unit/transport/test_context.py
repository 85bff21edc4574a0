"""The shared transport layer: `x-request-start` → the `inbound` stage (formats, what is
refused), the stages a request context closes, request ids."""

from __future__ import annotations

import os
import time

import pytest

from serving.transport.context import (
    given_request_id,
    inbound_s,
    new_request_id,
    usable_request_id,
)


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


def test_ids_are_32_hex_digits_and_unique() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_ids_are_not_guessable_from_the_previous_one() -> None:
    """Random throughout, not a prefix plus a counter: consecutive ids share no prefix
    or suffix beyond chance (a counter kept the first 20 digits the same)."""
    pairs = [(new_request_id(), new_request_id()) for _ in range(200)]
    assert sum(a[:8] == b[:8] for a, b in pairs) == 0
    assert sum(a[-8:] == b[-8:] for a, b in pairs) == 0
    assert sum(int(b, 16) - int(a, 16) == 1 for a, b in pairs) == 0


def test_a_forked_child_draws_its_own_ids() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report one id and leave at once
        os.write(w, new_request_id().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    os.close(r)
    assert len(child) == 32
    assert child[:20] != new_request_id()[:20]


def test_closing_puts_the_way_in_first_and_ends_encode_and_total_now() -> None:
    from serving.transport.context import RequestContext

    arrived = time.perf_counter() - 0.010
    ns = time.time_ns() - 15_000_000  # sent 15 ms ago, read 10 ms ago
    ctx = RequestContext(
        "r", "http", {"x-request-start": f"t={ns}"}, arrived + 0.004, arrived, "http"
    )
    timings = {"decode": 0.001, "infer": 0.002, "total": 0.003}
    ctx.close_stages(timings, time.perf_counter() - 0.001)
    assert list(timings) == ["inbound", "http", "decode", "infer", "total", "encode"]
    assert 0.0045 < timings["inbound"] < 0.0075
    assert abs(timings["http"] - 0.004) < 1e-9
    assert timings["encode"] >= 0.001 and timings["total"] >= 0.010
    # gRPC: no stage between arrival and the handler, no stamp: no lead at all.
    grpc = RequestContext("r", "grpc", {}, arrived, arrived)
    timings = {"decode": 0.001}
    grpc.close_stages(timings, time.perf_counter())
    assert list(timings) == ["decode", "encode", "total"]


def test_the_smallest_deadline_wins_and_the_body_id_keys_the_record() -> None:
    from serving.transport.context import RequestContext

    ctx = RequestContext("header-id", "v2", {}, 0.0, 0.0, timeout_s=2.0)
    ctx.lower_timeout(None)
    ctx.lower_timeout(5.0)
    assert ctx.timeout_s == 2.0
    ctx.lower_timeout(0.5)
    assert ctx.timeout_s == 0.5
    assert ctx.record_id == "header-id"
    ctx.body_id = "body-id"
    assert ctx.record_id == "body-id"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("x" * 128, True),
        ("x" * 129, False),  # too long to echo or store
        ("a b", False),
        ("tab\there", False),
        ("new\r\nline", False),
        ("caf\u00e9", False),  # not ASCII
        ("", False),
    ],
)
def test_request_ids_kept_only_when_short_and_printable(given: str, kept: bool) -> None:
    assert usable_request_id(given) is kept
    assert usable_request_id(given.encode("latin-1", "replace")) is kept
    rid = given_request_id(given)
    assert (rid == given) is kept
    if not kept:
        assert len(rid) == 32 and usable_request_id(rid)
