"""The conductor's shell — handlers, ``_apply``, rejection, the watchdog —
on the bus twin (``tests/twin_shell.py``), in milliseconds. Each behaviour
here is also tested on real processes (named in each test), and the twin's
bus contract against a real nats-server (``tests/test_bus_twin.py``)."""

from __future__ import annotations

import asyncio
import math

import msgpack

from baton.dev.testing import uid
from proto import subjects
from proto.messages import InputAnswer
from services.orchestrator.metrics import INPUT_ANSWERS, RUN_CONFLICTS
from services.orchestrator.service import BUILTIN_WORKFLOWS
from services.orchestrator.workflows import GraphWorkflow, load_dir, parse
from tests.twin_shell import INPUTS, RESULTS, TASKS, TENANT, TIMERS, Shell

WORKFLOWS = {n: GraphWorkflow(s) for n, s in load_dir(BUILTIN_WORKFLOWS).items()}
UNENFORCEABLE = [math.nan, math.inf, -math.inf, -1.0]
LONELY_YAML = (
    "name: lonely\n"
    "agents:\n"
    "  ghost: {role: ghost, system: nobody serves this pool, pool: nowhere, timeout: 1}\n"
    "steps:\n"
    "  - id: wait\n"
    "    agent: ghost\n"
)
LONELY = parse(LONELY_YAML, "lonely.yaml")
QUICK = parse(
    "name: quick\n"
    "agents:\n"
    "  writer: {role: writer, system: You write., max_tokens: 16}\n"
    "steps:\n"
    "  - id: confirm\n"
    '    input: {prompt: "Go ahead?", default: "go ahead by default", timeout: 1.5}\n'
    "  - id: final\n"
    "    agent: writer\n",
    "quick.yaml",
)


async def test_a_non_finite_or_negative_max_usd_on_the_bus_fails_with_invalid_field() -> None:
    """(Moved from tests/test_budget_admission.py; over HTTP it stays on the
    stack there, and bus rejections on real processes are in
    tests/test_end_to_end.py.)"""
    shell = await Shell.start(WORKFLOWS)
    ids = [uid() for _ in UNENFORCEABLE]
    ok = uid()
    for task_id, usd in [*zip(ids, UNENFORCEABLE, strict=True), (ok, 5.0)]:
        body = {"tenant": TENANT, "task_id": task_id, "input": "x", "budget": {"max_usd": usd}}
        await shell.twin.publish(subjects.tenant_task(TENANT, "chat"), msgpack.packb(body),
                                 msg_id=task_id)  # fmt: skip
    await shell.settle_all()
    for task_id in ids:
        [failed] = shell.events(task_id)
        assert failed["type"] == "failed", failed
        error = failed["error"]
        assert error["code"] == "invalid_field" and "max_usd" in error["message"]
    # Answered with a failed event: terminated, not dead-lettered.
    assert shell.twin.messages(subjects.dead_letter(TASKS)) == []
    # The refusal is specific: the same task with a finite budget runs.
    assert shell.events(ok)[-1]["type"] == "completed"


async def test_a_step_nobody_answers_is_retried_then_fails_with_step_timeout() -> None:
    """(Moved from tests/test_orchestrator.py, where it waited the watchdog
    out on real processes; tests/test_streaming.py still does.)"""
    shell = await Shell.start({"lonely": GraphWorkflow(LONELY)})
    await shell.submit("lonely", "t1", "anyone?")
    assert await shell.handle(TASKS)
    for _ in range(10):  # nobody serves the pool: only the watchdog moves the run
        shell.twin.advance(1.0)
        await shell.handle(TIMERS)
    failed = shell.events("t1")[-1]
    assert failed["type"] == "failed" and failed["error"]["code"] == "step_timeout"
    assert "2 attempt(s)" in failed["error"]["message"]
    run = await shell.run("t1")
    assert run is not None
    step = run.steps["r1.wait"]
    assert step.attempt == 2 and step.status == "failed"
    assert len(shell.twin.messages(subjects.job("nowhere"))) == 2  # one job per attempt


async def test_a_result_lost_after_its_change_was_stored_is_redelivered_and_applied_once() -> None:
    """The shell's crash path: the change is stored, its effects fail, the
    result comes back and the stored state's effects go out, each once
    (on real processes: tests/test_faults.py kills the orchestrator there)."""
    shell = await Shell.start(WORKFLOWS, replicas=2)
    await shell.submit("chat", "t1", "hello")
    assert await shell.handle(TASKS)
    await shell.work()

    def crash(subject: str) -> None:
        raise RuntimeError(f"crash before {subject}")

    shell.twin.before_publish = crash
    assert await shell.handle("orchestrator-results")
    shell.twin.before_publish = None
    stored = shell.stored("t1")
    assert stored[-1].terminal  # the change is stored...
    assert "completed" not in [e["type"] for e in shell.events("t1")]  # ...its event is not
    await shell.settle_all(replica=1)  # the other replica takes the redelivery
    assert [e["type"] for e in shell.events("t1")].count("completed") == 1
    assert len(shell.stored("t1")) == len(stored)  # nothing stored twice


