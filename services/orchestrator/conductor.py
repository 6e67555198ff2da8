"""The conductor: the I/O shell around the pure decisions in ``transitions.py``:
load the run, decide, store it with ONE compare-and-set (a conflict re-reads
and decides again), perform the effects concurrently, then ack; a crash in
between redelivers the message and the stored state's effects are replayed,
de-duplicated by their ids (docs/architecture.md, "How a task flows")."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from baton import context_client as context
from baton import tracing
from baton.bus import HDR_DLQ_REASON, HDR_DLQ_SUBJECT, HDR_TASK_ID, Bus, Delivery, Nak, Term
from proto import codec, keys, subjects
from proto import context_api as ctxapi
from proto.errors import ErrorCode
from proto.ids import is_valid_id
from proto.messages import (
    PHASES,
    Cancel,
    ContextAppend,
    ContextAppendReply,
    ContextFork,
    ErrorInfo,
    ForkReply,
    InferenceResult,
    InputAnswer,
    RunTimer,
    TaskSubmit,
    ToolResult,
    Usage,
    finite_timing,
    finite_usage,
)
from proto.submission import TaskRejected, parse_task

from . import metrics as m
from . import spans
from . import transitions as T
from .answers import AnswerLengths, Learnt
from .inflight import InFlight
from .poolview import PoolView
from .routing import HeartbeatTracker, Router
from .runs import RunConflict, RunLocks, RunStore
from .settings import OrchestratorSettings
from .state import RunState, StepState, run_key
from .toolcatalog import ToolCatalogs
from .warming import Warming
from .workflows import GraphWorkflow

log = structlog.get_logger("orchestrator")

MAX_CONFLICTS = 50  # compare-and-set attempts per transition

Decide = Callable[[RunState | None, float, T.Ctx], T.Verdict]


def _prediction_error(st: StepState) -> None:
    """A finished step against what was predicted where it ran."""
    p = st.prediction
    if p is None:
        return
    if p.gpu_seconds > 0 and st.usage.gpu_seconds > 0:
        error = st.usage.gpu_seconds / p.gpu_seconds - 1.0
        m.PREDICTION_ERROR.labels("gpu_seconds", st.pool).observe(error)
    if st.timing is not None:
        waited = st.timing.phases.queue + st.timing.phases.admission
        m.PREDICTION_ERROR.labels("queue_wait_s", st.pool).observe(waited - p.wait_s)


class Conductor:
    def __init__(
        self,
        bus: Bus,
        runs: RunStore,
        workflows: dict[str, GraphWorkflow],
        settings: OrchestratorSettings,
        router: Router | None = None,
        clock: Callable[[], float] = time.time,
        *,
        check_limits: Callable[[Delivery, TaskSubmit], None] | None = None,
        on_changed: Callable[[RunState], None] | None = None,
        pools: PoolView | None = None,
    ) -> None:
        """``clock``: the time decisions are made at (epoch seconds); a test
        on the bus twin passes the twin's, so watchdogs fire without waiting.
        ``check_limits`` and ``on_changed``: the tenant's room (``intake.py``
        ``TenantRoom``): a task's limits, checked after it parsed (raises
        ``TaskRejected``), and every run change this replica stores (the fair
        share follows runs ending or waiting for input). ``pools``: the
        pools' live view, when the tenants' room reads it too (one per
        process: each counts catalogue drift from the heartbeats)."""
        self.router = router or Router(HeartbeatTracker(), enabled=False)
        self.clock = clock
        self.bus = bus
        self.runs = runs
        self.workflows = workflows
        self.s = settings
        self.tools = ToolCatalogs()
        self.pools = pools or PoolView(settings.catalogue, self.router.heartbeats,
                                       stale_after=settings.route_stale_after,
                                       overlap=settings.share_by_overlap,
                                       reconcile_counts=settings.reconcile_counts,
                                       speeds_from_steps=settings.speeds_from_steps,
                                       prefill_by_tokens=settings.prefill_by_tokens,
                                       expect_arrivals=settings.expect_arrivals,
                                       clock=clock)  # fmt: skip
        # The answer lengths of the agents, learnt from the steps this replica stores.
        self.answers = AnswerLengths(quantile=settings.answer_quantile,
                                     min_seen=settings.answer_min_seen,
                                     near=settings.answer_prompt_near)  # fmt: skip
        self.rules = T.Rules(
            workflows,
            settings.step_timeout,
            settings.step_retries,
            settings.price,
            tool_spec=self.tools.spec,
            tool_cpu_price=settings.tool_cpu_hour_usd,
            pools=self.pools.look,
            answer=self._answer,
        )
        self.warming = Warming(bus, self.router, self.rules, runs, enabled=settings.prewarm,
                               max_load=settings.prewarm_max_load,
                               stale_after=settings.route_stale_after)  # fmt: skip
        self._known = frozenset(workflows)
        self._timer_sleep = self.rules.timer_sleep()
        self.check_limits = check_limits
        self.on_changed = on_changed
        self.in_flight = InFlight()
        self.locks = RunLocks()  # one transition of a run at a time, per replica
        m.STEPS_IN_FLIGHT.set_function(self.in_flight.total)

    # -- the shell ---------------------------------------------------------

    def _answer(self, workflow: str, agent: str) -> Learnt:
        """The answer length the agent's steps are predicted with, by prompt
        length (None: max_tokens)."""
        return self.answers.expecting((workflow, agent)) if self.s.learn_answers else None

    async def _apply(
        self, tenant: str, task_id: str, decide: Decide, *, new: bool = False
    ) -> T.Transition | None:
        """Load, decide, store once, perform the effects. None: no such run.
        ``new``: the run is expected not to exist (no read before the create).
        A decision that changes nothing is trusted only on a fresh read.

        This replica's transitions of one run are decided and stored one at a
        time (``RunLocks``): a run's parallel branches answering together
        would otherwise both decide on the snapshot in the cache and the
        second write would lose its compare-and-set; in turn, the second
        decides on the snapshot the first stored. The compare-and-set still
        guards the write (other replicas). The lock is held over the effects
        too, so this replica publishes a run's events in the order it stored
        them; not over the pre-warms that follow (best effort)."""
        async with self.locks.hold(run_key(tenant, task_id)):
            out = await self._store(tenant, task_id, decide, new)
            if out is None:
                return None
            await self._perform(out.run, out.effects)
        try:
            await self.warming.after(out.run, out.effects)
        except Exception as exc:  # best effort: never in the run's way
            log.warning("prewarm_failed", error=repr(exc))
        if out.run.terminal:
            self.runs.forget(tenant, task_id)  # read afresh if ever needed again
        return out

    async def _store(
        self, tenant: str, task_id: str, decide: Decide, new: bool
    ) -> T.Transition | None:
        """``_apply``'s decision and its one compare-and-set (a conflict
        re-reads and decides again)."""
        ctx: dict[str, Any] = {}
        snap = self.runs.cached(tenant, task_id)
        fresh = False
        if snap is None and not new:
            snap, fresh = await self.runs.read(tenant, task_id), True
            if snap is None:  # a lagging replica's "no such run" is not the last word
                snap = await self.runs.read(tenant, task_id, consistent=True)
        for _ in range(MAX_CONFLICTS):
            old = snap.shared() if snap is not None else None  # decisions copy it
            if old is None and not new:
                return None
            now = self.clock()
            out = decide(old, now, ctx)
            if isinstance(out, T.Need):
                await self._context_ops(tenant, task_id, out.ops, ctx)
                continue
            if not fresh and (isinstance(out, T.Defer) or not out.changed):
                snap, fresh = await self.runs.read(tenant, task_id), True
                continue
            if isinstance(out, T.Defer):
                raise Nak(out.delay, out.reason)
            if out.changed:
                out.run.updated_at = now
                # Counted before the write's await: decisions made while it is
                # out see this one's placements (a burst is not placed blind).
                self.pools.changed(old, out.run)
                try:
                    snap = await self.runs.write(out.run, snap.revision if snap else None)
                except RunConflict:  # the leader's revision, not a lagging replica's
                    m.RUN_CONFLICTS.labels(out.run.workflow).inc()
                    self.pools.changed(out.run, old)
                    snap, fresh = await self.runs.read(tenant, task_id, consistent=True), True
                    continue
                except BaseException:
                    self.pools.changed(out.run, old)
                    raise
                self.in_flight.wrote(out.run.key, snap.revision, T.in_flight(out.run))
                self._observe(old, out.run)
                if tracing.enabled():
                    tracing.record(spans.closed(old, out.run, now))
            return out
        raise RunConflict(f"{tenant}.{task_id}")

    async def _perform(self, run: RunState, effects: list[T.Effect]) -> None:
        """All of a transition's effects at once (each publish is written in
        order, so a run's events keep their order in the stream)."""
        if effects:
            await asyncio.gather(*(self._effect(run, e) for e in effects))

    async def _effect(self, run: RunState, e: T.Effect) -> None:
        tid = run.task_id
        if isinstance(e, T.Emit):
            await self.bus.publish(
                subjects.event(run.tenant, tid),
                e.event,
                msg_id=keys.event(run.tenant, tid, e.key),
                task_id=tid,
            )
        elif isinstance(e, T.Dispatch):
            warm_id = keys.warm(run.tenant, tid, e.job.step)
            warm = self.router.choose(run.tenant, e.job.session, e.pool, warm_id)
            m.ROUTING.labels("warm" if warm else "pool").inc()
            subject = subjects.worker_job(e.pool, warm) if warm else subjects.job(e.pool)
            with spans.within_step(run, e.job.step):
                await self.bus.publish(subject, e.job, msg_id=e.msg_id, task_id=tid)
        elif isinstance(e, T.DispatchTool):
            with spans.within_step(run, e.job.step):
                await self.bus.publish(subjects.tool_job(e.pool), e.job, msg_id=e.msg_id,
                                       task_id=tid)  # fmt: skip
        elif isinstance(e, T.Watch):
            timer = RunTimer(tenant=run.tenant, task_id=tid, due=e.due)
            await self.bus.publish(
                subjects.timer(run.tenant, tid),
                timer,
                msg_id=keys.run_timer(run.tenant, tid),
                task_id=tid,
            )
        else:
            await self.bus.notify(
                subjects.cancel(run.tenant, tid),
                Cancel(tenant=run.tenant, task_id=tid),
                task_id=tid,
            )

    async def _context_ops(
        self, tenant: str, task_id: str, ops: tuple[T.ContextOp, ...], ctx: dict[str, Any]
    ) -> None:
        """Perform context-store ops (idempotent) and note their answers in
        ``ctx``. No answer: nak (retried later); a refusal is an answer."""

        async def one(op: T.ContextOp) -> None:
            reply: ContextAppendReply | ForkReply
            if isinstance(op, T.AppendOp):
                request = ContextAppend(
                    tenant=tenant,
                    session=op.session,
                    msg_id=op.msg_id,
                    messages=list(op.messages),
                    system=op.system,
                )
                reply = await context.call(self.bus, ctxapi.APPEND, request, task_id=task_id)
            else:
                fork = ContextFork(tenant=tenant, ref=op.ref, child=op.child, upto=op.upto)
                reply = await context.call(self.bus, ctxapi.FORK, fork, task_id=task_id)
            if reply.error is not None or reply.ref is None:
                ctx[op.key] = reply.error or ErrorInfo.of(
                    ErrorCode.CONTEXT_UNAVAILABLE, "no ref returned"
                )
            else:
                ctx[op.key] = reply.ref

        await asyncio.gather(*(one(op) for op in ops))

    def _observe(self, old: RunState | None, new: RunState) -> None:
        """Metrics of a stored change, derived from the states before and after
        (so a replay counts nothing twice)."""
        before = old.steps if old is not None else {}
        charged = old.warms if old is not None else {}
        for warm_id, cost in new.warms.items():
            if warm_id not in charged:
                m.TENANT_COST.labels(new.tenant).inc(cost)
                log.info("prewarm_charged", warm=warm_id, cost_usd=round(cost, 8))
        for step_id, st in new.steps.items():
            was = before.get(step_id)
            if st.pool_reason and (was is None or was.moves != st.moves):
                chosen = "none" if st.pool_reason == "too_long" else st.pool
                m.POOL_DECISIONS.labels(chosen, st.pool_reason).inc()
                if st.capacity_wait > 0:
                    m.WAITING_CAPACITY.labels(st.pool).inc()
                    log.info("step_waiting_capacity", step=step_id, pool=st.pool,
                             estimate_s=round(st.capacity_wait, 1))  # fmt: skip
            if st.status != "done" or (step_id in before and before[step_id].status == "done"):
                continue
            if st.input or st.carried:  # a human's answer; a step a forked run did not run
                continue
            if st.session == new.session:
                # Only the run's own session is read again (a fork is one
                # step's): remembering forks would grow without use.
                self.router.served(new.tenant, st.session, st.pool, st.worker)
            labels = (new.workflow, st.agent)
            m.STEP_LATENCY.labels(*labels).observe(max(0.0, st.finished_at - st.dispatched_at))
            m.TOKENS.labels(*labels, "prompt").inc(st.usage.prompt_tokens)
            m.TOKENS.labels(*labels, "completion").inc(st.usage.completion_tokens)
            m.GPU_SECONDS.labels(*labels).inc(st.usage.gpu_seconds)
            m.COST.labels(*labels).inc(st.cost_usd)
            m.TENANT_COST.labels(new.tenant).inc(st.cost_usd)
            _prediction_error(st)
            self.pools.finished(st)
            if st.prediction is not None and not st.turn:  # one generation, placed
                prompt = st.prediction.kv_tokens - st.max_tokens  # as it was predicted with
                self.answers.observe((new.workflow, st.agent), st.usage.completion_tokens, prompt)
            if st.timing is not None:
                for phase in PHASES:
                    seconds = getattr(st.timing.phases, phase)
                    if seconds > 0:
                        m.STEP_PHASE.labels(phase, new.workflow, st.pool).observe(seconds)
            if step_id == self.s.test_crash_after_commit:
                # Test hook (tests/test_faults.py): die between storing the
                # step as done and performing what follows it.
                log.warning("test_crash_after_commit", step=step_id)
                os._exit(70)
        if self.on_changed is not None:
            self.on_changed(new)
        if new.terminal and (old is None or not old.terminal):
            outcome: str = new.status
            if new.error is not None and new.error.code == ErrorCode.BUDGET_EXCEEDED:
                outcome = "budget_exceeded"
                m.BUDGET_STOPS.labels(new.workflow).inc()
            m.TASKS.labels(new.workflow, outcome).inc()
            m.TASK_LATENCY.labels(new.workflow).observe(max(0.0, self.clock() - new.created_at))
            log.info(
                "task_finished",
                outcome=outcome,
                tokens=new.usage.total_tokens,
                cost_usd=round(new.cost_usd, 8),
            )

    async def check_in_flight(self, interval: float, chunk: int = 64) -> None:
        """Every ``interval`` seconds, stop counting the runs another replica
        wrote since (it counts them now) or that were erased."""
        while True:
            await asyncio.sleep(interval)
            await self.recheck_in_flight(chunk)

    async def recheck_in_flight(self, chunk: int = 64) -> None:
        keys = self.in_flight.keys()
        for i in range(0, len(keys), chunk):
            part = keys[i : i + chunk]
            got = await asyncio.gather(*map(self.runs.revision, part), return_exceptions=True)
            self.in_flight.check(
                {k: r for k, r in zip(part, got, strict=True) if not isinstance(r, BaseException)}
            )

    # -- tasks -------------------------------------------------------------

    async def accept(self, d: Delivery) -> T.NewTask:
        """Intake: the task message as an accepted task, or a rejection
        answered with a ``failed`` event (then terminated, not redelivered)."""
        tenant, workflow = subjects.task_origin(d.subject)
        try:
            task = parse_task(
                d.data,
                tenant=tenant,
                workflow=workflow,
                known_workflows=self._known,
                msg_id=d.msg_id,
                fallback_task_id=keys.task_fallback(d.stream_seq),
            )
            if self.check_limits is not None:
                self.check_limits(d, task)
        except TaskRejected as r:
            await self._reject(r, workflow, d.stream_seq)
            raise Term(f"rejected: {r.code}", dead_letter=False) from r
        assert task.task_id is not None and task.session is not None
        return T.NewTask(
            tenant=task.tenant,
            task_id=task.task_id,
            session=task.session,
            workflow=workflow,
            seq=d.stream_seq,
            input=task.input,
            budget=task.budget,
            metadata=dict(task.metadata),
            max_tokens=task.max_tokens,
            temperature=task.temperature,
            trace=tracing.traceparent(tracing.current()),  # the context the task came in
        )

    async def _reject(self, r: TaskRejected, workflow: str, seq: int) -> None:
        m.REJECTED.labels(str(r.code)).inc()
        if not r.addressable:
            log.warning("task_rejected_unaddressable", code=str(r.code), reason=r.message)
            return
        assert r.tenant is not None and r.task_id is not None
        now = self.clock()
        out = T.reject(None, r, seq, now)
        try:
            await self.runs.write(out.run, None)
        except RunConflict:
            out = T.reject(await self.runs.get(r.tenant, r.task_id), r, seq, now)
        if out.note == "duplicate_task":
            log.info("rejected_copy_of_known_task", code=str(r.code), task_id=r.task_id)
            return
        m.TASKS.labels(workflow if workflow in self._known else "unknown", "rejected").inc()
        log.info("task_rejected", code=str(r.code), reason=r.message, task_id=r.task_id)
        await self._perform(out.run, out.effects)

    async def on_task(self, d: Delivery) -> RunState:
        """Start (or resume) the task's run; returns the run as stored."""
        tenant = subjects.task_origin(d.subject)[0]
        # Until its run is stored, the task is one the pools will see arrive.
        self.pools.taken(tenant, d.stream_seq, d.pending)
        try:
            task = await self.accept(d)
            structlog.contextvars.bind_contextvars(task_id=task.task_id, tenant=task.tenant)
            rules = self.rules
            if rules.pools is not None:  # its placement sees the tasks behind it, not itself
                rules = replace(rules, pools=self.pools.looking_from(tenant, d.stream_seq))
            with spans.hop("baton.tasks", task.tenant, task.task_id):
                out = await self._apply(
                    task.tenant,
                    task.task_id,
                    lambda run, now, ctx: T.start(run, task, rules, now, ctx),
                    new=True,
                )
        finally:
            self.pools.handled(tenant, d.stream_seq)
        assert out is not None
        if out.note == "duplicate_task":
            log.info("duplicate_task_ignored", first_seq=out.run.task_seq, seq=task.seq)
        elif out.note == "resumed":
            m.RESUMED.inc()
        return out.run

    # -- results -----------------------------------------------------------

    async def on_result(self, d: Delivery) -> None:
        received = self.clock()
        res = d.decode(InferenceResult)  # undecodable: dead-lettered by the transport
        again = d.num_delivered > 1
        structlog.contextvars.bind_contextvars(task_id=res.task_id, tenant=res.tenant)
        if not (is_valid_id(res.tenant) and is_valid_id(res.task_id)):
            raise Term("result with invalid ids")
        if not finite_usage(res.usage):
            raise Term("result with negative or non-finite usage")
        if res.timing is not None and not finite_timing(res.timing):
            res.timing = None  # a bad clock loses the waterfall, not the answer

        def decide(run: RunState | None, now: float, ctx: T.Ctx) -> T.Verdict:
            r = _must(run)
            if r.workflow not in self.workflows:  # the claim of a rejected task
                return T.Transition(r, False, note=T.NOT_A_RUN)
            if res.warm:  # a pre-warm's GPU time, charged to the run
                return T.warmed(r, res, self.rules)
            return T.result(r, res, self.rules, now, ctx, received, redelivered=again)

        with spans.hop("baton.results", res.tenant, res.task_id):
            out = await self._apply(res.tenant, res.task_id, decide)
        if out is None or out.note == T.NOT_A_RUN:
            raise Term(f"result for unknown run {res.tenant}.{res.task_id}")
        if out.note and d.num_delivered > 1:
            m.RESUMED.inc()

    async def on_tool_result(self, d: Delivery) -> None:
        received = self.clock()
        res = d.decode(ToolResult)
        structlog.contextvars.bind_contextvars(task_id=res.task_id, tenant=res.tenant)
        if not (is_valid_id(res.tenant) and is_valid_id(res.task_id)):
            raise Term("tool result with invalid ids")
        if not finite_usage(Usage(tool_cpu_seconds=res.cpu_seconds)) or not 0 <= res.seconds < 1e9:
            raise Term("tool result with a non-finite or negative time")
        if res.timing is not None and not finite_timing(res.timing):
            res.timing = None
        with spans.hop("baton.toolresults", res.tenant, res.task_id):
            out = await self._apply(
                res.tenant,
                res.task_id,
                lambda run, now, ctx: T.tool_result(
                    _must(run), res, self.rules, now, received, redelivered=d.num_delivered > 1
                ),
            )
        if out is None:
            raise Term(f"tool result for unknown run {res.tenant}.{res.task_id}")

    # -- timers ------------------------------------------------------------

    async def on_timer(self, d: Delivery) -> None:
        """A run's watchdog: asleep until due (nak with the delay); then retry
        or fail the overdue steps, and sleep until the next deadline."""
        t = d.decode(RunTimer)
        asleep = T.still_asleep(t.due, self.clock(), self._timer_sleep)
        if asleep is not None:
            raise Nak(asleep, "not due")
        structlog.contextvars.bind_contextvars(task_id=t.task_id, tenant=t.tenant)
        with spans.hop("baton.timers", t.tenant, t.task_id):
            out = await self._apply(
                t.tenant, t.task_id, lambda run, now, ctx: T.timer(_must(run), self.rules, now, ctx)
            )
        if out is not None and out.note == T.INPUT_DEFAULT:
            m.INPUT_ANSWERS.labels("default").inc()
            log.info("input_default_taken")
        if out is None or out.wake_at is None:
            return
        if out.changed and out.note != T.INPUT_DEFAULT:
            log.warning("step_timeout", status=out.run.status)
        raise Nak(T.next_look(out.wake_at, self.clock(), self._timer_sleep), "watching")

    # -- human input -------------------------------------------------------

    async def on_input(self, d: Delivery) -> None:
        """An answer on ``baton.input.<tenant>.<task_id>`` (the tenant token
        set by the server from the publisher's credentials). One that cannot
        be taken is acked, logged and counted: never redelivered."""
        tenant, task_id = subjects.input_origin(d.subject)
        structlog.contextvars.bind_contextvars(task_id=task_id, tenant=tenant)
        if not (is_valid_id(tenant) and is_valid_id(task_id)):
            m.INPUT_ANSWERS.labels("invalid_field").inc()
            raise Term("answer with invalid ids", dead_letter=False)
        try:
            body = d.decode(InputAnswer)
        except codec.DecodeError as exc:
            m.INPUT_ANSWERS.labels("bad_encoding").inc()
            log.warning("input_answer_rejected", code="bad_encoding", reason=str(exc))
            raise Term("undecodable answer", dead_letter=False) from exc
        why = T.answer_refusal(body, tenant)
        if why is not None:
            m.INPUT_ANSWERS.labels(str(why[0])).inc()
            log.warning("input_answer_rejected", code=str(why[0]), reason=why[1])
            return
        msg = T.NewAnswer(body.answer, body.step, redelivered=d.num_delivered > 1)
        with spans.hop("baton.input", tenant, task_id):
            await self.answer(tenant, task_id, msg)

    async def answer(self, tenant: str, task_id: str, msg: T.NewAnswer) -> T.Transition | None:
        """Give a waiting input step its answer; None when there is no such run.
        ``note`` of the outcome: empty when taken, else why it was ignored."""

        out = await self._apply(
            tenant, task_id, lambda run, now, ctx: T.answer(_must(run), msg, self.rules, now, ctx)
        )
        outcome = "unknown_task" if out is None else (out.note or "taken")
        m.INPUT_ANSWERS.labels(outcome).inc()
        log.info("input_answer", outcome=outcome, step=msg.step)
        return out

    # -- forks -------------------------------------------------------------

    async def fork(self, source: RunState, req: T.NewFork) -> T.Transition:
        """Start run ``req.task_id`` from a finished step of ``source`` (checked
        with ``transitions.fork_refusal`` first). ``note`` of the outcome:
        ``duplicate_task`` when that task id is another run already."""
        structlog.contextvars.bind_contextvars(task_id=req.task_id, tenant=source.tenant)
        out = await self._apply(
            source.tenant,
            req.task_id,
            lambda run, now, ctx: T.fork(run, source, req, self.rules, now, ctx),
            new=True,
        )
        assert out is not None
        log.info("task_forked", source=source.task_id, step=req.step, note=out.note)
        return out

    # -- dead letters --------------------------------------------------------

    async def on_dead_task(self, d: Delivery) -> None:
        """A tenant's task message was dead-lettered (its handler kept
        failing, or it crashed every process that took it): the task ends
        with a ``failed`` event (``unavailable``) its tenant sees; the copy
        stays in BATON_DLQ for ``baton dlq replay``. Never raises: a dead
        letter of this consumer would be one more dead task."""
        try:
            headers = d.headers
            original = headers.get(HDR_DLQ_SUBJECT, "").split(".")
            tenant = original[2] if len(original) >= 4 and original[1] == "tasks" else None
            task_id = headers.get(HDR_TASK_ID) or d.task_id
            if tenant is None or task_id is None or not is_valid_id(tenant):
                log.info("dead_task_unaddressable", subject=headers.get(HDR_DLQ_SUBJECT))
                return
            reason = ("the task could not be handled and was dead-lettered ("
                      f"{headers.get(HDR_DLQ_REASON, 'no reason')[:120]}); an operator "
                      "may replay it (baton dlq replay)")  # fmt: skip
            out = await self._apply(
                tenant, task_id, lambda run, now, ctx: T.dead_lettered(_must(run), now, reason)
            )
            if out is None:  # it never became a run: claim the id as failed
                await self._reject(TaskRejected(ErrorCode.UNAVAILABLE, reason, tenant=tenant,
                                                task_id=task_id), "", d.stream_seq)  # fmt: skip
            log.warning("task_dead_lettered", tenant=tenant, task_id=task_id)
        except Exception as exc:
            log.error("dead_task_not_failed", error=repr(exc))

    # -- cancellation ------------------------------------------------------

    async def cancel(self, tenant: str, task_id: str) -> RunState | None:
        """Stop a run: mark it cancelled, tell workers to abort its
        generations, publish ``failed`` with code ``cancelled``. Idempotent;
        None when there is no such run."""
        out = await self._apply(tenant, task_id, lambda run, now, ctx: T.cancel(_must(run), now))
        return out.run if out is not None else None


def _must(run: RunState | None) -> RunState:
    assert run is not None  # _apply returns None before deciding on a missing run
    return run


def _on(run: RunState | None, decide: Callable[..., T.Verdict], msg: Any, *args: Any) -> T.Verdict:
    return decide(_must(run), msg, *args)
