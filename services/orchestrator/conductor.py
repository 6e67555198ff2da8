"""The conductor: turns tasks and inference results into steps and events.

Event-driven and durable: a task message starts a run; each result message
advances it. Run state lives in KV (``runs.py``); every side effect has a
deterministic id (events ``<tenant>.<task_id>.<key>``, jobs
``<tenant>.<task_id>.<step>``) so a redelivered message replays its effects
as no-ops. A redelivery (``num_delivered > 1``) re-emits everything the state
implies, which is how a run resumes after a replica dies mid-handler.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from baton.transport import Bus, Delivery, Nak, Term
from proto import codec, subjects
from proto.admission import TaskRejected, parse_task
from proto.errors import LAYER_OF, ErrorCode
from proto.ids import is_valid_id
from proto.messages import (
    Accepted,
    Cancel,
    ChatMessage,
    Completed,
    ContextAppend,
    ContextAppendReply,
    ContextFork,
    ContextRef,
    ErrorInfo,
    Failed,
    ForkReply,
    InferenceJob,
    InferenceResult,
    Step,
    StepTimer,
)

from . import metrics as m
from .routing import HeartbeatTracker, Router
from .runs import RunState, RunStore, StepState
from .settings import OrchestratorSettings
from .workflows import Done, GraphWorkflow, StepPlan

log = structlog.get_logger("orchestrator")


MIN_STEP_TOKENS = 32  # below this share of the budget, a step is not worth dispatching


def _stop_for_budget(r: RunState, where: str) -> None:
    r.status = "failed"
    r.error = _error(
        ErrorCode.BUDGET_EXCEEDED,
        f"budget exhausted {where}: used {r.usage.total_tokens} tokens, ${r.cost_usd:.6f}",
    )
    r.output = _latest_output(r)


def _latest_output(r: RunState) -> str:
    """The partial output: the answer of the step that finished last."""
    done = [s for s in r.steps.values() if s.status == "done"]
    return max(done, key=lambda s: s.finished_at).output if done else ""


def _error(code: ErrorCode, message: str) -> ErrorInfo:
    return ErrorInfo(code=code, message=message, layer=LAYER_OF[code])


class Conductor:
    def __init__(
        self,
        bus: Bus,
        runs: RunStore,
        workflows: dict[str, GraphWorkflow],
        settings: OrchestratorSettings,
        router: Router | None = None,
    ) -> None:
        self.router = router or Router(HeartbeatTracker(), enabled=False)
        self.bus = bus
        self.runs = runs
        self.workflows = workflows
        self.s = settings
        self._known = frozenset(workflows)

    # -- events ------------------------------------------------------------

    async def _event(
        self,
        run: RunState,
        kind: type[Accepted | Step | Completed | Failed],
        key: str,
        **fields: Any,
    ) -> None:
        event = kind(
            task_id=run.task_id, tenant=run.tenant, session=run.session, ts=time.time(), **fields
        )
        await self.bus.publish(
            subjects.event(run.tenant, run.task_id),
            event,
            msg_id=f"{run.tenant}.{run.task_id}.{key}",
            task_id=run.task_id,
        )

    async def _step_event(self, run: RunState, step_id: str, st: StepState, *, done: bool) -> None:
        """A ``step`` event: started (dispatched), or done with its usage."""
        status = "done" if done else "started"
        await self._event(run, Step, f"step.{step_id}.{status}", step=step_id, agent=st.agent,
                          status=status, usage=st.usage if done else None)  # fmt: skip

    async def _terminal_event(self, run: RunState) -> None:
        if run.status == "completed":
            await self._event(
                run,
                Completed,
                "completed",
                output=run.output,
                usage=run.usage,
                cost_usd=run.cost_usd,
            )
        elif run.error is not None:
            partial = run.output or None
            await self._event(run, Failed, "failed", error=run.error, partial_output=partial)

    async def _replay(self, run: RunState) -> None:
        """Re-emit every event and job the state implies (all de-duplicated)."""
        await self._event(run, Accepted, "accepted", workflow=run.workflow)
        for step_id, st in run.steps.items():
            await self._step_event(run, step_id, st, done=False)
            if st.status == "done":
                await self._step_event(run, step_id, st, done=True)
            elif st.status == "dispatched" and not run.terminal:
                await self._publish_job(run, step_id, st)
                await self._arm_timer(run, step_id, st)
        if run.terminal:
            await self._terminal_event(run)

    # -- tasks -------------------------------------------------------------

    async def on_task(self, d: Delivery) -> None:
        workflow = subjects.workflow_of(d.subject)
        try:
            task = parse_task(
                d.data,
                workflow=workflow,
                known_workflows=self._known,
                msg_id=d.msg_id,
                fallback_task_id=f"seq{d.stream_seq}",
            )
        except TaskRejected as r:
            await self._reject(r, workflow)
            raise Term(f"rejected: {r.code}", dead_letter=False) from r
        assert task.task_id is not None and task.session is not None
        structlog.contextvars.bind_contextvars(task_id=task.task_id, tenant=task.tenant)
        run, created = await self.runs.create(
            RunState(
                tenant=task.tenant,
                task_id=task.task_id,
                session=task.session,
                workflow=workflow,
                task_seq=d.stream_seq,
                budget=task.budget,
                metadata=dict(task.metadata),
            )
        )
        if not created and run.task_seq != d.stream_seq:
            log.info("duplicate_task_ignored", first_seq=run.task_seq, seq=d.stream_seq)
            return
        if not created:
            m.RESUMED.inc()
        if run.terminal:
            await self._replay(run)
            return
        if created:
            await self._event(run, Accepted, "accepted", workflow=workflow)
        wf = self.workflows[workflow]
        plans = wf.start(run)
        first_agent = wf.agents[plans[0].agent]
        ref = await self._append(
            run,
            run.session,
            f"{run.task_id}:input",
            [ChatMessage(role="user", content=task.input)],
            system=first_agent.system,
        )
        if ref is None:
            return
        run = await self._dispatch(run, wf, plans, {p.step_id: ref for p in plans})
        if not created:
            await self._replay(run)

    async def _reject(self, r: TaskRejected, workflow: str) -> None:
        m.REJECTED.labels(str(r.code)).inc()
        if not r.addressable:
            log.warning("task_rejected_unaddressable", code=str(r.code), reason=r.message)
            return
        assert r.tenant is not None and r.task_id is not None
        m.TASKS.labels(workflow if workflow in self._known else "unknown", "rejected").inc()
        log.info("task_rejected", code=str(r.code), reason=r.message, task_id=r.task_id)
        event = Failed(
            task_id=r.task_id,
            tenant=r.tenant,
            session=r.session or "",
            ts=time.time(),
            error=_error(r.code, r.message),
        )
        await self.bus.publish(
            subjects.event(r.tenant, r.task_id),
            event,
            msg_id=f"{r.tenant}.{r.task_id}.failed",
            task_id=r.task_id,
        )

    # -- context -----------------------------------------------------------

    async def _append(
        self,
        run: RunState,
        session: str,
        msg_id: str,
        messages: list[ChatMessage],
        system: str | None = None,
    ) -> ContextRef | None:
        """Append to the context store; a refusal fails the run (None)."""
        request = ContextAppend(tenant=run.tenant, session=session, msg_id=msg_id,
                                messages=messages, system=system)  # fmt: skip
        return await self._context(run, "append", request, ContextAppendReply)

    async def _fork(self, run: RunState, ref: ContextRef, child: str) -> ContextRef | None:
        """A child session sharing ``ref``'s prefix (idempotent); None fails the run."""
        request = ContextFork(tenant=run.tenant, ref=ref, child=child)
        return await self._context(run, "fork", request, ForkReply)

    async def _context(
        self, run: RunState, op: str, request: Any, reply_type: type[Any]
    ) -> ContextRef | None:
        """One context-store call that returns a ref. No answer: nak (retried
        later); a refusal: the run fails at the context layer (None)."""
        try:
            reply = await self.bus.request(subjects.context_api(op, run.tenant), request,
                                           reply_type, task_id=run.task_id)  # fmt: skip
        except TimeoutError as exc:
            raise Nak(2.0, "context store did not answer") from exc
        if reply.error is not None or reply.ref is None:
            err = reply.error or _error(ErrorCode.CONTEXT_UNAVAILABLE, "no ref returned")
            await self._finish(run, error=err)
            return None
        ref: ContextRef = reply.ref
        return ref

    # -- steps -------------------------------------------------------------

    def _remaining_tokens(self, run: RunState) -> int | None:
        if run.budget is None or run.budget.max_tokens is None:
            return None
        return run.budget.max_tokens - run.usage.total_tokens

    def _over_usd(self, run: RunState) -> bool:
        return (
            run.budget is not None
            and run.budget.max_usd is not None
            and run.cost_usd >= run.budget.max_usd
        )

    async def _dispatch(
        self, run: RunState, wf: GraphWorkflow, plans: list[StepPlan], refs: dict[str, ContextRef]
    ) -> RunState:
        """Fork the sessions of parallel branches, record the steps (CAS), then
        publish their jobs and events."""
        refs = dict(refs)
        for p in plans:
            if p.session != run.session and p.step_id not in run.steps:
                forked = await self._fork(run, refs[p.step_id], p.session)
                if forked is None:
                    return run
                refs[p.step_id] = forked
        new: list[str] = []
        budget_stop: list[str] = []

        def change(r: RunState) -> bool:
            new.clear()
            budget_stop.clear()
            if r.terminal:
                return False
            remaining = self._remaining_tokens(r)
            todo = [p for p in plans if p.step_id not in r.steps]
            # Parallel branches share what remains; each step's prompt window and
            # answer together stay within its share, so a run never overshoots.
            share = None if remaining is None or not todo else remaining // len(todo)
            for p in todo:
                agent = wf.agents[p.agent]
                if (share is not None and share < MIN_STEP_TOKENS) or self._over_usd(r):
                    budget_stop.append(p.step_id)
                    _stop_for_budget(r, f"before step {p.step_id}")
                    return True
                max_tokens, window = agent.max_tokens, 0
                if share is not None:
                    max_tokens = min(agent.max_tokens, share // 2)
                    window = share - max_tokens
                r.steps[p.step_id] = StepState(
                    agent=p.agent,
                    pool=agent.pool,
                    session=p.session,
                    max_tokens=max_tokens,
                    context_budget=window,
                    dispatched_at=time.time(),
                    ref=refs[p.step_id],
                )
                new.append(p.step_id)
            return bool(new)

        updated = await self.runs.update(run.tenant, run.task_id, change)
        assert updated is not None
        if budget_stop:
            m.BUDGET_STOPS.labels(run.workflow).inc()
            await self._finished_metrics(updated)
            await self._terminal_event(updated)
            return updated
        for step_id in new:
            st = updated.steps[step_id]
            await self._step_event(updated, step_id, st, done=False)
            await self._publish_job(updated, step_id, st)
            await self._arm_timer(updated, step_id, st)
            m.STEPS_IN_FLIGHT.inc()
        return updated

    async def _publish_job(self, run: RunState, step_id: str, st: StepState) -> None:
        assert st.ref is not None
        agent = self.workflows[run.workflow].agents[st.agent]
        job = InferenceJob(
            job_id=f"{run.tenant}.{run.task_id}.{step_id}",
            task_id=run.task_id,
            tenant=run.tenant,
            session=st.session,
            workflow=run.workflow,
            step=step_id,
            agent=st.agent,
            ref=st.ref,
            max_tokens=st.max_tokens,
            context_budget=st.context_budget,
            temperature=agent.temperature,
            system=agent.system,
            response_schema=self.workflows[run.workflow].route_schema(step_id),
            published_at=time.time(),
        )
        warm = self.router.choose(run.tenant, st.session, st.pool)
        m.ROUTING.labels("warm" if warm else "pool").inc()
        subject = subjects.worker_job(st.pool, warm) if warm else subjects.job(st.pool)
        # A retry after a timeout is a new message; the job id (and so the
        # worker's idempotent append and result) stays the same.
        msg_id = job.job_id if st.attempt == 1 else f"{job.job_id}#{st.attempt}"
        await self.bus.publish(subject, job, msg_id=msg_id, task_id=run.task_id)

    # -- timeouts ----------------------------------------------------------

    def _timeout(self, run: RunState, st: StepState) -> float:
        agent = self.workflows[run.workflow].agents[st.agent]
        return agent.timeout or self.s.step_timeout

    async def _arm_timer(self, run: RunState, step_id: str, st: StepState) -> None:
        timer = StepTimer(tenant=run.tenant, task_id=run.task_id, step=step_id,
                          attempt=st.attempt, due=time.time() + self._timeout(run, st))  # fmt: skip
        await self.bus.publish(
            subjects.timer(run.tenant, run.task_id), timer,
            msg_id=f"{run.tenant}.{run.task_id}.{step_id}.t{st.attempt}", task_id=run.task_id,
        )  # fmt: skip

    async def on_timer(self, d: Delivery) -> None:
        """A step's timer: not due yet -> back to sleep (nak with the delay);
        due and still unanswered -> dispatch again, or fail the run."""
        try:
            t = d.decode(StepTimer)
        except codec.DecodeError as exc:
            raise Term(f"undecodable timer: {exc}") from exc
        left = t.due - time.time()
        if left > 0:
            raise Nak(min(left, 300.0), "not due")
        structlog.contextvars.bind_contextvars(task_id=t.task_id, tenant=t.tenant)
        run = await self.runs.get(t.tenant, t.task_id)
        st = run.steps.get(t.step) if run is not None else None
        if run is None or run.terminal or st is None:
            return
        if st.status != "dispatched" or st.attempt != t.attempt:
            return  # answered, or already retried
        if st.attempt > self.s.step_retries:
            m.STEPS_IN_FLIGHT.dec()
            message = (f"step {t.step} got no answer within {self._timeout(run, st):.0f}s, "
                       f"{st.attempt} attempt(s)")  # fmt: skip
            await self._finish(run, error=_error(ErrorCode.STEP_TIMEOUT, message), step=t.step)
            return

        def retry(r: RunState) -> bool:
            s = r.steps.get(t.step)
            if r.terminal or s is None or s.status != "dispatched" or s.attempt != t.attempt:
                return False
            s.attempt += 1
            return True

        updated = await self.runs.update(t.tenant, t.task_id, retry)
        if updated is None or updated.steps[t.step].attempt != t.attempt + 1:
            return
        log.warning("step_timeout_retry", step=t.step, attempt=t.attempt + 1)
        st = updated.steps[t.step]
        await self._publish_job(updated, t.step, st)
        await self._arm_timer(updated, t.step, st)

    # -- results -----------------------------------------------------------

    async def on_result(self, d: Delivery) -> None:
        try:
            res = d.decode(InferenceResult)
        except codec.DecodeError as exc:
            raise Term(f"undecodable result: {exc}") from exc
        structlog.contextvars.bind_contextvars(task_id=res.task_id, tenant=res.tenant)
        if not (is_valid_id(res.tenant) and is_valid_id(res.task_id)):
            raise Term("result with invalid ids")
        if d.num_delivered > 1:  # resuming: re-emit what the state implies
            known = await self.runs.get(res.tenant, res.task_id)
            if known is None:
                raise Term(f"result for unknown run {res.tenant}.{res.task_id}")
            await self._replay(known)
        recorded = missing = False

        def record(r: RunState) -> bool:
            nonlocal recorded, missing
            s = r.steps.get(res.step)
            recorded, missing = False, s is None and not r.terminal
            if r.terminal or s is None or s.status != "dispatched" or res.error is not None:
                return False
            s.status, s.finished_at, s.output = "done", time.time(), res.output
            s.usage, s.worker = res.usage, res.worker
            s.cost_usd = res.usage.gpu_seconds / 3600.0 * self.s.price(s.pool)
            s.cached_tokens, s.ref = res.cached_tokens, res.ref or s.ref
            r.usage = r.usage + res.usage
            r.cost_usd += s.cost_usd
            recorded = True
            return True

        # One read-modify-write: the run as it is now, updated only if this
        # result is the first answer to a dispatched step.
        run = await self.runs.update(res.tenant, res.task_id, record)
        if run is None:
            raise Term(f"result for unknown run {res.tenant}.{res.task_id}")
        if missing:
            raise Nak(0.5, f"step {res.step} not recorded yet")
        st = run.steps.get(res.step)
        wf = self.workflows[run.workflow]
        if res.error is not None:
            if run.terminal or st is None or st.status != "dispatched":
                return  # a late or duplicate error
            m.STEPS_IN_FLIGHT.dec()
            if res.error.code == ErrorCode.BUDGET_TOO_SMALL and st.context_budget:
                # The window was cut to fit the task's budget: the budget ran out.
                m.BUDGET_STOPS.labels(run.workflow).inc()
                await self._finish(run, budget_stop=f"at step {res.step}", step=res.step)
                return
            await self._finish(run, error=res.error, step=res.step)
            return
        if not recorded:
            return  # the run ended, or another delivery recorded this answer first
        assert st is not None
        m.STEPS_IN_FLIGHT.dec()
        self.router.served(run.tenant, st.session, st.pool, res.worker)
        labels = (run.workflow, st.agent)
        m.STEP_LATENCY.labels(*labels).observe(st.finished_at - st.dispatched_at)
        m.TOKENS.labels(*labels, "prompt").inc(res.usage.prompt_tokens)
        m.TOKENS.labels(*labels, "completion").inc(res.usage.completion_tokens)
        m.GPU_SECONDS.labels(*labels).inc(res.usage.gpu_seconds)
        m.COST.labels(*labels).inc(st.cost_usd)
        await self._step_event(run, res.step, st, done=True)
        nxt = wf.advance(run, res.step)
        if isinstance(nxt, Done):
            await self._finish(run, output=nxt.output)
        elif nxt:
            ref = res.ref
            if st.session != run.session:  # fan-in: bring the branches' answers home
                answers = [ChatMessage(role="user", name=agent, content=f"[{agent}] {text}")
                           for agent, text in wf.fan_in(run, res.step)]  # fmt: skip
                ref = await self._append(run, run.session, f"{res.step}:fanin", answers)
                if ref is None:
                    return
            assert ref is not None
            await self._dispatch(run, wf, nxt, {p.step_id: ref for p in nxt})

    # -- cancellation ------------------------------------------------------

    async def cancel(self, tenant: str, task_id: str) -> RunState | None:
        """Stop a run: mark it cancelled, tell workers to abort its
        generations, publish ``failed`` with code ``cancelled``. Idempotent;
        None when there is no such run."""

        def close(r: RunState) -> bool:
            if r.terminal:
                return False
            r.status = "cancelled"
            r.error = _error(ErrorCode.CANCELLED, "cancelled by request")
            r.output = _latest_output(r)
            return True

        run = await self.runs.update(tenant, task_id, close)
        if run is None:
            return None
        await self.bus.notify(subjects.cancel(tenant, task_id),
                              Cancel(tenant=tenant, task_id=task_id), task_id=task_id)  # fmt: skip
        if run.status == "cancelled":
            await self._finished_metrics(run)
            await self._terminal_event(run)
        return run

    # -- the end -----------------------------------------------------------

    async def _finish(
        self,
        run: RunState,
        *,
        output: str | None = None,
        error: ErrorInfo | None = None,
        step: str | None = None,
        budget_stop: str | None = None,
    ) -> None:
        def close(r: RunState) -> bool:
            if r.terminal:
                return False
            if budget_stop is not None:
                _stop_for_budget(r, budget_stop)
                if step is not None and step in r.steps:
                    r.steps[step].status = "failed"
            elif error is not None:
                r.status, r.error = "failed", error
                r.output = _latest_output(r)
                if step is not None and step in r.steps:
                    r.steps[step].status = "failed"
            else:
                r.status, r.output = "completed", output or ""
            return True

        updated = await self.runs.update(run.tenant, run.task_id, close)
        if updated is None:
            return
        await self._finished_metrics(updated)
        await self._terminal_event(updated)

    async def _finished_metrics(self, run: RunState) -> None:
        outcome = run.status
        if run.error is not None and run.error.code == ErrorCode.BUDGET_EXCEEDED:
            outcome = "budget_exceeded"
        m.TASKS.labels(run.workflow, outcome).inc()
        m.TASK_LATENCY.labels(run.workflow).observe(time.time() - run.created_at)
        log.info(
            "task_finished",
            outcome=outcome,
            tokens=run.usage.total_tokens,
            cost_usd=round(run.cost_usd, 8),
        )
