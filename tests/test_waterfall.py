"""A step's waterfall: the worker's stopwatch, the orchestrator's pure
assembly of a step's timings, and the fields its ``step`` events carry."""

from __future__ import annotations

import ast
import inspect
import math
from typing import Any

import msgpack
import pytest

from baton.dev.testing import Client, LocalStack, uid
from baton.stopwatch import Stopwatch
from proto import codec
from proto.errors import ErrorCode
from proto.messages import (
    PHASES,
    ErrorInfo,
    Phases,
    Step,
    Timing,
    ToolCall,
    ToolResult,
    finite_timing,
)
from services.orchestrator import transitions as T
from services.orchestrator import waterfall
from tests.test_transitions import RULES, decide, jobs, new_task, reply


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def worker_timing(queued: float, start: float, *, context: float = 0.1, admission: float = 0.2,
                  prefill: float = 0.3, decode: float = 0.4, record: float = 0.05,
                  generated: bool = True) -> Timing:  # fmt: skip
    """A job's timing as a worker reports it, from a stopwatch on a fake clock
    (``generated``: it came as far as a first token)."""
    clock = FakeClock(start)
    w = Stopwatch(queued, clock)
    for phase, seconds in (("context", context), ("admission", admission)):
        clock.t += seconds
        w.lap(phase)
    clock.t += prefill
    if generated:
        w.first_token()
    for phase, seconds in (("decode", decode), ("record", record)):
        clock.t += seconds
        w.lap(phase)
    return w.timing()


def answered(run: Any, res: Any, *, now: float, received: float) -> T.Verdict:
    """``T.result`` run to the end, the result received at ``received``."""

    def fn(r: Any, res: Any, rules: T.Rules, now: float, ctx: T.Ctx) -> T.Verdict:
        return T.result(r, res, rules, now, ctx, received)

    return decide(fn, run, res, RULES, now=now)


def ended(effects: list[T.Effect], status: str | None = None) -> list[Step]:
    return [e.event for e in effects if isinstance(e, T.Emit) and isinstance(e.event, Step)
            and e.event.status in ("done", "failed") and (status is None or e.event.status == status)]  # fmt: skip


# -- the worker's stopwatch ---------------------------------------------------


def test_a_stopwatch_splits_the_workers_time_into_phases_without_gaps() -> None:
    t = worker_timing(100.0, 100.5)
    assert (t.queued_at, t.started_at) == (100.0, 100.5)
    assert t.first_token_at == pytest.approx(101.1)
    assert t.finished_at == pytest.approx(101.55)
    p = t.phases
    assert (p.queue, p.context, p.admission, p.prefill, p.decode, p.record) == pytest.approx(
        (0.5, 0.1, 0.2, 0.3, 0.4, 0.05)
    )
    assert p.total() == pytest.approx(t.finished_at - t.queued_at)


def test_a_stopwatch_never_reports_a_negative_queue_from_a_clock_behind_the_publishers() -> None:
    w = Stopwatch(queued_at=200.0, clock=FakeClock(199.0))
    assert w.timing().phases.queue == 0.0


def test_a_phase_lapped_twice_adds_up() -> None:
    clock = FakeClock(10.0)
    w = Stopwatch(10.0, clock)
    for _ in range(2):
        clock.t += 1.0
        w.lap("context")
    assert w.timing().phases.context == 2.0


# -- the pure assembly --------------------------------------------------------


def test_an_arriving_result_ends_at_its_receipt_and_its_trip_is_recording() -> None:
    t = waterfall.arrived(worker_timing(100.0, 100.5), received=102.0)
    assert t is not None and t.finished_at == 102.0
    assert t.phases.record == pytest.approx(0.05 + (102.0 - 101.55))
    assert t.phases.total() == pytest.approx(t.finished_at - t.queued_at)
    assert waterfall.arrived(None, 5.0) is None


def test_event_fields_are_ordered_rounded_and_leave_out_what_was_not_reached() -> None:
    # A worker whose clock runs ahead of the orchestrator's: its start looks
    # later than the result's receipt.
    skewed = Timing(queued_at=10.0, started_at=12.0, first_token_at=12.5, finished_at=11.0,
                    phases=Phases(queue=2.0, prefill=0.5, decode=-0.1))  # fmt: skip
    got = waterfall.event_fields(skewed)
    assert [got[k] for k in ("queued_at", "started_at", "first_token_at", "finished_at")] == [
        10.0, 12.0, 12.5, 12.5
    ]  # fmt: skip
    assert got["phases"] == Phases(queue=2.0, prefill=0.5)  # never negative
    tool_call = waterfall.event_fields(Timing(queued_at=1.0, started_at=1.25, finished_at=2.0))
    assert "first_token_at" not in tool_call and "phases" not in tool_call
    assert waterfall.event_fields(None) == {}


