"""The scheduler's decisions without a broker: the pool catalogue, the
prediction of a step on a pool, and the choice among pools."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from services.orchestrator.pools import Catalogue, CatalogueError, PoolSpec, drifts, parse_catalogue
from services.orchestrator.scheduling import PoolNow, StepNeed, choose, predict

SMALL = PoolSpec(name="small", max_model_len=2048, max_seqs=8, prefill_tps=1000, decode_tps=20,
                 usd_per_gpu_hour=1.0, cold_start_s=60)  # fmt: skip
LARGE = PoolSpec(name="large", max_model_len=16384, max_seqs=8, prefill_tps=4000, decode_tps=40,
                 usd_per_gpu_hour=4.0, cold_start_s=120)  # fmt: skip
WARM = PoolNow(ready=1)


def test_the_catalogue_parses_and_refuses_what_it_cannot_use() -> None:
    pools = parse_catalogue({"pools": {"small": {"model": "smollm2", "max_model_len": 2048,
                                                 "usd_per_gpu_hour": 0.8}}})  # fmt: skip
    assert pools["small"].usd_per_gpu_hour == 0.8 and pools["small"].model == "smollm2"
    for bad in ({"pools": {"a.b": {}}}, {"pools": {"p": {"speed": 1}}},
                {"pools": {"p": {"decode_tps": 0}}}, {"pools": {"p": {"cold_start_s": -1}}},
                {"pools": {"p": {"max_seqs": True}}}, {"pools": {"p": {"min_replicas": 3, "max_replicas": 1}}},
                {"pools": ["p"]}):  # fmt: skip
        with pytest.raises(CatalogueError):
            parse_catalogue(bad)


def test_an_unlisted_pool_gets_defaults_priced_by_the_old_setting() -> None:
    cat = Catalogue({"small": SMALL}, default_price={"default": 2.5, "gpu": 3.0})
    assert cat.price("small") == 1.0
    assert cat.price("gpu") == 3.0 and cat.price("other") == 2.5


def test_a_step_costs_its_share_of_the_engine_while_it_runs() -> None:
    need = StepNeed(prompt_tokens=1000, max_tokens=100, expected_output=100)
    alone = predict(need, SMALL, WARM)
    assert alone.run_s == pytest.approx(1000 / 1000 + 100 / 20)
    assert alone.gpu_seconds == pytest.approx(alone.run_s)  # alone on the engine
    assert alone.cost_usd == pytest.approx(alone.gpu_seconds / 3600 * 1.0)
    shared = predict(need, SMALL, PoolNow(ready=1, running=3))
    assert shared.gpu_seconds == pytest.approx(alone.run_s / 4)  # four sequences share it
    assert shared.wait_s == 0  # a free slot


def test_a_pool_at_zero_waits_its_cold_start_and_a_full_one_its_backlog() -> None:
    need = StepNeed(prompt_tokens=100, max_tokens=50, expected_output=50)
    cold = predict(need, SMALL, PoolNow())
    assert cold.cold and cold.wait_s == 60
    full = predict(need, SMALL, PoolNow(ready=1, running=8, backlog=8))
    assert full.wait_s == pytest.approx(9 * full.run_s / 8)


def test_a_step_too_long_for_every_pool_fits_none() -> None:
    need = StepNeed(prompt_tokens=20_000, max_tokens=100, expected_output=10)
    decision = choose([predict(need, SMALL, WARM), predict(need, LARGE, WARM)], None)
    assert decision.pool is None and decision.reason == "too_long"


def test_a_window_no_pool_holds_whole_goes_where_the_most_of_it_fits() -> None:
    # A worker cuts older turns to fit: the step runs if its shortest window fits.
    need = StepNeed(prompt_tokens=20_000, max_tokens=100, expected_output=10, floor_tokens=900)
    d = choose([predict(need, SMALL, WARM), predict(need, LARGE, WARM)], None)
    assert (d.pool, d.reason) == ("large", "largest")
    assert d.chosen is not None and d.chosen.run_s == pytest.approx((16384 - 100) / 4000 + 10 / 40)
    tight = StepNeed(prompt_tokens=20_000, max_tokens=100, expected_output=10, floor_tokens=17_000)
    assert choose([predict(tight, SMALL, WARM), predict(tight, LARGE, WARM)], None).pool is None


def test_a_long_step_goes_to_the_large_pool_a_short_one_to_the_cheap_one() -> None:
    short = StepNeed(prompt_tokens=500, max_tokens=64, expected_output=64)
    long = StepNeed(prompt_tokens=6000, max_tokens=64, expected_output=64)
    for need, pool, reason in ((short, "small", "cheapest"), (long, "large", "cheapest")):
        d = choose([predict(need, SMALL, WARM), predict(need, LARGE, WARM)], None)
        assert (d.pool, d.reason) == (pool, reason)
        assert d.chosen is not None and d.chosen.pool == pool


def test_a_saturated_cheap_pool_spills_over_when_its_wait_would_miss_the_target() -> None:
    need = StepNeed(prompt_tokens=500, max_tokens=64, expected_output=64)
    busy = PoolNow(ready=1, running=8, backlog=40)
    d = choose([predict(need, SMALL, busy), predict(need, LARGE, WARM)], target_s=10.0)
    assert (d.pool, d.reason) == ("large", "spill_saturated")
    # Without a target the cheap pool is still the choice: waiting costs nothing.
    assert choose([predict(need, SMALL, busy), predict(need, LARGE, WARM)], None).pool == "small"


def test_a_cold_cheap_pool_spills_to_a_warm_dear_one_only_for_a_target() -> None:
    need = StepNeed(prompt_tokens=500, max_tokens=64, expected_output=64)
    preds = [predict(need, SMALL, PoolNow()), predict(need, LARGE, WARM)]
    assert (choose(preds, 30.0).pool, choose(preds, 30.0).reason) == ("large", "spill_cold")
    assert choose(preds, 300.0).pool == "small"  # the cold start fits in the target


def test_when_no_pool_meets_the_target_the_fastest_is_chosen() -> None:
    need = StepNeed(prompt_tokens=500, max_tokens=64, expected_output=64)
    preds = [predict(need, SMALL, PoolNow()), predict(need, LARGE, PoolNow())]
    d = choose(preds, 1.0)
    assert (d.pool, d.reason) == ("small", "fastest")  # a 60 s cold start beats 120 s


def test_catalogue_figures_far_from_the_measured_ones_are_drifts() -> None:
    found = drifts(SMALL, {"decode_tps": 21.0, "prefill_tps": 300.0, "kv_tokens": 65_536})
    assert [(d.figure, d.catalogue, d.measured) for d in found] == [("prefill_tps", 1000, 300)]


def test_a_prefilled_prefix_is_not_prefilled_again() -> None:
    need = StepNeed(prompt_tokens=1000, max_tokens=100, expected_output=100, cached_tokens=600)
    assert predict(need, SMALL, WARM).run_s == pytest.approx(400 / 1000 + 100 / 20)


def test_a_pool_already_waking_waits_only_the_rest_of_its_cold_start() -> None:
    need = StepNeed(prompt_tokens=100, max_tokens=50, expected_output=50)
    assert predict(need, SMALL, PoolNow(starting=1, ready_in_s=15.0)).wait_s == 15
    assert predict(need, SMALL, PoolNow(starting=1)).wait_s == 60  # how far: unknown
    # ...and then the backlog ahead of it, drained by the workers starting.
    queued = predict(need, SMALL, PoolNow(starting=1, ready_in_s=15.0, backlog=16))
    assert queued.wait_s == pytest.approx(15 + 9 * queued.run_s / 8)


def test_kv_bounds_the_sequences_a_worker_runs_at_once() -> None:
    need = StepNeed(prompt_tokens=16_000, max_tokens=384, expected_output=100)
    roomy = replace(SMALL, max_model_len=32_768)
    full = predict(need, roomy, PoolNow(ready=1, running=4))  # 65,536 KV tokens: four of these
    assert full.wait_s == pytest.approx(full.run_s / 4)


def test_the_orchestrator_reads_its_catalogue_from_a_file_and_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.orchestrator.settings import OrchestratorSettings

    f = tmp_path / "pools.yaml"
    f.write_text("pools:\n  small: {max_model_len: 1024, usd_per_gpu_hour: 0.5}\n"
                 "  large: {max_model_len: 8192, usd_per_gpu_hour: 2.0}\n")  # fmt: skip
    monkeypatch.setenv("BATON_POOLS_FILE", str(f))
    monkeypatch.setenv("BATON_POOLS", '{"large": {"max_model_len": 4096, "usd_per_gpu_hour": 3}}')
    s = OrchestratorSettings()
    assert s.catalogue.spec("small").max_model_len == 1024 and s.price("small") == 0.5
    assert s.catalogue.spec("large").max_model_len == 4096 and s.price("large") == 3
    # An unlisted pool behaves as before the catalogue: priced by the old
    # setting, no context limit of the orchestrator's own.
    assert s.price("default") == 2.0 and not s.catalogue.listed("default")
    monkeypatch.setenv("BATON_POOLS", '{"large": {"kv_tokens": -1}}')
    with pytest.raises(ValueError, match="kv_tokens"):
        OrchestratorSettings()
