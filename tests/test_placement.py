"""Where the orchestrator's pure transitions put a model step: the pool
chosen at dispatch (frozen into the step, kept by a retry), a step that fits
no pool failing at once, and a ``prompt_too_long`` moving the step to a pool
with a longer context. No broker: the pools are a fixed view."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from proto.errors import ErrorCode
from proto.messages import ErrorInfo, Step
from services.orchestrator import transitions as T
from services.orchestrator.placement import estimate_tokens
from services.orchestrator.pools import Catalogue, PoolSpec
from services.orchestrator.scheduling import PoolNow
from services.orchestrator.workflows import GraphWorkflow, load_dir

from .test_transitions import decide, jobs, reply

SMALL = PoolSpec(name="small", max_model_len=1024, prefill_tps=1000, decode_tps=20,
                 usd_per_gpu_hour=1.0, cold_start_s=60)  # fmt: skip
LARGE = PoolSpec(name="large", max_model_len=8192, prefill_tps=2000, decode_tps=30,
                 usd_per_gpu_hour=4.0, cold_start_s=120)  # fmt: skip
CATALOGUE = Catalogue({"small": SMALL, "large": LARGE})


def workflows(tmp_path: Path, agent: str) -> dict[str, GraphWorkflow]:
    (tmp_path / "ask.yaml").write_text(textwrap.dedent("""\
        name: ask
        agents:
          assistant:
            role: assistant
            system: You answer.
            max_tokens: 64
        """) + textwrap.indent(textwrap.dedent(agent), "    ") + "steps:\n  - {id: answer, agent: assistant}\n")  # fmt: skip
    return {n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()}


def rules(wfs: Mapping[str, GraphWorkflow], state: dict[str, PoolNow] | None = None) -> T.Rules:
    now = state or {}
    return T.Rules(wfs, step_timeout=10.0, step_retries=1, price=CATALOGUE.price,
                   pools=lambda p: (CATALOGUE.spec(p), now.get(p, PoolNow(ready=1))))  # fmt: skip


def task(text: str) -> T.NewTask:
    return T.NewTask(tenant="acme", task_id="t1", session="t1", workflow="ask", seq=1, input=text)


def started(out: T.Verdict) -> Step:
    assert isinstance(out, T.Transition)
    evs = [e.event for e in out.effects if isinstance(e, T.Emit) and isinstance(e.event, Step)]
    return evs[0]


def test_a_short_step_goes_to_the_cheap_pool_a_long_one_to_the_large(tmp_path: Path) -> None:
    r = rules(workflows(tmp_path, "pools: [small, large]\n"))
    out = decide(T.start, None, task("hello"), r, now=100.0)
    ev = started(out)
    assert (ev.pool, ev.pool_reason) == ("small", "cheapest")
    assert ev.prediction is not None and ev.prediction.kv_tokens > 64
    assert isinstance(out, T.Transition) and jobs(out.effects)[0].step == "r1.answer"
    assert [e.pool for e in out.effects if isinstance(e, T.Dispatch)] == ["small"]
    long = decide(T.start, None, task("word " * 1500), r, now=100.0)
    assert (started(long).pool, started(long).pool_reason) == ("large", "cheapest")


def test_a_target_the_cold_cheap_pool_misses_spills_to_the_warm_one(tmp_path: Path) -> None:
    wfs = workflows(tmp_path, "pools: [small, large]\nlatency_target: 20\n")
    cold = rules(wfs, {"small": PoolNow(ready=0), "large": PoolNow(ready=1)})
    ev = started(decide(T.start, None, task("hello"), cold, now=100.0))
    assert (ev.pool, ev.pool_reason) == ("large", "spill_cold")


def test_a_step_no_pool_can_hold_fails_at_once(tmp_path: Path) -> None:
    r = rules(workflows(tmp_path, "pools: [small]\nsystem: " + "rules " * 1200 + "\n"))
    out = decide(T.start, None, task("hi"), r, now=100.0)
    assert isinstance(out, T.Transition) and out.run.status == "failed"
    assert out.run.error is not None and out.run.error.code == ErrorCode.PROMPT_TOO_LONG
    assert "holds 1024" in out.run.error.message and not jobs(out.effects)


def test_a_retry_keeps_the_placement_a_too_long_prompt_moves_it(tmp_path: Path) -> None:
    r = rules(workflows(tmp_path, "pools: [small, large]\n"))
    out = decide(T.start, None, task("hello"), r, now=100.0)
    assert isinstance(out, T.Transition)
    run, job = out.run, jobs(out.effects)[0]
    # The pools change, the retried step stays where it was placed.
    busy = rules(r.workflows, {"small": PoolNow(ready=0)})
    again = T.timer(run, busy, 200.0)
    assert isinstance(again, T.Transition)
    assert [e.pool for e in again.effects if isinstance(e, T.Dispatch)] == ["small"]
    run = again.run
    # Its worker counts the prompt longer than the small pool holds: it moves.
    err = ErrorInfo.of(ErrorCode.PROMPT_TOO_LONG, "prompt of 1000 tokens exceeds 1024")
    moved = T.result(run, reply(job, error=err), r, 201.0, {})
    assert isinstance(moved, T.Transition) and moved.note == "moved"
    st = moved.run.steps["r1.answer"]
    assert (st.pool, st.pool_reason, st.moves, st.attempt) == ("large", "moved", 1, 3)
    [d] = [e for e in moved.effects if isinstance(e, T.Dispatch)]
    assert d.pool == "large" and d.job.attempt == 3
    # A move is not a retry: moved at once, the step may still be retried once.
    first = T.result(out.run, reply(job, error=err), r, 101.0, {})
    assert isinstance(first, T.Transition) and first.note == "moved"
    late = T.timer(first.run, r, 101.0 + 11.0)
    assert isinstance(late, T.Transition) and late.run.status == "running"
    assert [e.pool for e in late.effects if isinstance(e, T.Dispatch)] == ["large"]
    # Too long there too: nowhere larger, the error stands.
    again_too_long = T.result(moved.run, reply(d.job, error=err), r, 202.0, {})
    assert isinstance(again_too_long, T.Transition)
    assert again_too_long.run.status == "failed"


def test_the_run_learns_its_sessions_length_from_the_engine(tmp_path: Path) -> None:
    r = rules(workflows(tmp_path, "pools: [small, large]\n"))
    out = decide(T.start, None, task("hello"), r, now=100.0)
    assert isinstance(out, T.Transition)
    assert out.run.context_tokens == estimate_tokens("hello")
    res = reply(jobs(out.effects)[0])
    res.usage.prompt_tokens, res.usage.completion_tokens = 900, 64
    done = T.result(out.run, res, r, 101.0, {})
    assert isinstance(done, T.Transition)
    assert done.run.context_tokens == 900 + 64 - estimate_tokens("You answer.")


@pytest.mark.parametrize("agent", ["pools: [small, small]\n", "pools: [bad.name]\n",
                                   "latency_target: 0\n"])  # fmt: skip
def test_pool_lists_and_targets_are_checked_at_load(tmp_path: Path, agent: str) -> None:
    with pytest.raises(Exception, match=r"pool|latency_target"):
        workflows(tmp_path, agent)


def test_a_step_for_a_pool_at_zero_waits_for_capacity_not_for_a_timeout(tmp_path: Path) -> None:
    """A pool with no ready worker: the step is dispatched to it all the same
    (the job waits in its queue and wakes it), says ``waiting_capacity`` with
    the cold start as its estimate, and its deadline runs from then."""
    r = rules(workflows(tmp_path, "pools: [small]\n"), {"small": PoolNow(ready=0)})
    out = decide(T.start, None, task("hello"), r, now=100.0)
    assert isinstance(out, T.Transition)
    evs = [e.event for e in out.effects if isinstance(e, T.Emit) and isinstance(e.event, Step)]
    assert [e.status for e in evs] == ["started", "waiting_capacity"]
    assert evs[1].estimate_s == 60.0 and evs[1].pool == "small"
    assert [e.pool for e in out.effects if isinstance(e, T.Dispatch)] == ["small"]
    st = out.run.steps["r1.answer"]
    assert st.capacity_wait == 60.0 and st.deadline == 100.0 + 60.0 + 10.0
    # Past the step timeout but within the cold start: nothing is retried.
    assert T.timer(out.run, r, 100.0 + 11.0).effects == []
    # A replay says it again (the same event id: de-duplicated downstream).
    again = [e for e in T.replay(out.run, r, 120.0) if isinstance(e, T.Emit)]
    assert "step.r1.answer.waiting_capacity" in [e.key for e in again]
    # A worker of the pool that is starting: what is left of its start.
    starting = rules(r.workflows, {"small": PoolNow(ready=0, starting=1, ready_in_s=5.0)})
    st = decide(T.start, None, task("hello"), starting, now=100.0).run.steps["r1.answer"]  # type: ignore[union-attr]
    assert st.capacity_wait == 5.0
    # A ready worker: no wait, no event.
    warm = decide(T.start, None, task("hello"), rules(r.workflows), now=100.0)
    assert isinstance(warm, T.Transition) and warm.run.steps["r1.answer"].capacity_wait == 0
    statuses = [e.event.status for e in warm.effects
                if isinstance(e, T.Emit) and isinstance(e.event, Step)]  # fmt: skip
    assert statuses == ["started"]


def test_a_pool_the_catalogue_does_not_list_is_not_held_for(tmp_path: Path) -> None:
    """No declared cold start: its steps time out as before the catalogue."""
    wfs = workflows(tmp_path, "pool: nowhere\n")
    r = T.Rules(wfs, step_timeout=10.0, pools=lambda p: (Catalogue({}).spec(p), PoolNow(ready=0)))
    out = decide(T.start, None, task("hello"), r, now=100.0)
    assert isinstance(out, T.Transition)
    st = out.run.steps["r1.answer"]
    assert st.capacity_wait == 0 and st.deadline == 110.0
    assert "step.r1.answer.waiting_capacity" not in [
        e.key for e in out.effects if isinstance(e, T.Emit)
    ]
