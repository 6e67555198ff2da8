"""One job, from delivery to result.

1. resolve the job's signed ref into a token-budgeted window (context store);
   if the answer is already stored (a redelivery), republish it instead;
2. wait for admission (KV tokens + sequence slot), then stream the generation;
3. ask the context store to append the answer under ``keys.answer(job_id)``
   (idempotent) and publish the result under ``keys.result(job_id, attempt)``
   (de-duplicated by JetStream): one request, acked by JetStream itself.

An engine fault naks the job (the supervisor restarts the engine); a
cancelled task's generation is aborted and answered with ``cancelled``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from baton import context_client as context
from baton.bus import Bus, Delivery, Nak, Term
from baton.cancelled import CancelledTasks
from baton.stopwatch import Stopwatch
from proto import codec, keys, subjects
from proto import context_api as ctxapi
from proto.errors import ErrorCode
from proto.messages import (
    Cancel,
    ChatMessage,
    ContextAnswer,
    ErrorInfo,
    InferenceJob,
    InferenceResult,
    ToolCall,
    Usage,
    WindowRequest,
)

from . import metrics as m
from . import spans
from .attempts import Attempts
from .deltas import TokenPublisher, TokenSink
from .engines.base import EngineDead, EngineOOM, GenerationRequest, PromptTooLong, with_system
from .engines.toolcalls import tools_in_use
from .gpuclock import GpuClock
from .heartbeat import Speeds, WarmSessions
from .supervisor import EngineSupervisor, Flight
from .warm import prewarm

log = structlog.get_logger("inference_worker")

WINDOW_ATTEMPTS = 4


@dataclass
class _Generated:
    output: str
    usage: Usage
    cached_tokens: int
    started: float
    tool_calls: list[ToolCall]
    tokens: TokenSink  # still open: its final delta goes out with the answer


class JobHandler:
    """Handles deliveries of ``InferenceJob``; ``on_admitted`` is called once
    a job holds its admission (or will never need it)."""

    def __init__(
        self,
        sup: EngineSupervisor,
        bus: Bus,
        warm: WarmSessions,
        clock: GpuClock,
        tokens: TokenPublisher,
        speeds: Speeds | None = None,
    ) -> None:
        self.speeds = speeds or Speeds()
        self.sup = sup
        self.s = sup.s
        self.engine = sup.engine
        self.admission = sup.admission
        self.bus = bus
        self.warm = warm
        self.clock = clock
        self.tokens = tokens
        self.pool = sup.s.pool
        self.cancelled = CancelledTasks()
        self.attempts = Attempts()
        # job_id -> set when the dispatch of it running here ends: a later
        # dispatch of the same step waits, then finds the answer stored and
        # republishes it instead of generating it a second time.
        self._running: dict[str, asyncio.Event] = {}
        model = sup.s.model_name
        self._latency = (m.TTFT.labels(self.pool, model), m.ITL.labels(self.pool, model))

    async def handle(self, d: Delivery, on_admitted: Callable[[], None]) -> None:
        try:
            job = d.decode(InferenceJob)
        except codec.DecodeError as exc:
            on_admitted()
            raise Term(f"undecodable job: {exc}") from exc
        if not job.warm and not self.attempts.take(job.job_id, job.attempt):
            on_admitted()
            m.JOBS.labels(self.pool, "superseded").inc()
            log.info("job_superseded", task_id=job.task_id, job_id=job.job_id, attempt=job.attempt)
            return  # acked: a later dispatch of this step was taken here already
        admitted = [False]

        def admit() -> None:
            if not admitted[0]:
                admitted[0] = True
                on_admitted()

        mine = asyncio.Event()
        try:
            earlier = None if job.warm else self._running.get(job.job_id)
            if not job.warm:
                self._running[job.job_id] = mine
            if earlier is not None:  # the step timed out while its answer was on the way
                await earlier.wait()
            with (
                structlog.contextvars.bound_contextvars(task_id=job.task_id, job_id=job.job_id),
                spans.chat(job, self.s),
            ):
                await self._run(d, job, admit)
        finally:
            admit()
            mine.set()
            if self._running.get(job.job_id) is mine:
                del self._running[job.job_id]

    def _budget(self, job: InferenceJob) -> int:
        cap = self.engine.capacity()
        room = cap.max_model_len - job.max_tokens
        return min(job.context_budget or self.s.context_budget or room, room)

    async def _run(self, d: Delivery, job: InferenceJob, admit: Callable[[], None]) -> None:
        bus = self.bus
        if job.warm:  # prefill a step to come: nothing answered (warm.py)
            admit()
            if (job.tenant, job.task_id) not in self.cancelled:
                await prewarm(self.sup, bus, self.warm, job, self.clock)
            return
        watch = Stopwatch(job.published_at or d.published_at)
        if (job.tenant, job.task_id) in self.cancelled:
            await self._publish_error(job, ErrorCode.CANCELLED, "task was cancelled", watch)
            return
        out_id = keys.answer(job.job_id)
        cap = self.engine.capacity()
        budget = max(1, self._budget(job))
        tools = tools_in_use(job.tools, job.tool_choice)  # rendered into the prompt too
        for _ in range(WINDOW_ATTEMPTS):
            request = WindowRequest(tenant=job.tenant, ref=job.ref, budget_tokens=budget,
                                    done_msg_id=out_id)  # fmt: skip
            window = await context.call(bus, ctxapi.WINDOW, request, task_id=job.task_id)
            if window.error is not None:
                watch.lap("context")
                await self._publish(job, self._result(job, watch, error=window.error))
                return
            if window.existing is not None:  # answered before a crash: republish it
                existing = window.existing
                watch.lap("context")
                await self._publish(job, self._result(job, watch, ref=window.existing_ref,
                                                      output=existing.content,
                                                      tool_calls=existing.tool_calls))  # fmt: skip
                return
            messages = with_system(window.messages, job.system)
            prompt_tokens = self.engine.count_prompt_tokens(messages, tools)
            room = cap.max_model_len - job.max_tokens
            if prompt_tokens <= room or window.tokens <= 0:
                break
            # The store's token estimate ran short of this model's tokenizer,
            # or the offered tools took room: ask again for a window scaled to
            # the real count of its messages and to the room the tools leave
            # (they are a fixed cost: scaling the whole prompt would not do).
            bare = self.engine.count_prompt_tokens(messages) if tools else prompt_tokens
            left = room - (prompt_tokens - bare)
            budget = max(1, int(window.tokens * left / max(1, bare) * 0.95))
        need = prompt_tokens + job.max_tokens
        watch.lap("context")
        if need > cap.max_model_len:
            await self._too_long(job, prompt_tokens, cap.max_model_len, watch)
            return
        await self.sup.ok.wait()
        await self.admission.acquire(need, job.tenant)
        admit()
        watch.lap("admission")
        try:
            outcome = await self._generate(d, job, messages, watch)
        finally:
            await self.admission.release(need, job.tenant)
        if outcome is None:  # cancelled, or refused by the engine: result already sent
            return
        published = job.published_at or d.published_at
        result = self._result(job, watch, output=outcome.output, tool_calls=outcome.tool_calls,
                              usage=outcome.usage, cached_tokens=outcome.cached_tokens,
                              queue_seconds=max(0.0, outcome.started - published))  # fmt: skip
        # One request stores the answer, its last token delta and the result:
        # the store appends the answer and publishes the delta together, then
        # the result (its ref set) with this request's reply subject, so
        # JetStream's ack of the result is the reply (``ContextAnswer``).
        answering = ContextAnswer(
            tenant=job.tenant,
            answer=ChatMessage(
                role="assistant",
                content=outcome.output,
                name=job.agent,
                tool_calls=outcome.tool_calls,
            ),
            result=result,
            attempt=job.attempt,
            base=job.ref if job.ref.session == job.session else None,
            last_delta=await outcome.tokens.take_final(),
        )
        spans.answered(result)
        reply = await context.answer(bus, answering, task_id=job.task_id)
        if reply.error is not None and reply.error.code == ErrorCode.UNKNOWN_SESSION:
            raise Term("the session was erased while the answer was generated", dead_letter=False)
        if reply.error is not None:
            raise Nak(1.0, f"context append failed: {reply.error.code}")
        self.warm.touch(f"{job.tenant}.{job.session}")
        m.JOBS.labels(self.pool, "completed").inc()
        m.JOB_LATENCY.labels(self.pool).observe(time.time() - published)

    async def _generate(
        self, d: Delivery, job: InferenceJob, messages: list[ChatMessage], watch: Stopwatch
    ) -> _Generated | None:
        """Stream one generation. None when it ended with an error result
        already published (cancelled, too long); raises Nak on an engine fault.
        ``watch`` times prefill (to the first token) and decode."""
        sup, labels = self.sup, self.sup.labels
        request_id = keys.generation(job.job_id, d.num_delivered)
        flight = Flight(request_id, job.tenant, job.task_id, sup.epoch)
        sup.flights[request_id] = flight
        started = time.time()
        m.QUEUE_WAIT.labels(self.pool).observe(max(0.0, started - (job.published_at or started)))
        m.INFLIGHT.labels(*labels).set(len(sup.flights))
        m.ADMITTED_TOKENS.labels(*labels).set(self.admission.tokens)
        self.clock.start(request_id)
        parts: list[str] = []
        final = None
        ended = False
        tokens = self.tokens.open(job, attempt=f"{d.stream_seq}.{d.num_delivered}")
        ttft, itl = self._latency
        texts = 0  # chunks with text (vLLM hands over several tokens to a chunk)
        stream_end = 0.0
        try:
            request = GenerationRequest(
                request_id=request_id,
                messages=messages,
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                seed=job.seed,
                json_schema=job.response_schema,
                tools=tuple(job.tools),
                tool_choice=job.tool_choice,
            )
            async for chunk in self.engine.generate(request):
                if chunk.text:
                    if not texts:
                        ttft.observe(watch.first_token() - started)
                    texts += 1
                parts.append(chunk.text)
                tokens.add(chunk.text)
                if chunk.finished:
                    final = chunk
            ended = True  # the stream ran out without an error
        except (EngineOOM, EngineDead) as exc:
            await sup.fault(exc, flight.epoch)
            raise Nak(
                self.s.oom_retry_delay, f"engine fault: {type(exc).__name__}", backoff=True
            ) from exc
        except PromptTooLong as exc:
            await self._too_long(job, exc.prompt_tokens, exc.max_model_len, watch)
            return None
        finally:
            stream_end = watch.lap("decode" if texts else "prefill")
            # A generation whose answer will be stored keeps its sink open: the
            # last delta goes out with the answer (``_run``). Any other ends
            # its deltas here, without a final one.
            complete = final is not None and not flight.cancelled and flight.epoch == sup.epoch
            if not (complete and ended):
                await tokens.close(final=False)
            gpu_seconds = self.clock.stop(request_id)
            sup.flights.pop(request_id, None)
            m.INFLIGHT.labels(*labels).set(len(sup.flights))
        if flight.cancelled:
            await self._publish_error(job, ErrorCode.CANCELLED, "task was cancelled", watch)
            return None
        if flight.epoch != sup.epoch or final is None:
            m.JOBS.labels(self.pool, "nak").inc()
            raise Nak(
                self.s.oom_retry_delay, "generation interrupted by an engine restart", backoff=True
            )
        # One observation per generation keeps the token loop cheap; tokens,
        # not chunks, divide the decode time (the engine's count, if it has one).
        gaps = (final.completion_tokens or texts) - 1
        if texts and gaps > 0:
            itl.observe((stream_end - watch.first_token_at) / gaps)
        if texts:
            self.speeds.observe(
                final.prompt_tokens - final.cached_tokens,
                watch.first_token_at - started,
                final.completion_tokens - 1,
                stream_end - watch.first_token_at,
            )
        m.PROMPT_TOKENS.labels(self.pool).inc(final.prompt_tokens)
        m.COMPLETION_TOKENS.labels(self.pool).inc(final.completion_tokens)
        usage = Usage(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            gpu_seconds=round(gpu_seconds, 6),
        )
        return _Generated("".join(parts), usage, final.cached_tokens, started,
                        list(final.tool_calls or []), tokens)  # fmt: skip

    async def _too_long(
        self, job: InferenceJob, prompt_tokens: int, limit: int, watch: Stopwatch
    ) -> None:
        # The orchestrator moves the step to a pool of its agent's with a
        # longer context, if it has one (transitions._move).
        await self._publish_error(
            job,
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt of {prompt_tokens} tokens + max_tokens {job.max_tokens} "
            f"exceeds this worker's context length {limit}",
            watch,
        )

    # -- cancellation ------------------------------------------------------

    async def on_cancel(self, cancel: Cancel) -> None:
        key = (cancel.tenant, cancel.task_id)
        self.cancelled.add(*key)
        for f in list(self.sup.flights.values()):
            if (f.tenant, f.task_id) == key:
                f.cancelled = True
                await self.engine.abort(f.request_id)
                log.info("generation_aborted", task_id=f.task_id, request_id=f.request_id)

    # -- results -----------------------------------------------------------

    def _result(self, job: InferenceJob, watch: Stopwatch, **fields: Any) -> InferenceResult:
        """The job's result; the time since ``watch``'s last lap is ``record``."""
        watch.lap("record")
        return InferenceResult(job_id=job.job_id, task_id=job.task_id, tenant=job.tenant,
                               session=job.session, step=job.step, worker=self.s.worker_id,
                               timing=watch.timing(), **fields)  # fmt: skip

    async def _publish(self, job: InferenceJob, result: InferenceResult) -> None:
        spans.answered(result)
        await self.bus.publish(subjects.result(job.tenant, job.task_id), result,
                               msg_id=keys.result(job.job_id, job.attempt),
                               task_id=job.task_id)  # fmt: skip

    async def _publish_error(
        self, job: InferenceJob, code: ErrorCode, message: str, watch: Stopwatch
    ) -> None:
        m.JOBS.labels(self.pool, str(code)).inc()
        info = ErrorInfo.of(code, message)
        await self._publish(job, self._result(job, watch, error=info))
