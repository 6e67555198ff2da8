"""The concurrency-aware prediction without a broker: a step's share of an
engine under continuous batching (``batching.py``), what ``scheduling.predict``
makes of it, and what the pool view feeds it (its placements with their
predicted ends, the tasks arriving, the slowdown fitted from finished steps)."""

from __future__ import annotations

import time

import pytest

from proto.messages import Heartbeat, Phases, PoolPrediction, Timing, Usage
from services.orchestrator import poolview
from services.orchestrator.batching import (
    SlowdownFit,
    decode_speed,
    overlap,
    queue_wait,
    share,
)
from services.orchestrator.pools import Catalogue, PoolSpec
from services.orchestrator.poolview import PoolView
from services.orchestrator.routing import HeartbeatTracker
from services.orchestrator.scheduling import PoolNow, StepNeed, predict
from services.orchestrator.state import RunState, StepState
from services.orchestrator.workflows import GraphWorkflow, parse
from tests.twin_shell import TASKS, Shell

POOL = PoolSpec(name="small", max_model_len=2048, max_seqs=8, prefill_tps=1000, decode_tps=50)
NEED = StepNeed(prompt_tokens=200, max_tokens=96, expected_output=96)
RUN_ALONE = 200 / 1000 + 96 / 50


def test_a_bursts_first_step_shares_the_engine_with_the_steps_behind_it() -> None:
    # Twelve tasks at once on 8 slots: the first is placed before the others,
    # which will share its batch (the old estimate charged it the engine alone).
    first = predict(NEED, POOL, PoolNow(ready=1, arriving=11))
    assert first.wait_s == 0
    assert first.gpu_seconds == pytest.approx(RUN_ALONE / 8)
    # The ninth waits for the first batch and shares the second with the three after it.
    ends = tuple([RUN_ALONE] * 8)
    ninth = predict(NEED, POOL, PoolNow(ready=1, running=8, arriving=3, frees_in=ends))
    assert ninth.gpu_seconds == pytest.approx(RUN_ALONE / 4)
    assert ninth.wait_s == pytest.approx(RUN_ALONE)  # the old drain model: RUN_ALONE / 8
    # A step alone is charged the engine alone.
    assert predict(NEED, POOL, PoolNow(ready=1)).gpu_seconds == pytest.approx(RUN_ALONE)


def test_the_batch_a_step_joins_holds_what_is_ahead_and_what_follows() -> None:
    assert share(8, 0, 0).concurrency == 1
    assert share(8, 3, 0).concurrency == 4  # the old estimate's case: in flight + itself
    assert share(8, 2, 20).concurrency == 8  # never more than the slots
    s = share(8, 10, 1)
    assert (s.batch, s.concurrency) == (1, 4)  # 12 in all: the second batch of 4
    assert (
        share(
            8,
            4,
            2,
        ).concurrency
        == 7
    )
    assert share(4, 1.5, 0.5).concurrency == 3  # two workers' share of a pool's load


def test_sequences_sharing_an_engine_decode_slower_by_the_measured_slowdown() -> None:
    assert decode_speed(50, 0.0, 8) == 50  # a simulator's engine: no slowdown
    assert decode_speed(50, 0.1, 1) == 50
    assert decode_speed(50, 0.1, 6) == pytest.approx(50 / 1.5)
    slowed = predict(NEED, POOL, PoolNow(ready=1, running=5, decode_tps=50, decode_slowdown=0.1))
    assert slowed.run_s == pytest.approx(200 / 1000 + 96 / (50 / 1.5))
    assert slowed.gpu_seconds == pytest.approx(slowed.run_s / 6)


def test_a_step_alone_is_charged_its_whole_run() -> None:
    alone = overlap(0.0, 2.0, (), slots=8)
    assert (alone.gpu_seconds, alone.mean_concurrency) == (2.0, 1.0)
    # Spans that ended before it, or begin after it, do not share it.
    apart = overlap(0.0, 2.0, ((-3.0, -0.5), (2.0, 4.0)), slots=8)
    assert apart.gpu_seconds == pytest.approx(2.0)
    assert predict(NEED, POOL, PoolNow(ready=1, spans=((-3.0, -0.5),))).gpu_seconds == (
        pytest.approx(RUN_ALONE)
    )


