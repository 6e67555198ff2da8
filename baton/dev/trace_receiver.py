"""A small OTLP/HTTP trace receiver for the tests and benchmarks: a real
HTTP server on 127.0.0.1 that takes ``POST /v1/traces`` as a collector
does (``ExportTraceServiceRequest`` in protobuf, gzip or not) and keeps
what the services exported, decoded with ``opentelemetry-proto``.

Not a collector: one process, in memory, for a test's or a benchmark's
length (``keep=False`` only counts spans, for a benchmark's long runs).
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, as the receiver decoded it (ids in hex)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # '' for a root
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # UNSET, OK, ERROR
    links: tuple[str, ...] = ()  # span ids


@dataclass
class TraceReceiver:
    """``with TraceReceiver() as r:`` point ``OTEL_EXPORTER_OTLP_ENDPOINT``
    at ``r.endpoint``; ``r.spans`` holds what arrived."""

    keep: bool = True
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    count: int = 0  # spans received, kept or not
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> TraceReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._take(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _take(self, req: ExportTraceServiceRequest) -> None:
        got: list[ReceivedSpan] = []
        n = 0
        for rs in req.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                n += len(ss.spans)
                if not self.keep:
                    continue
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        service=str(res.get("service.name", "")), name=s.name,
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), kind=KINDS.get(s.kind, "?"),
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status={0: "UNSET", 1: "OK", 2: "ERROR"}.get(s.status.code, "?"),
                        links=tuple(link.span_id.hex() for link in s.links),
                    ))  # fmt: skip
        with self._lock:
            self.requests += 1
            self.count += n
            self.spans.extend(got)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, name: str, timeout: float = 30.0) -> list[ReceivedSpan]:
        """The trace's spans once one named ``name`` arrived (the task's root
        is emitted last), and a little longer for stragglers."""
        deadline = time.monotonic() + timeout
        while not any(s.name == name for s in self.trace(trace_id)):
            if time.monotonic() > deadline:
                names = sorted({s.name for s in self.trace(trace_id)})
                raise TimeoutError(
                    f"no span {name!r} in trace {trace_id} within {timeout}s; got {names}"
                )
            time.sleep(0.1)
        time.sleep(1.0)  # other services' batches of the same trace
        return self.trace(trace_id)


def tree(spans: list[ReceivedSpan]) -> str:
    """The spans as an indented tree (name [service]), children by start time."""
    by_parent: dict[str, list[ReceivedSpan]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_ns):
        by_parent.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in by_parent.get(parent, []):
            ms = (s.end_ns - s.start_ns) / 1e6
            err = " ERROR" if s.status == "ERROR" else ""
            lines.append(f"{'  ' * depth}{s.name} [{s.service}] {ms:.1f} ms{err}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)
