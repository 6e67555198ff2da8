"""Build deploy/grafana/dashboards/baton.json from the panel list below.

Run ``python deploy/grafana/build_dashboard.py`` after editing; a test fails
when the committed JSON differs from what this script writes.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "baton.json"
DATASOURCE = {"type": "prometheus", "uid": "baton-prometheus"}
RATE = "$__rate_interval"


def q(hist: str, quantile: float, by: str) -> str:
    return f"histogram_quantile({quantile}, sum by ({by}, le) (rate({hist}_bucket[{RATE}])))"


# (title, unit, [(legend, expr), ...]); each row of the list is one panel.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Tasks per second",
        "reqps",
        [
            (
                "{{workflow}} {{outcome}}",
                f"sum by (workflow, outcome) (rate(baton_tasks_total[{RATE}]))",
            ),
        ],
    ),
    (
        "Steps per second (and in flight)",
        "short",
        [
            (
                "{{workflow}}/{{agent}}",
                f"sum by (workflow, agent) (rate(baton_step_latency_seconds_count[{RATE}]))",
            ),
            ("in flight", "sum(baton_steps_in_flight)"),
        ],
    ),
    (
        "Task latency percentiles",
        "s",
        [
            ("p50 {{workflow}}", q("baton_task_latency_seconds", 0.5, "workflow")),
            ("p95 {{workflow}}", q("baton_task_latency_seconds", 0.95, "workflow")),
            ("p99 {{workflow}}", q("baton_task_latency_seconds", 0.99, "workflow")),
        ],
    ),
    (
        "Step latency p95 per agent",
        "s",
        [
            ("{{workflow}}/{{agent}}", q("baton_step_latency_seconds", 0.95, "workflow, agent")),
        ],
    ),
    (
        "Time to first token / queue wait (p95)",
        "s",
        [
            ("TTFT p50 {{pool}}", q("baton_worker_ttft_seconds", 0.5, "pool")),
            ("TTFT p95 {{pool}}", q("baton_worker_ttft_seconds", 0.95, "pool")),
            ("queue wait p95 {{pool}}", q("baton_worker_queue_wait_seconds", 0.95, "pool")),
            ("job latency p95 {{pool}}", q("baton_worker_job_latency_seconds", 0.95, "pool")),
        ],
    ),
    (
        "Backlog per consumer",
        "short",
        [
            (
                "{{stream}}/{{consumer}}",
                "sum by (stream, consumer) (baton_consumer_pending_messages)",
            ),
        ],
    ),
    (
        "Workers ready / jobs in flight",
        "short",
        [
            ("ready {{pool}}", "sum by (pool) (baton_worker_ready)"),
            ("in flight {{pool}}", "sum by (pool) (baton_worker_inflight_jobs)"),
        ],
    ),
    (
        "KV cache usage",
        "percentunit",
        [
            ("{{pool}}/{{worker}}", "max by (pool, worker) (baton_worker_kv_usage_ratio)"),
        ],
    ),
    (
        "Prefix-cache hit rate",
        "percentunit",
        [
            (
                "{{pool}}",
                f"sum by (pool) (rate(baton_worker_prefix_cache_hits_total[{RATE}]))"
                f" / sum by (pool) (rate(baton_worker_prefix_cache_queries_total[{RATE}]))",
            ),
        ],
    ),
    (
        "OOMs, engine restarts, preemptions (per 5m)",
        "short",
        [
            ("OOM {{pool}}", "sum by (pool) (increase(baton_worker_oom_total[5m]))"),
            (
                "restarts {{pool}}",
                "sum by (pool) (increase(baton_worker_engine_restarts_total[5m]))",
            ),
            (
                "preemptions {{pool}}",
                "sum by (pool) (increase(baton_worker_preemptions_total[5m]))",
            ),
        ],
    ),
    (
        "Tokens per second per workflow",
        "short",
        [
            (
                "{{workflow}} {{kind}}",
                f"sum by (workflow, kind) (rate(baton_tokens_total[{RATE}]))",
            ),
        ],
    ),
    (
        "Cost (USD/h) and GPU-seconds/s per workflow",
        "short",
        [
            (
                "USD/h {{workflow}}",
                f"3600 * sum by (workflow) (rate(baton_cost_usd_total[{RATE}]))",
            ),
            ("GPU-s/s {{workflow}}", f"sum by (workflow) (rate(baton_gpu_seconds_total[{RATE}]))"),
        ],
    ),
    (
        "Dead letters and budget stops (per 5m)",
        "short",
        [
            (
                "dead letters {{consumer}}",
                "sum by (consumer) (increase(baton_dead_letters_total[5m]))",
            ),
            (
                "budget stops {{workflow}}",
                "sum by (workflow) (increase(baton_budget_stops_total[5m]))",
            ),
        ],
    ),
    (
        "GPU memory used",
        "bytes",
        [
            ("{{worker}} gpu{{gpu}}", "max by (worker, gpu) (baton_worker_gpu_memory_used_bytes)"),
            (
                "{{worker}} gpu{{gpu}} free",
                "min by (worker, gpu) (baton_worker_gpu_memory_free_bytes)",
            ),
        ],
    ),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
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
        "templating": {"list": []},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
