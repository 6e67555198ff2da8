"""The ``input`` step on real processes: a run pauses for a human and resumes
on an answer from the tenant's own NATS account, from ``POST
/v1/tasks/{id}/input``, or on the declared default at its timeout — also
after the orchestrator was SIGKILLed while it waited. Another tenant cannot
answer it, a repeated answer changes nothing (an answer to a finished task:
the conductor on the bus twin, ``tests/test_conductor_shell.py``)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from baton.bus import Bus, connect
from baton.dev.testing import Client, LocalStack, metric, secure_nats, uid
from baton.urls import split_creds
from proto.messages import ContextGet
from tests.ctx import ask
from tests.harness import http_post

WORKFLOWS = {
    "ask.yaml": """
name: ask
agents:
  writer: {role: writer, system: You write., max_tokens: 16}
steps:
  - id: draft
    agent: writer
  - id: confirm
    input: {prompt: "Ship this draft?", default: "yes", timeout: 120}
  - id: detail
    input: {prompt: "Anything to add?", default: "nothing", timeout: 120}
  - id: final
    agent: writer
""",
    "quick.yaml": """
name: quick
agents:
  writer: {role: writer, system: You write., max_tokens: 16}
steps:
  - id: confirm
    input: {prompt: "Go ahead?", default: "go ahead by default", timeout: 1.5}
  - id: final
    agent: writer
""",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("input")
    server = secure_nats(tmp / "nats", encrypt=False).start()
    stack = LocalStack(server, tmp / "stack").start(workflows=WORKFLOWS)
    yield stack
    stack.stop()
    server.stop()


@pytest.fixture
async def acme(env: LocalStack) -> AsyncIterator[Client]:
    """Tenant acme's own client, with its own credentials."""
    c = await Client.connect(env.url_for("acme"), tenant="acme")
    yield c
    await c.close()


@pytest.fixture
async def bus(env: LocalStack) -> AsyncIterator[Bus]:
    b = await connect(env.nats_url, name="test-input")
    yield b
    await b.close()


async def submit(client: Client, workflow: str, text: str) -> str:
    task_id = uid()
    await client.publish(workflow, {"tenant": "acme", "input": text, "task_id": task_id},
                         msg_id=task_id)  # fmt: skip
    return task_id


async def wait_for(client: Client, task_id: str, status: str, step: str) -> list[dict[str, Any]]:
    """The task's events once one says ``step`` has ``status``."""
    for _ in range(150):
        events = await client.events("acme", task_id, timeout=0.3, until_terminal=False)
        if any(e["type"] == "step" and e["step"] == step and e["status"] == status
               for e in events):  # fmt: skip
            return events
    raise AssertionError(f"{step} never {status}")


async def answer(client: Client, task_id: str, text: str, step: str | None = None) -> Any:
    """Answer as the tenant's client does: JetStream publish on baton.input.<task_id>."""
    body: dict[str, Any] = {"answer": text} | ({"step": step} if step else {})
    return await client.js.publish(f"baton.input.{task_id}", msgpack.packb(body))


async def user_messages(bus: Bus, session: str) -> list[str]:
    h = await ask(bus, "get", ContextGet(tenant="acme", session=session))
    return [m.content for m in h.messages if m.role == "user"]


def run_state(env: LocalStack, task_id: str) -> dict[str, Any]:
    url = f"{env.orchestrator.url}/v1/tasks/{task_id}?tenant=acme"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def test_a_run_waits_with_its_prompt_and_resumes_on_the_tenants_nats_answer(
    env: LocalStack, acme: Client, bus: Bus
) -> None:
    task_id = await submit(acme, "ask", "write a haiku")
    events = await wait_for(acme, task_id, "waiting_input", "r1.confirm")
    [waiting] = [e for e in events if e.get("status") == "waiting_input"]
    assert waiting["prompt"] == "Ship this draft?" and waiting["deadline"] > waiting["ts"]
    assert run_state(env, task_id)["steps"]["r1.confirm"]["status"] == "waiting_input"
    ack = await answer(acme, task_id, "ship it, with a title", "r1.confirm")
    assert ack.stream == "BATON_TASKS_acme"  # stored before it is taken: durable
    await wait_for(acme, task_id, "waiting_input", "r1.detail")
    await answer(acme, task_id, "and a moral")  # no step: the one waiting
    done = (await acme.events("acme", task_id, timeout=30))[-1]
    assert done["type"] == "completed", done
    # The agent after the input steps read a session holding both answers, in order.
    assert await user_messages(bus, done["session"]) == [
        "write a haiku", "ship it, with a title", "and a moral",
    ]  # fmt: skip
    steps = run_state(env, task_id)["steps"]
    assert steps["r1.confirm"]["answered_by"] == "human"
    assert steps["r1.final"]["status"] == "done"


