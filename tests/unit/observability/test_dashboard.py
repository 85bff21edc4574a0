"""The Grafana dashboard and its provisioning (deployments/grafana): every panel queries
Prometheus through the provisioned datasource, only with metrics the gateway exports."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

GRAFANA = ROOT / "deployments" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "serving.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "serving.yml"
# Where deployments/grafana is mounted (container) or linked (package); see the provider.
GRAFANA_MOUNT = "/etc/grafana/serving"

# The gateway's metrics as exported by Ray (`ray_` prefix; histograms without their
# _bucket/_sum/_count suffixes), and the Ray Serve metrics the dashboard uses.
CATALOGUE = {
    "ray_serving_requests_total",
    "ray_serving_request_duration_seconds",
    "ray_serving_stage_duration_seconds",
    "ray_serving_batch_size",
    "ray_serving_inflight_requests",
    "ray_serving_feature_lookups_total",
    "ray_serving_feature_lookup_duration_seconds",
    "ray_serving_degraded_responses_total",
    "ray_serving_canary_weight_percent",
    "ray_serving_rollout_decisions_total",
    "ray_serving_rollout_state",
    "ray_serving_shadow_requests_total",
    "ray_serving_predictions_total",
    "ray_serving_labels_total",
    "ray_serving_model_accuracy",
    "ray_serving_feature_psi",
    "ray_serving_prediction_psi",
    "ray_serving_autoscaling_decisions_total",
    "ray_serving_autoscaling_target_replicas",
    "ray_serving_replica_latency_p95_seconds",
}
HISTOGRAMS = {
    "ray_serving_request_duration_seconds",
    "ray_serving_stage_duration_seconds",
    "ray_serving_batch_size",
    "ray_serving_feature_lookup_duration_seconds",
}
RAY_SERVE_METRICS = {"ray_serve_deployment_replica_healthy"}
# A metric name not preceded by a name character or ":" (recording rule names contain
# "ray_..." after a colon). Digits allowed: ray_serving_replica_latency_p95_seconds.
METRIC_RE = re.compile(r"(?<![\w:])ray_[a-z0-9_]+")
GRAFANA_VARIABLES = {"model", "__rate_interval", "__range", "__interval"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, histogram suffixes stripped."""
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "serving-gateway"
    assert dashboard["title"]
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert len(query_panels(dashboard)) >= 20


def test_every_panel_has_targets_with_expr_and_ref_id(dashboard: dict[str, Any]) -> None:
    for panel in query_panels(dashboard):
        title = panel["title"]
        assert panel.get("targets"), f"panel {title!r} has no targets"
        ref_ids = [t.get("refId") for t in panel["targets"]]
        assert all(ref_ids), f"panel {title!r}: a target without refId"
        assert len(ref_ids) == len(set(ref_ids)), f"panel {title!r}: duplicate refId"
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str), f"panel {title!r}: target without expr"
            assert target["expr"].strip(), f"panel {title!r}: empty expr"
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), f"panel {title!r}: gridPos"


def test_exprs_use_only_catalogue_metrics(dashboard: dict[str, Any]) -> None:
    allowed = CATALOGUE | RAY_SERVE_METRICS
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            unknown = names - allowed
            assert not unknown, f"panel {panel['title']!r} uses unknown metrics {unknown}"


def test_every_catalogue_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(e) for e in exprs(dashboard)))
    assert CATALOGUE - used == set()


def test_catalogue_matches_the_metrics_the_gateway_defines() -> None:
    """Ray exports `serving_x` as `ray_serving_x`: the dashboard's names must exist."""
    source = (ROOT / "serving" / "observability" / "metrics.py").read_text()
    defined = {f"ray_{name}" for name in re.findall(r'"(serving_[a-z0-9_]+)"', source)}
    assert CATALOGUE - defined == set()


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(ray_serving_batch_size_bucket{model=~"$model"}'
        "[$__rate_interval]))) / model:ray_serving_requests:rate5m"
        " + max(ray_serving_replica_latency_p95_seconds)"
    )
    assert metric_names(expr) == {
        "ray_serving_batch_size",
        "ray_serving_replica_latency_p95_seconds",
    }


def test_exprs_aggregate_away_ray_labels(dashboard: dict[str, Any]) -> None:
    """Ray adds WorkerId etc. to every series: each query aggregates (or is a ratio or
    quantile of aggregates), so a panel shows one line per model, not per worker."""
    aggregations = re.compile(r"\b(sum|max|avg|min|count)\b(\s*by\s*\([^)]*\))?\s*\(")
    for expr in exprs(dashboard):
        assert aggregations.search(expr), f"not aggregated: {expr}"


def test_only_known_grafana_variables(dashboard: dict[str, Any]) -> None:
    for expr in exprs(dashboard):
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var in GRAFANA_VARIABLES, f"unknown variable ${var} in {expr}"


def test_model_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    query = model["query"] if isinstance(model["query"], str) else model["query"]["query"]
    assert query == "label_values(ray_serving_requests_total, model)"
    assert model["multi"] and model["includeAll"]
    assert model["allValue"] == ".*"  # exprs match with model=~"$model"
    assert any('model=~"$model"' in e for e in exprs(dashboard))


def test_datasource_uids_exist(dashboard: dict[str, Any]) -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    assert "prometheus" in uids
    prometheus = next(d for d in provisioned["datasources"] if d["uid"] == "prometheus")
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://127.0.0.1:9090"

    # Panels and queries name no datasource uid: they use the dashboard's `datasource`
    # variable (any Prometheus), so the dashboard imports into any Grafana.
    used = set()
    for panel in query_panels(dashboard):
        used.add(panel["datasource"]["uid"])
        used.update(t["datasource"]["uid"] for t in panel["targets"] if "datasource" in t)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    used.update(v["datasource"]["uid"] for v in variables.values() if "datasource" in v)
    assert used == {"${datasource}"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == prometheus["type"]


def test_dashboard_provider_points_at_the_dashboards() -> None:
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        assert path.startswith(GRAFANA_MOUNT + "/"), path
        local = GRAFANA / path.removeprefix(GRAFANA_MOUNT + "/")
        assert local.is_dir(), f"{path} -> {local} does not exist"
        assert DASHBOARD.parent == local
        assert list(local.glob("*.json")), f"no dashboard in {local}"


def test_provisioning_layout() -> None:
    """Grafana reads <provisioning>/datasources and <provisioning>/dashboards."""
    for path in (DATASOURCES, PROVIDERS):
        data = yaml.safe_load(path.read_text())
        assert data["apiVersion"] == 1, path
