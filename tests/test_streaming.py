"""Token streams while generation is slow enough to watch (simulator at
~40 tokens/s): tokens arrive as they are generated, a reader that drops
mid-answer resumes with no gap and no repeat, idle streams get keep-alives,
and a task cancelled mid-stream ends the OpenAI stream with an error."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import openai
import pytest

from baton.dev.testing import Client, LocalStack, http_json, secure_nats, uid
from baton.natsd import NatsServer
from tests.harness import http_post
from tests.test_http_api import sse_events

LONELY = """name: lonely
description: waits for a pool nobody serves
agents:
  ghost: {role: ghost, system: nobody serves this pool, pool: nowhere, timeout: 1}
steps:
  - id: wait
    agent: ghost
"""


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("slow")
    (tmp / "wf").mkdir()
    (tmp / "wf" / "lonely.yaml").write_text(LONELY)
    server = secure_nats(tmp / "nats").start()
    stack = LocalStack(server, tmp / "s", env={
        "BATON_SIM_DECODE_TPS": "40", "BATON_SSE_PING": "0.2",
        "BATON_WORKFLOWS_DIR": str(tmp / "wf"),
    })  # fmt: skip
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        server.stop()


@pytest.fixture
async def slow_client(slow: LocalStack) -> AsyncIterator[Client]:
    c = await Client.connect(slow.nats_url)
    yield c
    await c.close()


async def test_openai_stream_chunks_arrive_while_the_answer_is_generated(slow: LocalStack) -> None:
    tenant = "acme"
    client = openai.AsyncOpenAI(base_url=f"{slow.orchestrator.url}/v1", api_key="dev", max_retries=0)  # fmt: skip
    t0 = time.monotonic()
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "tell a story"}], max_tokens=40,
        stream=True, extra_body={"tenant": tenant},
    )  # fmt: skip
    arrivals: list[tuple[float, str]] = []
    baton: dict[str, Any] = {}
    async for chunk in stream:
        baton.update((chunk.model_extra or {}).get("baton") or {})
        for choice in chunk.choices:
            if choice.delta.content:
                arrivals.append((time.monotonic() - t0, choice.delta.content))
    done = time.monotonic() - t0
    text = "".join(t for _, t in arrivals)
    state = http_json(f"{slow.orchestrator.url}/v1/tasks/{baton['task_id']}?tenant={tenant}")
    assert text == state["output"]
    # 40 tokens at 40/s take ~1 s: the first piece must come long before the end.
    assert len(arrivals) >= 5, arrivals
    assert arrivals[0][0] < done - 0.5, (arrivals[0][0], done)
    assert arrivals[len(arrivals) // 2][0] < done - 0.25


async def test_a_token_reader_that_drops_mid_answer_resumes_without_gap_or_repeat(
    slow: LocalStack, slow_client: Client
) -> None:
    tenant, task_id = "globex", uid()
    await slow_client.publish(
        "chat", {"tenant": tenant, "input": "long answer", "task_id": task_id}
    )
    url = f"{slow.orchestrator.url}/v1/tasks/{task_id}/tokens?tenant={tenant}"
    for _ in range(100):  # the run exists once the orchestrator took the task
        if (await asyncio.to_thread(httpx.get, url.replace("/tokens", ""))).status_code == 200:
            break
        await asyncio.sleep(0.05)
    first: list[dict[str, str]] = []
    async with httpx.AsyncClient(timeout=30) as http, http.stream("GET", url) as r:
        assert r.status_code == 200
        buf = ""
        async for piece in r.aiter_text():
            buf += piece
            *blocks, buf = buf.replace("\r\n", "\n").split("\n\n")
            first += [e for e in sse_events("\n\n".join(blocks)) if e.get("event") == "token"]
            if len(first) >= 3:
                break  # disconnect mid-answer
    state = http_json(url.replace("/tokens", ""))
    assert state["status"] == "running", "the answer finished before the reader dropped"
    rest_body = await asyncio.to_thread(
        lambda: httpx.get(url, headers={"Last-Event-ID": first[-1]["id"]}, timeout=30).text
    )
    rest = sse_events(rest_body)
    assert rest[-1]["event"] == "end" and json.loads(rest[-1]["data"])["type"] == "completed"
    deltas = [json.loads(e["data"]) for e in first + [e for e in rest if e["event"] == "token"]]
    ids = [int(e["id"]) for e in first + rest[:-1]]
    assert ids == sorted(set(ids))  # no repeat, in order
    offset = 0
    for d in deltas:  # no gap: each delta starts where the previous ended
        assert d["offset"] == offset and d["step"] == "r1.answer"
        offset += len(d["text"])
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    assert deltas[-1]["final"] and not any(d["final"] for d in deltas[:-1])
    text = "".join(d["text"] for d in deltas)
    state = http_json(url.replace("/tokens", ""))
    assert text == state["steps"]["r1.answer"]["output"] == state["output"]
    store = next(p for p in slow.procs if p.name == "context-store")
    stored = http_json(f"{store.url}/v1/sessions/{tenant}/{task_id}")["messages"][-1]
    assert stored["role"] == "assistant" and stored["content"] == text
    # A plain NATS client replays the same deltas from the stream, no Baton code.
    sub = await slow_client.js.subscribe(f"baton.tokens.{tenant}.{task_id}", ordered_consumer=True)
    try:
        replay = []
        while len(replay) < len(deltas):
            replay.append(await sub.next_msg(timeout=5))
    finally:
        await sub.unsubscribe()
    assert "".join(msgpack.unpackb(m.data)["text"] for m in replay) == text


async def test_an_idle_event_stream_gets_keep_alive_comments(slow: LocalStack) -> None:
    tenant = "initech"
    resp = http_post(f"{slow.orchestrator.url}/v1/tasks",
                     {"tenant": tenant, "input": "anyone?", "workflow": "lonely"}, 202)  # fmt: skip
    url = f"{slow.orchestrator.url}/v1/tasks/{resp['task_id']}/events?tenant={tenant}"
    # Nobody serves the step: ~1 s per attempt, 2 attempts, then step_timeout.
    body = await asyncio.to_thread(lambda: httpx.get(url, timeout=30).text)
    comments = [line for line in body.splitlines() if line.startswith(":")]
    assert len(comments) >= 3, body
    events = sse_events(body)
    assert events[-1]["event"] == "failed"
    assert json.loads(events[-1]["data"])["error"]["code"] == "step_timeout"


async def test_cancelling_mid_stream_ends_the_openai_stream_with_an_error(slow: LocalStack) -> None:
    tenant = "umbrella"
    client = openai.AsyncOpenAI(base_url=f"{slow.orchestrator.url}/v1", api_key="dev", max_retries=0)  # fmt: skip
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a long one"}], stream=True,
        extra_body={"tenant": tenant},
    )  # fmt: skip
    got = 0
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            baton = (chunk.model_extra or {}).get("baton") or {}
            if "task_id" in baton:
                task_id = baton["task_id"]
            got += sum(1 for c in chunk.choices if c.delta.content)
            if got == 2:
                await asyncio.to_thread(
                    http_post, f"{slow.orchestrator.url}/v1/tasks/{task_id}/cancel?tenant={tenant}",
                    {}, 200,
                )  # fmt: skip
    assert "cancelled" in str(info.value)


def test_asyncapi_documents_the_token_channel() -> None:
    import yaml

    doc = yaml.safe_load(Path("proto/asyncapi.yaml").read_text())
    channel = doc["channels"]["tokens"]
    assert channel["address"] == "baton.tokens.{tenant}.{task_id}"
    props = doc["components"]["schemas"]["TokenDelta"]["properties"]
    assert {"step", "attempt", "index", "offset", "text", "final"} <= set(props)


async def test_a_step_regenerated_after_its_worker_died_streams_a_new_attempt(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    stack = LocalStack(own_nats, tmp_path / "s")
    stack.workdir.mkdir(parents=True)
    client = await Client.connect(own_nats.url)
    try:
        for name in ("context-store", "orchestrator"):
            stack.service(name).wait_ready()
        doomed = stack.worker(BATON_SIM_DECODE_TPS="25").wait_ready()  # 128 tokens ~ 5 s
        tenant, task_id = "initech", uid()
        seen: list[dict[str, Any]] = []

        async def on_delta(msg: Any) -> None:
            seen.append(msgpack.unpackb(msg.data))

        await client.nc.subscribe(f"baton.tokens.{tenant}.{task_id}", cb=on_delta)
        await client.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
        for _ in range(200):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.05)
        doomed.kill()  # mid-generation: its attempt never sends a final delta
        stack.worker().wait_ready()
        events = await client.events(tenant, task_id, timeout=40)
        assert events[-1]["type"] == "completed"
        await asyncio.sleep(0.3)
        attempts = list(dict.fromkeys(d["attempt"] for d in seen))
        assert len(attempts) == 2, attempts
        first = [d for d in seen if d["attempt"] == attempts[0]]
        last = [d for d in seen if d["attempt"] == attempts[1]]
        assert not any(d["final"] for d in first)
        assert [d["index"] for d in last] == list(range(len(last))) and last[-1]["final"]
        assert "".join(d["text"] for d in last) == events[-1]["output"]
    finally:
        await client.close()
        stack.stop()
