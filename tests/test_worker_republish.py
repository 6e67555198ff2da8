"""A redelivered inference job whose answer is already stored (the worker
died between the append and the result) is answered from the store, on the
shared stack (simulator worker, real context store and nats-server). A
retried job's republished result under its own attempt's Msg-Id: the job
handler on the bus twin (tests/test_job_shell.py)."""

from __future__ import annotations

import asyncio

from baton.bus import Bus
from baton.dev.testing import uid
from proto import codec, keys, subjects
from proto.messages import ChatMessage, ContextAppend, InferenceJob, InferenceResult, ToolCall
from tests.ctx import append, ask


async def test_a_stored_tool_calling_answer_is_republished_with_its_calls(bus: Bus) -> None:
    """The orchestrator reads a turn's calls from the result: one republished
    without them would count a tool-calling step as done."""
    tenant, session, job_id, task_id = "acme", uid("s"), uid("j"), uid()
    asked = await append(bus, tenant, session, uid("m"), "look it up", system="sys")
    calls = [ToolCall(id="call_0", name="search", arguments='{"query": "raft"}'),
             ToolCall(id="call_1", name="python", arguments='{"code": "print(1)"}')]  # fmt: skip
    stored = await ask(bus, "append", ContextAppend(
        tenant=tenant, session=session, msg_id=keys.answer(job_id), base=asked.ref,
        messages=[ChatMessage(role="assistant", content="", name="a", tool_calls=calls)],
    ))  # fmt: skip
    assert stored.error is None, stored.error
    # A core subscription: the orchestrator takes the result off the stream.
    sub = await bus._nc.subscribe(subjects.result(tenant, task_id))
    job = InferenceJob(
        job_id=job_id, task_id=task_id, tenant=tenant, session=session, workflow="test",
        step="s1", agent="a", ref=asked.ref, max_tokens=32,
    )  # fmt: skip
    await bus.publish(subjects.job("default"), job, msg_id=job_id, task_id=task_id)
    msg = await asyncio.wait_for(sub.next_msg(timeout=30), 31)
    await sub.unsubscribe()
    result = codec.decode(msg.data, InferenceResult)
    assert result.error is None, result.error
    assert result.ref == stored.ref  # answered from the store, not generated again
    assert result.tool_calls == calls


async def test_a_dispatch_older_than_one_already_taken_is_dropped(bus: Bus) -> None:
    """The first dispatch of a step, rescued from a dead worker's queue after
    the step was dispatched again, is acked without a result: its answer would
    be a second one for a step already answered (the chaos tier saw both
    stored). The shared stack has one inference worker."""
    tenant, session, job_id, task_id = "acme", uid("s"), uid("j"), uid()
    asked = await append(bus, tenant, session, uid("m"), "hello", system="sys")
    sub = await bus._nc.subscribe(subjects.result(tenant, task_id))
    ids = []
    for attempt in (2, 1, 3):
        job = InferenceJob(
            job_id=job_id, task_id=task_id, tenant=tenant, session=session, workflow="test",
            step="s1", agent="a", ref=asked.ref, max_tokens=8, attempt=attempt,
        )  # fmt: skip
        await bus.publish(subjects.job("default"), job,
                          msg_id=keys.job_message(job_id, attempt), task_id=task_id)  # fmt: skip
        if attempt == 1:
            continue  # attempt 3 follows at once: a result of 1 would come before it
        msg = await asyncio.wait_for(sub.next_msg(timeout=30), 31)
        ids.append((msg.headers or {}).get("Nats-Msg-Id"))
    await asyncio.sleep(1.0)
    late = sub.pending_msgs
    await sub.unsubscribe()
    assert ids == [keys.result(job_id, 2), keys.result(job_id, 3)]
    assert late == 0


async def test_a_retry_published_while_its_first_dispatch_runs_is_answered_from_the_store(
    bus: Bus,
) -> None:
    """Both dispatches of a step reach the worker at once (a retry after a
    late rescue): the second waits for the first and republishes its stored
    answer, so the step is generated once. (On the twin too:
    tests/test_job_shell.py.)"""
    tenant, session, job_id, task_id = "acme", uid("s"), uid("j"), uid()
    asked = await append(bus, tenant, session, uid("m"), "hello", system="sys")
    sub = await bus._nc.subscribe(subjects.result(tenant, task_id))
    for attempt in (1, 2):
        job = InferenceJob(
            job_id=job_id, task_id=task_id, tenant=tenant, session=session, workflow="test",
            step="s1", agent="a", ref=asked.ref, max_tokens=64, attempt=attempt,
        )  # fmt: skip
        await bus.publish(subjects.job("default"), job,
                          msg_id=keys.job_message(job_id, attempt), task_id=task_id)  # fmt: skip
    results = []
    for _ in range(2):
        msg = await asyncio.wait_for(sub.next_msg(timeout=30), 31)
        results.append(codec.decode(msg.data, InferenceResult))
    await sub.unsubscribe()
    assert [r.error for r in results] == [None, None]
    assert [r.usage.completion_tokens > 0 for r in results] == [True, False]
    assert results[0].output == results[1].output
