"""Faults on a private nats-server: killed workers and orchestrators, engine
OOMs, graceful drain, a restarted NATS. Nothing is lost or duplicated."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from baton.dev.testing import Client, LocalStack, metric, uid
from baton.natsd import NatsServer
from services.orchestrator.runkeys import key_entry, unseal
from tests.harness import http_post

SLOW = {"BATON_SIM_DECODE_TPS": "25"}  # 128 tokens ~ 5 s: time to strike mid-generation


@pytest.fixture
def private(own_nats: NatsServer, tmp_path: Path) -> Iterator[LocalStack]:
    s = LocalStack(own_nats, tmp_path / "stack")
    s.workdir.mkdir(parents=True)
    yield s
    s.stop()


def _start(stack: LocalStack, names: list[str], **env: str) -> None:
    procs = [stack.service(n, **env) if n != "inference-worker" else stack.worker(**env)
             for n in names]  # fmt: skip
    for p in procs:
        p.wait_ready()


async def _wait_step_started(client: Client, tenant: str, task_id: str) -> None:
    for _ in range(100):
        events = await client.events(tenant, task_id, timeout=0.3, until_terminal=False)
        if any(e["type"] == "step" and e["status"] == "started" for e in events):
            return
    raise AssertionError("the step never started")


def _session(stack: LocalStack, tenant: str, session: str) -> dict[str, object]:
    cs = next(p for p in stack.procs if p.name == "context-store")
    with urllib.request.urlopen(f"{cs.url}/v1/sessions/{tenant}/{session}", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def test_a_worker_killed_mid_generation_loses_and_duplicates_nothing(
    private: LocalStack, own_client: Client
) -> None:
    _start(private, ["context-store", "orchestrator"])
    doomed = private.worker(**SLOW).wait_ready()
    tenant, task_id = "acme", uid()
    await own_client.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(own_client, tenant, task_id)
    await asyncio.sleep(1.0)  # mid-generation
    doomed.kill()
    private.worker().wait_ready()  # a healthy replacement
    events = await own_client.events(tenant, task_id, timeout=40)
    assert events[-1]["type"] == "completed"
    history = _session(private, tenant, task_id)
    roles = [m["role"] for m in history["messages"]]  # type: ignore[union-attr]
    assert roles == ["system", "user", "assistant"]  # the answer exactly once


async def test_an_engine_oom_is_survived_and_the_job_completes_once(
    private: LocalStack, own_client: Client
) -> None:
    _start(private, ["context-store", "orchestrator"])
    worker = private.worker().wait_ready()
    http_post(f"{worker.url}/debug/inject-oom?count=1", {}, 200)
    tenant, task_id = "acme", uid()
    done = await own_client.run("chat", {"tenant": tenant, "input": "hi", "task_id": task_id},
                             timeout=30)  # fmt: skip
    assert done["type"] == "completed"
    assert metric(worker.url, "baton_worker_oom_total", pool="default") == 1
    assert metric(worker.url, "baton_worker_engine_restarts_total", pool="default") == 1
    assert metric(worker.url, "baton_worker_ready") == 1
    roles = [m["role"] for m in _session(private, tenant, task_id)["messages"]]  # type: ignore[union-attr]
    assert roles == ["system", "user", "assistant"]


async def test_sigterm_drains_in_flight_jobs_and_exits_zero(
    private: LocalStack, own_client: Client
) -> None:
    _start(private, ["context-store", "orchestrator"])
    worker = private.worker(**SLOW).wait_ready()
    tenant, task_id = "acme", uid()
    await own_client.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(own_client, tenant, task_id)
    code = await asyncio.to_thread(worker.terminate, 30)
    assert code == 0
    events = await own_client.events(tenant, task_id, timeout=5)
    assert events[-1]["type"] == "completed"  # finished by the draining worker


async def test_sigterm_without_nats_stops_within_the_shutdown_grace(
    private: LocalStack, own_nats: NatsServer, own_client: Client
) -> None:
    """With NATS gone nothing in flight can be settled: SIGTERM is obeyed
    within BATON_SHUTDOWN_GRACE instead of waiting out the worker's drain
    (60 s) on a job whose result cannot be stored. Exit 1: nothing was
    drained (the job is redelivered after its ack wait)."""
    grace = 2.0
    env = {"BATON_SHUTDOWN_GRACE": str(grace)}
    _start(private, ["context-store", "orchestrator"], **env)
    worker = private.worker(**SLOW, **env).wait_ready()
    tenant, task_id = "acme", uid()
    await own_client.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(own_client, tenant, task_id)
    await own_client.close()
    own_nats.kill()
    started = time.monotonic()
    others = [p for p in private.procs if p is not worker]
    for p in others:
        p.signal()
    assert await asyncio.to_thread(worker.terminate, 30) == 1
    assert time.monotonic() - started < grace + 5  # not the 60 s drain
    for p in others:  # nothing of theirs in flight: within the grace, or at once
        assert await asyncio.to_thread(p.terminate, 30) in (0, 1)
        assert time.monotonic() - started < grace + 5


async def test_a_killed_orchestrator_run_is_finished_by_another_replica(
    private: LocalStack, own_client: Client
) -> None:
    _start(private, ["context-store"])
    first = private.service("orchestrator").wait_ready()
    worker = private.worker(**SLOW).wait_ready()
    tenant, task_id = "acme", uid()
    await own_client.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(own_client, tenant, task_id)
    first.kill()
    second = private.service("orchestrator").wait_ready()
    events = await own_client.events(tenant, task_id, timeout=30)
    assert events[-1]["type"] == "completed"
    # Finished once, by the second replica, from the one generation.
    assert metric(second.url, "baton_tasks_total", workflow="chat", outcome="completed") == 1
    assert metric(worker.url, "baton_worker_jobs_total", outcome="completed") == 1
    roles = [m["role"] for m in _session(private, tenant, task_id)["messages"]]  # type: ignore[union-attr]
    assert roles == ["system", "user", "assistant"]


async def test_a_crash_between_storing_a_step_done_and_dispatching_the_next_strands_nothing(
    private: LocalStack, own_client: Client
) -> None:
    """The stranded run: the orchestrator stores r1.plan as done and dies
    before publishing the fan-out (test hook BATON_TEST_CRASH_AFTER_COMMIT).
    The result is redelivered to another replica, which finds the change
    stored and performs what it implies: the run completes, each step once."""
    _start(private, ["context-store", "inference-worker"])
    doomed = private.service("orchestrator", BATON_TEST_CRASH_AFTER_COMMIT="r1.plan").wait_ready()
    tenant, task_id = "acme", uid()
    await own_client.publish("research", {"tenant": tenant, "input": "hi", "task_id": task_id})
    for _ in range(200):
        if not doomed.alive():
            break
        await asyncio.sleep(0.05)
    assert not doomed.alive(), "the test hook never fired"
    kv = await own_client.js.key_value("baton-runs")
    run = f"{tenant}.{task_id}"  # stored sealed with the run's own key (runkeys.py)
    key = (await kv.get(key_entry(run))).value
    stored = msgpack.unpackb(unseal(key, run, (await kv.get(run)).value))
    assert stored["steps"]["r1.plan"]["status"] == "done"
    gather = stored["steps"]["r1.gather.coding"]
    assert gather.get("status", "dispatched") == "dispatched"  # stored, never sent
    before = await own_client.events(tenant, task_id, timeout=0.5, until_terminal=False)
    assert not any(e.get("step", "").startswith("r1.gather") for e in before)
    private.service("orchestrator").wait_ready()
    events = await own_client.events(tenant, task_id, timeout=40)
    assert events[-1]["type"] == "completed", events[-1]
    done = [e["step"] for e in events if e["type"] == "step" and e["status"] == "done"]
    assert len(done) == len(set(done)) and "r1.gather.coding" in done
    history = _session(private, tenant, task_id)
    answers = [m for m in history["messages"] if m["role"] == "assistant"]  # type: ignore[union-attr]
    assert len(answers) == len([s for s in done if ".gather." not in s])  # each answer once


async def test_services_reconnect_after_nats_restarts(
    own_nats: NatsServer, private: LocalStack, own_client: Client
) -> None:
    _start(private, ["context-store", "orchestrator", "inference-worker"])
    first = await own_client.run("chat", {"tenant": "acme", "input": "a", "task_id": uid()})
    assert first["type"] == "completed"
    await own_client.close()
    own_nats.restart()  # same port, same store
    client = await Client.connect(own_nats.url)
    try:
        for _ in range(50):  # the services reconnect on their own
            try:
                done = await client.run("chat", {"tenant": "acme", "input": "b", "task_id": uid()},
                                        timeout=15)  # fmt: skip
                break
            except Exception:
                await asyncio.sleep(0.5)
        assert done["type"] == "completed"
    finally:
        await client.close()
        own_client.nc = client.nc  # the fixture closes this one
