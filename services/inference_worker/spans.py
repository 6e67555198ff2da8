"""The worker's ``chat <model>`` span (OpenTelemetry GenAI conventions): one
per delivery of a job, from its window request to its result, in the
context of the step's ``invoke_agent`` span the job was published in. A
pre-warm (a prefill for a step to come) is a ``prewarm <model>`` span
instead, under the span that decided it (the orchestrator's handling of the
step before): it is not the step's chat, and runs before the step exists."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from baton import tracing
from baton.tracing import SpanKind
from proto.messages import InferenceJob, InferenceResult

from .settings import WorkerSettings

# gen_ai.provider.name by engine: an OpenAI-compatible server is spoken to
# as OpenAI; in-process engines name themselves.
PROVIDERS = {"vllm": "vllm", "openai": "openai", "sim": "baton.sim"}


def chat(job: InferenceJob, s: WorkerSettings) -> AbstractContextManager[Any]:
    """The span of one delivery of ``job``. Its attributes are the GenAI
    conventions' and the step's; the task's (tenant, workflow) and the step's
    worker are on the task's and the step's spans (each attribute costs CPU
    on every span)."""
    if not tracing.enabled():  # off: not even the attributes are put together
        return contextlib.nullcontext()
    model = s.model_name
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDERS.get(s.engine, s.engine),
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.request.max_tokens": job.max_tokens,
        "gen_ai.request.temperature": job.temperature,
        "gen_ai.agent.name": job.agent,
        "gen_ai.conversation.id": job.session,
        "baton.task_id": job.task_id,
        "baton.step": job.step,
        "baton.attempt": job.attempt,
    }
    if job.seed is not None:
        attrs["gen_ai.request.seed"] = job.seed
    if job.warm:
        attrs["baton.warm"] = True
    # In-process engines run the model here; the openai engine calls a server.
    kind = SpanKind.CLIENT if s.engine == "openai" else SpanKind.INTERNAL
    name = f"prewarm {model}" if job.warm else f"chat {model}"
    return tracing.span(name, kind=kind, attributes=attrs, layer="inference")


def answered(result: InferenceResult) -> None:
    """What the job produced, on its ``chat`` span."""
    if not tracing.enabled():
        return
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": result.usage.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": result.cached_tokens,
        "baton.gpu_seconds": result.usage.gpu_seconds,
        "baton.queue_seconds": result.queue_seconds,
    }
    if result.tool_calls:
        attrs["baton.tool_calls"] = len(result.tool_calls)
    err = result.error
    tracing.set_attributes(
        attrs, (str(err.code), err.message, str(err.layer)) if err is not None else None
    )
