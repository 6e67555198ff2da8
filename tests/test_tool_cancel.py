"""Cancelling a task reaches its tool calls: a running sandbox is killed
with its whole process tree at once (not at its timeout), a queued call of
the task is skipped, nothing is stored or published for either, and the
worker serves the next call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from baton.bus import Bus
from baton.dev.testing import LocalStack, metric, uid
from proto import codec, subjects
from proto.messages import Cancel, ContextGet, ToolResult
from tests.ctx import ask
from tests.tools import call_tool, publish_tool_job, sandbox_processes, session_with_call

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")

UID_BASE = 63000  # this test's sandbox users, told apart from other tests'
# A program that outlives its own process group: its child leaves the session.
SLEEPER = "import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(120)"


@pytest.fixture(scope="module")
def pool(stack: LocalStack) -> Iterator[tuple[str, str]]:
    name = uid("cnl")
    proc = stack.tool_worker(BATON_POOL=name, BATON_SANDBOX_SLOTS="1", BATON_SANDBOX_UID_BASE=str(UID_BASE),
                             BATON_BUILTIN_TOOLS='["python"]').wait_ready()  # fmt: skip
    yield name, proc.url
    stack.retire(proc)


def sandboxed() -> list[psutil.Process]:
    return sandbox_processes(UID_BASE, 64)


def programs() -> int:
    """The sandboxed program's processes (parent and forked child)."""
    n = 0
    for p in sandboxed():
        with contextlib.suppress(psutil.Error):
            n += "main.py" in p.cmdline() and "bwrap" not in p.cmdline()[0]
    return n


async def publish_call(bus: Bus, pool: str, tenant: str, task_id: str, call: str) -> str:
    """Publish a call of the sleeper in a session of its own; returns the session."""
    session = uid("s")
    ref = await session_with_call(bus, tenant, session)
    await publish_tool_job(bus, tenant, session, ref, "python", {"code": SLEEPER},
                           call=call, task_id=task_id, pool=pool, job_timeout=100)  # fmt: skip
    return session


async def tool_messages(bus: Bus, tenant: str, session: str) -> list[str]:
    h = await ask(bus, "get", ContextGet(tenant=tenant, session=session))
    return [m.content for m in h.messages if m.role == "tool"]


async def test_cancelling_a_task_kills_its_running_sandbox_and_skips_its_queued_calls(
    bus: Bus, pool: tuple[str, str]
) -> None:
    name, url = pool
    tenant, task_id = "acme", uid("task")
    results: list[ToolResult] = []

    async def on_result(msg: Any) -> None:
        results.append(codec.decode(msg.data, ToolResult))

    sub = await bus.subscribe_raw(subjects.tool_result(tenant, task_id), on_result)
    try:
        running = await publish_call(bus, name, tenant, task_id, "c0")
        async with asyncio.timeout(20):
            while programs() < 2:  # the program and its forked child run
                await asyncio.sleep(0.05)
        # The pool has one sandbox slot: this call of the task waits behind c0.
        queued = await publish_call(bus, name, tenant, task_id, "c1")
        await asyncio.sleep(0.5)
        before = metric(url, "baton_tool_calls_total", tool="python", outcome="cancelled")
        await bus.notify(subjects.cancel(tenant, task_id), Cancel(tenant=tenant, task_id=task_id))
        async with asyncio.timeout(5):  # at once, not after the program's 120 s
            while sandboxed():
                await asyncio.sleep(0.05)
        # A call of the cancelled task published afterwards is skipped too.
        later = await publish_call(bus, name, tenant, task_id, "c2")
        async with asyncio.timeout(10):
            while metric(url, "baton_tool_calls_total", tool="python",
                         outcome="cancelled") < before + 3:  # fmt: skip
                await asyncio.sleep(0.1)
        assert sandboxed() == []  # neither c1 nor c2 ran
        await asyncio.sleep(0.5)
        assert results == []  # nothing published for a cancelled call
        for session in (running, queued, later):  # and nothing stored
            assert await tool_messages(bus, tenant, session) == []
    finally:
        await sub.unsubscribe()
    # The worker lives on: another task's call runs.
    other = uid("s")
    ref = await session_with_call(bus, tenant, other)
    res = await call_tool(bus, tenant, other, ref, "python", {"code": "print(6 * 7)"}, pool=name,
                          task_id=uid("task"))  # fmt: skip
    assert res.outcome == "ok" and json.loads(res.preview)["stdout"] == "42\n"
