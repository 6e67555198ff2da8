"""OpenTelemetry tracing: W3C trace context in NATS headers, spans over OTLP.

``baton.bus`` stamps each outgoing message (``inject``) and runs each handler
in its message's context (``continued``, binding ``trace_id`` in the log
context); services open spans with ``span``, the orchestrator records a
durable task's spans afterwards (``record``). Off by default: ``setup``
installs the SDK only when an exporter is configured, and off, nothing of the
SDK is imported. The variables and why: docs/tracing.md."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

HDR_TRACEPARENT = "traceparent"
_SCOPE = "baton"
_W3C = TraceContextTextMapPropagator()
_TRUE = ("true", "1", "yes", "on")

_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()
# Ids a recorded span is given (``record``): (trace id, span id).
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "baton_forced_ids", default=None
)


class TracingConfigError(ValueError):
    """The ``OTEL_*`` variables ask for something Baton cannot export with."""


def enabled() -> bool:
    """True when spans are recorded and exported (``setup`` installed the SDK)."""
    return _provider is not None


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The exporters the ``OTEL_*`` variables ask for; empty: tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw:
        names = [n.strip() for n in raw.split(",") if n.strip()]
        return [] if "none" in names else names
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={name!r} is not supported (otlp, console or none)"
        )
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    raise TracingConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported (http/protobuf or grpc)"
    )


def _id_generator() -> Any:
    """The SDK's random ids, except while ``record`` gives a span its own."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Ids(RandomIdGenerator):
        def generate_span_id(self) -> int:
            forced = _forced.get()
            return forced[1] if forced is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced.get()
            return forced[0] if forced is not None else super().generate_trace_id()

    return Ids()  # is_trace_id_random: a forced id is a hash of unique ids, as uniform


def setup(service: str) -> bool:
    """Install the SDK's tracer provider for ``service`` when the process's
    ``OTEL_*`` variables configure an exporter; True when it did.
    ``OTEL_SERVICE_NAME`` overrides ``baton-<service>``.

    Raises:
        TracingConfigError: an exporter or protocol Baton does not have.
    """
    global _provider, _tracer
    env = os.environ  # the SDK reads the rest (endpoint, headers...) from there too
    names = exporter_names(env)
    if not names:
        return False
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter(n, env) for n in names]
    # Baton's names, then whatever OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    # say over them (Resource.create alone would let its argument win).
    defaults = {"service.name": f"baton-{service}", "service.namespace": "baton"}
    resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
    # No sampler given: the SDK reads OTEL_TRACES_SAMPLER and its argument.
    provider = TracerProvider(resource=resource, id_generator=_id_generator())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider, _tracer = provider, provider.get_tracer(_SCOPE)
    return True


def shutdown(timeout: float = 3.0) -> None:
    """Export what is buffered (waiting at most ``timeout`` seconds for an
    unreachable collector) and stop: a service's last act."""
    global _provider, _tracer
    if _provider is not None:
        _provider.force_flush(int(timeout * 1000))
        _provider.shutdown()
    _provider, _tracer = None, trace.NoOpTracer()


# -- context across NATS -----------------------------------------------------


def inject(headers: dict[str, str]) -> None:
    """Stamp the current trace context on an outgoing message's headers."""
    propagate.inject(headers)


@contextlib.contextmanager
def continued(headers: Mapping[str, str] | None) -> Iterator[SpanContext | None]:
    """Run the block in the trace context an incoming message (or HTTP
    request) carries, with its ``trace_id`` bound in the log context; yields
    that context (None when it carried none, and the block runs in none)."""
    if not headers or HDR_TRACEPARENT not in headers:
        token = otel_context.attach(otel_context.Context())
        try:
            yield None
        finally:
            otel_context.detach(token)
        return
    ctx = propagate.extract(headers)
    parent = trace.get_current_span(ctx).get_span_context()
    token = otel_context.attach(ctx)
    try:
        if parent.is_valid:
            with structlog.contextvars.bound_contextvars(trace_id=trace_id_of(parent)):
                yield parent
        else:
            yield None
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def within(sc: SpanContext | None) -> Iterator[None]:
    """Run the block (messages it sends) in the context of span ``sc``, a
    span another process records or recorded; None: as it is."""
    if sc is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(sc)))
    try:
        yield
    finally:
        otel_context.detach(token)


def current() -> SpanContext | None:
    """The current span's context (None when there is no valid one)."""
    sc = trace.get_current_span().get_span_context()
    return sc if sc.is_valid else None


def trace_id_of(sc: SpanContext | None) -> str | None:
    """The trace id as logs carry it (32 hex digits)."""
    return f"{sc.trace_id:032x}" if sc is not None else None


def traceparent(sc: SpanContext | None) -> str:
    """``sc`` as a W3C ``traceparent`` value ('' for None), to keep it durably."""
    if sc is None:
        return ""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(NonRecordingSpan(sc)))
    return carrier.get(HDR_TRACEPARENT, "")


