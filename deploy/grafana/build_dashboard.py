"""Build deploy/grafana/dashboards/baton.json from the panel list below.

Run ``python deploy/grafana/build_dashboard.py`` after editing; a test fails
when the committed JSON differs from what this script writes.

The dashboard drops into any Grafana: the Prometheus data source is a
template variable (``$datasource``, no hard-coded uid), and the variables
``$namespace``, ``$pool``, ``$workflow`` and ``$tenant`` filter the panels
(each "All" by default; ``.*`` also matches series without the label, as in
docker compose, where there is no namespace). Compose provisions it from
deploy/grafana/provisioning; Kubernetes gets it as a ConfigMap for the
Grafana sidecar (deploy/k8s/components/monitoring, written by this script too).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "dashboards" / "baton.json"
CONFIGMAP = HERE.parent / "k8s" / "components" / "monitoring" / "grafana-dashboard.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
PHASES = ("queue", "context", "admission", "prefill", "decode", "tool", "record")


def sel(*labels: str) -> str:
    """A label selector filtered by the namespace variable and by ``labels``
    (each the name of a label and of its variable)."""
    return "{" + ", ".join(f'{name}=~"${name}"' for name in ("namespace", *labels)) + "}"


def rate(metric: str, *labels: str) -> str:
    return f"rate({metric}{sel(*labels)}[{RATE}])"


def q(hist: str, quantile: float, by: str, *labels: str) -> str:
    """The ``quantile`` of histogram ``hist`` by ``by``."""
    return f"histogram_quantile({quantile}, sum by ({by}, le) ({rate(hist + '_bucket', *labels)}))"


def mean(hist: str, by: str, *labels: str) -> str:
    """Mean of histogram ``hist`` by ``by``."""
    return (f"sum by ({by}) ({rate(hist + '_sum', *labels)})"
            f" / sum by ({by}) ({rate(hist + '_count', *labels)})")  # fmt: skip


def total(metric: str, by: str, *labels: str) -> str:
    """Per-second rate of counter ``metric`` summed by ``by``."""
    return f"sum by ({by}) ({rate(metric, *labels)})"


def gauge(agg: str, metric: str, by: str, *labels: str) -> str:
    return f"{agg} by ({by}) ({metric}{sel(*labels)})"


def pcts(
    hist: str, by: str, legend: str, *labels: str, quantiles: tuple[float, ...] = (0.5, 0.95)
) -> list[tuple[str, str]]:
    """One series per quantile of ``hist`` by ``by``."""
    return [(f"p{round(p * 100)} {legend}", q(hist, p, by, *labels)) for p in quantiles]


WF = ("workflow",)
WF_POOL = ("workflow", "pool")
POOL = ("pool",)
PM = "pool, model"
PM_LEGEND = "{{pool}} {{model}}"

# (title, unit, [(legend, expr), ...], options); each row is one panel. Options:
# "stack": stack the series (parts of a whole).
PANELS: list[tuple[str, str, list[tuple[str, str]], dict]] = [
    (
        "Tasks per second",
        "reqps",
        [("{{workflow}} {{outcome}}", total("baton_tasks_total", "workflow, outcome", *WF))],
        {},
    ),
    (
        "Steps per second (and in flight)",
        "short",
        [
            (
                "{{workflow}}/{{agent}}",
                total("baton_step_latency_seconds_count", "workflow, agent", *WF),
            ),
            ("in flight", f"sum(baton_steps_in_flight{sel()})"),
        ],
        {},
    ),
    (
        "Task latency percentiles",
        "s",
        pcts(
            "baton_task_latency_seconds",
            "workflow",
            "{{workflow}}",
            *WF,
            quantiles=(0.5, 0.95, 0.99),
        ),
        {},
    ),
    (
        "Step latency p95 per agent",
        "s",
        [("{{workflow}}/{{agent}}", q("baton_step_latency_seconds", 0.95, "workflow, agent", *WF))],
        {},
    ),
    (
        "Step waterfall: mean seconds per step in each phase",
        "s",
        [("{{phase}}", mean("baton_step_phase_seconds", "phase", *WF_POOL))],
        {"stack": True},
    ),
    (
        "Step phases p50 / p95",
        "s",
        pcts("baton_step_phase_seconds", "phase", "{{phase}}", *WF_POOL),
        {},
    ),
    (
        "Time to first token / inter-token latency",
        "s",
        pcts("baton_worker_ttft_seconds", PM, "TTFT " + PM_LEGEND, *POOL)
        + pcts("baton_worker_inter_token_latency_seconds", PM, "ITL " + PM_LEGEND, *POOL),
        {},
    ),
    (
        "Queue wait / job latency (p95)",
        "s",
        pcts(
            "baton_worker_queue_wait_seconds",
            "pool",
            "queue wait {{pool}}",
            *POOL,
            quantiles=(0.95,),
        )
        + pcts(
            "baton_worker_job_latency_seconds", "pool", "job {{pool}}", *POOL, quantiles=(0.95,)
        ),
        {},
    ),
    (
        "Token-stream lag (generated to published)",
        "s",
        pcts("baton_worker_token_stream_lag_seconds", "pool", "{{pool}}", *POOL),
        {},
    ),
    (
        "Tool calls per second",
        "reqps",
        [("{{tool}} {{outcome}}", total("baton_tool_calls_total", "tool, outcome"))],
        {},
    ),
    (
        "Tool call time / queue wait (p95)",
        "s",
        pcts("baton_tool_seconds", "tool", "run {{tool}}", quantiles=(0.95,))
        + pcts("baton_tool_queue_wait_seconds", "pool", "queue wait {{pool}}", quantiles=(0.95,)),
        {},
    ),
    (
        "Backlog per consumer",
        "short",
        [
            (
                "{{stream}}/{{consumer}}",
                gauge("sum", "baton_consumer_pending_messages", "stream, consumer"),
            )
        ],
        {},
    ),
    (
        "Workers ready / jobs in flight",
        "short",
        [
            ("ready {{pool}}", gauge("sum", "baton_worker_ready", "pool", *POOL)),
            ("in flight {{pool}}", gauge("sum", "baton_worker_inflight_jobs", "pool", *POOL)),
        ],
        {},
    ),
    (
        "KV cache usage",
        "percentunit",
        [
            (
                "{{pool}}/{{worker}}",
                gauge("max", "baton_worker_kv_usage_ratio", "pool, worker", *POOL),
            )
        ],
        {},
    ),
    (
        "Prefix-cache hit rate",
        "percentunit",
        [
            (
                "{{pool}}",
                total("baton_worker_prefix_cache_hits_total", "pool", *POOL)
                + " / "
                + total("baton_worker_prefix_cache_queries_total", "pool", *POOL),
            ),
        ],
        {},
    ),
    (
        "OOMs, engine restarts, preemptions (per 5m)",
        "short",
        [
            (f"{what} {{{{pool}}}}", f"sum by (pool) (increase({metric}{sel(*POOL)}[5m]))")
            for what, metric in (
                ("OOM", "baton_worker_oom_total"),
                ("restarts", "baton_worker_engine_restarts_total"),
                ("preemptions", "baton_worker_preemptions_total"),
            )
        ],
        {},
    ),
    (
        "Tokens per second per workflow",
        "short",
        [("{{workflow}} {{kind}}", total("baton_tokens_total", "workflow, kind", *WF))],
        {},
    ),
    (
        "Cost per tenant (USD/h)",
        "currencyUSD",
        [("{{tenant}}", "3600 * " + total("baton_tenant_cost_usd_total", "tenant", "tenant"))],
        {"stack": True},
    ),
    (
        "Cost (USD/h) and GPU-seconds/s per workflow",
        "short",
        [
            ("USD/h {{workflow}}", "3600 * " + total("baton_cost_usd_total", "workflow", *WF)),
            ("GPU-s/s {{workflow}}", total("baton_gpu_seconds_total", "workflow", *WF)),
        ],
        {},
    ),
    (
        "HTTP requests per second / p95 latency",
        "short",
        [
            (
                "{{service}} {{handler}} {{status}}",
                total("baton_http_requests_total", "service, handler, status"),
            ),
            (
                "p95 s {{service}} {{handler}}",
                q("baton_http_request_duration_seconds", 0.95, "service, handler"),
            ),
        ],
        {},
    ),
    (
        "Dead letters and budget stops (per 5m)",
        "short",
        [
            (
                "dead letters {{consumer}}",
                f"sum by (consumer) (increase(baton_dead_letters_total{sel()}[5m]))",
            ),
            (
                "budget stops {{workflow}}",
                f"sum by (workflow) (increase(baton_budget_stops_total{sel(*WF)}[5m]))",
            ),
        ],
        {},
    ),
    (
        "GPU memory used",
        "bytes",
        [
            (
                "{{worker}} gpu{{gpu}}",
                gauge("max", "baton_worker_gpu_memory_used_bytes", "worker, gpu", *POOL),
            ),
            (
                "{{worker}} gpu{{gpu}} free",
                gauge("min", "baton_worker_gpu_memory_free_bytes", "worker, gpu", *POOL),
            ),
        ],
        {},
    ),
]


def variable(name: str, label: str, query: str) -> dict:
    """A multi-value query variable over a label's values, "All" by default."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


