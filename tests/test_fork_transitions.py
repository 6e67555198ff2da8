"""``transitions.fork`` without a broker: a new run from a finished step of
an old one carries the steps before it, runs that step again on a fork of
the old session reading the edit, and never touches the old run."""

from __future__ import annotations

from typing import Any

from proto import codec, keys
from proto.messages import ContextRef, InferenceJob
from services.orchestrator import transitions as T
from services.orchestrator.state import RunState
from tests.test_transitions import RULES, decide, jobs, new_task, reply


def _finished_research() -> RunState:
    """A research run driven to its end: plan, both branches, validate, summarize."""
    out = decide(T.start, None, new_task(), RULES, now=1.0)
    assert isinstance(out, T.Transition)
    run, now = out.run, 1.0
    while not run.terminal:
        now += 1.0
        job = jobs(T.replay(run, RULES, now))[0]
        text = '{"next": "accept"}' if job.step.endswith("validate") else f"answer of {job.step}"
        out = decide(T.result, run, _reply(job, text), RULES, now=now)
        assert isinstance(out, T.Transition)
        run = out.run
    assert run.status == "completed"
    return run


def _reply(job: InferenceJob, text: str) -> Any:
    res = reply(job, text)
    res.worker = f"worker-of-{job.step}"
    return res


def _fork(source: RunState, step: str, text: str | None, now: float = 50.0) -> T.Verdict:
    req = T.NewFork(task_id="t2", session="t2", step=step, input=text)
    ctx: dict[str, Any] = {}
    seen: list[T.ContextOp] = []
    while True:
        out = T.fork(None, source, req, RULES, now, ctx)
        if not isinstance(out, T.Need):
            _fork.ops = seen  # type: ignore[attr-defined]
            return out
        for op in out.ops:
            seen.append(op)
            version = op.upto if isinstance(op, T.ForkOp) and op.upto is not None else 4
            session = op.child if isinstance(op, T.ForkOp) else op.session
            ctx[op.key] = ContextRef("acme", session, version, b"sig")


def test_a_fork_from_validate_carries_plan_and_branches_and_runs_validate_again() -> None:
    old = _finished_research()
    before = codec.encode(old)
    out = _fork(old, "r1.validate", "be stricter")
    assert isinstance(out, T.Transition) and out.changed
    new = out.run
    assert codec.encode(old) == before  # the old run is untouched
    assert (new.task_id, new.forked_from, new.forked_at) == ("t2", "t1", "r1.validate")
    carried = {k for k, s in new.steps.items() if s.carried}
    assert carried == {"r1.plan", "r1.gather.retrieval", "r1.gather.coding"}
    for k in carried:  # as they finished: same worker, time, output; not dispatched
        assert new.steps[k].worker == old.steps[k].worker == f"worker-of-{k}"
        assert new.steps[k].finished_at == old.steps[k].finished_at
    [job] = jobs(out.effects)
    assert job.step == "r1.validate" and job.session == "t2" and job.task_id == "t2"
    assert new.usage.total_tokens == 0 and new.cost_usd == 0.0  # carried usage is not re-counted
    fork_op, edit = _fork.ops  # type: ignore[attr-defined]
    assert isinstance(fork_op, T.ForkOp) and fork_op.ref == old.steps["r1.validate"].origin
    assert fork_op.upto is None  # the context as validate saw it, whole
    assert isinstance(edit, T.AppendOp) and edit.messages[0].content == "be stricter"
    assert edit.msg_id == keys.task_input("t2")
    # Its events: accepted, the carried steps' started/done, validate started.
    keys_ = [e.key for e in out.effects if isinstance(e, T.Emit)]
    assert keys_[0] == "accepted" and "step.r1.plan.done" in keys_
    assert "step.r1.validate.started" in keys_ and "step.r1.validate.done" not in keys_


def test_a_fork_from_the_first_step_replaces_the_tasks_input() -> None:
    old = _finished_research()
    out = _fork(old, "r1.plan", "compare three sorts")
    assert isinstance(out, T.Transition)
    assert not any(s.carried for s in out.run.steps.values())
    fork_op = _fork.ops[0]  # type: ignore[attr-defined]
    assert fork_op.upto == old.steps["r1.plan"].origin.version - 1  # the old input left out
    assert [j.step for j in jobs(out.effects)] == ["r1.plan"]


