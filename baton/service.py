"""Process scaffolding shared by the services: logging, tracing (when the
``OTEL_*`` variables configure an exporter), the NATS connection, the HTTP
server (health, readiness, metrics, API) and a clean shutdown on SIGTERM /
SIGINT.

A service supplies a ``Start``: given the connected bus, it builds the
service (every collaborator passed in its constructor) and returns a
``ServiceApp``, its FastAPI app and a coroutine that runs its NATS side until
the bus stops. Nothing is built before the connection exists, so nothing is
filled in later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from baton import http_errors, logs, tracing
from baton import sessions as S
from baton.bus import Bus, connect, tls_context
from baton.credentials import OPERATOR_SCOPE
from baton.http_errors import ApiError, ErrorBody, ErrorDetail
from baton.metrics import mount_metrics
from baton.settings import CommonSettings
from baton.urls import redact
from proto.errors import ErrorCode

log = structlog.get_logger("baton.service")


@dataclass
class Health:
    """Liveness and readiness, as the HTTP probes see them."""

    ready: bool = False
    reason: str = "starting"
    checks: dict[str, bool] = field(default_factory=dict)


def health_app(title: str, health: Health) -> FastAPI:
    """A FastAPI app with ``/healthz``, ``/readyz`` and ``/metrics``."""
    app = FastAPI(title=title)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz(response: Response) -> dict[str, object]:
        if not health.ready:
            response.status_code = 503
        return {"ready": health.ready, "reason": health.reason, **health.checks}

    mount_metrics(app)
    http_errors.install(app)
    document_errors(app)
    return app


ERROR_STATUSES = {
    "400": "Bad request (e.g. an id that is not a subject token, a refused task)",
    "401": "A valid API key is required",
    "403": "The caller's key may not act on another tenant",
    "404": "No such task, session or workflow",
    "413": "Input too large",
    "422": "The body or a parameter fails validation",
    "503": "The service is not ready",
}


def document_errors(app: FastAPI) -> None:
    """Declare the error answers every ``/v1`` operation may give, in the one
    error body (``baton.http_errors.ErrorBody``), so the OpenAPI document is
    the truth a client (and schemathesis) can check the API against."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorDetail, ErrorBody):
            schemas.setdefault(
                model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}")
            )
        body = {"$ref": "#/components/schemas/ErrorBody"}
        for path, ops in doc.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for op in ops.values():
                responses = op.setdefault("responses", {})
                for status, text in ERROR_STATUSES.items():
                    answer = responses.setdefault(status, {"description": text})
                    answer["content"] = {"application/json": {"schema": body}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def refuse_cross_site(request: Request) -> None:
    """403 for a state-changing request a browser sent from another site
    (its ``Origin`` names another host): with or without keys, a page on
    another origin must not make a local API cancel or submit anything."""
    if request.method in S.SAFE_METHODS:
        return
    if not S.same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise HTTPException(403, "cross-site request refused (Origin is not this host)")


def caller_scope(
    api_keys: dict[str, str],
    sessions: S.SessionKeys | None = None,
    suspended: Container[str] = frozenset(),
) -> Callable[..., str | None]:
    """A FastAPI dependency: the tenant the caller's bearer key belongs to.

    None means unrestricted: no keys are configured (an explicit opt-in,
    ``BATON_ALLOW_NO_API_KEYS``, bound to 127.0.0.1) or the key maps to
    ``"*"`` (an operator). An unknown or missing key is refused with 401.
    With keys, declared in OpenAPI as a bearer scheme, so ``/docs`` has an
    Authorize button; without, the API declares none (it asks for none).
    ``sessions``: a browser's console session cookie (``baton.sessions``)
    stands for the key that opened it; a state-changing call with it needs
    the session's CSRF token in ``X-Baton-CSRF``. Every state-changing call
    a browser sends from another origin is refused (``refuse_cross_site``).
    A key (or session) of a tenant in ``suspended`` (the registry's, kept
    live by the orchestrator) is refused with 403 ``tenant_suspended``.
    """
    if not api_keys:

        def open_scope(request: Request) -> str | None:
            refuse_cross_site(request)
            return None

        return open_scope
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="apiKey",
        description="A Baton API key: `Authorization: Bearer <key>`.",
    )

    def scope(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> str | None:
        refuse_cross_site(request)
        key = credentials.credentials.strip() if credentials else ""
        # (a presented "sha256:..." is a digest, not a key: never looked up as one)
        tenant = api_keys.get(key) if key and not key.startswith("sha256:") else None
        if tenant is None and key:  # a tenant created at run time (baton.tenants)
            tenant = api_keys.get("sha256:" + hashlib.sha256(key.encode()).hexdigest())
        cookie = request.cookies.get(S.COOKIE)
        if tenant is None and not key and sessions is not None and cookie:
            grant = sessions.verify(cookie, "session", time.time())
            if grant is not None:
                if request.method not in S.SAFE_METHODS and not sessions.csrf_ok(
                    grant, request.headers.get(S.CSRF_HEADER)
                ):
                    raise HTTPException(403, f"the console's {S.CSRF_HEADER} token is missing")
                tenant = grant.scope
        if tenant is None:
            raise HTTPException(
                401,
                "a valid API key is required (Authorization: Bearer ...)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if tenant in suspended:
            raise ApiError(ErrorCode.TENANT_SUSPENDED, f"tenant {tenant!r} is suspended")
        return None if tenant == OPERATOR_SCOPE else tenant

    return scope


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def bind_refusal(
    host: str, api_keys: dict[str, str], *, tenant_data: bool = False, allow_no_keys: bool = False
) -> str | None:
    """Why a service must not serve HTTP on ``host`` with these keys, or None.

    Without API keys every HTTP caller is an operator (``caller_scope``), so
    only a loopback address (127.0.0.0/8, ::1, ``localhost``) may be bound.
    Anything else (``0.0.0.0``, ``::``, a pod IP, a host name) needs keys.
    A service whose HTTP API serves tenants' data (``tenant_data``) needs
    keys on loopback too — any local process could read every tenant —
    unless ``allow_no_keys`` (``BATON_ALLOW_NO_API_KEYS``) opts out.
    """
    if api_keys:
        return None
    if not _loopback(host):
        return (
            f"refusing to serve HTTP on {host} without API keys: "
            "set BATON_API_KEYS (JSON, key -> tenant or '*') or bind BATON_HTTP_HOST=127.0.0.1"
        )
    if tenant_data and not allow_no_keys:
        return (
            "refusing to serve tenants' data over HTTP without API keys: set BATON_API_KEYS "
            "(JSON, key -> tenant or '*'; `baton up` writes them) or opt out with "
            "BATON_ALLOW_NO_API_KEYS=true (every local process may then read every tenant)"
        )
    return None


@dataclass(frozen=True)
class ServiceApp:
    """A service built on its bus: the HTTP app to serve and its NATS side."""

    app: FastAPI
    run: Callable[[], Awaitable[None]]


Start = Callable[[Bus], Awaitable[ServiceApp]]


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    name: str,
    settings: CommonSettings,
    start: Start,
) -> int:
    """Connect to NATS, build the service on the bus (``start``), then run
    its NATS side and the HTTP server until a signal. ``/readyz`` answers
    once the service is built (``Stack.wait_ready`` polls through a refused
    connection until then).

    On SIGTERM/SIGINT: the bus stops pulling, ``run`` returns once in-flight
    work is settled (the service decides how long that may take), then the
    HTTP server and the connection close. Work cannot be settled without
    NATS: unreachable for ``settings.shutdown_grace`` seconds in a row while
    stopping, ``run`` is cancelled, the connection closed without a flush,
    and the exit status is 1 (not 0: what it held was not settled here but is
    redelivered after its ack wait; 0 stays the sign of a clean drain).
    Returns the exit status.
    """
    bus = await connect(
        settings.nats_url,
        name=name,
        replicas=settings.stream_replicas,
        timeout=settings.connect_timeout,
        tls=tls_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key),
        creds=settings.nats_creds,
        home_region=settings.home_region,
    )
    loop = asyncio.get_running_loop()

    def stop() -> None:
        log.info("stopping")
        bus.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        service = await start(bus)
    except BaseException:
        await bus.close()
        raise
    server = _QuietServer(
        uvicorn.Config(
            service.app,
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    http = asyncio.create_task(server.serve())
    log.info(
        "started",
        nats=redact(settings.nats_url),
        http=f"{settings.http_host}:{settings.http_port}",
    )
    run = asyncio.ensure_future(service.run())
    cut = asyncio.create_task(_unreachable_while_stopping(bus, settings.shutdown_grace))
    abandoned = False
    try:
        await asyncio.wait({run, cut}, return_when=asyncio.FIRST_COMPLETED)
        abandoned = not run.done()
        if abandoned:
            log.error("stop_abandoned", reason="NATS unreachable", grace=settings.shutdown_grace)
        else:
            run.result()  # the NATS side's own failure, if any
    finally:
        cut.cancel()
        if abandoned:  # what the NATS side still awaits of NATS fails at once
            await bus.close(flush=False)
        if not run.done():  # abandoned, or serve itself cancelled
            run.cancel()
            await asyncio.wait({run}, timeout=2.0)
        server.should_exit = True
        server.force_exit = abandoned  # no wait for open HTTP connections
        with contextlib.suppress(Exception):
            await http
        await bus.close()  # (closed already when abandoned: nothing to do)
        tracing.shutdown()  # the spans still buffered are exported
        log.info("stopped")
    return 1 if abandoned else 0


async def _unreachable_while_stopping(bus: Bus, grace: float) -> None:
    """Return once the bus, stopping, has had no NATS for ``grace`` seconds
    in a row (counted from the stop at the earliest)."""
    await bus.wait_stopped()
    since = time.monotonic()
    while True:
        if bus.connected:
            since = time.monotonic()
        elif time.monotonic() - since >= grace:
            return
        await asyncio.sleep(min(0.2, grace))


def main_entry(
    name: str, settings: CommonSettings, start: Start, *, tenant_data: bool = False
) -> None:
    """Configure logging and ``serve`` the service ``start`` builds, with
    uvloop when available.

    Exits with ``serve``'s status (1: a stop abandoned without NATS), or
    with status 2 and one line on stderr, before anything starts, when
    the HTTP API needs API keys that are not configured (``bind_refusal``;
    ``tenant_data``: the service's HTTP API serves tenants' data) or the
    ``OTEL_*`` variables ask for an exporter Baton does not have.
    """
    refusal = bind_refusal(
        settings.http_host,
        settings.api_keys,
        tenant_data=tenant_data,
        allow_no_keys=settings.allow_no_api_keys,
    )
    if refusal is not None:
        print(f"baton-{name}: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    logs.configure(
        name, level=settings.log_level, json=settings.log_json, log_prompts=settings.log_prompts
    )
    if tenant_data and not settings.api_keys:
        warning = (
            "HTTP API WITHOUT AUTHENTICATION (BATON_ALLOW_NO_API_KEYS): every local "
            f"process can read and act on every tenant at {settings.http_host}"
        )
        print(f"baton-{name}: WARNING: {warning}", file=sys.stderr, flush=True)
        log.warning("http_without_api_keys", detail=warning)
    try:
        if tracing.setup(name):
            log.info("tracing_on", exporters=tracing.exporter_names(os.environ))
    except tracing.TracingConfigError as exc:
        print(f"baton-{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        import uvloop
    except ImportError:
        status = asyncio.run(serve(name, settings, start))
    else:
        status = uvloop.run(serve(name, settings, start))
    raise SystemExit(status)