def remote(value: str) -> SpanContext | None:
    """The span context a kept ``traceparent`` value names (None when unusable)."""
    if not value:
        return None
    sc = trace.get_current_span(_W3C.extract({HDR_TRACEPARENT: value})).get_span_context()
    return sc if sc.is_valid else None


def span_context(trace_id: int, span_id: int, *, sampled: bool) -> SpanContext:
    """The context of a span recorded elsewhere (or later), to parent spans on."""
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def derived_id(*parts: str, bits: int = 64) -> int:
    """A span (64 bits) or trace (128 bits) id derived from ``parts``: the
    same parts give the same id in every process, so spans of a durable task
    can point at parents that another replica emits later."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=bits // 8).digest()
    return int.from_bytes(digest, "big") or 1


def root_sampled(trace_id: int, parent: SpanContext | None, name: str) -> bool:
    """Whether the configured sampler keeps a span ``name`` starting a
    trace's Baton part (under ``parent``, a caller's span, if any). Off:
    the parent's flag passes through."""
    if _provider is None:
        return parent is not None and parent.trace_flags.sampled
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
    result = _provider.sampler.should_sample(ctx, trace_id, name)
    return bool(result.decision.is_sampled())


# -- spans -------------------------------------------------------------------


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    parent: SpanContext | None = None,
    links: Sequence[SpanContext] = (),
    layer: str | None = None,
    benign: tuple[type[BaseException], ...] = (),
) -> Iterator[trace.Span]:
    """A span around the block, as a child of ``parent`` (default: the
    current context), current inside it. An exception escaping the block
    marks it ERROR with ``error.type`` (and ``baton.layer``: ``layer``),
    unless it is ``benign`` (flow control, e.g. a nak to retry later: noted
    as ``baton.outcome``). Off: the block runs as is (the yielded span
    records nothing)."""
    if _provider is None:
        yield INVALID_SPAN
        return
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    s = _tracer.start_span(name, context=ctx, kind=kind, attributes=attributes,
                           links=[Link(sc) for sc in links],
                           record_exception=False, set_status_on_exception=False)  # fmt: skip
    try:
        with trace.use_span(
            s, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield s
    except benign as exc:
        s.set_attribute("baton.outcome", type(exc).__name__.lower())
        raise
    except BaseException as exc:
        fail(s, type(exc).__name__, str(exc), layer)
        raise
    finally:
        s.end()


@contextlib.contextmanager
def server_span(method: str, route: str, headers: Mapping[str, str]) -> Iterator[None]:
    """An HTTP request's ``<method> <route>`` span, continuing the trace its
    ``traceparent`` header names (messages sent inside carry it on)."""
    attrs = {"http.request.method": method, "http.route": route}
    with continued(headers), span(f"{method} {route}", kind=SpanKind.SERVER, attributes=attrs):
        yield


def fail(s: trace.Span, error_type: str, message: str, layer: str | None = None) -> None:
    """Mark ``s`` as failed: status ERROR, ``error.type`` and ``baton.layer``."""
    if not s.is_recording():
        return
    s.set_status(Status(StatusCode.ERROR, message[:200]))
    s.set_attribute("error.type", error_type)
    if layer:
        s.set_attribute("baton.layer", layer)


def set_attributes(
    attributes: Mapping[str, Any], error: tuple[str, str, str] | None = None
) -> None:
    """Add ``attributes`` to the current span, and mark it failed with
    ``error`` = (``error.type``, message, ``baton.layer``) (nothing when off)."""
    if _provider is not None:
        s = trace.get_current_span()
        if s.is_recording():
            s.set_attributes(attributes)
            if error is not None:
                fail(s, *error)


@dataclass(frozen=True, slots=True)
class Recorded:
    """A span that already happened, to be emitted with its own ids and times."""

    name: str
    context: SpanContext  # its trace id, span id and sampled flag
    parent: SpanContext | None
    start: float  # epoch seconds
    end: float
    attributes: Mapping[str, Any]
    kind: SpanKind = SpanKind.INTERNAL
    error: tuple[str, str, str] | None = None  # (error.type, message, baton.layer)


def record(spans: Sequence[Recorded]) -> None:
    """Emit spans whose ids and times were decided elsewhere (the parts of a
    durable task, which may start in one process and end in another)."""
    if _provider is None:
        return
    for r in spans:
        if not r.context.trace_flags.sampled:
            continue
        if r.parent is not None:
            ctx = trace.set_span_in_context(NonRecordingSpan(r.parent))
        else:
            ctx = otel_context.Context()  # a root: not a child of the current span
        token = _forced.set((r.context.trace_id, r.context.span_id))
        try:
            s = _tracer.start_span(r.name, context=ctx, kind=r.kind, attributes=r.attributes,
                                   start_time=int(r.start * 1e9))  # fmt: skip
        finally:
            _forced.reset(token)
        if r.error is not None:
            fail(s, *r.error)
        s.end(end_time=int(max(r.start, r.end) * 1e9))
