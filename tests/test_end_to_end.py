"""A client with no Baton code (nats-py + msgpack) drives the whole system:
three service processes on a real nats-server, simulator engine."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import msgpack

from baton.dev.testing import Client, LocalStack, http_get, metric, uid
from proto.sizes import MAX_INPUT_BYTES
from tests.harness import http_post


async def test_a_task_from_a_plain_client_completes_with_usage_and_cost(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "acme", uid()
    events = await _submit_and_collect(
        client, {"tenant": tenant, "input": "hello", "task_id": task_id}
    )
    types = [e["type"] for e in events]
    assert types == ["accepted", "step", "step", "completed"]
    done = events[-1]
    assert done["task_id"] == task_id and done["session"] == task_id
    assert done["output"].startswith("[sim: 2 messages")  # system prompt + the input
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0
    assert done["usage"]["gpu_seconds"] > 0 and done["cost_usd"] > 0


async def test_a_second_turn_through_session_sees_both_turns(
    stack: LocalStack, client: Client
) -> None:
    tenant, first = "acme", uid()
    one = await client.run("chat", {"tenant": tenant, "input": "my name is Ada", "task_id": first})
    two = await client.run("chat", {"tenant": tenant, "input": "what is my name?",
                                    "task_id": uid(), "session": one["session"]})  # fmt: skip
    assert two["type"] == "completed" and two["session"] == first
    # system, user, assistant, user: the worker resolved the whole history by pointer
    assert two["output"].startswith("[sim: 4 messages")
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]


async def test_a_second_research_task_in_a_session_brings_its_own_branches_home(
    stack: LocalStack, client: Client
) -> None:
    """Fan-ins are appended under an id of their task: the second task's
    r1.gather fan-in is not taken for the first's (and dropped as a duplicate,
    leaving the validator a window that ends at the first task's)."""
    tenant, first = "acme", uid()
    one = await client.run("research", {"tenant": tenant, "input": "sort a list", "task_id": first},
                           timeout=120)  # fmt: skip
    second = uid()
    two = await client.run("research", {"tenant": tenant, "input": "and reverse it",
                                        "task_id": second, "session": first}, timeout=120)  # fmt: skip
    assert one["type"] == two["type"] == "completed", (one, two)
    base = stack.orchestrator.url
    gathered = sum(
        1
        for tid in (first, second)
        for step, st in json.loads(http_get(f"{base}/v1/tasks/{tid}?tenant={tenant}"))[
            "steps"
        ].items()
        if step.endswith(".gather.retrieval") and st["status"] == "done"
    )
    session = json.loads(http_get(f"{_context_store(stack)}/v1/sessions/{tenant}/{first}"))
    brought_home = [m for m in session["messages"]
                    if m["role"] == "user" and m.get("name") == "retrieval"]  # fmt: skip
    assert len(brought_home) == gathered >= 2


def _context_store(stack: LocalStack) -> str:
    return next(p for p in stack.procs if p.name == "context-store").url


async def test_sessions_are_per_tenant(stack: LocalStack, client: Client) -> None:
    a, b, session = "acme", "globex", uid("s")
    await client.run("chat", {"tenant": a, "input": "secret", "task_id": uid(), "session": session})
    other = await client.run(
        "chat", {"tenant": b, "input": "hi", "task_id": uid(), "session": session}
    )
    assert other["output"].startswith("[sim: 2 messages")  # nothing of tenant a's turn


