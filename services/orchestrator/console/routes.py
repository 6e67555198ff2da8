"""The run console's routes, under ``/ui/`` on the orchestrator's HTTP app:
the page and its static files (served from the package, nothing from a CDN),
the login (a one-time link's token, or a pasted key, traded for a session
cookie: ``baton.sessions``), the live list feed and the task view.

The page reads everything else through Baton's own API (``/v1/tasks``, its
SSE streams, cancel, input, fork), authenticated by the session cookie
(``baton.service.caller_scope``). None of these routes is in the OpenAPI
document: they are the console's, not a client contract.
"""

from __future__ import annotations

import asyncio
import html
import json
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse, ServerSentEvent

from baton import audit, context_client
from baton import sessions as S
from baton.bus import Message
from baton.credentials import OPERATOR_SCOPE
from baton.http_errors import ApiError, require_ids
from baton.service import refuse_cross_site
from proto import keys, subjects
from proto.context_api import WINDOW
from proto.errors import ErrorCode
from proto.messages import WindowRequest

from ..api_models import TaskSummary, run_doc
from ..follow import as_dict, replay_events
from ..settings import OrchestratorSettings
from ..state import ERASED
from .views import task_view

if TYPE_CHECKING:
    from ..api import Services

STATIC = Path(__file__).with_name("static")
# The page runs only its own script and style: no inline code, no other origin.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form's Origin "null"
}
# A login link's page (no script: one button that posts the token).
_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Baton run console: log in</title>
<link rel="stylesheet" href="/ui/static/console.css"></head>
<body><main><section class="login"><h1>Log in to the run console</h1>
<p>This link logs you in as <b>{who}</b>. It works once.</p>
<form method="post" action="/ui/login"><input type="hidden" name="token" value="{token}">
<button class="primary" id="continue" type="submit">Continue</button></form>
</section></main></body></html>
"""
FEED_COALESCE = 0.25  # seconds: a burst of one task's events is one update of its row

TenantOf = Callable[..., str | None]
Known = Callable[..., Awaitable[Any]]


def add_routes(
    app: FastAPI,
    settings: OrchestratorSettings,
    svc: Services,
    tenant_of: TenantOf,
    known: Known,
    sessions: S.SessionKeys | None,
) -> None:
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")
    bearer = HTTPBearer(auto_error=False)

    def cookie_for(request: Request, response: Response, kid: str, scope: str, now: float) -> None:
        """Set a session cookie for the key of id ``kid`` and its ``scope`` (a
        verified key's or grant's: a key known only by its digest opens a
        session too)."""
        assert sessions is not None
        expires = now + settings.console_session_ttl
        token = sessions.issue_for(
            kid, "session", nonce=secrets.token_urlsafe(12), expires=expires, scope=scope
        )
        secure = settings.console_secure_cookie or request.url.scheme == "https"
        response.set_cookie(S.COOKIE, token, max_age=int(settings.console_session_ttl),
                            path="/", httponly=True, samesite="strict", secure=secure)  # fmt: skip

    def suspended(scope: str) -> bool:
        """A suspended tenant gets no console session (every call of one
        would be refused): a key's request is answered 403
        ``tenant_suspended``, as on every route; a link or a form goes back
        to the page, which says why."""
        return scope in svc.room.suspended

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=308)

    @app.get("/ui/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    @app.post("/ui/login-link", include_in_schema=False)
    async def login_link(
        creds: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> dict[str, Any]:
        """A one-time login link for the bearer key's holder (``baton console``)."""
        if sessions is None:  # no keys: the console is open, like the API
            return {"path": "/ui/", "expires_at": None}
        key = creds.credentials.strip() if creds else ""
        scope = sessions.scope_of(key)
        if scope is None:
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer ...)")
        if suspended(scope):
            raise ApiError(ErrorCode.TENANT_SUSPENDED, f"tenant {scope!r} is suspended")
        expires = time.time() + settings.console_login_ttl
        token = sessions.issue(key, "login", nonce=secrets.token_urlsafe(16), expires=expires)
        return {"path": f"/ui/login?token={token}", "expires_at": expires}

    @app.get("/ui/login", include_in_schema=False)
    async def login_page(token: str = "") -> Response:
        """A login link's page: it says who the link logs in as and asks for
        one click (a POST), so a link scanner or a prefetch that only GETs it
        does not use it up."""
        if sessions is None:
            return RedirectResponse("/ui/", status_code=303)
        grant = sessions.verify(token, "login", time.time())
        if grant is None:
            return RedirectResponse("/ui/?login=expired", status_code=303)
        who = "the operator (every tenant)" if grant.scope == OPERATOR_SCOPE else (
            f"tenant {grant.scope}")  # fmt: skip
        page = _LOGIN_PAGE.format(who=html.escape(who), token=html.escape(token, quote=True))
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    async def by_link(request: Request, token: str) -> Response:
        """Trade a link's token for a session cookie, once in all replicas."""
        assert sessions is not None
        now = time.time()
        grant = sessions.verify(token, "login", now)
        if grant is None:
            return RedirectResponse("/ui/?login=expired", status_code=303)
        if suspended(grant.scope):  # a link handed out before the suspension
            return RedirectResponse("/ui/?login=suspended", status_code=303)
        bus = svc.bus
        tenant = None if grant.scope == OPERATOR_SCOPE else grant.scope
        actor = "operator" if tenant is None else f"tenant:{tenant}"
        rec = audit.entry(actor, audit.CONSOLE_LOGIN, "console", tenant=tenant or "",
                          service="orchestrator", detail={"key_id": grant.key_id})  # fmt: skip
        if not await audit.record(bus, rec, msg_id=keys.console_login(grant.nonce)):
            return RedirectResponse("/ui/?login=used", status_code=303)
        response = RedirectResponse("/ui/", status_code=303)
        try:
            cookie_for(request, response, grant.key_id, grant.scope, now)
        except KeyError:  # its key was withdrawn since the token was verified
            return RedirectResponse("/ui/?login=expired", status_code=303)
        return response

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """The login form: a pasted API key (field ``key``), or a login
        link's token (field ``token``, from its page)."""
        refuse_cross_site(request)
        if sessions is None:
            return RedirectResponse("/ui/", status_code=303)
        form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        if token:
            return await by_link(request, token)
        key = (form.get("key") or [""])[0].strip()
        scope = sessions.scope_of(key)
        if scope is None:
            return RedirectResponse("/ui/?login=refused", status_code=303)
        if suspended(scope):  # a form: the page says why, as for a bad key
            return RedirectResponse("/ui/?login=suspended", status_code=303)
        response = RedirectResponse("/ui/", status_code=303)
        cookie_for(request, response, S.key_id(key), scope, time.time())
        return response

    @app.post("/ui/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        refuse_cross_site(request)
        response = Response(status_code=204)
        response.delete_cookie(S.COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @app.get("/ui/session", include_in_schema=False)
    def session(request: Request) -> JSONResponse:
        """Who the page is: the scope, the tenants it may filter by, the CSRF
        token for its state-changing calls. 401: show the login form."""
        tenants = sorted(svc.tenants)
        if sessions is None:
            doc: dict[str, Any] = {"auth": "open", "scope": "*", "tenants": tenants, "csrf": "",
                                   "expires_at": None}  # fmt: skip
            return JSONResponse(doc, headers={"Cache-Control": "no-store"})
        grant = sessions.verify(request.cookies.get(S.COOKIE, ""), "session", time.time())
        if grant is None:
            raise ApiError(ErrorCode.UNAUTHORIZED, "not logged in to the console")
        doc = {"auth": "session", "scope": grant.scope, "csrf": sessions.csrf(grant),
               "tenants": tenants if grant.scope == OPERATOR_SCOPE else [grant.scope],
               "expires_at": grant.expires}  # fmt: skip
        return JSONResponse(doc, headers={"Cache-Control": "no-store"})

    @app.get("/ui/api/feed", include_in_schema=False)
    async def feed(tenant: str | None = Depends(tenant_of)) -> EventSourceResponse:
        """Server-sent ``task`` events: a task's summary (as in ``GET
        /v1/tasks``) each time it changes — new tasks included — for the
        caller's tenant, or an operator's every tenant (or the one named).
        Follows the tasks' events (stream BATON_EVENTS, new ones only)."""
        bus, runs = svc.bus, svc.runs
        require_ids(tenant=tenant)
        subject = f"{subjects.EVENTS}.{tenant or '*'}.*"

        async def stream() -> AsyncIterator[ServerSentEvent]:
            changed: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

            async def on_event(msg: Message) -> None:
                _, _, owner, task_id = msg.subject.split(".", 3)
                await changed.put((owner, task_id))

            sub = await bus.ordered(subject, new=True, cb=on_event)
            try:
                while True:
                    due = {await changed.get()}
                    await asyncio.sleep(FEED_COALESCE)
                    while not changed.empty():
                        due.add(changed.get_nowait())
                    for owner, task_id in sorted(due):
                        run = await runs.get(owner, task_id)
                        if run is None or run.status == ERASED:
                            continue
                        doc = TaskSummary.model_validate(run_doc(run)).model_dump()
                        yield ServerSentEvent(data=json.dumps(doc), event="task")
            finally:
                await sub.unsubscribe()

        return EventSourceResponse(stream(), ping=settings.sse_ping)

    @app.get("/ui/api/tasks/{task_id}", include_in_schema=False)
    async def view(task_id: str, tenant: str | None = Depends(tenant_of)) -> JSONResponse:
        """The task page's data: waterfall, graph, failure layer (``views``)."""
        bus = svc.bus
        if tenant is None:
            raise ApiError(ErrorCode.MISSING_FIELD, "tenant is required", param="tenant")
        require_ids(tenant=tenant, task_id=task_id)
        run = await known(task_id, tenant, grace=2.0)
        events = [as_dict(i) async for i in replay_events(bus, tenant, task_id)]
        doc = task_view(run, svc.workflows.get(run.workflow), events, time.time())
        return JSONResponse(doc, headers={"Cache-Control": "no-store"})

    @app.get("/ui/api/tasks/{task_id}/steps/{step}/context", include_in_schema=False)
    async def context(
        task_id: str, step: str, tenant: str | None = Depends(tenant_of)
    ) -> JSONResponse:
        """The context window a step started from, read from the context store
        by the step's ref (its budget, when the task had one)."""
        bus = svc.bus
        if tenant is None:
            raise ApiError(ErrorCode.MISSING_FIELD, "tenant is required", param="tenant")
        require_ids(tenant=tenant, task_id=task_id)
        run = await known(task_id, tenant)
        st = run.steps.get(step)
        if st is None or st.origin is None:
            raise ApiError(
                ErrorCode.INVALID_FIELD, f"no context recorded for step {step!r}", param="step"
            )
        req = WindowRequest(tenant=tenant, ref=st.origin, budget_tokens=st.context_budget)
        reply = await context_client.ask(bus, WINDOW, req, task_id=task_id)
        if reply.error is not None:
            raise ApiError(reply.error.code, reply.error.message)
        doc = {"session": st.origin.session, "version": st.origin.version,
               "tokens": reply.tokens, "dropped": reply.dropped,
               "messages": [{"role": m.role, "name": m.name, "content": m.content[:4000]}
                            for m in reply.messages]}  # fmt: skip
        return JSONResponse(doc, headers={"Cache-Control": "no-store"})
