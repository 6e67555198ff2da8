"""The tool worker on a real nats-server with a real context store: results
land in the session as ``tool`` messages, errors reach the agent, large
results become attachments, a redelivered call is not run again."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from baton.bus import Bus
from baton.dev.testing import LocalStack, metric, uid
from baton.documents import put_document
from proto import keys, subjects
from proto.messages import ContextGet, DocumentPut, GetReply
from proto.sizes import INLINE_TOOL_RESULT_BYTES
from tests.ctx import ask
from tests.tools import call_tool, publish_tool_job, session_with_call


def tool_worker(stack: LocalStack) -> str:
    return next(p.url for p in stack.procs if p.name == "tool-worker")


async def history(bus: Bus, tenant: str, session: str) -> GetReply:
    reply: GetReply = await ask(bus, "get", ContextGet(tenant=tenant, session=session))
    assert reply.error is None, reply.error
    return reply


async def test_search_finds_the_tenants_documents_and_the_hits_are_in_the_session(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, other, session = uid("acme"), uid("rival"), uid("s")
    await put_document(bus, DocumentPut(tenant=tenant, doc_id="d1", title="Raft",
                                        text="Raft elects a leader with randomized timeouts."))  # fmt: skip
    await put_document(bus, DocumentPut(tenant=tenant, doc_id="d2", title="Paxos",
                                        text="Paxos reaches consensus with proposers and acceptors."))  # fmt: skip
    await put_document(bus, DocumentPut(tenant=other, doc_id="d9", title="secret",
                                        text="leader election secret of another tenant"))  # fmt: skip
    ref = await session_with_call(bus, tenant, session)
    res = await call_tool(bus, tenant, session, ref, "search", {"query": "leader election"})
    assert res.outcome == "ok", res.error
    hits = json.loads(res.preview)["hits"]
    assert [h["doc_id"] for h in hits] == ["d1"]  # BM25 match; the other tenant's doc is not seen
    h = await history(bus, tenant, session)
    last = h.messages[-1]
    assert (last.role, last.name, last.tool_call_id) == ("tool", "search", "call_c0")
    assert "randomized timeouts" in last.content
    assert res.ref is not None and res.ref.version == h.length


async def test_bad_arguments_and_unknown_tools_are_errors_the_agent_reads(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, session = uid("acme"), uid("s")
    ref = await session_with_call(bus, tenant, session)
    bad = await call_tool(bus, tenant, session, ref, "search", {"q": 1}, call="a")
    assert bad.outcome == "bad_tool_arguments" and bad.error is not None
    assert "query" in bad.error.message
    notjson = await call_tool(bus, tenant, session, ref, "search", "{not json", call="b")
    assert notjson.outcome == "bad_tool_arguments"
    unknown = await call_tool(bus, tenant, session, ref, "nope", {}, call="c")
    assert unknown.outcome == "unknown_tool"
    h = await history(bus, tenant, session)
    errors = [json.loads(m.content)["error"]["code"] for m in h.messages if m.role == "tool"]
    assert errors == ["bad_tool_arguments", "bad_tool_arguments", "unknown_tool"]
    assert metric(tool_worker(stack), "baton_tool_calls_total", tool="nope",
                  outcome="unknown_tool") >= 1  # fmt: skip


async def test_a_large_result_is_an_attachment_and_the_message_holds_its_start(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, session = uid("acme"), uid("s")
    ref = await session_with_call(bus, tenant, session)
    code = "print('x' * 30000)"
    res = await call_tool(bus, tenant, session, ref, "python", {"code": code})
    assert res.outcome == "ok", res.error
    assert res.attachment is not None and res.size > INLINE_TOOL_RESULT_BYTES
    h = await history(bus, tenant, session)
    assert res.attachment in h.attachments
    assert len(h.messages[-1].content) < INLINE_TOOL_RESULT_BYTES
    full = await ask(
        bus, "get", ContextGet(tenant=tenant, session=session, attachment=res.attachment)
    )
    assert json.loads(full.data)["stdout"] == "x" * 30000 + "\n"


async def test_a_redelivered_call_reuses_the_stored_result_without_running_again(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, session = uid("acme"), uid("s")
    ref = await session_with_call(bus, tenant, session)
    code = "import random; print(random.random())"
    first = await call_tool(bus, tenant, session, ref, "python", {"code": code}, call="k")
    # The same call again under a new message id (as a dispatch retry would be):
    again = await call_tool(bus, tenant, session, ref, "python", {"code": code}, call="k",
                            msg_id="retry")  # fmt: skip
    assert first.outcome == "ok" and not first.reused
    assert again.reused and again.preview == first.preview  # not run again: same random number
    h = await history(bus, tenant, session)
    assert sum(m.role == "tool" for m in h.messages) == 1


async def test_a_retried_calls_republished_result_is_a_new_message(
    stack: LocalStack, bus: Bus
) -> None:
    """A step timeout dispatches a call again (attempt 2) when its first
    result was lost; the stored result is republished, under a Msg-Id of its
    own, or JetStream would drop it as a duplicate for 10 minutes."""
    tenant, session, task_id = uid("acme"), uid("s"), uid()
    ref = await session_with_call(bus, tenant, session)
    got: asyncio.Queue[str | None] = asyncio.Queue()

    async def on_msg(msg: Any) -> None:
        await got.put((msg.headers or {}).get("Nats-Msg-Id"))

    sub = await bus.subscribe_raw(subjects.tool_result(tenant, task_id), on_msg)
    try:
        ids = []
        for attempt in (1, 2):
            call_id = await publish_tool_job(bus, tenant, session, ref, "python",
                                             {"code": "print(1)"}, call="k", task_id=task_id,
                                             attempt=attempt)  # fmt: skip
            ids.append(await asyncio.wait_for(got.get(), 30))
    finally:
        await sub.unsubscribe()
    assert ids == [keys.tool_result(call_id, 1), keys.tool_result(call_id, 2)]
