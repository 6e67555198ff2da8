"""A submitted task: decode, validate, or explain the rejection.

Pure: takes the raw body and the subject's tenant and workflow tokens, returns
a ``TaskSubmit`` or raises ``TaskRejected`` carrying what could still be read
(task_id, session) so a ``failed`` event can be addressed. The tenant is the
subject's — set by the server from the publisher's credentials — never the
body's: a body naming another tenant is ``forbidden``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from proto.codec import TooDeep, convert, decode_any
from proto.errors import ErrorCode
from proto.ids import is_valid_id
from proto.jsonvalue import json_problem
from proto.messages import Budget, TaskSubmit
from proto.nesting import NestingError, scan
from proto.sizes import MAX_INPUT_BYTES, MAX_METADATA_KEYS, MAX_OUTPUT_TOKENS, MAX_TASK_BYTES

_MISSING = re.compile(r"missing required field `(\w+)`")


class TaskRejected(Exception):
    """A task that cannot be accepted. ``tenant``/``task_id`` are set when they
    could be read from the body (or the message id) and are valid ids."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        tenant: str | None = None,
        task_id: str | None = None,
        session: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.tenant = tenant
        self.task_id = task_id
        self.session = session

    retry_after: float | None = None  # RateLimited: seconds until a retry may pass

    @property
    def addressable(self) -> bool:
        """True when a ``failed`` event can be published for it."""
        return self.tenant is not None and self.task_id is not None


class RateLimited(TaskRejected):
    """A valid task over its tenant's limits (``rate_limited``): the same
    request may pass after ``retry_after`` seconds (with a new task id on the
    bus, whose de-duplication would drop the same id)."""

    def __init__(
        self, message: str, *, retry_after: float, tenant: str, task_id: str, session: str
    ) -> None:
        super().__init__(
            ErrorCode.RATE_LIMITED, message, tenant=tenant, task_id=task_id, session=session
        )
        self.retry_after = retry_after


def _readable_ids(raw: Any, msg_id: str | None) -> dict[str, str | None]:
    """Best-effort task_id/session from a body that may be invalid (the
    tenant is not read from it: the caller's, checked already, answers)."""
    body = raw if isinstance(raw, dict) else {}
    task_id = body.get("task_id")
    if task_id is None:  # absent or null: the header's, then the fallback
        task_id = msg_id
    session = body.get("session")
    return {
        "task_id": task_id if is_valid_id(task_id) else None,
        "session": session if is_valid_id(session) else None,
    }


def budget_problem(budget: Budget) -> str | None:
    """Why ``budget`` cannot be enforced, or None. A limit must be a finite,
    positive number: ``NaN`` compares false with everything, so a run under
    ``max_usd: NaN`` would never stop; ``inf`` is "unlimited" spelled so that
    arithmetic on it goes wrong (leave the limit unset instead)."""
    if budget.max_tokens is not None and budget.max_tokens <= 0:
        return f"budget.max_tokens must be positive, got {budget.max_tokens}"
    usd = budget.max_usd
    if usd is not None and not (math.isfinite(usd) and usd > 0):
        return f"budget.max_usd must be a finite positive number, got {usd!r}"
    return None


