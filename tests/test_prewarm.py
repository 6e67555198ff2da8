"""Pre-warming's pure decisions (services/orchestrator/prewarm.py), no
broker: which step follows a running one, whether to warm it, on which
worker; and the router sending the warmed step there."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest
from msgspec.structs import replace

from baton.dev.twin import TwinBus
from proto import keys, streams
from proto.messages import Heartbeat, InferenceResult, ToolCall, Usage
from services.orchestrator import prewarm
from services.orchestrator import transitions as T
from services.orchestrator.routing import HeartbeatTracker, Router
from services.orchestrator.runs import RunStore
from services.orchestrator.state import RunState
from services.orchestrator.warming import Kept, Warming
from services.orchestrator.workflows import GraphWorkflow, load_dir

from .test_transitions import WORKFLOWS, decide, jobs, reply

NOW = 1000.0
FLOW = textwrap.dedent("""\
    name: relay
    agents:
      drafter: {role: drafter, system: You draft., max_tokens: 64, tools: [search]}
      editor: {role: editor, system: You edit the draft., max_tokens: 32, pool: edit}
      judge: {role: judge, system: You judge., max_tokens: 8}
    steps:
      - {id: draft, agent: drafter}
      - {id: edit, agent: editor}
      - id: judge
        agent: judge
        route: {choices: {ok: done, again: draft}, default: ok}
    rounds: 2
    """)


@pytest.fixture
def rules(tmp_path: Path) -> T.Rules:
    (tmp_path / "relay.yaml").write_text(FLOW)
    wfs = {n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()}
    return T.Rules({**WORKFLOWS, **wfs}, step_timeout=10.0)


def started(rules: T.Rules, workflow: str = "relay") -> RunState:
    task = T.NewTask(tenant="acme", task_id="t1", session="t1", workflow=workflow, seq=1,
                     input="hello")  # fmt: skip
    out = decide(T.start, None, task, rules, now=NOW)
    assert isinstance(out, T.Transition)
    return out.run


def hb(worker: str, pool: str = "edit", admitted: int = 0, ts: float = NOW) -> Heartbeat:
    return Heartbeat(worker=worker, pool=pool, ready=True, engine="sim", ts=ts,
                     admitted_tokens=admitted, kv_capacity_tokens=1000)  # fmt: skip


def beats(*hbs: Heartbeat) -> dict[tuple[str, str], Heartbeat]:
    return {(h.pool, h.worker): h for h in hbs}


def test_the_step_that_follows_is_known_only_when_the_answer_cannot_change_it(
    rules: T.Rules,
) -> None:
    run = started(rules)
    wf = rules.workflows["relay"]
    nxt = wf.foreseen(run, "r1.draft")
    assert nxt is not None and (nxt.step_id, nxt.agent, nxt.session) == ("r1.edit", "editor", "t1")
    assert wf.foreseen(run, "r1.judge") is None  # routed: its answer decides
    res = rules.workflows["research"]
    # A parallel step next, a parallel branch, a route: nothing foreseen.
    assert res.foreseen(run, "r1.plan") is None
    assert res.foreseen(run, "r1.gather.coding") is None
    assert res.foreseen(run, "r1.validate") is None


def test_the_next_agents_prefix_is_warmed_on_the_least_loaded_worker(rules: T.Rules) -> None:
    run = started(rules)
    out = prewarm.decide(run, rules, "r1.draft", beats(hb("w1", admitted=300), hb("w2")), NOW)
    assert isinstance(out, prewarm.Warm)
    assert (out.pool, out.worker) == ("edit", "w2")
    job = out.job
    assert job.warm and job.max_tokens == 1 and job.step == "r1.edit" and job.agent == "editor"
    assert job.system == "You edit the draft." and job.session == "t1"
    assert job.ref == run.steps["r1.draft"].ref  # the session's window as it is now
    assert job.job_id == "acme.t1.r1.edit.warm"
    # The worker that holds the session is preferred while it has room.
    held = prewarm.decide(run, rules, "r1.draft", beats(hb("w1", admitted=300), hb("w2")),
                          NOW, prefer=lambda pool: "w1")  # fmt: skip
    assert isinstance(held, prewarm.Warm) and held.worker == "w1"


def test_no_warm_under_kv_pressure_without_a_worker_or_with_one_in_flight(
    rules: T.Rules,
) -> None:
    run = started(rules)
    full = beats(hb("w1", admitted=600))
    assert prewarm.decide(run, rules, "r1.draft", full, NOW) == "pressure"
    assert prewarm.decide(run, rules, "r1.draft", full, NOW, max_load=0.7) != "pressure"
    other_pool = beats(hb("w1", pool="default"))
    assert prewarm.decide(run, rules, "r1.draft", other_pool, NOW) == "no_worker"
    stale = beats(hb("w1", ts=NOW - 30))
    assert prewarm.decide(run, rules, "r1.draft", stale, NOW) == "no_worker"
    ok = beats(hb("w1"))
    # The step that follows was warmed already: once per step.
    again = prewarm.LastWarm("r1.edit", NOW - 1)
    assert prewarm.decide(run, rules, "r1.draft", ok, NOW, last=again) == "already"
    # Another step's warm still in flight (its step not dispatched, sent < 30 s ago).
    other = prewarm.LastWarm("r1.other", NOW - 5)
    assert prewarm.decide(run, rules, "r1.draft", ok, NOW, last=other) == "in_flight"
    late = prewarm.LastWarm("r1.other", NOW - prewarm.IN_FLIGHT_S - 1)
    assert isinstance(prewarm.decide(run, rules, "r1.draft", ok, NOW, last=late), prewarm.Warm)
    # The last step of the linear part: its follower is routed, nothing to warm.
    assert prewarm.decide(run, rules, "r1.edit", ok, NOW) == "no_next"


def test_a_step_already_dispatched_is_not_warmed(rules: T.Rules) -> None:
    run = started(rules)
    [job] = jobs(T.replay(run, rules, NOW))
    out = T.result(run, reply(job), rules, NOW + 1, {})
    assert isinstance(out, T.Transition) and "r1.edit" in out.run.steps
    assert prewarm.decide(out.run, rules, "r1.draft", beats(hb("w1")), NOW + 1) == "already"


def test_the_warmed_step_is_routed_to_the_warmed_worker_once() -> None:
    hbt = HeartbeatTracker()
    hbt.last = beats(hb("w1", ts=10**10), hb("w2", ts=10**10))
    router = Router(hbt)
    router.served("acme", "t1", "edit", "w1")
    router.warmed("acme.t1.r1.edit.warm", "edit", "w2")
    # Another step of the session (a tool turn) keeps going where it went.
    assert router.choose("acme", "t1", "edit") == "w1"
    assert router.choose("acme", "t1", "edit", "acme.t1.r1.edit.warm") == "w2"
    assert router.choose("acme", "t1", "edit", "acme.t1.r1.edit.warm") == "w1"  # used up
    # A warm on another pool than the step went to is not followed.
    router.warmed("acme.t1.r1.x.warm", "default", "w2")
    assert router.choose("acme", "t1", "edit", "acme.t1.r1.x.warm") == "w1"


ASK = textwrap.dedent("""\
    name: review
    agents:
      drafter: {role: drafter, system: You draft., max_tokens: 64}
      editor: {role: editor, system: You edit the draft., max_tokens: 32, pool: edit}
    steps:
      - {id: draft, agent: drafter}
      - {id: ask, input: {prompt: "Anything to change?", default: "no", timeout: 600}}
      - {id: edit, agent: editor}
    """)


def test_while_a_human_is_asked_the_step_after_is_warmed_and_kept_warm(
    rules: T.Rules, tmp_path: Path
) -> None:
    (tmp_path / "review.yaml").write_text(ASK)
    rules.workflows.update({n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()})
    run = started(rules, "review")
    wf = rules.workflows["review"]
    # The drafter's follower asks a human: nothing to warm while it runs...
    assert wf.foreseen(run, "r1.draft") is None
    [job] = jobs(T.replay(run, rules, NOW))
    out = T.result(run, reply(job), rules, NOW + 1, {})
    assert isinstance(out, T.Transition) and out.run.steps["r1.ask"].status == "waiting_input"
    waiting = out.run
    # ...but once it waits, the editor's step after it is foreseen and warmed.
    nxt = wf.foreseen(waiting, "r1.ask")
    assert nxt is not None and (nxt.step_id, nxt.agent) == ("r1.edit", "editor")
    ok = beats(hb("w1"), hb("w2", admitted=100))
    warm = prewarm.decide(waiting, rules, "r1.ask", ok, NOW + 1)
    assert isinstance(warm, prewarm.Warm) and warm.worker == "w1"
    assert warm.job.step == "r1.edit" and warm.job.ref == waiting.steps["r1.ask"].ref
    assert warm.msg_id == warm.job.job_id == "acme.t1.r1.edit.warm"
    # Sent once; a refresh is the same job under a message id of its own,
    # to the worker that holds it, and is skipped under KV pressure.
    last, later = prewarm.LastWarm("r1.edit", NOW + 1), NOW + 30
    ok = beats(hb("w1", ts=later), hb("w2", admitted=100, ts=later))
    assert prewarm.decide(waiting, rules, "r1.ask", ok, later, last=last) == "already"
    again = prewarm.decide(waiting, rules, "r1.ask", ok, later, last=last, refresh=1,
                           prefer={"edit": "w2"}.get)  # fmt: skip
    assert isinstance(again, prewarm.Warm) and again.worker == "w2"
    assert again.job == msgspec.structs.replace(warm.job, published_at=later)
    assert again.msg_id == "acme.t1.r1.edit.warm.1"
    full = beats(hb("w2", admitted=900, ts=later))
    assert prewarm.decide(waiting, rules, "r1.ask", full, later, last=last, refresh=1,
                          prefer={"edit": "w2"}.get) == "pressure"  # fmt: skip


def test_a_warms_gpu_time_is_charged_to_its_run_once(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text(FLOW)
    wfs = {n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()}
    rules = T.Rules({**WORKFLOWS, **wfs}, price=lambda pool: 36.0 if pool == "edit" else 1.0)
    run = started(rules)
    before = (run.usage.gpu_seconds, run.cost_usd)
    charge = InferenceResult(job_id="acme.t1.r1.edit.warm", task_id="t1", tenant="acme",
                             session="t1", step="r1.edit", worker="w2", warm=True, pool="edit",
                             usage=Usage(gpu_seconds=0.5, prompt_tokens=99))  # fmt: skip
    out = T.warmed(run, charge, rules)
    assert out.changed and out.effects == []
    assert out.run.usage.gpu_seconds == pytest.approx(before[0] + 0.5)
    assert out.run.usage.prompt_tokens == run.usage.prompt_tokens  # GPU time, not tokens
    assert out.run.cost_usd == pytest.approx(before[1] + 0.5 / 3600 * 36.0)  # the warm's pool
    assert out.run.steps == run.steps  # no step answered
    again = T.warmed(out.run, charge, rules)  # the same charge delivered again
    assert not again.changed and again.run.usage.gpu_seconds == out.run.usage.gpu_seconds
    out.run.status = "completed"
    ended = T.warmed(out.run, replace(charge, job_id="acme.t1.r1.judge.warm"), rules)
    assert not ended.changed  # a finished run's totals were published: not changed again


async def test_a_refresh_reads_the_run_afresh_and_stops_once_answered_anywhere(
    rules: T.Rules, tmp_path: Path
) -> None:
    """On the bus twin: the warming shell refreshes an input wait while the
    stored run still waits, and stops when the stored run says it was
    answered (by another replica: this one never saw the answer)."""
    (tmp_path / "review.yaml").write_text(ASK)
    rules.workflows.update({n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()})
    run = started(rules, "review")
    [job] = jobs(T.replay(run, rules, NOW))
    out = T.result(run, reply(job), rules, NOW + 1, {})
    assert isinstance(out, T.Transition)
    waiting = out.run
    twin = TwinBus()
    await twin.provision(streams=[streams.JOBS])
    runs = RunStore(await twin.ensure_bucket(streams.RUNS))
    snap = await runs.write(waiting, None)
    hbt = HeartbeatTracker()
    warming = Warming(twin, Router(hbt), rules, runs)
    warming.kept[waiting.key] = Kept(waiting, "r1.ask", "edit", "w1", NOW + 1)
    hbt.last = beats(hb("w1", ts=NOW + 30))
    assert await warming.refresh(20.0, now=NOW + 30) == 1  # still waiting: sent again
    answered = T._copy(waiting)
    answered.steps["r1.ask"].status = "done"
    await runs.write(answered, snap.revision)
    hbt.last = beats(hb("w1", ts=NOW + 60))
    assert await warming.refresh(20.0, now=NOW + 60) == 0
    assert warming.kept == {}


TOOLED = textwrap.dedent("""\
    name: tooled
    agents:
      coder: {role: coder, system: You code., max_tokens: 64, tools: [python]}
      editor: {role: editor, system: You edit., max_tokens: 32}
    steps:
      - {id: code, agent: coder}
      - {id: edit, agent: editor}
    """)


def _calling_tools(rules: T.Rules, tmp_path: Path) -> tuple[RunState, list[T.Effect]]:
    """A ``tooled`` run whose coder turn (served by w1) called a tool."""
    (tmp_path / "tooled.yaml").write_text(TOOLED)
    rules.workflows.update({n: GraphWorkflow(s) for n, s in load_dir(tmp_path).items()})
    run = started(rules, "tooled")
    [job] = jobs(T.replay(run, rules, NOW))
    calls = [ToolCall(id="c0", name="python", arguments='{"code": "print(1)"}')]
    out = T.result(run, reply(job, output="", tool_calls=calls), rules, NOW + 1, {})
    assert isinstance(out, T.Transition) and out.run.steps["r1.code"].status == "tools"
    return out.run, out.effects


def test_while_tools_run_the_steps_own_prefix_is_kept_warm_where_its_turn_ran(
    rules: T.Rules, tmp_path: Path
) -> None:
    run, _ = _calling_tools(rules, tmp_path)
    st = run.steps["r1.code"]
    assert st.worker == "w1"
    later = NOW + 30
    ok = beats(hb("w1", st.pool, ts=later), hb("w2", st.pool, ts=later))
    warm = prewarm.own(run, rules, "r1.code", ok, later, refresh=1)
    assert isinstance(warm, prewarm.Warm) and warm.worker == "w1"  # not the idler w2: w1 holds it
    job = warm.job
    assert job.warm and job.step == "r1.code" and job.ref == st.ref and job.max_tokens == 1
    assert job.system == "You code." and [t.name for t in job.tools] == ["python"]
    assert warm.msg_id == job.job_id == "acme.t1.r1.code.t0.warm.1"
    # Its worker under KV pressure: skipped, the prefix is the first to go;
    # its worker gone: the prefix went with it.
    full = beats(hb("w1", st.pool, admitted=900, ts=later))
    assert prewarm.own(run, rules, "r1.code", full, later, refresh=1) == "pressure"
    gone = beats(hb("w2", st.pool, ts=later))
    assert prewarm.own(run, rules, "r1.code", gone, later, refresh=1) == "no_worker"
    # The calls answered: the turn after them runs, nothing to keep.
    answered = T._copy(run)
    answered.steps["r1.code"].status = "dispatched"
    assert prewarm.own(answered, rules, "r1.code", ok, later, refresh=1) == "no_next"


async def test_the_shell_keeps_a_tool_wait_warm_until_its_calls_are_answered(
    rules: T.Rules, tmp_path: Path
) -> None:
    run, effects = _calling_tools(rules, tmp_path)
    pool = run.steps["r1.code"].pool
    twin = TwinBus()
    await twin.provision(streams=[streams.JOBS])
    runs = RunStore(await twin.ensure_bucket(streams.RUNS))
    snap = await runs.write(run, None)
    hbt = HeartbeatTracker()
    hbt.last = beats(hb("w1", pool, ts=NOW + 1))
    router = Router(hbt)
    warming = Warming(twin, router, rules, runs)
    await warming.after(run, effects)
    kept = warming.kept[run.key]
    assert (kept.step, kept.status, kept.worker, kept.turn) == ("r1.code", "tools", "w1", 0)
    last = dict(warming.last)
    kept.sent = NOW + 1  # the shell kept it on the wall clock; the test's clock is NOW
    hbt.last = beats(hb("w1", pool, ts=NOW + 8))  # within the turn's 10 s deadline
    assert await warming.refresh(5.0, now=NOW + 8) == 1  # calls still out: sent again
    assert warming.last == last  # the run's warm of a step to come is left as it was
    assert router.choose("acme", run.session, pool, "acme.t1.r1.code.t0.warm.1") is None
    answered = T._copy(run)
    answered.steps["r1.code"].status, answered.steps["r1.code"].turn = "dispatched", 1
    await runs.write(answered, snap.revision)
    hbt.last = beats(hb("w1", pool, ts=NOW + 9))
    assert await warming.refresh(0.5, now=NOW + 9) == 0
    assert warming.kept == {}


def test_a_fan_out_that_follows_warms_each_branchs_first_step(rules: T.Rules) -> None:
    run = started(rules, "research")
    wf = rules.workflows["research"]
    # No one step follows the plan: a fan-out does, each branch on its fork.
    ok = beats(hb("w1", pool="default", admitted=300), hb("w2", pool="default"))
    assert prewarm.decide(run, rules, "r1.plan", ok, NOW) == "no_next"
    plans = wf.branches_after(run, "r1.plan")
    assert [(p.step_id, p.agent) for p in plans] == [
        ("r1.gather.retrieval", "retrieval"),
        ("r1.gather.coding", "coding"),
    ]
    assert [p.session for p in plans] == [keys.fork_session("acme", "t1", p.step_id) for p in plans]
    # After a branch, the validator (routed) or a linear step: no fan-out.
    assert wf.branches_after(run, "r1.gather.coding") == []
    assert wf.branches_after(run, "r1.validate") == []
    warms = prewarm.branches(run, rules, "r1.plan", ok, NOW)
    assert isinstance(warms, list)
    assert [(w.job.step, w.job.agent, w.pool, w.worker) for w in warms] == [
        ("r1.gather.retrieval", "retrieval", "default", "w2"),
        ("r1.gather.coding", "coding", "default", "w2"),
    ]
    for w in warms:
        # The branch agent's prompt over the session as it is now: what its fork starts from.
        job = w.job
        assert job.warm and job.max_tokens == 1 and job.ref == run.steps["r1.plan"].ref
        assert job.system == wf.agents[job.agent].system
        assert [t.name for t in job.tools] == wf.agents[job.agent].tools
        assert w.msg_id == job.job_id == f"acme.t1.{job.step}.warm"
    # Once per fan-out, one warm in flight, none under pressure or without a worker.
    sent = prewarm.LastWarm("r1.gather.coding", NOW)
    assert prewarm.branches(run, rules, "r1.plan", ok, NOW + 1, last=sent) == "already"
    other = prewarm.LastWarm("r1.other", NOW - 5)
    assert prewarm.branches(run, rules, "r1.plan", ok, NOW, last=other) == "in_flight"
    full = beats(hb("w1", pool="default", admitted=600))
    assert prewarm.branches(run, rules, "r1.plan", full, NOW) == "pressure"
    assert prewarm.branches(run, rules, "r1.plan", beats(hb("w1")), NOW) == "no_worker"
    # Dispatched: nothing left to warm.
    [job] = jobs(T.replay(run, rules, NOW))
    out = decide(T.result, run, reply(job), rules, now=NOW + 1)
    assert isinstance(out, T.Transition) and "r1.gather.coding" in out.run.steps
    assert prewarm.branches(out.run, rules, "r1.plan", ok, NOW + 1) == "already"
    # A linear follower is ``decide``'s, not a fan-out.
    relay = started(rules)
    assert prewarm.branches(relay, rules, "r1.draft", beats(hb("w1")), NOW) == "no_next"


async def test_the_shell_warms_the_branches_and_routes_each_where_it_was_warmed(
    rules: T.Rules,
) -> None:
    out = decide(T.start, None, T.NewTask(tenant="acme", task_id="t1", session="t1",
                                          workflow="research", seq=1, input="hi"), rules, now=NOW)  # fmt: skip
    assert isinstance(out, T.Transition)
    twin = TwinBus()
    await twin.provision(streams=[streams.JOBS])
    hbt = HeartbeatTracker()
    hbt.last = beats(hb("w1", pool="default", admitted=300, ts=10**10),
                     hb("w2", pool="default", ts=10**10))  # fmt: skip
    router = Router(hbt)
    warming = Warming(twin, router, rules, RunStore(await twin.ensure_bucket(streams.RUNS)))
    await warming.after(out.run, out.effects)  # the plan dispatched
    assert warming.last[out.run.key].step in ("r1.gather.retrieval", "r1.gather.coding")
    for branch in ("retrieval", "coding"):
        step = f"r1.gather.{branch}"
        fork = keys.fork_session("acme", "t1", step)
        assert router.choose("acme", fork, "default", keys.warm("acme", "t1", step)) == "w2"