def test_a_step_joining_three_that_end_soon_pays_the_engine_alone_after_them() -> None:
    ends = (0.2, 0.3, 0.4)
    spans = tuple((-1.0, e) for e in ends)
    got = overlap(0.0, 2.0, spans, slots=8)
    # Four share it for 0.2 s, three for 0.1 s, two for 0.1 s, then it runs alone.
    assert got.gpu_seconds == pytest.approx(0.2 / 4 + 0.1 / 3 + 0.1 / 2 + 1.6)
    assert got.mean_concurrency == pytest.approx((0.2 * 4 + 0.1 * 3 + 0.1 * 2 + 1.6) / 2.0)
    step = predict(NEED, POOL, PoolNow(ready=1, running=3, frees_in=ends, spans=spans))
    assert step.gpu_seconds == pytest.approx(0.2 / 4 + 0.1 / 3 + 0.1 / 2 + (RUN_ALONE - 0.4))
    # Counted, not timed (the old model): a quarter of its run.
    counted = predict(NEED, POOL, PoolNow(ready=1, running=3, frees_in=ends))
    assert counted.gpu_seconds == pytest.approx(RUN_ALONE / 4)


def test_a_step_joining_three_longer_ones_shares_its_whole_run() -> None:
    spans = ((-1.0, 5.0), (-0.5, 6.0), (0.0, 7.0))
    assert overlap(0.0, 2.0, spans, slots=8).gpu_seconds == pytest.approx(2.0 / 4)
    step = predict(NEED, POOL, PoolNow(ready=1, running=3, frees_in=(5.0, 6.0, 7.0), spans=spans))
    assert step.gpu_seconds == pytest.approx(RUN_ALONE / 4)
    # The steps known to follow it share it all along, on top; never beyond the slots.
    more = predict(NEED, POOL, PoolNow(ready=1, running=3, arriving=2, spans=spans))
    assert more.gpu_seconds == pytest.approx(RUN_ALONE / 6)
    full = predict(NEED, POOL, PoolNow(ready=1, running=3, arriving=20, spans=spans))
    assert full.gpu_seconds == pytest.approx(RUN_ALONE / 8)


def test_a_queued_step_shares_with_what_still_runs_once_it_starts() -> None:
    # 8 slots full, each ending at 1.0 .. 1.7 s: the ninth starts at 1.0 s
    # beside the seven left, which leave one by one; the two behind it stay.
    spans = tuple((-0.5, 1.0 + 0.1 * i) for i in range(8))
    ends = tuple(e for _, e in spans)
    got = predict(NEED, POOL, PoolNow(ready=1, running=8, arriving=2, frees_in=ends, spans=spans))
    assert got.wait_s == pytest.approx(1.0)
    left = sum(0.1 / min(8, 3 + k) for k in range(7, 0, -1))
    assert got.gpu_seconds == pytest.approx(left + (RUN_ALONE - 0.7) / 3)
    # Two workers split the spans between them.
    two = overlap(0.0, 2.0, ((-1.0, 5.0),) * 4, slots=8, workers=2)
    assert two.gpu_seconds == pytest.approx(2.0 / 3)


def test_decode_slows_with_the_mean_batch_over_the_steps_run() -> None:
    # Three ending at once at 0.5 s: the mean batch settles between 1 and 4.
    spans = ((-1.0, 0.5),) * 3
    got = predict(NEED, POOL, PoolNow(ready=1, running=3, decode_tps=50, decode_slowdown=0.1,
                                      frees_in=(0.5,) * 3, spans=spans))  # fmt: skip
    assert 200 / 1000 + 96 / 50 < got.run_s < 200 / 1000 + 96 / (50 / 1.3)
    mean = (0.5 * 4 + (got.run_s - 0.5)) / got.run_s
    assert got.run_s == pytest.approx(200 / 1000 + 96 / decode_speed(50, 0.1, mean), rel=0.02)
    assert got.gpu_seconds == pytest.approx(0.5 / 4 + got.run_s - 0.5)


def test_a_queued_step_waits_until_the_slot_it_takes_frees() -> None:
    assert queue_wait(8, 7, 2.0, ()) == 0  # a free slot
    assert queue_wait(8, 9, 2.0, (0.5, 1.0, 1.5) + (2.0,) * 6) == 1.0  # the second end
    # Ends not known (another replica's steps): the rest drain at the batch rate.
    assert queue_wait(8, 8, 2.0, ()) == pytest.approx(2.0 / 8)
    assert queue_wait(8, 10, 2.0, (1.0,)) == pytest.approx(1.0 + 2 * 2.0 / 8)


