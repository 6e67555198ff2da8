"""A task's trace, as the orchestrator sees it: its spans (``invoke_workflow``,
``invoke_agent`` per step, ``process baton.<stream>`` per message) are
emitted once over, by whichever replica stores the change that ends them,
with ids derived from the task (docs/tracing.md, "The shape of a task's trace")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import structlog

from baton import tracing
from baton.bus import Nak
from baton.tracing import Recorded, SpanContext, SpanKind

from .state import RunState, StepState

CLOSED = frozenset({"done", "failed"})


def task_root(tenant: str, task_id: str, caller: SpanContext | None) -> SpanContext | None:
    """The task's ``invoke_workflow`` span context. ``caller``: the context
    the task arrived in, or any later message of the task carries (it holds
    the task's trace id and sampling decision). None when tracing is off
    and no caller sent a context: then nothing is propagated at all."""
    if caller is None and not tracing.enabled():
        return None
    trace_id = (
        caller.trace_id if caller is not None else tracing.derived_id(tenant, task_id, bits=128)
    )
    sampled = tracing.root_sampled(trace_id, caller, "invoke_workflow")
    return tracing.span_context(trace_id, tracing.derived_id(tenant, task_id), sampled=sampled)


def run_root(run: RunState) -> SpanContext | None:
    """``task_root`` of a stored run."""
    return task_root(run.tenant, run.task_id, tracing.remote(run.trace))


def step_context(root: SpanContext, tenant: str, task_id: str, step: str) -> SpanContext:
    """The ``invoke_agent`` span context of one step of the task."""
    span_id = tracing.derived_id(tenant, task_id, step)
    return tracing.span_context(root.trace_id, span_id, sampled=root.trace_flags.sampled)


@contextlib.contextmanager
def within_step(run: RunState, step: str) -> Iterator[None]:
    """Publish a step's job or tool call in the step's span context."""
    root = run_root(run)
    sc = step_context(root, run.tenant, run.task_id, step) if root is not None else None
    with tracing.within(sc):
        yield


@contextlib.contextmanager
def hop(stream: str, tenant: str, task_id: str) -> Iterator[None]:
    """A ``process <stream>`` span around the orchestrator's handling of one
    message of a task: a child of the task, linked to the message's sender."""
    if not tracing.enabled():
        yield
        return
    caller = tracing.current()
    root = task_root(tenant, task_id, caller)
    # Few attributes: the trace and its root say which task this is.
    attrs = {"messaging.system": "nats", "messaging.operation.name": "process"}
    links = [caller] if caller is not None and caller != root else []
    with (
        tracing.span(f"process {stream}", kind=SpanKind.CONSUMER, parent=root, links=links,
                     attributes=attrs, layer="orchestration", benign=(Nak,)),
        # A task that came in no trace has one now: its log lines say which.
        structlog.contextvars.bound_contextvars(trace_id=tracing.trace_id_of(root)),
    ):  # fmt: skip
        yield


def closed(old: RunState | None, new: RunState, now: float) -> list[Recorded]:
    """The spans a stored change ends: each step it finished (or stopped,
    when the run ended), and the task itself when it reached a terminal state.
    (Tracing off, it is not asked: see the conductor.)"""
    root = run_root(new)
    if root is None:
        return []
    before = old.steps if old is not None else {}
    was_over = old is not None and old.terminal
    out: list[Recorded] = []
    for step_id, st in new.steps.items():
        if st.carried:  # a fork's step that ran (and was traced) in the task it came from
            continue
        prev = before.get(step_id)
        if (st.status in CLOSED or new.terminal) and not (
            prev is not None and (prev.status in CLOSED or was_over)
        ):
            out.append(_step(new, step_id, st, root, now))
    if new.terminal and not was_over:
        out.append(_workflow(new, root, now))
    return out


def _ids(run: RunState) -> dict[str, Any]:
    return {"baton.task_id": run.task_id, "baton.tenant": run.tenant,
            "baton.workflow": run.workflow}  # fmt: skip


def _error(run: RunState) -> tuple[str, str, str] | None:
    if run.error is None:
        return None
    return str(run.error.code), run.error.message, str(run.error.layer)


def _step(run: RunState, step_id: str, st: StepState, root: SpanContext, now: float) -> Recorded:
    end = st.finished_at if st.status == "done" and st.finished_at else now
    attrs: dict[str, Any] = {**_ids(run), "baton.step": step_id, "baton.attempt": st.attempt,
                             "gen_ai.conversation.id": st.session}  # fmt: skip
    if st.input:
        name = f"input {step_id}"
        attrs["baton.answered_by"] = st.answered_by
    else:
        name = f"invoke_agent {st.agent}"
        attrs |= {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": st.agent,
            "gen_ai.usage.input_tokens": st.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": st.usage.completion_tokens,
            "baton.pool": st.pool,
            "baton.gpu_seconds": st.usage.gpu_seconds,
            "baton.cost_usd": st.cost_usd,
        }
        if st.max_tokens:
            attrs["gen_ai.request.max_tokens"] = st.max_tokens
        if st.worker:
            attrs["baton.worker"] = st.worker
        if st.calls:
            attrs["baton.tool_calls"] = len(st.calls)
    return Recorded(
        name=name,
        context=step_context(root, run.tenant, run.task_id, step_id),
        parent=root,
        start=(st.timing.queued_at if st.timing else 0.0) or st.dispatched_at or run.created_at,
        end=end,
        attributes=attrs,
        error=None if st.status == "done" else _error(run),
    )


def _workflow(run: RunState, root: SpanContext, now: float) -> Recorded:
    attrs: dict[str, Any] = {
        **_ids(run),
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.workflow.name": run.workflow,
        "gen_ai.conversation.id": run.session,
        "gen_ai.usage.input_tokens": run.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": run.usage.completion_tokens,
        "baton.status": run.status,
        "baton.steps": len(run.steps),
        "baton.gpu_seconds": run.usage.gpu_seconds,
        "baton.cost_usd": run.cost_usd,
    }
    return Recorded(
        name=f"invoke_workflow {run.workflow}",
        context=root,
        parent=tracing.remote(run.trace),
        start=run.created_at,
        end=run.updated_at or now,
        attributes=attrs,
        error=_error(run),
    )
