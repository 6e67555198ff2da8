"""Pre-warm from the workflow graph: prefill the step that will follow the
running one on the worker that will serve it, and route that step there
(what, where, its cost, its bounds and refreshes: docs/scheduling.md,
"Pre-warm from the workflow graph").

Pure: ``decide`` takes the run, the step just dispatched, the pools'
heartbeats and the run's last warm, and answers a ``Warm`` (the job, its pool
and worker) or why not (``Skip``); the shell (``warming.py``) publishes the
job and tells the router."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from proto import keys
from proto.messages import ContextRef, Heartbeat, InferenceJob, ToolSpec

from . import placement
from .state import RunState, StepState
from .transitions import Rules
from .workflows.graph import StepPlan

IN_FLIGHT_S = 30.0
"""A warm gets no answer: it counts as in flight this long after it was
sent, or until the step it warmed is dispatched."""

Skip = Literal[
    "no_next",  # nothing known follows (the answer decides, input, end; a fan-out: ``branches``)
    "already",  # the step that follows was warmed before
    "in_flight",  # the run's last warm is still in flight
    "no_worker",  # no ready worker on the pool the next step goes to
    "pressure",  # the worker's KV is too full to hold a prefix for later
]
COUNTED: tuple[str, ...] = ("sent", "kept", "in_flight", "no_worker", "pressure")
"""The outcomes ``baton_prewarms_total`` counts (the others are no decision)."""


@dataclass(frozen=True, slots=True)
class Warm:
    job: InferenceJob
    pool: str
    worker: str
    msg_id: str  # the job's id; a refresh's is its own (keys.warm)


@dataclass(frozen=True, slots=True)
class LastWarm:
    """The run's last warm: the step it was for, and when it was sent."""

    step: str
    at: float


def worker_for(
    heartbeats: Mapping[tuple[str, str], Heartbeat],
    pool: str,
    now: float,
    *,
    preferred: str | None = None,
    stale_after: float = 6.0,
    max_load: float = 0.5,
) -> tuple[str | None, Skip | None]:
    """The worker of ``pool`` to warm: ``preferred`` (the router's choice:
    the one holding the session) when it is ready, else the ready worker
    with the least admitted KV; ``pressure`` when that one is above
    ``max_load``."""
    ready = {
        w: hb
        for (p, w), hb in heartbeats.items()
        if p == pool and hb.ready and not hb.leaving and now - hb.ts <= stale_after
    }
    if not ready:
        return None, "no_worker"

    def load(hb: Heartbeat) -> float:
        return hb.admitted_tokens / max(1, hb.kv_capacity_tokens)

    worker = preferred if preferred in ready else min(ready, key=lambda w: (load(ready[w]), w))
    assert worker is not None
    if load(ready[worker]) > max_load:
        return None, "pressure"
    return worker, None


def decide(
    run: RunState,
    rules: Rules,
    step: str,
    heartbeats: Mapping[tuple[str, str], Heartbeat],
    now: float,
    *,
    last: LastWarm | None = None,
    prefer: Callable[[str], str | None] = lambda pool: None,
    stale_after: float = 6.0,
    max_load: float = 0.5,
    refresh: int = 0,
) -> Warm | Skip:
    """Whether to warm what follows ``step`` (just dispatched, its tool
    calls, or an input step now waiting), and where. ``prefer(pool)``: the
    worker of ``pool`` holding the session, if any (the router's choice; a
    read of memory). ``refresh`` n > 0: the n-th warm again of a step that
    has not started (``last`` is then that step's warm)."""
    st = _on_session(run, rules, step)
    plan = rules.workflows[run.workflow].foreseen(run, step) if st is not None else None
    if st is None or plan is None:
        return "no_next"
    if plan.step_id in run.steps:
        return "already"
    if not refresh:
        skip = _last_warm(run, {plan.step_id}, last, now)
        if skip is not None:
            return skip
    return _warm_for(run, rules, st, plan, heartbeats, now, prefer=prefer,
                     stale_after=stale_after, max_load=max_load, refresh=refresh)  # fmt: skip


def branches(
    run: RunState, rules: Rules, step: str, heartbeats: Mapping[tuple[str, str], Heartbeat],
    now: float, *, last: LastWarm | None = None,
    prefer: Callable[[str], str | None] = lambda pool: None, stale_after: float = 6.0,
    max_load: float = 0.5,
) -> list[Warm] | Skip:  # fmt: skip
    """As ``decide`` when a fan-out follows ``step``: a warm of each
    branch's first step, known at dispatch (its agent's system prompt over
    the session as it is now, the prefix of the fork the branch will get),
    each on the worker of its own pool. A branch with no worker to warm is
    left out; all left out: the first one's reason. The run's last warm is
    then one of the branches (they are dispatched together)."""
    st = _on_session(run, rules, step)
    plans = rules.workflows[run.workflow].branches_after(run, step) if st is not None else []
    if st is None or not plans:
        return "no_next"
    ids = {p.step_id for p in plans}
    if ids & run.steps.keys():
        return "already"
    skip = _last_warm(run, ids, last, now)
    if skip is not None:
        return skip
    outs = [_warm_for(run, rules, st, p, heartbeats, now, prefer=prefer, stale_after=stale_after,
                      max_load=max_load) for p in plans]  # fmt: skip
    warms = [o for o in outs if isinstance(o, Warm)]
    return warms or next(o for o in outs if isinstance(o, str))


