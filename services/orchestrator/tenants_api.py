"""The operator's tenant API: ``/v1/tenants`` — the lifecycle of
``baton tenant ...`` (``baton/tenants.py``) over HTTP, operator key only.

Needs keys that sign accounts and BATON's users (``BATON_TENANT_ADMIN_DIR``:
the tenant-admin bundle ``baton nats-auth`` writes — the operator's and
BATON's signing keys, never the operator's identity key — as compose and
Kubernetes mount it, or the data dir of ``baton up``); without it the routes
answer 404 ``unavailable``, with a directory holding neither 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from baton.http_errors import ERROR_RESPONSES, ApiError, ErrorBody
from baton.residency import RegionError
from baton.tenants import (
    AdminKeysError,
    KeysElsewhere,
    TenantAdmin,
    TenantConflict,
    TenantError,
    TenantUnavailable,
)
from baton.urls import split_creds
from proto.errors import ErrorCode
from proto.ids import require_id

from .settings import OrchestratorSettings


class RegionIn(BaseModel):
    region: str


class TenantIn(BaseModel):
    tenant: str
    # Its data stays on servers tagged region:<region> (docs/security.md).
    region: str | None = None


RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    403: {"model": ErrorBody, "description": "Not the operator's key"},
    404: {"model": ErrorBody, "description": "No such tenant, or the tenant API is off"},
}


def add_tenant_routes(
    app: FastAPI, settings: OrchestratorSettings, scope: Callable[..., str | None]
) -> None:
    def operator(caller: str | None = Depends(scope)) -> None:
        if caller is not None:  # a tenant's key
            raise ApiError(ErrorCode.FORBIDDEN, "the tenant API wants the operator's key")

    async def run(work: Callable[[TenantAdmin], Awaitable[Any]]) -> Any:
        if settings.tenant_admin_dir is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "no BATON_TENANT_ADMIN_DIR: the tenant API "
                           "is off (use `baton tenant`)", status=404)  # fmt: skip
        address = split_creds(settings.nats_url)[0]
        try:
            async with TenantAdmin(
                settings.tenant_admin_dir, address, replicas=settings.stream_replicas
            ) as admin:
                return await work(admin)
        except RegionError as exc:
            raise ApiError(ErrorCode.INVALID_FIELD, str(exc), param="region") from exc
        except AdminKeysError as exc:
            raise ApiError(ErrorCode.UNAVAILABLE, str(exc), status=503) from exc
        except KeysElsewhere as exc:
            raise ApiError(ErrorCode.CONFLICT, str(exc)) from exc
        except TenantUnavailable as exc:
            raise ApiError(ErrorCode.UNAVAILABLE, str(exc)) from exc
        except TenantError as exc:
            conflict = isinstance(exc, TenantConflict) or "exists" in str(exc)
            code = ErrorCode.CONFLICT if conflict else ErrorCode.UNKNOWN_TENANT
            raise ApiError(code, str(exc)) from exc

    def checked(value: str, field: str = "tenant") -> str:
        try:
            return require_id(value, field)
        except ValueError as exc:
            raise ApiError(ErrorCode.INVALID_FIELD, str(exc), param=field) from exc

    @app.get("/v1/tenants", dependencies=[Depends(operator)], responses=RESPONSES)
    async def list_tenants() -> dict[str, Any]:
        """Every tenant and its state (active, suspended)."""
        return {"tenants": await run(lambda a: a.list())}

    @app.post("/v1/tenants", status_code=201, dependencies=[Depends(operator)], responses=RESPONSES)
    async def create_tenant(body: TenantIn) -> dict[str, Any]:
        """Create a tenant; answers once it can submit, with its .creds text
        and its HTTP API key (``api_key``: shown this once, only its sha256
        is kept)."""
        t = checked(body.tenant)
        region = None if body.region is None else checked(body.region, "region")
        made = await run(lambda a: a.create(t, region))
        return {"tenant": t, "state": "active", "region": region,
                "creds": made.creds.read_text(), "api_key": made.api_key}  # fmt: skip

    @app.put("/v1/tenants/{tenant}/region", dependencies=[Depends(operator)], responses=RESPONSES)
    async def set_region(tenant: str, body: RegionIn) -> dict[str, Any]:
        """Keep an existing tenant's data on servers tagged region:<region>:
        its streams move there (``GET .../where`` shows when). A tenant with
        history or attachments is refused (409 ``conflict``): not migrated."""
        t, region = checked(tenant), checked(body.region, "region")
        await run(lambda a: a.set_region(t, region))
        return {"tenant": t, "region": region}

    @app.get("/v1/tenants/{tenant}/where", dependencies=[Depends(operator)], responses=RESPONSES)
    async def tenant_where(tenant: str) -> dict[str, Any]:
        """Where the tenant's data lives: each of its streams, its placement
        tags and the servers (with their tags) holding its replicas; and
        (``context``) the context store's stream pair its history is in."""
        t = checked(tenant)
        result: dict[str, Any] = await run(lambda a: a.residency(t))
        return result

    @app.post(
        "/v1/tenants/{tenant}/{action}", dependencies=[Depends(operator)], responses=RESPONSES
    )
    async def change_tenant(tenant: str, action: str) -> dict[str, Any]:
        """``suspend`` (its API key refused with 403 ``tenant_suspended``),
        ``resume`` or ``rotate``: new .creds and a new HTTP API key (answers
        both, the key this once); the old ones are refused."""
        t = checked(tenant)
        if action == "suspend":
            await run(lambda a: a.suspend(t))
            return {"tenant": t, "state": "suspended"}
        if action == "resume":
            await run(lambda a: a.resume(t))
            return {"tenant": t, "state": "active"}
        if action == "rotate":
            made = await run(lambda a: a.rotate(t))
            return {"tenant": t, "creds": made.creds.read_text(), "api_key": made.api_key}
        raise ApiError(ErrorCode.INVALID_FIELD, f"no action {action!r}", param="action")

    @app.delete("/v1/tenants/{tenant}", dependencies=[Depends(operator)], responses=RESPONSES)
    async def delete_tenant(tenant: str) -> dict[str, Any]:
        """Erase the tenant's data (audited) and revoke its credentials and API key."""
        t = checked(tenant)
        sessions = await run(lambda a: a.delete(t))
        return {"tenant": t, "state": "deleted", "sessions_erased": sessions}
