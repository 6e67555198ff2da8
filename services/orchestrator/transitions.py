"""The orchestrator's decisions as pure functions: ``(run, message) -> (run', effects)``.

No I/O and no clock (``now`` is passed in); the conductor loads the run,
decides, stores ``run'`` with one compare-and-set, then performs the effects
(docs/architecture.md, "How a task flows"). Every effect has a deterministic
id (``proto.keys``), so performing it twice is a no-op: a message redelivered
after a crash, finding its change already stored, gets back the effects the
stored state implies (``replay``). A decision that needs the context store
first returns ``Need(ops)``; the shell performs them, puts the answers in
``ctx`` under ``op.key`` and calls the same function again. Input steps:
docs/workflows.md, "Human input"."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from proto import codec, keys
from proto.errors import ErrorCode
from proto.messages import (
    Accepted,
    Budget,
    ChatMessage,
    Completed,
    ContextRef,
    ErrorInfo,
    Failed,
    InferenceJob,
    InferenceResult,
    InputAnswer,
    Step,
    StepEventStatus,
    TaskEvent,
    ToolJob,
    ToolResult,
    ToolSpec,
    Usage,
)
from proto.sizes import MAX_INPUT_BYTES
from proto.submission import TaskRejected
from proto.tools import BUILTIN_SPECS

from . import placement, waterfall
from .state import ERASED, CallState, RunState, StepState
from .workflows import Done, GraphWorkflow, StepPlan
from .workflows.graph import is_step_id

MIN_STEP_TOKENS = 32  # below this share of the budget, a step is not worth dispatching
# A watchdog sleeps at most this long between looks, unless every deadline a
# transition can set lies further ahead (``Rules.timer_sleep``).
MAX_TIMER_SLEEP = 300.0
MIN_TIMER_SLEEP = 0.05  # ...and at least this long, once it has looked
INPUT_DEFAULT: Final = "input_default"  # a timer's note: an input step took its default answer
NOT_A_RUN: Final = "not_a_workflow_run"  # a rejected task's claim on its id: nothing to advance
# Why a transition changed nothing (or, for INPUT_DEFAULT, how it did): the
# shell branches on it, so it is a closed set.
Note = Literal[
    "",
    "duplicate_task",
    "rejected",
    "resumed",
    "already_recorded",
    "input_default",
    "not_a_workflow_run",
    "finished",
    "not_waiting",
    "already_answered",
    "moved",  # a step moved to a larger pool after prompt_too_long
]


# -- what a decision may ask for before it is made ---------------------------


@dataclass(frozen=True, slots=True)
class AppendOp:
    """Append to a session (idempotent by ``msg_id``)."""

    session: str
    msg_id: str
    messages: tuple[ChatMessage, ...]
    system: str | None = None

    @property
    def key(self) -> str:
        return f"append:{self.session}:{self.msg_id}"


@dataclass(frozen=True, slots=True)
class ForkOp:
    """Fork ``ref``'s prefix into session ``child`` (idempotent); ``upto``:
    only its first ``upto`` messages."""

    ref: ContextRef
    child: str
    upto: int | None = None

    @property
    def key(self) -> str:
        return f"fork:{self.child}"


ContextOp = AppendOp | ForkOp
Ctx = Mapping[str, ContextRef | ErrorInfo]


# -- effects ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Emit:
    """Publish a task event under ``keys.event(tenant, task_id, key)``."""

    key: str
    event: TaskEvent


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Publish a step's job (the shell picks the subject: pool or warm worker)."""

    job: InferenceJob
    pool: str
    msg_id: str


@dataclass(frozen=True, slots=True)
class DispatchTool:
    """Publish a tool call on ``baton.tools.<pool>``."""

    job: ToolJob
    pool: str
    msg_id: str


@dataclass(frozen=True, slots=True)
class Watch:
    """Arm the run's durable watchdog: look at the run at ``due``."""

    due: float


@dataclass(frozen=True, slots=True)
class AbortGenerations:
    """Tell workers to stop the run's generations."""


Effect = Emit | Dispatch | DispatchTool | Watch | AbortGenerations


# -- outcomes ---------------------------------------------------------------


@dataclass(slots=True)
class Transition:
    """The run to store (when ``changed``) and the effects to perform after."""

    run: RunState
    changed: bool
    effects: list[Effect] = field(default_factory=list)
    wake_at: float | None = None  # timers: when to look again (None: never)
    note: Note = ""  # why nothing changed, for the log and the shell


@dataclass(frozen=True, slots=True)
class Need:
    """Perform these context ops, then decide again with their answers."""

    ops: tuple[ContextOp, ...]


@dataclass(frozen=True, slots=True)
class Defer:
    """Not decidable yet: redeliver the message after ``delay`` seconds."""

    delay: float
    reason: str


# What a decision returns ("outcome" is the bus's word: how a delivery is settled).
Verdict = Transition | Need | Defer


