"""The tool worker: pull tool calls, run them, store their results. Once per
call, errors as the agent's tool message, cancellation and large results:
docs/tools.md, "The tool worker"."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass

import jsonschema
import structlog
from jsonschema.protocols import Validator

from baton import context_client as context
from baton.bus import Bus, Delivery, Nak, Term
from baton.cancelled import CancelledTasks
from baton.context_client import P, Q
from baton.service import Health
from baton.stopwatch import Stopwatch
from proto import codec, keys, subjects
from proto import context_api as ctxapi
from proto.context_api import Endpoint
from proto.errors import ErrorCode
from proto.messages import (
    Cancel,
    ChatMessage,
    ContextAnswer,
    ContextAttach,
    ContextRef,
    ErrorInfo,
    ToolCatalog,
    ToolJob,
    ToolResult,
    WindowRequest,
)
from proto.sizes import INLINE_TOOL_RESULT_BYTES, MAX_TOOL_OUTPUT_BYTES
from proto.streams import DOCUMENTS, TOOL_CATALOG, TOOL_RESULTS, TOOLS, tool_consumer
from proto.tools import INVALID_CALL

from . import metrics as m
from . import spans
from .documents import DocumentIndexer
from .settings import ToolWorkerSettings
from .tools import (
    CallContext,
    Tool,
    ToolError,
    ToolOutput,
    arguments_validator,
    parse_arguments,
    spec_of,
)
from .tools.mcp import McpServer, connect_all
from .tools.python import PythonTool, SandboxLimits
from .tools.search import SearchIndex, SearchTool

log = structlog.get_logger("tool_worker")

PREVIEW_CHARS = 512


@dataclass(slots=True)
class CallOutput:
    """What one call produced: the tool message's content, or an error."""

    content: str
    error: ErrorInfo | None = None
    cpu_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return "ok" if self.error is None else self.error.code


def error_content(err: ErrorInfo) -> str:
    """The tool message an agent reads when its call failed."""
    return json.dumps({"error": {"code": err.code, "message": err.message}}, ensure_ascii=False)


def attachment_name(call_id: str) -> str:
    return "tool-" + hashlib.sha1(call_id.encode()).hexdigest()[:32]


