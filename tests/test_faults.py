"""Faults on a private nats-server: killed workers and orchestrators, engine
OOMs, graceful drain, a restarted NATS. Nothing is lost or duplicated."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from baton.natsd import NatsServer
from tests.harness import Client, LocalStack, uid

SLOW = {"BATON_SIM_DECODE_TPS": "25"}  # 128 tokens ~ 5 s: time to strike mid-generation


@pytest.fixture
def private(own_nats: NatsServer, tmp_path: Path) -> Iterator[LocalStack]:
    s = LocalStack(own_nats.url, tmp_path / "stack")
    s.workdir.mkdir(parents=True)
    yield s
    s.stop()


@pytest.fixture
async def pclient(own_nats: NatsServer) -> AsyncIterator[Client]:
    c = await Client.connect(own_nats.url)
    yield c
    await c.close()


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


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _session(stack: LocalStack, tenant: str, session: str) -> dict[str, object]:
    cs = next(p for p in stack.procs if p.name == "context-store")
    with urllib.request.urlopen(f"{cs.url}/v1/sessions/{tenant}/{session}", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def test_a_worker_killed_mid_generation_loses_and_duplicates_nothing(
    private: LocalStack, pclient: Client
) -> None:
    _start(private, ["context-store", "orchestrator"])
    doomed = private.worker(**SLOW).wait_ready()
    tenant, task_id = uid("acme"), uid()
    await pclient.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(pclient, tenant, task_id)
    await asyncio.sleep(1.0)  # mid-generation
    doomed.kill()
    private.worker().wait_ready()  # a healthy replacement
    events = await pclient.events(tenant, task_id, timeout=40)
    assert events[-1]["type"] == "completed"
    assert [e["type"] for e in events].count("completed") == 1
    history = _session(private, tenant, task_id)
    roles = [m["role"] for m in history["messages"]]  # type: ignore[union-attr]
    assert roles == ["system", "user", "assistant"]  # the answer exactly once


async def test_an_engine_oom_is_survived_and_the_job_completes_once(
    private: LocalStack, pclient: Client
) -> None:
    _start(private, ["context-store", "orchestrator"])
    worker = private.worker().wait_ready()
    _post(f"{worker.url}/debug/inject-oom?count=1")
    tenant, task_id = uid("acme"), uid()
    done = await pclient.run("chat", {"tenant": tenant, "input": "hi", "task_id": task_id},
                             timeout=30)  # fmt: skip
    assert done["type"] == "completed"
    assert _metric(worker.url, 'baton_worker_oom_total{pool="default"}') == 1
    assert _metric(worker.url, 'baton_worker_engine_restarts_total{pool="default"}') == 1
    assert _metric(worker.url, "baton_worker_ready") == 1
    roles = [m["role"] for m in _session(private, tenant, task_id)["messages"]]  # type: ignore[union-attr]
    assert roles == ["system", "user", "assistant"]


async def test_sigterm_drains_in_flight_jobs_and_exits_zero(
    private: LocalStack, pclient: Client
) -> None:
    _start(private, ["context-store", "orchestrator"])
    worker = private.worker(**SLOW).wait_ready()
    tenant, task_id = uid("acme"), uid()
    await pclient.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(pclient, tenant, task_id)
    code = await asyncio.to_thread(worker.terminate, 30)
    assert code == 0
    events = await pclient.events(tenant, task_id, timeout=5)
    assert events[-1]["type"] == "completed"  # finished by the draining worker


async def test_a_killed_orchestrator_run_is_finished_by_another_replica(
    private: LocalStack, pclient: Client
) -> None:
    _start(private, ["context-store"])
    first = private.service("orchestrator").wait_ready()
    private.worker(**SLOW).wait_ready()
    tenant, task_id = uid("acme"), uid()
    await pclient.publish("chat", {"tenant": tenant, "input": "hi", "task_id": task_id})
    await _wait_step_started(pclient, tenant, task_id)
    first.kill()
    private.service("orchestrator").wait_ready()
    events = await pclient.events(tenant, task_id, timeout=30)
    assert events[-1]["type"] == "completed"
    assert [e["type"] for e in events].count("completed") == 1


async def test_services_reconnect_after_nats_restarts(
    own_nats: NatsServer, private: LocalStack, pclient: Client
) -> None:
    _start(private, ["context-store", "orchestrator", "inference-worker"])
    first = await pclient.run("chat", {"tenant": "acme", "input": "a", "task_id": uid()})
    assert first["type"] == "completed"
    await pclient.close()
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
        pclient.nc = client.nc  # the fixture closes this one


def _post(url: str) -> None:
    req = urllib.request.Request(url, b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
