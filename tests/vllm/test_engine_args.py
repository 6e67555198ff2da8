"""The engine arguments against the real ``AsyncEngineArgs`` of the pinned vLLM."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from services.inference_worker.engines.vllm import VLLMEngine
from services.inference_worker.engines.vllm_args import (
    CPU_PROFILE,
    GUIDED,
    NAMED,
    OWNED,
    EngineArgsError,
)

pytestmark = pytest.mark.vllm


def test_every_named_setting_is_an_engine_argument() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(NAMED) | set(CPU_PROFILE) | set(GUIDED) | set(OWNED) <= fields


def test_cpu_platform_gets_the_cpu_profile_and_none_gets_vllm_defaults() -> None:
    named = dict.fromkeys(NAMED) | {"max_num_seqs": 8}
    cpu = VLLMEngine("/m", named_args=named).resolve_args()
    assert cpu == GUIDED | CPU_PROFILE | {"max_num_seqs": 8}
    none = VLLMEngine("/m", named_args=named, profile="none").resolve_args()
    assert none == GUIDED | {"max_num_seqs": 8}


def test_unknown_argument_fails_before_anything_loads() -> None:
    engine = VLLMEngine("/does/not/exist", extra_args={"gpu_memory_utilisation": 0.8})
    with pytest.raises(EngineArgsError, match="did you mean gpu_memory_utilization"):
        engine.resolve_args()


def test_the_engine_reports_what_it_was_built_with(vllm_engine: VLLMEngine) -> None:
    # The session engine: the CPU profile, and capacity read back from vLLM.
    assert vllm_engine.engine_args == GUIDED | CPU_PROFILE
    guided = vllm_engine._engine.vllm_config.structured_outputs_config
    assert (guided.backend, guided.disable_any_whitespace) == ("xgrammar", True)
    cap = vllm_engine.capacity()
    assert cap.kv_tokens % CPU_PROFILE["block_size"] == 0 and cap.kv_tokens > 0
    assert (cap.max_num_seqs, cap.max_model_len) == (64, 2048)


def test_worker_with_a_misspelt_argument_exits_with_a_clear_error(nats_url: str) -> None:
    env = os.environ | {
        "BATON_NATS_URL": nats_url,
        "BATON_ENGINE": "vllm",
        "BATON_MODEL": "/does/not/exist",
        "BATON_VLLM_ARGS": '{"max_num_seq": 4}',
        "BATON_HTTP_PORT": "0",
    }
    out = subprocess.run([sys.executable, "-m", "services.inference_worker"], env=env,
                         capture_output=True, text=True, timeout=100)  # fmt: skip
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("baton-inference-worker: invalid engine arguments:")
    assert "'max_num_seq' is not a vLLM engine argument (did you mean max_num_seqs" in last
