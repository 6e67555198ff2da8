"""Helpers for tool worker tests: publish a ``ToolJob``, wait for its ``ToolResult``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import psutil

from baton.bus import Bus
from proto import codec, keys, subjects
from proto.messages import ContextRef, ToolJob, ToolResult
from tests.ctx import append


async def session_with_call(
    bus: Bus, tenant: str, session: str, text: str = "use a tool"
) -> ContextRef:
    """A session whose last message asks for a tool: the ref a tool job carries."""
    reply = await append(bus, tenant, session, "input", text, system="you call tools")
    assert reply.ref is not None
    return reply.ref


async def publish_tool_job(
    bus: Bus, tenant: str, session: str, ref: ContextRef | None, tool: str,
    args: dict[str, Any] | str, *, call: str = "c0", task_id: str = "task", pool: str = "default",
    job_timeout: float = 0.0, step: str = "r1.s", msg_id: str | None = None, attempt: int = 1,
) -> str:  # fmt: skip
    """Publish one tool job; returns its call id."""
    call_id = keys.tool_call(tenant, task_id, step, call)
    job = ToolJob(
        call_id=call_id, task_id=task_id, tenant=tenant, session=session, step=step,
        tool=tool, arguments=args if isinstance(args, str) else json.dumps(args),
        tool_call_id=f"call_{call}", ref=ref, timeout=job_timeout, attempt=attempt,
    )  # fmt: skip
    await bus.publish(subjects.tool_job(pool), job, task_id=task_id,
                      msg_id=msg_id or keys.job_message(call_id, attempt))  # fmt: skip
    return call_id


async def call_tool(
    bus: Bus, tenant: str, session: str, ref: ContextRef | None, tool: str,
    args: dict[str, Any] | str, *, call: str = "c0", task_id: str = "task", pool: str = "default",
    timeout: float = 30.0, job_timeout: float = 0.0, step: str = "r1.s", msg_id: str | None = None,
) -> ToolResult:  # fmt: skip
    """Publish one tool job and return its result (a core subscription sees
    the result as it is stored)."""
    got: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
    call_id = keys.tool_call(tenant, task_id, step, call)

    async def on_msg(msg: Any) -> None:
        res = codec.decode(msg.data, ToolResult)
        if res.call_id == call_id and not got.done():
            got.set_result(res)

    sub = await bus.subscribe_raw(subjects.tool_result(tenant, task_id), on_msg)
    try:
        await publish_tool_job(bus, tenant, session, ref, tool, args, call=call, task_id=task_id,
                               pool=pool, job_timeout=job_timeout, step=step, msg_id=msg_id)  # fmt: skip
        return await asyncio.wait_for(got, timeout)
    finally:
        await sub.unsubscribe()


def sandbox_processes(uid_base: int, users: int) -> list[psutil.Process]:
    """Processes running as one of a test's sandbox users (``uid_base`` and
    the ``users`` after it) other than idle spares: what a sandboxed call
    left running. A spare is an interpreter named ``baton-spare`` (it has run
    nothing yet) and the bubblewrap processes above it; a program it was
    given, or anything that program forked, is named otherwise."""
    procs = [p for p in psutil.process_iter(["uids", "name"])
             if uid_base <= p.info["uids"].real < uid_base + users]  # fmt: skip
    idle: set[int] = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            below = p.children(recursive=True)
            names = {c.name() for c in below}
            if p.info["name"] == "baton-spare" or (
                p.info["name"] == "bwrap"
                and "baton-spare" in names
                and names <= {"bwrap", "baton-spare"}
            ):
                idle.add(p.pid)
    return [p for p in procs if p.pid not in idle]
