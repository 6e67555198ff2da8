"""The guided answer of a tool-calling step, and reading calls out of it (pure).

vLLM decodes to ``proto.tools.calls_schema`` (guided), so its answer is
``{"tool_calls": [{"name", "arguments"}, ...]}`` or, with ``auto``,
``{"content": "..."}``. An answer cut short by ``max_tokens`` or otherwise
unreadable is never an exception: with ``required`` it becomes one call of
``INVALID_CALL`` (the tool worker answers it with an error the agent reads),
with ``auto`` it is taken as plain text.

Guidance alone does not make a call close: the grammar lets a weak model
(the tiny random one; a small real one on a bad day) fill every string to its
``maxLength`` and add calls up to ``maxItems``, and ``max_tokens`` then cuts
the JSON. ``fit_to_budget`` bounds the guided schema so that its longest
answer fits ``max_tokens``: every token is at least one character, so an
answer of at most ``max_tokens - 1`` characters (one token is left for the
end of sequence) always closes. It lowers the number of calls first (to
keep strings at least ``MIN_STRING`` long), then every string's
``maxLength``. A tighter schema admits a subset of the tools' own, so a
closed answer is still valid against them. Escapes (``\n``, ``\u00e9``)
are one character of ``maxLength`` but several of output: the budget keeps
a tenth in reserve for them.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proto.messages import ToolCall, ToolSpec
from proto.tools import INVALID_CALL, calls_schema, openai_tools


@dataclass(slots=True)
class Parsed:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def tools_in_use(tools: Sequence[ToolSpec], choice: str) -> tuple[ToolSpec, ...]:
    """The tools a generation really offers the model (rendered into its
    prompt, guiding its answer): none with ``tool_choice`` ``none``. Both the
    engines' ``generate`` and the worker's token count go by this."""
    return tuple(tools) if choice != "none" else ()


def tools_json(tools: Sequence[ToolSpec]) -> str:
    """Offered tools as a chat template shows them (the OpenAI format, as
    JSON): what the simulator renders and the HTTP engine's estimate counts.
    Cached like ``guided_schema``: every count and calibration asks again for
    the same catalog."""
    return _tools_json(_key(tools)) if tools else ""


def _key(tools: Sequence[ToolSpec]) -> tuple[tuple[str, str, str], ...]:
    """A hashable key of ``tools`` for the caches below (ToolSpec is not)."""
    return tuple((t.name, t.description, t.parameters) for t in tools)


def _specs(key: tuple[tuple[str, str, str], ...]) -> list[ToolSpec]:
    return [ToolSpec(name=n, description=d, parameters=p) for n, d, p in key]


@functools.lru_cache(maxsize=256)
def _tools_json(key: tuple[tuple[str, str, str], ...]) -> str:
    return json.dumps(openai_tools(_specs(key)))


def call_id(i: int) -> str:
    """The id of a turn's ``i``-th call: deterministic, so a redelivered job
    makes the same ids (the orchestrator keys a call by task, step and turn)."""
    return f"call_{i}"


def parse_guided(text: str, choice: str) -> Parsed:
    try:
        # strict=False: the grammar lets raw control characters into strings
        # (seen: xgrammar emitted \x0f); arguments are re-encoded below.
        doc = json.loads(text, strict=False)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("tool_calls"), list) and doc["tool_calls"]:
        calls = []
        for i, item in enumerate(doc["tool_calls"]):
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                args = item.get("arguments", {})
                arguments = args if isinstance(args, str) else json.dumps(args)
                calls.append(ToolCall(id=call_id(i), name=item["name"], arguments=arguments))
            else:
                calls.append(invalid(i, json.dumps(item)[:500]))
        return Parsed("", calls)
    if isinstance(doc, dict) and isinstance(doc.get("content"), str) and choice != "required":
        return Parsed(doc["content"])
    if choice == "required":
        return Parsed("", [invalid(0, text[:500])])
    return Parsed(text)


def invalid(i: int, raw: str) -> ToolCall:
    return ToolCall(id=call_id(i), name=INVALID_CALL, arguments=json.dumps({"raw": raw}))


MIN_STRING = 128
"""Shortest string bound ``fit_to_budget`` prefers before it allows fewer calls:
a real model's search query or short program needs about this many
characters, and one call it can write is worth more than two it cannot
(with 32, SmolLM2 got 12-character queries at the research agents' budgets)."""
_UNBOUNDED_NUMBER = 24  # characters of a number with no bounds (digits, sign, exponent)


def _skeleton(schema: Any) -> tuple[int, int]:
    """(characters of the longest answer with every string empty, string
    slots) for ``schema``; optional properties counted as present."""
    if not isinstance(schema, dict):
        return _UNBOUNDED_NUMBER, 1  # `true` schema: anything
    if "const" in schema:
        return len(json.dumps(schema["const"], separators=(",", ":"))), 0
    if schema.get("enum"):
        return max(len(json.dumps(v, separators=(",", ":"))) for v in schema["enum"]), 0
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            parts = [_skeleton(s) for s in schema[key]]
            return max(p[0] for p in parts), max(p[1] for p in parts)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        parts = [_skeleton({**schema, "type": k}) for k in kind]
        return max(p[0] for p in parts), max(p[1] for p in parts)
    if kind == "string":
        return 2, 1
    if kind == "integer":
        bounds = [schema[k] for k in ("minimum", "maximum") if k in schema]
        if len(bounds) == 2:
            return max(len(str(int(b))) for b in bounds), 0
        return _UNBOUNDED_NUMBER, 0
    if kind == "number":
        return _UNBOUNDED_NUMBER, 0
    if kind == "boolean":
        return 5, 0
    if kind == "null":
        return 4, 0
    if kind == "array":
        n = int(schema.get("maxItems", max(1, int(schema.get("minItems", 0)))))
        chars, strings = _skeleton(schema.get("items", {}))
        return 2 + n * (chars + 1), n * strings
    props = schema.get("properties", {})
    chars, strings = 2, 0
    for key, sub in props.items():
        c, k = _skeleton(sub)
        chars += len(json.dumps(key)) + 2 + c  # "key":value,
        strings += k
    return chars, strings


def _cap_strings(schema: Any, cap: int) -> Any:
    if isinstance(schema, list):
        return [_cap_strings(s, cap) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _cap_strings(v, cap) for k, v in schema.items()}
    kinds = schema.get("type")
    if (kinds == "string" or (isinstance(kinds, list) and "string" in kinds)) and not (
        "const" in schema or "enum" in schema
    ):
        lo = int(schema.get("minLength", 0))
        out["maxLength"] = max(lo, min(int(schema.get("maxLength", cap)), cap))
    return out


def _required_only(item: dict[str, Any]) -> dict[str, Any]:
    """A call's schema without its optional arguments."""
    args = item["properties"]["arguments"]
    keep = set(args.get("required", []))
    props = {k: v for k, v in args.get("properties", {}).items() if k in keep}
    arguments = {**args, "properties": props, "additionalProperties": False}
    return {**item, "properties": {**item["properties"], "arguments": arguments}}


def fit_to_budget(schema_json: str, max_tokens: int) -> str:
    """``calls_schema``'s output bounded so its longest answer closes within
    ``max_tokens`` (see the module doc): fewer calls, then shorter strings,
    then (a budget too small for them) no optional arguments. Best effort
    when even that does not fit: strings at their ``minLength``."""
    schema = json.loads(schema_json)
    budget = math.floor((max_tokens - 1) * 0.9)
    options = schema.get("anyOf", [schema])
    calls = next(o for o in options if "tool_calls" in o["properties"])
    array = calls["properties"]["tool_calls"]
    wrapper = len('{"tool_calls":[]}')
    lo = int(array.get("minItems", 1))
    for trim in (False, True):
        items = array["items"]
        if trim:
            items = {**items, "anyOf": [_required_only(i) for i in items["anyOf"]]}
        per_call, strings = _skeleton(items)
        n = int(array.get("maxItems", 1))
        # Fewer calls before strings shorter than MIN_STRING; at least minItems.
        while n > lo and wrapper + n * (per_call + 1 + strings * MIN_STRING) > budget:
            n -= 1
        room = budget - wrapper - n * (per_call + 1)
        if room >= 0 or trim:
            break
    array["maxItems"] = n
    array["items"] = _cap_strings(items, max(0, room) // (n * strings)) if strings else items
    for other in options:
        if other is not calls:  # auto: {"content": text}
            text_room = max(0, budget - len('{"content":""}'))
            props = other["properties"]
            props["content"] = _cap_strings(props["content"], text_room)
    return json.dumps(schema, sort_keys=True)


def guided_schema(tools: Sequence[ToolSpec], choice: str, max_tokens: int) -> str:
    """``calls_schema`` of ``tools`` fitted to ``max_tokens``: what a tool-calling
    generation is guided to. Cached (~50 µs to build, and an agent offers the
    same tools at the same ``max_tokens`` every turn)."""
    return _guided_schema(_key(tools), choice, max_tokens)


@functools.lru_cache(maxsize=256)
def _guided_schema(tools: tuple[tuple[str, str, str], ...], choice: str, max_tokens: int) -> str:
    return fit_to_budget(calls_schema(_specs(tools), choice), max_tokens)
