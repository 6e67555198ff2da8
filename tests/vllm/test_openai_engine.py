"""The HTTP engine against a real vLLM OpenAI-compatible server (tiny model)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from proto.messages import ChatMessage, ToolSpec
from proto.tools import PYTHON_PARAMETERS, SEARCH_PARAMETERS
from services.inference_worker.engines.base import (
    Engine,
    EngineDead,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from services.inference_worker.engines.openai import OpenAIEngine, parse_vllm_metrics

pytestmark = pytest.mark.vllm

PARAGRAPH = (
    "You are a careful assistant working inside a multi-agent pipeline. Read the "
    "task, think about the constraints, then answer briefly and precisely. "
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def openai_engine(openai_server: str) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(f"{openai_server}/v1", "tiny", stats_interval=0.5)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _run(engine: OpenAIEngine, req: GenerationRequest) -> tuple[str, GenerationChunk]:
    parts: list[str] = []
    final: GenerationChunk | None = None
    async for chunk in engine.generate(req):
        parts.append(chunk.text)
        if chunk.finished:
            final = chunk
    assert final is not None, "stream ended without a final chunk"
    return "".join(parts), final


def _rid() -> str:
    return f"t-{uuid.uuid4().hex}"


async def test_streams_tokens_and_usage(openai_engine: OpenAIEngine) -> None:
    assert isinstance(openai_engine, Engine)
    assert await openai_engine.healthy()
    messages = [ChatMessage(role="user", content=f"stream {uuid.uuid4().hex}")]
    chunks: list[GenerationChunk] = []
    async for chunk in openai_engine.generate(GenerationRequest(_rid(), messages, 24)):
        chunks.append(chunk)
    final = chunks[-1]
    assert final.finished and all(not c.finished for c in chunks[:-1])
    assert final.finish_reason in ("length", "stop")
    assert 1 <= final.completion_tokens <= 24
    assert len(chunks) >= 2  # streamed, not one block
    exact = await openai_engine.count_prompt_tokens_async(messages)
    assert final.prompt_tokens == exact
    # The synchronous estimate is in the right range once calibrated.
    estimate = openai_engine.count_prompt_tokens(messages)
    assert 0.3 * exact <= estimate <= 3 * exact


async def test_the_exact_count_includes_the_offered_tools(openai_engine: OpenAIEngine) -> None:
    """``/tokenize`` takes the tools (vLLM's chat tokenize request has a
    ``tools`` field) and the template renders them; the estimate adds them too."""
    messages = [ChatMessage(role="user", content=f"tools {uuid.uuid4().hex}")]
    tools = [ToolSpec(name="search", parameters=json.dumps(SEARCH_PARAMETERS)),
             ToolSpec(name="python", parameters=json.dumps(PYTHON_PARAMETERS))]  # fmt: skip
    bare = await openai_engine.count_prompt_tokens_async(messages)
    exact = await openai_engine.count_prompt_tokens_async(messages, tools)
    assert exact > bare + 50, (exact, bare)  # two schemas' JSON: well over 50 tokens
    estimate = openai_engine.count_prompt_tokens(messages, tools)
    assert 0.3 * exact <= estimate <= 3 * exact


async def test_greedy_is_deterministic(openai_engine: OpenAIEngine) -> None:
    messages = [ChatMessage(role="user", content=f"same {uuid.uuid4().hex}")]
    a_text, a = await _run(openai_engine, GenerationRequest(_rid(), messages, 32))
    b_text, b = await _run(openai_engine, GenerationRequest(_rid(), messages, 32))
    assert (a_text, a.completion_tokens) == (b_text, b.completion_tokens)


async def test_repeated_long_prefix_is_cached(openai_engine: OpenAIEngine) -> None:
    system = ChatMessage(role="system", content=f"[{uuid.uuid4().hex}] " + PARAGRAPH * 12)
    first_msgs = [system, ChatMessage(role="user", content="one")]
    _, first = await _run(openai_engine, GenerationRequest(_rid(), first_msgs, 8))
    second_msgs = [system, ChatMessage(role="user", content="two")]
    _, second = await _run(openai_engine, GenerationRequest(_rid(), second_msgs, 8))
    print(
        f"\nHTTP: first {first.prompt_tokens} prompt / {first.cached_tokens} cached, "
        f"second {second.prompt_tokens} prompt / {second.cached_tokens} cached"
    )
    assert first.prompt_tokens >= 256
    assert first.cached_tokens == 0
    assert second.cached_tokens > 0
    assert second.cached_tokens % 128 == 0


async def test_abort_cancels_stream(openai_engine: OpenAIEngine) -> None:
    req = GenerationRequest(
        _rid(), [ChatMessage(role="user", content=f"long {uuid.uuid4().hex}")], 1800
    )
    chunks: list[GenerationChunk] = []
    t0 = time.perf_counter()
    async for chunk in openai_engine.generate(req):
        chunks.append(chunk)
        if len(chunks) == 5:
            await openai_engine.abort(req.request_id)
    final = chunks[-1]
    print(f"\nHTTP abort: {final} after {time.perf_counter() - t0:.3f}s")
    assert final.finished
    assert final.finish_reason == "abort"
    assert final.completion_tokens < 1800
    await openai_engine.abort(req.request_id)  # already ended: no error
    # The server saw the disconnect and dropped the request (a full 1800-token
    # run would take seconds).
    for _ in range(10):
        if (await openai_engine.refresh_stats()).running == 0:
            break
        await asyncio.sleep(0.1)
    assert openai_engine.stats().running == 0
    print(f"server idle {time.perf_counter() - t0:.3f}s after the start")


async def test_prompt_too_long(openai_engine: OpenAIEngine) -> None:
    huge = [ChatMessage(role="user", content="token " * 5000)]
    with pytest.raises(PromptTooLong) as info:
        await _run(openai_engine, GenerationRequest(_rid(), huge, 16))
    assert info.value.max_model_len == 2048
    assert info.value.prompt_tokens > 2048


async def test_stats_read_server_metrics(openai_engine: OpenAIEngine) -> None:
    system = ChatMessage(role="system", content=f"[{uuid.uuid4().hex}] " + PARAGRAPH * 10)
    messages = [system, ChatMessage(role="user", content="again")]
    before = await openai_engine.refresh_stats()
    assert before.extra["metrics_ok"] == 1.0
    for _ in range(2):
        await _run(openai_engine, GenerationRequest(_rid(), messages, 4))
    after = await openai_engine.refresh_stats()
    print(f"\nHTTP stats: {before} -> {after}")
    assert after.prefix_cache_queries > before.prefix_cache_queries
    assert after.prefix_cache_hits > before.prefix_cache_hits
    assert 0.0 <= after.kv_usage <= 1.0
    # The background scraper keeps stats() fresh without an explicit refresh.
    await asyncio.sleep(1.2)
    assert openai_engine.stats().extra["metrics_age_s"] < 1.0


async def test_unreachable_server_is_dead() -> None:
    engine = OpenAIEngine("http://127.0.0.1:9", "tiny", connect_timeout=0.5)
    with pytest.raises(EngineDead):
        await engine.start()
    assert not await engine.healthy()


def test_parse_vllm_metrics() -> None:
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        "# TYPE vllm:prefix_cache_queries counter\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0\n'
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9\n'
        "# TYPE vllm:prefix_cache_hits counter\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 640.0\n'
        "# TYPE vllm:num_preemptions counter\n"
        'vllm:num_preemptions_total{engine="0",model_name="m"} 2.0\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
    )
    stats = parse_vllm_metrics(text)
    assert stats.kv_usage == 0.25
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (1000, 640)
    assert (stats.preemptions, stats.running, stats.waiting) == (2, 3, 1)