async def test_an_answer_to_a_finished_task_is_ignored() -> None:
    """(Moved from tests/test_input.py, where it waited the default out; a
    repeated answer ignored stays there, on real processes.)"""
    shell = await Shell.start({"quick": GraphWorkflow(QUICK)})
    await shell.submit("quick", "t1", "hi")
    await shell.settle_all()  # nobody answers: the default, at the deadline
    events = shell.events("t1")
    assert events[-1]["type"] == "completed"
    finished = INPUT_ANSWERS.labels("finished")
    before = finished._value.get()
    published: list[str] = []
    shell.twin.before_publish = published.append  # every publish, duplicates too
    await shell.twin.publish(f"{subjects.INPUT}.{TENANT}.t1",
                             InputAnswer(answer="too late", step="r1.confirm"))  # fmt: skip
    assert await shell.handle(INPUTS)
    assert finished._value.get() == before + 1
    assert published == [f"{subjects.INPUT}.{TENANT}.t1"]  # nothing published again
    users = [m.content for m in shell.store.sessions["t1"] if m.role == "user"]
    assert users == ["hi", "go ahead by default"]
    assert shell.events("t1") == events


async def test_a_write_that_loses_its_compare_and_set_is_counted_and_decided_again() -> None:
    """``baton_run_write_conflicts_total``: the figure that says how often a
    run's parallel branches (or replicas) contend for its key. (On real
    processes: the chaos tier's replicas and `python -m bench orchestrator`.)"""
    shell = await Shell.start(WORKFLOWS)
    conflicts = RUN_CONFLICTS.labels("chat")
    before = conflicts._value.get()
    task_id = uid()
    await shell.submit("chat", task_id)
    raced: list[str] = []

    def race(key: str) -> None:  # another writer stores the run first, once
        if not raced:
            raced.append(key)
            shell.kv.race(key)

    await shell.handle(TASKS)  # the run is created, its step dispatched
    assert await shell.work() is not None
    shell.kv.before_write = race
    await shell.handle(RESULTS)  # the answer's write loses once, is decided again
    shell.kv.before_write = None
    assert raced and conflicts._value.get() == before + 1
    await shell.settle_all()
    assert [e["type"] for e in shell.events(task_id)][-1] == "completed"


async def test_parallel_branches_answering_together_are_stored_one_after_the_other() -> None:
    """#23: a ``research`` round's two branches answer at once; this replica
    decides and stores them one at a time (the second on the first's stored
    snapshot), so neither write loses its compare-and-set. (Counted on real
    processes by `python -m bench orchestrator` and `python -m bench conflicts`.)"""
    shell = await Shell.start(WORKFLOWS)
    update = shell.kv.update

    async def slow_update(key: str, value: bytes, last: int) -> int:
        await asyncio.sleep(0)  # a real write is a round trip: others run meanwhile
        return await update(key, value, last)

    shell.kv.update = slow_update  # type: ignore[method-assign]
    conflicts = RUN_CONFLICTS.labels("research")
    before, refused = conflicts._value.get(), shell.kv.conflicts
    task_id = uid()
    await shell.submit("research", task_id)
    assert await shell.handle(TASKS)  # the plan dispatched
    assert await shell.work() is not None
    assert await shell.handle(RESULTS)  # the plan recorded: both branches dispatched
    branches = [await shell.work(), await shell.work()]
    assert all(j is not None and ".gather." in j.step for j in branches), branches
    assert len(shell.twin.ready(RESULTS)) == 2
    handled = await asyncio.gather(shell.handle(RESULTS, pick=0), shell.handle(RESULTS, pick=1))
    assert handled == [True, True]
    assert conflicts._value.get() == before and shell.kv.conflicts == refused
    run = await shell.run(task_id)
    assert run is not None
    assert sorted(st.status for k, st in run.steps.items() if ".gather." in k) == ["done"] * 2
    assert len(shell.conductors[0].locks) == 0  # no lock kept for a run nobody handles
    await shell.settle_all()
    assert [e["type"] for e in shell.events(task_id)][-1] == "completed"


async def test_a_far_watchdog_sleeps_to_its_due_time_in_one_nak() -> None:
    """A run whose every deadline is far (timeouts of 900 s, every workflow's
    at least that): its timer is not woken every MAX_TIMER_SLEEP (300 s),
    only at the step's deadline (#23: no per-run timer churn)."""
    slow = parse(LONELY_YAML.replace("timeout: 1", "timeout: 900"), "lonely.yaml")
    shell = await Shell.start({"lonely": GraphWorkflow(slow)}, step_timeout=900.0)
    await shell.submit("lonely", "t1", "anyone?")
    assert await shell.handle(TASKS)
    assert await shell.handle(TIMERS)  # first look: not due, asleep until the deadline
    shell.twin.advance(301.0)
    assert not await shell.handle(TIMERS)  # under the 300 s cap it woke here
    shell.twin.advance(600.0)
    assert await shell.handle(TIMERS)  # the deadline: the step is dispatched again
    run = await shell.run("t1")
    assert run is not None and run.steps["r1.wait"].attempt == 2


async def test_a_task_id_has_one_terminal_event_whichever_copy_comes_first() -> None:
    """A bad copy of a known task says nothing; a good copy of a refused task
    runs nothing (on real processes: ``tests/test_fuzz_bus.py``)."""
    shell = await Shell.start(WORKFLOWS)
    good_first, bad_first = uid(), uid()
    bad = {"max_usd": math.nan}
    for n, (task_id, budget) in enumerate([(good_first, None), (good_first, bad),
                                           (bad_first, bad), (bad_first, None)]):  # fmt: skip
        body = {"tenant": TENANT, "task_id": task_id, "input": "x"}
        if budget is not None:
            body["budget"] = budget
        await shell.twin.publish(subjects.tenant_task(TENANT, "chat"), msgpack.packb(body),
                                 msg_id=f"{task_id}-{n}")  # fmt: skip
        await shell.settle_all()
    assert [e["type"] for e in shell.events(good_first)][-1] == "completed"
    assert "failed" not in [e["type"] for e in shell.events(good_first)]
    [failed] = shell.events(bad_first)
    assert failed["type"] == "failed" and failed["error"]["code"] == "invalid_field"
