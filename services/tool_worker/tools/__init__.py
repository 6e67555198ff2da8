"""Tools a tool worker can run, behind one small interface.

A tool has a name, a description and a JSON schema for its arguments (what a
model is offered), and an async ``run`` that returns text or raises
``ToolError``. The worker checks the arguments against the schema before
``run`` sees them, and applies the timeout and the output limit around it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema

from proto.errors import ErrorCode
from proto.messages import ToolSpec


class ToolError(Exception):
    """A tool call that failed; the agent sees ``code`` and ``message``."""

    def __init__(self, code: ErrorCode, message: str, *, cpu_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cpu_seconds = cpu_seconds


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who the call is for: tools are tenant-scoped."""

    tenant: str
    task_id: str
    call_id: str
    timeout: float


@dataclass(slots=True)
class ToolOutput:
    text: str
    cpu_seconds: float = 0.0  # CPU time the tool spent in child processes, if it knows


class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]

    async def run(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput: ...


def spec_of(tool: Tool) -> ToolSpec:
    return ToolSpec(
        name=tool.name,
        description=tool.description,
        parameters=json.dumps(tool.parameters, sort_keys=True),
    )


def parse_arguments(tool: Tool, arguments: str) -> dict[str, Any]:
    """The call's arguments as a dict valid against the tool's schema.

    Raises:
        ToolError: ``bad_tool_arguments`` naming what is wrong.
    """
    try:
        args = json.loads(arguments or "{}")
    except ValueError as exc:
        raise ToolError(ErrorCode.BAD_TOOL_ARGUMENTS, f"arguments are not JSON: {exc}") from exc
    if not isinstance(args, dict):
        raise ToolError(ErrorCode.BAD_TOOL_ARGUMENTS, "arguments must be a JSON object")
    err = jsonschema.exceptions.best_match(_validator(tool.parameters).iter_errors(args))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "arguments"
        raise ToolError(ErrorCode.BAD_TOOL_ARGUMENTS, f"{where}: {err.message}")
    return args


_VALIDATORS: dict[str, Any] = {}


def _validator(schema: dict[str, Any]) -> Any:
    """A compiled validator per schema: ``jsonschema.validate`` checks the
    schema and builds a validator on every call (0.66 ms measured here, more
    than a search takes), the compiled one validates in ~8 µs."""
    key = json.dumps(schema, sort_keys=True)
    found = _VALIDATORS.get(key)
    if found is None:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        found = _VALIDATORS[key] = cls(schema)
    return found