def test_the_slowdown_is_fitted_from_steps_at_several_batch_sizes() -> None:
    fit = SlowdownFit()
    for _ in range(10):
        fit.observe(1.0, 50.0)
    # One batch size says nothing of the slope; alone, it says the speed alone.
    assert fit.estimate() == pytest.approx((50.0, 0.0))
    assert SlowdownFit(alone=False).estimate() is None
    batched = SlowdownFit()
    for _ in range(10):
        batched.observe(4.0, 20.0)
    assert batched.estimate() is None  # a batch of 4's speed is not the speed alone
    for n in (1, 2, 4, 8, 3, 6):
        fit.observe(n, decode_speed(50.0, 0.2, n))
    got = fit.estimate()
    assert got is not None
    assert got[0] == pytest.approx(50.0, rel=0.05) and got[1] == pytest.approx(0.2, rel=0.1)
    flat = SlowdownFit()
    for n in (1, 8, 2, 8, 1, 4):
        flat.observe(n, 80.0)
    assert flat.estimate() == pytest.approx((80.0, 0.0))


def test_a_prefill_fit_weighs_each_step_by_its_tokens() -> None:
    # A request's fixed cost (~0.3 s to its first token on vLLM-CPU) makes
    # short prompts look slow: their mean speed predicted a long prompt's
    # prefill ~3x too long; over the tokens, within 1.5x.
    def seconds(tokens: int) -> float:
        return 0.3 + tokens / 1500.0

    fits = {"steps": SlowdownFit(), "tokens": SlowdownFit()}
    for _ in range(3):
        for n in (55, 240, 750):
            fits["steps"].observe(1.0, n / seconds(n))
            fits["tokens"].observe(1.0, n / seconds(n), tokens=n)
    each = {k: f.estimate() for k, f in fits.items()}
    got = {k: 750 / e[0] / seconds(750) for k, e in each.items() if e is not None}
    assert got["steps"] > 2.5  # the long prompt predicted ~3x too long
    assert 1.0 < got["tokens"] < 1.5
    total = 1045 / sum(map(seconds, (55, 240, 750)))  # all tokens over all seconds
    assert each["tokens"] == pytest.approx((total, 0.0), rel=0.03)  # the decay favours the last


def _view() -> tuple[PoolView, HeartbeatTracker]:
    hb = HeartbeatTracker()
    hb.last[("small", "w1")] = Heartbeat(worker="w1", pool="small", ready=True, engine="sim",
                                         ts=time.time(), decode_tps=40.0)  # fmt: skip
    return PoolView(Catalogue({"small": POOL}), hb), hb


def _run(task: str, seq: int, dispatched_at: float, run_s: float) -> RunState:
    st = StepState(agent="a", pool="small", session="s", dispatched_at=dispatched_at,
                   prediction=PoolPrediction(kv_tokens=1, wait_s=0.0, run_s=run_s,
                                             gpu_seconds=0.1, cost_usd=0.0))  # fmt: skip
    return RunState(tenant="acme", task_id=task, session="s", workflow="w", task_seq=seq,
                    steps={"r1.a": st})  # fmt: skip


def test_the_pool_view_sees_a_burst_arrive_and_when_its_placed_steps_end() -> None:
    view, _ = _view()
    for seq in (1, 2, 3):
        view.taken("acme", seq, behind=9 - seq)  # a batch of 3 taken, 6 more in the stream
    _, now = view.look("small", exclude=("acme", 1))
    assert now.arriving == 2 + 6 and now.running == 0
    t0 = time.time()
    view.changed(None, _run("t1", 1, t0, 2.0))  # task 1 placed: no longer arriving
    view.handled("acme", 1)
    _, now = view.look("small", exclude=("acme", 2))
    assert now.arriving == 1 + 6 and now.running == 1
    assert now.frees_in[0] == pytest.approx(2.0, abs=0.1)
    view.changed(_run("t1", 1, t0, 2.0), None)  # answered
    _, now = view.look("small")
    assert now.running == 0 and now.frees_in == ()
    # A stream's count of tasks behind is believed only while it is fresh.
    view._stream["acme"] = (3, 6, time.time() - poolview.BEHIND_FRESH_S - 1)
    assert view.look("small")[1].arriving == 2
    assert now.decode_tps == 40.0 and now.decode_slowdown == 0.0  # the heartbeat's, until fitted


