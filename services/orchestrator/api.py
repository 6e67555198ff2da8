"""The orchestrator's HTTP API (FastAPI).

Tenancy: when API keys are configured (``BATON_API_KEYS``), the bearer key
decides the tenant and a tenant only sees its own tasks. Without keys
(development), the tenant comes from the request.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from baton.service import Health, health_app
from baton.transport import Bus
from proto import codec, subjects
from proto.admission import TaskRejected, parse_task
from proto.errors import LAYER_OF, ErrorCode
from proto.ids import is_valid_id

from .runs import RunStore
from .settings import OrchestratorSettings

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

    bus: Bus | None = None
    runs: RunStore | None = None
    workflows: frozenset[str] = frozenset()


def _error(status: int, code: ErrorCode, message: str) -> HTTPException:
    return HTTPException(
        status, {"code": str(code), "message": message, "layer": str(LAYER_OF[code])}
    )


def build_app(settings: OrchestratorSettings, health: Health, svc: Services) -> FastAPI:
    app = health_app("Baton orchestrator", health)

    def tenant_of(
        authorization: str | None = Header(default=None),
        tenant: str | None = Query(default=None),
    ) -> str | None:
        if not settings.api_keys:
            return tenant
        key = (authorization or "").removeprefix("Bearer ").strip()
        if key not in settings.api_keys:
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer ...)")
        return settings.api_keys[key]

    def ready() -> tuple[Bus, RunStore]:
        if svc.bus is None or svc.runs is None:
            raise HTTPException(503, "orchestrator is starting")
        return svc.bus, svc.runs

    @app.post("/v1/tasks", status_code=202)
    async def submit(body: TaskIn, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        """Submit a task; follow it on ``baton.events.<tenant>.<task_id>``."""
        bus, _ = ready()
        raw = body.model_dump(exclude_none=True, exclude={"workflow"})
        if settings.api_keys or tenant is not None:
            raw["tenant"] = tenant
        raw.setdefault("task_id", uuid.uuid4().hex)
        data = codec.encode(raw)
        try:
            task = parse_task(data, workflow=body.workflow, known_workflows=svc.workflows)
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
        """A task's status, output, usage and cost."""
        _, runs = ready()
        if tenant is None:
            raise HTTPException(400, "tenant is required (query parameter or API key)")

        if not (is_valid_id(tenant) and is_valid_id(task_id)):
            raise HTTPException(400, "ids must match [A-Za-z0-9_-]{1,64}")
        run = await runs.get(tenant, task_id)
        if run is None:
            raise HTTPException(404, f"no task {task_id!r} for this tenant")
        doc = msgspec.to_builtins(run)
        for st in doc.get("steps", {}).values():
            st.pop("ref", None)
        return JSONResponse(doc)

    @app.get("/v1/workflows")
    def workflows() -> dict[str, list[str]]:
        return {"workflows": sorted(svc.workflows)}

    return app
