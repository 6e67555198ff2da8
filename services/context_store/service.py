"""The context store's NATS side: request-reply endpoints on
``baton.ctx.<op>.<tenant>`` (queue group ``context-store``), the cache
invalidation broadcast every replica hears, and the retention sweeper.

Every request names a tenant twice, in the subject and in the body, and a
ref names it a third time: all must agree or the request is refused.
Errors are structured replies (``error = {code, message, layer}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from baton import tracing
from baton.bus import TRANSIENT, Bus, Request
from baton.service import Health, ServiceApp
from baton.tenants import TenantKeys
from proto import codec, keys, subjects
from proto.context_api import ANSWER, ENDPOINTS, AnswerTarget, answer_target
from proto.errors import ErrorCode
from proto.ids import is_valid_id
from proto.messages import ContextAnswer, ContextAppendReply, ContextInvalidate
from proto.streams import AUDIT, CONTEXT, CONTEXT_ATTACHMENTS, DOCUMENTS, ERASURES

from .admin import Admin
from .counting import TokenCounter
from .errors import ContextError
from .history import HistoryStore
from .http import http_app
from .metrics import CONTEXT_REQUEST_SECONDS, CONTEXT_REQUESTS
from .refs import RefSigner
from .regions import TenantRegions
from .retention import Retention, run_sweeper
from .settings import ContextStoreSettings
from .store import ContextStore

log = structlog.get_logger("context_store")

QUEUE = "context-store"

# Below the callers' 5 s request timeout, so an op that recovers in time answers.
RETRY_WINDOW = 3.0


class Unavailable(Exception):
    """JetStream stayed unavailable for the whole retry window: leave the
    request unanswered so the caller retries it later."""


# op -> (request type, reply type): the contract's table (proto/context_api.py).
REQUEST_TYPES: dict[str, tuple[type[Any], type[Any]]] = {
    op: (e.request, e.reply) for op, e in ENDPOINTS.items()
}


def handlers(store: ContextStore, admin: Admin) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    return {
        "append": store.append,
        "answer": store.answer,
        "window": store.window,
        "fork": store.fork,
        "summarize": store.summarize,
        "get": admin.get,
        "delete": admin.delete,
        "stats": admin.stats,
        "attach": admin.attach,
    }


class ContextEndpoints:
    """Serves ``baton.ctx.<op>.<tenant>`` over NATS."""

    def __init__(self, store: ContextStore, admin: Admin, concurrency: int) -> None:
        self.store = store
        self.admin = admin
        self._handlers = handlers(store, admin)
        self.concurrency = concurrency

    async def start(self, bus: Bus) -> None:
        ops = [f"{subjects.CONTEXT_API}.{op}.*" for op in REQUEST_TYPES]
        await bus.serve(ops, self.answer, queue=QUEUE, concurrency=self.concurrency)
        # No queue group: every replica must hear an invalidation.
        await bus.subscribe(
            f"{subjects.CONTEXT_INVALIDATE}.*", ContextInvalidate, self._on_invalidate
        )

    async def _on_invalidate(self, inv: ContextInvalidate, _subject: str) -> None:
        self.store.history.forget(inv.tenant, inv.session)

    async def answer(self, req: Request) -> Any:
        started = time.perf_counter()
        _, _, op, tenant = req.subject.split(".", 3)
        outcome = "ok"
        attrs = {"baton.tenant": tenant}
        try:
            with (
                structlog.contextvars.bound_contextvars(op=op, tenant=tenant),
                tracing.span(
                    f"context {op}", kind=tracing.SpanKind.SERVER, attributes=attrs, layer="context"
                ),
            ):
                try:
                    reply = await self.dispatch(op, tenant, req.data, req.reply)
                except Unavailable:
                    # No answer: the caller's timeout retries it (a nak), where
                    # "context_unavailable" would fail its task for good.
                    outcome = "unanswered"
                    tracing.set_attributes({}, ("unanswered", "JetStream unavailable", "context"))
                    return None
                if reply is None:  # JetStream's ack of the published result answers
                    return None
                if reply.error is not None:
                    outcome = reply.error.code
                    err = reply.error
                    tracing.set_attributes({}, (str(err.code), err.message, str(err.layer)))
                return reply
        finally:
            CONTEXT_REQUESTS.labels(op, outcome).inc()
            CONTEXT_REQUEST_SECONDS.labels(op).observe(time.perf_counter() - started)

    async def dispatch(self, op: str, tenant: str, data: bytes, reply_to: str = "") -> Any:
        """Decode, check the tenant, run the op; every failure becomes a reply.
        None: an ``answer`` whose result was published with ``reply_to`` as
        its reply subject (JetStream's ack of it is the reply)."""
        req_type, reply_type = REQUEST_TYPES[op]
        try:
            req = codec.decode(data, req_type)
            if not is_valid_id(tenant) or req.tenant != tenant:
                raise ContextError(ErrorCode.FORBIDDEN, "the body's tenant is not the subject's")
            if op != ANSWER.op:
                return await self._retrying(op, req)
            # The answer's append and its last token delta at once, both
            # before the result: a reader that stops at the task's end event
            # has every delta (``follow.py``).
            reply, _ = await asyncio.gather(self._retrying(op, req), self._publish_delta(req))
            if reply.error is not None or (reply.duplicate and req.tool_result is not None):
                return reply  # a tool's output stored before: its worker republishes that one
            return await self._publish_result(answer_target(req), reply_to)
        except ContextError as exc:
            return reply_type(error=exc.info())
        except msgspec.DecodeError as exc:
            return reply_type(error=ContextError(ErrorCode.BAD_REQUEST, str(exc)).info())
        except Unavailable:
            raise
        except Exception as exc:
            log.exception("context_request_failed")
            err = ContextError(ErrorCode.CONTEXT_UNAVAILABLE, type(exc).__name__)
            return reply_type(error=err.info())

    async def _publish_delta(self, req: ContextAnswer) -> None:
        """A model step's final token delta, if any. Best effort, as every
        delta: one that cannot be stored leaves the stream short of the
        answer's end (readers have the answer from the events), never the
        answer unstored."""
        delta, res = req.last_delta, req.result
        if delta is None or res is None:
            return
        mine = (req.tenant, res.task_id)  # the subject's tenant (checked by ``dispatch``)
        if (delta.tenant, delta.task_id) != mine or res.tenant != req.tenant:
            return
        msg_id = keys.token_delta(res.job_id, delta.attempt, delta.index)
        try:
            await self.store.bus.publish(subjects.tokens(req.tenant, res.task_id), delta,
                                         msg_id=msg_id, task_id=res.task_id)  # fmt: skip
        except Exception as exc:
            log.warning("token_publish_failed", error=repr(exc), step=delta.step)

    async def _publish_result(
        self, target: AnswerTarget, reply_to: str
    ) -> ContextAppendReply | None:
        """The answer is stored: publish its result (``ref`` set by
        ``store.answer``) for the orchestrator, with ``reply_to`` — the
        worker's inbox — as the reply subject, so JetStream's ack of the
        result reaches the worker without a reply from here: one publish
        fewer, and one hop fewer before the orchestrator has the result."""
        res, task_id = target.result, target.task_id
        if not reply_to:  # no one waits for the ack: wait for it here
            await self.store.bus.publish(target.subject, res, msg_id=target.result_id,
                                         task_id=task_id)  # fmt: skip
            return ContextAppendReply(ref=res.ref)
        await self.store.bus.publish_for(target.subject, res, reply=reply_to,
                                         msg_id=target.result_id, task_id=task_id)  # fmt: skip
        return None

    async def _retrying(self, op: str, req: Any) -> Any:
        """Run the op; a transient JetStream failure (a stream leader being
        elected, a node restarting) is retried for up to ``RETRY_WINDOW``
        seconds (every op is idempotent), then raises ``Unavailable``."""
        deadline = time.monotonic() + RETRY_WINDOW
        delay = 0.1
        while True:
            try:
                return await self._handlers[op](req)
            except TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("context_request_unavailable", error=type(exc).__name__)
                    raise Unavailable(type(exc).__name__) from exc
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)


