"""The orchestrator's HTTP API (FastAPI).

Tenancy: when API keys are configured (``BATON_API_KEYS``), the bearer key
decides the tenant and a tenant only sees its own tasks. Without keys
(development), the tenant comes from the request.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, StreamingResponse
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, Field

from baton.service import Health, caller_scope, health_app
from baton.transport import Bus
from proto import codec, subjects
from proto.admission import TaskRejected, parse_task
from proto.errors import LAYER_OF, ErrorCode
from proto.ids import is_valid_id
from proto.messages import TaskEvent

from .conductor import Conductor
from .runs import RunStore
from .settings import OrchestratorSettings
from .workflows import WorkflowSpec

_STATUS_OF = {
    ErrorCode.UNKNOWN_WORKFLOW: 404,
    ErrorCode.INPUT_TOO_LARGE: 413,
}


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
    metadata: dict[str, Any] = Field(default_factory=dict)


class Services:
    """What the API needs once the NATS side is up."""

    def __init__(self) -> None:
        self.bus: Bus | None = None
        self.runs: RunStore | None = None
        self.conductor: Conductor | None = None
        self.workflows: dict[str, WorkflowSpec] = {}


def _error(status: int, code: ErrorCode, message: str) -> HTTPException:
    return HTTPException(
        status, {"code": str(code), "message": message, "layer": str(LAYER_OF[code])}
    )


async def replay_events(
    bus: Bus, tenant: str, task_id: str, *, follow: bool = False, timeout: float = 300.0
) -> AsyncIterator[dict[str, Any]]:
    """A task's events from the start (JetStream replay); with ``follow``,
    keep going until the terminal event."""
    sub = await bus.js.subscribe(
        subjects.event(tenant, task_id),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout if follow else 0.25)
            except TimeoutError:
                return
            event: dict[str, Any] = msgspec.to_builtins(codec.decode(msg.data, TaskEvent))  # type: ignore[arg-type]
            yield event
            if event["type"] in ("completed", "failed"):
                return
    finally:
        await sub.unsubscribe()


def build_app(settings: OrchestratorSettings, health: Health, svc: Services) -> FastAPI:
    app = health_app("Baton orchestrator", health)

    def tenant_of(
        scope: str | None = Depends(caller_scope(settings.api_keys)),
        tenant: str | None = Query(default=None),
    ) -> str | None:
        """A scoped key decides the tenant; unrestricted callers name it."""
        return scope if scope is not None else tenant

    def ready() -> tuple[Bus, RunStore]:
        if svc.bus is None or svc.runs is None:
            raise HTTPException(503, "orchestrator is starting")
        return svc.bus, svc.runs

    def owned(task_id: str, tenant: str | None) -> str:
        if tenant is None:
            raise HTTPException(400, "tenant is required (query parameter or API key)")
        if not (is_valid_id(tenant) and is_valid_id(task_id)):
            raise HTTPException(400, "ids must match [A-Za-z0-9_-]{1,64}")
        return tenant

    @app.post("/v1/tasks", status_code=202)
    async def submit(body: TaskIn, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        """Submit a task; follow it on ``baton.events.<tenant>.<task_id>``."""
        bus, _ = ready()
        raw = body.model_dump(exclude_none=True, exclude={"workflow"})
        if tenant is not None:
            raw["tenant"] = tenant
        raw.setdefault("task_id", uuid.uuid4().hex)
        try:
            data = codec.encode(raw)
        except (OverflowError, TypeError, ValueError) as exc:  # e.g. an int over 64 bits
            raise _error(400, ErrorCode.INVALID_FIELD, f"not encodable: {exc}") from exc
        try:
            task = parse_task(data, workflow=body.workflow, known_workflows=set(svc.workflows))
        except TaskRejected as r:
            raise _error(_STATUS_OF.get(r.code, 400), r.code, r.message) from r
        assert task.task_id is not None
        ack = await bus.publish(
            subjects.task(body.workflow), data, msg_id=task.task_id, task_id=task.task_id
        )
        return {
            "task_id": task.task_id,
            "tenant": task.tenant,
            "session": task.session,
            "workflow": body.workflow,
            "duplicate": ack.duplicate,
            "events_subject": subjects.event(task.tenant, task.task_id),
        }

    @app.get("/v1/tasks/{task_id}")
    async def status(task_id: str, tenant: str | None = Depends(tenant_of)) -> JSONResponse:
        """A task's status, events, output, usage and cost (its tenant only)."""
        bus, runs = ready()
        tenant = owned(task_id, tenant)
        run = await runs.get(tenant, task_id)
        if run is None:
            raise HTTPException(404, f"no task {task_id!r} for this tenant")
        doc = msgspec.to_builtins(run)
        for st in doc.get("steps", {}).values():
            st.pop("ref", None)
        doc["events"] = [e async for e in replay_events(bus, tenant, task_id)]
        return JSONResponse(doc)

    @app.get("/v1/tasks/{task_id}/events")
    async def events(task_id: str, tenant: str | None = Depends(tenant_of)) -> StreamingResponse:
        """Server-sent events: every event so far, then live ones until the end."""
        bus, runs = ready()
        tenant = owned(task_id, tenant)
        # A task just submitted becomes a run once an orchestrator has taken
        # it (its first steps dispatched): give that a moment before a 404.
        for _ in range(40):
            if await runs.get(tenant, task_id) is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise HTTPException(404, f"no task {task_id!r} for this tenant")

        async def stream() -> AsyncIterator[str]:
            async for e in replay_events(bus, tenant, task_id, follow=True):
                yield f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/tasks/{task_id}/cancel")
    async def cancel(task_id: str, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        """Cancel a task: in-flight generations are aborted."""
        ready()
        tenant = owned(task_id, tenant)
        assert svc.conductor is not None
        run = await svc.conductor.cancel(tenant, task_id)
        if run is None:
            raise HTTPException(404, f"no task {task_id!r} for this tenant")
        return {"task_id": task_id, "status": run.status}

    @app.get("/v1/workflows")
    def workflows() -> dict[str, Any]:
        """The workflows this orchestrator runs, with their agents and steps."""
        return {
            "workflows": [
                {
                    "name": s.name,
                    "description": s.description,
                    "rounds": s.rounds,
                    "agents": {
                        n: {"role": a.role, "pool": a.pool, "max_tokens": a.max_tokens}
                        for n, a in s.agents.items()
                    },
                    "steps": [msgspec.to_builtins(st) for st in s.steps],
                }
                for s in sorted(svc.workflows.values(), key=lambda s: s.name)
            ]
        }

    return app