@dataclass(frozen=True, slots=True)
class Rules:
    """What the decisions depend on besides the run and the message."""

    workflows: Mapping[str, GraphWorkflow]
    step_timeout: float = 600.0
    step_retries: int = 1
    price: Callable[[str], float] = lambda pool: 0.0  # USD per GPU-hour of a pool
    # The spec (schema) of a tool an agent names: built-ins are known, MCP
    # tools come from the tool pools' catalogs. None: not offered (yet).
    tool_spec: Callable[[str], ToolSpec | None] = BUILTIN_SPECS.get
    tool_cpu_price: float = 0.0  # USD per CPU-hour of sandboxed tool time
    # The pools as they are now (PoolView.look: catalogue entry and state, a
    # read of memory). None: a step runs on its agent's first pool, unweighed.
    pools: placement.Look | None = None
    # The answer length an agent is expected to give (workflow, agent):
    # learnt from its steps, by prompt length (answers.AnswerLengths.expecting);
    # None: max_tokens.
    answer: Callable[[str, str], placement.Learnt] = lambda workflow, agent: None

    def timeout(self, run: RunState, agent: str) -> float:
        return self.workflows[run.workflow].agents[agent].timeout or self.step_timeout

    def timer_sleep(self) -> float:
        """The longest a run's watchdog may sleep before its due time.

        A deadline set while it sleeps (a step dispatched, an input step
        reached) is at least the shortest step or input timeout of any
        workflow away, so a sleep that long never oversleeps one: a timer
        costs one nak while its due time is far, not one every
        ``MAX_TIMER_SLEEP``. Never below ``MAX_TIMER_SLEEP`` (with shorter
        timeouts, a deadline set during the sleep is noticed within it)."""
        times = [self.step_timeout]
        for wf in self.workflows.values():
            times += [a.timeout or self.step_timeout for a in wf.agents.values()]
            times += [s.input.timeout for s in wf.spec.steps if s.input is not None]
        return max(MAX_TIMER_SLEEP, min(times))

    def tool_room(self, run: RunState, st: StepState) -> int:
        """How many more tool calls the step may make (its agent's ``max_tool_calls``)."""
        return self.workflows[run.workflow].agents[st.agent].max_tool_calls - len(st.calls)

    def tools_now(self, workflow: str, agent: str) -> tuple[list[str], str]:
        """The tools an agent is offered with the catalog as it is now, by
        name, and the choice: what a step freezes at its first dispatch."""
        spec = self.workflows[workflow].agents[agent]
        if not spec.tools or spec.tool_choice == "none":
            return [], "none"
        names = [n for n in spec.tools if self.tool_spec(n) is not None]
        return names, spec.tool_choice if names else "none"

    def offered(self, run: RunState, st: StepState) -> tuple[list[ToolSpec], str]:
        """The tools a step's next model turn is offered, and the choice: those
        frozen into the step at its first dispatch (a tool whose pools have
        all withdrawn it since is left out: nobody would run its calls); none
        once the step made ``max_tool_calls`` calls (the model must answer)."""
        if self.tool_room(run, st) <= 0:
            return [], "none"
        if st.tools is None:  # stored before steps froze their tools
            names, choice = self.tools_now(run.workflow, st.agent)
        else:
            names, choice = st.tools, st.tool_choice
        tools = [t for t in (self.tool_spec(n) for n in names) if t is not None]
        return tools, choice if tools else "none"


@dataclass(frozen=True, slots=True)
class NewTask:
    """An accepted task, as the run-creating message."""

    tenant: str
    task_id: str
    session: str
    workflow: str
    seq: int
    input: str
    budget: Budget | None = None
    metadata: Mapping[str, object] = field(default_factory=dict)
    max_tokens: int | None = None  # the task's cap on each step's answer
    temperature: float | None = None  # the task's, in place of the agents'
    trace: str = ""  # the caller's traceparent, kept in the run (spans.py)


@dataclass(frozen=True, slots=True)
class NewAnswer:
    """A human's answer to a task's input step (``step`` None: whichever waits)."""

    answer: str
    step: str | None = None
    redelivered: bool = False  # the same message again: replay what the state implies


# -- helpers ----------------------------------------------------------------


def _copy(run: RunState) -> RunState:
    """Decisions never change the run they are given."""
    return codec.decode_own(codec.encode(run), RunState)


def latest_output(r: RunState) -> str:
    """The partial output: the answer of the step that finished last."""
    done = [s for s in r.steps.values() if s.status == "done"]
    return max(done, key=lambda s: s.finished_at).output if done else ""


def in_flight(r: RunState | None) -> int:
    """Steps dispatched and unanswered (none once the run has ended)."""
    if r is None or r.terminal:
        return 0
    return sum(1 for s in r.steps.values() if s.status in ("dispatched", "tools"))


def _event(run: RunState, now: float, key: str, event: TaskEvent) -> Emit:
    event.task_id, event.tenant, event.session, event.ts = run.task_id, run.tenant, run.session, now
    return Emit(key, event)


def _placed(ev: Step, st: StepState) -> Step:
    """A model step's event with its placement (none before there was a choice)."""
    if st.pool_reason:
        ev.pool, ev.pool_reason, ev.prediction = st.pool, st.pool_reason, st.prediction
    return ev


def _started(run: RunState, now: float, step: str, st: StepState) -> Emit:
    ev = Step(task_id=run.task_id, step=step, agent=st.agent, status="started")
    return _event(run, now, keys.step_event(step, "started"), _placed(ev, st))


def _waiting_capacity(run: RunState, now: float, step: str, st: StepState) -> Emit:
    """The step's pool has no ready worker: its job waits in the pool's
    queue (whose backlog wakes the pool) for about ``capacity_wait`` s."""
    ev = Step(task_id=run.task_id, step=step, agent=st.agent, status="waiting_capacity",
              estimate_s=round(st.capacity_wait, 3))  # fmt: skip
    return _event(run, now, keys.step_event(step, "waiting_capacity"), _placed(ev, st))


def _placed_on(
    run: RunState, rules: Rules, now: float, st: StepState, d: placement.Decision
) -> None:
    """Freeze decision ``d`` into the step; a catalogued pool with no ready
    worker adds its expected wait to the step's deadline (a cold start is
    not a timeout). A pool the catalogue does not list declared no cold
    start: its steps time out as before."""
    chosen = d.chosen
    assert d.pool is not None and chosen is not None and rules.pools is not None
    st.pool, st.pool_reason = d.pool, d.reason
    st.prediction = placement.frozen(chosen)
    held = chosen.cold and rules.pools(d.pool)[0].listed
    st.capacity_wait = chosen.wait_s if held else 0.0
    st.dispatched_at, st.deadline = now, now + st.capacity_wait + rules.timeout(run, st.agent)


def _dispatched(run: RunState, rules: Rules, now: float, step: str, st: StepState) -> list[Effect]:
    """A model step placed: ``started`` (``waiting_capacity`` after it when
    its pool has no ready worker) and its job."""
    effects: list[Effect] = [_started(run, now, step, st)]
    if st.capacity_wait > 0:
        effects.append(_waiting_capacity(run, now, step, st))
    return [*effects, _job(run, rules, now, step, st)]