def test_a_timing_with_nan_or_a_negative_time_is_not_kept() -> None:
    assert finite_timing(worker_timing(1.0, 2.0))
    assert not finite_timing(Timing(queued_at=math.nan))
    assert not finite_timing(Timing(phases=Phases(decode=-1.0)))
    assert not finite_timing(Timing(finished_at=math.inf))


# -- on the step events ---------------------------------------------------------


def test_a_steps_done_event_carries_its_waterfall_from_dispatch_to_receipt() -> None:
    run = decide(T.start, None, new_task("chat"), RULES, now=100.0).run  # type: ignore[union-attr]
    (job,) = jobs(T.replay(run, RULES, 100.0))
    assert job.published_at == 100.0
    res = reply(job, timing=worker_timing(job.published_at, 100.5))
    out = answered(run, res, now=102.5, received=102.0)
    (done,) = ended(out.effects)  # type: ignore[union-attr]
    assert done.status == "done" and done.step == "r1.answer"
    assert (done.queued_at, done.started_at, done.finished_at) == (100.0, 100.5, 102.0)
    assert done.first_token_at == pytest.approx(101.1)
    assert done.phases is not None
    assert done.phases.total() == pytest.approx(done.finished_at - done.queued_at)
    assert done.phases.record == pytest.approx(0.05 + 0.45)
    # The replay of the stored run says the same.
    (again,) = ended(T.replay(out.run, RULES, 200.0))  # type: ignore[union-attr]
    assert (again.queued_at, again.phases) == (done.queued_at, done.phases)


def test_a_worker_that_sends_no_timing_still_gives_dispatch_and_receipt() -> None:
    run = decide(T.start, None, new_task("chat"), RULES, now=100.0).run  # type: ignore[union-attr]
    (job,) = jobs(T.replay(run, RULES, 100.0))
    out = answered(run, reply(job), now=103.0, received=102.0)
    (done,) = ended(out.effects)  # type: ignore[union-attr]
    assert (done.queued_at, done.started_at, done.finished_at, done.phases) == (
        100.0, None, 102.0, None
    )  # fmt: skip


def test_a_step_that_fails_the_run_ends_with_its_code_and_waterfall_before_the_task() -> None:
    run = decide(T.start, None, new_task("chat"), RULES, now=100.0).run  # type: ignore[union-attr]
    (job,) = jobs(T.replay(run, RULES, 100.0))
    err = ErrorInfo.of(ErrorCode.PROMPT_TOO_LONG, "too long")
    t = worker_timing(100.0, 100.5, admission=0.0, prefill=0.0, decode=0.0, generated=False)
    out = answered(run, reply(job, error=err, timing=t), now=101.0, received=101.0)
    assert isinstance(out, T.Transition)
    keys = [e.key for e in out.effects if isinstance(e, T.Emit)]
    assert keys == ["step.r1.answer.done", "failed"]
    (failed,) = ended(out.effects, "failed")
    assert failed.outcome == "prompt_too_long" and failed.agent == "assistant"
    assert failed.phases is not None and failed.phases.context == pytest.approx(0.1)
    assert failed.finished_at == 101.0 and failed.first_token_at is None


