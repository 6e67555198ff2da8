"""Request and response bodies of Baton's own HTTP API (``/v1/tasks``,
``/v1/workflows``), so the OpenAPI document describes every 2xx body."""

from __future__ import annotations

from typing import Any, Self

import msgspec
from pydantic import BaseModel, Field

from proto import subjects
from proto.jsonvalue import json_safe

from .state import RunState


class BudgetIn(BaseModel):
    max_tokens: int | None = None
    max_usd: float | None = None


class TaskIn(BaseModel):
    workflow: str = "chat"
    input: str
    tenant: str | None = None
    task_id: str | None = None
    session: str | None = None
    budget: BudgetIn | None = None
    max_tokens: int | None = Field(default=None, description="Cap on each step's answer.")
    temperature: float | None = Field(default=None, description="Overrides the agents'.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gpu_seconds: float = 0.0
    tool_cpu_seconds: float = 0.0


class ErrorInfo(BaseModel):
    code: str
    message: str
    layer: str


class TaskAccepted(BaseModel):
    task_id: str
    tenant: str
    session: str
    workflow: str
    duplicate: bool = Field(description="True when this task id was already submitted.")
    events_subject: str
    tokens_subject: str

    @classmethod
    def of(
        cls, tenant: str, task_id: str, session: str, workflow: str, duplicate: bool, **more: Any
    ) -> Self:
        """The answer for a task, with the subjects its events and tokens go to."""
        events, tokens = subjects.event(tenant, task_id), subjects.tokens(tenant, task_id)
        ids = {"task_id": task_id, "tenant": tenant, "session": session, "workflow": workflow}
        return cls(**ids, duplicate=duplicate, events_subject=events, tokens_subject=tokens, **more)


class CallOut(BaseModel):
    tool: str
    arguments: str
    call_id: str
    status: str = Field(default="dispatched", description="dispatched | done")
    dispatched_at: float = 0.0
    outcome: str = Field(default="", description="ok, or the tool error's code")
    preview: str = ""
    cpu_seconds: float = 0.0
    seconds: float = 0.0


class ContextAt(BaseModel):
    session: str
    version: int = Field(description="Messages of the session the step started from.")


class StepOut(BaseModel):
    agent: str
    pool: str
    session: str
    status: str = Field(
        default="dispatched", description="dispatched | tools | waiting_input | done | failed"
    )
    max_tokens: int = 0
    context_budget: int = 0
    attempt: int = 1
    dispatched_at: float = 0.0
    finished_at: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    output: str = ""
    worker: str = ""
    cached_tokens: int = 0
    turn: int = Field(default=0, description="Model turns that called tools so far.")
    calls: dict[str, CallOut] = Field(default_factory=dict, description="Tool calls: t<turn>c<i>.")
    deadline: float = Field(default=0.0, description="When the current wait times out.")
    input: bool = Field(default=False, description="An input step (waits for a human).")
    answered_by: str = Field(default="", description="An input step's answer: human | default.")
    context: ContextAt | None = Field(
        default=None, description="The context the step started from (where a fork from it starts)."
    )
    carried: bool = Field(default=False, description="A forked run's step carried over from the "
                          "run it was forked from (not run again).")  # fmt: skip


class TaskSummary(BaseModel):
    task_id: str
    tenant: str
    session: str
    workflow: str
    status: str = Field(default="running", description="running | completed | failed | cancelled")
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    error: ErrorInfo | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    forked_from: str = Field(default="", description="A fork: the task it was forked from.")
    forked_at: str = Field(default="", description="A fork: the step it ran again.")


class TaskStatus(TaskSummary):
    prewarm_cost_usd: float = Field(
        default=0.0,
        description="Of cost_usd: the pre-warms run for this task (prefills ahead of a step, "
        "docs/scheduling.md), in no step's cost. The steps' costs plus this make cost_usd.",
    )
    output: str = ""
    budget: BudgetIn | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, StepOut] = Field(default_factory=dict)
    events: list[dict[str, Any]] = Field(default_factory=list)


class TaskPage(BaseModel):
    tasks: list[TaskSummary]
    next_cursor: str | None = Field(description="`cursor` of the next page; null at the end.")


class ForkIn(BaseModel):
    step: str = Field(description="A finished step of the task (e.g. `r1.validate`).")
    input: str | None = Field(default=None, description="The edit: from the first step it "
                              "replaces the task's input, from a later one the step reads it "
                              "last. Omitted: the step runs again on what it read.")  # fmt: skip
    task_id: str | None = Field(default=None, description="The new task's id (default: a new "
                                "one); the same id again is the same fork.")  # fmt: skip


class ForkAccepted(TaskAccepted):
    forked_from: str
    step: str
    carried: list[str] = Field(description="The steps carried over, not run again.")


class Cancelled(BaseModel):
    task_id: str
    status: str


class InputIn(BaseModel):
    answer: str
    step: str | None = Field(default=None, description="The waiting step (default: the one "
                             "waiting); naming it makes a repeated answer harmless.")  # fmt: skip


class InputAccepted(BaseModel):
    task_id: str
    step: str = Field(description="The input step the answer is for.")
    subject: str = Field(description="Where it was published (the run takes it from there).")


class AgentOut(BaseModel):
    role: str
    pool: str
    max_tokens: int


class WorkflowOut(BaseModel):
    name: str
    description: str
    rounds: int
    output: str | None = None
    agents: dict[str, AgentOut]
    steps: list[dict[str, Any]]


class WorkflowList(BaseModel):
    workflows: list[WorkflowOut]


def run_doc(run: RunState) -> dict[str, Any]:
    """A run as plain data, without the signed refs (they are for services).
    Metadata that JSON cannot hold (stored before validation refused it) is
    shown as a placeholder: one such task never fails a listing."""
    doc: dict[str, Any] = msgspec.to_builtins(msgspec.structs.replace(run, metadata={}))
    doc["metadata"] = json_safe(run.metadata)
    for st in doc.get("steps", {}).values():
        st.pop("ref", None)
        origin = st.pop("origin", None)  # a signed ref: only where it points is shown
        if origin is not None:
            st["context"] = {"session": origin[1], "version": origin[2]}
        for call in st.get("calls", {}).values():
            call.pop("ref", None)
    doc.pop("task_seq", None)
    doc["prewarm_cost_usd"] = sum(doc.pop("warms", {}).values())  # by warm job id: internal
    return doc


class DocumentIn(BaseModel):
    text: str
    title: str = ""
    doc_id: str | None = Field(default=None, description="Default: a new id.")
    tenant: str | None = Field(default=None, description="Without API keys: the tenant.")
    metadata: dict[str, str] = Field(default_factory=dict)


class DocumentStored(BaseModel):
    doc_id: str
    tenant: str
    seq: int = Field(description="The document's sequence in stream BATON_DOCUMENTS.")
