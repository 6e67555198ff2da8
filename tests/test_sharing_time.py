"""A step's time under engine sharing, predicted without a broker: its
prefill by its prompt tokens (``batching.PrefillFit``), the prefills of the
sequences sharing its engine, and the steps expected to join it while it
runs (``batching.arrival_rate``, ``expected_arrivals``), as
``scheduling.predict`` and the pool view use them (docs/scheduling.md, "The
prediction")."""

from __future__ import annotations

import time

import pytest

from proto.messages import Heartbeat, Phases, PoolPrediction, Timing, Usage
from services.orchestrator.batching import (
    PrefillFit,
    arrival_rate,
    expected_arrivals,
    overlap,
)
from services.orchestrator.pools import Catalogue, PoolSpec
from services.orchestrator.poolview import PoolView
from services.orchestrator.routing import HeartbeatTracker
from services.orchestrator.scheduling import PoolNow, StepNeed, predict
from services.orchestrator.state import RunState, StepState

POOL = PoolSpec(name="cpu", max_model_len=2048, kv_tokens=65536, max_seqs=8,
                prefill_tps=2000, decode_tps=30)  # fmt: skip


def seconds(tokens: int) -> float:
    """A prefill alone: a fixed cost to the first token, then per token."""
    return 0.1 + tokens / 600.0


def test_a_prefill_is_fitted_by_its_tokens_from_steps_alone() -> None:
    fit = PrefillFit()
    assert fit.estimate() is None
    for _ in range(3):
        for n in (65, 260, 770):
            fit.observe(1.0, n, seconds(n))
    fixed, per_token = fit.estimate() or (0.0, 0.0)
    assert fixed == pytest.approx(0.1, rel=0.02) and per_token == pytest.approx(1 / 600, rel=0.02)
    # In a batch a step's first token waits for the others' prefills: not fitted,
    # but its prompt tells the pool's typical one.
    fit.observe(8.0, 800, 5.0)
    assert fit.estimate() == pytest.approx((fixed, per_token))
    assert 260 < fit.typical_tokens <= 800
    # One prompt length tells no slope; noise below the origin is refitted through it.
    same = PrefillFit()
    for _ in range(4):
        same.observe(1.0, 200, 0.4)
    assert same.estimate() is None
    low = PrefillFit()
    low.observe(1.0, 100, 0.01)
    low.observe(1.0, 800, 1.4)
    got = low.estimate()
    assert got is not None and got[0] == 0.0 and got[1] > 0


def test_a_batchs_prefills_are_split_among_it_whatever_each_steps_prompt() -> None:
    # A wave of 8 on vLLM-CPU: each step's first token came after all eight
    # prefills (~5 s) and the clock split them equally: the steps of 66 and
    # 800 prompt tokens were charged the same (1.06 s). By tokens, each step
    # is predicted its own prefill plus the pool's typical one for each of
    # the 7 others, split 8 ways; by a prefill speed slowed by the batch (as
    # before), a step pays its own prefill's share, long prompts far more.
    by_tokens = (0.0, 1 / 600, 380.0)
    costs = {}
    for model in ("by_tokens", "by_speed"):
        for prompt in (66, 800):
            need = StepNeed(prompt_tokens=prompt, max_tokens=64, expected_output=64)
            now = PoolNow(ready=1, arriving=7, decode_tps=30.0, decode_slowdown=0.1,
                          prefill_tps=600.0, prefill_slowdown=1.0,
                          prefill_by_tokens=by_tokens if model == "by_tokens" else None)  # fmt: skip
            costs[model, prompt] = predict(need, POOL, now).gpu_seconds
    assert costs["by_tokens", 800] / costs["by_tokens", 66] < 1.2
    assert costs["by_speed", 800] / costs["by_speed", 66] > 1.5
    # The batch's whole run: every prefill, then the decodes at a batch of 8.
    need = StepNeed(prompt_tokens=66, max_tokens=64, expected_output=64)
    now = PoolNow(ready=1, arriving=7, decode_tps=30.0, decode_slowdown=0.1,
                  prefill_by_tokens=by_tokens)  # fmt: skip
    run = predict(need, POOL, now).run_s
    assert run == pytest.approx((66 + 7 * 380) / 600 + 64 / (30.0 / 1.7))
    # Alone, a step pays its own prefill and decode, whole.
    alone = predict(need, POOL, PoolNow(ready=1, decode_tps=30.0, prefill_by_tokens=by_tokens))
    assert alone.gpu_seconds == pytest.approx(66 / 600 + 64 / 30.0)


