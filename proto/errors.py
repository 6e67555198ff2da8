"""Error codes of the v1 contract and the layer each belongs to.

A ``failed`` event carries ``error = {code, message, layer}``. The code is
stable API; the message is for humans.
"""

from __future__ import annotations

import enum


class Layer(enum.StrEnum):
    ORCHESTRATION = "orchestration"
    INFERENCE = "inference"
    CONTEXT = "context"
    TOOL = "tool"


class ErrorCode(enum.StrEnum):
    # A submitted task refused (orchestration layer).
    BAD_ENCODING = "bad_encoding"  # body is not MessagePack / not a map
    TOO_DEEP = "too_deep"  # arrays/maps nested deeper than proto.nesting.MAX_DEPTH
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"  # wrong type or a bad id
    UNKNOWN_WORKFLOW = "unknown_workflow"
    INPUT_TOO_LARGE = "input_too_large"
    UNKNOWN_TENANT = "unknown_tenant"  # no such tenant on this bus (HTTP API)
    TENANT_SUSPENDED = "tenant_suspended"  # the operator suspended the tenant: no new tasks
    DUPLICATE_TASK = "duplicate_task"
    RATE_LIMITED = "rate_limited"  # over a tenant limit; error.retry_after says when to retry
    BUDGET_EXCEEDED = "budget_exceeded"
    CANCELLED = "cancelled"
    STEP_TIMEOUT = "step_timeout"
    ERASED = "erased"  # the task's data was erased with its session or tenant
    INTERNAL = "internal"
    # HTTP front doors (orchestration layer): the same error body as the bus.
    UNAUTHORIZED = "unauthorized"  # no or an unknown API key
    UNKNOWN_TASK = "unknown_task"  # no such task for this tenant
    UNAVAILABLE = "unavailable"  # the service is starting or stopping
    NOT_WAITING = "not_waiting"  # an answer for a task that waits for no (such) input
    # Inference layer.
    PROMPT_TOO_LONG = "prompt_too_long"
    ENGINE_FAILURE = "engine_failure"
    # Context layer.
    BAD_REF = "bad_ref"  # forged, altered or malformed pointer
    FORBIDDEN = "forbidden"  # another tenant's data
    UNKNOWN_SESSION = "unknown_session"
    MESSAGE_TOO_LARGE = "message_too_large"
    BUDGET_TOO_SMALL = "budget_too_small"
    BAD_REQUEST = "bad_request"
    CONTEXT_UNAVAILABLE = "context_unavailable"
    ATTACHMENT_TOO_LARGE = "attachment_too_large"
    UNKNOWN_ATTACHMENT = "unknown_attachment"
    CONFLICT = "conflict"  # e.g. a fork onto a session that already exists
    # Tool layer: a tool call's error is shown to the agent; the run goes on.
    UNKNOWN_TOOL = "unknown_tool"
    BAD_TOOL_ARGUMENTS = "bad_tool_arguments"  # not JSON, or not the tool's schema
    TOOL_FAILED = "tool_failed"  # the tool ran and reported an error
    TOOL_TIMEOUT = "tool_timeout"
    TOOL_OUTPUT_TOO_LARGE = "tool_output_too_large"


LAYER_OF: dict[ErrorCode, Layer] = {
    **{
        c: Layer.ORCHESTRATION
        for c in (
            ErrorCode.BAD_ENCODING,
            ErrorCode.TOO_DEEP,
            ErrorCode.MISSING_FIELD,
            ErrorCode.INVALID_FIELD,
            ErrorCode.UNKNOWN_WORKFLOW,
            ErrorCode.INPUT_TOO_LARGE,
            ErrorCode.UNKNOWN_TENANT,
            ErrorCode.TENANT_SUSPENDED,
            ErrorCode.DUPLICATE_TASK,
            ErrorCode.RATE_LIMITED,
            ErrorCode.BUDGET_EXCEEDED,
            ErrorCode.CANCELLED,
            ErrorCode.STEP_TIMEOUT,
            ErrorCode.ERASED,
            ErrorCode.INTERNAL,
            ErrorCode.UNAUTHORIZED,
            ErrorCode.UNKNOWN_TASK,
            ErrorCode.UNAVAILABLE,
            ErrorCode.NOT_WAITING,
        )
    },
    ErrorCode.PROMPT_TOO_LONG: Layer.INFERENCE,
    ErrorCode.ENGINE_FAILURE: Layer.INFERENCE,
    **{
        c: Layer.CONTEXT
        for c in (
            ErrorCode.BAD_REF,
            ErrorCode.FORBIDDEN,
            ErrorCode.UNKNOWN_SESSION,
            ErrorCode.MESSAGE_TOO_LARGE,
            ErrorCode.BUDGET_TOO_SMALL,
            ErrorCode.BAD_REQUEST,
            ErrorCode.CONTEXT_UNAVAILABLE,
            ErrorCode.ATTACHMENT_TOO_LARGE,
            ErrorCode.UNKNOWN_ATTACHMENT,
            ErrorCode.CONFLICT,
        )
    },
    **{
        c: Layer.TOOL
        for c in (
            ErrorCode.UNKNOWN_TOOL,
            ErrorCode.BAD_TOOL_ARGUMENTS,
            ErrorCode.TOOL_FAILED,
            ErrorCode.TOOL_TIMEOUT,
            ErrorCode.TOOL_OUTPUT_TOO_LARGE,
        )
    },
}
