"""The inference worker: pull jobs while there is KV headroom, run them
concurrently on the engine, append each answer to the context store and
publish a small result.

Per job (``baton.jobs.<pool>``):
1. resolve the job's signed ref into a token-budgeted window (context store);
   if the answer is already stored (a redelivery), republish it instead;
2. wait for admission (KV tokens + sequence slot), then stream the generation;
3. append the answer under ``<job_id>:out`` (idempotent) and publish the
   result under ``<job_id>:result`` (de-duplicated by JetStream).

Faults: an OOM or a dead engine naks every in-flight job with a delay,
marks the worker not ready, restarts the engine and counts it. SIGTERM drains:
no new pulls, in-flight jobs finish within the grace period or are naked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from baton.service import Health
from baton.transport import Bus, Delivery, Nak, Term
from proto import codec, subjects
from proto.errors import LAYER_OF, ErrorCode
from proto.messages import (
    Cancel,
    ChatMessage,
    ContextAppend,
    ContextAppendReply,
    ErrorInfo,
    Heartbeat,
    InferenceJob,
    InferenceResult,
    Usage,
    WindowReply,
    WindowRequest,
)
from proto.streams import JOBS, RESULTS, TOKENS, ConsumerSpec, direct_consumer, worker_consumer

from . import metrics as m
from .admission import Admission
from .engines.base import Engine, EngineDead, EngineOOM, GenerationRequest, PromptTooLong
from .gpu import GpuMonitor
from .gpuclock import GpuClock
from .rescue import Peers, Rescuer, never
from .settings import WorkerSettings
from .tokens import TokenPublisher

log = structlog.get_logger("inference_worker")


@dataclass
class _Flight:
    """One admitted generation."""

    request_id: str
    tenant: str
    task_id: str
    epoch: int
    cancelled: bool = False


@dataclass
class _Outcome:
    output: str = ""
    usage: Usage = field(default_factory=Usage)
    cached_tokens: int = 0
    started: float = 0.0


def _with_system(messages: list[ChatMessage], system: str | None) -> list[ChatMessage]:
    """The agent's own system prompt in place of the session's first one."""
    if system is None:
        return messages
    rest = messages[1:] if messages and messages[0].role == "system" else messages
    return [ChatMessage(role="system", content=system), *rest]


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        health: Health,
        *,
        manage_engine: bool = True,
    ) -> None:
        """``manage_engine=False``: the engine is already started and outlives
        the worker (tests share one vLLM engine this way); faults still restart it."""
        self.s = settings
        self.engine = engine
        self.manage_engine = manage_engine
        self.health = health
        self.pool = settings.pool
        self.consumer = worker_consumer(settings.pool, settings.job_ack_wait)
        self.direct = direct_consumer(settings.pool, settings.worker_id, settings.job_ack_wait)
        self.peers = Peers(settings.worker_id, stale_after=settings.peer_stale_after)
        self.rescue = Rescuer(self)
        self.admission = Admission(1, 1)
        self.clock = GpuClock()
        self.gpu: GpuMonitor | None = None
        self.flights: dict[str, _Flight] = {}
        self.cancelled: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.warm: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()  # one per delivery not yet settled
        self.waiting = 0  # of those, not yet admitted
        self.epoch = 0
        self._engine_ok = asyncio.Event()
        self._restart_lock = asyncio.Lock()
        self._labels = (self.pool, settings.worker_id)
        self.bus: Bus | None = None
        self.tokens = TokenPublisher(settings.token_interval)

    # -- lifecycle ---------------------------------------------------------

    async def start_engine(self, *, load: bool = True) -> None:
        t0 = time.monotonic()
        if load:
            await self.engine.start()
        cap = self.engine.capacity()
        self.admission.resize(cap.kv_tokens, cap.max_num_seqs, self.s.kv_headroom)
        m.KV_CAPACITY.labels(*self._labels).set(cap.kv_tokens)
        self._engine_ok.set()
        self.health.ready, self.health.reason = True, "engine loaded"
        m.READY.labels(*self._labels).set(1)
        log.info(
            "engine_ready",
            engine=self.engine.name,
            kv_tokens=cap.kv_tokens,
            max_num_seqs=cap.max_num_seqs,
            seconds=round(time.monotonic() - t0, 2),
        )

    async def run(self, bus: Bus) -> None:
        self.bus = self.tokens.bus = bus
        self.gpu = GpuMonitor()
        m.init_series(self.pool)
        await bus.provision(streams=[JOBS, RESULTS, TOKENS], consumers=[self.consumer, self.direct])
        await bus.nc.subscribe(f"{subjects.CANCEL}.*.*", cb=self._on_cancel)
        await bus.nc.subscribe(f"{subjects.HEARTBEATS}.{self.pool}.*", cb=self.peers.on_msg)
        m.READY.labels(*self._labels).set(0)
        # Heartbeats start before the engine loads (ready=False until then):
        # peers must not take a worker that is still loading for a dead one.
        background = [asyncio.create_task(self._heartbeats(bus))]
        await self.start_engine(load=self.manage_engine)
        background.append(asyncio.create_task(self._sample_metrics()))
        try:
            await self._pull_loop(bus)
            await self._drain()
        finally:
            for t in background:
                t.cancel()
            with contextlib.suppress(Exception):
                await bus.notify(subjects.heartbeat(self.pool, self.s.worker_id),
                                 self._heartbeat(leaving=True))  # fmt: skip
            with contextlib.suppress(Exception):
                await self.rescue.delete_if_empty(self.direct)
            self.health.ready, self.health.reason = False, "stopped"
            m.READY.labels(*self._labels).set(0)
            if self.manage_engine:
                await self.engine.stop()

    async def _pull_loop(self, bus: Bus) -> None:
        """Pull from the pool's consumer and from this worker's own (jobs
        routed here for its warm prefix cache), and rescue the own consumers
        of dead peers; all share one admission budget."""
        await asyncio.gather(
            self.pull(bus, self.consumer),
            self.pull(bus, self.direct),
            self.rescue.run(),
        )

    async def pull(self, bus: Bus, spec: ConsumerSpec, until: Callable[[], bool] = never) -> None:
        """Fetch from ``spec`` while there is headroom, until the bus stops
        (or ``until()`` says so, checked when a fetch comes back empty)."""
        puller = await bus.puller(spec)
        while not bus.stopping:
            n = min(self.s.max_fetch, self.admission.room_for(self.waiting))
            if n <= 0 or not self._engine_ok.is_set():
                await self.admission.wait_change(0.25)
                continue
            # Idle: one message with a long wait (see Puller.fetch); busy: batches.
            batch = await puller.fetch(n, 0.05) if self._tasks else await puller.fetch(1, 1.0)
            if not batch and until():
                return
            for d in batch:
                self.waiting += 1
                task = asyncio.create_task(bus.settle(spec, d, self._handle))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """After SIGTERM: let in-flight jobs finish within the grace period,
        then abort the rest (they are naked and redelivered elsewhere)."""
        if not self._tasks:
            return
        log.info("draining", inflight=len(self._tasks), grace=self.s.drain_grace)
        _, late = await asyncio.wait(self._tasks, timeout=self.s.drain_grace)
        if late:
            self.epoch += 1  # their generations end as faults -> nak
            for f in list(self.flights.values()):
                await self.engine.abort(f.request_id)
            await asyncio.wait(late, timeout=10)

    # -- one job -----------------------------------------------------------

    async def _handle(self, d: Delivery) -> None:
        try:
            job = d.decode(InferenceJob)
        except codec.DecodeError as exc:
            self.waiting -= 1
            raise Term(f"undecodable job: {exc}") from exc
        admitted = [False]
        try:
            with structlog.contextvars.bound_contextvars(task_id=job.task_id, job_id=job.job_id):
                await self._run_job(d, job, admitted)
        finally:
            if not admitted[0]:
                self.waiting -= 1

    def _budget(self, job: InferenceJob) -> int:
        cap = self.engine.capacity()
        room = cap.max_model_len - job.max_tokens
        return min(job.context_budget or self.s.context_budget or room, room)

    async def _run_job(self, d: Delivery, job: InferenceJob, admitted: list[bool]) -> None:
        assert self.bus is not None
        bus = self.bus
        if (job.tenant, job.task_id) in self.cancelled:
            await self._publish_error(job, ErrorCode.CANCELLED, "task was cancelled")
            return
        out_id = f"{job.job_id}:out"
        cap = self.engine.capacity()
        budget = max(1, self._budget(job))
        for _ in range(4):
            window: WindowReply = await bus.request(
                subjects.context_api("window", job.tenant),
                WindowRequest(
                    tenant=job.tenant, ref=job.ref, budget_tokens=budget, done_msg_id=out_id
                ),
                WindowReply,
                task_id=job.task_id,
            )
            if window.error is not None:
                await self._publish(job, self._result(job, error=window.error))
                return
            if window.existing is not None:  # answered before a crash: republish it
                await self._publish(
                    job,
                    self._result(job, ref=window.existing_ref, output=window.existing.content),
                )
                return
            messages = _with_system(window.messages, job.system)
            prompt_tokens = self.engine.count_prompt_tokens(messages)
            room = cap.max_model_len - job.max_tokens
            if prompt_tokens <= room or window.tokens <= 0:
                break
            # The store's token estimate ran short of this model's tokenizer:
            # ask again for a window scaled to the real count.
            budget = max(1, int(window.tokens * room / prompt_tokens * 0.95))
        need = prompt_tokens + job.max_tokens
        if need > cap.max_model_len:
            await self._too_long(job, prompt_tokens, cap.max_model_len)
            return
        await self._engine_ok.wait()
        await self.admission.acquire(need)
        admitted[0] = True
        self.waiting -= 1
        try:
            outcome = await self._generate(d, job, messages)
        finally:
            await self.admission.release(need)
        if outcome is None:  # cancelled, or refused by the engine: result already sent
            return
        reply: ContextAppendReply = await bus.request(
            subjects.context_api("append", job.tenant),
            ContextAppend(
                tenant=job.tenant,
                session=job.session,
                msg_id=out_id,
                messages=[ChatMessage(role="assistant", content=outcome.output, name=job.agent)],
            ),
            ContextAppendReply,
            task_id=job.task_id,
        )
        if reply.error is not None:
            raise Nak(1.0, f"context append failed: {reply.error.code}")
        self._touch_warm(f"{job.tenant}.{job.session}")
        await self._publish(
            job,
            self._result(
                job,
                ref=reply.ref,
                output=outcome.output,
                usage=outcome.usage,
                cached_tokens=outcome.cached_tokens,
                queue_seconds=max(0.0, outcome.started - (job.published_at or d.published_at)),
            ),
        )
        m.JOBS.labels(self.pool, "completed").inc()
        m.JOB_LATENCY.labels(self.pool).observe(time.time() - (job.published_at or d.published_at))

    async def _generate(
        self, d: Delivery, job: InferenceJob, messages: list[ChatMessage]
    ) -> _Outcome | None:
        """Stream one generation. None when it ended with an error result
        already published (cancelled, too long); raises Nak on an engine fault."""
        request_id = f"{job.job_id}#{d.num_delivered}"
        flight = _Flight(request_id, job.tenant, job.task_id, self.epoch)
        self.flights[request_id] = flight
        started = time.time()
        m.QUEUE_WAIT.labels(self.pool).observe(max(0.0, started - (job.published_at or started)))
        m.INFLIGHT.labels(*self._labels).set(len(self.flights))
        m.ADMITTED_TOKENS.labels(*self._labels).set(self.admission.tokens)
        self.clock.start(request_id)
        parts: list[str] = []
        final = None
        tokens = self.tokens.open(job, attempt=f"{d.stream_seq}.{d.num_delivered}")
        try:
            request = GenerationRequest(
                request_id=request_id,
                messages=messages,
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                seed=job.seed,
                json_schema=job.response_schema,
            )
            async for chunk in self.engine.generate(request):
                if not parts and chunk.text:
                    m.TTFT.labels(self.pool).observe(time.time() - started)
                parts.append(chunk.text)
                tokens.add(chunk.text)
                if chunk.finished:
                    final = chunk
        except (EngineOOM, EngineDead) as exc:
            await self._fault(exc, flight.epoch)
            raise Nak(self.s.oom_retry_delay, f"engine fault: {type(exc).__name__}") from exc
        except PromptTooLong as exc:
            await self._too_long(job, exc.prompt_tokens, exc.max_model_len)
            return None
        finally:
            # The last delta goes out before the answer is stored, only for a
            # generation whose answer will be.
            complete = final is not None and not flight.cancelled and flight.epoch == self.epoch
            await tokens.close(final=complete)
            gpu_seconds = self.clock.stop(request_id)
            self.flights.pop(request_id, None)
            m.INFLIGHT.labels(*self._labels).set(len(self.flights))
        if flight.cancelled:
            await self._publish_error(job, ErrorCode.CANCELLED, "task was cancelled")
            return None
        if flight.epoch != self.epoch or final is None:
            m.JOBS.labels(self.pool, "nak").inc()
            raise Nak(self.s.oom_retry_delay, "generation interrupted by an engine restart")
        m.PROMPT_TOKENS.labels(self.pool).inc(final.prompt_tokens)
        m.COMPLETION_TOKENS.labels(self.pool).inc(final.completion_tokens)
        usage = Usage(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            gpu_seconds=round(gpu_seconds, 6),
        )
        return _Outcome("".join(parts), usage, final.cached_tokens, started)

    async def _too_long(self, job: InferenceJob, prompt_tokens: int, limit: int) -> None:
        assert self.bus is not None
        if self.s.larger_pool:
            await self.bus.publish(
                subjects.job(self.s.larger_pool),
                job,
                msg_id=f"{job.job_id}@{self.s.larger_pool}",
                task_id=job.task_id,
            )
            m.JOBS.labels(self.pool, "forwarded").inc()
            return
        await self._publish_error(
            job,
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt of {prompt_tokens} tokens + max_tokens {job.max_tokens} "
            f"exceeds this worker's context length {limit}",
        )

    # -- faults ------------------------------------------------------------

    async def _fault(self, exc: BaseException, seen_epoch: int) -> None:
        """Abort everything in flight and restart the engine (once per fault)."""
        async with self._restart_lock:
            if seen_epoch != self.epoch:
                return  # another job already handled this fault
            self.epoch += 1
            self._engine_ok.clear()
            oom = isinstance(exc, EngineOOM)
            if oom:
                m.OOM.labels(self.pool).inc()
            m.JOBS.labels(self.pool, "oom" if oom else "engine_dead").inc()
            m.READY.labels(*self._labels).set(0)
            self.health.ready, self.health.reason = False, f"restarting engine after {exc!r}"
            log.error("engine_fault", error=repr(exc), inflight=len(self.flights))
            for f in list(self.flights.values()):
                with contextlib.suppress(Exception):
                    await self.engine.abort(f.request_id)
            with contextlib.suppress(Exception):
                await self.engine.stop()
            await asyncio.sleep(self.s.engine_restart_delay)
            m.ENGINE_RESTARTS.labels(self.pool).inc()
            await self.start_engine()

    # -- cancellation ------------------------------------------------------

    async def _on_cancel(self, msg: object) -> None:
        try:
            cancel = codec.decode(msg.data, Cancel)  # type: ignore[attr-defined]
        except codec.DecodeError:
            return
        key = (cancel.tenant, cancel.task_id)
        self.cancelled[key] = None
        while len(self.cancelled) > 4096:
            self.cancelled.popitem(last=False)
        for f in list(self.flights.values()):
            if (f.tenant, f.task_id) == key:
                f.cancelled = True
                await self.engine.abort(f.request_id)
                log.info("generation_aborted", task_id=f.task_id, request_id=f.request_id)

    # -- results -----------------------------------------------------------

    def _result(self, job: InferenceJob, **fields: Any) -> InferenceResult:
        return InferenceResult(
            job_id=job.job_id,
            task_id=job.task_id,
            tenant=job.tenant,
            session=job.session,
            step=job.step,
            worker=self.s.worker_id,
            **fields,
        )

    async def _publish(self, job: InferenceJob, result: InferenceResult) -> None:
        assert self.bus is not None
        await self.bus.publish(
            subjects.result(job.tenant, job.task_id),
            result,
            msg_id=f"{job.job_id}:result",
            task_id=job.task_id,
        )

    async def _publish_error(self, job: InferenceJob, code: ErrorCode, message: str) -> None:
        m.JOBS.labels(self.pool, str(code)).inc()
        info = ErrorInfo(code=code, message=message, layer=LAYER_OF[code])
        await self._publish(job, self._result(job, error=info))

    # -- background --------------------------------------------------------

    def _touch_warm(self, session: str) -> None:
        self.warm[session] = None
        self.warm.move_to_end(session)
        while len(self.warm) > self.s.warm_sessions:
            self.warm.popitem(last=False)

    def _heartbeat(self, leaving: bool = False) -> Heartbeat:
        return Heartbeat(
            worker=self.s.worker_id,
            pool=self.pool,
            ready=self.health.ready and not leaving,
            engine=self.engine.name,
            inflight=len(self.flights),
            admitted_tokens=self.admission.tokens,
            kv_capacity_tokens=self.admission.kv_limit,
            warm_sessions=list(self.warm)[-64:],
            leaving=leaving,
            ts=time.time(),
        )

    async def _heartbeats(self, bus: Bus) -> None:
        subject = subjects.heartbeat(self.pool, self.s.worker_id)
        beats = 0
        while True:
            with contextlib.suppress(Exception):
                await bus.notify(subject, self._heartbeat())
            beats += 1
            if beats % 10 == 0:  # a peer that wrongly took us for dead deleted it
                with contextlib.suppress(Exception):
                    await bus.ensure_consumer(self.direct)
            await asyncio.sleep(self.s.heartbeat_interval)

    async def _sample_metrics(self) -> None:
        last_q = last_h = last_p = 0
        while True:
            st = self.engine.stats()
            m.KV_USAGE.labels(*self._labels).set(st.kv_usage)
            # Engine counters restart with the engine: only count increases.
            if st.prefix_cache_queries >= last_q:
                m.PREFIX_QUERIES.labels(self.pool).inc(st.prefix_cache_queries - last_q)
            if st.prefix_cache_hits >= last_h:
                m.PREFIX_HITS.labels(self.pool).inc(st.prefix_cache_hits - last_h)
            if st.preemptions >= last_p:
                m.PREEMPTIONS.labels(self.pool).inc(st.preemptions - last_p)
            last_q, last_h, last_p = st.prefix_cache_queries, st.prefix_cache_hits, st.preemptions
            for gpu, mem in (self.gpu.memory() if self.gpu else {}).items():
                m.GPU_MEMORY_USED.labels(*self._labels, gpu).set(mem.used)
                m.GPU_MEMORY_FREE.labels(*self._labels, gpu).set(mem.free)
            await asyncio.sleep(1.0)
