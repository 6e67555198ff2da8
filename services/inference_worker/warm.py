"""A pre-warm job (``InferenceJob.warm``): prefill a step that has not
started yet, so that its prefix (its agent's system prompt and the session's
window) is in this worker's prefix cache when its job arrives.

Best effort, never in the way: it runs only when it is admitted at once (a
worker with jobs waiting for room skips it), generates one token and throws
it away — no answer appended, no result published, no token deltas — and
whatever goes wrong is counted and dropped (the delivery is acked: a warm is
never retried). The session is listed warm in the heartbeats after it.
"""

from __future__ import annotations

import structlog

from baton import context_client as context
from baton.bus import Bus
from proto import context_api as ctxapi
from proto import keys
from proto.messages import InferenceJob, WindowRequest

from . import metrics as m
from .engines.base import GenerationRequest, with_system
from .engines.toolcalls import tools_in_use
from .heartbeat import WarmSessions
from .supervisor import EngineSupervisor

log = structlog.get_logger("inference_worker")


async def prewarm(sup: EngineSupervisor, bus: Bus, warm: WarmSessions, job: InferenceJob) -> str:
    """Run the warm ``job``; its outcome (``metrics.WARM_OUTCOMES``)."""
    outcome = "failed"
    try:
        outcome = await _prewarm(sup, bus, warm, job)
    except Exception as exc:  # a warm that fails costs nothing but itself
        log.info("prewarm_failed", step=job.step, error=repr(exc))
    m.WARMS.labels(sup.s.pool, outcome).inc()
    return outcome


async def _prewarm(sup: EngineSupervisor, bus: Bus, warm: WarmSessions, job: InferenceJob) -> str:
    engine, admission = sup.engine, sup.admission
    if not sup.ok.is_set():
        return "busy"
    cap = engine.capacity()
    room = cap.max_model_len - job.max_tokens
    budget = max(1, min(job.context_budget or sup.s.context_budget or room, room))
    request = WindowRequest(tenant=job.tenant, ref=job.ref, budget_tokens=budget)
    window = await context.call(bus, ctxapi.WINDOW, request, task_id=job.task_id)
    if window.error is not None:
        return "failed"
    tools = tools_in_use(job.tools, job.tool_choice)
    messages = with_system(window.messages, job.system)
    need = engine.count_prompt_tokens(messages, tools) + job.max_tokens
    if need > cap.max_model_len or not admission.fits(need):
        return "busy"  # real jobs come first: a warm never waits for room
    await admission.acquire(need, job.tenant)
    request_id = keys.generation(job.job_id, 1)
    try:
        gen = GenerationRequest(request_id=request_id, messages=messages, max_tokens=1,
                                temperature=0.0, tools=tuple(job.tools),
                                tool_choice=job.tool_choice)  # fmt: skip
        async for _ in engine.generate(gen):
            pass
    finally:
        await admission.release(need, job.tenant)
    warm.touch(f"{job.tenant}.{job.session}")
    log.info("prewarmed", step=job.step, prompt_tokens=need - job.max_tokens)
    return "warmed"