class ToolWorker:
    def __init__(self, settings: ToolWorkerSettings, health: Health, bus: Bus) -> None:
        unknown = set(settings.builtin_tools) - {"search", "python"}
        if unknown:
            raise ValueError(f"unknown built-in tools {sorted(unknown)}")
        self.s = settings
        self.health = health
        self.bus = bus
        self.consumer = tool_consumer(settings.pool, settings.tool_ack_wait)
        self.tools: dict[str, Tool] = {}
        self.validators: dict[str, Validator] = {}  # by tool; none for an invalid schema
        self.indexer: DocumentIndexer | None = None  # with the built-in search only
        if "search" in settings.builtin_tools:
            self.indexer = DocumentIndexer(bus, SearchIndex(settings.index_path()))
        # with the built-in python only; its spares start with the tools (load_tools)
        self.python = PythonTool(self.limits()) if "python" in settings.builtin_tools else None
        self.mcp: list[McpServer] = []
        self._labels = (settings.pool, settings.worker_id)
        self._inflight = 0
        self.cancelled = CancelledTasks()
        self._calls: dict[tuple[str, str], set[asyncio.Task[CallOutput]]] = {}

    # -- tools -------------------------------------------------------------

    def limits(self) -> SandboxLimits:
        s = self.s
        return SandboxLimits(
            cpu_seconds=s.sandbox_cpu_seconds, memory_bytes=s.sandbox_memory_bytes,
            processes=s.sandbox_processes, output_bytes=s.sandbox_output_bytes,
            slots=s.sandbox_slots, uid_base=s.sandbox_uid_base, spares=s.sandbox_spares,
        )  # fmt: skip

    async def load_tools(self) -> None:
        if self.indexer is not None:
            await self.indexer.start()
            self.tools["search"] = SearchTool(self.indexer.index, self.indexer.caught_up)
        if self.python is not None:
            self.python.start_spares()
            self.tools["python"] = self.python
        self.mcp = await connect_all(self.s.mcp_servers)
        for server in self.mcp:
            self.tools.update(server.tools)
        for name, tool in self.tools.items():
            try:
                self.validators[name] = arguments_validator(tool)
            except jsonschema.SchemaError as exc:  # its calls fail; the others' run
                log.warning("tool_schema_invalid", tool=name, error=exc.message)

    async def publish_catalog(self) -> None:
        bucket = await self.bus.ensure_bucket(TOOL_CATALOG)
        specs = [spec_of(t) for _, t in sorted(self.tools.items())]
        catalog = ToolCatalog(
            pool=self.s.pool, worker=self.s.worker_id, ts=time.time(), tools=specs
        )
        await bucket.put(self.s.pool, codec.encode(catalog))

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        bus = self.bus
        await bus.provision(streams=[TOOLS, TOOL_RESULTS, DOCUMENTS], consumers=[self.consumer])
        try:
            await self.load_tools()
            m.init_series(sorted(self.tools), *self._labels)
            await self.publish_catalog()
            self.health.ready, self.health.reason = True, "serving"
            self.health.checks = {"tools": True}
            m.READY.labels(*self._labels).set(1)
            await bus.subscribe(f"{subjects.CANCEL}.*.*", Cancel, self._on_cancel)
            log.info("tool_worker_ready", tools=sorted(self.tools), pool=self.s.pool)
            await bus.consume(self.consumer, self.handle, concurrency=self.s.concurrency)
        finally:
            self.health.ready, self.health.reason = False, "stopped"
            m.READY.labels(*self._labels).set(0)
            for server in self.mcp:
                await server.stop()
            if self.indexer is not None:
                self.indexer.index.close()
            if self.python is not None:
                self.python.close()

    # -- one call ----------------------------------------------------------

    async def handle(self, d: Delivery) -> None:
        job = d.decode(ToolJob)  # undecodable: dead-lettered by the transport
        # Only a redelivery or a later dispatch (``<call_id>#<attempt>``) may
        # find the result stored already.
        fresh = d.num_delivered == 1 and d.msg_id == job.call_id
        with (
            structlog.contextvars.bound_contextvars(
                task_id=job.task_id, call_id=job.call_id, tool=job.tool
            ),
            spans.execute_tool(job),
        ):
            await self._handle(job, Stopwatch(job.published_at or d.published_at), fresh=fresh)

    async def _on_cancel(self, cancel: Cancel, _subject: str) -> None:
        key = (cancel.tenant, cancel.task_id)
        self.cancelled.add(*key)
        for call in self._calls.get(key, ()):
            call.cancel()

    async def _run(self, job: ToolJob) -> CallOutput | None:
        """Execute the call as a task of its own, which a cancel of its task
        cancels; None when it was (or its task was before it started)."""
        key = (job.tenant, job.task_id)
        if key in self.cancelled:
            return None
        call = asyncio.create_task(self.execute(job))
        self._calls.setdefault(key, set()).add(call)
        try:
            return await call
        except asyncio.CancelledError:
            if key not in self.cancelled or not call.cancelled():
                raise  # the worker itself is stopping
            return None
        finally:
            calls = self._calls.get(key)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._calls[key]

    async def _handle(self, job: ToolJob, watch: Stopwatch, *, fresh: bool = False) -> None:
        """``watch`` times the call's phases: queue, context (a look-up of a
        result stored before), tool (its run) and record (storing the result)."""
        if (job.tenant, job.task_id) in self.cancelled:
            m.CALLS.labels(job.tool, "cancelled").inc()
            log.info("tool_call_cancelled", queued=True)
            return
        m.QUEUE_WAIT.labels(self.s.pool).observe(max(0.0, watch.started_at - watch.queued_at))
        out_id = keys.tool_output(job.call_id)
        if not fresh and await self._republish_stored(job, out_id, watch):
            return
        self._inflight += 1
        m.INFLIGHT.labels(*self._labels).set(self._inflight)
        try:
            outcome = await self._run(job)
        finally:
            self._inflight -= 1
            m.INFLIGHT.labels(*self._labels).set(self._inflight)
            watch.lap("tool")
        if outcome is None:
            m.CALLS.labels(job.tool, "cancelled").inc()
            log.info("tool_call_cancelled")
            return
        m.CALLS.labels(job.tool, outcome.label).inc()
        m.SECONDS.labels(job.tool).observe(outcome.seconds)
        m.CPU_SECONDS.labels(job.tool).inc(outcome.cpu_seconds)
        content, attachment = await self._fit(job, outcome)
        message = ChatMessage(role="tool", content=content, name=job.tool,
                              tool_call_id=job.tool_call_id or job.call_id)  # fmt: skip
        result = self._result(job, None, message, outcome, watch, attachment=attachment)
        stored = await self._answer(job, message, result)
        if stored is None:  # stored, and its result published by the store
            return
        # A result stored before after all (a dispatch republished past the
        # stream's de-duplication window): the history holds that one, so
        # that one is published.
        if await self._republish_stored(job, out_id, watch):
            return
        result.ref = stored
        await self._publish(job, result)

    async def _republish_stored(self, job: ToolJob, out_id: str, watch: Stopwatch) -> bool:
        """Publish the call's stored result again, if the session holds one."""
        watch.lap("record")  # a look-up after the append is part of storing it
        stored = await self._stored(job, out_id)
        watch.lap("context")
        if stored is None:
            return False
        ref, message = stored
        m.CALLS.labels(job.tool, "reused").inc()
        log.info("tool_result_reused")
        await self._publish(
            job, self._result(job, ref, message, CallOutput(message.content), watch, reused=True)
        )
        return True

    async def execute(self, job: ToolJob) -> CallOutput:
        """Run the call; every way it can go wrong becomes an error outcome."""
        started = time.perf_counter()
        tool = self.tools.get(job.tool)
        timeout = min(job.timeout or self.s.tool_timeout, self.s.max_tool_timeout)
        try:
            if job.tool == INVALID_CALL:
                why = f"the model's tool call could not be read: {job.arguments[:300]}"
                raise ToolError(ErrorCode.BAD_TOOL_ARGUMENTS, why)
            if tool is None:
                raise ToolError(ErrorCode.UNKNOWN_TOOL, f"no tool {job.tool!r} in this pool")
            validator = self.validators.get(job.tool)
            if validator is None:
                raise ToolError(ErrorCode.TOOL_FAILED, "the tool's arguments schema is invalid")
            args = parse_arguments(validator, job.arguments)
            ctx = CallContext(job.tenant, job.task_id, job.call_id, timeout)
            # The tool's own limit comes first (the sandbox kills on wall time);
            # this one catches a tool that ignores it.
            result: ToolOutput = await asyncio.wait_for(tool.run(args, ctx), timeout + 5.0)
        except ToolError as exc:
            return CallOutput("", ErrorInfo.of(exc.code, exc.message), exc.cpu_seconds,
                           time.perf_counter() - started)  # fmt: skip
        except TimeoutError:
            err = ErrorInfo.of(ErrorCode.TOOL_TIMEOUT, f"no result within {timeout:.0f}s")
            return CallOutput("", err, seconds=time.perf_counter() - started)
        except Exception as exc:  # a tool's bug is the agent's error, not the worker's
            log.exception("tool_crashed")
            err = ErrorInfo.of(ErrorCode.TOOL_FAILED, f"{type(exc).__name__}: {exc}")
            return CallOutput("", err, seconds=time.perf_counter() - started)
        seconds = time.perf_counter() - started
        size = len(result.text.encode())
        if size > MAX_TOOL_OUTPUT_BYTES:
            err = ErrorInfo.of(
                ErrorCode.TOOL_OUTPUT_TOO_LARGE,
                f"the result is {size} bytes; the limit is {MAX_TOOL_OUTPUT_BYTES}",
            )
            return CallOutput("", err, result.cpu_seconds, seconds)
        return CallOutput(result.text, None, result.cpu_seconds, seconds)

    async def _fit(self, job: ToolJob, outcome: CallOutput) -> tuple[str, str | None]:
        """The tool message's content; a large result goes to an attachment."""
        if outcome.error is not None:
            return error_content(outcome.error), None
        data = outcome.content.encode()
        if len(data) <= INLINE_TOOL_RESULT_BYTES:
            return outcome.content, None
        name = attachment_name(job.call_id)
        reply = await self._context(
            ctxapi.ATTACH,
            ContextAttach(tenant=job.tenant, session=job.session, name=name, data=data,
                          media_type="text/plain; charset=utf-8"), job,
        )  # fmt: skip
        if reply.error is not None and reply.error.code != ErrorCode.CONFLICT:
            raise Nak(1.0, f"attachment refused: {reply.error.code}")
        head = data[: INLINE_TOOL_RESULT_BYTES // 2].decode("utf-8", "ignore")
        note = f"\n[… {len(data)} bytes in all; the full result is attachment {name}]"
        return head + note, name

    # -- context -----------------------------------------------------------

    async def _context(self, endpoint: Endpoint[Q, P], body: Q, job: ToolJob) -> P:
        return await context.call(self.bus, endpoint, body, task_id=job.task_id)

    async def _stored(
        self, job: ToolJob, out_id: str
    ) -> tuple[ContextRef | None, ChatMessage] | None:
        """The call's result if the session holds it already (needs the job's ref)."""
        if job.ref is None:
            return None
        reply = await self._context(
            ctxapi.WINDOW,
            WindowRequest(tenant=job.tenant, ref=job.ref, budget_tokens=0, done_msg_id=out_id),
            job,
        )
        if reply.existing is None:
            return None
        return reply.existing_ref, reply.existing

    async def _answer(
        self, job: ToolJob, message: ChatMessage, result: ToolResult
    ) -> ContextRef | None:
        """Have the context store append the tool message and publish
        ``result`` (one request, acked by JetStream: ``ContextAnswer``).
        Returns None then, or, when the call's output was stored before, the
        ref the store returned for it (nothing published)."""
        body = ContextAnswer(tenant=job.tenant, answer=message, tool_result=result,
                             attempt=job.attempt)  # fmt: skip
        reply = await context.answer(self.bus, body, task_id=job.task_id)
        if reply.error is not None:
            if reply.error.code == ErrorCode.CONTEXT_UNAVAILABLE:
                raise Nak(1.0, f"context append failed: {reply.error.code}")
            raise Term(f"context append refused: {reply.error.code}: {reply.error.message}")
        return reply.ref if reply.duplicate else None

    def _result(
        self,
        job: ToolJob,
        ref: ContextRef | None,
        message: ChatMessage,
        outcome: CallOutput,
        watch: Stopwatch,
        *,
        reused: bool = False,
        attachment: str | None = None,
    ) -> ToolResult:
        watch.lap("record")
        error = outcome.error
        if reused and message.content.startswith('{"error"'):
            error = _stored_error(message.content)
        result = ToolResult(
            call_id=job.call_id, task_id=job.task_id, tenant=job.tenant, session=job.session,
            step=job.step, tool=job.tool, worker=self.s.worker_id,
            outcome="ok" if error is None else error.code, ref=ref,
            preview=message.content[:PREVIEW_CHARS], attachment=attachment,
            size=len(outcome.content.encode()) if error is None else 0,
            cpu_seconds=round(outcome.cpu_seconds, 6), seconds=round(outcome.seconds, 6),
            reused=reused, timing=watch.timing(), error=error,
        )  # fmt: skip
        spans.finished(result)
        return result

    async def _publish(self, job: ToolJob, result: ToolResult) -> None:
        """A result stored before, published again (its ``ref`` the stored one)."""
        subject = subjects.tool_result(job.tenant, job.task_id)
        msg_id = keys.tool_result(job.call_id, job.attempt)
        await self.bus.publish(subject, result, msg_id=msg_id, task_id=job.task_id)


def _stored_error(content: str) -> ErrorInfo | None:
    try:
        err = json.loads(content)["error"]
        return ErrorInfo.of(ErrorCode(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return None