def test_a_fork_from_a_branch_runs_the_whole_parallel_step_again() -> None:
    old = _finished_research()
    out = _fork(old, "r1.gather.coding", None)
    assert isinstance(out, T.Transition)
    assert {k for k, s in out.run.steps.items() if s.carried} == {"r1.plan"}
    assert sorted(j.step for j in jobs(out.effects)) == ["r1.gather.coding", "r1.gather.retrieval"]
    assert all(isinstance(op, T.ForkOp) for op in _fork.ops)  # type: ignore[attr-defined]


def test_the_forked_run_goes_on_to_the_end_like_any_run() -> None:
    old = _finished_research()
    out = _fork(old, "r1.validate", None)
    assert isinstance(out, T.Transition)
    run, now = out.run, 60.0
    while not run.terminal:
        now += 1
        job = jobs(T.replay(run, RULES, now))[0]
        text = '{"next": "accept"}' if job.step.endswith("validate") else "new " + job.step
        nxt = decide(T.result, run, _reply(job, text), RULES, now=now)
        assert isinstance(nxt, T.Transition)
        run = nxt.run
    assert run.status == "completed" and run.output == "new r1.summarize"
    assert run.steps["r1.plan"].output == old.steps["r1.plan"].output


def test_the_same_fork_again_replays_and_another_run_with_its_id_is_left_alone() -> None:
    old = _finished_research()
    out = _fork(old, "r1.validate", "x")
    assert isinstance(out, T.Transition)
    again = T.fork(out.run, old, T.NewFork("t2", "t2", "r1.validate", "x"), RULES, 70.0, {})
    assert isinstance(again, T.Transition) and not again.changed and again.note == "resumed"
    assert [j.step for j in jobs(again.effects)] == ["r1.validate"]
    other = T.fork(out.run, old, T.NewFork("t2", "t2", "r1.plan", "x"), RULES, 70.0, {})
    assert isinstance(other, T.Transition) and other.note == "duplicate_task" and not other.effects


def test_a_fork_is_refused_from_a_step_not_finished_unknown_or_an_input_step() -> None:
    run = decide(T.start, None, new_task(), RULES, now=1.0).run  # type: ignore[union-attr]
    assert "has not finished" in (T.fork_refusal(run, "r1.plan", RULES) or "")
    assert "no step" in (T.fork_refusal(run, "r9.plan", RULES) or "")
    old = _finished_research()
    assert T.fork_refusal(old, "r1.summarize", RULES) is None
    waiting = codec.decode_own(codec.encode(old), RunState)
    waiting.steps["r1.validate"].input = True
    assert "input step" in (T.fork_refusal(waiting, "r1.validate", RULES) or "")


def test_a_refused_fork_of_the_session_fails_the_new_run_at_the_context_layer() -> None:
    from proto.errors import ErrorCode
    from proto.messages import ErrorInfo

    old = _finished_research()
    req = T.NewFork("t2", "t2", "r1.validate", None)
    op = T.fork(None, old, req, RULES, 50.0, {})
    assert isinstance(op, T.Need)
    refused = ErrorInfo.of(ErrorCode.CONFLICT, "session 't2' already exists")
    out = T.fork(None, old, req, RULES, 50.0, {op.ops[0].key: refused})
    assert isinstance(out, T.Transition) and out.run.status == "failed"
    assert out.run.error is not None and out.run.error.layer == "context"
    assert [e.key for e in out.effects if isinstance(e, T.Emit)] == ["accepted", "failed"]


def test_a_forks_carried_steps_get_no_spans_of_their_own() -> None:
    """They were traced in the task they ran in; the fork traces what it runs."""
    from services.orchestrator import spans

    old = _finished_research()
    req = T.NewFork("t2", "t2", "r1.validate", None,
                    trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")  # fmt: skip
    ctx: dict[str, Any] = {}
    while isinstance(out := T.fork(None, old, req, RULES, 50.0, ctx), T.Need):
        for op in out.ops:
            ctx[op.key] = ContextRef("acme", "t2", 4, b"sig")
    assert isinstance(out, T.Transition) and out.run.trace == req.trace
    done = out.run
    done.status = "completed"
    names = [r.name for r in spans.closed(None, done, 60.0)]
    assert not any("supervisor" in n or "retrieval" in n or "coding" in n for n in names), names
    assert any(n.startswith("invoke_agent validation") for n in names), names
