"""Every metric the rules and the dashboard select is in deploy/metrics.txt, the
catalogue the services promise to export (or a standard series: ``up``,
vLLM's ``vllm:*``, or a series the rules record themselves)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import DEPLOY

CATALOGUE_FILE = DEPLOY / "metrics.txt"
RULES = DEPLOY / "prometheus" / "rules" / "baton.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "baton.json"
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")
SERVICES = {"orchestrator", "context-store", "inference-worker", "tool-worker"}
STANDARD = re.compile(r"^(up|vllm:[a-z0-9_:]+)$")


def entries() -> list[tuple[str, ...]]:
    """``(service, name)`` of every ``<service> <name>`` line."""
    lines = CATALOGUE_FILE.read_text().splitlines()
    return [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#")]


def catalogue() -> list[str]:
    """Every catalogued name once (a family of shared code is under each service)."""
    return sorted({p[1] for p in entries()})


# -- PromQL: the metric names an expression selects ---------------------------

# Strings, label matchers, range/offset durations and numbers are whole tokens,
# so nothing inside them reads as a name.
_TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\{[^}]*\}|\[[^\]]*\]|\d+(?:\.\d+)?(?:e[+-]?\d+)?[a-z]*'
    r"|[A-Za-z_:][A-Za-z0-9_:]*|\S"
)
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LISTS | {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def selected_metrics(expr: str) -> set[str]:
    """The names of an expression's vector selectors: every name that is not
    a function or aggregation (followed by ``(``, ``by`` or ``without``), a
    keyword, or a label in a ``by``/``without``/``on``/``ignoring``/``group_*``
    list."""
    tokens = _TOKEN.findall(expr)
    names: set[str] = set()
    in_labels = False
    for i, tok in enumerate(tokens):
        if in_labels:
            in_labels = tok != ")"
            continue
        if not _NAME.fullmatch(tok):
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok.lower() in _LABEL_LISTS and nxt == "(":
            in_labels = True  # from its "(" to the ")" that closes the list
            continue
        if tok.lower() in _KEYWORDS or nxt == "(" or nxt.lower() in ("by", "without"):
            continue  # a keyword, a function or an aggregation (``sum by (...) (...)``)
        names.add(tok)
    return names


def test_the_selector_reader_finds_names_and_only_names():
    expr = (
        'histogram_quantile(0.95, sum by (pool, le) (rate(baton_a_bucket{pool=~"$pool", '
        'x="by (foo)"}[5m]))) > on() group_left() baton:slo_x unless on(pool) '
        '(sum without (worker) (vllm:num_requests) > 1e3) or label_replace(up, "a", "$1", '
        '"b", "(.*)") offset 5m'
    )
    assert selected_metrics(expr) == {"baton_a_bucket", "baton:slo_x", "vllm:num_requests", "up"}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def exprs() -> list[str]:
    """Every PromQL expression of the rules and the dashboard (panels and the
    label_values(...) queries of its variables)."""
    dash = json.loads(DASHBOARD.read_text())
    found = [r["expr"] for r in _rules()]
    found += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", v["query"])
            assert metric is not None, v["query"]
            found.append(metric.group(1))
    return found


def used_names() -> set[str]:
    return {name for e in exprs() for name in selected_metrics(e)}


def test_catalogue_is_well_formed():
    pairs = entries()
    assert all(len(p) == 2 for p in pairs), "lines are <service> <name>"
    assert len(pairs) == len(set(pairs)), "duplicate entries"
    assert {p[0] for p in pairs} == SERVICES
    names = catalogue()
    assert all(re.fullmatch(r"baton_[a-z0-9_]+", n) for n in names)
    assert not [n for n in names if HISTOGRAM_SERIES.search(n)], "list histogram base names"


@pytest.mark.parametrize("expr", exprs())
def test_every_query_selects_only_catalogued_or_standard_series(expr):
    known = set(catalogue())
    recorded = {r["record"] for r in _rules() if "record" in r}
    unknown = {
        name
        for name in selected_metrics(expr)
        if name not in known
        and HISTOGRAM_SERIES.sub("", name) not in known
        and name not in recorded
        and not STANDARD.match(name)
    }
    assert unknown == set()


def test_histogram_series_only_on_histogram_names():
    # Counters end in _total; a _bucket/_sum/_count series of one would be a typo.
    for name in used_names():
        if HISTOGRAM_SERIES.search(name):
            assert not HISTOGRAM_SERIES.sub("", name).endswith("_total"), name


def test_the_detector_sees_names():
    # Guard against a reader that silently matches nothing.
    assert {
        "baton_worker_oom_total",
        "baton_task_latency_seconds_bucket",
        "baton_step_phase_seconds_bucket",
        "pool:baton_worker_ttft_seconds:p95_5m",
    } <= used_names()
