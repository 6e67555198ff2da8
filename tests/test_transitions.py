"""The orchestrator's pure transitions, without a broker.

Then the real shell around them on the bus twin: two conductor replicas over
one KV, workers that answer dispatched jobs (sometimes twice, sometimes with
an error), a watchdog, compare-and-set races, and crashes that store a change
but lose its effects (the message is then redelivered). Hypothesis picks the
interleaving; whatever it picks, the run ends in exactly one terminal state,
every step is recorded done once and the usage is the sum of the steps'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.bus import HDR_MSG_ID
from proto import codec, keys, subjects
from proto.errors import ErrorCode
from proto.messages import (
    Budget,
    ContextRef,
    ErrorInfo,
    InferenceJob,
    InferenceResult,
    Step,
    Usage,
)
from proto.submission import RateLimited
from services.orchestrator import transitions as T
from services.orchestrator.pools import Catalogue
from services.orchestrator.scheduling import PoolNow
from services.orchestrator.service import BUILTIN_WORKFLOWS
from services.orchestrator.state import RunState
from services.orchestrator.workflows import GraphWorkflow, load_dir
from tests.twin_shell import RESULTS, TASKS, TENANT, TIMERS, Shell
from tests.twin_shell import budget as budget_of

WORKFLOWS = {n: GraphWorkflow(s) for n, s in load_dir(BUILTIN_WORKFLOWS).items()}
RULES = T.Rules(WORKFLOWS, step_timeout=10.0, step_retries=1, price=lambda pool: 2.0)
# The same with every step placed by the scheduler (the pools unlisted, warm).
PLACED = dataclasses.replace(RULES, pools=lambda pool: (Catalogue({}).spec(pool), PoolNow(ready=1)))


def answer(op: T.ContextOp, tenant: str = "acme") -> ContextRef:
    if isinstance(op, T.AppendOp):
        return ContextRef(tenant, op.session, 2, b"sig")
    return ContextRef(tenant, op.child, op.ref.version, b"sig")


def decide(fn: Any, run: RunState | None, *args: Any, now: float) -> T.Verdict:
    """Run a decision to the end, answering its context ops."""
    ctx: dict[str, Any] = {}
    while True:
        out = fn(run, *args, now, ctx)
        if not isinstance(out, T.Need):
            return out
        for op in out.ops:
            ctx[op.key] = answer(op)
        run = codec.decode(codec.encode(run), RunState) if run is not None else None


def new_task(workflow: str = "research", budget: Budget | None = None) -> T.NewTask:
    return T.NewTask(tenant="acme", task_id="t1", session="t1", workflow=workflow, seq=7,
                     input="compare two sorts", budget=budget)  # fmt: skip


def reply(job: InferenceJob, output: str = "fine", **kw: Any) -> InferenceResult:
    return InferenceResult(job_id=job.job_id, task_id=job.task_id, tenant=job.tenant,
                           session=job.session, step=job.step, worker="w1", output=output,
                           ref=ContextRef(job.tenant, job.session, 3, b"sig"),
                           usage=Usage(prompt_tokens=10, completion_tokens=5, gpu_seconds=0.01),
                           **kw)  # fmt: skip


def jobs(effects: list[T.Effect]) -> list[InferenceJob]:
    return [e.job for e in effects if isinstance(e, T.Dispatch)]


def events(effects: list[T.Effect]) -> list[str]:
    return [e.key for e in effects if isinstance(e, T.Emit)]


# -- examples -------------------------------------------------------------


def test_a_task_starts_with_its_input_appended_and_its_first_step_dispatched() -> None:
    out = T.start(None, new_task(), RULES, 100.0, {})
    assert isinstance(out, T.Need)
    [op] = out.ops
    assert isinstance(op, T.AppendOp) and op.msg_id == keys.task_input("t1")
    out = decide(T.start, None, new_task(), RULES, now=100.0)
    assert isinstance(out, T.Transition) and out.changed
    assert events(out.effects) == ["accepted", "step.r1.plan.started"]
    [job] = jobs(out.effects)
    assert job.job_id == "acme.t1.r1.plan" and job.published_at == 100.0
    assert [e.due for e in out.effects if isinstance(e, T.Watch)] == [110.0]
    assert out.run.steps["r1.plan"].deadline == 110.0


def test_a_result_is_recorded_and_the_fan_out_dispatched_in_one_change() -> None:
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    plan = jobs(T.replay(run, RULES, 1.0))[0]
    out = T.result(run, reply(plan), RULES, 2.0, {})
    assert isinstance(out, T.Need)  # the two branches are forks of the session
    assert {type(op) for op in out.ops} == {T.ForkOp}
    out = decide(T.result, run, reply(plan), RULES, now=2.0)
    assert isinstance(out, T.Transition) and out.changed
    assert out.run.steps["r1.plan"].status == "done"
    assert sorted(j.step for j in jobs(out.effects)) == ["r1.gather.coding", "r1.gather.retrieval"]
    assert all(j.session != "t1" for j in jobs(out.effects))
    assert T.in_flight(out.run) == 2


def test_a_late_duplicate_result_replays_nothing_so_no_event_is_stored_twice() -> None:
    """A result for a step already recorded that is not a redelivery (a
    retried job answering twice, minutes later on a finished run) changes
    nothing and publishes nothing: past the events' de-duplication window a
    replay would store ``accepted`` and ``started`` a second time."""
    run = decide(T.start, None, new_task(workflow="chat"), RULES, now=1.0).run  # type: ignore[union-attr]
    (job,) = jobs(T.replay(run, RULES, 1.0))
    done = decide(T.result, run, reply(job), RULES, now=2.0)
    assert isinstance(done, T.Transition) and done.run.terminal
    late = decide(T.result, done.run, reply(job), RULES, now=300.0)
    assert isinstance(late, T.Transition) and not late.changed and late.effects == []
    call = SimpleNamespace(call_id=f"{job.job_id}.c0", task_id=job.task_id, tenant=job.tenant,
                           session=job.session, step=job.step, tool="search")  # fmt: skip
    tool_late = T.tool_result(done.run, _tool_result(call), RULES, 300.0)
    assert isinstance(tool_late, T.Transition) and tool_late.effects == []
    # The same message redelivered (a crash after storing it) replays the state.
    again = decide(functools.partial(T.result, redelivered=True), done.run, reply(job), RULES,
                   now=300.0)  # fmt: skip
    assert "completed" in events(again.effects)  # type: ignore[union-attr]


def test_a_redelivered_result_on_an_advanced_run_redispatches_the_next_steps() -> None:
    """The stranded run: the change was stored, the dispatch was lost."""
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    plan = jobs(T.replay(run, RULES, 1.0))[0]
    advanced = decide(T.result, run, reply(plan), RULES, now=2.0)
    assert isinstance(advanced, T.Transition)
    stored = advanced.run  # ...and then the process died: no effect performed
    redelivered = functools.partial(T.result, redelivered=True)
    again = decide(redelivered, stored, reply(plan), RULES, now=3.0)
    assert isinstance(again, T.Transition) and not again.changed
    assert sorted(j.step for j in jobs(again.effects)) == [
        "r1.gather.coding",
        "r1.gather.retrieval",
    ]
    assert sorted(e.msg_id for e in again.effects if isinstance(e, T.Dispatch)) == sorted(
        e.msg_id for e in advanced.effects if isinstance(e, T.Dispatch)
    )  # the same ids: de-duplicated if the first dispatch did get out


def test_decisions_never_change_the_run_they_are_given() -> None:
    """The conductor hands every decision the state it cached (shared, not
    copied): a decision that changed it would corrupt the next one."""
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    plan = jobs(T.replay(run, RULES, 1.0))[0]
    for step in range(6):
        before = codec.encode(run)
        T.timer(run, RULES, 50.0)  # overdue: a retry dispatched
        T.cancel(run, 50.0)
        T.replay(run, RULES, 50.0)
        out = decide(T.result, run, reply(plan), RULES, now=2.0 + step)
        assert codec.encode(run) == before
        assert isinstance(out, T.Transition) and out.changed and out.run is not run
        if not jobs(out.effects):
            break
        run, plan = out.run, jobs(out.effects)[0]


def test_an_unanswered_step_is_retried_once_then_fails_with_step_timeout() -> None:
    run = decide(T.start, None, new_task("chat"), RULES, now=0.0).run  # type: ignore[union-attr]
    early = T.timer(run, RULES, 5.0)
    assert not early.changed and early.wake_at == 10.0
    retry = T.timer(run, RULES, 10.5)
    assert retry.changed and retry.run.steps["r1.answer"].attempt == 2
    [d] = [e for e in retry.effects if isinstance(e, T.Dispatch)]
    assert d.msg_id == keys.job_message(d.job.job_id, 2) and retry.wake_at == 20.5
    # The retry's result is a new message: the first one may have been lost.
    assert d.job.attempt == 2 and keys.result(d.job.job_id, 2) != keys.result(d.job.job_id, 1)
    dead = T.timer(retry.run, RULES, 21.0)
    assert dead.run.status == "failed" and dead.run.error is not None
    assert dead.run.error.code == ErrorCode.STEP_TIMEOUT and dead.wake_at is None
    assert "2 attempt(s)" in dead.run.error.message
    # The step that failed the run ends with its own event, before the task's.
    assert events(dead.effects) == ["step.r1.answer.done", "failed"]
    (ended,) = [e.event for e in dead.effects if isinstance(e, T.Emit) and e.key != "failed"]
    assert isinstance(ended, Step) and ended.status == "failed"
    assert ended.outcome == ErrorCode.STEP_TIMEOUT


def test_a_budget_too_small_for_the_next_steps_stops_the_run_with_partial_output() -> None:
    task = new_task(budget=Budget(max_tokens=70))
    run = decide(T.start, None, task, RULES, now=1.0).run  # type: ignore[union-attr]
    plan = jobs(T.replay(run, RULES, 1.0))[0]
    assert plan.max_tokens + plan.context_budget <= 70
    out = decide(T.result, run, reply(plan, output="the plan"), RULES, now=2.0)
    assert isinstance(out, T.Transition)
    assert out.run.status == "failed" and out.run.error is not None
    assert out.run.error.code == ErrorCode.BUDGET_EXCEEDED and out.run.output == "the plan"
    assert jobs(out.effects) == [] and events(out.effects)[-1] == "failed"


def test_cancel_ends_the_run_once_and_aborts_its_generations() -> None:
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    first = T.cancel(run, 2.0)
    assert first.changed and first.run.status == "cancelled" and T.in_flight(first.run) == 0
    assert any(isinstance(e, T.AbortGenerations) for e in first.effects)
    second = T.cancel(first.run, 3.0)
    assert not second.changed and events(second.effects) == ["failed"]


def test_the_same_task_again_replays_and_another_message_with_its_id_is_ignored() -> None:
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    same = decide(T.start, run, new_task(), RULES, now=2.0)
    assert isinstance(same, T.Transition) and not same.changed and same.note == "resumed"
    assert [j.step for j in jobs(same.effects)] == ["r1.plan"]
    other = dataclasses.replace(new_task(), seq=8)
    dup = decide(T.start, run, other, RULES, now=2.0)
    assert isinstance(dup, T.Transition) and dup.effects == [] and dup.note == "duplicate_task"


def test_a_refused_context_append_fails_the_run_at_the_context_layer() -> None:
    refused = ErrorInfo(code="message_too_large", message="too big", layer="context")
    out = T.start(None, new_task(), RULES, 1.0, {f"append:t1:{keys.task_input('t1')}": refused})
    assert isinstance(out, T.Transition) and out.run.status == "failed"
    assert out.run.error == refused and events(out.effects) == ["accepted", "failed"]


def test_a_rejected_tasks_claim_replays_nothing_whatever_message_finds_it() -> None:
    """A rejection claims its task id as a failed run of no workflow, with its
    one event (``failed``) already published: a redelivered task, a tool
    result or an answer finding the claim publishes nothing (no ``accepted``
    after ``failed``), and the task is not counted as resumed."""
    from proto.messages import ToolResult

    error = ErrorInfo.of(ErrorCode.RATE_LIMITED, "over the limit")
    claim = RunState(tenant="acme", task_id="t1", session="t1", workflow="", task_seq=7,
                     status="failed", error=error)  # fmt: skip
    assert T.replay(claim, RULES, 1.0) == []
    again = decide(T.start, claim, new_task(), RULES, now=2.0)
    assert isinstance(again, T.Transition) and not again.changed and again.effects == []
    assert again.note == "rejected"
    res = ToolResult(call_id="acme.t1.r1.gather.coding.t0c0", task_id="t1", tenant="acme",
                     session="t1", step="r1.gather.coding", tool="python", worker="tw",
                     outcome="ok")  # fmt: skip
    tool = T.tool_result(claim, res, RULES, 2.0)
    assert isinstance(tool, T.Transition) and not tool.changed and tool.effects == []
    answered = T.answer(claim, T.NewAnswer("yes", redelivered=True), RULES, 2.0, {})
    assert isinstance(answered, T.Transition) and answered.effects == []
    assert answered.note == "finished"


def test_a_rejection_claims_a_free_id_and_says_nothing_about_a_copy_of_a_known_task() -> None:
    """A refused task claims its id as a failed run with its one ``failed``
    event; found again (its own message, redelivered) it says ``failed``
    again without a new claim; a run of another message means it is a copy
    of a known task: no claim, no event."""
    r = RateLimited("over the limit", retry_after=2.5, tenant="acme", task_id="t1", session="s1")
    first = T.reject(None, r, 7, 1.0)
    claim = first.run
    assert first.changed and claim.status == "failed" and claim.workflow == ""
    assert (claim.tenant, claim.task_id, claim.session, claim.task_seq) == ("acme", "t1", "s1", 7)
    assert claim.error == ErrorInfo.of(ErrorCode.RATE_LIMITED, "over the limit", 2.5)
    assert events(first.effects) == ["failed"]
    [said] = first.effects
    assert isinstance(said, T.Emit) and said.key == keys.FAILED and said.event.ts == 1.0
    again = T.reject(claim, r, 7, 2.0)
    assert not again.changed and again.run is claim and events(again.effects) == ["failed"]
    known = msgspec.structs.replace(claim, workflow="research", status="running", task_seq=3)
    copy = T.reject(known, r, 7, 2.0)
    assert not copy.changed and copy.effects == [] and copy.note == "duplicate_task"


# -- any interleaving, on the real shell ------------------------------------


class _Crash(Exception):
    """The process died after storing a change, before its effects went out."""


def _event_keys(shell: Shell, task_id: str) -> list[str]:
    prefix = keys.event(TENANT, task_id, "")
    msgs = shell.twin.messages(subjects.event(TENANT, task_id))
    return [m.headers[HDR_MSG_ID].removeprefix(prefix) for m in msgs]


Action = tuple[str, int]
actions = st.lists(
    st.tuples(
        st.sampled_from(["work", "deliver", "redeliver", "tick", "crash", "error", "cancel",
                         "race"]),
        st.integers(0, 50),
    ),
    max_size=60,
)  # fmt: skip


async def _interleave(
    workflow: str, budget: int | None, script: list[Action], verdicts: list[str], placed: bool
) -> None:
    """The real conductor (two replicas, each with its own run cache, over
    one KV) on the bus twin: workers answer jobs in any order (sometimes
    twice, sometimes with an error), results are handled by either replica in
    any order, a replica crashes after storing a change (its effects lost, the
    message redelivered), another writer races a write (a compare-and-set
    conflict), time passes for naks and the watchdog."""
    shell = await Shell.start(WORKFLOWS, replicas=2, step_timeout=10.0, step_retries=1)
    for c in shell.conductors:
        c.rules = dataclasses.replace(c.rules, price=RULES.price,
                                      pools=PLACED.pools if placed else None)  # fmt: skip
    await shell.submit(workflow, "t1", **budget_of(budget))
    assert await shell.handle(TASKS)

    def output(job: InferenceJob) -> str:
        return verdicts.pop() if verdicts and job.agent == "validation" else "ok"

    def crash(subject: str) -> None:
        raise _Crash(subject)

    for kind, n in script:
        if kind == "work":
            await shell.work(n, output=output)
        elif kind == "error" and n % 5 == 0:
            await shell.work(n, error=True)
        elif kind == "redeliver":  # a result reaches the conductor twice
            await shell.work(n, output=output, copies=2)
        elif kind == "deliver":
            await shell.handle(RESULTS, replica=n, pick=n)
        elif kind == "crash":
            shell.twin.before_publish = crash
            try:
                await shell.handle(RESULTS, replica=n, pick=n)
            finally:
                shell.twin.before_publish = None
        elif kind == "race":  # another writer stores the run first, once
            raced: list[str] = []

            def race(key: str, raced: list[str] = raced) -> None:
                if not raced:
                    raced.append(key)
                    shell.kv.race(key)

            shell.kv.before_write = race
            await shell.handle(RESULTS, replica=n, pick=n)
            shell.kv.before_write = None
        elif kind == "tick":
            shell.twin.advance(n / 2.0)
            await shell.handle(TIMERS, replica=n, pick=n)
        elif kind == "cancel" and n == 0:
            await shell.conductors[1].cancel(TENANT, "t1")
    # Then let the world run quietly until the run ends.
    await shell.settle_all()
    run = await shell.run("t1")
    assert run is not None and run.terminal, run
    stored = shell.stored("t1")
    terminal_changes = sum(b.terminal and not a.terminal for a, b in itertools.pairwise(stored))
    assert terminal_changes + stored[0].terminal == 1
    events = _event_keys(shell, "t1")
    assert len(events) == len(set(events))  # each event stored once
    assert len(set(events) & {"completed", "failed"}) == 1
    done_records: dict[str, int] = {}
    for before, after in itertools.pairwise(stored):
        for sid, s in after.steps.items():
            was = before.steps.get(sid)
            if s.status == "done" and (was is None or was.status != "done"):
                done_records[sid] = done_records.get(sid, 0) + 1
    assert all(n == 1 for n in done_records.values()), done_records
    assert {s for s, st_ in run.steps.items() if st_.status == "done"} == set(done_records)
    # Usage is the sum of the steps' (a result applied twice would count twice).
    for f in ("prompt_tokens", "completion_tokens"):
        assert getattr(run.usage, f) == sum(getattr(s.usage, f) for s in run.steps.values())
    if run.status == "completed":
        assert all(f"step.{s}.done" in events for s in done_records)
        (completed,) = [e for e in shell.events("t1") if e["type"] == "completed"]
        assert completed["usage"]["completion_tokens"] == run.usage.completion_tokens
    # Every step that ended (done, or failed the run) said so.
    ended = {s for s, st_ in run.steps.items() if st_.status in ("done", "failed")}
    assert all(f"step.{s}.done" in events for s in ended)
    if placed:  # every model step was placed once, and kept its placement
        assert all(st_.pool_reason == "only" and st_.prediction is not None
                   for st_ in run.steps.values() if not st_.input)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workflow=st.sampled_from(["research", "chat"]),
    budget=st.sampled_from([None, 150, 400, 100_000]),
    script=actions,
    verdicts=st.lists(st.sampled_from(['{"next": "revise"}', '{"next": "accept"}', "?"])),
    placed=st.booleans(),
)
def test_any_interleaving_ends_in_one_terminal_state_with_each_step_done_once(
    workflow: str, budget: int | None, script: list[Action], verdicts: list[str], placed: bool
) -> None:
    asyncio.run(_interleave(workflow, budget, script, verdicts, placed))


# -- the tool loop ----------------------------------------------------------


def _tool_result(job: Any, outcome: str = "ok", version: int = 5, cpu: float = 0.25) -> Any:
    from proto.messages import ToolResult

    return ToolResult(call_id=job.call_id, task_id=job.task_id, tenant=job.tenant,
                      session=job.session, step=job.step, tool=job.tool, worker="tw",
                      outcome=outcome, preview=f"{job.tool} said hi", cpu_seconds=cpu,
                      seconds=0.5, ref=ContextRef(job.tenant, job.session, version, b"sig"))  # fmt: skip


def _at_coding() -> tuple[RunState, InferenceJob]:
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    plan = jobs(T.replay(run, RULES, 1.0))[0]
    out = decide(T.result, run, reply(plan), RULES, now=2.0)
    assert isinstance(out, T.Transition)
    (coding,) = [j for j in jobs(out.effects) if j.agent == "coding"]
    return out.run, coding


def test_an_agent_with_tools_is_offered_them_and_its_calls_become_recorded_sub_steps() -> None:
    from proto.messages import ToolCall

    run, coding = _at_coding()
    assert [t.name for t in coding.tools] == ["python"] and coding.tool_choice == "auto"
    calls = [ToolCall(id="call_0", name="python", arguments='{"code": "print(1)"}'),
             ToolCall(id="call_1", name="python", arguments='{"code": "print(2)"}')]  # fmt: skip
    out = T.result(run, reply(coding, output="", tool_calls=calls), RULES, 3.0, {})
    assert isinstance(out, T.Transition) and out.changed
    st = out.run.steps["r1.gather.coding"]
    assert st.status == "tools" and list(st.calls) == ["t0c0", "t0c1"]
    tool_jobs = [e.job for e in out.effects if isinstance(e, T.DispatchTool)]
    assert [j.call_id for j in tool_jobs] == ["acme.t1.r1.gather.coding.t0c0",
                                              "acme.t1.r1.gather.coding.t0c1"]  # fmt: skip
    assert events(out.effects) == ["step.r1.gather.coding.t0c0.started",
                                   "step.r1.gather.coding.t0c1.started"]  # fmt: skip
    # The first result: recorded, the step still waits for the second.
    one = T.tool_result(out.run, _tool_result(tool_jobs[0], version=5), RULES, 4.0)
    assert isinstance(one, T.Transition) and one.changed and not jobs(one.effects)
    # The same result again changes nothing.
    again = T.tool_result(one.run, _tool_result(tool_jobs[0]), RULES, 4.5)
    assert isinstance(again, T.Transition) and not again.changed
    # The second: the model goes again, as a new job, on the newest ref.
    two = T.tool_result(one.run, _tool_result(tool_jobs[1], "tool_failed", version=6), RULES, 5.0)
    assert isinstance(two, T.Transition)
    (next_job,) = jobs(two.effects)
    assert next_job.job_id == "acme.t1.r1.gather.coding~1" and next_job.ref.version == 6
    st = two.run.steps["r1.gather.coding"]
    assert st.status == "dispatched" and st.turn == 1
    assert two.run.usage.tool_cpu_seconds == 0.5  # both calls' CPU time counted
    # A late answer of the first turn is not taken for the second's.
    late = T.result(two.run, reply(coding, output="stale"), RULES, 6.0, {})
    assert isinstance(late, T.Transition) and not late.changed
    final = decide(T.result, two.run, reply(next_job, output="ran it"), RULES, now=7.0)
    assert isinstance(final, T.Transition)
    assert final.run.steps["r1.gather.coding"].status == "done"
    assert final.run.steps["r1.gather.coding"].output == "ran it"


def test_past_max_tool_calls_the_model_is_offered_no_tools() -> None:
    from proto.messages import ToolCall

    run, coding = _at_coding()  # coding: max_tool_calls 2 in research.yaml
    calls = [ToolCall(id=f"c{i}", name="python", arguments="{}") for i in range(3)]
    out = T.result(run, reply(coding, output="", tool_calls=calls), RULES, 3.0, {})
    assert isinstance(out, T.Transition)
    tool_jobs = [e.job for e in out.effects if isinstance(e, T.DispatchTool)]
    assert len(tool_jobs) == 2  # the third call is beyond the limit
    r = out.run
    for j in tool_jobs:
        o = T.tool_result(r, _tool_result(j), RULES, 4.0)
        assert isinstance(o, T.Transition)
        r = o.run
    (next_job,) = jobs(o.effects)
    assert next_job.tools == [] and next_job.tool_choice == "none"


def test_a_replay_while_waiting_for_tools_republishes_the_unanswered_calls() -> None:
    from proto.messages import ToolCall

    run, coding = _at_coding()
    calls = [
        ToolCall(id="a", name="python", arguments="{}"),
        ToolCall(id="b", name="python", arguments="{}"),
    ]
    out = T.result(run, reply(coding, output="", tool_calls=calls), RULES, 3.0, {})
    assert isinstance(out, T.Transition)
    first = next(e.job for e in out.effects if isinstance(e, T.DispatchTool))
    one = T.tool_result(out.run, _tool_result(first), RULES, 4.0)
    assert isinstance(one, T.Transition)
    replayed = [
        e.job.call_id for e in T.replay(one.run, RULES, 5.0) if isinstance(e, T.DispatchTool)
    ]
    assert replayed == ["acme.t1.r1.gather.coding.t0c1"]
    # The watchdog past the deadline sends the unanswered call again, as a new message.
    late = T.timer(one.run, RULES, 100.0)
    resent = [e for e in late.effects if isinstance(e, T.DispatchTool)]
    assert [e.job.call_id for e in resent] == ["acme.t1.r1.gather.coding.t0c1"]
    assert resent[0].msg_id.endswith("#2")
    assert resent[0].job.attempt == 2  # its result is a new message too (keys.tool_result)


CODER = textwrap.dedent("""\
    name: coder
    agents:
      coder: {role: coder, system: You code., max_tokens: 64, tools: [python, search],
              tool_choice: required}
    steps:
      - {id: code, agent: coder}
    """)


def _catalog(*names: str) -> Any:
    """A tool catalog serving ``names`` (what ``Rules.tool_spec`` reads)."""
    from proto.messages import ToolSpec

    return {n: ToolSpec(name=n, description=f"{n} v1") for n in names}.get


def test_a_steps_offered_tools_are_frozen_at_dispatch_whatever_the_catalog_becomes(
    tmp_path: Path,
) -> None:
    from proto.messages import ToolCall

    (tmp_path / "coder.yaml").write_text(CODER)
    flows = {n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()}
    before = T.Rules(flows, step_timeout=10.0, step_retries=1, tool_spec=_catalog("python"))
    task = new_task("coder")
    run = decide(T.start, None, task, before, now=0.0).run  # type: ignore[union-attr]
    [first] = jobs(T.replay(run, before, 0.0))
    assert [t.name for t in first.tools] == ["python"] and first.tool_choice == "required"
    # The catalog changes: search starts being served. The step's later jobs
    # still offer what its first did.
    after = dataclasses.replace(before, tool_spec=_catalog("python", "search"))
    retry = T.timer(run, after, 10.5)
    [again] = jobs(retry.effects)
    assert again.attempt == 2 and [t.name for t in again.tools] == ["python"]
    assert [t.name for t in jobs(T.replay(run, after, 1.0))[0].tools] == ["python"]
    calls = [ToolCall(id="c0", name="python", arguments="{}")]
    out = T.result(run, reply(first, output="", tool_calls=calls), after, 1.0, {})
    assert isinstance(out, T.Transition)
    [tool_job] = [e.job for e in out.effects if isinstance(e, T.DispatchTool)]
    turn = T.tool_result(out.run, _tool_result(tool_job), after, 2.0)
    assert isinstance(turn, T.Transition)
    [second] = jobs(turn.effects)
    assert second.job_id.endswith("~1") and [t.name for t in second.tools] == ["python"]
    assert second.tool_choice == "required"
    # The frozen choice holds too: dispatched with none of its tools served,
    # the step answers without tools on every attempt.
    bare = dataclasses.replace(before, tool_spec=_catalog())
    unserved = decide(T.start, None, task, bare, now=0.0).run  # type: ignore[union-attr]
    [retried] = jobs(T.timer(unserved, after, 10.5).effects)
    assert retried.tools == [] and retried.tool_choice == "none"
    # A run stored before steps froze their tools (no such fields) decodes and
    # offers the catalog as it is now.
    step = msgspec.structs.replace(run.steps["r1.code"], tools=None, tool_choice="")
    stored = codec.encode(msgspec.structs.replace(run, steps={"r1.code": step}))
    assert b"tool_choice" not in stored
    legacy = codec.decode(stored, RunState)
    [now_job] = jobs(T.replay(legacy, after, 1.0))
    assert [t.name for t in now_job.tools] == ["python", "search"]
    assert now_job.tool_choice == "required"