def _done(run: RunState, now: float, step: str, st: StepState) -> Emit:
    ev = Step(task_id=run.task_id, step=step, agent=st.agent, status="done", usage=st.usage,
              **waterfall.event_fields(st.timing))  # fmt: skip
    return _event(run, now, keys.step_event(step, "done"), _placed(ev, st))


def _step_failed(run: RunState, now: float, step: str, st: StepState) -> Emit:
    """A step that failed the run: its error code, usage and waterfall so far
    (the same key as ``done``: a step ends once)."""
    code = run.error.code if run.error is not None else None
    ev = Step(task_id=run.task_id, step=step, agent=st.agent, status="failed", usage=st.usage,
              outcome=code, **waterfall.event_fields(st.timing))  # fmt: skip
    return _event(run, now, keys.step_event(step, "done"), _placed(ev, st))


def _terminal(run: RunState, now: float) -> list[Effect]:
    if run.status == "completed":
        ev: TaskEvent = Completed(
            task_id=run.task_id, output=run.output, usage=run.usage, cost_usd=run.cost_usd
        )
        return [_event(run, now, keys.COMPLETED, ev)]
    if run.error is not None:
        failed = [_step_failed(run, now, k, st) for k, st in run.steps.items()
                  if st.status == "failed" and not st.input]  # fmt: skip
        ev = Failed(task_id=run.task_id, error=run.error, partial_output=run.output or None)
        return [*failed, _event(run, now, keys.FAILED, ev)]
    return []


def _job(run: RunState, rules: Rules, now: float, step: str, st: StepState) -> Dispatch:
    assert st.ref is not None
    wf = rules.workflows[run.workflow]
    agent = wf.agents[st.agent]
    tools, choice = rules.offered(run, st)
    job = InferenceJob(
        job_id=keys.job_turn(keys.job(run.tenant, run.task_id, step), st.turn),
        task_id=run.task_id,
        tenant=run.tenant,
        session=st.session,
        workflow=run.workflow,
        step=step,
        agent=st.agent,
        ref=st.ref,
        max_tokens=st.max_tokens,
        context_budget=st.context_budget,
        temperature=agent.temperature if run.temperature is None else run.temperature,
        system=agent.system,
        response_schema=wf.route_schema(step),
        tools=tools,
        tool_choice=choice,
        attempt=st.attempt,
        published_at=now,
    )
    return Dispatch(job, st.pool, keys.job_message(job.job_id, st.attempt))


def _tool_job(run: RunState, rules: Rules, step: str, st: StepState, key: str) -> DispatchTool:
    call = st.calls[key]
    agent = rules.workflows[run.workflow].agents[st.agent]
    call_id = keys.tool_call(run.tenant, run.task_id, step, key)
    job = ToolJob(
        call_id=call_id, task_id=run.task_id, tenant=run.tenant, session=st.session,
        step=step, tool=call.tool, arguments=call.arguments, tool_call_id=call.call_id,
        ref=st.ref, attempt=st.attempt, published_at=call.dispatched_at,
    )  # fmt: skip
    return DispatchTool(job, agent.tool_pool, keys.job_message(call_id, st.attempt))


def _tool_started(run: RunState, now: float, step: str, st: StepState, key: str) -> Emit:
    call = st.calls[key]
    ev = Step(task_id=run.task_id, step=step, agent=st.agent, status="started",
              tool=call.tool, call=key)  # fmt: skip
    return _event(run, now, keys.step_event(f"{step}.{key}", "started"), ev)


def _tool_done(run: RunState, now: float, step: str, st: StepState, key: str) -> Emit:
    call = st.calls[key]
    status: StepEventStatus = "done" if call.outcome == "ok" else "failed"
    ev = Step(task_id=run.task_id, step=step, agent=st.agent, status=status, tool=call.tool,
              call=key, outcome=call.outcome, seconds=round(call.seconds, 6),
              **waterfall.event_fields(call.timing))  # fmt: skip
    return _event(run, now, keys.step_event(f"{step}.{key}", "done"), ev)


def _next_look(run: RunState, rules: Rules, now: float) -> float | None:
    """When the watchdog should look next: the earliest step deadline."""
    if run.terminal:
        return None
    deadlines = [s.deadline for s in run.steps.values()
                 if s.status in ("dispatched", "tools", "waiting_input")]  # fmt: skip
    return min(deadlines) if deadlines else now + rules.step_timeout


def _fail(run: RunState, err: ErrorInfo, step: str | None = None) -> None:
    run.status, run.error, run.output = "failed", err, latest_output(run)
    if step is not None and step in run.steps:
        run.steps[step].status = "failed"


def _stop_for_budget(run: RunState, where: str, step: str | None = None) -> None:
    message = f"budget exhausted {where}: used {run.usage.total_tokens} tokens, ${run.cost_usd:.6f}"
    _fail(run, ErrorInfo.of(ErrorCode.BUDGET_EXCEEDED, message), step)


def _remaining_tokens(run: RunState) -> int | None:
    if run.budget is None or run.budget.max_tokens is None:
        return None
    return run.budget.max_tokens - run.usage.total_tokens


def _over_usd(run: RunState) -> bool:
    b = run.budget
    return b is not None and b.max_usd is not None and run.cost_usd >= b.max_usd


def _not_affordable(run: RunState, tokens: int | None) -> bool:
    """Whether the budget stops the run before a model turn that may use
    ``tokens`` (None: no token limit): too few to be worth it, or the USD spent."""
    return (tokens is not None and tokens < MIN_STEP_TOKENS) or _over_usd(run)


