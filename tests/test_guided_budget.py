"""The guided schema of a tool-calling step fits its ``max_tokens`` (pure).

Without the bound, the grammar admits answers longer than ``max_tokens``
(strings to their ``maxLength``, up to 8 calls): a weak model takes them and
the cut JSON is no call at all — on real vLLM that was 0 of 6 valid calls.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from proto.messages import ToolSpec
from proto.tools import PYTHON_PARAMETERS, SEARCH_PARAMETERS, calls_schema
from services.inference_worker.engines.toolcalls import MIN_STRING, fit_to_budget, guided_schema

LOOKUP = {
    "type": "object", "required": ["id"], "additionalProperties": False,
    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                   "mode": {"enum": ["fast", "exact"]}, "strict": {"type": "boolean"}},
}  # fmt: skip
TOOLS = [
    ToolSpec(name="search", parameters=json.dumps(SEARCH_PARAMETERS)),
    ToolSpec(name="python", parameters=json.dumps(PYTHON_PARAMETERS)),
    ToolSpec(name="lookup", parameters=json.dumps(LOOKUP)),
]


def _longest(schema: dict[str, Any]) -> Any:
    """The longest value ``schema`` admits, every optional property present."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return max(schema["enum"], key=lambda v: len(json.dumps(v)))
    kind = schema.get("type")
    if kind == "string":
        return "x" * schema["maxLength"]
    if kind == "integer":
        return max(schema["minimum"], schema["maximum"], key=lambda v: len(str(v)))
    if kind == "boolean":
        return False
    return {k: _longest(v) for k, v in schema["properties"].items()}


def _longest_answer(fitted: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    calls = next(o for o in fitted.get("anyOf", [fitted]) if "tool_calls" in o["properties"])
    array = calls["properties"]["tool_calls"]
    item = max(
        (
            {"name": opt["properties"]["name"]["const"],
             "arguments": _longest(opt["properties"]["arguments"])}
            for opt in array["items"]["anyOf"]
        ),
        key=lambda c: len(json.dumps(c, separators=(",", ":"))),
    )  # fmt: skip
    answer = {"tool_calls": [item] * array["maxItems"]}
    return json.dumps(answer, separators=(",", ":")), answer


@pytest.mark.parametrize("choice", ["required", "auto"])
@pytest.mark.parametrize("max_tokens", [64, 96, 128, 256, 1024])
def test_the_longest_guided_answer_closes_within_max_tokens(choice: str, max_tokens: int) -> None:
    fitted = json.loads(fit_to_budget(calls_schema(TOOLS, choice), max_tokens))
    text, answer = _longest_answer(fitted)
    assert len(text) <= max_tokens - 1  # every token is at least one character
    jsonschema.validate(answer, fitted)
    # A subset of the tools' own schemas: what guidance admits, the tool accepts.
    jsonschema.validate(answer, json.loads(calls_schema(TOOLS, choice)))
    for call in answer["tool_calls"]:
        spec = next(t for t in TOOLS if t.name == call["name"])
        jsonschema.validate(call["arguments"], json.loads(spec.parameters))
    if choice == "auto":
        content = next(o for o in fitted["anyOf"] if "content" in o["properties"])
        longest = {"content": "x" * content["properties"]["content"]["maxLength"]}
        assert len(json.dumps(longest, separators=(",", ":"))) <= max_tokens - 1


def _array(max_tokens: int) -> dict[str, Any]:
    fitted = json.loads(fit_to_budget(calls_schema(TOOLS, "required"), max_tokens))
    return dict(fitted["properties"]["tool_calls"])


def test_fewer_calls_before_short_strings_and_no_bound_when_it_fits() -> None:
    assert _array(128)["maxItems"] == 1
    array = _array(512)
    assert 1 < array["maxItems"] < 8
    search = array["items"]["anyOf"][0]["properties"]["arguments"]["properties"]["query"]
    assert search["maxLength"] >= MIN_STRING
    roomy = json.loads(fit_to_budget(calls_schema(TOOLS, "required"), 10**7))
    array = roomy["properties"]["tool_calls"]
    assert array["maxItems"] == 8
    code = array["items"]["anyOf"][1]["properties"]["arguments"]["properties"]["code"]
    assert code["maxLength"] == PYTHON_PARAMETERS["properties"]["code"]["maxLength"]


def test_a_tight_budget_drops_optional_arguments_first() -> None:
    roomy = _array(1024)["items"]["anyOf"][2]["properties"]["arguments"]["properties"]
    tight = _array(64)["items"]["anyOf"][2]["properties"]["arguments"]["properties"]
    assert set(roomy) == {"id", "mode", "strict"} and set(tight) == {"id"}


def test_the_guided_schema_is_built_once_per_tools_choice_and_budget() -> None:
    first = guided_schema(TOOLS, "auto", 96)
    assert first == fit_to_budget(calls_schema(TOOLS, "auto"), 96)
    again = [ToolSpec(name=t.name, parameters=t.parameters) for t in TOOLS]  # equal, not the same
    assert guided_schema(again, "auto", 96) is first
    assert guided_schema(TOOLS, "required", 96) == fit_to_budget(
        calls_schema(TOOLS, "required"), 96
    )
    assert guided_schema(TOOLS, "auto", 64) != first
    assert guided_schema(TOOLS[:1], "auto", 96) != first


def test_the_research_agents_can_write_a_real_query_and_program() -> None:
    """At the research workflow's budgets a real model gets room for a search
    query or a short program (SmolLM2 wrote 12-character queries when the
    bound preferred more calls to longer strings)."""
    from pathlib import Path

    import yaml

    from proto.tools import BUILTIN_SPECS

    path = Path(__file__).parents[1] / "services/orchestrator/workflows/research.yaml"
    agents = yaml.safe_load(path.read_text())["agents"]
    for agent in agents.values():
        for tool in agent.get("tools", []):
            fitted = json.loads(guided_schema((BUILTIN_SPECS[tool],), "auto", agent["max_tokens"]))
            array = fitted["anyOf"][0]["properties"]["tool_calls"]
            args = array["items"]["anyOf"][0]["properties"]["arguments"]["properties"]
            longest = max(p.get("maxLength", 0) for p in args.values())
            assert array["maxItems"] == 1 and longest >= 96, (tool, array["maxItems"], longest)
