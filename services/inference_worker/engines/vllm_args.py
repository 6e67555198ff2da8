"""The arguments Baton hands to vLLM's ``AsyncEngineArgs``: a pure function
of the worker's settings, unit-tested without vLLM.

Four layers, later ones winning:

0. ``GUIDED``, always: guided decoding (JSON schemas: tool calls, routing)
   by xgrammar with compact JSON. vLLM's default lets the grammar accept any
   whitespace between JSON tokens, and a weak model (the tiny random one, or
   a small real one) then fills ``max_tokens`` with blanks before the first
   key: no call ever closes. Compact output also costs fewer tokens;
1. the CPU profile (``CPU_PROFILE``), applied only when vLLM runs on its CPU
   platform: demo values for a laptop or CI box (a 128 MiB KV cache, eager
   mode, 128-token blocks). On a GPU nothing is assumed: vLLM's own defaults
   apply (``gpu_memory_utilization``, the model's context length, CUDA graphs);
2. the named settings (``BATON_TENSOR_PARALLEL_SIZE``, ``BATON_MAX_MODEL_LEN``,
   ...; ``None`` = not set);
3. ``BATON_VLLM_ARGS``, a JSON object of any other ``AsyncEngineArgs`` field.

An argument that ``AsyncEngineArgs`` does not have is an error naming the
closest real ones; so is one argument set twice (a named setting and the same
key in ``BATON_VLLM_ARGS``), and a key Baton owns (the model).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from typing import Any

# The named settings, each an ``AsyncEngineArgs`` field of the same name.
NAMED = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "quantization",
    "dtype",
    "block_size",
    "enable_prefix_caching",
    "enforce_eager",
    "kv_cache_memory_bytes",
)

# Set by Baton from its own settings; never through BATON_VLLM_ARGS.
OWNED = {"model": "BATON_MODEL", "served_model_name": "BATON_SERVED_MODEL_NAME"}

# Every platform: guided JSON without free whitespace (see the module doc).
# A dict here; ``VLLMEngine.start`` builds vLLM's StructuredOutputsConfig.
GUIDED: dict[str, Any] = {
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}

# vLLM on CPU: sizes that fit a 2-core box next to everything else. The KV
# cache is sized exactly (VLLM_CPU_KVCACHE_SPACE takes only whole GiB), blocks
# are a multiple of 32 as the CPU backend requires, no graph capture.
CPU_PROFILE: dict[str, Any] = {
    "dtype": "bfloat16",
    "max_model_len": 2048,
    "max_num_seqs": 64,
    "kv_cache_memory_bytes": 128 * 2**20,
    "block_size": 128,
    "enforce_eager": True,
    "enable_prefix_caching": True,
}


class EngineArgsError(ValueError):
    """The engine arguments are wrong; the message says which and why."""


def resolve(
    named: Mapping[str, Any],
    extra: Mapping[str, Any],
    known: Collection[str],
    *,
    cpu: bool,
) -> dict[str, Any]:
    """The keyword arguments for ``AsyncEngineArgs`` (without ``model``).

    ``named``: the named settings (``None`` = unset); ``extra``: the decoded
    ``BATON_VLLM_ARGS``; ``known``: the field names of ``AsyncEngineArgs``;
    ``cpu``: vLLM runs on its CPU platform (apply ``CPU_PROFILE``)."""
    known = set(known)
    problems = []
    for key in sorted(set(named) | set(extra)):
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        problems.append(f"{key!r} is not a vLLM engine argument{hint}")
    for key in sorted(set(extra) & set(OWNED)):
        problems.append(f"{key!r} is set by {OWNED[key]}, not BATON_VLLM_ARGS")
    for key in sorted(k for k, v in named.items() if v is not None and k in extra):
        problems.append(f"{key!r} is set twice: by BATON_{key.upper()} and in BATON_VLLM_ARGS")
    if problems:
        raise EngineArgsError("; ".join(problems))
    args = dict(GUIDED)
    if cpu:
        args.update(CPU_PROFILE)
    args.update({k: v for k, v in named.items() if v is not None})
    args.update(extra)
    return args
