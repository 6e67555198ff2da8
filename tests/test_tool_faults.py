"""A tool worker SIGKILLed mid-call: the call is redelivered to another
worker, runs once more, and the session holds its result once."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from baton.bus import connect
from baton.dev.testing import LocalStack, metric, uid
from baton.natsd import NatsServer
from proto.messages import ContextGet
from tests.ctx import ask
from tests.tools import call_tool, session_with_call

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


async def test_a_call_cut_off_by_a_killed_worker_runs_again_and_is_stored_once(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    stack = LocalStack(own_nats.url, tmp_path / "s", env={"BATON_TOOL_ACK_WAIT": "2"})
    stack.workdir.mkdir(parents=True)
    stack.service("context-store").wait_ready()
    first = stack.tool_worker(BATON_SANDBOX_UID_BASE="64000").wait_ready()
    bus = await connect(own_nats.url, name="test-kill")
    try:
        tenant, session = uid("acme"), uid("s")
        ref = await session_with_call(bus, tenant, session)
        code = "import time\ntime.sleep(3)\nprint('finished')"
        pending = asyncio.create_task(
            call_tool(bus, tenant, session, ref, "python", {"code": code}, timeout=60)
        )
        deadline = time.monotonic() + 20
        while metric(first.url, "baton_tool_inflight_calls") < 1:
            assert time.monotonic() < deadline, "the call never started"
            await asyncio.sleep(0.05)
        first.kill()  # SIGKILL mid-call: nothing stored, nothing acked
        second = stack.tool_worker(BATON_SANDBOX_UID_BASE="64100").wait_ready()
        res = await pending
        assert res.outcome == "ok" and not res.reused and res.worker != ""
        assert '"finished' in res.preview
        assert metric(second.url, "baton_tool_calls_total", tool="python", outcome="ok") == 1
        h = await ask(bus, "get", ContextGet(tenant=tenant, session=session))
        assert [m.role for m in h.messages].count("tool") == 1
    finally:
        await bus.close()
        stack.stop()
