"""The orchestrator's HTTP API (FastAPI): Baton's own ``/v1/tasks`` and
``/v1/workflows``, plus the OpenAI-compatible routes (``openai_api.py``).

Tenancy: when API keys are configured (``BATON_API_KEYS``), the bearer key
decides the tenant and a tenant only sees its own tasks. Without keys
(development), the tenant comes from the request. Every error has one body
(``baton/http_errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from fastapi import Depends, FastAPI, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from baton import tracing
from baton.bus import Bus
from baton.documents import DocumentTooLarge, put_document
from baton.http_errors import ERROR_RESPONSES, ApiError, require_ids
from baton.service import Health, caller_scope, health_app
from baton.sessions import SessionKeys
from proto import codec, keys, streams, subjects
from proto.errors import ErrorCode
from proto.messages import DocumentPut, InputAnswer, TaskSubmit
from proto.sizes import MAX_INPUT_BYTES
from proto.submission import TaskRejected, parse_task

from .api_models import (
    Cancelled,
    DocumentIn,
    DocumentStored,
    ForkAccepted,
    ForkIn,
    InputAccepted,
    InputIn,
    TaskAccepted,
    TaskIn,
    TaskPage,
    TaskStatus,
    TaskSummary,
    WorkflowList,
    WorkflowOut,
    run_doc,
)
from .conductor import Conductor
from .follow import as_dict, follow_task, replay_events
from .intake import TenantRoom
from .listing import BadCursor, page_runs
from .runs import RunStore
from .settings import OrchestratorSettings
from .state import ERASED, RunState
from .transitions import NewFork, answer_refusal, fork_refusal, waiting_step
from .workflows import WorkflowSpec

_NO_TENANT = "tenant is required (query parameter or API key)"
_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "An event stream"}
}
# Route options shared by the routes of one kind (each also answers the one error body).
_SSE: dict[str, Any] = {
    "response_class": EventSourceResponse,
    "responses": {**_SSE_DOC, **ERROR_RESPONSES},
}
_ACCEPTED: dict[str, Any] = {"status_code": 202, "responses": ERROR_RESPONSES}


@dataclass(frozen=True)
class Services:
    """What the API uses, built once the NATS side is: ``tenants`` is the
    live set of tenants served (it grows and shrinks with the registry)."""

    bus: Bus
    runs: RunStore
    conductor: Conductor
    room: TenantRoom
    workflows: dict[str, WorkflowSpec]
    tenants: AbstractSet[str]

    async def _within_limits(self, bus: Bus, tenant: str) -> None:
        """429 (with ``Retry-After``) for a task its tenant's limits would
        refuse now, instead of publishing it to fail at intake."""
        limiter, in_flight = self.room.limiter, 0
        if limiter.of(tenant).max_in_flight:  # running here + waiting in its stream
            in_flight = self.room.gate.active(tenant)
            with contextlib.suppress(Exception):
                in_flight += await bus.waiting(streams.task_consumer(tenant))
        refusal = limiter.peek(tenant, in_flight=in_flight, now=time.time())
        if refusal is not None:
            retry = str(math.ceil(refusal.retry_after))
            raise ApiError(ErrorCode.RATE_LIMITED, refusal.message, headers={"Retry-After": retry})

    async def submit(self, raw: dict[str, Any], workflow: str) -> tuple[TaskSubmit, bool]:
        """Validate and publish a task body; returns it and ``duplicate``."""
        bus = self.bus
        raw.setdefault("task_id", uuid.uuid4().hex)
        try:
            data = codec.encode(raw)
        except (OverflowError, TypeError, ValueError) as exc:  # e.g. an int over 64 bits
            raise ApiError(ErrorCode.INVALID_FIELD, f"not encodable: {exc}") from exc
        try:
            task = parse_task(data, tenant=raw.get("tenant"), workflow=workflow,
                              known_workflows=set(self.workflows))  # fmt: skip
        except TaskRejected as r:
            raise ApiError(r.code, r.message) from r
        assert task.task_id is not None
        if task.tenant not in self.tenants:
            raise ApiError(ErrorCode.UNKNOWN_TENANT, f"no tenant {task.tenant!r} on this bus")
        if task.tenant in self.room.suspended:
            raise ApiError(ErrorCode.TENANT_SUSPENDED, f"tenant {task.tenant!r} is suspended")
        await self._within_limits(bus, task.tenant)
        ack = await bus.publish(subjects.tenant_task(task.tenant, workflow), data,
                                msg_id=task.task_id, task_id=task.task_id)  # fmt: skip
        return task, bool(ack.duplicate)


def last_event_seq(header: str | None) -> int:
    """The stream sequence after a ``Last-Event-ID`` (0 when absent)."""
    if header is None or header.strip() == "":
        return 0
    try:
        seq = int(header)
    except ValueError:
        raise ApiError(ErrorCode.INVALID_FIELD, "Last-Event-ID must be a sequence number",
                       param="Last-Event-ID") from None  # fmt: skip
    return max(0, seq) + 1


def _not_erased(task_id: str, run: RunState) -> RunState:
    """A tombstone is a 404 with code ``erased``: the task was erased with its session."""
    if run.status == ERASED:
        raise ApiError(ErrorCode.ERASED, f"task {task_id!r} was erased")
    return run


def build_app(settings: OrchestratorSettings, health: Health, svc: Services) -> FastAPI:
    app = health_app("Baton orchestrator", health)
    # The run console's browser sessions stand for the API keys that opened them.
    sessions = SessionKeys(settings.api_keys) if settings.api_keys else None
    # A suspended tenant's key is refused (403 tenant_suspended) on every route.
    key_scope = caller_scope(settings.api_keys, sessions, svc.room.suspended)

    def tenant_of(
        scope: str | None = Depends(key_scope),
        tenant: str | None = Query(default=None, description="Without API keys: the tenant."),
    ) -> str | None:
        """A scoped key decides the tenant; unrestricted callers name it."""
        return scope if scope is not None else tenant

    def owned(task_id: str, tenant: str | None) -> str:
        if tenant is None:
            raise ApiError(ErrorCode.MISSING_FIELD, _NO_TENANT, param="tenant")
        require_ids(tenant=tenant, task_id=task_id)
        return tenant

    async def known(task_id: str, tenant: str, *, grace: float = 0.0) -> Any:
        """The run, or 404. ``grace``: a task just submitted becomes a run
        once an orchestrator has taken it, so streams wait that long."""
        runs = svc.runs
        deadline = time.monotonic() + grace
        while (run := await runs.get(tenant, task_id)) is None:
            if time.monotonic() >= deadline:
                raise ApiError(ErrorCode.UNKNOWN_TASK, f"no task {task_id!r} for this tenant")
            await asyncio.sleep(0.05)
        return _not_erased(task_id, run)

    @app.post("/v1/tasks", response_model=TaskAccepted, **_ACCEPTED)
    async def submit(
        body: TaskIn, request: Request, tenant: str | None = Depends(tenant_of)
    ) -> TaskAccepted:
        """Submit a task; follow it on ``/v1/tasks/{id}/events`` (or the bus).
        A W3C ``traceparent`` header: the task continues that trace."""
        raw = body.model_dump(exclude_none=True, exclude={"workflow"})
        if tenant is not None:
            raw["tenant"] = tenant
        with tracing.server_span("POST", "/v1/tasks", request.headers):
            task, duplicate = await svc.submit(raw, body.workflow)
        assert task.task_id is not None and task.session is not None
        return TaskAccepted.of(task.tenant, task.task_id, task.session, body.workflow, duplicate)

    @app.get("/v1/tasks", response_model=TaskPage, responses=ERROR_RESPONSES)
    async def list_tasks(
        tenant: str | None = Depends(tenant_of),
        status: Literal["running", "completed", "failed", "cancelled"] | None = None,
        workflow: str | None = None,
        since: Annotated[datetime | None, Query(description="ISO 8601 or epoch seconds")] = None,
        limit: int = Query(default=50, ge=1, le=200),
        cursor: str | None = None,
    ) -> TaskPage:
        """A tenant's tasks, newest first, a page at a time; an operator's key
        (or no keys) naming no ``tenant``: every tenant's."""
        runs = svc.runs
        require_ids(tenant=tenant, workflow=workflow)
        tenants = [tenant] if tenant is not None else sorted(svc.tenants)
        listed = await asyncio.gather(*(runs.list(t) for t in tenants))
        live = [r for rs in listed for r in rs if r.status != ERASED]  # not tombstones
        try:
            page = page_runs(live, status=status, workflow=workflow,
                             since=since.timestamp() if since else None, limit=limit,
                             cursor=cursor)  # fmt: skip
        except BadCursor as exc:
            raise ApiError(ErrorCode.INVALID_FIELD, str(exc), param="cursor") from exc
        return TaskPage(
            tasks=[TaskSummary.model_validate(run_doc(r)) for r in page.runs],
            next_cursor=page.next_cursor,
        )

    @app.get("/v1/tasks/{task_id}", response_model=TaskStatus, responses=ERROR_RESPONSES)
    async def status(task_id: str, tenant: str | None = Depends(tenant_of)) -> TaskStatus:
        """A task's status, steps, events, output, usage and cost (its tenant only)."""
        bus = svc.bus
        tenant = owned(task_id, tenant)
        doc = run_doc(await known(task_id, tenant))
        doc["events"] = [as_dict(i) async for i in replay_events(bus, tenant, task_id)]
        return TaskStatus.model_validate(doc)

    def sse(items: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
        return EventSourceResponse(items, ping=settings.sse_ping)

    @app.get("/v1/tasks/{task_id}/events", **_SSE)
    async def events(
        task_id: str,
        tenant: str | None = Depends(tenant_of),
        last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
    ) -> EventSourceResponse:
        """Server-sent events: every event (``id`` = its stream sequence) so
        far, then live ones until the terminal one. ``Last-Event-ID`` resumes
        after that event; a comment line keeps the stream open while idle."""
        bus = svc.bus
        tenant = owned(task_id, tenant)
        start = last_event_seq(last_event_id)
        await known(task_id, tenant, grace=2.0)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            async for item in replay_events(
                bus, tenant, task_id, follow=True, start_seq=start, timeout=settings.follow_timeout
            ):
                doc = as_dict(item)
                yield ServerSentEvent(data=json.dumps(doc), event=doc["type"], id=str(item.seq))

        return sse(stream())

    @app.get("/v1/tasks/{task_id}/tokens", **_SSE)
    async def tokens(
        task_id: str,
        tenant: str | None = Depends(tenant_of),
        last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
    ) -> EventSourceResponse:
        """Server-sent token deltas (``event: token``, ``id`` = the delta's
        sequence in ``BATON_TOKENS``) as the steps generate, then ``event: end``
        with the terminal event. ``Last-Event-ID`` resumes after that delta."""
        bus = svc.bus
        tenant = owned(task_id, tenant)
        start = last_event_seq(last_event_id)
        await known(task_id, tenant, grace=2.0)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            async for item in follow_task(bus, tenant, task_id, tokens_from=start,
                                          with_events=False,
                                          timeout=settings.follow_timeout):  # fmt: skip
                doc = json.dumps(as_dict(item))
                if item.kind == "token":
                    yield ServerSentEvent(data=doc, event="token", id=str(item.seq))
                else:
                    yield ServerSentEvent(data=doc, event="end")

        return sse(stream())

    @app.post("/v1/tasks/{task_id}/cancel", response_model=Cancelled, responses=ERROR_RESPONSES)
    async def cancel(task_id: str, tenant: str | None = Depends(tenant_of)) -> Cancelled:
        """Cancel a task: in-flight generations are aborted."""
        tenant = owned(task_id, tenant)
        run = await svc.conductor.cancel(tenant, task_id)
        if run is None:
            raise ApiError(ErrorCode.UNKNOWN_TASK, f"no task {task_id!r} for this tenant")
        _not_erased(task_id, run)
        return Cancelled(task_id=task_id, status=run.status)

    @app.post("/v1/tasks/{task_id}/input", response_model=InputAccepted, **_ACCEPTED)
    async def give_input(
        task_id: str, body: InputIn, tenant: str | None = Depends(tenant_of)
    ) -> InputAccepted:
        """Answer a task's waiting ``input`` step (tenant from the API key).
        The answer is published on ``baton.input.<tenant>.<task_id>``, the
        same way a tenant's NATS client answers, and taken from there; 409
        ``not_waiting`` when the task waits for no (such) input."""
        bus = svc.bus
        tenant = owned(task_id, tenant)
        run = await known(task_id, tenant)
        answer = InputAnswer(answer=body.answer, step=body.step)
        why = answer_refusal(answer, tenant)
        if why is not None:
            raise ApiError(
                why[0], why[1], param="step" if why[0] == ErrorCode.INVALID_FIELD else "answer"
            )
        step = waiting_step(run, body.step)
        if step is None:
            at = f" at {body.step}" if body.step else ""
            raise ApiError(ErrorCode.NOT_WAITING, f"task {task_id!r} waits for no input{at}")
        answer.step = step
        subject = subjects.tenant_input(tenant, task_id)
        # The step names the answer: a retried POST is de-duplicated by the stream.
        await bus.publish(
            subject, answer, msg_id=keys.input_message(task_id, step), task_id=task_id
        )
        return InputAccepted(task_id=task_id, step=step, subject=subject)

    @app.post("/v1/tasks/{task_id}/fork", response_model=ForkAccepted, **_ACCEPTED)
    async def fork(
        task_id: str, body: ForkIn, tenant: str | None = Depends(tenant_of)
    ) -> ForkAccepted:
        """Run the task's workflow again from one of its finished steps, as a
        new task: on a fork of its session at the context that step started
        from, with the steps before it carried over (not run again) and the
        step reading ``input`` (see docs/workflows.md, "Fork from a step").
        The task itself is not changed. Follow the new task like any other."""
        bus = svc.bus
        tenant = owned(task_id, tenant)
        source = await known(task_id, tenant)
        new_id = body.task_id or uuid.uuid4().hex
        require_ids(task_id=new_id)
        if body.input is not None and len(body.input.encode()) > MAX_INPUT_BYTES:
            raise ApiError(ErrorCode.INPUT_TOO_LARGE, f"input is at most {MAX_INPUT_BYTES} bytes",
                           param="input")  # fmt: skip
        why = fork_refusal(source, body.step, svc.conductor.rules)
        if why is not None:
            raise ApiError(ErrorCode.INVALID_FIELD, why, param="step")
        await svc._within_limits(bus, tenant)
        req = NewFork(
            new_id, new_id, body.step, body.input, trace=tracing.traceparent(tracing.current())
        )
        out = await svc.conductor.fork(source, req)
        if out.note == "duplicate_task":
            raise ApiError(
                ErrorCode.CONFLICT, f"task {new_id!r} exists and is not this fork", param="task_id"
            )
        run = out.run
        carried = [k for k, st in run.steps.items() if st.carried]
        resumed = out.note == "resumed"
        return ForkAccepted.of(tenant, run.task_id, run.session, run.workflow, resumed,
                               forked_from=task_id, step=body.step, carried=carried)  # fmt: skip

    @app.post(
        "/v1/documents", status_code=201, response_model=DocumentStored, responses=ERROR_RESPONSES
    )
    async def documents(
        body: DocumentIn, tenant: str | None = Depends(tenant_of)
    ) -> DocumentStored:
        """Upload a document for the tenant's ``search`` tool (tenant from the
        API key). A second upload under the same ``doc_id`` replaces it."""
        bus = svc.bus
        tenant = tenant if tenant is not None else body.tenant
        if tenant is None:
            raise ApiError(ErrorCode.MISSING_FIELD, _NO_TENANT, param="tenant")
        doc_id = body.doc_id or uuid.uuid4().hex
        require_ids(tenant=tenant, doc_id=doc_id)
        doc = DocumentPut(
            tenant=tenant, doc_id=doc_id, text=body.text, title=body.title, metadata=body.metadata
        )
        try:
            seq = await put_document(bus, doc)
        except DocumentTooLarge as exc:
            raise ApiError(ErrorCode.INPUT_TOO_LARGE, str(exc), param="text") from exc
        return DocumentStored(doc_id=doc_id, tenant=tenant, seq=seq)

    @app.get("/v1/workflows", response_model=WorkflowList, responses=ERROR_RESPONSES)
    def workflows() -> WorkflowList:
        """The workflows this orchestrator runs, with their agents and steps."""
        return WorkflowList(workflows=[
            WorkflowOut(
                name=s.name, description=s.description, rounds=s.rounds, output=s.output,
                agents={n: {"role": a.role, "pool": a.pool, "max_tokens": a.max_tokens}  # type: ignore[misc]
                        for n, a in s.agents.items()},
                steps=[msgspec.to_builtins(st) for st in s.steps],
            )
            for s in sorted(svc.workflows.values(), key=lambda s: s.name)
        ])  # fmt: skip

    from .console.routes import add_routes as add_console
    from .openai_api import add_routes
    from .tenants_api import add_tenant_routes

    add_routes(app, settings, svc, tenant_of)
    add_tenant_routes(app, settings, key_scope)
    add_console(app, settings, svc, tenant_of, known, sessions)
    return app
