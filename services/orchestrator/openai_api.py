"""The OpenAI-compatible face of the orchestrator: ``GET /v1/models`` and
``POST /v1/chat/completions`` where ``model`` names a workflow. Sessions,
the parameters, streaming chunks and the ``baton`` extension: docs/openai.md."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from baton import context_client as context
from baton import tracing
from baton.http_errors import ERROR_RESPONSES, STATUS_OF, ApiError, error_body, require_ids
from proto import keys
from proto.context_api import APPEND
from proto.errors import ErrorCode
from proto.messages import ChatMessage, Completed, ContextAppend, Failed, Step

from .follow import follow_task
from .settings import OrchestratorSettings
from .workflows import WorkflowSpec
from .workflows.graph import parse_step_id

ROLES = ("system", "user", "assistant", "developer", "tool")


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: int = 1
    user: str | None = None
    baton_session: str | None = None
    session: str | None = None
    tenant: str | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str = "stop"
    logprobs: None = None


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The non-streaming answer; with ``stream: true`` the body is instead an
    event stream of ``chat.completion.chunk`` objects ending ``[DONE]``."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut
    baton: dict[str, Any] = Field(description="Extension: task_id, session, tenant, cost_usd")


class ModelOut(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "baton"
    description: str = ""


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelOut]


def output_step(spec: WorkflowSpec) -> str:
    """The step whose answer is the task's output (the last one by default)."""
    return spec.output or spec.steps[-1].id


def is_output(step_id: str, spec: WorkflowSpec) -> bool:
    try:
        return parse_step_id(step_id)[1] == output_step(spec)
    except (ValueError, IndexError):
        return False


def _usage(ev: Completed) -> dict[str, int]:
    p, c = ev.usage.prompt_tokens, ev.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def failed_error(ev: Failed) -> ApiError:
    code = ErrorCode(ev.error.code) if ev.error.code in ErrorCode.__members__.values() else None
    status = STATUS_OF.get(code, 500) if code is not None else 500
    return ApiError(code or ErrorCode.INTERNAL, ev.error.message, status=status)


