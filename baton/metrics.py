"""Prometheus helpers and the metrics every service shares.

Service-specific metrics live in each service's own ``metrics.py``; the names
are catalogued in ``deploy/metrics.txt`` and a test checks they are exported.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

MESSAGES_HANDLED = Counter(
    "baton_messages_handled",
    "JetStream messages settled by a consumer, by outcome (ack, nak, term).",
    ["consumer", "outcome"],
)
DEAD_LETTERS = Counter(
    "baton_dead_letters",
    "Messages terminated as poison or after their last delivery.",
    ["consumer"],
)
PERMISSION_VIOLATIONS = Counter(
    "baton_nats_permission_violations",
    "Publishes or subscriptions the NATS server refused this service (its permissions).",
    ["service"],
)
CONTEXT_REQUESTS = Counter(
    "baton_context_requests",
    "Context store requests, by operation and outcome (ok or an error code).",
    ["op", "outcome"],
)
CONTEXT_REQUEST_SECONDS = Histogram(
    "baton_context_request_seconds",
    "Context store request latency as seen by the caller.",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


def mount_metrics(app: FastAPI) -> None:
    """Serve the default registry at ``/metrics``."""

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
