"""Tool naming and the OpenAI tools format, shared by the orchestrator (what
an agent may call), the engines (what a model is offered) and the tool
worker. Pure: no I/O."""

from __future__ import annotations

import json
import re
from typing import Any, Final

from proto.messages import ToolSpec

BUILTIN_TOOLS: Final = frozenset({"search", "python"})
TOOL_CHOICES: Final = ("auto", "required", "none")
INVALID_CALL: Final = "invalid_call"
"""The name a call gets when the model's output could not be read as one;
the tool worker answers it with a ``bad_tool_arguments`` error the agent reads."""

SEARCH_PARAMETERS: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 512},
        "limit": {"type": "integer", "minimum": 1, "maximum": 20},
    },
    "required": ["query"],
    "additionalProperties": False,
}
PYTHON_PARAMETERS: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 65536}},
    "required": ["code"],
    "additionalProperties": False,
}
BUILTIN_SPECS: Final = {
    "search": ToolSpec(
        name="search",
        description="Full-text search (BM25) over the documents uploaded for this tenant. "
        "Returns the best matches with a snippet each.",
        parameters=json.dumps(SEARCH_PARAMETERS, sort_keys=True),
    ),
    "python": ToolSpec(
        name="python",
        description="Run a Python 3 program in a sandbox (no network, no files outside its "
        "own directory, limited CPU time, memory and processes). Returns its exit code, "
        "stdout and stderr; print what you want to see.",
        parameters=json.dumps(PYTHON_PARAMETERS, sort_keys=True),
    ),
}
"""The built-in tools as offered to models (the tool worker runs them)."""

_MCP_NAME = re.compile(r"^mcp\.([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_.-]{1,128})$")


def mcp_parts(name: str) -> tuple[str, str] | None:
    """(server, tool) of ``mcp.<server>.<tool>``, else None."""
    m = _MCP_NAME.match(name)
    return (m.group(1), m.group(2)) if m else None


def check_tool_name(name: str, mcp_servers: set[str] | frozenset[str]) -> str | None:
    """Why a workflow may not name ``name`` as a tool (None when it may)."""
    if name in BUILTIN_TOOLS:
        return None
    parts = mcp_parts(name)
    if parts is None:
        mcp = "MCP tools are mcp.<server>.<tool>"
        return f"unknown tool {name!r}: built-in tools are {sorted(BUILTIN_TOOLS)}, {mcp}"
    if parts[0] not in mcp_servers:
        return f"tool {name!r} names MCP server {parts[0]!r}, which BATON_MCP_SERVERS does not"
    return None


def openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """``tools`` in the OpenAI chat-completions format."""
    return [
        {"type": "function",
         "function": {"name": t.name, "description": t.description,
                      "parameters": json.loads(t.parameters)}}
        for t in tools
    ]  # fmt: skip


def calls_schema(tools: list[ToolSpec], choice: str, max_calls: int = 8) -> str:
    """JSON schema of a model answer that calls tools (``required``) or may
    (``auto``: calls, or ``{"content": text}``): guided decoding to it makes
    even a random-weight model emit calls whose arguments fit each tool's schema."""
    items = [
        {"type": "object",
         "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]  # fmt: skip
    calls: dict[str, Any] = {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": {"anyOf": items},
                "minItems": 1,
                "maxItems": max(1, max_calls),
            },
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if choice == "required":
        return json.dumps(calls, sort_keys=True)
    answer = {"type": "object", "properties": {"content": {"type": "string"}},
              "required": ["content"], "additionalProperties": False}  # fmt: skip
    return json.dumps({"anyOf": [calls, answer]}, sort_keys=True)


def example_arguments(schema: dict[str, Any], seed: str = "", name: str = "") -> Any:
    """A value valid against ``schema``, built from it deterministically (the
    simulator's arguments): the first enum value or const, the default, else
    a typed value; objects get their required properties. Strings are
    ``seed`` (the simulator passes the newest user message) cut to the
    schema's length bounds, except a property named ``code``, which gets a
    program printing the seed."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return example_arguments(schema[key][0], seed, name)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example_arguments(props.get(k, {}), seed, k) for k in schema.get("required", [])}
    if kind == "array":
        return [example_arguments(schema.get("items", {}), seed)] * int(schema.get("minItems", 0))
    if kind == "string":
        text = seed or name or "baton"
        if name == "code":
            text = f"print({text!r})"
        lo, hi = int(schema.get("minLength", 0)), int(schema.get("maxLength", 10_000))
        return (text * (lo // max(1, len(text)) + 1))[: max(lo, min(hi, len(text)))]
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = max(1, lo + (1 if "exclusiveMinimum" in schema else 0))
        if "maximum" in schema:
            value = min(value, schema["maximum"])
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    return None
