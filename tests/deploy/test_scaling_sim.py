"""The scaling simulator (deploy/scaling/): KEDA's arithmetic and the
closed-loop replay on tiny hand-made tasks, then the policies' invariants
on the shipped day (one replay of every policy, shared)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import yaml
from conftest import DEPLOY  # noqa: F401  (puts this checkout first on sys.path)

from deploy.scaling import bursty_trace, keda, replay, sim
from deploy.scaling.replay import Job, Pool, Scenario
from services.orchestrator.pools import PoolSpec

SMALL = PoolSpec("small", max_model_len=8192, kv_tokens=32_768, max_seqs=8, prefill_tps=1000,
                 decode_tps=20, usd_per_gpu_hour=1.0, cold_start_s=60)  # fmt: skip
LARGE = PoolSpec("large", max_model_len=65_536, kv_tokens=131_072, max_seqs=32, prefill_tps=4000,
                 decode_tps=50, usd_per_gpu_hour=5.0, cold_start_s=90)  # fmt: skip
POLICY = keda.Policy(min_replicas=0, max_replicas=4, lag_threshold=8, activation_lag_threshold=0,
                     polling_interval=10, cooldown_period=120, down_window=60)  # fmt: skip
TARGETS = {"plan": 30.0, "worker": 60.0, "synthesis": 60.0}
SHORT, LONG = (1_000, 100), (30_000, 100)  # (prompt, output): LONG only fits LARGE


def tasks(*runs: tuple[float, list[list[tuple[int, int]]]]) -> list[Job]:
    """Jobs of tasks given as (start, phases of (prompt, output)); the first
    phase is the plan, the last (when more than one) the synthesis, and a
    later phase's prefix is half its prompt."""
    out: list[Job] = []
    for task, (start, phases) in enumerate(runs):
        for phase, steps in enumerate(phases):
            last = phase == len(phases) - 1 and phase > 0
            kind = "plan" if phase == 0 else "synthesis" if last else "worker"
            for prompt, output in steps:
                out.append(Job(len(out), task, kind, phase, start, 0.0, prompt,
                               prompt // 2 if phase else 0, 256, output, output))  # fmt: skip
    return out


def one_pool(spec: PoolSpec = LARGE, policy: keda.Policy | None = POLICY, on: int = 0) -> Scenario:
    return Scenario("test", (Pool(spec, policy, on),), TARGETS)


def two_pools(small: keda.Policy | None = POLICY, large: keda.Policy | None = POLICY,
              on: tuple[int, int] = (0, 0), **kw) -> Scenario:  # fmt: skip
    pools = (Pool(SMALL, small, on[0]), Pool(LARGE, large, on[1]))
    return Scenario("test", pools, TARGETS, **kw)


def waits(o: replay.Replayed) -> list[float]:
    return [s.started - s.released for s in o.steps if not math.isnan(s.started)]


# -- KEDA and one pool -----------------------------------------------------------


def test_policy_is_read_from_the_scaled_object():
    docs = yaml.safe_load_all(keda.SCALED_OBJECTS.read_text())
    (spec,) = [d["spec"] for d in docs if d and d["metadata"]["name"] == "inference-worker"]
    policy = keda.load_policy()
    meta = spec["triggers"][0]["metadata"]
    assert policy.lag_threshold == int(meta["threshold"])
    assert policy.activation_lag_threshold == int(meta["activationThreshold"])
    # The lag KEDA reads through Prometheus: the orchestrator's 5 s poll, a 15 s scrape.
    assert policy.signal_age == 20
    assert policy.min_replicas == spec["minReplicaCount"]
    assert policy.max_replicas == spec["maxReplicaCount"]
    assert policy.polling_interval == spec["pollingInterval"]
    assert policy.cooldown_period == spec["cooldownPeriod"]


def test_the_large_pool_of_the_two_pool_replay_is_todays_scaled_object():
    pools = sim.load_pools()
    today = keda.load_policy()
    assert pools["single"].name == "large"
    assert pools["policies"]["large"] == today
    assert pools["single"].cold_start_s == 90  # the figure the one-pool replay always used


def test_a_cron_trigger_is_a_daily_window_also_across_midnight():
    day = keda.cron_floor({"start": "45 7 * * *", "end": "0 20 * * *", "desiredReplicas": "5"})
    assert day == keda.Floor(7 * 3600 + 45 * 60, 20 * 3600, 5)
    assert [day.holds(h * 3600) for h in (7, 8, 19, 20, 32)] == [False, True, True, False, True]
    night = keda.Floor(22 * 3600, 6 * 3600, 2)
    assert [night.holds(h * 3600) for h in (21, 23, 0, 5, 6)] == [False, True, True, True, False]
    policy = replace(POLICY, min_replicas=1, floors=(day,))
    assert [policy.floor(h * 3600) for h in (3, 9, 21)] == [1, 5, 1]


def test_load_policy_reads_cron_floors_and_skips_the_foreseen_trigger(tmp_path):
    so = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
          "metadata": {"name": "inference-worker"},
          "spec": {"minReplicaCount": 1, "maxReplicaCount": 8, "triggers": [
              {"type": "prometheus", "metadata": {"query": "sum(baton_pool_foreseen_steps)",
                                                  "threshold": "99"}},
              {"type": "prometheus", "metadata": {
                  "query": 'max(baton_consumer_pending_messages{consumer="worker-default"})',
                  "threshold": "32", "activationThreshold": "0"}},
              {"type": "cron", "metadata": {"timezone": "Etc/UTC", "start": "0 8 * * *",
                                            "end": "0 18 * * *", "desiredReplicas": "4"}}]}}  # fmt: skip
    path = tmp_path / "so.yaml"
    path.write_text(yaml.safe_dump(so))
    policy = keda.load_policy(path)
    assert (policy.lag_threshold, policy.min_replicas) == (32, 1)
    assert policy.floors == (keda.Floor(8 * 3600, 18 * 3600, 4),)


def test_the_autoscaler_holds_a_cron_floor_in_its_window_and_leaves_it_after():
    floor = replace(POLICY, floors=(keda.Floor(1000, 2000, 3),))
    scaler = keda.Autoscaler(floor)
    assert scaler.desired(990, 0, 0) == 0  # before the window, idle: nothing
    assert scaler.desired(1000, 0, 0) == 3  # the window opens with no lag
    assert scaler.desired(1500, 0, 3) == 3  # held while idle
    assert scaler.desired(1510, 200, 3) == 4  # the backlog still scales out (8 a worker)
    current = 4
    last = 1990  # the last poll in the window
    for t in range(1520, last + POLICY.cooldown_period, POLICY.polling_interval):
        current = scaler.desired(t, 0, current)
        assert current >= (3 if t < 2000 else 1), t  # the floor, then idle for the cooldown
    assert scaler.desired(last + POLICY.cooldown_period, 0, current) == 0


def test_a_day_floor_holds_its_workers_for_its_window_only():
    floor = replace(POLICY, min_replicas=1, floors=(keda.Floor(3600, 7200, 3),))
    o = replay.replay([], 3 * 3600, one_pool(policy=floor))
    timeline = o.pools["large"].timeline
    assert timeline[30] == 1 and timeline[90] == 3 and timeline[-1] == 1
    # 1 worker for 3 h, 2 more for the hour (plus the cooldown and scale-down tail).
    assert 5 * 3600 <= o.pools["large"].gpu_seconds <= 5 * 3600 + 3 * 600


def test_no_tasks_means_no_gpu_seconds_when_min_is_zero():
    o = replay.replay([], 3600, one_pool())
    assert o.pools["large"].gpu_seconds == 0 and o.pools["large"].peak == 0


def test_a_warm_floor_costs_gpu_even_when_idle():
    o = replay.replay([], 3600, one_pool(policy=replace(POLICY, min_replicas=1)))
    assert o.pools["large"].gpu_seconds >= 3500


def test_first_step_after_idle_waits_for_the_cold_start_then_the_pool_empties():
    o = replay.replay(tasks((1800.0, [[SHORT]])), 3600, one_pool())
    (wait,) = waits(o)
    assert LARGE.cold_start_s <= wait <= LARGE.cold_start_s + POLICY.polling_interval
    assert o.steps[0].cold
    # cold start + the step + cooldown, about; then back to zero.
    assert o.pools["large"].gpu_seconds <= 90 + 3 + 120 + 2 * POLICY.polling_interval
    assert o.pools["large"].timeline[-1] == 0


def test_activation_threshold_holds_back_a_single_step():
    held = replace(POLICY, activation_lag_threshold=1)
    o = replay.replay(tasks((100.0, [[SHORT]])), 600, one_pool(policy=held))
    summary = sim.summary(o, 120)
    assert (waits(o), summary["unserved_steps"], o.pools["large"].gpu_seconds) == ([], 1, 0)


def test_always_on_serves_at_once():
    o = replay.replay(tasks((1800.0, [[SHORT]])), 3600, one_pool(policy=None, on=2))
    assert waits(o) == [0] and not o.steps[0].cold
    assert o.pools["large"].gpu_seconds >= 2 * 3600


def test_a_burst_scales_out_but_not_past_max():
    burst = tasks(*[(100.0 + i / 10, [[(2_000, 600)]]) for i in range(200)])
    o = replay.replay(burst, 3600, one_pool())
    assert o.pools["large"].peak == POLICY.max_replicas
    assert len(o.task_latency) == 200
    alone = replay.replay(burst, 3600, one_pool(policy=replace(POLICY, max_replicas=1)))
    assert replay.percentile(waits(alone), 0.95) > replay.percentile(waits(o), 0.95)


def test_a_phase_is_released_only_when_the_one_before_has_finished():
    job = tasks((10.0, [[SHORT], [SHORT, SHORT, SHORT], [SHORT]]))
    o = replay.replay(job, 3600, one_pool(policy=None, on=1))
    by_phase: dict[int, list[replay.Step]] = {}
    for j, s in zip(job, o.steps, strict=True):
        by_phase.setdefault(j.phase, []).append(s)
    for phase in (1, 2):
        done = max(s.finished for s in by_phase[phase - 1])
        assert min(s.released for s in by_phase[phase]) >= done
    assert o.task_latency[0] == pytest.approx(by_phase[2][0].finished - 10.0)


def test_kv_not_slots_bounds_a_worker():
    # 4 steps of 30k KV on a 131k (x0.9) worker: three at once, the fourth waits.
    four = tasks(*[(5.0, [[LONG]]) for _ in range(4)])
    o = replay.replay(four, 3600, one_pool(policy=None, on=1))
    assert sorted(w > 0 for w in waits(o)) == [False, False, False, True]


# -- two pools: the scheduler's choice -------------------------------------------


def test_a_step_runs_only_on_a_pool_that_can_hold_it():
    job = tasks((5.0, [[SHORT], [SHORT, LONG], [SHORT]]))
    o = replay.replay(job, 3600, two_pools(small=None, large=None, on=(1, 1)))
    pools = [s.pool for s in o.steps]
    assert pools == ["small", "small", "large", "small"]


def test_a_step_no_pool_holds_fails_at_once_and_its_task_never_completes():
    job = tasks((5.0, [[SHORT], [(70_000, 10)], [SHORT]]))
    o = replay.replay(job, 3600, two_pools(small=None, large=None, on=(1, 1)))
    summary = sim.summary(o, 120)
    assert o.steps[1].reason == "too_long" and o.steps[1].pool is None
    assert (summary["failed_steps"], summary["unserved_steps"]) == (1, 1)
    assert summary["tasks_completed"] == 0
    assert o.failed_tasks == {0}


def test_a_cold_cheap_pool_spills_to_a_warm_dear_one_only_with_spill_over():
    job = tasks((5.0, [[SHORT]]))
    spill = replay.replay(job, 3600, two_pools(large=None, on=(0, 1)))
    assert (spill.steps[0].pool, spill.steps[0].reason) == ("large", "spill_cold")
    assert waits(spill) == [0]
    cheap = replay.replay(job, 3600, two_pools(large=None, on=(0, 1), spill=False))
    assert (cheap.steps[0].pool, cheap.steps[0].reason) == ("small", "cheapest")
    assert waits(cheap)[0] >= SMALL.cold_start_s


def test_prewarming_wakes_the_next_steps_pool_before_they_arrive():
    # The plan runs on the warm small pool (~20 s); the long worker only the large pool holds.
    job = tasks((300.0, [[(1_000, 400)], [LONG], [SHORT]]))
    base = two_pools(small=None, on=(1, 0))
    cold = replay.replay(job, 3600, base)
    warm = replay.replay(job, 3600, replace(base, prewarm=True))
    plan_run = cold.steps[0].finished - cold.steps[0].started
    assert warm.pools["large"].woken_by_demand == 1
    assert waits(warm)[1] <= waits(cold)[1] - plan_run + POLICY.polling_interval
    assert warm.task_latency[0] < cold.task_latency[0]
    # The large worker came up earlier, by about the plan's run time: that is all it costs.
    extra = warm.pools["large"].gpu_seconds - cold.pools["large"].gpu_seconds
    assert extra <= plan_run + POLICY.polling_interval


def test_a_prewarmed_prefix_cuts_the_next_steps_prefill():
    job = tasks((5.0, [[SHORT], [(40_000, 50)]]))
    base = one_pool(policy=None, on=1)
    cold = replay.replay(job, 3600, base)
    warm = replay.replay(job, 3600, replace(base, prewarm=True))
    assert warm.steps[1].prewarmed and not cold.steps[1].prewarmed
    saved = 20_000 / LARGE.prefill_tps  # the prefix: half the prompt
    assert warm.steps[1].ttft == pytest.approx(cold.steps[1].ttft - saved)
    assert warm.steps[1].predicted_s == pytest.approx(cold.steps[1].predicted_s - saved)


def test_percentile():
    assert replay.percentile(list(range(1, 101)), 0.95) == 95
    assert replay.percentile([], 0.95) == 0.0


# -- the shipped trace -----------------------------------------------------------


def test_shipped_trace_is_the_seeded_generator_output():
    jobs, horizon = replay.load_trace()
    generated = bursty_trace.generate(bursty_trace.SEED)
    cols = bursty_trace.COLUMNS
    rows = [[g[c] for c in cols] for g in generated]
    assert [[getattr(j, c) for c in cols] for j in jobs] == rows
    assert horizon == bursty_trace.DAY and [j.at for j in jobs] == sorted(j.at for j in jobs)


def test_the_day_is_the_one_replayed_before_steps_had_sizes():
    jobs, horizon = replay.load_trace()
    # The arrival times of the size-less trace (6233 jobs), unchanged.
    assert len(jobs) == 6233 and round(sum(j.at for j in jobs), 1) == 295_605_377.4
    assert max(j.at for j in jobs) < horizon, "no task runs past midnight"
    per_minute: dict[int, int] = {}
    for j in jobs:
        per_minute[int(j.at // 60)] = per_minute.get(int(j.at // 60), 0) + 1
    assert max(per_minute.values()) > 50 * len(jobs) / (horizon / 60), "bursty"
    assert len(per_minute) < 0.5 * horizon / 60, "expected idle stretches"


def test_every_task_is_a_supervisor_run_and_some_steps_need_the_large_pool():
    jobs, _ = replay.load_trace()
    runs: dict[int, list[Job]] = {}
    for j in jobs:
        runs.setdefault(j.task, []).append(j)
    for run in runs.values():
        phases = sorted({j.phase for j in run})
        kinds = [[j.kind for j in run if j.phase == p] for p in phases]
        assert kinds[0] == ["plan"] and kinds[-1] == ["synthesis"]
        assert all(set(k) == {"worker"} and 4 <= len(k) <= 16 for k in kinds[1:-1])
        assert 1 <= len(kinds) - 2 <= 3
    small = sim.load_pools()["specs"][0]
    too_long = [j for j in jobs if j.kv > small.max_model_len]
    assert 0.02 * len(jobs) < len(too_long) < 0.2 * len(jobs)
    assert {j.kind for j in too_long} == {"worker", "synthesis"}


# -- the policies over the day ---------------------------------------------------


@pytest.fixture(scope="module")
def day() -> dict[str, replay.Replayed]:
    return sim.replay_all()


@pytest.fixture(scope="module")
def results(day) -> dict[str, dict]:
    return {name: sim.summary(o, sim.task_slo_s()) for name, o in day.items()}


@pytest.mark.timeout(120)
def test_no_step_runs_on_a_pool_that_cannot_hold_it(day):
    for o in day.values():
        specs = {p.spec.name: p.spec for p in o.scenario.pools}
        for job, step in zip(o.jobs, o.steps, strict=True):
            if step.pool is not None:
                assert job.kv <= specs[step.pool].max_model_len


def test_every_policy_serves_every_step_and_always_on_never_waits_cold(day, results):
    for name, r in results.items():
        assert (r["failed_steps"], r["unserved_steps"]) == (0, 0), name
        assert r["tasks_completed"] == r["tasks"], name
    assert results["always_on"]["cold_waits"] == 0
    assert results["scale_to_zero"]["cold_waits"] > 0
    assert day["always_on"].pools["large"].gpu_seconds >= 8 * 86_400


def test_without_spill_over_every_step_goes_to_the_cheapest_pool_that_fits(day):
    assert {s.reason for s in day["two_pools_no_spill"].steps} == {"cheapest"}
    assert {s.reason for s in day["two_pools"].steps} >= {"cheapest", "spill_saturated"}


def test_prewarming_lowers_p95_task_latency_for_at_most_a_quarter_more_cost(results):
    base, warm = results["two_pools"], results["two_pools_prewarm"]
    assert warm["p95_task_latency_s"] <= base["p95_task_latency_s"]
    assert warm["cost_usd"] <= 1.25 * base["cost_usd"]
    assert warm["prewarmed_steps"] > 0 and base["prewarmed_steps"] == 0


@pytest.mark.timeout(120)
def test_the_same_trace_replays_deterministically(day, results):
    jobs, horizon = replay.load_trace()
    again = replay.replay(jobs, horizon, day["two_pools_prewarm"].scenario)
    assert sim.summary(again, sim.task_slo_s()) == results["two_pools_prewarm"]


@pytest.mark.timeout(60)
def test_cli_writes_results_table_and_plot(tmp_path, monkeypatch, day):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(sim, "replay_all", lambda always_on=None: day)
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    report = sim.main(["--out", str(out), "--plot", str(png)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert png.stat().st_size > 10_000
    assert set(report["policies"]) == set(sim.LABELS)
    assert report["policies"]["always_on"]["cost_fraction_of_always_on"] == 1
    assert {g["met"] for g in report["goals"].values()} <= {True, False}
    table = sim.markdown(report)
    assert all(label in table for label in sim.LABELS.values())


def test_the_day_floor_meets_the_cost_goal_at_always_ons_p95(results):
    """The policy that meets both parts of the goal: the large pool's floor
    follows the working day (a KEDA cron trigger); two pools without it do not."""
    report = sim.goals(results, 90.0)
    assert report["two_pools_day_floor_cost"]["met"] and not report["two_pools_cost"]["met"]
    day, warm = results["two_pools_day_floor"], results["always_on"]
    assert day["cost_usd"] <= 0.6 * warm["cost_usd"]
    assert day["p95_task_latency_s"] <= warm["p95_task_latency_s"]
    assert day["cold_waits"] == 0 and day["missed_target_steps"] <= warm["missed_target_steps"]
    # The cheap pool earns nothing at equal p95: it is never woken (its decode
    # would lengthen any step on a task's critical path).
    assert day["pools"]["small"]["steps"] == 0
    # One worker at night, five by day (at most what the HPA adds on top).
    assert 5 <= day["pools"]["large"]["peak_workers"] <= 8


def test_the_day_floor_replayed_is_the_kustomize_components():
    """pools.yaml names the component's patch; the replay reads its fields
    (tests/deploy/test_k8s.py renders the component into a ScaledObject)."""
    doc = yaml.safe_load(sim.POOLS.read_text())
    patch = (sim.POOLS.parent / doc["day_floor"]["large"]).resolve()
    assert patch.parent.name == "day-floor" and patch.parent.parent.name == "components"
    fields = sim.patched(patch)
    (cron,) = fields["triggers"]
    assert cron["type"] == "cron"
    policy = sim.load_pools()["day_floor"]["large"]
    assert policy.min_replicas == fields["minReplicaCount"] == 1
    assert policy.floors == (keda.cron_floor(cron["metadata"]),)
    assert [f.replicas for f in policy.floors] == [5]


def test_a_patch_the_replay_cannot_model_is_refused(tmp_path):
    patch = tmp_path / "p.yaml"
    patch.write_text(yaml.safe_dump([{"op": "replace", "path": "/spec/cooldownPeriod",
                                      "value": 60}]))  # fmt: skip
    with pytest.raises(ValueError, match="cooldownPeriod"):
        sim.patched(patch)


@pytest.mark.timeout(120)
def test_other_days_replays_a_seeds_day_as_the_shipped_one(results):
    (six,) = sim.other_days([bursty_trace.SEED])
    assert six["seed"] == 6 and six["tasks"] == results["always_on"]["tasks"]
    assert six["p95_task_latency_s"] == {
        "two_pools_day_floor": results["two_pools_day_floor"]["p95_task_latency_s"],
        "always_on": results["always_on"]["p95_task_latency_s"],
    }
    assert six["met"]


@pytest.mark.timeout(120)
def test_announced_demand_changes_nothing_once_the_day_floor_holds(day, results):
    """Why no foreseen-steps gauge: with the floor, waking a pool from the
    workflow graph brings nothing (a batch's fan-out follows its plans within
    seconds; a cold start takes 90)."""
    jobs, horizon = replay.load_trace()
    quiet = replace(day["two_pools_day_floor_prewarm"].scenario, announce=False)
    assert (
        sim.summary(replay.replay(jobs, horizon, quiet), sim.task_slo_s())
        == (results["two_pools_day_floor_prewarm"])
    )
    # Without the floor the announced demand does wake pools (policy 5).
    assert results["two_pools_prewarm"]["pools"]["large"]["woken_by_announced_steps"] > 0
