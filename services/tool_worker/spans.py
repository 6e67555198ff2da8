"""The tool worker's ``execute_tool <tool>`` span (OpenTelemetry GenAI
conventions): one per delivery of a call, in the context of the step's
``invoke_agent`` span the call was published in."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from baton import tracing
from proto.messages import ToolJob, ToolResult


def execute_tool(job: ToolJob, worker: str) -> AbstractContextManager[Any]:
    attrs = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": job.tool,
        "gen_ai.tool.call.id": job.tool_call_id or job.call_id,
        "gen_ai.tool.type": "function",
        "gen_ai.conversation.id": job.session,
        "baton.task_id": job.task_id,
        "baton.tenant": job.tenant,
        "baton.step": job.step,
        "baton.attempt": job.attempt,
        "baton.worker": worker,
    }
    return tracing.span(f"execute_tool {job.tool}", attributes=attrs, layer="tool")


def finished(result: ToolResult) -> None:
    """The call's outcome on its span: a tool's error is the agent's to read,
    and the span's error (layer ``tool``)."""
    attrs = {"baton.outcome": result.outcome, "baton.cpu_seconds": result.cpu_seconds,
             "baton.reused": result.reused, "baton.size_bytes": result.size}  # fmt: skip
    err = result.error
    tracing.set_attributes(
        attrs, (str(err.code), err.message, str(err.layer)) if err is not None else None
    )
