"""Guided tool calls on real vLLM, tiny random-weight model.

The model's text is gibberish, so what is asserted is what guided decoding
guarantees: with ``tool_choice: required`` every answer is calls, and every
call names an offered tool with arguments valid against that tool's JSON
schema (checked with ``jsonschema``, not by the engine's own parser); with
``auto`` an answer is text or such calls. Sampling (temperature 1, a seed per
request) and several ``max_tokens`` make the answers differ, so the bound on
the guided schema (``toolcalls.fit_to_budget``) is exercised too: without it
and with vLLM's free whitespace, none of these calls closed.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from proto.messages import ChatMessage, ToolCall, ToolSpec
from proto.tools import INVALID_CALL, PYTHON_PARAMETERS, SEARCH_PARAMETERS
from services.inference_worker.engines.base import GenerationChunk, GenerationRequest
from services.inference_worker.engines.toolcalls import tools_in_use
from services.inference_worker.engines.vllm import VLLMEngine

pytestmark = pytest.mark.vllm

LOOKUP = {
    "type": "object", "required": ["id"], "additionalProperties": False,
    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                   "mode": {"enum": ["fast", "exact"]}},
}  # fmt: skip
TOOLS = (
    ToolSpec(name="search", parameters=json.dumps(SEARCH_PARAMETERS)),
    ToolSpec(name="python", parameters=json.dumps(PYTHON_PARAMETERS)),
    ToolSpec(name="lookup", parameters=json.dumps(LOOKUP)),
)
SCHEMAS = {t.name: json.loads(t.parameters) for t in TOOLS}
N = 12
MAX_TOKENS = (64, 96, 128, 256)  # the research agents use 96 and 128


async def _answers(engine: VLLMEngine, choice: str) -> list[GenerationChunk]:
    async def one(i: int) -> GenerationChunk:
        request = GenerationRequest(
            request_id=f"tools-{choice}-{i}",
            messages=[
                ChatMessage(role="system", content="You can call tools."),
                ChatMessage(role="user", content=f"Task {i}: find paper {i} and look up {i}."),
            ],
            max_tokens=MAX_TOKENS[i % len(MAX_TOKENS)],
            temperature=1.0,
            seed=i,
            tools=TOOLS,
            tool_choice=choice,
        )
        return [c async for c in engine.generate(request)][-1]

    return await asyncio.gather(*(one(i) for i in range(N)))


def _assert_valid(call: ToolCall) -> None:
    assert call.name in SCHEMAS, call  # INVALID_CALL included: the answer did not parse
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


async def test_required_every_call_fits_its_tools_schema(vllm_engine: VLLMEngine) -> None:
    finals = await _answers(vllm_engine, "required")
    calls = [c for f in finals for c in f.tool_calls or []]
    assert all(f.tool_calls for f in finals), [f.text for f in finals if not f.tool_calls]
    assert all(f.finish_reason == "stop" for f in finals), [f.finish_reason for f in finals]
    for call in calls:
        _assert_valid(call)
    assert INVALID_CALL not in {c.name for c in calls}
    # Sampling reached more than one tool (the test is not one answer N times).
    assert len({c.name for c in calls}) >= 2, calls


async def test_auto_answers_text_or_valid_calls(vllm_engine: VLLMEngine) -> None:
    finals = await _answers(vllm_engine, "auto")
    assert all(f.finish_reason == "stop" for f in finals), [f.finish_reason for f in finals]
    for f in finals:
        if f.tool_calls:
            assert f.text == ""
            for call in f.tool_calls:
                _assert_valid(call)
        else:  # text: the guided {"content": ...} unwrapped, never the raw JSON
            assert not f.text.startswith('{"'), f.text
    # Both branches taken (seeded samples), so neither path can break unseen.
    kinds = {bool(f.tool_calls) for f in finals}
    assert kinds == {True, False}, kinds


@pytest.mark.parametrize("choice", ["required", "none"])
async def test_the_prompt_count_includes_the_offered_tools(
    vllm_engine: VLLMEngine, choice: str
) -> None:
    """What the worker trims and admits by is what the engine submits: the
    template renders the offered tools (none with ``none``) into the prompt."""
    messages = [ChatMessage(role="system", content="You can call tools."),
                ChatMessage(role="user", content=f"Look up paper {choice}.")]  # fmt: skip
    request = GenerationRequest(request_id=f"count-{choice}", messages=messages, max_tokens=32,
                                tools=TOOLS, tool_choice=choice)  # fmt: skip
    final = [c async for c in vllm_engine.generate(request)][-1]
    offered = tools_in_use(TOOLS, choice)
    assert final.prompt_tokens == vllm_engine.count_prompt_tokens(messages, offered)
    bare = vllm_engine.count_prompt_tokens(messages)
    assert (final.prompt_tokens > bare) == (choice != "none"), (final.prompt_tokens, bare)
