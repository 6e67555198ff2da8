"""The context store's operator HTTP API (a mirror of the NATS ops).

``GET /v1/sessions/{tenant}/{session}``, ``DELETE`` of the same, ``DELETE
/v1/tenants/{tenant}``, ``GET /v1/tenants/{tenant}/stats``, plus ``/healthz``,
``/readyz`` and ``/metrics``, and ``GET /v1/audit`` (the audit trail). With
API keys configured (``BATON_API_KEYS``), a caller whose key belongs to one
tenant is refused (403) any other tenant's data and the audit trail; an
operator key (``"*"``) sees every tenant. Deletions are audited with who
asked: ``operator``, ``tenant:<id>``, or ``anonymous`` (no keys configured).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import msgspec
from fastapi import Depends, FastAPI

from baton import audit
from baton.http_errors import ApiError
from baton.service import Health, caller_scope, health_app
from proto.errors import ErrorCode
from proto.ids import is_valid_id
from proto.messages import ContextDelete, ContextGet, ContextStats

from .admin import Admin
from .errors import ContextError

_STATUS = {
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.UNKNOWN_ATTACHMENT: 404,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.BAD_REQUEST: 400,
}


def _scope(tenant: str, session: str | None, caller: str | None) -> None:
    if not is_valid_id(tenant) or (session is not None and not is_valid_id(session)):
        raise ApiError(ErrorCode.INVALID_FIELD, "tenant and session must match [A-Za-z0-9_-]{1,64}")
    if caller is not None and caller != tenant:
        raise ApiError(ErrorCode.FORBIDDEN, "this caller may not read another tenant's data")


def http_app(
    health: Health, admin: Admin, api_keys: dict[str, str], suspended: Container[str] = ()
) -> FastAPI:
    app = health_app("Baton context store", health)
    scope = caller_scope(api_keys, suspended=suspended)

    def actor(caller: str | None) -> str:
        if caller is not None:
            return f"tenant:{caller}"
        return "operator" if api_keys else "anonymous"

    async def call(op: Any, req: Any) -> dict[str, Any]:
        try:
            out: dict[str, Any] = msgspec.to_builtins(await op(req))
        except ContextError as exc:
            raise ApiError(exc.code, exc.message, status=_STATUS.get(exc.code, 500)) from exc
        return out

    @app.get("/v1/sessions/{tenant}/{session}")
    async def read_session(
        tenant: str, session: str, start: int = 0, limit: int = 1024,
        caller: str | None = Depends(scope),
    ) -> dict[str, Any]:  # fmt: skip
        _scope(tenant, session, caller)
        got = await call(
            admin.get, ContextGet(tenant=tenant, session=session, start=start, limit=limit)
        )
        got.pop("ref", None)  # refs are for services, not operators
        stats = await call(admin.stats, ContextStats(tenant=tenant, session=session))
        return {"tenant": tenant, "session": session, "tokens_estimate": stats["tokens"], **got}

    @app.delete("/v1/sessions/{tenant}/{session}")
    async def delete_session(
        tenant: str, session: str, caller: str | None = Depends(scope)
    ) -> dict[str, Any]:
        _scope(tenant, session, caller)
        req = ContextDelete(tenant=tenant, session=session)
        return await call(lambda r: admin.delete(r, actor(caller)), req)

    @app.delete("/v1/tenants/{tenant}")
    async def delete_tenant(tenant: str, caller: str | None = Depends(scope)) -> dict[str, Any]:
        _scope(tenant, None, caller)
        return await call(lambda r: admin.delete(r, actor(caller)), ContextDelete(tenant=tenant))

    @app.get("/v1/tenants/{tenant}/stats")
    async def tenant_stats(tenant: str, caller: str | None = Depends(scope)) -> dict[str, Any]:
        _scope(tenant, None, caller)
        return await call(admin.stats, ContextStats(tenant=tenant))

    @app.get("/v1/audit")
    async def audit_trail(
        tenant: str | None = None, action: str | None = None, last: int = 100,
        caller: str | None = Depends(scope),
    ) -> dict[str, Any]:  # fmt: skip
        """The newest ``last`` audit records, oldest first (operators only)."""
        if caller is not None:
            raise ApiError(ErrorCode.FORBIDDEN, "the audit trail is for operators")
        for value in (tenant, action):
            if value is not None and not is_valid_id(value):
                raise ApiError(
                    ErrorCode.INVALID_FIELD, "tenant and action must match [A-Za-z0-9_-]{1,64}"
                )
        if not 1 <= last <= 10_000:
            raise ApiError(ErrorCode.INVALID_FIELD, "last must be within 1..10000")
        records = await audit.read(admin.bus, tenant=tenant, action=action, last=last)
        return {"records": [msgspec.to_builtins(r) for r in records]}

    return app