def test_the_prediction_runs_at_the_speeds_the_workers_measured() -> None:
    view, hb = _view()
    hb.last[("small", "w1")].prefill_tps = 4000.0  # the catalogue says 1000, decode 50
    spec, now = view.look("small")
    assert (now.prefill_tps, now.decode_tps) == (4000.0, 40.0)
    assert predict(NEED, spec, now).run_s == pytest.approx(200 / 4000 + 96 / 40)


def test_the_pool_view_times_its_placed_steps_for_the_overlap() -> None:
    view, _ = _view()
    t0 = time.time()
    view.changed(None, _run("t1", 1, t0 - 1.0, 2.0))
    _, now = view.look("small")
    ((begin, end),) = now.spans
    assert begin == pytest.approx(-1.0, abs=0.1) and end == pytest.approx(1.0, abs=0.1)
    view.overlap = False  # BATON_SHARE_BY_OVERLAP=false: counted only
    _, now = view.look("small")
    assert now.spans == () and now.frees_in[0] == pytest.approx(1.0, abs=0.1)


def test_the_pool_view_fits_the_slowdown_from_the_steps_that_finished() -> None:
    view, _ = _view()
    for n in (1, 2, 4, 8, 1, 4):
        decode_s = 63 / decode_speed(60.0, 0.25, n)
        st = StepState(agent="a", pool="small", session="s", status="done",
                       usage=Usage(completion_tokens=64, gpu_seconds=(0.1 + decode_s) / n),
                       timing=Timing(phases=Phases(prefill=0.1, decode=decode_s)))  # fmt: skip
        view.finished(st)
    _, now = view.look("small")
    assert now.decode_tps == pytest.approx(60.0, rel=0.05)
    assert now.decode_slowdown == pytest.approx(0.25, rel=0.1)


ASK = parse(
    "name: ask\n"
    "agents:\n"
    "  assistant: {role: assistant, system: You answer., max_tokens: 32}\n"
    "steps:\n"
    "  - {id: answer, agent: assistant}\n",
    "ask.yaml",
)


def _predicted(shell: Shell, task_id: str) -> dict[str, float]:
    started = [e for e in shell.events(task_id) if e["type"] == "step" and e["status"] == "started"]
    return started[0]["prediction"]


async def test_a_conductor_places_a_bursts_first_task_seeing_the_tasks_behind_it() -> None:
    """The wiring, on the bus twin: a task's delivery says how many wait
    behind it in the tenant's stream, and the tasks placed before it are in
    flight: each of a burst of three is predicted a third of the engine."""
    shell = await Shell.start({"ask": GraphWorkflow(ASK)})
    for task_id in ("t0", "t1", "t2"):
        await shell.submit("ask", task_id)
    for task_id in ("t0", "t1", "t2"):
        assert await shell.handle(TASKS)
        p = _predicted(shell, task_id)
        # rel 5%: the three are placed some milliseconds apart on the twin's
        # real clock, and the overlap model charges a later one that time alone
        # (measured 1.6% on a loaded box); a half or a whole engine is far off.
        assert p["gpu_seconds"] == pytest.approx(p["run_s"] / 3, rel=0.05), task_id
    # Once the burst is answered, a task alone is charged the engine alone.
    await shell.settle_all()
    await shell.submit("ask", "t3")
    assert await shell.handle(TASKS)
    p = _predicted(shell, "t3")
    assert p["gpu_seconds"] == pytest.approx(p["run_s"], rel=0.01)


def test_the_jobs_a_pools_workers_run_are_not_counted_again_as_its_queue() -> None:
    # The pool consumer's count is pending + unacknowledged, and a worker
    # acks a job when it ends: the four running are in it.
    view, hb = _view()
    hb.last[("small", "w1")].inflight = 4
    view.backlog["small"] = 5
    _, now = view.look("small")
    assert (now.running, now.backlog) == (4, 1)
    shared = predict(NEED, POOL, now)
    assert shared.wait_s == 0 and shared.gpu_seconds == pytest.approx(shared.run_s / 6)


