"""Every metric the rules and the dashboard use is in deploy/metrics.txt, the
catalogue the services promise to export."""

from __future__ import annotations

import json
import re

import yaml
from conftest import DEPLOY

CATALOGUE_FILE = DEPLOY / "metrics.txt"
METRIC = re.compile(r"\bbaton_[a-z0-9_]*[a-z0-9]")
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


SERVICES = {"orchestrator", "context-store", "inference-worker", "tool-worker"}


def entries() -> list[tuple[str, str]]:
    """``(service, name)`` of every ``<service> <name>`` line."""
    lines = CATALOGUE_FILE.read_text().splitlines()
    return [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#")]


def catalogue() -> list[str]:
    """Every catalogued name once (a family of shared code is under each service)."""
    return sorted({name for _, name in entries()})


def used_names() -> set[str]:
    text = []
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "baton.rules.yml").read_text())
    text += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "baton.json").read_text())
    text += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for expr in text for m in METRIC.findall(expr)}


def test_catalogue_is_well_formed():
    pairs = entries()
    assert all(len(p) == 2 for p in pairs), "lines are <service> <name>"
    assert len(pairs) == len(set(pairs)), "duplicate entries"
    assert {service for service, _ in pairs} == SERVICES
    names = catalogue()
    assert all(re.fullmatch(r"baton_[a-z0-9_]+", n) for n in names)
    assert not [n for n in names if HISTOGRAM_SERIES.search(n)], "list histogram base names"


def test_rules_and_dashboard_use_only_catalogued_metrics():
    known = set(catalogue())
    unknown = set()
    for name in used_names():
        base = HISTOGRAM_SERIES.sub("", name)
        if name not in known and base not in known:
            unknown.add(name)
    assert unknown == set()


def test_histogram_series_only_on_histogram_names():
    # Counters end in _total; a _bucket/_sum/_count series of one would be a typo.
    for name in used_names():
        if HISTOGRAM_SERIES.search(name):
            assert not HISTOGRAM_SERIES.sub("", name).endswith("_total"), name


def test_the_detector_sees_names():
    # Guard against a regex that silently matches nothing.
    assert {"baton_worker_oom_total", "baton_task_latency_seconds_bucket"} <= used_names()