def _split(cap: int, tokens: int) -> tuple[int, int]:
    """A model turn's ``(max_tokens, context_budget)`` within ``tokens``: at
    most half (and ``cap``) for the answer, the rest for the prompt, so the
    turn never overshoots the budget."""
    max_tokens = min(cap, tokens // 2)
    return max_tokens, tokens - max_tokens


def _context(ctx: Ctx, op: ContextOp) -> ContextRef | ErrorInfo | None:
    return ctx.get(op.key)


# -- the decisions ----------------------------------------------------------


def replay(run: RunState, rules: Rules, now: float) -> list[Effect]:
    """Every effect the stored state implies (all de-duplicated downstream)."""
    if run.status == ERASED:
        return []  # nothing may be published again for an erased task
    if run.workflow not in rules.workflows:
        return []  # a rejected task's claim on its id: its one event was its ``failed``
    effects: list[Effect] = [
        _event(run, now, keys.ACCEPTED, Accepted(task_id=run.task_id, workflow=run.workflow))
    ]
    for step, st in run.steps.items():
        if st.input:  # waiting_input, and once answered done
            effects.append(_waiting_event(run, rules, now, step, st))
            if st.status == "done":
                effects.append(_answered_event(run, now, step, st))
            continue
        effects.append(_started(run, now, step, st))
        if st.capacity_wait > 0:
            effects.append(_waiting_capacity(run, now, step, st))
        for key, call in st.calls.items():
            effects.append(_tool_started(run, now, step, st, key))
            if call.status == "done":
                effects.append(_tool_done(run, now, step, st, key))
            elif st.status == "tools" and not run.terminal:
                effects.append(_tool_job(run, rules, step, st, key))
        if st.status == "done":
            effects.append(_done(run, now, step, st))
        elif st.status == "dispatched" and not run.terminal:
            effects.append(_job(run, rules, now, step, st))
    if run.terminal:
        effects += _terminal(run, now)
    else:
        effects.append(Watch(_next_look(run, rules, now) or now))
    return effects


def _dispatch(
    run: RunState,
    rules: Rules,
    now: float,
    ctx: Ctx,
    plans: list[StepPlan],
    ref: ContextRef,
) -> Need | list[Effect]:
    """Record ``plans`` as dispatched (forking parallel branches first) and
    return their effects; or stop the run when the budget cannot pay for them."""
    wf = rules.workflows[run.workflow]
    todo = [p for p in plans if p.step_id not in run.steps]
    if not todo:
        return []
    if todo[0].input is not None:  # an input step runs alone and costs no tokens
        return _wait_for_input(run, rules, now, todo[0], ref)
    remaining = _remaining_tokens(run)
    # Parallel branches share what remains; each step's prompt window and
    # answer together stay within its share, so a run never overshoots.
    share = None if remaining is None else remaining // len(todo)
    if _not_affordable(run, share):
        _stop_for_budget(run, f"before step {todo[0].step_id}")
        return _terminal(run, now)
    refs: dict[str, ContextRef] = {}
    missing: list[ContextOp] = []
    for p in todo:
        if p.session == run.session:
            refs[p.step_id] = ref
            continue
        op = ForkOp(ref, p.session)
        got = _context(ctx, op)
        if got is None:
            missing.append(op)
        elif isinstance(got, ErrorInfo):
            _fail(run, got)
            return _terminal(run, now)
        else:
            refs[p.step_id] = got
    if missing:
        return Need(tuple(missing))
    effects: list[Effect] = []
    for p in todo:
        agent = wf.agents[p.agent]
        cap = min(agent.max_tokens, run.max_tokens or agent.max_tokens)
        max_tokens, window = (cap, 0) if share is None else _split(cap, share)
        st = StepState(
            agent=p.agent,
            pool=agent.pool,
            session=p.session,
            max_tokens=max_tokens,
            context_budget=window,
            dispatched_at=now,
            deadline=now + rules.timeout(run, p.agent),
            ref=refs[p.step_id],
            timing=waterfall.begun(now),
            origin=ref,
        )
        st.tools, st.tool_choice = rules.tools_now(run.workflow, p.agent)
        run.steps[p.step_id] = st
        if rules.pools is not None:
            tools, _ = rules.offered(run, st)
            need = placement.step_need(run, agent, st, tools, rules.answer(run.workflow, p.agent))
            decision = placement.place(need, agent.eligible, agent.latency_target, rules.pools)
            chosen = decision.chosen
            if decision.pool is None or chosen is None:  # it fits no pool: fail now, not later
                st.finished_at, st.pool_reason = now, decision.reason
                why = placement.refusal(decision, need)
                _fail(run, ErrorInfo.of(ErrorCode.PROMPT_TOO_LONG, why), p.step_id)
                return _terminal(run, now)
            _placed_on(run, rules, now, st, decision)
        effects += _dispatched(run, rules, now, p.step_id, st)
    return effects


def start(run: RunState | None, task: NewTask, rules: Rules, now: float, ctx: Ctx) -> Verdict:
    """A task message: create the run with its first steps dispatched.
    An existing run: the same message again replays it; another message
    with the same task id is a duplicate and changes nothing."""
    if run is not None:
        if run.task_seq != task.seq:
            return Transition(run, False, note="duplicate_task")
        if run.workflow not in rules.workflows:  # the task was rejected: nothing resumes
            return Transition(run, False, note="rejected")
        return Transition(run, False, replay(run, rules, now), note="resumed")
    wf = rules.workflows[task.workflow]
    run = RunState(
        tenant=task.tenant,
        task_id=task.task_id,
        session=task.session,
        workflow=task.workflow,
        task_seq=task.seq,
        context_tokens=placement.estimate_tokens(task.input),
        newest_tokens=placement.estimate_tokens(task.input),
        budget=task.budget,
        max_tokens=task.max_tokens,
        temperature=task.temperature,
        metadata=dict(task.metadata),
        created_at=now,
        updated_at=now,
        trace=task.trace,
    )
    effects: list[Effect] = [
        _event(run, now, keys.ACCEPTED, Accepted(task_id=run.task_id, workflow=run.workflow))
    ]
    plans = wf.start(run)
    op = AppendOp(
        run.session,
        keys.task_input(run.task_id),
        (ChatMessage(role="user", content=task.input),),
        system=wf.agents[plans[0].agent].system if plans[0].input is None else None,
    )
    got = _context(ctx, op)
    if got is None:
        return Need((op,))
    if isinstance(got, ErrorInfo):
        _fail(run, got)
        return Transition(run, True, effects + _terminal(run, now))
    more = _dispatch(run, rules, now, ctx, plans, got)
    if isinstance(more, Need):
        return more
    effects += more
    look = _next_look(run, rules, now)
    if look is not None:
        effects.append(Watch(look))
    return Transition(run, True, effects)


def reject(run: RunState | None, r: TaskRejected, seq: int, now: float) -> Transition:
    """A task refused at intake (``r`` names its tenant and task id), the
    message at stream sequence ``seq``; ``run``: what its id holds. The
    rejection claims the id as a failed run of no workflow (to store when
    ``changed``), so a task id has one terminal event, whichever of a bad and
    a good copy comes first. A run of another message means this one is a
    copy of a known task: nothing to say (``duplicate_task``). Otherwise (no
    run, or this message's own, redelivered) the ``failed`` event goes out."""
    assert r.tenant is not None and r.task_id is not None, "an unaddressable rejection"
    if run is not None and run.task_seq != seq:
        return Transition(run, False, note="duplicate_task")
    error = ErrorInfo.of(r.code, r.message, r.retry_after)
    session = r.session or ""
    failed = Failed(task_id=r.task_id, tenant=r.tenant, session=session, ts=now, error=error)
    if run is not None:
        return Transition(run, False, [Emit(keys.FAILED, failed)], note="rejected")
    claim = RunState(tenant=r.tenant, task_id=r.task_id, session=session, workflow="",
                     task_seq=seq, status="failed", error=error, created_at=now,
                     updated_at=now)  # fmt: skip
    return Transition(claim, True, [Emit(keys.FAILED, failed)], note="rejected")


@dataclass(frozen=True, slots=True)
class NewFork:
    """Run a task's workflow again from one of its finished steps, as task
    ``task_id`` on session ``session`` (a fork of the old run's)."""

    task_id: str
    session: str
    step: str
    input: str | None = None  # the edit (``fork``'s docstring); None: the step as it was
    trace: str = ""  # the caller's traceparent, kept in the run (spans.py)


def fork_refusal(source: RunState, step: str, rules: Rules) -> str | None:
    """Why ``source`` cannot be forked from ``step`` (None: it can)."""
    if source.workflow not in rules.workflows:
        return f"task {source.task_id!r} ran no workflow (it was rejected)"
    st = source.steps.get(step)
    if st is None:
        return f"task {source.task_id!r} has no step {step!r}"
    if st.input:
        return f"{step} is an input step: fork from the step after it with the answer as input"
    if st.status not in ("done", "failed"):
        return f"step {step} has not finished ({st.status})"
    if st.origin is None:
        return f"step {step} was recorded before runs could be forked"
    return None


def fork(
    run: RunState | None, source: RunState, req: NewFork, rules: Rules, now: float, ctx: Ctx
) -> Verdict:
    """A new run of ``source``'s workflow from its finished step ``req.step``
    (``fork_refusal`` said it may): its session is a fork of ``source``'s at
    the context the step started from; the steps that finished before it are
    carried over as they were (not run again, their usage not counted again);
    the step runs again — a parallel step with all its branches — reading the
    edit. From the run's first step the edit replaces the task's input;
    from a later one it is added as the newest user message. ``source`` is
    not changed. The same request again (the new run exists) replays it;
    another request for that task id changes nothing."""
    if run is not None:
        if (run.forked_from, run.forked_at) != (source.task_id, req.step):
            return Transition(run, False, note="duplicate_task")
        return Transition(run, False, replay(run, rules, now), note="resumed")
    wf = rules.workflows[source.workflow]
    st = source.steps[req.step]
    assert st.origin is not None
    at = wf.position(req.step)
    replace = req.input is not None and at == (1, 0)
    run = RunState(
        tenant=source.tenant, task_id=req.task_id, session=req.session,
        workflow=source.workflow, task_seq=0, budget=source.budget,
        max_tokens=source.max_tokens, temperature=source.temperature,
        metadata=dict(source.metadata), created_at=now, updated_at=now,
        forked_from=source.task_id, forked_at=req.step, trace=req.trace,
    )  # fmt: skip
    ops: list[ContextOp] = [ForkOp(st.origin, req.session, st.origin.version - 1 if replace
                                   else None)]  # fmt: skip
    if req.input is not None:
        edit = (ChatMessage(role="user", content=req.input),)
        ops.append(AppendOp(req.session, keys.task_input(req.task_id), edit))
    ref: ContextRef | None = None
    for op in ops:  # in order: the fork must exist before the edit is appended to it
        got = _context(ctx, op)
        if got is None:
            return Need((op,))
        if isinstance(got, ErrorInfo):
            _fail(run, got)
            return Transition(run, True, replay(run, rules, now))
        ref = got
    assert ref is not None
    for step, done in source.steps.items():
        if done.status == "done" and wf.position(step) < at:
            run.steps[step] = codec.decode_own(codec.encode(done), StepState)
            run.steps[step].carried = True
    more = _dispatch(run, rules, now, ctx, wf.again(run, req.step), ref)
    if isinstance(more, Need):
        return more
    return Transition(run, True, replay(run, rules, now))


def warmed(run: RunState, res: InferenceResult, rules: Rules) -> Transition:
    """A pre-warm's GPU time (``res.warm``): the prefill it ran is engine time
    spent for the run, so it is added to the run's usage and cost (and so to
    its tenant's, and against its budget) — once per warm. A run that ended
    meanwhile is not changed again (its totals were published)."""
    if run.terminal or res.job_id in run.warms or res.error is not None:
        return Transition(run, False, note="already_recorded")
    run = _copy(run)
    gpu = Usage(gpu_seconds=res.usage.gpu_seconds)
    cost = gpu.gpu_seconds / 3600.0 * rules.price(res.pool)
    run.usage = run.usage + gpu
    run.cost_usd += cost
    run.warms[res.job_id] = cost
    return Transition(run, True, [])


def result(
    run: RunState,
    res: InferenceResult,
    rules: Rules,
    now: float,
    ctx: Ctx,
    received: float | None = None,
    *,
    redelivered: bool = False,
) -> Verdict:
    """A step's answer (or error): record it and advance — dispatch what
    follows, or finish — all in the one state change. A result for a step
    already answered changes nothing. ``redelivered``: the same message
    again (a crash after storing its change): the stored state's effects are
    replayed, so the run is never stranded; a late duplicate (a retried job
    answering twice) replays nothing, so it cannot republish the run's events
    after their de-duplication window. ``received``: when the answer arrived
    (the step's end), before any context op the decision needed; default
    ``now``."""
    run = _copy(run)
    st = run.steps.get(res.step)
    if st is None and not run.terminal:
        return Defer(0.5, f"step {res.step} not recorded yet")
    again = replay(run, rules, now) if redelivered else []
    if run.terminal or st is None or st.status != "dispatched":
        return Transition(run, False, again, note="already_recorded")
    if res.job_id != keys.job_turn(keys.job(run.tenant, run.task_id, res.step), st.turn):
        # An earlier turn's answer delivered again: that turn is recorded.
        return Transition(run, False, again, note="already_recorded")
    end = now if received is None else received
    st.timing = waterfall.add_turn(st.timing, waterfall.arrived(res.timing, end), end)
    if res.error is not None:
        moved = _move(run, rules, now, res, st)
        if moved is not None:
            return moved
        st.finished_at = end
        if res.error.code == ErrorCode.BUDGET_TOO_SMALL and st.context_budget:
            # The window was cut to fit the task's budget: the budget ran out.
            _stop_for_budget(run, f"at step {res.step}", res.step)
        else:
            _fail(run, res.error, res.step)
        return Transition(run, True, _terminal(run, now))
    # Every model turn of the step adds up (a step that called tools had several).
    cost = res.usage.gpu_seconds / 3600.0 * rules.price(st.pool)
    st.usage, st.worker, st.cost_usd = st.usage + res.usage, res.worker, st.cost_usd + cost
    st.cached_tokens, st.ref = res.cached_tokens, res.ref or st.ref
    if st.session == run.session:  # the session grew by this turn, as the engine counted it
        tools, _ = rules.offered(run, st)
        seen = res.usage.prompt_tokens + res.usage.completion_tokens
        fixed = placement.fixed_tokens(rules.workflows[run.workflow].agents[st.agent], tools)
        run.context_tokens = max(run.context_tokens, seen - fixed)
        run.newest_tokens = res.usage.completion_tokens
    run.usage = run.usage + res.usage
    run.cost_usd += cost
    if res.tool_calls and rules.tool_room(run, st) > 0:
        return _call_tools(run, rules, now, res)
    st.status, st.finished_at, st.output = "done", end, res.output
    effects: list[Effect] = [_done(run, now, res.step, st)]
    wf = rules.workflows[run.workflow]
    nxt = wf.advance(run, res.step)
    if isinstance(nxt, Done):
        run.status, run.output = "completed", nxt.output
        return Transition(run, True, effects + _terminal(run, now))
    if not nxt:  # other branches of a parallel step still run
        return Transition(run, True, effects)
    ref = st.ref
    if st.session != run.session:  # fan-in: bring the branches' answers home
        answers = tuple(
            ChatMessage(role="user", name=agent,
                        content=f"[{agent}] {branch.output}" + _tool_notes(agent, branch))
            for agent, branch in wf.fan_in(run, res.step)
        )  # fmt: skip
        op = AppendOp(run.session, keys.fan_in(run.task_id, res.step), answers)
        got = _context(ctx, op)
        if got is None:
            return Need((op,))
        run.context_tokens += sum(placement.estimate_tokens(a.content) for a in answers)
        run.newest_tokens = placement.estimate_tokens(answers[-1].content) if answers else 0
        if isinstance(got, ErrorInfo):
            _fail(run, got)
            return Transition(run, True, effects + _terminal(run, now))
        ref = got
    assert ref is not None
    more = _dispatch(run, rules, now, ctx, nxt, ref)
    if isinstance(more, Need):
        return more
    return Transition(run, True, effects + more)


def _move(
    run: RunState, rules: Rules, now: float, res: InferenceResult, st: StepState
) -> Transition | None:
    """A worker found the step's prompt too long for its pool (its engine's
    ``prompt_too_long``, or ``budget_too_small`` for a window cut to the
    worker's own context): dispatch the
    step again to a pool of its agent's with a longer context, if there is
    one (a move, not a retry: ``moves`` keeps it out of ``step_retries``).
    None: nowhere to move it; the error stands."""
    agent = rules.workflows[run.workflow].agents[st.agent]
    err = res.error
    # The engine refused the prompt, or the worker could not cut a window to
    # fit its own context (no budget of the task's own: the worker's limit).
    too_long = err is not None and (
        err.code == ErrorCode.PROMPT_TOO_LONG
        or (err.code == ErrorCode.BUDGET_TOO_SMALL and not st.context_budget)
    )
    if not too_long or rules.pools is None or len(agent.eligible) < 2:
        return None
    tools, _ = rules.offered(run, st)
    need = placement.step_need(run, agent, st, tools, rules.answer(run.workflow, st.agent))
    decision = placement.move(need, agent.eligible, st.pool, rules.pools)
    chosen = decision.chosen
    if decision.pool is None or chosen is None:
        return None
    _placed_on(run, rules, now, st, decision)
    st.moves += 1
    st.attempt += 1
    effects: list[Effect] = [_job(run, rules, now, res.step, st)]
    if st.capacity_wait > 0:
        effects.insert(0, _waiting_capacity(run, now, res.step, st))
    return Transition(run, True, effects, note="moved")


def _tool_notes(agent: str, st: StepState) -> str:
    """What a branch's tool calls returned, for the agents after the fan-in."""
    return "".join(f"\n[{agent} called {c.tool}: {c.outcome}] {c.preview}"
                   for c in st.calls.values() if c.status == "done")  # fmt: skip


def _call_tools(run: RunState, rules: Rules, now: float, res: InferenceResult) -> Transition:
    """The model's turn called tools: record each call as a sub-step of the
    step and dispatch them all at once (they run in parallel); the step waits."""
    st = run.steps[res.step]
    if _over_usd(run):
        _stop_for_budget(run, f"at step {res.step}", res.step)
        return Transition(run, True, _terminal(run, now))
    room = rules.tool_room(run, st)
    st.status, st.attempt = "tools", 1
    st.dispatched_at, st.deadline = now, now + rules.timeout(run, st.agent)
    effects: list[Effect] = []
    for i, c in enumerate(res.tool_calls[:room]):
        key = keys.call_key(st.turn, i)
        st.calls[key] = CallState(tool=c.name, arguments=c.arguments, call_id=c.id,
                                  dispatched_at=now)  # fmt: skip
        effects += [_tool_started(run, now, res.step, st, key),
                    _tool_job(run, rules, res.step, st, key)]  # fmt: skip
    return Transition(run, True, effects)


def tool_result(
    run: RunState,
    res: ToolResult,
    rules: Rules,
    now: float,
    received: float | None = None,
    *,
    redelivered: bool = False,
) -> Verdict:
    """A tool call's result: record it (its CPU time into usage and cost);
    once every call of the turn is answered, the model goes again on the
    session that now holds their results — or, past ``max_tool_calls``,
    without tools, so it answers. ``received``: when the result arrived
    (default ``now``)."""
    run = _copy(run)
    st = run.steps.get(res.step)
    prefix = keys.tool_call(run.tenant, run.task_id, res.step, "")
    key = res.call_id[len(prefix) :] if res.call_id.startswith(prefix) else ""
    call = st.calls.get(key) if st is not None else None
    if call is None and not run.terminal:
        return Defer(0.5, f"tool call {res.call_id} not recorded yet")
    if run.terminal or st is None or call is None or call.status != "dispatched":
        again = replay(run, rules, now) if redelivered else []  # as ``result``
        return Transition(run, False, again, note="already_recorded")
    call.status, call.outcome, call.preview = "done", res.outcome, res.preview[:512]
    call.cpu_seconds, call.seconds, call.ref = res.cpu_seconds, res.seconds, res.ref
    end = now if received is None else received
    call.timing = waterfall.arrived(res.timing, end) or waterfall.add_turn(
        waterfall.begun(call.dispatched_at), None, end
    )
    used = Usage(tool_cpu_seconds=res.cpu_seconds)
    cost = res.cpu_seconds / 3600.0 * rules.tool_cpu_price
    st.usage, st.cost_usd = st.usage + used, st.cost_usd + cost
    run.usage, run.cost_usd = run.usage + used, run.cost_usd + cost
    effects: list[Effect] = [_tool_done(run, now, res.step, st, key)]
    turn = [c for k, c in st.calls.items() if k.startswith(keys.call_prefix(st.turn))]
    if st.status != "tools" or any(c.status != "done" for c in turn):
        return Transition(run, True, effects)
    st.timing = waterfall.add_tool_wait(st.timing, end - st.dispatched_at)
    refs = [c.ref for c in turn if c.ref is not None]
    if refs:  # the newest append covers every result of the turn
        st.ref = max(refs, key=lambda r: r.version)
    remaining = _remaining_tokens(run)
    if _not_affordable(run, remaining):
        _stop_for_budget(run, f"at step {res.step}", res.step)
        return Transition(run, True, effects + _terminal(run, now))
    if remaining is not None:
        st.max_tokens, st.context_budget = _split(st.max_tokens, remaining)
    st.turn, st.status, st.attempt = st.turn + 1, "dispatched", 1
    st.dispatched_at, st.deadline = now, now + rules.timeout(run, st.agent)
    effects.append(_job(run, rules, now, res.step, st))
    return Transition(run, True, effects)


def still_asleep(due: float, now: float, longest: float) -> float | None:
    """A watchdog due at ``due``: the delay to sleep for again (at most
    ``longest``, ``Rules.timer_sleep``), or None once it is due."""
    left = due - now
    return min(left, longest) if left > 0 else None


def next_look(wake_at: float, now: float, longest: float) -> float:
    """After a look, the delay until the next one (``Transition.wake_at``):
    at most ``longest``, and never below ``MIN_TIMER_SLEEP`` (a deadline
    already past is looked at again soon, not at once in a loop)."""
    return min(max(MIN_TIMER_SLEEP, wake_at - now), longest)


def timer(run: RunState, rules: Rules, now: float, ctx: Ctx | None = None) -> Verdict:
    """The watchdog looks at the run: a step past its deadline is dispatched
    again (up to ``step_retries`` times), then the run fails with
    ``step_timeout``; an input step past its deadline takes its default
    answer. ``wake_at``: when to look again."""
    if run.terminal:
        return Transition(run, False)
    run = _copy(run)
    for step, st in run.steps.items():
        if st.status == "waiting_input" and st.deadline <= now:
            spec = rules.workflows[run.workflow].input_spec(step)
            assert spec is not None
            out = _take_answer(run, rules, now, ctx or {}, step, spec.default, "default")
            if isinstance(out, Transition):
                out.wake_at, out.note = _next_look(out.run, rules, now), INPUT_DEFAULT
            return out
    effects: list[Effect] = []
    changed = False
    for step, st in run.steps.items():
        if st.status not in ("dispatched", "tools") or st.deadline > now:
            continue
        changed = True
        timeout = rules.timeout(run, st.agent)
        if st.attempt - st.moves > rules.step_retries:
            waited = "no answer" if st.status == "dispatched" else "no tool results"
            message = f"step {step} got {waited} within {timeout:.0f}s, {st.attempt} attempt(s)"
            _fail(run, ErrorInfo.of(ErrorCode.STEP_TIMEOUT, message), step)
            return Transition(run, True, _terminal(run, now))
        st.attempt += 1
        st.dispatched_at, st.deadline = now, now + timeout
        if st.status == "tools":  # the calls not answered yet go out again
            effects += [_tool_job(run, rules, step, st, k)
                        for k, c in st.calls.items() if c.status == "dispatched"]  # fmt: skip
        else:
            effects.append(_job(run, rules, now, step, st))
    return Transition(run, changed, effects, wake_at=_next_look(run, rules, now))


def cancel(run: RunState, now: float) -> Transition:
    """Stop the run (idempotent): it ends ``cancelled``, its generations are aborted."""
    if run.terminal:
        effects: list[Effect] = [AbortGenerations()]
        if run.status == "cancelled":
            effects += _terminal(run, now)
        return Transition(run, False, effects)
    run = _copy(run)
    run.status = "cancelled"
    run.error = ErrorInfo.of(ErrorCode.CANCELLED, "cancelled by request")
    run.output = latest_output(run)
    return Transition(run, True, [AbortGenerations(), *_terminal(run, now)])


def dead_lettered(run: RunState, now: float, reason: str) -> Transition:
    """The task's message was dead-lettered (idempotent): the run ends
    ``failed`` with ``unavailable``; a finished run stays as it is."""
    if run.terminal:
        return Transition(run, False, [])
    run = _copy(run)
    _fail(run, ErrorInfo.of(ErrorCode.UNAVAILABLE, reason))
    return Transition(run, True, [AbortGenerations(), *_terminal(run, now)])


# -- input steps -------------------------------------------------------------


def _waiting_event(run: RunState, rules: Rules, now: float, step: str, st: StepState) -> Emit:
    """``waiting_input``, with the step's prompt and deadline."""
    spec = rules.workflows[run.workflow].input_spec(step)
    prompt = spec.prompt if spec is not None else ""
    ev = Step(task_id=run.task_id, step=step, agent="", status="waiting_input", prompt=prompt,
              deadline=st.deadline)  # fmt: skip
    return _event(run, now, keys.step_event(step, "waiting_input"), ev)


def _answered_event(run: RunState, now: float, step: str, st: StepState) -> Emit:
    """The input step's ``done``, with who answered."""
    ev = Step(task_id=run.task_id, step=step, agent="", status="done", answered_by=st.answered_by)
    return _event(run, now, keys.step_event(step, "done"), ev)


def _wait_for_input(
    run: RunState, rules: Rules, now: float, plan: StepPlan, ref: ContextRef
) -> list[Effect]:
    """Record an input step as waiting and say so (``waiting_input``); the
    watchdog looks again at its deadline."""
    assert plan.input is not None
    st = StepState(agent="", pool="", session=plan.session, status="waiting_input", input=True,
                   dispatched_at=now, deadline=now + plan.input.timeout, ref=ref,
                   origin=ref)  # fmt: skip
    run.steps[plan.step_id] = st
    return [_waiting_event(run, rules, now, plan.step_id, st)]


def _take_answer(
    run: RunState, rules: Rules, now: float, ctx: Ctx, step: str, text: str, by: str
) -> Verdict:
    """Append ``text`` as the user's message to the run's session, record the
    input step done and go on with what follows it (``run`` is a copy)."""
    st = run.steps[step]
    op = AppendOp(run.session, keys.input_answer(run.task_id, step),
                  (ChatMessage(role="user", content=text),))  # fmt: skip
    got = _context(ctx, op)
    if got is None:
        return Need((op,))
    if isinstance(got, ErrorInfo):
        _fail(run, got, step)
        return Transition(run, True, _terminal(run, now))
    st.status, st.finished_at, st.output, st.answered_by, st.ref = "done", now, text, by, got
    run.context_tokens += placement.estimate_tokens(text)
    run.newest_tokens = placement.estimate_tokens(text)
    effects: list[Effect] = [_answered_event(run, now, step, st)]
    nxt = rules.workflows[run.workflow].advance(run, step)
    if isinstance(nxt, Done):
        run.status, run.output = "completed", nxt.output
        return Transition(run, True, effects + _terminal(run, now))
    more = _dispatch(run, rules, now, ctx, nxt, got)
    if isinstance(more, Need):
        return more
    return Transition(run, True, effects + more)


def answer_refusal(body: InputAnswer, tenant: str) -> tuple[ErrorCode, str] | None:
    """Why an answer cannot be taken whatever the run's state (None: it can):
    the conductor drops it (counted), the HTTP API refuses it with the code."""
    if body.tenant is not None and body.tenant != tenant:
        return ErrorCode.FORBIDDEN, "the answer names another tenant than its publisher"
    if len(body.answer.encode()) > MAX_INPUT_BYTES:
        return ErrorCode.INPUT_TOO_LARGE, f"an answer is at most {MAX_INPUT_BYTES} bytes"
    if body.step is not None and not is_step_id(body.step):
        return ErrorCode.INVALID_FIELD, "step is not a step id (r<round>.<step>)"
    return None


def answer(run: RunState, msg: NewAnswer, rules: Rules, now: float, ctx: Ctx) -> Verdict:
    """A human's answer: taken by the input step that waits (the one named,
    when ``msg.step`` is given), appended to the session, and the run goes
    on. Anything else changes nothing (``note`` says why): a run that waits
    for no input, an answer to another step or to one already answered (the
    first answer wins), a finished run. Only a redelivered answer replays the
    stored state (a crash after storing it); a late duplicate does not, so it
    cannot republish a run's events after their de-duplication window."""
    target = waiting_step(run, msg.step)
    if target is None:
        note: Note = "finished" if run.terminal else "not_waiting"
        if msg.step is not None and msg.step in run.steps and run.steps[msg.step].input:
            note = "finished" if run.terminal else "already_answered"
        effects = replay(run, rules, now) if msg.redelivered else []
        return Transition(run, False, effects, note=note)
    return _take_answer(_copy(run), rules, now, ctx, target, msg.answer, "human")


def waiting_step(run: RunState, step: str | None = None) -> str | None:
    """The input step an answer goes to: ``step`` when it waits (None: the
    first that waits); None when the run has ended or waits for no (such)
    input."""
    if run.terminal:
        return None
    waiting = [k for k, s in run.steps.items() if s.status == "waiting_input"]
    if step is None:
        return waiting[0] if waiting else None
    return step if step in waiting else None
