"""The in-process vLLM engine on the tiny random-weight model.

The model's output is gibberish, so these tests assert on what the engine
guarantees: token counts, determinism, batching, cache hits, abort and limits.
Each test uses its own prompts (a unique tag) so earlier tests' prefix-cache
entries cannot make a later one pass or fail by accident.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from proto.messages import ChatMessage
from services.inference_worker.engines.base import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from services.inference_worker.engines.vllm import VLLMEngine, _is_oom

pytestmark = pytest.mark.vllm

# ~600+ tokens of system prompt: covers several 128-token blocks.
SYSTEM_PARAGRAPH = (
    "You are a careful assistant working inside a multi-agent pipeline. Read the "
    "task, think about the constraints, then answer briefly and precisely. "
)


def _system_prompt(tag: str, min_tokens: int, engine: VLLMEngine) -> str:
    text = f"[{tag}] "
    while engine.count_prompt_tokens([ChatMessage(role="system", content=text)]) < min_tokens:
        text += SYSTEM_PARAGRAPH
    return text


async def _run(engine: VLLMEngine, req: GenerationRequest) -> tuple[str, GenerationChunk]:
    parts: list[str] = []
    final: GenerationChunk | None = None
    async for chunk in engine.generate(req):
        parts.append(chunk.text)
        if chunk.finished:
            final = chunk
    assert final is not None, "stream ended without a final chunk"
    return "".join(parts), final


def _decoded(engine: VLLMEngine) -> tuple[float, float]:
    """(tokens generated, engine steps that generated tokens) so far."""
    return engine.stats().extra["generation_tokens"], engine.stats().extra["decode_steps"]


def _req(content: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"t-{uuid.uuid4().hex}",
        messages=[ChatMessage(role="user", content=content)],
        max_tokens=max_tokens,
    )


async def test_protocol_and_capacity(vllm_engine: VLLMEngine) -> None:
    assert isinstance(vllm_engine, Engine)
    cap = vllm_engine.capacity()
    # 128 MiB / (2 layers x K,V x 4 heads x 64 dims x 2 bytes) = 65,536 tokens.
    assert cap.kv_tokens == 65536
    assert cap.max_num_seqs == 64
    assert cap.max_model_len == 2048
    assert await vllm_engine.healthy()


async def test_stream_counts(vllm_engine: VLLMEngine) -> None:
    req = _req("count me", 32)
    text, final = await _run(vllm_engine, req)
    assert final.finished
    assert final.prompt_tokens == vllm_engine.count_prompt_tokens(req.messages)
    assert 1 <= final.completion_tokens <= 32
    if final.finish_reason == "length":
        assert final.completion_tokens == 32
    assert final.finish_reason in ("length", "stop")
    assert isinstance(text, str)


async def test_a_counted_prompt_is_rendered_once(vllm_engine: VLLMEngine) -> None:
    """The worker counts a job's prompt, then generates it: the generation
    submits the ids the count rendered (chat template and tokenizer run once),
    and the same count either way."""
    req = _req(f"render me once {uuid.uuid4().hex}", 4)
    before = vllm_engine.renders
    counted = vllm_engine.count_prompt_tokens(req.messages)
    _, final = await _run(vllm_engine, req)
    assert vllm_engine.renders - before == 1
    assert final.prompt_tokens == counted
    # Not counted first (or changed since): rendered by the generation itself.
    other = _req(f"render me too {uuid.uuid4().hex}", 4)
    vllm_engine.count_prompt_tokens(other.messages)
    other.messages[0].content += " and this"
    _, final = await _run(vllm_engine, other)
    assert vllm_engine.renders - before == 3
    assert final.prompt_tokens == vllm_engine.count_prompt_tokens(other.messages)


async def test_greedy_is_deterministic(vllm_engine: VLLMEngine) -> None:
    content = f"determinism {uuid.uuid4().hex}: def add(a, b): return a + b"
    a_text, a = await _run(vllm_engine, _req(content, 48))
    b_text, b = await _run(vllm_engine, _req(content, 48))
    assert a_text == b_text
    assert a.completion_tokens == b.completion_tokens


async def test_concurrent_generations_batch(vllm_engine: VLLMEngine) -> None:
    tag = uuid.uuid4().hex
    max_tokens = 64
    await _run(vllm_engine, _req(f"warm-up {tag}", 8))

    t0, s0 = time.perf_counter(), _decoded(vllm_engine)
    sequential = [await _run(vllm_engine, _req(f"seq {tag} {i}", max_tokens)) for i in range(16)]
    t_seq, s1 = time.perf_counter() - t0, _decoded(vllm_engine)

    t0 = time.perf_counter()
    gathered = await asyncio.gather(
        *(_run(vllm_engine, _req(f"par {tag} {i}", max_tokens)) for i in range(16))
    )
    t_par, s2 = time.perf_counter() - t0, _decoded(vllm_engine)
    # Sequences per decode step, from the engine's own step reports: one at a
    # time, then many.
    assert (s1[0] - s0[0]) / (s1[1] - s0[1]) == pytest.approx(1.0, abs=0.1)
    assert (s2[0] - s1[0]) / (s2[1] - s1[1]) > 4

    seq_tokens = sum(f.completion_tokens for _, f in sequential)
    par_tokens = sum(f.completion_tokens for _, f in gathered)
    print(
        f"\n16 x {max_tokens} tokens: sequential {t_seq:.3f}s ({seq_tokens} tok), "
        f"gathered {t_par:.3f}s ({par_tokens} tok), speed-up {t_seq / t_par:.1f}x"
    )
    # Comparable work on both sides, then far less wall time when batched.
    assert par_tokens >= 0.5 * seq_tokens
    assert t_par < t_seq / 3


async def test_second_turn_hits_prefix_cache(vllm_engine: VLLMEngine) -> None:
    system = ChatMessage(role="system", content=_system_prompt(uuid.uuid4().hex, 600, vllm_engine))
    turn1 = [system, ChatMessage(role="user", content="First question: what is a block?")]
    reply1, first = await _run(
        vllm_engine,
        GenerationRequest(request_id=f"t-{uuid.uuid4().hex}", messages=turn1, max_tokens=16),
    )
    assert first.prompt_tokens >= 600
    assert first.cached_tokens == 0

    turn2 = [
        *turn1,
        ChatMessage(role="assistant", content=reply1),
        ChatMessage(role="user", content="Second question: and a prefix?"),
    ]
    _, second = await _run(
        vllm_engine,
        GenerationRequest(request_id=f"t-{uuid.uuid4().hex}", messages=turn2, max_tokens=16),
    )
    print(
        f"\nturn 1: {first.prompt_tokens} prompt tokens, {first.cached_tokens} cached; "
        f"turn 2: {second.prompt_tokens} prompt tokens, {second.cached_tokens} cached"
    )
    assert second.cached_tokens > 0
    # Whole 128-token blocks of the shared prefix are reused.
    assert second.cached_tokens % 128 == 0
    assert second.cached_tokens >= (first.prompt_tokens // 128 - 1) * 128


async def test_abort_ends_generation_early(vllm_engine: VLLMEngine) -> None:
    req = _req(f"abort me {uuid.uuid4().hex}", 1800)
    chunks: list[GenerationChunk] = []
    t0 = time.perf_counter()
    async for chunk in vllm_engine.generate(req):
        chunks.append(chunk)
        if len(chunks) == 8:
            await vllm_engine.abort(req.request_id)
    elapsed = time.perf_counter() - t0
    final = chunks[-1]
    print(f"\naborted after {final.completion_tokens} tokens in {elapsed:.3f}s")
    assert final.finished
    assert final.finish_reason == "abort"
    assert final.completion_tokens < 1800
    # Aborting an ended or unknown request is not an error.
    await vllm_engine.abort(req.request_id)
    await vllm_engine.abort("never-existed")


async def test_prompt_too_long(vllm_engine: VLLMEngine) -> None:
    cap = vllm_engine.capacity()
    huge = ChatMessage(role="user", content="token " * (cap.max_model_len * 2))
    req = GenerationRequest(request_id="too-long", messages=[huge], max_tokens=16)
    with pytest.raises(PromptTooLong) as info:
        await _run(vllm_engine, req)
    assert info.value.max_model_len == cap.max_model_len
    assert info.value.prompt_tokens == vllm_engine.count_prompt_tokens([huge])

    # A prompt that fits alone but not with max_tokens is refused too.
    small = [ChatMessage(role="user", content="hello")]
    n = vllm_engine.count_prompt_tokens(small)
    req = GenerationRequest(
        request_id="too-long-2", messages=small, max_tokens=cap.max_model_len - n + 1
    )
    with pytest.raises(PromptTooLong):
        await _run(vllm_engine, req)
    assert await vllm_engine.healthy()


async def test_stats_count_prefix_cache_hits(vllm_engine: VLLMEngine) -> None:
    system = ChatMessage(role="system", content=_system_prompt(uuid.uuid4().hex, 400, vllm_engine))
    messages = [system, ChatMessage(role="user", content="same again")]
    before = vllm_engine.stats()
    _, first = await _run(
        vllm_engine, GenerationRequest(f"t-{uuid.uuid4().hex}", messages, max_tokens=4)
    )
    mid = vllm_engine.stats()
    _, second = await _run(
        vllm_engine, GenerationRequest(f"t-{uuid.uuid4().hex}", messages, max_tokens=4)
    )
    after = vllm_engine.stats()
    print(f"\nstats: {before} -> {after}")
    assert mid.prefix_cache_queries >= before.prefix_cache_queries + first.prompt_tokens
    assert second.cached_tokens > 0
    assert after.prefix_cache_hits >= mid.prefix_cache_hits + second.cached_tokens
    assert after.prefix_cache_queries > mid.prefix_cache_queries
    assert 0.0 <= after.kv_usage <= 1.0
    assert after.preemptions == 0


def test_memory_faults_are_recognised() -> None:
    import torch

    assert _is_oom(torch.OutOfMemoryError("CPU out of memory"))
    assert _is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    wrapped = RuntimeError("generate failed")
    wrapped.__cause__ = MemoryError()
    assert _is_oom(wrapped)
    assert not _is_oom(RuntimeError("shape mismatch"))
