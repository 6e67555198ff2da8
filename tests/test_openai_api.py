"""The OpenAI-compatible API driven by clients nobody here wrote: the real
``openai`` SDK (sync and async, streaming and not) and LangChain's
``ChatOpenAI``. Simulator engine; arrival-time checks live in
``test_streaming.py`` where generation is slow enough to see."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI

from baton.dev.testing import LocalStack, http_json


def _sdk(stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.orchestrator.url}/v1", api_key="dev", max_retries=0)


def _seen_messages(text: str) -> int:
    """The simulator starts its answer with how many messages it was given."""
    m = re.match(r"\[sim: (\d+) messages", text)
    assert m, text
    return int(m.group(1))


async def test_models_are_the_workflows(stack: LocalStack) -> None:
    models = {m.id: m for m in _sdk(stack).models.list()}
    assert {"chat", "research"} <= set(models)
    assert models["research"].model_extra["description"].startswith("Supervisor plans")


async def test_a_chat_completion_seeds_a_session_and_the_next_one_continues_it(
    stack: LocalStack,
) -> None:
    tenant = "umbrella"
    client = _sdk(stack)
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    resp = client.chat.completions.create(model="chat", messages=history,  # type: ignore[arg-type]
                                          max_tokens=7, extra_body={"tenant": tenant})  # fmt: skip
    text = resp.choices[0].message.content or ""
    baton: dict[str, Any] = resp.model_extra["baton"]  # type: ignore[index]
    state = http_json(f"{stack.orchestrator.url}/v1/tasks/{baton['task_id']}?tenant={tenant}")
    assert text == state["output"] and resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 7  # max_tokens mapped
    assert resp.usage.prompt_tokens == state["usage"]["prompt_tokens"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    first = _seen_messages(text)
    assert first == 4  # the agent's system prompt in place of the client's, then 3 turns
    again = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "third question"}],
        extra_body={"tenant": tenant, "baton_session": baton["session"]},
    )  # fmt: skip
    assert again.model_extra["baton"]["session"] == baton["session"]  # type: ignore[index]
    assert _seen_messages(again.choices[0].message.content or "") == first + 2


async def test_an_unknown_model_is_a_404_listing_the_models(stack: LocalStack) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        _sdk(stack).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    err = info.value.body
    assert isinstance(err, dict)
    assert err["code"] == "unknown_workflow" and err["param"] == "model"
    assert "chat" in err["message"] and "research" in err["message"]
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        _sdk(stack).chat.completions.create(model="chat", messages=[])
    assert bad.value.body["code"] == "invalid_field"  # type: ignore[index]


async def test_async_streaming_gives_the_output_agents_tokens_and_the_others_progress(
    stack: LocalStack,
) -> None:
    tenant = "hooli"
    client = openai.AsyncOpenAI(base_url=f"{stack.orchestrator.url}/v1", api_key="dev",
                                max_retries=0)  # fmt: skip
    stream = await client.chat.completions.create(
        model="research", messages=[{"role": "user", "content": "compare quicksort and mergesort"}],
        stream=True, stream_options={"include_usage": True}, extra_body={"tenant": tenant},
    )  # fmt: skip
    content, progress, usage, baton = [], [], None, {}
    async for chunk in stream:
        extra = chunk.model_extra or {}
        baton.update(extra.get("baton") or {})
        if "type" in (extra.get("baton") or {}):
            progress.append(extra["baton"])
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
    state = http_json(f"{stack.orchestrator.url}/v1/tasks/{baton['task_id']}?tenant={tenant}")
    assert state["status"] == "completed"
    assert "".join(content) == state["output"] != ""
    assert usage is not None and usage.completion_tokens == state["usage"]["completion_tokens"]
    token_agents = {p["agent"] for p in progress if p["type"] == "token"}
    assert {"retrieval", "coding", "validation"} <= token_agents
    steps = {(p["step"], p["status"]) for p in progress if p["type"] == "step"}
    assert ("r1.plan", "done") in steps  # the summary's round depends on the validator's answer
    assert any(step.endswith(".summarize") and status == "started" for step, status in steps)
    plan_text = "".join(
        p["text"] for p in progress if p["type"] == "token" and p["step"] == "r1.plan"
    )
    assert plan_text == state["steps"]["r1.plan"]["output"]


async def test_an_oversized_input_is_refused_before_streaming_starts(stack: LocalStack) -> None:
    # Refused up front (64 KiB limit), in the one error body.
    with pytest.raises(openai.APIStatusError) as info:
        _sdk(stack).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x" * 70_000}], stream=True
        )
    assert info.value.status_code == 413
    assert info.value.body["code"] == "input_too_large"  # type: ignore[index]


async def test_langchain_chat_openai_invokes_and_streams(stack: LocalStack) -> None:
    tenant = "wonka"
    llm = ChatOpenAI(model="chat", base_url=f"{stack.orchestrator.url}/v1", api_key="dev",  # type: ignore[arg-type]
                     max_retries=0, extra_body={"tenant": tenant}, max_tokens=9)  # fmt: skip
    answer = await llm.ainvoke("hello from langchain")
    assert _seen_messages(str(answer.content)) == 2
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] == 9
    # The test stack's simulator generates an answer at once: one token delta,
    # so one piece of text (pieces arriving while the answer is generated:
    # test_streaming.py, on a slow simulator).
    pieces = [str(c.content) async for c in llm.astream("stream please")]
    assert len(pieces) >= 2 and [p for p in pieces if p]
    assert "".join(pieces).startswith("[sim: 2 messages")


async def test_a_call_naming_no_tenant_runs_as_the_first_tenant_of_the_bus(
    stack: LocalStack,
) -> None:
    """Without a tenant key (an operator's, or a stack run without keys) and no
    ``tenant`` field: the first of BATON_TENANTS, a tenant this bus has."""
    resp = _sdk(stack).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert resp.model_extra["baton"]["tenant"] == "acme"  # type: ignore[index]