async def test_an_http_answer_resumes_the_run_and_a_second_one_is_refused(
    env: LocalStack, acme: Client, bus: Bus
) -> None:
    task_id = await submit(acme, "quick", "hi")
    await wait_for(acme, task_id, "waiting_input", "r1.confirm")
    url = f"{env.orchestrator.url}/v1/tasks/{task_id}/input?tenant=acme"
    got = http_post(url, {"answer": "go, over HTTP"}, 202)
    assert got == {"task_id": task_id, "step": "r1.confirm",
                   "subject": f"baton.input.acme.{task_id}"}  # fmt: skip
    done = (await acme.events("acme", task_id, timeout=30))[-1]
    assert done["type"] == "completed", done
    assert await user_messages(bus, done["session"]) == ["hi", "go, over HTTP"]
    again = http_post(url, {"answer": "again"}, 409)
    assert again["error"]["code"] == "not_waiting" and again["error"]["layer"] == "orchestration"
    unknown = http_post(f"{env.orchestrator.url}/v1/tasks/nope/input?tenant=acme",
                        {"answer": "x"}, 404)  # fmt: skip
    assert unknown["error"]["code"] == "unknown_task"


async def test_an_unanswered_input_step_takes_its_default_at_the_timeout(
    env: LocalStack, acme: Client, bus: Bus
) -> None:
    before = metric(env.orchestrator.url, "baton_input_answers_total", outcome="default")
    task_id = await submit(acme, "quick", "hi")
    events = await acme.events("acme", task_id, timeout=30)
    assert events[-1]["type"] == "completed", events[-1]
    [done] = [e for e in events if e.get("step") == "r1.confirm" and e["status"] == "done"]
    assert done["answered_by"] == "default"
    taken = metric(env.orchestrator.url, "baton_input_answers_total", outcome="default")
    assert taken >= before + 1
    assert await user_messages(bus, events[-1]["session"]) == ["hi", "go ahead by default"]


async def test_a_waiting_run_survives_an_orchestrator_sigkill_and_resumes_on_the_answer(
    env: LocalStack, acme: Client, bus: Bus
) -> None:
    task_id = await submit(acme, "ask", "write")
    await wait_for(acme, task_id, "waiting_input", "r1.confirm")
    doomed = env.orchestrator
    doomed.kill()
    env.procs.remove(doomed)
    # Answered while no orchestrator runs: the answer waits in the tenant's stream.
    await answer(acme, task_id, "yes please", "r1.confirm")
    fresh = env.service("orchestrator")
    await asyncio.to_thread(fresh.wait_ready)
    await wait_for(acme, task_id, "waiting_input", "r1.detail")
    await answer(acme, task_id, "done", "r1.detail")
    final = (await acme.events("acme", task_id, timeout=30))[-1]
    assert final["type"] == "completed", final
    assert await user_messages(bus, final["session"]) == ["write", "yes please", "done"]


