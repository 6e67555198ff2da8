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


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation
    dropped (hyphens and underscores kept), each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_matches_githubs_rule():
    assert github_anchor("BatonGPUOutOfMemory (critical)") == "batongpuoutofmemory-critical"
    assert github_anchor("BatonDeadLetters / BatonMaxDeliveries (warning)") == (
        "batondeadletters--batonmaxdeliveries-warning"
    )


RUNBOOK_BASE = "{{ $externalLabels.baton_docs_url }}"


def test_alerts_carry_summary_severity_and_a_runbook_url_to_a_heading_of_the_docs():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", docs, flags=re.M)}
    for alert in _alerts():
        ann = alert.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), alert["alert"]
        assert "runbook" not in ann, "the annotation is runbook_url"
        assert alert.get("labels", {}).get("severity") in {"warning", "critical"}
        url = ann.get("runbook_url", "")
        assert url.startswith(RUNBOOK_BASE), (alert["alert"], url)
        page, _, anchor = url.removeprefix(RUNBOOK_BASE).partition("#")
        assert page == "docs/deploy.md" and anchor in anchors, (alert["alert"], url)
        # Its section names it (one heading may serve two alerts).
        (heading,) = [h for h in re.findall(r"^### (.+)$", docs, flags=re.M)
                      if github_anchor(h) == anchor]  # fmt: skip
        assert alert["alert"] in heading


def test_prometheusrule_is_generated_from_the_rules_file():
    gen = _load(PROM / "gen_prometheusrule.py")
    assert gen.OUT.read_text() == gen.render(), "run deploy/prometheus/gen_prometheusrule.py"
    rendered = yaml.safe_load(gen.OUT.read_text())
    assert rendered["kind"] == "PrometheusRule"
    assert rendered["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_dashboard_and_its_configmap_are_generated_and_its_queries_parse(tmp_path):
    build = _load(DEPLOY / "grafana" / "build_dashboard.py")
    assert DASHBOARD.read_text() == build.render(), "run deploy/grafana/build_dashboard.py"
    assert build.CONFIGMAP.read_text() == build.render_configmap(), "run build_dashboard.py"
    configmap = yaml.safe_load(build.CONFIGMAP.read_text())
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert json.loads(configmap["data"]["baton.json"]) == json.loads(DASHBOARD.read_text())
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
    [
        "Tasks per second", "Backlog per consumer", "KV cache usage", "Prefix-cache hit rate",
        "Step waterfall", "Step phases p50 / p95", "Tool calls", "Token-stream lag",
        "Cost per tenant", "Time to first token / inter-token latency",
    ],
)  # fmt: skip
def test_dashboard_has_the_core_panels(title):
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert any(p["title"].startswith(title) for p in panels)


def test_dashboard_takes_its_data_source_and_filters_from_variables():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    exprs = []
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in dash["panels"]:
        assert p["type"] == "timeseries" and p["title"] and p["targets"], p.get("title")
        assert p["datasource"] == source, p["title"]
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == source and t["expr"] and t["refId"], p["title"]
            assert "baton-prometheus" not in json.dumps(t)
            exprs.append(t["expr"])
    # Every filter variable is a query of the data source, and panels use it.
    for name in ("namespace", "pool", "workflow", "tenant"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == source, name
        assert v["includeAll"] and v["allValue"] == ".*" and v["multi"], name
        assert any(f'{name}=~"${name}"' in e for e in exprs), f"no panel filters by ${name}"
    # Every query filters by namespace, so one Grafana can show several installs apart.
    assert all('namespace=~"$namespace"' in e for e in exprs)
