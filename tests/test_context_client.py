"""One context-store contract: the table in ``proto/context_api.py`` is what
the server dispatches, what the AsyncAPI document lists and what the one
client types its replies by; a store that does not answer is a nak."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from baton import context_client
from baton.bus import Bus, Nak, Request, connect
from baton.dev.testing import uid
from baton.http_errors import ApiError
from baton.natsd import NatsServer
from proto import asyncapi, codec, subjects
from proto.context_api import APPEND, ENDPOINTS, WINDOW
from proto.errors import ErrorCode
from proto.messages import (
    ChatMessage,
    ContextAnswer,
    ContextAppend,
    ContextAppendReply,
    ContextRef,
    ErrorInfo,
    InferenceResult,
    WindowReply,
    WindowRequest,
)
from services.context_store.service import REQUEST_TYPES


def test_the_server_dispatches_every_op_of_the_table() -> None:
    assert {op: (e.request, e.reply) for op, e in ENDPOINTS.items()} == REQUEST_TYPES
    assert set(ENDPOINTS) == set(subjects.CONTEXT_OPS)


def test_the_asyncapi_document_lists_every_op_of_the_table() -> None:
    channels = asyncapi.build()["channels"]
    for op, e in ENDPOINTS.items():
        channel = channels[f"context{op.capitalize()}"]
        assert channel["address"] == f"{subjects.CONTEXT_API}.{op}.{{tenant}}"
        assert set(channel["messages"]) == {e.request.__name__, e.reply.__name__}


@pytest.fixture
async def bus(own_nats: NatsServer) -> AsyncIterator[Bus]:
    # A private server: on the shared one a real context store answers every op.
    b = await connect(own_nats.url, name="test")
    yield b
    await b.close()


def _window(tenant: str) -> WindowRequest:
    ref = ContextRef(tenant=tenant, session="s", version=0, sig=b"")
    return WindowRequest(tenant=tenant, ref=ref, budget_tokens=1)


async def test_a_call_returns_the_reply_typed_by_the_table(bus: Bus) -> None:
    tenant = uid("t")

    async def answer(req: Request) -> WindowReply:
        assert req.task_id == "task-1"
        return WindowReply(tokens=7)

    await bus.serve([subjects.context_api("window", tenant)], answer)
    await bus.flush()
    reply = await context_client.call(bus, WINDOW, _window(tenant), task_id="task-1")
    assert isinstance(reply, WindowReply) and reply.tokens == 7


async def test_a_store_that_does_not_answer_is_a_nak(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context_client, "TIMEOUT", 0.2)
    with pytest.raises(Nak) as nak:
        await context_client.call(bus, WINDOW, _window(uid("t")))
    assert nak.value.delay == context_client.NAK_DELAY and nak.value.backoff


async def test_a_store_that_does_not_answer_an_http_caller_is_context_unavailable(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same table and timeout behind an HTTP route: a 503 its client may
    retry, never a 500 (the OpenAI route's seed let the timeout escape)."""
    monkeypatch.setattr(context_client, "TIMEOUT", 0.2)
    with pytest.raises(ApiError) as refused:
        await context_client.ask(
            bus, APPEND, ContextAppend(tenant=uid("t"), session="s", msg_id="m", messages=[])
        )
    assert refused.value.code == ErrorCode.CONTEXT_UNAVAILABLE
    assert refused.value.status_code == 503


async def test_an_answer_is_acked_by_jetstream_or_refused_by_the_store(bus: Bus) -> None:
    tenant = uid("t")
    gone = ContextAppendReply(error=ErrorInfo.of(ErrorCode.UNKNOWN_SESSION, "erased"))
    replies = [b'{"stream":"BATON_RESULTS","seq":7}', codec.encode(gone),
               b'{"error":{"code":503,"description":"no leader"}}']  # fmt: skip

    async def answer(req: Request) -> bytes:
        return replies.pop(0)

    await bus.serve([subjects.context_api("answer", tenant)], answer)
    await bus.flush()
    res = InferenceResult(job_id="j", task_id="t", tenant=tenant, session="s", step="a", worker="w")
    req = ContextAnswer(
        tenant=tenant, answer=ChatMessage(role="assistant", content="x"), result=res
    )
    assert (await context_client.answer(bus, req)).error is None  # the result's ack
    refused = await context_client.answer(bus, req)
    assert refused.error is not None and refused.error.code == ErrorCode.UNKNOWN_SESSION
    with pytest.raises(Nak):  # JetStream refused the result: the job asks again later
        await context_client.answer(bus, req)