async def test_another_tenant_cannot_answer_and_the_run_still_waits(
    env: LocalStack, acme: Client
) -> None:
    task_id = await submit(acme, "ask", "write")
    await wait_for(acme, task_id, "waiting_input", "r1.confirm")
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc).lower())

    servers, creds = split_creds(env.url_for("globex"))
    globex = await nats.connect(servers, error_cb=on_error, allow_reconnect=False,
                               user_credentials=creds)  # fmt: skip
    try:
        body = msgpack.packb({"answer": "hijacked", "step": "r1.confirm", "tenant": "acme"})
        # Addressing acme's subject: the server refuses the publish.
        await globex.publish(f"baton.input.acme.{task_id}", body)
        # Its own subject with acme's task id: mapped to globex's tenant token.
        ack = await globex.jetstream().publish(f"baton.input.{task_id}", body)
        assert ack.stream == "BATON_TASKS_globex"
        async with asyncio.timeout(5):
            while not any(f'publish to "baton.input.acme.{task_id}"' in r for r in refused):
                await asyncio.sleep(0.05)
        assert "permissions violation" in refused[0]
        orch = env.orchestrator.url
        async with asyncio.timeout(10):  # globex's answer was taken up, and ignored
            while metric(orch, "baton_input_answers_total", outcome="forbidden") < 1:
                await asyncio.sleep(0.1)
    finally:
        await globex.close()
    state = run_state(env, task_id)
    assert state["status"] == "running"
    assert state["steps"]["r1.confirm"]["status"] == "waiting_input"
    await answer(acme, task_id, "mine", "r1.confirm")
    await wait_for(acme, task_id, "waiting_input", "r1.detail")


async def test_a_repeated_answer_is_ignored_and_never_answers_the_next_step(
    env: LocalStack, acme: Client, bus: Bus
) -> None:
    task_id = await submit(acme, "ask", "write")
    await wait_for(acme, task_id, "waiting_input", "r1.confirm")
    before = metric(env.orchestrator.url, "baton_input_answers_total", outcome="already_answered")
    await answer(acme, task_id, "first", "r1.confirm")
    await wait_for(acme, task_id, "waiting_input", "r1.detail")
    await answer(acme, task_id, "first, sent again", "r1.confirm")
    async with asyncio.timeout(10):
        while metric(env.orchestrator.url, "baton_input_answers_total",
                     outcome="already_answered") < before + 1:  # fmt: skip
            await asyncio.sleep(0.1)
    state = run_state(env, task_id)
    assert state["steps"]["r1.detail"]["status"] == "waiting_input"  # still asking
    assert state["steps"]["r1.confirm"]["output"] == "first"
    assert await user_messages(bus, task_id) == ["write", "first"]
    await answer(acme, task_id, "second", "r1.detail")
    assert (await acme.events("acme", task_id, timeout=30))[-1]["type"] == "completed"


def test_an_input_step_is_validated_with_its_line(tmp_path: Path) -> None:
    from services.orchestrator.workflows import WorkflowError, parse

    bad = WORKFLOWS["quick.yaml"].replace("timeout: 1.5", "timeout: 0")
    with pytest.raises(WorkflowError, match=r"q.yaml:7: input timeout must be > 0"):
        parse(bad, "q.yaml")
    bad = WORKFLOWS["quick.yaml"].replace(', default: "go ahead by default"', "")
    with pytest.raises(WorkflowError, match=r"q.yaml:7: .*missing required field `default`"):
        parse(bad, "q.yaml")
    both = WORKFLOWS["quick.yaml"].replace(
        "  - id: confirm\n", "  - id: confirm\n    agent: writer\n"
    )
    with pytest.raises(WorkflowError, match=r"q.yaml:6: a step names exactly one of"):
        parse(both, "q.yaml")


async def test_with_api_keys_the_key_decides_whose_task_may_be_answered(
    env: LocalStack, acme: Client, bus: Bus
) -> None:
    keyed = env.service("orchestrator", BATON_API_KEYS=json.dumps({"ka": "acme", "kg": "globex"}))
    await asyncio.to_thread(keyed.wait_ready)
    try:
        task_id = await submit(acme, "ask", "hi")
        await wait_for(acme, task_id, "waiting_input", "r1.confirm")
        url = f"{keyed.url}/v1/tasks/{task_id}/input"
        nokey = http_post(url, {"answer": "x"}, 401)
        assert nokey["error"]["code"] == "unauthorized"
        other = http_post(url, {"answer": "hijacked"}, 404, {"Authorization": "Bearer kg"})
        assert other["error"]["code"] == "unknown_task"
        assert run_state(env, task_id)["steps"]["r1.confirm"]["status"] == "waiting_input"
        http_post(url, {"answer": "mine"}, 202, {"Authorization": "Bearer ka"})
        await wait_for(acme, task_id, "waiting_input", "r1.detail")
        assert await user_messages(bus, task_id) == ["hi", "mine"]
    finally:
        keyed.terminate()
        env.procs.remove(keyed)
