"""The benchmark's format comparison: what it deploys and how the report sets the formats
side by side (figures made up; nothing is timed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtests import report, run
from loadtests.scenarios import SCENARIOS

FORMATS = ("digits", "digits-export", "digits-aoti")


def test_each_format_is_served_fused_like_v1(registry_root: Path) -> None:
    dep = run.gateway_deployment([SCENARIOS[n] for n in FORMATS], registry_root)
    digits = dep.models["digits"]
    assert digits.default == "v1"
    # The compiled package is served as the program it was compiled from.
    assert digits.versions["v2aoti"] == digits.versions["v2"]
    assert {v: c.placement for v, c in digits.versions.items() if v != "v1r"} == {
        "v1": "fused",
        "v2": "fused",
        "v2aoti": "fused",
    }
    assert not any(SCENARIOS[n].default for n in FORMATS[1:])


def test_without_a_compiler_the_aoti_scenario_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-c++")
    skipped = run._as_runnable_here(SCENARIOS["digits-aoti"], cuda=False)
    assert skipped.skip is not None and "no C++ compiler" in skipped.skip
    assert run._as_runnable_here(SCENARIOS["digits-export"], cuda=False).skip is None


def _figures(p50: float, rps: float, alone_ms: tuple[float, float]) -> tuple[Any, Any]:
    system = {
        "serial": {"latency_ms": {"p50": p50, "p99": 2 * p50}},
        "rps_at_slo": rps,
        "peak_rps": rps,
    }
    sizes = [{"batch_size": b, "batch_p50_ms": ms} for b, ms in zip((1, 32), alone_ms)]
    return system, {"sizes": sizes}


def test_the_report_sets_the_formats_side_by_side() -> None:
    figures = {
        "digits": ("TorchScript", None, _figures(0.4, 4000, (0.04, 0.3))),
        "digits-export": ("torch.export", "digits", _figures(0.5, 3000, (0.1, 0.45))),
        "digits-aoti": ("AOTInductor", "digits", _figures(0.4, 4400, (0.04, 0.15))),
    }
    results: dict[str, Any] = {"scenarios": {}, "ceiling": {}}
    for name, (fmt, ref, (system, alone)) in figures.items():
        results["scenarios"][name] = {
            "skip": None,
            "format": fmt,
            "compare_with": ref,
            "systems": {"gateway": system},
        }
        results["ceiling"][name] = alone
    lines = report._formats_section(results)
    rows = [line for line in lines if line.startswith("| ") and "`" in line]
    assert [r.split(" (`")[0] for r in rows] == ["| TorchScript", "| torch.export", "| AOTInductor"]
    assert rows[1].endswith("| 1.25× | 0.75× | 2.50× / 1.50× |")
    assert rows[2].endswith("| 1.00× | 1.10× | 1.00× / 0.50× |")
    # Without the reference format run, no section.
    del results["scenarios"]["digits"]
    assert report._formats_section(results) == []
