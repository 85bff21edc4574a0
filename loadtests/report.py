"""results.json, results.md and the plots, from the dict `loadtests.run.run` builds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ORDER = (
    "gateway",
    "gateway-grpc",
    "gateway-replica",
    "gateway-replica-grpc",
    "gateway-ray-proxy",
    "naive",
    "uvicorn",
)
COLORS = {
    "gateway": "tab:blue",
    "gateway-grpc": "tab:purple",
    "gateway-replica": "tab:cyan",
    "gateway-replica-grpc": "tab:pink",
    "gateway-ray-proxy": "tab:olive",
    "naive": "tab:red",
    "uvicorn": "tab:green",
}


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1) + "\n")
    plots = _plots(results, out)
    (out / "results.md").write_text(markdown(results, plots))


def _finite(x: Any) -> Any:
    """JSON has no infinity: a percentile that includes failed requests becomes null
    (the summary's `errors` says how many failed)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _ms(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    meta = results["meta"]
    plan = meta["plan"]
    slo = plan["slo_ms"]
    lines = [
        "# Load test results",
        "",
        f"{'Quick' if meta['quick'] else 'Full'} run of `python -m loadtests`, "
        f"{meta['date']}, {meta.get('elapsed_s', '?')} s. "
        f"SLO: p99 ≤ {slo:g} ms. All systems ran side by side on the same machine, the "
        "same model artifacts and the same Redis data; one system is loaded at a time.",
        "",
    ]
    if results.get("aborted"):
        lines += [f"**Run aborted**: {results['aborted']} (partial results below).", ""]
    lines += _ratios_section(results)
    lines += _placement_section(results)
    lines += _front_door_section(results)
    lines += _formats_section(results)
    for name, sc in results["scenarios"].items():
        lines += [f"## Scenario `{name}`", "", sc["description"], ""]
        if sc["skip"]:
            lines += [f"Skipped: {sc['skip']}", ""]
            continue
        lines += _scenario_tables(sc, results.get("ceiling", {}).get(name), slo)
        lines += _versus_section(sc)
        lines += _gpu_section(sc)
    lines += _overload_section(results)
    lines += _timing_section(results)
    lines += _generator_section(results)
    lines += _ceiling_section(results)
    lines += _machine_section(meta)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _ratios_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Ratios against the naive Ray Serve baseline",
        "",
        "Ours = the gateway over HTTP (same request, same JSON as the baselines); the gRPC "
        "row shows the same gateway reached over gRPC. In brackets: ours / naive; — where "
        "the naive app met the SLO at no step (a ratio over zero).",
        "",
        "| scenario | throughput at SLO, ours / naive (target ≥ 2×) "
        "| serial p50, ours / naive (target ≤ 0.5×) | peak throughput, ours / naive "
        "| serial p50, ours / uvicorn |",
        "|---|---|---|---|---|",
    ]
    for name, sc in results["scenarios"].items():
        r = sc.get("ratios") or {}
        if sc["skip"] or not r:
            continue
        systems = sc["systems"]
        naive = systems.get("naive")
        for system, prefix, label in (
            ("gateway", "", name),
            ("gateway-grpc", "grpc_", f"{name} (gRPC)"),
            ("gateway-replica", "replica_", f"{name} (replica)"),
            ("gateway-replica-grpc", "replica_grpc_", f"{name} (replica, gRPC)"),
        ):
            ours = systems.get(system)
            if ours is None or naive is None:
                continue
            # The figures beside each ratio: a ratio alone hides a zero (no SLO step met).
            at = f"{ours['rps_at_slo']:.0f} / {naive['rps_at_slo']:.0f} req/s"
            p50 = (
                f"{_ms(ours['serial']['latency_ms']['p50'])} / "
                f"{_ms(naive['serial']['latency_ms']['p50'])} ms"
            )
            peak = f"{ours['peak_rps']:.0f} / {naive['peak_rps']:.0f} req/s"
            lines.append(
                f"| {label} | {_ratio(r.get(prefix + 'throughput_at_slo_vs_naive'))} ({at}) "
                f"| {_ratio(r.get(prefix + 'serial_p50_vs_naive'))} ({p50}) "
                f"| {_ratio(r.get(prefix + 'peak_throughput_vs_naive'))} ({peak}) "
                f"| {_ratio(r.get(prefix + 'serial_p50_vs_uvicorn'))} |"
            )
    return [*lines, ""]


