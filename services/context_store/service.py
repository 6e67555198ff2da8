"""The context store's NATS endpoints (request-reply, queue group
``context-store``) and its operator HTTP API.

Every request names a tenant twice, in the subject and in the body, and a
ref names it a third time: all must agree or the request is refused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import structlog
from fastapi import FastAPI, HTTPException
from nats.aio.msg import Msg

from baton import tracing
from baton.metrics import CONTEXT_REQUEST_SECONDS, CONTEXT_REQUESTS
from baton.service import Health, health_app
from baton.transport import HDR_TASK_ID, HDR_TRACEPARENT, Bus
from proto import codec, subjects
from proto.errors import LAYER_OF, ErrorCode
from proto.ids import is_valid_id
from proto.limits import MAX_CONTEXT_MESSAGE_BYTES
from proto.messages import (
    ContextAppend,
    ContextAppendReply,
    ErrorInfo,
    WindowReply,
    WindowRequest,
)
from proto.streams import CONTEXT

from .history import HistoryStore
from .refs import RefSigner
from .settings import ContextStoreSettings
from .window import BudgetTooSmall, build_window

log = structlog.get_logger("context_store")

QUEUE = "context-store"


class ContextError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, layer=LAYER_OF[self.code])


class ContextStore:
    """Append and window operations, independent of how requests arrive."""

    def __init__(self, history: HistoryStore, signer: RefSigner, default_budget: int) -> None:
        self.history = history
        self.signer = signer
        self.default_budget = default_budget

    async def append(self, req: ContextAppend) -> ContextAppendReply:
        for m in req.messages:
            if len(m.content.encode()) > MAX_CONTEXT_MESSAGE_BYTES:
                raise ContextError(
                    ErrorCode.MESSAGE_TOO_LARGE,
                    f"a message is over {MAX_CONTEXT_MESSAGE_BYTES} bytes",
                )
        if not req.messages:
            raise ContextError(ErrorCode.BAD_REQUEST, "append needs at least one message")
        session, version, dup = await self.history.append(
            req.tenant, req.session, req.msg_id, req.messages, req.system
        )
        ref = self.signer.sign(req.tenant, req.session, version)
        return ContextAppendReply(ref=ref, length=len(session.messages), duplicate=dup)

    async def window(self, req: WindowRequest) -> WindowReply:
        ref = req.ref
        if not self.signer.verify(ref):
            raise ContextError(ErrorCode.BAD_REF, "the context ref's signature does not verify")
        if ref.tenant != req.tenant:
            raise ContextError(ErrorCode.FORBIDDEN, "the ref belongs to another tenant")
        session = await self.history.load(ref.tenant, ref.session, at_least=ref.version)
        if len(session.messages) < ref.version or ref.version <= 0:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, "no such session or version")
        reply = WindowReply()
        if req.done_msg_id is not None and req.done_msg_id in session.versions:
            done = session.versions[req.done_msg_id]
            reply.existing = session.messages[done - 1]
            reply.existing_ref = self.signer.sign(ref.tenant, ref.session, done)
            return reply
        budget = req.budget_tokens or self.default_budget
        try:
            w = build_window(session.messages[: ref.version], session.tokens[: ref.version], budget)
        except BudgetTooSmall as exc:
            raise ContextError(ErrorCode.BUDGET_TOO_SMALL, str(exc)) from exc
        reply.messages, reply.tokens, reply.dropped = w.messages, w.tokens, w.dropped
        return reply


_REQUEST_TYPES: dict[str, tuple[type[Any], type[Any]]] = {
    "append": (ContextAppend, ContextAppendReply),
    "window": (WindowRequest, WindowReply),
}


class ContextEndpoints:
    """Serves ``baton.ctx.<op>.<tenant>`` over NATS."""

    def __init__(self, store: ContextStore, concurrency: int) -> None:
        self.store = store
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, bus: Bus) -> None:
        for op in _REQUEST_TYPES:
            await bus.nc.subscribe(f"{subjects.CONTEXT_API}.{op}.*", queue=QUEUE, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        _, _, op, tenant = msg.subject.split(".", 3)
        req_type, reply_type = _REQUEST_TYPES[op]
        headers = msg.headers or {}
        token = tracing.set_current(tracing.child_of(headers.get(HDR_TRACEPARENT)))
        outcome = "ok"
        try:
            with structlog.contextvars.bound_contextvars(
                op=op, tenant=tenant, task_id=headers.get(HDR_TASK_ID)
            ):
                try:
                    req = codec.decode(msg.data, req_type)
                    if not is_valid_id(tenant) or req.tenant != tenant:
                        raise ContextError(ErrorCode.FORBIDDEN, "tenant mismatch")
                    reply = await getattr(self.store, op)(req)
                except ContextError as exc:
                    outcome = exc.code
                    reply = reply_type(error=exc.info())
                except msgspec.DecodeError as exc:
                    outcome = ErrorCode.BAD_REQUEST
                    reply = reply_type(error=ContextError(ErrorCode.BAD_REQUEST, str(exc)).info())
                except Exception as exc:
                    log.exception("context_request_failed")
                    outcome = ErrorCode.CONTEXT_UNAVAILABLE
                    reply = reply_type(
                        error=ContextError(ErrorCode.CONTEXT_UNAVAILABLE, repr(exc)).info()
                    )
                if msg.reply:
                    await msg.respond(codec.encode(reply))
        finally:
            tracing._current.reset(token)
            self._slots.release()
            CONTEXT_REQUESTS.labels(op, outcome).inc()
            CONTEXT_REQUEST_SECONDS.labels(op).observe(time.perf_counter() - started)


def http_app(health: Health, get_store: Any) -> FastAPI:
    """Operator API: read a session (tenant-scoped)."""
    app = health_app("Baton context store", health)

    @app.get("/v1/sessions/{tenant}/{session}")
    async def read_session(tenant: str, session: str) -> dict[str, Any]:
        if not (is_valid_id(tenant) and is_valid_id(session)):
            raise HTTPException(400, "tenant and session must match [A-Za-z0-9_-]{1,64}")
        store: ContextStore | None = get_store()
        if store is None:
            raise HTTPException(503, "not ready")
        s = await store.history.load(tenant, session)
        if not s.messages:
            raise HTTPException(404, f"no session {session!r} for tenant {tenant!r}")
        return {
            "tenant": tenant,
            "session": session,
            "length": len(s.messages),
            "tokens_estimate": sum(s.tokens),
            "messages": [msgspec.to_builtins(m) for m in s.messages],
        }

    return app


async def run(bus: Bus, settings: ContextStoreSettings, health: Health, holder: list[Any]) -> None:
    await bus.provision(streams=[CONTEXT])
    store = ContextStore(
        HistoryStore(bus, cached_sessions=settings.cached_sessions),
        RefSigner(settings.signing_key()),
        settings.default_budget_tokens,
    )
    holder.append(store)
    for op in _REQUEST_TYPES:
        CONTEXT_REQUESTS.labels(op, "ok")
        CONTEXT_REQUEST_SECONDS.labels(op)
    endpoints = ContextEndpoints(store, settings.request_concurrency)
    await endpoints.start(bus)
    health.ready, health.reason = True, "serving"
    await bus.wait_stopped()
    health.ready, health.reason = False, "stopping"
