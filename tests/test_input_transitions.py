"""The ``input`` step's pure transitions, without a broker: a run waits for
a human, takes the first answer to each step (or the declared default at the
deadline), appends it to the session and goes on; nothing else moves it."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.bus import Delivery, Nak
from proto import keys, subjects
from proto.errors import ErrorCode
from proto.messages import ContextRef, InferenceJob, InferenceResult, InputAnswer, Step, Usage
from proto.sizes import MAX_INPUT_BYTES
from services.orchestrator import transitions as T
from services.orchestrator.state import RunState
from services.orchestrator.workflows import GraphWorkflow, parse
from tests.twin_shell import INPUTS, RESULTS, TASKS, TENANT, TIMERS, Shell

ASK = """
name: ask
agents:
  writer: {role: writer, system: You write.}
steps:
  - id: draft
    agent: writer
  - id: confirm
    input: {prompt: "Ship this draft?", default: "yes", timeout: 30}
  - id: detail
    input: {prompt: "Anything to add?", default: nothing, timeout: 60}
  - id: final
    agent: writer
"""
FIRST = """
name: first
agents:
  writer: {role: writer, system: You write.}
steps:
  - id: brief
    input: {prompt: "What is it for?", default: general, timeout: 10}
  - id: final
    agent: writer
"""
WORKFLOWS = {s.name: GraphWorkflow(s) for s in (parse(ASK, "ask.yaml"), parse(FIRST, "f.yaml"))}
RULES = T.Rules(WORKFLOWS, step_timeout=100.0)


def answer_op(op: T.ContextOp, version: int) -> ContextRef:
    assert isinstance(op, T.AppendOp)
    return ContextRef("acme", op.session, version, b"sig")


def decide(fn: Any, run: RunState | None, *args: Any, now: float) -> tuple[T.Verdict, list[Any]]:
    """Run a decision to the end, answering its context ops; also the ops."""
    ctx: dict[str, Any] = {}
    ops: list[Any] = []
    while True:
        out = fn(run, *args, now, ctx) if fn is not T.answer else fn(run, *args, RULES, now, ctx)
        if not isinstance(out, T.Need):
            return out, ops
        for op in out.ops:
            ops.append(op)
            ctx[op.key] = answer_op(op, 10 + len(ops))


def task(workflow: str = "ask") -> T.NewTask:
    return T.NewTask(tenant="acme", task_id="t1", session="s1", workflow=workflow, seq=1,
                     input="write a haiku")  # fmt: skip


def reply(job: InferenceJob) -> InferenceResult:
    return InferenceResult(job_id=job.job_id, task_id="t1", tenant="acme", session=job.session,
                           step=job.step, worker="w1", output="a draft",
                           ref=ContextRef("acme", job.session, 3, b"sig"),
                           usage=Usage(prompt_tokens=10, completion_tokens=5))  # fmt: skip


def waiting_run() -> RunState:
    """The ``ask`` run after its first step answered: waiting at r1.confirm."""
    out, _ = decide(lambda r, n, c: T.start(r, task(), RULES, n, c), None, now=1.0)
    assert isinstance(out, T.Transition)
    job = next(e.job for e in out.effects if isinstance(e, T.Dispatch))
    out, _ = decide(lambda r, n, c: T.result(r, reply(job), RULES, n, c), out.run, now=2.0)
    assert isinstance(out, T.Transition)
    return out.run


def step_events(effects: list[T.Effect]) -> list[Step]:
    return [e.event for e in effects if isinstance(e, T.Emit) and isinstance(e.event, Step)]


def test_an_input_step_waits_with_its_prompt_and_dispatches_no_job() -> None:
    run = waiting_run()
    st_ = run.steps["r1.confirm"]
    assert st_.status == "waiting_input" and st_.input and st_.deadline == 32.0
    replayed = T.replay(run, RULES, 3.0)
    [waiting] = [e for e in step_events(replayed) if e.status == "waiting_input"]
    assert waiting.prompt == "Ship this draft?" and waiting.deadline == 32.0
    assert not [e for e in replayed if isinstance(e, T.Dispatch)]
    assert T.in_flight(run) == 0
    assert [e.due for e in replayed if isinstance(e, T.Watch)] == [32.0]  # the watchdog


def test_an_answer_is_appended_as_a_user_message_and_the_run_goes_on() -> None:
    run = waiting_run()
    out, ops = decide(T.answer, run, T.NewAnswer("ship it", "r1.confirm"), now=5.0)
    assert isinstance(out, T.Transition) and out.changed and out.note == ""
    [op] = ops
    assert op.msg_id == keys.input_answer("t1", "r1.confirm") and op.session == "s1"
    assert [(m.role, m.content) for m in op.messages] == [("user", "ship it")]
    done = out.run.steps["r1.confirm"]
    assert (done.status, done.output, done.answered_by) == ("done", "ship it", "human")
    assert done.ref == answer_op(op, 11)
    # The next step is an input step too: it waits, with the answer's ref.
    nxt = out.run.steps["r1.detail"]
    assert nxt.status == "waiting_input" and nxt.ref == done.ref and nxt.deadline == 65.0
    assert [(e.step, e.status, e.answered_by) for e in step_events(out.effects)] == [
        ("r1.confirm", "done", "human"),
        ("r1.detail", "waiting_input", None),
    ]


def test_the_agent_after_an_input_step_reads_the_session_that_holds_the_answer() -> None:
    run = waiting_run()
    out, _ = decide(T.answer, run, T.NewAnswer("ship it"), now=5.0)
    assert isinstance(out, T.Transition)
    out, ops = decide(T.answer, out.run, T.NewAnswer("add a title", "r1.detail"), now=6.0)
    assert isinstance(out, T.Transition)
    [job] = [e.job for e in out.effects if isinstance(e, T.Dispatch)]
    assert job.step == "r1.final" and job.ref == answer_op(ops[0], 11)


def test_a_repeated_answer_never_answers_the_next_input_step() -> None:
    run = waiting_run()
    out, _ = decide(T.answer, run, T.NewAnswer("ship it", "r1.confirm"), now=5.0)
    assert isinstance(out, T.Transition)
    again, ops = decide(T.answer, out.run, T.NewAnswer("ship it", "r1.confirm"), now=6.0)
    assert isinstance(again, T.Transition)
    assert (again.changed, again.note, again.effects, ops) == (False, "already_answered", [], [])
    assert again.run.steps["r1.detail"].status == "waiting_input"


def test_a_redelivered_answer_replays_what_the_stored_state_implies() -> None:
    """The crash between storing an answer and publishing what follows."""
    run = waiting_run()
    out, _ = decide(T.answer, run, T.NewAnswer("ship it", "r1.confirm"), now=5.0)
    assert isinstance(out, T.Transition)
    again, _ = decide(T.answer, out.run, T.NewAnswer("ship it", "r1.confirm", True), now=6.0)
    assert isinstance(again, T.Transition) and not again.changed
    keys_ = {e.key for e in again.effects if isinstance(e, T.Emit)}
    assert {"step.r1.confirm.done", "step.r1.detail.waiting_input"} <= keys_


def test_answers_to_no_waiting_step_or_a_finished_run_change_nothing() -> None:
    run = waiting_run()
    for msg, note in [
        (T.NewAnswer("x", "r1.detail"), "not_waiting"),  # not reached yet
        (T.NewAnswer("x", "r1.draft"), "not_waiting"),  # an agent's step
        (T.NewAnswer("x", "r9.nope"), "not_waiting"),
    ]:
        out, ops = decide(T.answer, run, msg, now=5.0)
        assert isinstance(out, T.Transition)
        assert (out.changed, out.note, out.effects, ops) == (False, note, [], [])
    assert T.waiting_step(run) == T.waiting_step(run, "r1.confirm") == "r1.confirm"
    assert T.waiting_step(run, "r1.detail") is None
    cancelled = T.cancel(run, 6.0).run
    assert cancelled.steps["r1.confirm"].status == "waiting_input"
    assert T.waiting_step(cancelled) is None  # the run has ended
    out, ops = decide(T.answer, cancelled, T.NewAnswer("x"), now=7.0)
    assert isinstance(out, T.Transition)
    assert (out.changed, out.note, out.effects, ops) == (False, "finished", [], [])


def test_past_its_deadline_the_watchdog_takes_the_default_and_keeps_watching() -> None:
    run = waiting_run()
    early, _ = decide(lambda r, n, c: T.timer(r, RULES, n, c), run, now=31.0)
    assert isinstance(early, T.Transition) and not early.changed and early.wake_at == 32.0
    out, ops = decide(lambda r, n, c: T.timer(r, RULES, n, c), run, now=32.5)
    assert isinstance(out, T.Transition) and out.changed
    assert [m.content for m in ops[0].messages] == ["yes"]
    done = out.run.steps["r1.confirm"]
    assert (done.output, done.answered_by) == ("yes", "default")
    assert out.wake_at == 92.5  # the next input step's deadline
    late, _ = decide(T.answer, out.run, T.NewAnswer("no!", "r1.confirm"), now=33.0)
    assert isinstance(late, T.Transition) and late.note == "already_answered"


def test_a_workflow_may_start_by_asking() -> None:
    out, ops = decide(lambda r, n, c: T.start(r, task("first"), RULES, n, c), None, now=1.0)
    assert isinstance(out, T.Transition) and out.changed
    assert ops[0].system is None  # no agent's system prompt for the session yet
    assert out.run.steps["r1.brief"].status == "waiting_input"
    assert [e.key for e in out.effects if isinstance(e, T.Emit)] == [
        "accepted", "step.r1.brief.waiting_input",
    ]  # fmt: skip
    assert [e.due for e in out.effects if isinstance(e, T.Watch)] == [11.0]


# -- any interleaving, on the real shell ---------------------------------------


class _Crash(Exception):
    """The process died after storing a change, before its effects went out."""


async def _answer_interleaving(script: list[tuple[str, int]]) -> None:
    shell = await Shell.start(WORKFLOWS, step_timeout=100.0)
    await shell.submit("ask", "t1", "write a haiku")
    assert await shell.handle(TASKS)
    await shell.work(output=lambda j: "a draft")
    assert await shell.handle(RESULTS)  # the draft is in: waiting at r1.confirm
    subject = f"{subjects.INPUT}.{TENANT}.t1"

    async def answer(text: str, step: str | None) -> None:
        await shell.twin.publish(subject, InputAnswer(answer=text, step=step))

    async def lost_ack(d: Delivery) -> None:  # handled, but the ack never arrived
        await shell.conductors[0].on_input(d)
        raise Nak(0.0, "ack lost")

    def crash(subject: str) -> None:
        raise _Crash(subject)

    for kind, n in script:
        shell.twin.advance(n / 4)
        run = await shell.run("t1")
        assert run is not None
        waiting = [k for k, s in run.steps.items() if s.status == "waiting_input"]
        if kind in ("answer", "crash") and waiting:
            await answer(f"h{n}", waiting[0])
            shell.twin.before_publish = crash if kind == "crash" else None
            try:
                await shell.handle(INPUTS)
            finally:
                shell.twin.before_publish = None
        elif kind in ("again", "redeliver") and run.steps:
            await answer(f"late{n}", sorted(run.steps)[n % len(run.steps)])
            if kind == "redeliver":
                await shell.twin.deliver(INPUTS, lost_ack)
            await shell.handle(INPUTS)
        elif kind == "tick":
            await shell.handle(TIMERS, pick=n)
        elif kind == "work" and await shell.work(output=lambda j: "a draft"):
            await shell.handle(RESULTS)
    for _ in range(20):  # let it finish: the watchdog answers, workers answer
        await shell.settle_all()
        run = await shell.run("t1")
        assert run is not None
        if run.terminal:
            break
        shell.twin.advance(30.0)
    stored = shell.stored("t1")
    terminal = sum(b.terminal and not a.terminal for a, b in itertools.pairwise(stored))
    assert run.terminal and terminal == 1, run
    for sid in ("r1.confirm", "r1.detail"):
        s = run.steps[sid]
        first = shell.store.appends[keys.input_answer("t1", sid)]  # the session's first append
        assert s.status == "done" and s.output == first.messages[0].content


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(
        st.tuples(
            st.sampled_from(["answer", "again", "redeliver", "tick", "crash", "work"]),
            st.integers(0, 40),
        ),
        max_size=40,
    )
)
def test_each_input_step_is_answered_once_whatever_the_interleaving(
    script: list[tuple[str, int]],
) -> None:
    """Humans answer (once, twice, redelivered), the watchdog fires, the
    process crashes after storing: every input step is answered exactly once,
    by whoever came first, and the run ends once (the real conductor on the
    bus twin)."""
    asyncio.run(_answer_interleaving(script))


def test_a_watchdog_sleeps_past_the_cap_only_when_no_new_deadline_can_come_sooner() -> None:
    """The sleep cap is the shortest step or input timeout of any workflow
    (no deadline set meanwhile can fall before it), never below
    MAX_TIMER_SLEEP."""

    def rules(yaml: str, step_timeout: float) -> T.Rules:
        return T.Rules({"ask": GraphWorkflow(parse(yaml, "ask.yaml"))}, step_timeout=step_timeout)

    long = ASK.replace("timeout: 30", "timeout: 2000").replace("timeout: 60", "timeout: 900")
    assert rules(long, 1200.0).timer_sleep() == 900.0  # the input step's
    assert rules(long, 700.0).timer_sleep() == 700.0  # the writer's (the default)
    assert rules(long, 100.0).timer_sleep() == T.MAX_TIMER_SLEEP
    timed = long.replace("system: You write.}", "system: You write., timeout: 400}")
    assert rules(timed, 1200.0).timer_sleep() == 400.0  # the writer's own
    assert RULES.timer_sleep() == T.MAX_TIMER_SLEEP  # inputs of 10 s: the cap stands


def test_an_answer_that_no_run_could_take_is_refused_by_the_decision() -> None:
    """Whatever the run's state: another tenant's, an oversized, or one naming
    no step id is refused here (the conductor drops it, the HTTP API answers
    the code), so both refuse alike."""

    def refused(**kw: Any) -> ErrorCode | None:
        why = T.answer_refusal(InputAnswer(**{"answer": "yes", **kw}), "t1")
        return None if why is None else why[0]

    assert refused() is None and refused(tenant="t1", step="r0.confirm") is None
    assert refused(tenant="t2") == ErrorCode.FORBIDDEN
    assert refused(answer="x" * (MAX_INPUT_BYTES + 1)) == ErrorCode.INPUT_TOO_LARGE
    assert refused(step="confirm") == ErrorCode.INVALID_FIELD


def test_a_watchdog_sleeps_until_due_and_never_spins_after_a_look() -> None:
    assert T.still_asleep(due=110.0, now=100.0, longest=300.0) == 10.0
    assert T.still_asleep(due=1000.0, now=100.0, longest=300.0) == 300.0
    assert T.still_asleep(due=100.0, now=100.0, longest=300.0) is None
    assert T.next_look(wake_at=90.0, now=100.0, longest=300.0) == T.MIN_TIMER_SLEEP
    assert T.next_look(wake_at=110.0, now=100.0, longest=300.0) == 10.0
    assert T.next_look(wake_at=1000.0, now=100.0, longest=300.0) == 300.0