async def test_the_same_task_id_published_twice_runs_once(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "acme", uid()
    body = {"tenant": tenant, "input": "once", "task_id": task_id}
    worker = next(p for p in stack.procs if p.name == "inference-worker")
    # Events are de-duplicated by Msg-Id whatever happens, so count what
    # would differ if the task ran twice: runs finished, jobs generated.
    tasks_before = metric(stack.orchestrator.url, "baton_tasks_total", workflow="chat")
    jobs_before = metric(worker.url, "baton_worker_jobs_total", outcome="completed")
    await client.publish("chat", body, msg_id=task_id)
    await client.publish("chat", body, msg_id=task_id)  # de-duplicated by JetStream
    await client.publish("chat", body)  # no header: de-duplicated by the run store
    events = await client.events(tenant, task_id)
    assert events[-1]["type"] == "completed"
    await asyncio.sleep(1.0)
    tasks = metric(stack.orchestrator.url, "baton_tasks_total", workflow="chat") - tasks_before
    jobs = metric(worker.url, "baton_worker_jobs_total", outcome="completed") - jobs_before
    assert (tasks, jobs) == (1, 1)


async def test_bad_input_fails_with_a_specific_code_and_the_next_task_still_runs(
    stack: LocalStack, client: Client
) -> None:
    tenant = "acme"
    cases: list[tuple[str, Any, str]] = [
        ("chat", {"tenant": tenant, "task_id": uid()}, "missing_field"),
        ("chat", {"tenant": tenant, "task_id": uid(), "input": 7}, "invalid_field"),
        ("nope", {"tenant": tenant, "task_id": uid(), "input": "x"}, "unknown_workflow"),
        ("chat", {"tenant": tenant, "task_id": uid(), "input": "x" * (MAX_INPUT_BYTES + 10)},
         "input_too_large"),
    ]  # fmt: skip
    for workflow, body, _ in cases:
        await client.publish(workflow, body)
    await client.publish("chat", b"\xc1 definitely not msgpack", raw=True)
    await client.publish("chat", msgpack.packb({"input": "no tenant"}))
    for _, body, code in cases:
        [failed] = await client.events(tenant, body["task_id"])
        assert failed["type"] == "failed"
        assert failed["error"]["code"] == code
        assert failed["error"]["layer"] == "orchestration"
        assert failed["error"]["message"]
    ok = await client.run("chat", {"tenant": tenant, "input": "still alive?", "task_id": uid()})
    assert ok["type"] == "completed"
    # Rejected tasks are terminated, not redelivered: the task consumer is empty.
    await asyncio.sleep(0.5)
    info = await client.js.consumer_info(f"BATON_TASKS_{tenant}", "orchestrator-tasks")
    assert info.num_pending == 0 and info.num_ack_pending == 0
    metrics = http_get(f"{stack.orchestrator.url}/metrics")
    assert 'baton_rejected_tasks_total{code="bad_encoding"}' in metrics
    assert 'baton_rejected_tasks_total{code="missing_field"}' in metrics


async def test_http_api_submits_and_reports_a_task(stack: LocalStack, client: Client) -> None:
    tenant = "acme"
    resp = http_post(
        f"{stack.orchestrator.url}/v1/tasks", {"tenant": tenant, "input": "via http"}, 202
    )
    task_id = resp["task_id"]
    assert resp["events_subject"] == f"baton.events.{tenant}.{task_id}"
    await client.events(tenant, task_id)
    status = json.loads(http_get(f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}"))
    assert status["status"] == "completed" and status["usage"]["completion_tokens"] > 0
    err = http_post(f"{stack.orchestrator.url}/v1/tasks",
                {"tenant": tenant, "input": "x", "workflow": "nope"}, expect=404)  # fmt: skip
    assert err["error"]["code"] == "unknown_workflow"
    err = http_post(f"{stack.orchestrator.url}/v1/tasks", {"tenant": "bad.tenant", "input": "x"},
                expect=400)  # fmt: skip
    assert err["error"]["code"] == "invalid_field"
    try:
        http_get(f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={uid('other')}")
        raise AssertionError("another tenant read the task")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


async def test_no_message_between_services_carries_the_history(
    stack: LocalStack, client: Client
) -> None:
    """Jobs and results stay small and constant-size while the history grows."""
    tenant, session = "acme", uid("s")
    sizes: dict[str, list[int]] = {"jobs": [], "results": []}

    async def watch(kind: str) -> None:
        sub = await client.nc.subscribe(f"baton.{kind}.>")
        async for msg in sub.messages:
            if tenant in msg.subject or tenant.encode() in msg.data:
                sizes[kind].append(len(msg.data))

    watchers = [asyncio.create_task(watch(k)) for k in sizes]
    await asyncio.sleep(0.2)
    long_input = "word " * 2000
    for _ in range(4):
        await client.run("chat", {"tenant": tenant, "input": long_input, "task_id": uid(),
                                  "session": session})  # fmt: skip
    for w in watchers:
        w.cancel()
    assert len(sizes["jobs"]) == 4
    assert max(sizes["jobs"]) < 400, sizes  # ~10 KB of input per turn, pointer-sized jobs
    assert max(sizes["jobs"]) - min(sizes["jobs"]) < 16


async def _submit_and_collect(client: Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    await client.publish("chat", body, msg_id=body["task_id"])
    return await client.events(body["tenant"], body["task_id"])
