"""The worker's span names: a step's chat is ``chat <model>``, a pre-warm of
a step to come is ``prewarm <model>`` (so a trace's chats of a step are only
that step's generations, whenever a warm for it happens to run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from baton import tracing
from proto.messages import ContextRef, InferenceJob
from services.inference_worker import spans
from services.inference_worker.settings import WorkerSettings


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_provider", provider)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def _job(*, warm: bool) -> InferenceJob:
    ref = ContextRef(tenant="acme", session="s1", version=1, sig=b"x")
    return InferenceJob(job_id="acme.t1.r1.coding", task_id="t1", tenant="acme", session="s1",
                        workflow="research", step="r1.coding", agent="coding", max_tokens=8,
                        ref=ref, warm=warm)  # fmt: skip


def test_a_warm_is_a_prewarm_span_and_a_step_a_chat(exported: InMemorySpanExporter) -> None:
    s = WorkerSettings(engine="sim")
    for warm in (True, False):
        with spans.chat(_job(warm=warm), s):
            pass
    warm_span, chat_span = exported.get_finished_spans()
    assert warm_span.name == "prewarm sim"
    assert warm_span.attributes is not None and warm_span.attributes["baton.warm"] is True
    assert warm_span.attributes["baton.step"] == "r1.coding"
    assert chat_span.name == "chat sim"
    assert chat_span.attributes is not None and "baton.warm" not in chat_span.attributes
