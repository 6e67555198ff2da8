"""The context store's ``answer`` op against the shared stack: a job's answer
appended once, its last token delta and its result published by the store,
and JetStream's ack of the result as the asker's reply (one request where a
worker used to append, wait, then publish)."""

from __future__ import annotations

import asyncio
from typing import Any

from baton import context_client
from baton.bus import Bus
from baton.dev.testing import uid
from proto import codec, keys, subjects
from proto.messages import (
    ChatMessage,
    ContextAnswer,
    ContextStats,
    InferenceResult,
    TokenDelta,
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