def test_a_step_that_called_tools_adds_its_turns_and_its_wait_for_the_calls() -> None:
    from tests.test_transitions import _at_coding

    run, coding = _at_coding()  # dispatched at 2.0
    calls = [ToolCall(id="a", name="python", arguments="{}"),
             ToolCall(id="b", name="python", arguments="{}")]  # fmt: skip
    turn1 = reply(coding, output="", tool_calls=calls, timing=worker_timing(2.0, 2.5))
    out = T.result(run, turn1, RULES, 4.0, {}, received=4.0)
    assert isinstance(out, T.Transition)
    tool_jobs = [e.job for e in out.effects if isinstance(e, T.DispatchTool)]
    assert all(j.published_at == 4.0 for j in tool_jobs)

    def tool_res(job: Any, started: float, seconds: float) -> ToolResult:
        t = Timing(queued_at=job.published_at, started_at=started, finished_at=started + seconds,
                   phases=Phases(queue=started - job.published_at, tool=seconds))  # fmt: skip
        return ToolResult(call_id=job.call_id, task_id=job.task_id, tenant=job.tenant,
                          session=job.session, step=job.step, tool=job.tool, worker="tw",
                          seconds=seconds, timing=t)  # fmt: skip

    one = T.tool_result(out.run, tool_res(tool_jobs[0], 4.5, 1.0), RULES, 6.0, received=6.0)
    assert isinstance(one, T.Transition)
    (call_done,) = ended(one.effects)
    assert call_done.call == "t0c0" and call_done.first_token_at is None
    assert (call_done.queued_at, call_done.started_at, call_done.finished_at) == (4.0, 4.5, 6.0)
    assert call_done.phases == Phases(queue=0.5, tool=1.0, record=0.5)
    two = T.tool_result(one.run, tool_res(tool_jobs[1], 5.0, 2.0), RULES, 7.5, received=7.0)
    assert isinstance(two, T.Transition)
    (turn2_job,) = jobs(two.effects)
    assert turn2_job.published_at == 7.5
    turn2 = reply(turn2_job, timing=worker_timing(7.5, 7.75))
    final = answered(two.run, turn2, now=9.5, received=9.5)
    (done,) = ended(final.effects, "done")  # type: ignore[union-attr]
    assert done.step == "r1.gather.coding" and done.call is None
    assert (done.queued_at, done.started_at, done.finished_at) == (2.0, 2.5, 9.5)
    assert done.first_token_at == pytest.approx(3.1)  # the first turn's first token
    p = done.phases
    assert p is not None
    assert p.tool == pytest.approx(7.0 - 4.0)  # the calls ran side by side: the wait, not the sum
    assert p.queue == pytest.approx(0.5 + 0.25) and p.decode == pytest.approx(0.8)
    # Only the orchestrator's own moments (7.0 -> 7.5: deciding turn 2) are in no phase.
    assert done.finished_at - done.queued_at - p.total() == pytest.approx(0.5)


# -- the decisions stay pure ----------------------------------------------------

IMPURE = {"time", "asyncio", "random", "socket", "nats", "baton.bus", "baton.stopwatch"}


@pytest.mark.parametrize("module", [T, waterfall])
def test_decision_modules_import_no_clock_and_no_io(module: Any) -> None:
    tree = ast.parse(inspect.getsource(module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    assert not {m for m in imported if m in IMPURE or m.split(".")[0] in IMPURE}


# -- on the running stack (simulator engine) -------------------------------------

TIMES = ("queued_at", "started_at", "first_token_at", "finished_at")


async def test_a_research_runs_step_events_let_a_client_draw_its_waterfall(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "acme", uid()
    end = await client.run("research", {"tenant": tenant, "input": "sort a list of numbers",
                                        "task_id": task_id}, timeout=90)  # fmt: skip
    assert end["type"] == "completed", end
    events = await client.events(tenant, task_id)
    finished = [e for e in events if e["type"] == "step" and e["status"] in ("done", "failed")]
    steps = [e for e in finished if not e.get("tool")]
    calls = [e for e in finished if e.get("tool")]
    assert {e["agent"] for e in steps} >= {"supervisor", "retrieval", "coding", "validation"}
    assert calls, "the simulated research calls its tools"
    for e in finished:
        times = [e.get(k) for k in TIMES if not (e.get("tool") and k == "first_token_at")]
        assert all(isinstance(t, float) for t in times), e
        assert times == sorted(times), e
        assert set(e["phases"]) <= set(PHASES) and min(e["phases"].values()) > 0, e
        span, total = e["finished_at"] - e["queued_at"], sum(e["phases"].values())
        assert e["phases"]["queue"] > 0 and e["phases"]["record"] > 0, e
        if e.get("tool"):
            assert e["phases"]["tool"] > 0 and "first_token_at" not in e, e
        else:
            assert e["phases"]["prefill"] > 0 and e["phases"]["decode"] > 0, e
            assert e["phases"]["context"] > 0, e
        if e.get("tool") or not any(c["step"] == e["step"] for c in calls):
            # One job or call: the phases cover its span exactly (one clock here).
            assert total == pytest.approx(span, abs=1e-4), e
        else:
            # Model turns and the wait for their calls; in no phase: only the
            # orchestrator's moments between a result and what it dispatches next.
            assert e["phases"]["tool"] > 0 and span - 0.5 < total <= span + 1e-4, e


def test_a_phase_not_gone_through_is_not_on_the_wire() -> None:
    wire = codec.encode(Phases(queue=0.5, tool=1.0 - 1.0, decode=-0.25).rounded())
    assert msgpack.unpackb(wire) == {"queue": 0.5}
