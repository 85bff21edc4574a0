"""The Prometheus configuration (deployments/prometheus) checked by promtool: the config,
each rules file, and the rules' unit tests (alerts_test.yml), which must cover every alert.
Also checks that the dashboard's queries are valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.unit.observability.test_dashboard import (
    CATALOGUE,
    DASHBOARD,
    RAY_SERVE_METRICS,
    metric_names,
)

PROMETHEUS = ROOT / "deployments" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES_TEST = PROMETHEUS / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; `make` installs it)",
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_files() -> list[Path]:
    """The rules files prometheus.yml loads (relative to it)."""
    return [PROMETHEUS / f for f in load(CONFIG)["rule_files"]]


def rules() -> list[dict[str, Any]]:
    return [r for f in rule_files() for g in load(f)["groups"] for r in g["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def rule_tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = load(RULES_TEST)["tests"]
    return tests


# ---- promtool -----------------------------------------------------------------------


@needs_promtool
def test_promtool_check_config() -> None:
    assert_ok(promtool("check", "config", CONFIG))


@needs_promtool
@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    assert_ok(promtool("check", "rules", path))


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", RULES_TEST)
    assert_ok(result)
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, Grafana's variables replaced, parsed by promtool as a rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = {
        "$__rate_interval": "20s",
        "$__interval": "5s",
        "$__range": "1h",
        "$model": "fraud",
    }
    records = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in substitutions.items():
                expr = expr.replace(var, value)
            record = f"dashboard:panel{panel['id']}:{target['refId']}"
            records.append({"record": record, "expr": expr})
    assert records
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    assert_ok(promtool("check", "rules", path))


# ---- the files themselves -----------------------------------------------------------


def test_config_scrapes_the_metrics_port_every_5s() -> None:
    config = load(CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    targets = [
        t
        for job in config["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    ]
    assert "127.0.0.1:8080" in targets
    assert "prom_metrics_service_discovery.json" in CONFIG.read_text()
    for path in rule_files():
        assert path.is_file(), path


def test_rules_test_loads_the_configured_rule_files() -> None:
    tested = {(PROMETHEUS / f).resolve() for f in load(RULES_TEST)["rule_files"]}
    assert tested == {p.resolve() for p in rule_files()}


def test_rules_use_only_catalogue_metrics() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        names = metric_names(rule["expr"])
        unknown = names - CATALOGUE - RAY_SERVE_METRICS
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"
        # Recorded series used by alerts are defined by the recording rules.
        for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", rule["expr"]):
            assert name in recorded, f"{name} is not a recording rule"


def test_alerts_are_documented() -> None:
    expected = {
        "LatencySLOBurn",
        "HighErrorRate",
        "CanaryRegression",
        "FeatureStoreFailures",
        "AccuracyDrop",
        "DataDrift",
    }
    assert {r["alert"] for r in alert_rules()} == expected
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "$value" in annotations["description"], f"{name}: description without the value"


def test_every_alert_rule_has_a_firing_test_case() -> None:
    """Each alerting rule (alerts sharing a name are told apart by their labels, like
    burn: fast|slow) is expected to fire in at least one test case."""
    fired: list[tuple[str, dict[str, str]]] = [
        (case["alertname"], {k: str(v) for k, v in alert.get("exp_labels", {}).items()})
        for test in rule_tests()
        for case in test.get("alert_rule_test", [])
        for alert in case.get("exp_alerts") or []
    ]
    for rule in alert_rules():
        labels = {k: str(v) for k, v in rule.get("labels", {}).items()}
        assert any(
            name == rule["alert"] and labels.items() <= got.items() for name, got in fired
        ), f"no test expects {rule['alert']} {labels} to fire"


def test_every_alert_has_a_quiet_case() -> None:
    quiet = {
        case["alertname"]
        for test in rule_tests()
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert {r["alert"] for r in alert_rules()} <= quiet


def test_rules_tests_carry_ray_labels() -> None:
    """Input series look like Ray's: WorkerId and friends, which the rules aggregate away."""
    for test in rule_tests():
        series = [s["series"] for s in test["input_series"]]
        assert all("WorkerId=" in s for s in series), test["name"]
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                assert "WorkerId" not in alert.get("exp_labels", {}), test["name"]