def test_steps_joining_running_batches_tell_a_rate_and_closed_waves_none() -> None:
    assert arrival_rate([], 10.0) == 0.0
    trickle = [1.0, 1.6, 2.2, 2.8]
    assert arrival_rate(trickle, 3.0) == pytest.approx(1 / 0.6)
    # Two gaps with none: the trickle ended.
    assert arrival_rate(trickle, 2.8 + 1.3) == 0.0
    # Older than the horizon: forgotten.
    assert arrival_rate(trickle, 30.0) == 0.0
    assert arrival_rate([1.0, 1.0, 1.0], 1.1) == 0.0  # no spread: no rate
    got = expected_arrivals(1 / 0.6, 0.5, 2.0, 8)
    assert [round(b, 2) for b, _ in got] == [1.1, 1.7, 2.3]  # 3 in a 2 s run, from its start
    assert all(e - b == pytest.approx(2.0) for b, e in got)  # each as long as it
    assert len(expected_arrivals(100.0, 0.0, 2.0, 8)) == 8
    assert expected_arrivals(0.0, 0.0, 2.0, 8) == ()


def test_a_step_in_a_trickle_is_predicted_the_steps_that_will_join_it() -> None:
    # One every 0.6 s on a 2.3 s run: about alone at first, four by its end.
    need = StepNeed(prompt_tokens=66, max_tokens=64, expected_output=64)
    alone = predict(need, POOL, PoolNow(ready=1, decode_tps=30.0))
    joined = predict(need, POOL, PoolNow(ready=1, decode_tps=30.0, arrival_rate=1 / 0.6))
    assert alone.gpu_seconds == pytest.approx(alone.run_s)
    spans = expected_arrivals(1 / 0.6, 0.0, alone.run_s, 8)
    assert joined.gpu_seconds == pytest.approx(
        overlap(0.0, alone.run_s, spans, slots=8).gpu_seconds
    )
    assert joined.gpu_seconds < 0.7 * alone.gpu_seconds


def _view() -> PoolView:
    hb = HeartbeatTracker()
    hb.last[("cpu", "w1")] = Heartbeat(worker="w1", pool="cpu", ready=True, engine="vllm",
                                       ts=time.time(), decode_tps=30.0)  # fmt: skip
    return PoolView(Catalogue({"cpu": POOL}), hb)


def _run(task: str, dispatched_at: float, run_s: float = 2.0) -> RunState:
    st = StepState(agent="a", pool="cpu", session="s", dispatched_at=dispatched_at,
                   prediction=PoolPrediction(kv_tokens=1, wait_s=0.0, run_s=run_s,
                                             gpu_seconds=0.1, cost_usd=0.0))  # fmt: skip
    return RunState(tenant="acme", task_id=task, session="s", workflow="w",
                    task_seq=0, steps={"r1.a": st})  # fmt: skip


def test_the_pool_view_expects_arrivals_only_from_steps_that_joined_running_ones() -> None:
    view = _view()
    t0 = time.time() - 1.9
    # A burst: placed together, none joined a running step.
    burst = [_run(f"b{k}", t0 - 5.0 + k * 0.001) for k in range(4)]
    for run in burst:
        view.changed(None, run)
    assert view.look("cpu")[1].arrival_rate == 0.0
    for run in burst:  # answered: the next wave comes after
        view.changed(run, None)
    # A trickle: each placed while the one before it runs.
    for k in range(4):
        view.changed(None, _run(f"t{k}", t0 + k * 0.6))
    assert view.look("cpu")[1].arrival_rate == pytest.approx(1 / 0.6, rel=0.05)
    view.expect_arrivals = False  # BATON_EXPECT_ARRIVALS=false
    assert view.look("cpu")[1].arrival_rate == 0.0


def test_the_pool_view_fits_the_prefill_by_tokens_from_the_steps_it_saw_alone() -> None:
    view = _view()
    for prompt in (65, 260, 770):
        pf = seconds(prompt)
        st = StepState(agent="a", pool="cpu", session="s", status="done",
                       usage=Usage(prompt_tokens=prompt, completion_tokens=64,
                                   gpu_seconds=pf + 2.0),
                       timing=Timing(phases=Phases(prefill=pf, decode=2.0)))  # fmt: skip
        view.finished(st)
    got = view.look("cpu")[1].prefill_by_tokens
    assert got is not None
    assert got[:2] == pytest.approx((0.1, 1 / 600), rel=0.02) and 65 < got[2] < 770
    view.prefill_by_tokens = False  # BATON_PREFILL_BY_TOKENS=false: by speed
    assert view.look("cpu")[1].prefill_by_tokens is None


def test_how_much_of_a_batchs_prefills_a_step_waits_for_is_measured() -> None:
    # vLLM on one device runs a batch's prefills one after the other: in a
    # batch of 8, a step's first token comes after them all. The simulator
    # runs them side by side: after its own.
    def fitted(serial: bool) -> PrefillFit:
        fit = PrefillFit()
        for n in (65, 260, 770):
            fit.observe(1.0, n, seconds(n))
        assert fit.batch_share() == 1.0  # no batch seen yet: one after the other
        for _ in range(5):
            for n in (65, 260, 770):
                others = 7 * fit.typical_tokens / 600 if serial else 0.0
                fit.observe(8.0, n, seconds(n) + others)
        return fit

    assert fitted(serial=True).batch_share() > 0.8
    assert fitted(serial=False).batch_share() == 0.0
