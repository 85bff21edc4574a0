"""`python -m loadtests`: run the benchmark and write the report (see loadtests/run.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from loadtests.run import SYSTEMS, Options, run
from loadtests.scenarios import ROOT, SCENARIOS


def _names(known: dict[str, object], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(known)}"
            )
        return names

    return parse


def _env(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests",
        description="Benchmark the gateway against a naive Ray Serve app, a single uvicorn "
        "process and the bare runtime, side by side in one run.",
    )
    p.add_argument("--quick", action="store_true", help="a ~2 minute run (fewer steps, shorter)")
    p.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results")
    p.add_argument(
        "--scenarios",
        type=_names(dict(SCENARIOS), "scenario"),
        default=[n for n, s in SCENARIOS.items() if s.default],
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all but "
        f"{', '.join(n for n, s in SCENARIOS.items() if not s.default)})",
    )
    p.add_argument(
        "--systems",
        type=_names(dict(SYSTEMS), "system"),
        default=list(SYSTEMS),
        help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all)",
    )
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 latency SLO (default 50)")
    p.add_argument(
        "--ray-env",
        type=_env,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the Ray cluster, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    )
    p.add_argument(
        "--log-dsn",
        default=None,
        metavar="DSN",
        help="run the gateway with the PostgreSQL prediction log on (SERVING_LOG_DSN)",
    )
    p.add_argument(
        "--grpc-client",
        choices=("lean", "grpcio"),
        default="lean",
        help="the generator's gRPC client: lean (raw HTTP/2 in asyncio, as the HTTP client "
        "is raw HTTP/1.1; default) or grpcio (its own cost is ~0.4 ms per call here)",
    )
    a = p.parse_args(argv)
    opts = Options(
        out=a.out,
        quick=a.quick,
        scenarios=a.scenarios,
        systems=a.systems,
        ray_env=dict(a.ray_env),
        slo_ms=a.slo_ms,
        log_dsn=a.log_dsn,
        grpc_client=a.grpc_client,
    )
    try:
        run(opts)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
