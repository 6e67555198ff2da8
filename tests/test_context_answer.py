"""The context store's ``answer`` op against the shared stack: a job's answer
appended once, its last token delta and its result published by the store,
and JetStream's ack of the result as the asker's reply (one request where a
worker used to append, wait, then publish)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from baton import context_client
from baton.bus import Bus
from baton.dev.testing import uid
from proto import codec, keys, subjects
from proto.context_api import answer_target
from proto.errors import ErrorCode
from proto.messages import (
    ChatMessage,
    ContextAnswer,
    ContextStats,
    ErrorInfo,
    InferenceResult,
    TokenDelta,
    ToolResult,
)
from tests.ctx import append, ask, window


def _answer(tenant: str, session: str, task: str, **result: Any) -> ContextAnswer:
    job_id = keys.job(tenant, task, "r1.answer")
    res = InferenceResult(job_id=job_id, task_id=task, tenant=tenant, session=session,
                          step="r1.answer", worker="w1", output="the answer", **result)  # fmt: skip
    delta = TokenDelta(task_id=task, tenant=tenant, step="r1.answer", agent="a", attempt="1.1",
                       text="the answer", final=True)  # fmt: skip
    return ContextAnswer(tenant=tenant, answer=ChatMessage(role="assistant", content="the answer"),
                         result=res, last_delta=delta)  # fmt: skip


async def _tap(bus: Bus, *subject: str) -> tuple[list[tuple[str, bytes]], Any]:
    seen: list[tuple[str, bytes]] = []

    async def on_msg(msg: Any) -> None:
        seen.append((msg.subject, bytes(msg.data)))

    subs = [await bus._nc.subscribe(s, cb=on_msg) for s in subject]
    await bus.flush()
    return seen, subs


async def test_an_answer_is_stored_once_and_its_delta_then_its_result_published(
    bus: Bus,
) -> None:
    tenant, session, task = uid("acme"), uid("s"), uid("t")
    base = (await append(bus, tenant, session, "in", "question", system="sys")).ref
    seen, _ = await _tap(bus, subjects.tokens(tenant, task), subjects.result(tenant, task))
    req = _answer(tenant, session, task)
    req.base = base
    for _ in range(2):  # a redelivered job asks again
        reply = await context_client.answer(bus, req, task_id=task)
        assert reply.error is None, reply.error
    await asyncio.sleep(0.2)
    # The delta is stored before the result: a reader stopping at the end has it.
    assert [s for s, _ in seen][:2] == [
        subjects.tokens(tenant, task),
        subjects.result(tenant, task),
    ]
    result = codec.decode(seen[1][1], InferenceResult)
    assert result.ref is not None and result.ref.version == 3  # system, question, answer
    w = await window(bus, tenant, result.ref, 4096)
    assert [m.content for m in w.messages][-1] == "the answer"
    stats = await ask(bus, "stats", ContextStats(tenant=tenant, session=session))
    assert (stats.records, stats.messages) == (2, 3)  # the answer once


async def test_an_answer_naming_another_tenant_is_refused_and_publishes_nothing(
    bus: Bus,
) -> None:
    tenant, victim, task = uid("acme"), uid("evil"), uid("t")
    seen, _ = await _tap(bus, f"{subjects.TOKENS}.{victim}.>", f"{subjects.RESULTS}.{victim}.>")
    req = _answer(victim, uid("s"), task)
    req.tenant = tenant  # the request's and the subject's tenant, not the result's
    reply = await context_client.answer(bus, req, task_id=task)
    assert reply.error is not None and reply.error.code == "bad_request"
    await asyncio.sleep(0.2)
    assert seen == []


def _tool_answer(tenant: str, session: str, task: str, content: str) -> ContextAnswer:
    call_id = keys.tool_call(tenant, task, "r1.answer", "t1c0")
    res = ToolResult(call_id=call_id, task_id=task, tenant=tenant, session=session,
                     step="r1.answer", tool="search", worker="tw1", preview=content)  # fmt: skip
    message = ChatMessage(role="tool", content=content, name="search", tool_call_id=call_id)
    return ContextAnswer(tenant=tenant, answer=message, tool_result=res, attempt=2)


async def test_a_tool_output_is_stored_once_and_its_result_published_by_the_store(
    bus: Bus,
) -> None:
    tenant, session, task = uid("acme"), uid("s"), uid("t")
    await append(bus, tenant, session, "in", "question", system="sys")
    got: list[Any] = []

    async def on_msg(msg: Any) -> None:
        got.append((msg.subject, msg.headers or {}, codec.decode(msg.data, ToolResult)))

    await bus._nc.subscribe(subjects.tool_result(tenant, task), cb=on_msg)
    await bus.flush()
    req = _tool_answer(tenant, session, task, "found it")
    reply = await context_client.answer(bus, req, task_id=task)  # JetStream's ack
    assert (reply.error, reply.duplicate) == (None, False)
    await asyncio.sleep(0.2)
    [(subject, headers, result)] = got
    assert req.tool_result is not None and subject == subjects.tool_result(tenant, task)
    assert headers["Nats-Msg-Id"] == keys.tool_result(req.tool_result.call_id, 2)
    assert result.ref is not None and result.ref.version == 3  # system, question, output
    w = await window(bus, tenant, result.ref, 4096)
    assert w.messages[-1].content == "found it" and w.messages[-1].role == "tool"
    # Another run's output for the same call: the store keeps and publishes
    # nothing; its reply names the stored output's ref for the worker.
    again = await context_client.answer(bus, _tool_answer(tenant, session, task, "other"))
    assert again.duplicate and again.ref is not None and again.ref.version == 3
    await asyncio.sleep(0.2)
    assert len(got) == 1
    stats = await ask(bus, "stats", ContextStats(tenant=tenant, session=session))
    assert stats.messages == 3


async def test_a_tool_result_naming_another_tenant_is_refused_and_publishes_nothing(
    bus: Bus,
) -> None:
    tenant, victim, task = uid("acme"), uid("evil"), uid("t")
    seen, _ = await _tap(bus, f"{subjects.TOOL_RESULTS}.{victim}.>")
    req = _tool_answer(victim, uid("s"), task, "x")
    req.tenant = tenant
    reply = await context_client.answer(bus, req, task_id=task)
    assert reply.error is not None and reply.error.code == "bad_request"
    both = _tool_answer(tenant, uid("s"), task, "x")
    both.result = _answer(tenant, uid("s"), task).result
    reply = await context_client.answer(bus, both, task_id=task)
    assert reply.error is not None and reply.error.code == "bad_request"  # one result, not two
    await asyncio.sleep(0.2)
    assert seen == []


def test_an_answer_target_is_its_results_subject_and_keys_from_proto_keys() -> None:
    tool = _tool_answer("acme", "s1", "t1", "x")
    t = answer_target(tool)
    call_id = keys.tool_call("acme", "t1", "r1.answer", "t1c0")
    assert (t.subject, t.append_id, t.result_id) == (
        subjects.tool_result("acme", "t1"), keys.tool_output(call_id),
        keys.tool_result(call_id, 2),
    )  # fmt: skip
    model = _answer("acme", "s1", "t1")
    t = answer_target(model)
    assert model.result is not None
    assert (t.subject, t.append_id, t.result_id) == (
        subjects.result("acme", "t1"), keys.answer(model.result.job_id),
        keys.result(model.result.job_id, 1),
    )  # fmt: skip
    model.result.error = ErrorInfo.of(ErrorCode.TOOL_FAILED, "no")
    with pytest.raises(ValueError):  # a model step's error has nothing to append
        answer_target(model)
