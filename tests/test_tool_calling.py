"""Tool calling in the engines, without a broker: the OpenAI tools format,
the guided-decoding schema, reading calls out of an answer (malformed ones
included), schema-built arguments, the simulator's call-then-answer rule, and
offered tools counted in the prompt."""

from __future__ import annotations

import json

import jsonschema
import pytest

from proto.messages import ChatMessage, ToolSpec
from proto.tools import (
    INVALID_CALL,
    calls_schema,
    check_tool_name,
    example_arguments,
    openai_tools,
)
from services.inference_worker.engines.base import GenerationRequest
from services.inference_worker.engines.openai import OpenAIEngine
from services.inference_worker.engines.sim import SimEngine
from services.inference_worker.engines.toolcalls import parse_guided
from services.tool_worker.tools.python import PythonTool
from services.tool_worker.tools.search import SearchTool

SEARCH = ToolSpec(name="search", description="BM25", parameters=json.dumps(SearchTool.parameters))
PYTHON = ToolSpec(name="python", description="run", parameters=json.dumps(PythonTool.parameters))
ADD = ToolSpec(name="mcp.calc.add", parameters=json.dumps({
    "type": "object", "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": 3}, "b": {"type": "number"},
                   "mode": {"enum": ["x", "y"]}},
}))  # fmt: skip


def test_tools_are_offered_in_the_openai_format() -> None:
    (tool,) = openai_tools([SEARCH])
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "search"
    assert tool["function"]["parameters"]["required"] == ["query"]


@pytest.mark.parametrize("spec", [SEARCH, PYTHON, ADD])
def test_schema_built_arguments_are_valid_for_the_tool(spec: ToolSpec) -> None:
    schema = json.loads(spec.parameters)
    args = example_arguments(schema, "what is raft")
    jsonschema.validate(args, schema)
    assert args == example_arguments(schema, "what is raft")  # deterministic


def test_a_code_argument_is_a_program_printing_the_seed() -> None:
    assert example_arguments(json.loads(PYTHON.parameters), "hi") == {"code": "print('hi')"}


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_guided_schema_admits_calls_that_fit_the_tools_and_nothing_else(choice: str) -> None:
    schema = json.loads(calls_schema([SEARCH, ADD], choice))
    good = {"tool_calls": [{"name": "search", "arguments": {"query": "x"}},
                           {"name": "mcp.calc.add", "arguments": {"a": 3, "b": 1.5}}]}  # fmt: skip
    jsonschema.validate(good, schema)
    for bad in (
        {"tool_calls": [{"name": "search", "arguments": {}}]},  # missing query
        {"tool_calls": [{"name": "rm", "arguments": {}}]},  # not offered
        {"tool_calls": [{"name": "mcp.calc.add", "arguments": {"a": 1, "b": 2}}]},  # a < 3
        {"tool_calls": []},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    text = {"content": "the answer"}
    if choice == "auto":
        jsonschema.validate(text, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(text, schema)


def test_calls_are_read_from_a_guided_answer() -> None:
    p = parse_guided('{"tool_calls": [{"name": "search", "arguments": {"query": "raft"}}]}', "auto")
    assert p.content == "" and [(c.id, c.name, json.loads(c.arguments)) for c in p.calls] == [
        ("call_0", "search", {"query": "raft"})
    ]
    assert parse_guided('{"content": "done"}', "auto").content == "done"


def test_raw_control_characters_from_the_grammar_are_read() -> None:
    # xgrammar lets a model put a raw \x0f inside a JSON string; strict JSON refuses it.
    assert parse_guided('{"content": "a\x0fb"}', "auto").content == "a\x0fb"
    (call,) = parse_guided(
        '{"tool_calls": [{"name": "s", "arguments": {"q": "\x0f"}}]}', "auto"
    ).calls
    assert json.loads(call.arguments) == {"q": "\x0f"}


def test_a_malformed_answer_is_never_an_exception() -> None:
    cut = '{"tool_calls": [{"name": "search", "argum'  # max_tokens ran out
    required = parse_guided(cut, "required")
    assert [c.name for c in required.calls] == [
        INVALID_CALL
    ]  # the tool worker answers with an error
    assert json.loads(required.calls[0].arguments)["raw"] == cut
    auto = parse_guided(cut, "auto")
    assert auto.calls == [] and auto.content == cut
    odd = parse_guided('{"tool_calls": [42]}', "auto")
    assert [c.name for c in odd.calls] == [INVALID_CALL]


def test_workflow_tool_names_are_checked() -> None:
    assert check_tool_name("search", set()) is None
    assert check_tool_name("mcp.calc.add", {"calc"}) is None
    assert "BATON_MCP_SERVERS" in (check_tool_name("mcp.other.add", {"calc"}) or "")
    assert "unknown tool" in (check_tool_name("shell", set()) or "")


async def _generate(engine: SimEngine, messages: list[ChatMessage], tools: tuple[ToolSpec, ...]):
    req = GenerationRequest(request_id="r", messages=messages, max_tokens=8, tools=tools)
    return [c async for c in engine.generate(req)][-1]


async def test_the_simulator_calls_each_offered_tool_once_then_answers() -> None:
    engine = SimEngine(decode_tps=0)
    await engine.start()
    history = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="raft?")]
    first = await _generate(engine, history, (SEARCH, PYTHON))
    assert [(c.name, json.loads(c.arguments)) for c in first.tool_calls] == [
        ("search", {"query": "raft?"}),
        ("python", {"code": "print('raft?')"}),
    ]
    history += [ChatMessage(role="assistant", content="", tool_calls=first.tool_calls),
                ChatMessage(role="tool", name="search", content="{}", tool_call_id="call_0")]  # fmt: skip
    second = await _generate(engine, history, (SEARCH, PYTHON))
    assert [c.name for c in second.tool_calls] == ["python"]  # only the one without a result
    history.append(ChatMessage(role="tool", name="python", content="{}", tool_call_id="call_1"))
    third = await _generate(engine, history, (SEARCH, PYTHON))
    assert third.tool_calls is None and third.completion_tokens > 0
    none = await _generate(engine, history[:2], ())
    assert none.tool_calls is None


