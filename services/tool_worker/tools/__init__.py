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
from jsonschema.protocols import Validator

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


def arguments_validator(tool: Tool) -> Validator:
    """The tool's arguments schema compiled, once per tool (when the worker
    loads it): ``jsonschema.validate`` checks the schema and builds a
    validator on every call (0.66 ms measured here, more than a search
    takes), the compiled one validates in ~8 µs.

    Raises:
        jsonschema.SchemaError: the tool's schema is not a valid JSON schema.
    """
    cls = jsonschema.validators.validator_for(tool.parameters)
    cls.check_schema(tool.parameters)
    validator: Validator = cls(tool.parameters)
    return validator


def parse_arguments(validator: Validator, arguments: str) -> dict[str, Any]:
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
    err = jsonschema.exceptions.best_match(validator.iter_errors(args))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "arguments"
        raise ToolError(ErrorCode.BAD_TOOL_ARGUMENTS, f"{where}: {err.message}")
    return args
