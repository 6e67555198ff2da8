"""Prometheus for every service: the bus's own metric families, HTTP metrics
and ``/metrics``. The families here are shared code's, so they are created
unregistered and join a process's ``/metrics`` once it uses them
(``register``); each service exports only its own (docs/architecture.md,
"Observability"; ``deploy/metrics.txt``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics

disable_created_metrics()

MESSAGES_HANDLED = Counter(
    "baton_messages_handled",
    "JetStream messages settled by a consumer, by outcome (ack, nak, term).",
    ["consumer", "outcome"],
    registry=None,
)
DEAD_LETTERS = Counter(
    "baton_dead_letters",
    "Messages terminated as poison or after their last delivery.",
    ["consumer"],
    registry=None,
)
UNDECODABLE = Counter(
    "baton_undecodable_messages",
    "Core NATS messages a typed subscription could not decode (dropped), by subscription.",
    ["subscription"],
    registry=None,
)
PERMISSION_VIOLATIONS = Counter(
    "baton_nats_permission_violations",
    "Publishes or subscriptions the NATS server refused this service (its permissions).",
    ["service"],
    registry=None,
)

_registered: set[Collector] = set()


def register(*families: Collector) -> None:
    """Export these families on this process's ``/metrics`` (once each)."""
    for family in families:
        if family not in _registered:
            REGISTRY.register(family)
            _registered.add(family)


HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@functools.cache
def _http_instrumentations() -> tuple[Callable[[http_metrics.Info], None], ...]:
    """The HTTP metric families, created once per process (a second app of
    the same process shares them: prometheus_client refuses a name twice)."""
    requests = http_metrics.requests(metric_namespace="baton")
    latency = http_metrics.latency(
        metric_namespace="baton",
        should_include_status=False,
        buckets=HTTP_LATENCY_BUCKETS,
    )
    return tuple(f for f in (requests, latency) if f is not None)


def mount_metrics(app: FastAPI) -> None:
    """HTTP metrics on ``app`` (prometheus-fastapi-instrumentator:
    ``baton_http_requests_total{handler,method,status}`` and
    ``baton_http_request_duration_seconds{handler,method}``, by route
    template, status classes like ``2xx``, a streamed answer timed to its
    start), and this process's registry at ``/metrics``."""
    instrumentator = Instrumentator(
        excluded_handlers=["/metrics"], should_exclude_streaming_duration=True
    )
    instrumentator.add(*_http_instrumentations()).instrument(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