async def test_the_simulator_counts_the_offered_tools_as_its_prompt_does() -> None:
    """``generate`` renders the offered tools into the prompt, so the count the
    worker trims and admits by must include them (``none`` offers none)."""
    engine = SimEngine(decode_tps=0)
    await engine.start()
    history = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="raft?")]
    tools = (SEARCH, PYTHON, ADD)
    bare = engine.count_prompt_tokens(history)
    counted = engine.count_prompt_tokens(history, tools)
    # The tools' JSON at the simulator's 4 bytes a token, and a short header.
    assert counted - bare == pytest.approx(len(json.dumps(openai_tools(list(tools)))) / 4, abs=4)
    for choice, expected in (("auto", counted), ("required", counted), ("none", bare)):
        req = GenerationRequest(request_id=f"r-{choice}", messages=history, max_tokens=8,
                                tools=tools, tool_choice=choice)  # fmt: skip
        final = [c async for c in engine.generate(req)][-1]
        assert final.prompt_tokens == expected, choice


def test_the_http_engines_estimate_counts_the_offered_tools() -> None:
    """The synchronous estimate (no server needed) adds the tools' JSON at the
    calibrated tokens-per-character."""
    engine = OpenAIEngine("http://127.0.0.1:9", "m")
    history = [ChatMessage(role="user", content="raft? " * 40)]
    tools = [SEARCH, PYTHON, ADD]
    extra = engine.count_prompt_tokens(history, tools) - engine.count_prompt_tokens(history)
    assert extra == pytest.approx(len(json.dumps(openai_tools(tools))) * 0.25, abs=1)


def test_a_turn_that_called_tools_reads_back_as_the_json_the_model_wrote() -> None:
    """The vLLM engine shows the model its earlier calls exactly as guided
    decoding made it write them (compact, arguments an object), not with the
    arguments as a string holding JSON."""
    from proto.messages import ToolCall
    from services.inference_worker.engines.vllm import _wire_message

    written = '{"tool_calls":[{"name":"search","arguments":{"query":"raft"}}]}'
    calls = parse_guided(written, "auto").calls
    turn = ChatMessage(role="assistant", content="", tool_calls=calls)
    assert _wire_message(turn)["content"] == written
    odd = ChatMessage(role="assistant", content="",
                      tool_calls=[ToolCall(id="call_0", name="x", arguments="not json")])  # fmt: skip
    assert json.loads(_wire_message(odd)["content"])["tool_calls"][0]["arguments"] == "not json"
