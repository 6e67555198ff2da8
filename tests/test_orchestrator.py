"""The orchestrator as a user sees it: the research workflow, budgets, cost,
cancellation, tenant-scoped API keys and live events (simulator engine).
A step nobody answers: the conductor on the bus twin (tests/test_conductor_shell.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from baton.dev.testing import Client, LocalStack, http_get, http_json, metric, uid
from baton.natsd import NatsServer
from tests.harness import http_post


async def test_research_fans_out_fans_in_and_reports_usage_and_cost(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "initech", uid()
    events = await client.events(tenant, task_id, timeout=0.1, until_terminal=False)
    assert events == []
    await client.publish("research", {"tenant": tenant, "input": "compare quicksort and mergesort",
                                      "task_id": task_id})  # fmt: skip
    events = await client.events(tenant, task_id, timeout=30)
    done = events[-1]
    assert done["type"] == "completed", done
    started = [e["step"] for e in events
               if e["type"] == "step" and e["status"] == "started" and not e.get("tool")]  # fmt: skip
    assert started[:4] == [
        "r1.plan",
        "r1.gather.retrieval",
        "r1.gather.coding",
        "r1.validate",
    ] or started[:4] == ["r1.plan", "r1.gather.coding", "r1.gather.retrieval", "r1.validate"]
    assert started[-1].endswith(".summarize")
    state = http_json(f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}")
    steps = state["steps"]
    assert (
        sum(s["usage"]["completion_tokens"] for s in steps.values())
        == done["usage"]["completion_tokens"]
    )
    # The fan-out's branches may be pre-warmed: their cost is the task's, in no step's.
    warms = state["prewarm_cost_usd"]
    assert abs(sum(s["cost_usd"] for s in steps.values()) + warms - done["cost_usd"]) < 1e-9
    assert done["cost_usd"] > 0
    # The workers answered on forks of the supervisor's session...
    gather = [s for k, s in steps.items() if ".gather." in k]
    store = next(p for p in stack.procs if p.name == "context-store")
    for branch in gather:
        assert branch["session"] != task_id
        fork = http_json(f"{store.url}/v1/sessions/{tenant}/{branch['session']}")
        roles = [m["role"] for m in fork["messages"]]
        assert roles[:3] == ["system", "user", "assistant"]  # the parent's prefix, shared
        assert fork["messages"][-1]["content"] == branch["output"]  # the branch's own answer
    # ...and the validator read both answers by pointer: its prompt holds them.
    # (A branch's usage adds up its model turns, before and after its tool calls.)
    main = http_json(f"{store.url}/v1/sessions/{tenant}/{task_id}")
    fan_in = [m["content"] for m in main["messages"] if m["role"] == "user"][1:]
    assert [c.split("]")[0] for c in fan_in[:2]] == ["[retrieval", "[coding"]
    assert (
        steps["r1.validate"]["usage"]["prompt_tokens"]
        > steps["r1.plan"]["usage"]["prompt_tokens"] + 2 * 20
    )
    assert [e["type"] for e in state["events"]][-1] == "completed"
    metrics = http_get(f"{stack.orchestrator.url}/metrics")
    assert 'baton_tasks_total{outcome="completed",workflow="research"}' in metrics
    assert 'baton_cost_usd_total{agent="coding",workflow="research"}' in metrics


async def test_a_budget_stops_the_run_at_the_step_that_would_overshoot(
    stack: LocalStack, client: Client
) -> None:
    tenant = "umbrella"
    free = await client.run(
        "research", {"tenant": tenant, "input": "plan a trip", "task_id": uid()}
    )
    assert free["type"] == "completed"
    budget = 160
    stopped = await client.run("research", {"tenant": tenant, "input": "plan a trip",
                                            "task_id": (tid := uid()), "budget": {"max_tokens": budget}})  # fmt: skip
    assert stopped["type"] == "failed"
    assert stopped["error"]["code"] == "budget_exceeded"
    assert stopped["error"]["layer"] == "orchestration"
    assert stopped["partial_output"]  # the plan's answer
    state = http_json(f"{stack.orchestrator.url}/v1/tasks/{tid}?tenant={tenant}")
    assert state["usage"]["prompt_tokens"] + state["usage"]["completion_tokens"] <= budget
    assert "r1.plan" in state["steps"] and state["steps"]["r1.plan"]["status"] == "done"


async def test_cancel_stops_a_running_task_and_its_generation(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    stack = LocalStack(own_nats, tmp_path / "s")
    stack.workdir.mkdir(parents=True)
    for name in ("context-store", "orchestrator"):
        stack.service(name).wait_ready()
    worker = stack.worker(BATON_SIM_DECODE_TPS="20").wait_ready()  # 128 tokens ~ 6 s
    client = await Client.connect(own_nats.url)
    try:
        tenant, task_id = "hooli", uid()
        await client.publish("chat", {"tenant": tenant, "input": "long story", "task_id": task_id})
        for _ in range(100):
            if metric(worker.url, "baton_worker_inflight_jobs") >= 1:
                break
            await asyncio.sleep(0.05)
        resp = http_post(
            f"{stack.orchestrator.url}/v1/tasks/{task_id}/cancel?tenant={tenant}", {}, 200
        )
        assert resp["status"] == "cancelled"
        events = await client.events(tenant, task_id, timeout=10)
        assert events[-1]["type"] == "failed" and events[-1]["error"]["code"] == "cancelled"
        for _ in range(60):  # the worker aborted the generation, long before its 6 s
            if metric(worker.url, "baton_worker_inflight_jobs") == 0:
                break
            await asyncio.sleep(0.05)
        assert metric(worker.url, "baton_worker_inflight_jobs") == 0
        assert metric(worker.url, "baton_worker_jobs_total", outcome="cancelled") == 1
    finally:
        await client.close()
        stack.stop()


async def test_api_keys_scope_every_task_to_its_tenant(stack: LocalStack, client: Client) -> None:
    keys = {"key-acme": "acme", "key-globex": "globex"}
    orch = stack.service("orchestrator", BATON_API_KEYS=json.dumps(keys)).wait_ready()
    try:
        acme = {"Authorization": "Bearer key-acme"}
        resp = http_post(f"{orch.url}/v1/tasks", {"input": "mine", "tenant": "ignored"}, 202, acme)
        assert resp["tenant"] == keys["key-acme"]
        await client.events(resp["tenant"], resp["task_id"])
        url = f"{orch.url}/v1/tasks/{resp['task_id']}"
        assert http_json(url, acme)["status"] == "completed"
        for headers, code in (({"Authorization": "Bearer key-globex"}, 404), ({}, 401),
                              ({"Authorization": "Bearer wrong"}, 401)):  # fmt: skip
            try:
                http_get(url, headers)
                raise AssertionError(f"read with {headers}")
            except urllib.error.HTTPError as exc:
                assert exc.code == code
    finally:
        orch.terminate()
        stack.procs.remove(orch)


async def test_server_sent_events_replay_then_follow_to_the_end(
    stack: LocalStack, client: Client
) -> None:
    tenant = "wonka"
    resp = http_post(f"{stack.orchestrator.url}/v1/tasks", {"tenant": tenant, "input": "hi"}, 202)
    url = f"{stack.orchestrator.url}/v1/tasks/{resp['task_id']}/events?tenant={tenant}"
    body = await asyncio.to_thread(http_get, url)
    kinds = [line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "accepted" and kinds[-1] == "completed"
    wfs = http_json(f"{stack.orchestrator.url}/v1/workflows")["workflows"]
    assert {w["name"] for w in wfs} >= {"chat", "research"}
