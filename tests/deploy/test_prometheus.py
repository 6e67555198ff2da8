"""Alert rules: promtool checks them, unit-tests them, and the PrometheusRule
and the dashboard agree with them."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import yaml
from conftest import DEPLOY, ROOT, require_tool, run

PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "baton.rules.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "baton.json"


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    out = run([promtool, "check", "rules", str(RULES)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass():
    promtool = require_tool("promtool")
    assert UNIT_TESTS, "no promtool unit test files"
    out = run([promtool, "test", "rules", *map(str, UNIT_TESTS)], cwd=PROM / "tests")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_config():
    promtool = require_tool("promtool")
    out = run([promtool, "check", "config", "--syntax-only", str(PROM / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    firing, silent = set(), set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - firing == set(), "alerts never seen firing"
    assert names - silent == set(), "alerts never checked silent"


def test_alerts_carry_summary_severity_and_a_real_runbook():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', docs))
    for alert in _alerts():
        ann = alert.get("annotations", {})
        assert ann.get("summary"), alert["alert"]
        assert alert.get("labels", {}).get("severity") in {"warning", "critical"}
        page, _, anchor = ann.get("runbook", "").partition("#")
        assert page == "docs/deploy.md" and anchor in anchors, (alert["alert"], ann)


def test_prometheusrule_is_generated_from_the_rules_file():
    gen = _load(PROM / "gen_prometheusrule.py")
    assert gen.OUT.read_text() == gen.render(), "run deploy/prometheus/gen_prometheusrule.py"
    rendered = yaml.safe_load(gen.OUT.read_text())
    assert rendered["kind"] == "PrometheusRule"
    assert rendered["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_dashboard_is_generated_and_its_queries_parse(tmp_path):
    build = _load(DEPLOY / "grafana" / "build_dashboard.py")
    assert DASHBOARD.read_text() == build.render(), "run deploy/grafana/build_dashboard.py"
    promtool = require_tool("promtool")
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "title",
    ["Tasks per second", "Backlog per consumer", "KV cache usage", "Prefix-cache hit rate"],
)
def test_dashboard_has_the_core_panels(title):
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert any(p["title"].startswith(title) for p in panels)
    for p in panels:
        assert p["datasource"]["uid"] == "baton-prometheus"