def add_routes(
    app: FastAPI, settings: OrchestratorSettings, svc: Any, tenant_of: Callable[..., str | None]
) -> None:
    def models_list() -> list[ModelOut]:
        return [
            ModelOut(id=s.name, description=s.description)
            for s in sorted(svc.workflows.values(), key=lambda s: s.name)
        ]

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, tags=["openai"])
    def models(_: str | None = Depends(tenant_of)) -> ModelList:
        """The workflows, as OpenAI models."""
        return ModelList(data=models_list())

    async def seed(tenant: str, session: str, task_id: str, history: list[MessageIn]) -> None:
        """Store the messages before the last one as the new session's start."""
        bus = svc.bus
        messages = [ChatMessage(role=m.role if m.role != "developer" else "system",
                                content=m.text(), name=m.name) for m in history]  # fmt: skip
        append = ContextAppend(
            tenant=tenant, session=session, msg_id=keys.seed(task_id), messages=messages
        )
        reply = await context.ask(bus, APPEND, append, task_id=task_id)
        if reply.error is not None:
            raise ApiError(ErrorCode(reply.error.code), reply.error.message)

    answers: dict[int | str, dict[str, Any]] = {
        200: {"model": ChatCompletion, "description": "A chat completion, or (stream: true) "
              "server-sent chat.completion.chunk objects",
              "content": {"text/event-stream": {}}},
        **ERROR_RESPONSES,
    }  # fmt: skip

    @app.post("/v1/chat/completions", responses=answers, tags=["openai"])
    async def chat_completions(
        body: ChatRequest,
        request: Request,
        scope: str | None = Depends(tenant_of),
    ) -> Any:
        """Run the workflow ``model`` on the conversation; OpenAI's format."""
        tenant = scope or body.tenant or settings.openai_tenant
        spec = svc.workflows.get(body.model)
        if spec is None:
            names = ", ".join(m.id for m in models_list())
            unknown = f"The model {body.model!r} does not exist. Models: {names}"
            raise ApiError(ErrorCode.UNKNOWN_WORKFLOW, unknown, param="model")
        if body.n != 1:
            raise ApiError(ErrorCode.INVALID_FIELD, "only n=1 is supported", param="n")
        last = body.messages[-1]
        if last.role != "user" or not last.text():
            raise ApiError(ErrorCode.INVALID_FIELD, "the last message must be a user message "
                           "with text", param="messages")  # fmt: skip
        for m in body.messages:
            if m.role not in ROLES:
                raise ApiError(
                    ErrorCode.INVALID_FIELD, f"unknown role {m.role!r}", param="messages"
                )
        task_id = uuid.uuid4().hex
        session = body.baton_session or body.session
        raw: dict[str, Any] = {"tenant": tenant, "input": last.text(), "task_id": task_id,
                               "metadata": {"api": "openai"}}  # fmt: skip
        if session is not None:
            raw["session"] = session
        if (cap := body.max_completion_tokens or body.max_tokens) is not None:
            raw["max_tokens"] = cap
        if body.temperature is not None:
            raw["temperature"] = body.temperature
        require_ids(tenant=tenant, session=session)
        with tracing.server_span("POST", "/v1/chat/completions", request.headers):
            if session is None and len(body.messages) > 1:
                await seed(tenant, task_id, task_id, body.messages[:-1])
            task, _ = await svc.submit(raw, body.model)
        assert task.session is not None
        ext = {"task_id": task_id, "session": task.session, "tenant": tenant}
        created = int(time.time())
        head = {"id": f"chatcmpl-{task_id}", "created": created, "model": body.model}
        bus = svc.bus
        follow = follow_task(bus, tenant, task_id, timeout=settings.follow_timeout)
        if not body.stream:
            async for item in follow:
                if isinstance(item.event, Failed):
                    raise failed_error(item.event)
                if isinstance(item.event, Completed):
                    ev = item.event
                    return {**head, "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": ev.output}}],
                            "usage": _usage(ev),
                            "baton": {**ext, "cost_usd": ev.cost_usd}}  # fmt: skip
            raise ApiError(ErrorCode.INTERNAL, "the task ended without a terminal event")
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            doc = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                "logprobs": None}], **extra}  # fmt: skip
            return json.dumps(doc)

        def progress(**baton: Any) -> ServerSentEvent:
            return ServerSentEvent(data=chunk({}, baton=baton))

        async def stream() -> AsyncIterator[ServerSentEvent]:
            yield ServerSentEvent(data=chunk({"role": "assistant", "content": ""}, baton=ext))
            async for item in follow:
                d, ev = item.delta, item.event
                if d is not None and is_output(d.step, spec):
                    if d.text:
                        yield ServerSentEvent(data=chunk({"content": d.text}))
                elif d is not None:
                    yield progress(type="token", step=d.step, agent=d.agent, text=d.text)
                elif isinstance(ev, Step):
                    yield progress(type="step", step=ev.step, agent=ev.agent, status=ev.status)
                elif isinstance(ev, Failed):
                    err = failed_error(ev)
                    body = error_body(err.status_code, err.code, err.message)
                    yield ServerSentEvent(data=json.dumps(body))
                    return
                elif isinstance(ev, Completed):
                    done = {**ext, "cost_usd": ev.cost_usd}
                    yield ServerSentEvent(data=chunk({}, "stop", baton=done))
                    if include_usage:
                        usage = {**head, "object": "chat.completion.chunk", "choices": [],
                                 "usage": _usage(ev)}  # fmt: skip
                        yield ServerSentEvent(data=json.dumps(usage))
                    yield ServerSentEvent(data="[DONE]")
                    return

        return EventSourceResponse(stream(), ping=settings.sse_ping)