def _on_session(run: RunState, rules: Rules, step: str) -> StepState | None:
    """``step`` if what follows it can be warmed from it: the run goes on
    (its workflow known), and the step works on the run's session with its
    window known."""
    st = run.steps.get(step)
    if run.terminal or run.workflow not in rules.workflows or st is None:
        return None
    return st if st.ref is not None and st.session == run.session else None


def _last_warm(run: RunState, steps: set[str], last: LastWarm | None, now: float) -> Skip | None:
    """``already`` when the run's last warm was of one of ``steps``;
    ``in_flight`` while it was of another step, not dispatched yet and sent
    less than ``IN_FLIGHT_S`` ago."""
    if last is not None and last.step in steps:
        return "already"
    if last is not None and last.step not in run.steps and now - last.at < IN_FLIGHT_S:
        return "in_flight"
    return None


def _warm_for(
    run: RunState, rules: Rules, st: StepState, plan: StepPlan,
    heartbeats: Mapping[tuple[str, str], Heartbeat], now: float, *,
    prefer: Callable[[str], str | None], stale_after: float, max_load: float, refresh: int = 0,
) -> Warm | Skip:  # fmt: skip
    """The warm of ``plan``'s step, to follow ``st`` (running on the
    session's window ``st.ref``), on its pool's worker; or why not."""
    assert st.ref is not None
    wf = rules.workflows[run.workflow]
    agent = wf.agents[plan.agent]
    cap = min(agent.max_tokens, run.max_tokens or agent.max_tokens)
    nxt = StepState(agent=plan.agent, pool=agent.pool, session=plan.session, max_tokens=cap)
    tools, choice = rules.offered(run, nxt)
    pool = agent.pool
    if rules.pools is not None:
        need = placement.step_need(run, agent, nxt, tools, rules.answer(run.workflow, plan.agent))
        # The session grows by this step's answer first.
        need = replace(need, prompt_tokens=need.prompt_tokens + st.max_tokens)
        pool = placement.place(need, agent.eligible, agent.latency_target, rules.pools).pool or pool
    worker, skip = worker_for(
        heartbeats, pool, now, preferred=prefer(pool), stale_after=stale_after, max_load=max_load
    )
    if worker is None:
        assert skip is not None
        return skip
    job = _warm_job(run, plan.step_id, plan.agent, agent.system, st.ref, tools, choice, now,
                    keys.warm(run.tenant, run.task_id, plan.step_id))  # fmt: skip
    return Warm(job, pool, worker, keys.warm(run.tenant, run.task_id, plan.step_id, refresh))


def own(
    run: RunState,
    rules: Rules,
    step: str,
    heartbeats: Mapping[tuple[str, str], Heartbeat],
    now: float,
    *,
    refresh: int,
    stale_after: float = 6.0,
    max_load: float = 0.5,
) -> Warm | Skip:
    """The ``refresh``-th warm that keeps a step's own prefix (its agent's
    system prompt and the session as its model turn left it) on the worker
    that ran that turn, while the turn's tool calls are out: the turn after
    them goes back there (session affinity) and extends the prefix. Skipped
    under that worker's KV pressure (the prefix is then the first to go), and
    ``no_worker`` once it is gone (the prefix went with it)."""
    st = run.steps.get(step)
    if run.terminal or st is None or st.status != "tools" or st.ref is None or not st.worker:
        return "no_next"
    worker, skip = worker_for(
        heartbeats, st.pool, now, preferred=st.worker, stale_after=stale_after, max_load=max_load
    )
    if worker != st.worker:
        return skip or "no_worker"
    tools, choice = rules.offered(run, st)
    system = rules.workflows[run.workflow].agents[st.agent].system
    turn = f"{step}.t{st.turn}"  # the turn the calls came from: one id per refresh of it
    job_id = keys.warm(run.tenant, run.task_id, turn, refresh)
    job = _warm_job(run, step, st.agent, system, st.ref, tools, choice, now, job_id)
    return Warm(job, st.pool, worker, job_id)


def _warm_job(
    run: RunState, step: str, agent: str, system: str, ref: ContextRef,
    tools: list[ToolSpec], choice: str, now: float, job_id: str,
) -> InferenceJob:  # fmt: skip
    return InferenceJob(job_id=job_id, task_id=run.task_id, tenant=run.tenant,
                        session=run.session, workflow=run.workflow, step=step, agent=agent,
                        ref=ref, max_tokens=1, system=system, tools=tools, tool_choice=choice,
                        published_at=now, warm=True)  # fmt: skip