def _front_door_section(results: dict[str, Any]) -> list[str]:
    """Ray's proxy (classic, or its HAProxy ingress) against direct HTTP, same gateway."""
    rows = []
    haproxy = (results["meta"].get("ray_env") or {}).get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    proxy = "Ray's HAProxy ingress" if haproxy else "Ray's proxy (classic)"
    for name, sc in results["scenarios"].items():
        systems = sc.get("systems") or {}
        d, p = systems.get("gateway"), systems.get("gateway-ray-proxy")
        if sc["skip"] or not d or not p:
            continue
        r = sc.get("ratios") or {}
        for label, m in (("direct HTTP (default)", d), (proxy, p)):
            rows.append(
                f"| {name} | {label} | {_ms(m['serial']['latency_ms']['p50'], 2)} "
                f"| {m['rps_at_slo']:.0f} | {m['peak_rps']:.0f} "
                f"| {_ms(m.get('server_cpu_ms_per_request'), 2)} |"
            )
        rows.append(
            f"| {name} | {proxy} / direct "
            f"| {_ratio(r.get('ray_proxy_vs_direct_serial_p50'))} "
            f"| {_ratio(r.get('ray_proxy_vs_direct_throughput_at_slo'))} | "
            f"| {_ratio(r.get('ray_proxy_vs_direct_cpu_per_request'))} |"
        )
    if not rows:
        return []
    return [
        "## Front doors",
        "",
        "The same gateway (default versions fused) reached two ways on one Ray cluster: its "
        "ingress replica serving HTTP itself (`SERVING_HTTP_MODE=direct`, the default) and "
        f"through {proxy} (`SERVING_HTTP_MODE=proxy`).",
        "",
        "| scenario | front door | serial p50 (ms) | throughput at SLO (req/s) "
        "| peak (req/s) | server CPU per request (ms) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _placement_section(results: dict[str, Any]) -> list[str]:
    """Every placement and transport against the others and against uvicorn."""
    rows = []
    for name, sc in results["scenarios"].items():
        r = sc.get("ratios") or {}
        if sc["skip"] or "replica_vs_fused_serial_p50" not in r:
            continue
        rows.append(
            f"| {name} | {_ratio(r.get('replica_vs_fused_serial_p50'))} "
            f"| {_ratio(r.get('replica_vs_fused_throughput_at_slo'))} "
            f"| {_ratio(r.get('grpc_replica_vs_fused_serial_p50'))} "
            f"| {_ratio(r.get('grpc_replica_vs_fused_throughput_at_slo'))} "
            f"| {_ratio(r.get('throughput_at_slo_vs_uvicorn'))} "
            f"| {_ratio(r.get('cpu_per_request_vs_uvicorn'))} "
            f"| {_ratio(r.get('grpc_vs_http_serial_p50'))} "
            f"({_ratio(r.get('grpc_vs_http_serial_p50_above_floor'))}) "
            f"| {_ratio(r.get('replica_grpc_vs_http_serial_p50'))} "
            f"({_ratio(r.get('replica_grpc_vs_http_serial_p50_above_floor'))}) |"
        )
    if not rows:
        return []
    return [
        "## Placement and transport",
        "",
        "Replica = the same model as a Serve deployment of its own, reached over the direct "
        "channel; fused = inside the ingress replica. CPU per request: every process but "
        "the generator's, at the closed-loop step with the most throughput within the SLO. "
        "gRPC / HTTP in brackets: each p50 less its client's own floor (the generator "
        "against the cheapest server of that transport, see Load generator overhead), i.e. "
        "the server's time over each transport.",
        "",
        "| scenario | replica / fused, serial p50 (target ≤ 2×) | replica / fused, throughput "
        "at SLO (target ≥ 0.5×) | same over gRPC, p50 | same over gRPC, throughput "
        "| fused / uvicorn, throughput at SLO (target ≥ 0.8×) | fused / uvicorn, CPU per "
        "request (target ≤ 1.25×) | gRPC / HTTP serial p50, fused (target ≤ 1.5×) "
        "| gRPC / HTTP serial p50, replica |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _formats_section(results: dict[str, Any]) -> list[str]:
    """The same model in each format: through the gateway (HTTP, fused) and alone, each
    against the format the others are compared with."""
    scs = {
        n: sc
        for n, sc in results["scenarios"].items()
        if sc.get("format") and not sc["skip"] and "gateway" in sc["systems"]
    }
    ref_name = next((sc["compare_with"] for sc in scs.values() if sc["compare_with"] in scs), None)
    if ref_name is None:
        return []
    ceiling = results.get("ceiling") or {}

    def batch_ms(name: str, size: int) -> float | None:
        sizes = {s["batch_size"]: s["batch_p50_ms"] for s in ceiling.get(name, {}).get("sizes", [])}
        return sizes.get(size)

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ref = scs[ref_name]["systems"]["gateway"]
    lines = [
        "## Model formats",
        "",
        f"The same model in each format, through the gateway (HTTP, fused into the ingress) "
        f"and the runtime alone (per-batch p50); ratios against {scs[ref_name]['format']}.",
        "",
        "| format | serial p50 / p99 (ms) | throughput at SLO (req/s) | peak (req/s) "
        "| alone, batch 1 / 32 (ms) | serial p50 | throughput at SLO | alone, batch 1 / 32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [ref_name, *(n for n in scs if n != ref_name)]:
        m = scs[name]["systems"]["gateway"]
        lat = m["serial"]["latency_ms"]
        one, many = batch_ms(name, 1), batch_ms(name, 32)
        lines.append(
            f"| {scs[name]['format']} (`{name}`) | {_ms(lat['p50'], 2)} / {_ms(lat['p99'], 2)} "
            f"| {m['rps_at_slo']:.0f} | {m['peak_rps']:.0f} | {_ms(one, 3)} / {_ms(many, 3)} "
            f"| {_ratio(div(lat['p50'], ref['serial']['latency_ms']['p50']))} "
            f"| {_ratio(div(m['rps_at_slo'], ref['rps_at_slo']))} "
            f"| {_ratio(div(one, batch_ms(ref_name, 1)))} / "
            f"{_ratio(div(many, batch_ms(ref_name, 32)))} |"
        )
    return [*lines, ""]


def _scenario_tables(sc: dict[str, Any], ceiling: dict[str, Any] | None, slo: float) -> list[str]:
    systems = sc["systems"]
    lines = [
        "| system | serial p50 / p95 / p99 (ms) | closed-loop peak (req/s @ clients) "
        f"| throughput at p99 ≤ {slo:g} ms (req/s @ clients) | open loop at the SLO (req/s) "
        "| server CPU per request (ms) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in _ordered(systems):
        m = systems[name]
        lat = m["serial"]["latency_ms"]
        errors = m["serial"]["errors"] + sum(r["errors"] for r in m["closed"] + m["open"])
        at = (
            f"{m['rps_at_slo']:.0f} @ {m['concurrency_at_slo']}"
            if m["concurrency_at_slo"]
            else "none met the SLO"
        )
        lines.append(
            f"| {name} | {_ms(lat['p50'], 2)} / {_ms(lat['p95'], 2)} / {_ms(lat['p99'], 2)} "
            f"| {m['peak_rps']:.0f} @ {m['peak_concurrency']} | {at} "
            f"| {m.get('open_rps_at_slo', 0.0):g} | {_ms(m.get('server_cpu_ms_per_request'), 2)} "
            f"| {errors} |"
        )
    if ceiling:
        b = ceiling["best"]
        lines.append(
            f"| ceiling (runtime alone) | batch 1: {_ms(ceiling['sizes'][0]['batch_p50_ms'], 3)}"
            f" | {b['rows_per_s']:,.0f} rows/s @ batch {b['batch_size']} | — | — | — | — |"
        )
    rates = sorted({r["offered_rps"] for m in systems.values() for r in m["open"]})
    if rates:
        lines += [
            "",
            "Open loop (fixed arrival schedule; latency from the scheduled send), "
            "p50 / p99 ms (achieved req/s); — = not run, beyond 1.25× the system's "
            "closed-loop peak:",
            "",
            "| system | " + " | ".join(f"{r:g} req/s" for r in rates) + " |",
            "|---|" + "---|" * len(rates),
        ]
        for name in _ordered(systems):
            by_rate = {r["offered_rps"]: r for r in systems[name]["open"]}
            cells = []
            for rate in rates:
                r = by_rate.get(rate)
                if r is None:
                    cells.append("—")
                    continue
                lat = r["latency_ms"]
                err = f", {r['errors']} err" if r["errors"] else ""
                cells.append(
                    f"{_ms(lat['p50'])} / {_ms(lat['p99'])} ({r['throughput_rps']:.0f}{err})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in _ordered(systems):
        m = systems[name]
        flagged = sum(r.get("flagged", 0) for r in [m["serial"], *m["closed"], *m["open"]])
        if flagged:
            lines += ["", f"{name}: {flagged} answers were marked degraded (default features)."]
    return [*lines, ""]


def _gpu_section(sc: dict[str, Any]) -> list[str]:
    gpu = sc.get("gpu")
    if not gpu:
        return []
    rows = [
        f"| {system} | {f['rows_per_s']:,.0f} | {_ratio(f['vs_ceiling'])} |"
        for system, f in gpu.items()
        if isinstance(f, dict)
    ]
    ceiling = gpu.get("ceiling")
    return [
        f"Through the gateway on the GPU ({gpu['rows_per_request']} rows per request), "
        f"against the runtime alone on the same GPU at its best batch size "
        f"({ceiling:,.0f} rows/s):"
        if ceiling
        else "No ceiling measured.",
        "",
        "| system | rows/s at peak | of the ceiling (target ≥ 0.8×) |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _versus_section(sc: dict[str, Any]) -> list[str]:
    vs = sc.get("vs_plain")
    if not vs:
        return []
    status = sc.get("rollout_status") or {}
    figures = (sc.get("rollout_status_after") or {}).get("window", {}).get("figures", {})
    lines = []
    if status:
        routing = json.dumps(status.get("routing", status))[:300]
        lines += [f"Routing during the run: `{routing}`", ""]
    if figures:
        lines += [
            "Requests per version seen by the gateway's rollout statistics: "
            + ", ".join(
                f"{v} {f.get('requests', '?')}"
                + (f" (shadow copies {f['shadow']['requests']})" if "shadow" in f else "")
                for v, f in figures.items()
            ),
            "",
        ]
    lines += [
        "Against the plain scenario, same system (this / plain):",
        "",
        "| system | serial p50 | peak throughput | throughput at SLO |",
        "|---|---|---|---|",
    ]
    for system, r in vs.items():
        lines.append(
            f"| {system} | {_ratio(r['serial_p50'])} | {_ratio(r['peak_throughput'])} "
            f"| {_ratio(r['throughput_at_slo'])} |"
        )
    return [*lines, ""]


def _overload_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, sc in results["scenarios"].items():
        for system, m in (sc.get("systems") or {}).items():
            o = (m or {}).get("overload")
            if o:
                rows.append(
                    f"| {system}/{name} | {o['capacity_rps']:.0f} | {o['offered_rps']:.0f} "
                    f"| {_ratio(o['goodput_ratio'])} | {_ms(o['admitted_ms']['p99'])} "
                    f"| {o['rejected']} | {_ms(o['rejected_ms']['p99'])} "
                    f"| {_ms((o.get('send_lag_ms') or {}).get('p99'))} |"
                )
    if not rows:
        return []
    return [
        "## Overload",
        "",
        "Open loop at 3× the capacity. Capacity and overload are measured with the served "
        "system (Ray, Redis, the gateway) on all CPUs but the last and the generator on the "
        "last (`loadtests.cores`; on one CPU they share it): capacity is the closed loop at "
        "the sweep's peak concurrency, so pinned. Goodput: answered requests per second "
        "over capacity. Refused: 503 (`overloaded`) answers. The generator's send lag says "
        "how late it could send.",
        "",
        "| system | capacity req/s | offered req/s | goodput | admitted p99 ms "
        "| refused | refusal p99 ms | generator lag p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _timing_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, sc in results["scenarios"].items():
        for system in ORDER[:4]:
            gw = sc["systems"].get(system)
            st = gw and gw["serial"].get("server_timing")
            if not st:
                continue
            stages = st["stages_mean_ms"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "total")
            rows.append(
                f"| {name} | {system} | {100 * st['coverage']:.0f}% "
                f"| {100 * st['coverage_without_inbound']:.0f}% | {st['client_mean_ms']:.2f}"
                f" | {stages.get('inbound', 0.0):.2f} | {stages.get('total', math.nan):.2f} "
                f"| {parts} | {st['outside_mean_ms']:.2f} "
                f"| {st['inside_total_unattributed_mean_ms']:.2f} |"
            )
    if not rows:
        return []
    return [
        "## Server-Timing coverage (our gateway, serial run)",
        "",
        "Coverage = mean over requests of (sum of the stages except `total`) / client-measured "
        "latency; target ≥ 90%. The generator stamps each request's `x-request-start` as it "
        "sends it, and the gateway reports the way in, from that stamp to its first read of "
        "the request, as the `inbound` stage (same clock on one machine); *without inbound* "
        "leaves that stage out. *Outside* is what no stage sees: client latency minus "
        "`inbound` and the gateway's `total`, i.e. the answer's way back after the "
        "Server-Timing header is formatted (the write, the kernel, the client waking up) "
        "and, over gRPC, gRPC's machinery on the way back. *Inside, unattributed* is "
        "`total` minus the stages within it.",
        "",
        "| scenario | system | coverage | without inbound | client mean (ms) | inbound (ms) "
        "| total (ms) | stages, mean ms | outside (ms) | inside, unattributed (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _generator_section(results: dict[str, Any]) -> list[str]:
    g = results.get("generator")
    if not g:
        return []
    s, c, o = g["serial"], g["closed"], g["open_1000"]
    # CPU per request over every run of the report, weighted by requests, per transport.
    cpu: dict[str, list[float]] = {"HTTP": [0.0, 0.0], "gRPC": [0.0, 0.0]}
    for sc in results["scenarios"].values():
        for system, m in sc["systems"].items():
            acc = cpu["gRPC" if system.endswith("grpc") else "HTTP"]
            for r in [m["serial"], *m["closed"], *m["open"]]:
                acc[0] += r["client_cpu_us_per_request"] * r["requests"]
                acc[1] += r["requests"]
    overall = "; ".join(f"{k} {us / n:.0f} µs" for k, (us, n) in cpu.items() if n) or "—"
    return [
        "## Load generator overhead",
        "",
        "The generator (raw asyncio HTTP/1.1, keep-alive, pre-encoded requests, uvloop) runs "
        "in its own process. Against a trivial raw-asyncio server:",
        "",
        f"- serial p50 {s['latency_ms']['p50']:.3f} ms, p99 {s['latency_ms']['p99']:.3f} ms "
        "(the floor any measured latency includes);",
        f"- CPU per request: {s['client_cpu_us_per_request']:.0f} µs serial, "
        f"{c['client_cpu_us_per_request']:.0f} µs at {c['throughput_rps']:.0f} req/s "
        f"(8 clients), {o['client_cpu_us_per_request']:.0f} µs open-loop at 1000 req/s;",
        f"- open-loop send lag at 1000 req/s: p50 {o['send_lag_ms']['p50']:.3f} ms, "
        f"p99 {o['send_lag_ms']['p99']:.3f} ms (negative: sent up to 1 ms early by design, "
        "latency then counts from the actual send; a late send counts from its due time);",
        f"- CPU per request over every run of this report (includes idle waits at low "
        f"rates): {overall}.",
        *_grpc_floor_lines(g.get("grpc"), results["meta"]["plan"].get("grpc_client", "grpcio")),
        "",
    ]


def _grpc_floor_lines(floor: dict[str, Any] | None, client: str) -> list[str]:
    if not floor:
        return []
    s, c = floor["serial"], floor["closed"]
    which = {"lean": "the lean client, raw HTTP/2", "grpcio": "grpcio's channel"}
    return [
        f"- the gRPC client ({which.get(client, client)}, one HTTP/2 connection) against "
        f"the gateway's own gRPC server (h2wire) answering a fixed message: "
        f"serial p50 {s['latency_ms']['p50']:.3f} ms, "
        f"p99 {s['latency_ms']['p99']:.3f} ms, {s['client_cpu_us_per_request']:.0f} µs "
        f"client CPU per request; {c['throughput_rps']:.0f} req/s with 8 clients.",
    ]


def _ceiling_section(results: dict[str, Any]) -> list[str]:
    ceil = results.get("ceiling") or {}
    if not ceil:
        return []
    lines = [
        "## Ceiling: the runtime alone",
        "",
        "Back-to-back `predict` on held-out rows (vectors built offline), 1 intra-op thread "
        "as in the replicas. rows/s (per-batch p50 ms):",
        "",
    ]
    sizes = [s["batch_size"] for s in next(iter(ceil.values()))["sizes"]]
    lines += [
        "| model | " + " | ".join(str(b) for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for c in ceil.values():
        cells = [f"{s['rows_per_s']:,.0f} ({s['batch_p50_ms']:.3f})" for s in c["sizes"]]
        lines.append(f"| {c['model']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _machine_section(meta: dict[str, Any]) -> list[str]:
    env = ", ".join(f"{k}={v}" for k, v in meta.get("ray_env", {}).items()) or "none"
    la0 = ", ".join(f"{x:.2f}" for x in meta["loadavg_start"])
    la1 = ", ".join(f"{x:.2f}" for x in meta.get("loadavg_end", ()))
    return [
        "## Machine",
        "",
        f"- CPU: {meta['cpu']}; {meta['cores']} cores ({meta['usable_cores']} usable); "
        f"memory {meta['memory_gib']} GiB; {meta['os']}",
        f"- Python {meta['python']}, Ray {meta['ray']}, onnxruntime {meta['onnxruntime']}, "
        f"torch {meta['torch']}, FastAPI {meta['fastapi']}, uvicorn {meta['uvicorn']}, "
        f"redis-server {meta['redis_server']}",
        f"- Ray: {meta['ray_num_cpus']} logical CPUs; extra environment: {env}",
        f"- load average at start: {la0}; at end: {la1}",
        f"- date: {meta['date']}",
        "",
    ]


def _ordered(systems: dict[str, Any]) -> list[str]:
    return [s for s in ORDER if s in systems] + [s for s in systems if s not in ORDER]


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slo = results["meta"]["plan"]["slo_ms"]
    files: list[str] = []
    scenarios = {n: sc for n, sc in results["scenarios"].items() if sc["systems"]}
    for name, sc in scenarios.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system in _ordered(sc["systems"]):
            runs = sc["systems"][system]["open"]
            pts = [
                (r["offered_rps"], r["latency_ms"]["p50"], r["latency_ms"]["p99"])
                for r in runs
                if r["latency_ms"]["p99"] is not None and math.isfinite(r["latency_ms"]["p99"])
            ]
            if not pts:
                continue
            x, p50, p99 = zip(*pts)
            color = COLORS.get(system)
            ax.plot(x, p50, "o-", color=color, label=f"{system} p50")
            ax.plot(x, p99, "s--", color=color, label=f"{system} p99")
        ax.axhline(slo, color="grey", lw=0.8, ls=":", label=f"SLO {slo:g} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (req/s, open loop)")
        ax.set_ylabel("latency (ms, from scheduled send)")
        ax.set_title(f"{name}: latency vs offered load")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = f"latency_vs_load_{name}.png"
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    if scenarios:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(scenarios)
        systems = _ordered({s: 1 for sc in scenarios.values() for s in sc["systems"]})
        width = 0.8 / max(len(systems), 1)
        for k, system in enumerate(systems):
            xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(names))]
            ran = [(i, scenarios[n]["systems"].get(system)) for i, n in enumerate(names)]
            # A system that did not run a scenario gets no bar (not a bar of 0).
            xs = [x for x, (_, m) in zip(xs, ran) if m is not None]
            at = [m.get("rps_at_slo", 0.0) for _, m in ran if m is not None]
            peak = [m.get("peak_rps", 0.0) for _, m in ran if m is not None]
            color = COLORS.get(system)
            ax.bar(xs, peak, width, color=color, alpha=0.25)
            bars = ax.bar(xs, at, width, color=color, label=system)
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in at], fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("req/s (closed loop)")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title(f"throughput at p99 ≤ {slo:g} ms (solid) and peak (light)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4, frameon=False)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "throughput_at_slo.png", dpi=110)
        plt.close(fig)
        files.append("throughput_at_slo.png")
    return files
