"""The tool worker's ``execute_tool <tool>`` span (OpenTelemetry GenAI
conventions): one per delivery of a call, in the context of the step's
``invoke_agent`` span the call was published in."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from baton import tracing
from proto.messages import ToolJob, ToolResult


def execute_tool(job: ToolJob) -> AbstractContextManager[Any]:
    if not tracing.enabled():  # off: not even the attributes are put together
        return contextlib.nullcontext()
    attrs = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": job.tool,
        "gen_ai.tool.call.id": job.tool_call_id or job.call_id,
        "gen_ai.tool.type": "function",
        "gen_ai.conversation.id": job.session,
        "baton.task_id": job.task_id,
        "baton.step": job.step,
        "baton.attempt": job.attempt,
    }
    return tracing.span(f"execute_tool {job.tool}", attributes=attrs, layer="tool")


def finished(result: ToolResult) -> None:
    """The call's outcome on its span: a tool's error is the agent's to read,
    and the span's error (layer ``tool``)."""
    if not tracing.enabled():
        return
    attrs: dict[str, Any] = {
        "baton.outcome": result.outcome,
        "baton.cpu_seconds": result.cpu_seconds,
    }
    if result.reused:
        attrs["baton.reused"] = True
    err = result.error
    tracing.set_attributes(
        attrs, (str(err.code), err.message, str(err.layer)) if err is not None else None
    )
