"""Which arguments the vLLM engine gets (pure; the real AsyncEngineArgs check
is in tests/vllm/test_engine_args.py)."""

from __future__ import annotations

import pytest

from services.inference_worker.engines.vllm_args import (
    CPU_PROFILE,
    GUIDED,
    NAMED,
    EngineArgsError,
    resolve,
)
from services.inference_worker.settings import WorkerSettings

# A stand-in for dataclasses.fields(AsyncEngineArgs): enough names to test with.
KNOWN = {*NAMED, *CPU_PROFILE, "model", "served_model_name", "swap_space", "seed"}
UNSET = dict.fromkeys(NAMED)


def test_gpu_gets_only_what_was_set() -> None:
    named = UNSET | {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85}
    assert resolve(named, {"swap_space": 8}, KNOWN, cpu=False) == GUIDED | {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "swap_space": 8,
    }


def test_cpu_profile_fills_what_is_unset_and_yields_to_settings() -> None:
    named = UNSET | {"max_model_len": 4096, "enforce_eager": False}
    args = resolve(named, {"block_size": 64}, KNOWN, cpu=True)
    assert args == GUIDED | CPU_PROFILE | {
        "max_model_len": 4096,
        "enforce_eager": False,
        "block_size": 64,
    }


def test_unknown_argument_is_named_with_the_closest_real_one() -> None:
    with pytest.raises(
        EngineArgsError,
        match=r"'tensor_paralel_size' is not a vLLM engine argument \(did you mean tensor_parallel_size",
    ):
        resolve(UNSET, {"tensor_paralel_size": 2}, KNOWN, cpu=False)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(EngineArgsError) as info:
        resolve(
            UNSET | {"dtype": "half"},
            {"dtype": "auto", "model": "/x", "nonsense": 1},
            KNOWN,
            cpu=False,
        )
    msg = str(info.value)
    assert "'dtype' is set twice: by BATON_DTYPE and in BATON_VLLM_ARGS" in msg
    assert "'model' is set by BATON_MODEL" in msg
    assert "'nonsense' is not a vLLM engine argument" in msg


def test_settings_read_named_and_json_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("BATON_DTYPE", "auto")
    monkeypatch.setenv("BATON_ENFORCE_EAGER", "false")
    monkeypatch.setenv("BATON_VLLM_ARGS", '{"swap_space": 8, "compilation_config": {"level": 3}}')
    s = WorkerSettings()
    named = s.vllm_named_args()
    assert named["tensor_parallel_size"] == 4 and named["dtype"] == "auto"
    assert named["enforce_eager"] is False and named["max_model_len"] is None
    assert s.vllm_args == {"swap_space": 8, "compilation_config": {"level": 3}}
    args = resolve(named, s.vllm_args, KNOWN | {"compilation_config"}, cpu=False)
    assert args == GUIDED | {"tensor_parallel_size": 4, "dtype": "auto", "enforce_eager": False,
                    "swap_space": 8, "compilation_config": {"level": 3}}  # fmt: skip


def test_declared_shape_defaults_for_engines_without_vllm() -> None:
    assert WorkerSettings().declared_shape() == (2048, 64)
    assert WorkerSettings(max_model_len=512, max_num_seqs=4).declared_shape() == (512, 4)


def test_guided_json_is_compact_on_every_platform_unless_overridden() -> None:
    # Free whitespace lets a weak model pad a guided answer until max_tokens cuts it.
    for cpu in (False, True):
        guided = resolve(UNSET, {}, KNOWN, cpu=cpu)["structured_outputs_config"]
        assert guided == {"backend": "xgrammar", "disable_any_whitespace": True}
    mine = {"structured_outputs_config": {"backend": "guidance"}}
    assert resolve(UNSET, mine, KNOWN | set(mine), cpu=True)["structured_outputs_config"] == {
        "backend": "guidance"
    }
