"""Offered tools take prompt room: the worker trims the window and reserves KV
by the prompt with the tools rendered in, as the engine generates it.

Baton's real worker runs in-process on a simulator (named as one) against the
shared stack's nats-server and context store; a large tool catalog (what an
MCP server offers) is what makes a window that fits alone too long."""

from __future__ import annotations

import asyncio
import json

import pytest

from baton.bus import Bus
from baton.dev.inprocess import inprocess_worker
from baton.dev.testing import LocalStack, uid
from proto import codec, subjects
from proto.messages import ChatMessage, InferenceJob, InferenceResult, ToolSpec
from services.inference_worker.engines.sim import SimEngine
from tests.ctx import append

MAX_MODEL_LEN, MAX_TOKENS = 1024, 64
CATALOG = tuple(
    ToolSpec(
        name=f"mcp.files.tool{i}",
        description=f"Tool {i} of the file server: reads, lists or searches files by path.",
        parameters=json.dumps({
            "type": "object", "required": ["path"], "additionalProperties": False,
            "properties": {"path": {"type": "string", "maxLength": 256},
                           "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        }),
    )
    for i in range(9)
)  # fmt: skip


# About 55% and 80% of the room: the tools are a fixed cost, so a window
# scaled by the whole prompt's overshoot converges too slowly for the second.
@pytest.mark.parametrize("n_tools", [6, 9])
async def test_a_window_that_fits_only_without_the_tools_is_trimmed_and_admitted_with_them(
    stack: LocalStack, bus: Bus, n_tools: int
) -> None:
    catalog = CATALOG[:n_tools]
    engine = SimEngine(max_model_len=MAX_MODEL_LEN, decode_tps=0)
    await engine.start()
    tenant, session, task_id = "acme", uid("s"), uid()
    users = [f"note {i}: " + "the raft log is replicated to a quorum. " * 7 for i in range(8)]
    try:
        ref = None
        for i, text in enumerate(users):
            ref = (await append(bus, tenant, session, f"m{i}", text, system="be brief")).ref
        assert ref is not None
        history = [ChatMessage(role="system", content="be brief")]
        history += [ChatMessage(role="user", content=u) for u in users]
        room = MAX_MODEL_LEN - MAX_TOKENS
        # The case: the whole history fits by itself, not with the catalog.
        assert engine.count_prompt_tokens(history) <= room
        assert engine.count_prompt_tokens(history, catalog) > room

        pool = uid("tools")
        async with inprocess_worker(stack.nats_url, engine, pool=pool) as worker:
            reserved: list[int] = []
            acquire = worker.admission.acquire

            async def spy(need: int, tenant: str = "") -> None:
                reserved.append(need)
                await acquire(need, tenant)

            worker.admission.acquire = spy  # type: ignore[method-assign]
            sub = await bus._nc.subscribe(subjects.result(tenant, task_id))
            job = InferenceJob(
                job_id=uid("j"), task_id=task_id, tenant=tenant, session=session,
                workflow="test", step="s1", agent="a", ref=ref, max_tokens=MAX_TOKENS,
                tools=list(catalog), tool_choice="auto",
            )  # fmt: skip
            await bus.publish(subjects.job(pool), job, msg_id=job.job_id, task_id=task_id)
            msg = await asyncio.wait_for(sub.next_msg(timeout=30), 31)
            await sub.unsubscribe()
    finally:
        await engine.stop()
    result = codec.decode(msg.data, InferenceResult)
    assert result.error is None, result.error  # not prompt_too_long
    assert [c.name for c in result.tool_calls] == [t.name for t in catalog]
    prompt = result.usage.prompt_tokens
    assert prompt + MAX_TOKENS <= MAX_MODEL_LEN
    assert prompt < engine.count_prompt_tokens(history, catalog)  # the window was trimmed
    # KV admission reserved what the engine used: the prompt with the tools.
    assert reserved == [prompt + MAX_TOKENS]