VARIABLES = [
    {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "refresh": 1,
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "current": {},
        "options": [],
        "regex": "",
    },
    variable("namespace", "Namespace", "label_values(baton_tasks_total, namespace)"),
    variable("pool", "Pool", "label_values(baton_worker_ready, pool)"),
    variable("workflow", "Workflow", "label_values(baton_tasks_total, workflow)"),
    variable("tenant", "Tenant", "label_values(baton_tenant_cost_usd_total, tenant)"),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]], options: dict) -> dict:
    stacked = options.get("stack", False)
    custom = {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60} if stacked else {}
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": e, "legendFormat": lf}
            for n, (lf, e) in enumerate(targets)
        ],
    }


def dashboard() -> dict:
    return {
        "uid": "baton-overview",
        "title": "Baton",
        "tags": ["baton"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": VARIABLES},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def render_configmap() -> str:
    """The dashboard as a ConfigMap the Grafana sidecar of kube-prometheus-stack
    loads (it watches ConfigMaps labelled ``grafana_dashboard: "1"``)."""
    body = render().rstrip("\n").replace("\n", "\n    ")
    return (
        "# GENERATED by deploy/grafana/build_dashboard.py from the same panel list as\n"
        "# deploy/grafana/dashboards/baton.json. Do not edit.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: baton-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "  annotations:\n"
        "    # the sidecar's folder annotation (sidecar.dashboards.folderAnnotation)\n"
        "    grafana_folder: Baton\n"
        "data:\n"
        "  baton.json: |-\n"
        f"    {body}\n"
    )


if __name__ == "__main__":
    OUT.write_text(render())
    CONFIGMAP.write_text(render_configmap())
    print(f"wrote {OUT} and {CONFIGMAP}")