def _answered(worker: str, generation_end: float) -> StepState:
    """A step answered by ``worker``, its generation ended at ``generation_end``."""
    return StepState(agent="a", pool="small", session="s", status="done", worker=worker,
                     usage=Usage(completion_tokens=2, gpu_seconds=0.1),
                     timing=Timing(finished_at=generation_end + 0.05,
                                   phases=Phases(decode=0.5, record=0.05)))  # fmt: skip


def test_the_steps_answered_since_a_heartbeat_or_a_queue_reading_are_out_of_its_counts() -> None:
    # A heartbeat and the queue's count were read at t0, when four ran; two
    # of them have been answered since: two run, and none waits.
    view, hb = _view()
    t0 = time.time() - 0.3
    beat = hb.last[("small", "w1")]
    beat.inflight, beat.ts = 4, t0
    view.polled("small", 4, at=t0)
    view.finished(_answered("w1", t0 - 0.1))  # ended before the readings: they did not count it
    view.finished(_answered("w1", t0 + 0.1))
    view.finished(_answered("w1", t0 + 0.2))
    view.finished(_answered("w2", t0 + 0.2))  # another worker's: not in w1's heartbeat
    _, now = view.look("small")
    assert (now.running, now.backlog) == (2, 0)
    # BATON_RECONCILE_COUNTS=false: the counts as read (the queue's holds the running).
    view.reconcile_counts = False
    _, now = view.look("small")
    assert (now.running, now.backlog) == (4, 0)
    # A queue read after the answers counts what it counts.
    view.reconcile_counts = True
    view.polled("small", 5, at=t0 + 0.25)
    _, now = view.look("small")
    assert (now.running, now.backlog) == (2, 3)


def test_a_step_placed_before_the_queue_was_read_is_not_counted_twice() -> None:
    # Placed, in the queue's count, not yet in a heartbeat: one sequence ahead.
    view, _ = _view()
    t0 = time.time()
    view.changed(None, _run("t1", 1, t0 - 0.2, 2.0))
    view.polled("small", 1, at=t0 - 0.1)
    _, now = view.look("small")
    assert now.running + now.backlog == 1
    # Another replica's job in the count besides it is.
    view.polled("small", 2, at=t0 - 0.1)
    _, now = view.look("small")
    assert now.running + now.backlog == 2
    # A reading from before the step was placed does not hold it.
    view.polled("small", 1, at=t0 - 0.3)
    _, now = view.look("small")
    assert now.running + now.backlog == 2
    view.reconcile_counts = False  # as read: the placed step and the count's one
    view.polled("small", 1, at=t0 - 0.1)
    _, now = view.look("small")
    assert now.running + now.backlog == 2


def test_the_ends_remembered_are_only_those_a_reading_still_in_use_can_hold() -> None:
    view, _ = _view()
    t0 = time.time()
    view.finished(_answered("gone", t0 - 60.0))  # a worker since scaled away
    view.finished(_answered("w1", t0))
    assert list(view._ended) == [("small", "w1")]


def test_the_pool_view_predicts_prefill_and_decode_from_the_steps_it_saw() -> None:
    # The heartbeat's averages mix batch sizes (40 decode tok/s here); two
    # steps seen alone decoded at 80 and prefilled 400 tokens at 2000 tok/s.
    view, hb = _view()
    hb.last[("small", "w1")].prefill_tps = 500.0
    for _ in range(2):
        st = StepState(agent="a", pool="small", session="s", status="done",
                       usage=Usage(prompt_tokens=400, completion_tokens=65,
                                   gpu_seconds=0.2 + 64 / 80),
                       timing=Timing(phases=Phases(prefill=0.2, decode=64 / 80)))  # fmt: skip
        view.finished(st)
    _, now = view.look("small")
    assert (now.prefill_tps, now.decode_tps) == (pytest.approx(2000.0), pytest.approx(80.0))
    view.speeds_from_steps = False  # BATON_SPEEDS_FROM_STEPS=false: the heartbeat's
    view._fits.clear()
    view._prefill_fits.clear()
    view.finished(st)
    _, now = view.look("small")
    assert (now.prefill_tps, now.decode_tps) == (500.0, 40.0)