def parse_task(
    body: bytes,
    *,
    tenant: str | None,
    workflow: str,
    known_workflows: frozenset[str] | set[str],
    msg_id: str | None = None,
    fallback_task_id: str | None = None,
) -> TaskSubmit:
    """Validate a task body published on ``baton.tasks.<workflow>``.

    Args:
        body: the raw MessagePack body.
        tenant: the tenant the body must name: the subject's tenant token
            (the authenticated one) on the bus; the HTTP API passes the
            body's own ``tenant``, which it set from the API key when keys
            are in use. Checked as an id first; None: the body's is taken.
        workflow: the subject's workflow token.
        known_workflows: workflows this orchestrator runs.
        msg_id: the ``Nats-Msg-Id`` header, used as task id when the body has none.
        fallback_task_id: a deterministic id (e.g. from the stream sequence)
            when neither the body nor the header names one.

    Returns:
        The task, with ``task_id`` and ``session`` always set.

    Raises:
        TaskRejected: with a specific ``ErrorCode``.
    """
    if tenant is not None and not is_valid_id(tenant):
        raise TaskRejected(ErrorCode.INVALID_FIELD, f"invalid tenant token {tenant!r}")
    ids: dict[str, str | None] = {"tenant": tenant, "task_id": None, "session": None}
    try:
        raw = decode_any(body)
    except TooDeep as exc:
        ids.update(_readable_ids(exc.top, msg_id if is_valid_id(msg_id) else None))
        if ids["task_id"] is None and exc.top.get("task_id") is None:
            ids["task_id"] = fallback_task_id
        raise TaskRejected(ErrorCode.TOO_DEEP, str(exc), **ids) from exc
    except (msgspec.DecodeError, ValueError) as exc:
        # Still answerable when the ids themselves are readable (e.g. only
        # another field holds invalid UTF-8): the scan reads them raw.
        try:
            top: dict[str, str] = scan(body).top
        except NestingError:
            top = {}
        ids.update(_readable_ids(top, msg_id if is_valid_id(msg_id) else None))
        raise TaskRejected(
            ErrorCode.BAD_ENCODING, f"body is not MessagePack: {exc}", **ids
        ) from exc
    ids.update(_readable_ids(raw, msg_id if is_valid_id(msg_id) else None))
    if ids["task_id"] is None and isinstance(raw, dict) and raw.get("task_id") is None:
        ids["task_id"] = fallback_task_id
    if not isinstance(raw, dict):
        raise TaskRejected(
            ErrorCode.BAD_ENCODING, f"body must be a map, got {type(raw).__name__}", **ids
        )
    if len(body) > MAX_TASK_BYTES:
        raise TaskRejected(
            ErrorCode.INPUT_TOO_LARGE,
            f"task is {len(body)} bytes, the limit is {MAX_TASK_BYTES}",
            **ids,
        )
    try:
        task = convert(raw, TaskSubmit)  # the body is parsed once, above
    except msgspec.ValidationError as exc:
        text = str(exc)
        missing = _MISSING.search(text)
        code = ErrorCode.MISSING_FIELD if missing else ErrorCode.INVALID_FIELD
        raise TaskRejected(code, text, **ids) from exc
    if tenant is not None and task.tenant != tenant:
        raise TaskRejected(
            ErrorCode.FORBIDDEN,
            f"the body names tenant {task.tenant!r} but the credentials are tenant {tenant!r}",
            **ids,
        )
    if workflow not in known_workflows:
        raise TaskRejected(
            ErrorCode.UNKNOWN_WORKFLOW,
            f"unknown workflow {workflow!r}; known: {', '.join(sorted(known_workflows))}",
            **ids,
        )
    size = len(task.input.encode())
    if size > MAX_INPUT_BYTES:
        raise TaskRejected(
            ErrorCode.INPUT_TOO_LARGE,
            f"input is {size} bytes, the limit is {MAX_INPUT_BYTES}",
            **ids,
        )
    if len(task.metadata) > MAX_METADATA_KEYS:
        raise TaskRejected(
            ErrorCode.INVALID_FIELD, f"metadata has more than {MAX_METADATA_KEYS} keys", **ids
        )
    if (why := json_problem(task.metadata)) is not None:
        raise TaskRejected(ErrorCode.INVALID_FIELD, why, **ids)
    if task.budget is not None and (why := budget_problem(task.budget)) is not None:
        raise TaskRejected(ErrorCode.INVALID_FIELD, why, **ids)
    if task.max_tokens is not None and not 1 <= task.max_tokens <= MAX_OUTPUT_TOKENS:
        raise TaskRejected(
            ErrorCode.INVALID_FIELD, f"max_tokens must be 1..{MAX_OUTPUT_TOKENS}", **ids
        )
    if task.temperature is not None and not 0.0 <= task.temperature <= 2.0:
        raise TaskRejected(ErrorCode.INVALID_FIELD, "temperature must be 0..2", **ids)
    task_id = task.task_id or ids["task_id"]
    if task_id is None:
        raise TaskRejected(ErrorCode.MISSING_FIELD, "no task_id in body, header or fallback")
    task.task_id = task_id
    task.session = task.session or task_id
    return task
