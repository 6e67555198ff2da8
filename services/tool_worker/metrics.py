"""The tool worker's Prometheus metrics (names in deploy/metrics.txt)."""

from __future__ import annotations

from functools import partial

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = ("ok", "reused", "unknown_tool", "bad_tool_arguments", "tool_failed",
            "tool_timeout", "tool_output_too_large", "cancelled")  # fmt: skip

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
_timing = partial(Histogram, buckets=_SECONDS)  # a histogram of seconds

CALLS = Counter("baton_tool_calls", "Tool calls by tool and outcome.", ["tool", "outcome"])
SECONDS = _timing(
    "baton_tool_seconds", "Wall time of a tool call (the tool alone, not the bus).", ["tool"]
)
QUEUE_WAIT = _timing(
    "baton_tool_queue_wait_seconds", "From a tool call's dispatch to a worker taking it.", ["pool"]
)
CPU_SECONDS = Counter("baton_tool_cpu_seconds", "CPU seconds spent by sandboxed tools.", ["tool"])
INFLIGHT = Gauge("baton_tool_inflight_calls", "Tool calls running now.", ["pool", "worker"])
READY = Gauge("baton_tool_worker_ready", "1 when the tool worker serves calls.", ["pool", "worker"])


def init_series(tools: list[str], pool: str, worker: str) -> None:
    """Every series exists from start-up, so the first call is an increase."""
    for tool in tools:
        SECONDS.labels(tool)
        CPU_SECONDS.labels(tool)
        for outcome in OUTCOMES:
            CALLS.labels(tool, outcome)
    QUEUE_WAIT.labels(pool)
    INFLIGHT.labels(pool, worker).set(0)
    READY.labels(pool, worker).set(0)
