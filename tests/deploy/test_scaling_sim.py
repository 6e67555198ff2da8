"""The scaling simulator's logic, on tiny hand-made traces (fast)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import pytest
import yaml
from conftest import DEPLOY

SCALING = DEPLOY / "scaling"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"baton_scaling_{name}", SCALING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sim = _load("sim")
trace = _load("bursty_trace")
POLICY = sim.Policy(
    min_replicas=0,
    max_replicas=4,
    lag_threshold=8,
    activation_lag_threshold=0,
    polling_interval=10,
    cooldown_period=120,
    down_window=60,
)
KNOBS = {"cold_start": 60, "throughput": 0.8, "job_seconds": 10}  # 8 slots per worker


def test_policy_is_read_from_the_scaled_object():
    docs = yaml.safe_load_all(sim.SCALED_OBJECTS.read_text())
    (spec,) = [d["spec"] for d in docs if d and d["metadata"]["name"] == "inference-worker"]
    policy = sim.load_policy()
    meta = spec["triggers"][0]["metadata"]
    assert policy.lag_threshold == int(meta["lagThreshold"])
    assert policy.activation_lag_threshold == int(meta["activationLagThreshold"])
    assert (policy.min_replicas, policy.max_replicas) == (
        spec["minReplicaCount"],
        spec["maxReplicaCount"],
    )
    assert (policy.polling_interval, policy.cooldown_period) == (
        spec["pollingInterval"],
        spec["cooldownPeriod"],
    )


def test_no_jobs_means_no_gpu_seconds_when_min_is_zero():
    result = sim.simulate([], 3600, POLICY, **KNOBS)
    assert result.gpu_seconds == 0 and result.peak_workers == 0


def test_a_warm_floor_costs_gpu_even_when_idle():
    result = sim.simulate([], 3600, replace(POLICY, min_replicas=1), **KNOBS)
    assert result.gpu_seconds >= 3500


def test_first_job_after_idle_waits_for_the_cold_start():
    result = sim.simulate([1800.0], 3600, POLICY, **KNOBS)
    (wait,) = result.waits
    assert KNOBS["cold_start"] <= wait <= KNOBS["cold_start"] + POLICY.polling_interval
    # then the worker goes away again: cold start + job + cooldown, about.
    assert result.gpu_seconds <= 60 + 10 + 120 + 2 * POLICY.polling_interval
    assert result.timeline[-1] == 0


def test_activation_threshold_holds_back_a_single_job():
    held = replace(POLICY, activation_lag_threshold=1)
    result = sim.simulate([100.0], 600, held, **KNOBS)
    assert (result.waits, result.unserved, result.gpu_seconds) == ([], 1, 0)


def test_always_on_serves_at_once():
    result = sim.simulate([1800.0], 3600, POLICY, always_on=2, **KNOBS)
    assert result.waits[0] < 1 and result.gpu_seconds >= 2 * 3600


def test_a_burst_scales_out_but_not_past_max():
    burst = [100.0 + i / 10 for i in range(400)]
    result = sim.simulate(burst, 3600, POLICY, **KNOBS)
    assert result.peak_workers == POLICY.max_replicas
    assert len(result.waits) == 400 and result.unserved == 0
    one = sim.simulate(burst, 3600, replace(POLICY, max_replicas=1), **KNOBS)
    assert one.p95_wait() > result.p95_wait()


def test_percentile():
    assert sim.percentile(list(range(1, 101)), 0.95) == 95
    assert sim.percentile([], 0.95) == 0.0


def test_shipped_trace_is_the_seeded_generator_output():
    jobs, horizon = sim.load_trace()
    assert jobs == trace.generate(trace.SEED)
    assert horizon == trace.DAY and jobs == sorted(jobs)
    # bursty: the busiest minute carries far more than an average minute
    per_minute = {}
    for j in jobs:
        per_minute[int(j // 60)] = per_minute.get(int(j // 60), 0) + 1
    assert max(per_minute.values()) > 50 * len(jobs) / (horizon / 60)
    assert len(per_minute) < 0.5 * horizon / 60, "expected idle stretches"


@pytest.mark.timeout(60)
def test_cli_writes_results_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    report = sim.main(["--out", str(out), "--plot", str(png)])
    assert out.exists() and png.stat().st_size > 10_000
    assert 0 < report["gpu_seconds_fraction_of_always_on"] < 1
