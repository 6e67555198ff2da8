"""The context store's Prometheus metrics (names in deploy/metrics.txt)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CONTEXT_REQUESTS = Counter(
    "baton_context_requests",
    "Context store requests, by operation and outcome (ok or an error code).",
    ["op", "outcome"],
)
CONTEXT_REQUEST_SECONDS = Histogram(
    "baton_context_request_seconds",
    "Context store request latency, from its arrival to the reply.",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
