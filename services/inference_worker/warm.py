"""A pre-warm job (``InferenceJob.warm``): prefill a step that has not
started yet, so that its prefix (its agent's system prompt and the session's
window) is in this worker's prefix cache when its job arrives.

Best effort, never in the way: it runs only when it is admitted at once (a
worker with jobs waiting for room skips it), generates one token and throws
it away — no answer appended, no token deltas — and whatever goes wrong is
counted and dropped (the delivery is acked: a warm is never retried). The
session is listed warm in the heartbeats after it.

Its engine time is not free: the worker's ``GpuClock`` counts it beside the
jobs generating then (so they are charged their share only), and a warm
that ran publishes its GPU-seconds as a result marked ``warm``, which the
orchestrator adds to the run's usage and cost (``transitions.warmed``). A
warm that failed is not charged.
"""

from __future__ import annotations

import structlog

from baton import context_client as context
from baton.bus import Bus
from proto import context_api as ctxapi
from proto import keys, subjects
from proto.messages import InferenceJob, InferenceResult, Usage, WindowRequest

from . import metrics as m
from .engines.base import GenerationRequest, with_system
from .engines.toolcalls import tools_in_use
from .gpuclock import GpuClock
from .heartbeat import WarmSessions
from .supervisor import EngineSupervisor

log = structlog.get_logger("inference_worker")


async def prewarm(
    sup: EngineSupervisor, bus: Bus, warm: WarmSessions, job: InferenceJob, clock: GpuClock
) -> str:
    """Run the warm ``job``; its outcome (``metrics.WARM_OUTCOMES``)."""
    outcome = "failed"
    try:
        outcome = await _prewarm(sup, bus, warm, job, clock)
    except Exception as exc:  # a warm that fails costs nothing but itself
        log.info("prewarm_failed", step=job.step, error=repr(exc))
    m.WARMS.labels(sup.s.pool, outcome).inc()
    return outcome


async def _prewarm(
    sup: EngineSupervisor, bus: Bus, warm: WarmSessions, job: InferenceJob, clock: GpuClock
) -> str:
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
    clock.start(request_id)
    try:
        gen = GenerationRequest(request_id=request_id, messages=messages, max_tokens=1,
                                temperature=0.0, tools=tuple(job.tools),
                                tool_choice=job.tool_choice)  # fmt: skip
        async for _ in engine.generate(gen):
            pass
    finally:
        gpu_seconds = clock.stop(request_id)
        await admission.release(need, job.tenant)
    warm.touch(f"{job.tenant}.{job.session}")
    log.info("prewarmed", step=job.step, prompt_tokens=need - job.max_tokens,
             gpu_seconds=round(gpu_seconds, 6))  # fmt: skip
    await _charge(sup, bus, job, gpu_seconds)
    return "warmed"


async def _charge(sup: EngineSupervisor, bus: Bus, job: InferenceJob, gpu_seconds: float) -> None:
    """Tell the orchestrator what the warm cost (best effort, deduplicated
    by the warm's result id)."""
    charge = InferenceResult(job_id=job.job_id, task_id=job.task_id, tenant=job.tenant,
                             session=job.session, step=job.step, worker=sup.s.worker_id,
                             usage=Usage(gpu_seconds=round(gpu_seconds, 6)), warm=True,
                             pool=sup.s.pool)  # fmt: skip
    try:
        await bus.publish(subjects.result(job.tenant, job.task_id), charge,
                          msg_id=keys.result(job.job_id, job.attempt),
                          task_id=job.task_id)  # fmt: skip
    except Exception as exc:
        log.warning("prewarm_charge_not_sent", step=job.step, error=repr(exc))
