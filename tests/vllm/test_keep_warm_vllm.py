"""Keep-warm across a tool call on real vLLM-CPU: while a model turn's tool
call is out, the orchestrator warms the step's own prefix again on the
worker that ran the turn (``prewarm.own``, docs/scheduling.md, "Kept warm
across a wait"), so the turn after the call finds it in vLLM's prefix cache
even when everything cached was evicted meanwhile.

Real parts: the orchestrator, context store and tool worker as processes, a
real MCP server (over stdio) whose ``lookup`` takes ``LOOKUP_S``, Baton's
worker on the session's shared engine (the tiny model). The eviction is
vLLM's own ``reset_prefix_cache`` as the call goes out: what other traffic
does to an idle prefix, at once (``python -m bench prewarm`` evicts it with
real traffic and measures the time to first token). The cached tokens are
vLLM's count, as the turn's result carries them. The same run with the keep
off (``BATON_PREWARM_KEEP_EVERY=0``) is the control: nothing is cached."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.dev.inprocess import inprocess_worker
from baton.dev.testing import (
    Client,
    LocalStack,
    http_get,
    metric,
    next_turns,
    secure_nats,
    uid,
)
from proto import subjects
from proto.messages import InferenceResult
from services.inference_worker.engines.vllm import VLLMEngine

pytestmark = pytest.mark.vllm

LOOKUP_S = 3.0
MCP_SERVER = Path(__file__).parents[1] / "fixtures" / "mcp_server.py"
# It may call twice: the turn after the first call is offered the tool again,
# so its prompt extends the first turn's (the task is cancelled after it).
FLOW = """\
name: lookup
agents:
  reader:
    role: reader
    system: You are the archivist. Look the document's topic up, then sum it up.
    max_tokens: 64
    tools: [mcp.archive.lookup]
    tool_choice: required
    max_tool_calls: 2
steps:
  - {id: read, agent: reader}
"""
DOC = "\n".join(f"Line {i}: the committee met on day {i} and counted {i * 13} visitors."
                for i in range(40))  # fmt: skip


@pytest.fixture(scope="module")
def keep_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("keep-vllm")
    server = secure_nats(tmp / "nats").start()
    stack = LocalStack(server, tmp / "stack")
    (tmp / "workflows").mkdir()
    (tmp / "workflows" / "lookup.yaml").write_text(FLOW)
    stack.env["BATON_WORKFLOWS_DIR"] = str(tmp / "workflows")
    stack.workdir.mkdir(parents=True)
    mcp = {"archive": {"command": [sys.executable, str(MCP_SERVER), "stdio"],
                       "env": {"MCP_LOOKUP_SECONDS": str(LOOKUP_S)}}}  # fmt: skip
    stack.env["BATON_MCP_SERVERS"] = json.dumps(mcp)  # the orchestrator checks tool names
    try:
        stack.service("context-store").wait_ready()
        stack.tool_worker().wait_ready()
        yield stack
    finally:
        stack.stop()
        server.stop()


async def _across_a_call(
    stack: LocalStack, engine: VLLMEngine, keep: bool
) -> tuple[InferenceResult, InferenceResult, float]:
    """The turn before and the turn after the first call of a task, with the
    prefix cache emptied as the call goes out; and the warms kept."""
    orch = stack.service("orchestrator", BATON_PREWARM_KEEP_EVERY="0.5" if keep else "0")
    client = await Client.connect(stack.nats_url)
    try:
        orch.wait_ready()
        async with inprocess_worker(stack.nats_url, engine, heartbeat_interval=0.5) as worker:
            for _ in range(60):  # its heartbeat seen: a routing (and warming) target
                if f'worker="{worker.s.worker_id}"' in http_get(f"{orch.url}/metrics"):
                    break
                await asyncio.sleep(0.25)
            task_id = uid()
            sub = await client.nc.subscribe(subjects.result("acme", task_id))
            await client.publish("lookup", {"tenant": "acme", "input": DOC, "task_id": task_id},
                                 msg_id=task_id)  # fmt: skip
            [first] = await next_turns(sub, 1, 90)
            assert first.tool_calls, first  # the call is out
            assert await engine._engine.reset_prefix_cache()  # everything cached is gone
            [after] = await next_turns(sub, 1, 90)
            await sub.unsubscribe()
            req = urllib.request.Request(f"{orch.url}/v1/tasks/{task_id}/cancel?tenant=acme",
                                         b"", method="POST")  # fmt: skip
            await asyncio.to_thread(urllib.request.urlopen, req, timeout=10)
            await client.events("acme", task_id, timeout=30)
            kept = metric(orch.url, "baton_prewarms_total", outcome="kept")
    finally:
        await client.close()
        orch.terminate()
        stack.procs.remove(orch)
    return first, after, kept


@pytest.mark.timeout(240, func_only=True)
async def test_a_kept_prefix_is_served_from_cache_after_a_tool_call(
    keep_stack: LocalStack, vllm_engine: VLLMEngine
) -> None:
    first, after, kept = await _across_a_call(keep_stack, vllm_engine, keep=True)
    # The first turn's prompt and its call were warmed again on the worker:
    # at least the first turn's full blocks hit (of the 128-token blocks).
    assert after.cached_tokens >= 128 * (first.usage.prompt_tokens // 128) > 0, (
        first.usage,
        after.cached_tokens,
    )
    assert kept >= 1
    # The control: no keep, and the turn after the call prefills it all.
    first, after, kept = await _across_a_call(keep_stack, vllm_engine, keep=False)
    assert kept == 0
    assert after.cached_tokens == 0, after.cached_tokens