def build_store(
    bus: Bus, settings: ContextStoreSettings, regions: TenantRegions | None = None
) -> tuple[ContextStore, Admin]:
    counter = TokenCounter(settings.tokenizer)
    history = HistoryStore(
        bus, cached_sessions=settings.cached_sessions, count=counter.count, regions=regions
    )
    history.regions.on_moved = history.forget
    store = ContextStore(
        bus, history, RefSigner(settings.signing_key()), counter, settings.default_budget_tokens
    )
    return store, Admin(store)


async def start(bus: Bus, settings: ContextStoreSettings, health: Health) -> ServiceApp:
    """The store built on its streams: its operator HTTP API and the NATS side."""
    await bus.provision(streams=[CONTEXT, CONTEXT_ATTACHMENTS, ERASURES, AUDIT, DOCUMENTS])
    # Each region's own pair, for the regions the tenant registry names.
    regions = TenantRegions(bus)
    suspended: set[str] = set()  # the registry's; their keys are refused (403)
    # A run-time tenant's key, rotated, suspended, deleted (``live_keys``).
    regions.on_entry = TenantKeys(settings.api_keys, suspended).apply
    await regions.start()
    store, admin = build_store(bus, settings, regions)
    app = http_app(health, admin, settings.api_keys, suspended)
    return ServiceApp(app, lambda: run(bus, settings, health, store, admin))


async def run(
    bus: Bus, settings: ContextStoreSettings, health: Health, store: ContextStore, admin: Admin
) -> None:
    for op in REQUEST_TYPES:
        CONTEXT_REQUESTS.labels(op, "ok")
        CONTEXT_REQUEST_SECONDS.labels(op)
    endpoints = ContextEndpoints(store, admin, settings.request_concurrency)
    await endpoints.start(bus)
    retention = Retention(settings.retention_seconds, settings.retention_per_tenant)
    sweeper = asyncio.create_task(run_sweeper(admin, retention, settings.retention_sweep_interval))
    registry = asyncio.create_task(admin.regions.follow())
    health.ready, health.reason = True, "serving"
    log.info("context_store_ready", tokens=store.counter.name, retention=retention.enabled)
    await bus.wait_stopped()
    health.ready, health.reason = False, "stopping"
    for task in (sweeper, registry):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
