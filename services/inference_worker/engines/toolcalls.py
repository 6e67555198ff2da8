"""Reading a model's tool calls out of its answer (pure).

vLLM decodes to ``proto.tools.calls_schema`` (guided), so its answer is
``{"tool_calls": [{"name", "arguments"}, ...]}`` or, with ``auto``,
``{"content": "..."}``. An answer cut short by ``max_tokens`` or otherwise
unreadable is never an exception: with ``required`` it becomes one call of
``INVALID_CALL`` (the tool worker answers it with an error the agent reads),
with ``auto`` it is taken as plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from proto.messages import ToolCall
from proto.tools import INVALID_CALL


@dataclass(slots=True)
class Parsed:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def call_id(job_id: str, i: int) -> str:
    """A model call's id: unique per job, deterministic (a redelivered job makes the same ids)."""
    return f"call_{i}"


def parse_guided(text: str, choice: str, job_id: str = "") -> Parsed:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("tool_calls"), list) and doc["tool_calls"]:
        calls = []
        for i, item in enumerate(doc["tool_calls"]):
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                args = item.get("arguments", {})
                arguments = args if isinstance(args, str) else json.dumps(args)
                calls.append(
                    ToolCall(id=call_id(job_id, i), name=item["name"], arguments=arguments)
                )
            else:
                calls.append(invalid(job_id, i, json.dumps(item)[:500]))
        return Parsed("", calls)
    if isinstance(doc, dict) and isinstance(doc.get("content"), str) and choice != "required":
        return Parsed(doc["content"])
    if choice == "required":
        return Parsed("", [invalid(job_id, 0, text[:500])])
    return Parsed(text)


def invalid(job_id: str, i: int, raw: str) -> ToolCall:
    return ToolCall(id=call_id(job_id, i), name=INVALID_CALL, arguments=json.dumps({"raw": raw}))
