"""Pre-warm from the graph on real processes (real nats-server, simulator
engines, two workers): while the first step runs, the orchestrator warms
the second step's prefix (its agent's system prompt + the session) on one
worker; the second step is routed there and finds its prefix cached. The
warm answers nothing (nothing appended to the session); the GPU time it
took is charged to the run. Across an input wait the step after it is
warmed, kept warm, and runs there; across a slow tool call (a real MCP
server) the step's own prefix is kept warm where its turn ran."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.dev.testing import Client, LocalStack, http_get, http_json, metric, uid
from baton.natsd import NatsServer
from baton.stack import ServiceProcess
from tests.harness import http_post, mcp_http_server

FLOW = textwrap.dedent("""\
    name: relay
    agents:
      drafter: {role: drafter, system: You draft an answer., max_tokens: 48}
      editor: {role: editor, system: You edit the draft into a short answer., max_tokens: 8}
    steps:
      - {id: draft, agent: drafter}
      - {id: edit, agent: editor}
    """)
ASK = FLOW.replace("name: relay", "name: review").replace(
    "  - {id: edit",
    '  - {id: ask, input: {prompt: "Change?", default: "no", timeout: 60}}\n  - {id: edit',
)


@pytest.fixture
def relay(own_nats: NatsServer, tmp_path: Path) -> Iterator[LocalStack]:
    # Slow decoding: the first step runs long enough for its follower's warm.
    s = LocalStack(own_nats, tmp_path / "s", env={"BATON_SIM_DECODE_TPS": "80"})
    yield two_workers(s, {"relay.yaml": FLOW, "review.yaml": ASK})
    s.stop()


def two_workers(s: LocalStack, workflows: dict[str, str]) -> LocalStack:
    """``s`` started: a context store, an orchestrator running ``workflows``
    that keeps waits warm every 0.5 s, and two simulator workers."""
    return s.start(workers=2, workflows=workflows, BATON_PREWARM_KEEP_EVERY="0.5")


async def both_workers(relay: LocalStack) -> list[ServiceProcess]:
    url = relay.orchestrator.url
    workers = [p for p in relay.procs if p.name == "inference-worker"]
    for _ in range(40):  # both workers' heartbeats seen
        if all(f'worker="{w.env["BATON_WORKER_ID"]}"' in http_get(f"{url}/metrics")
               for w in workers):  # fmt: skip
            break
        await asyncio.sleep(0.25)
    return workers


async def test_the_next_step_is_warmed_where_it_then_runs(
    relay: LocalStack, own_client: Client
) -> None:
    url = relay.orchestrator.url
    workers = await both_workers(relay)
    task_id = uid()
    done = await own_client.run("relay", {"tenant": "initech", "input": "hello",
                                          "task_id": task_id}, timeout=40)  # fmt: skip
    assert done["type"] == "completed", done
    # The editor saw system, input and the draft: no warm answer in the session.
    assert done["output"].startswith("[sim: 3 messages"), done["output"]
    assert metric(url, "baton_prewarms_total", outcome="sent") == 1
    warmed = {w.env["BATON_WORKER_ID"]: metric(w.url, "baton_worker_warms_total",
                                                 outcome="warmed") for w in workers}  # fmt: skip
    assert sorted(warmed.values()) == [0, 1], warmed
    target = next(w for w, n in warmed.items() if n == 1)
    steps = http_json(f"{url}/v1/tasks/{task_id}?tenant=initech")["steps"]
    assert steps["r1.edit"]["worker"] == target
    # Its system prompt and the input were prefilled by the warm: cached.
    assert steps["r1.edit"]["cached_tokens"] > 10, steps["r1.edit"]
    # No answer for the warm: the worker's job counters saw two real jobs.
    jobs = sum(metric(w.url, "baton_worker_jobs_total", outcome="completed") for w in workers)
    assert jobs == 2
    # Its prefill's GPU time is the run's too (its charge may trail the answer).
    task = http_json(f"{url}/v1/tasks/{task_id}?tenant=initech")
    for _ in range(40):
        if (
            task["usage"]["gpu_seconds"]
            > sum(s["usage"]["gpu_seconds"] for s in task["steps"].values()) + 1e-6
        ):
            break
        await asyncio.sleep(0.25)
        task = http_json(f"{url}/v1/tasks/{task_id}?tenant=initech")
    spent = sum(s["usage"]["gpu_seconds"] for s in task["steps"].values())
    assert task["usage"]["gpu_seconds"] > spent + 1e-6, task["usage"]


async def test_across_an_input_wait_the_step_after_is_kept_warm_and_runs_there(
    relay: LocalStack, own_client: Client
) -> None:
    url = relay.orchestrator.url
    workers = await both_workers(relay)
    task_id, state = uid(), f"{url}/v1/tasks/{{}}?tenant=initech"
    await own_client.publish("review", {"tenant": "initech", "input": "hello",
                                        "task_id": task_id}, msg_id=task_id)  # fmt: skip
    steps: dict[str, Any] = {}
    for _ in range(100):
        with contextlib.suppress(urllib.error.HTTPError):  # 404 until it is taken in
            steps = http_json(state.format(task_id)).get("steps", {})
        if steps.get("r1.ask", {}).get("status") == "waiting_input":
            break
        await asyncio.sleep(0.1)
    assert steps["r1.ask"]["status"] == "waiting_input", steps
    # Warmed once as the wait began, then again every 0.5 s while it lasts.
    for _ in range(50):
        if metric(url, "baton_prewarms_total", outcome="kept") >= 2:
            break
        await asyncio.sleep(0.1)
    assert metric(url, "baton_prewarms_total", outcome="sent") == 1
    assert metric(url, "baton_prewarms_total", outcome="kept") >= 2
    warmed = {w.env["BATON_WORKER_ID"]: metric(w.url, "baton_worker_warms_total",
                                                 outcome="warmed") for w in workers}  # fmt: skip
    [target] = [w for w, n in warmed.items() if n >= 3]  # every warm on one worker
    assert sum(warmed.values()) == warmed[target], warmed
    http_post(f"{url}/v1/tasks/{task_id}/input?tenant=initech", {"answer": "shorter"}, 202)
    done = (await own_client.events("initech", task_id, timeout=30))[-1]
    assert done["type"] == "completed", done
    steps = http_json(state.format(task_id))["steps"]
    assert steps["r1.edit"]["worker"] == target
    # System, input and draft were prefilled while the human was asked.
    assert steps["r1.edit"]["cached_tokens"] > 10, steps["r1.edit"]
    # Answered: no more refreshes.
    kept = metric(url, "baton_prewarms_total", outcome="kept")
    await asyncio.sleep(1.5)
    assert metric(url, "baton_prewarms_total", outcome="kept") == kept


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (the tool worker)")
async def test_while_a_slow_tool_runs_the_steps_own_prefix_is_kept_warm_where_it_ran(
    own_nats: NatsServer, tmp_path: Path, own_client: Client
) -> None:
    slow = (
        "name: slow\nagents:\n  a:\n    role: a\n    system: You wait, then answer.\n"
        "    max_tokens: 8\n    tools: [mcp.web.pause]\nsteps:\n  - id: go\n    agent: a\n"
    )
    mcp = contextlib.ExitStack()
    servers = json.dumps({"web": {"url": mcp.enter_context(mcp_http_server())}})
    s = LocalStack(own_nats, tmp_path / "s", env={"BATON_MCP_SERVERS": servers})
    try:
        two_workers(s, {"slow.yaml": slow}).tool_worker().wait_ready()
        url = s.orchestrator.url
        workers = await both_workers(s)
        task_id = uid()
        await own_client.publish("slow", {"tenant": "initech", "input": "hello",
                                          "task_id": task_id}, msg_id=task_id)  # fmt: skip
        # The pause tool is out for 3 s: the turn's own prefix is kept warm
        # every 0.5 s, on the worker that ran the turn and on no other.
        for _ in range(100):
            if metric(url, "baton_prewarms_total", outcome="kept") >= 2:
                break
            await asyncio.sleep(0.1)
        assert metric(url, "baton_prewarms_total", outcome="kept") >= 2
        done = (await own_client.events("initech", task_id, timeout=60))[-1]
        assert done["type"] == "completed", done
        step = http_json(f"{url}/v1/tasks/{task_id}?tenant=initech")["steps"]["r1.go"]
        warmed = {w.env["BATON_WORKER_ID"]: metric(w.url, "baton_worker_warms_total",
                                                     outcome="warmed") for w in workers}  # fmt: skip
        assert warmed[step["worker"]] >= 2 and sum(warmed.values()) == warmed[step["worker"]]
        assert step["cached_tokens"] > 10, step  # the turn after the tool found its prefix
        # Answered: no more refreshes.
        kept = metric(url, "baton_prewarms_total", outcome="kept")
        await asyncio.sleep(1.5)
        assert metric(url, "baton_prewarms_total", outcome="kept") == kept
    finally:
        s.stop()
        mcp.close()
