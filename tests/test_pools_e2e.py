"""Pool placement on real processes (real nats-server, simulator engines):
two pools with different context lengths, an agent that may use either.
A short step goes to the cheap small pool; a step too long for the small
pool's workers (whose catalogue entry overstates them: the drift is counted)
is moved to the large pool by the worker's ``prompt_too_long`` and
completes; a step that fits no pool fails at once."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from baton.dev.testing import Client, LocalStack, metric, secure_nats, uid
from tests.harness import one_step

WORKFLOW = one_step("ask", max_tokens=32, pools=["small", "large"])
# The small pool's entry says 4096; its worker serves 1024 (drift, and a
# step placed there that its worker cannot hold).
POOLS = {
    "small": {"max_model_len": 4096, "usd_per_gpu_hour": 1.0, "prefill_tps": 20000,
              "decode_tps": 400, "cold_start_s": 30},
    "large": {"max_model_len": 8192, "usd_per_gpu_hour": 4.0, "prefill_tps": 20000,
              "decode_tps": 400, "cold_start_s": 30},
}  # fmt: skip


@pytest.fixture
def two_pools(own_stack: LocalStack) -> LocalStack:
    s = own_stack.start(
        workers=0, workflows={"ask.yaml": WORKFLOW}, pools=POOLS, BATON_PENDING_POLL_INTERVAL="0.5"
    )
    s.worker(BATON_POOL="small", BATON_MAX_MODEL_LEN="1024").wait_ready()
    s.worker(BATON_POOL="large", BATON_MAX_MODEL_LEN="8192").wait_ready()
    return s


def _steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "step" and e.get("step") == "r1.answer"]


async def _run(client: Client, text: str) -> list[dict[str, Any]]:
    body = {"tenant": "initech", "input": text, "task_id": uid()}
    await client.publish("ask", body, msg_id=body["task_id"])
    return await client.events("initech", body["task_id"], timeout=40)


async def test_steps_go_to_the_pool_that_holds_them_cheapest_first(
    two_pools: LocalStack, own_client: Client
) -> None:
    url = two_pools.orchestrator.url
    # Both pools' workers must be seen before placement weighs them.
    for _ in range(40):
        if metric(url, "baton_pool_catalogue_drift_total", pool="small",
                  figure="max_model_len") >= 1:  # fmt: skip
            break
        await __import__("asyncio").sleep(0.25)
    assert metric(url, "baton_pool_catalogue_drift_total", pool="small",
                  figure="max_model_len") == 1  # fmt: skip

    short = await _run(own_client, "hello")
    assert short[-1]["type"] == "completed", short[-1]
    started, done = _steps(short)
    assert (started["pool"], started["pool_reason"]) == ("small", "cheapest")
    assert started["prediction"]["kv_tokens"] > 32 and started["prediction"]["gpu_seconds"] > 0
    assert done["status"] == "done" and done["pool"] == "small"

    # ~1,700 tokens: the catalogue says the small pool holds it, its worker
    # says prompt_too_long, and the step moves to the large pool.
    long = await _run(own_client, "lorem ipsum " * 600)
    assert long[-1]["type"] == "completed", long[-1]
    started, done = _steps(long)
    assert started["pool"] == "small"
    assert (done["pool"], done["pool_reason"]) == ("large", "moved")
    assert metric(url, "baton_pool_decisions_total", chosen="large", reason="moved") == 1

    # ~16,000 tokens: no pool holds it; it fails at dispatch, no job sent.
    huge = await _run(own_client, "lorem ipsum " * 5400)
    assert huge[-1]["type"] == "failed", huge[-1]
    assert huge[-1]["error"]["code"] == "prompt_too_long"
    assert "holds 8192" in huge[-1]["error"]["message"]
    assert metric(url, "baton_pool_decisions_total", chosen="none", reason="too_long") == 1


COLD_WORKFLOW = one_step("wake", max_tokens=16, pool="cold")
COLD = {"cold": {"cold_start_s": 20, "prefill_tps": 20000, "decode_tps": 400}}


@pytest.fixture(scope="module")
def pool_at_zero(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """An orchestrator whose pool ``cold`` has no worker (scaled to zero), on
    a nats-server of its own; the module's tests share it (each starts
    workers of its own pool, ``cold`` or ``slow``, and reads only those)."""
    tmp = tmp_path_factory.mktemp("pool-at-zero")
    server = secure_nats(tmp / "nats", encrypt=False).start()
    stack = LocalStack(server, tmp / "s")
    try:
        yield stack.start(
            workers=0, workflows={"wake.yaml": COLD_WORKFLOW}, pools=COLD, BATON_STEP_TIMEOUT="5"
        )
    finally:
        stack.stop()
        server.stop()


@pytest.fixture
async def zero_client(pool_at_zero: LocalStack) -> AsyncIterator[Client]:
    c = await Client.connect(pool_at_zero.nats_url)
    yield c
    await c.close()


async def test_a_pool_at_zero_holds_the_step_until_a_worker_starts(
    pool_at_zero: LocalStack, zero_client: Client
) -> None:
    url = pool_at_zero.orchestrator.url
    body = {"tenant": "initech", "input": "hello", "task_id": uid()}
    await zero_client.publish("wake", body, msg_id=body["task_id"])
    events = await zero_client.events("initech", body["task_id"], timeout=3, until_terminal=False)
    steps = [e for e in events if e["type"] == "step"]
    assert [e["status"] for e in steps] == ["started", "waiting_capacity"], events
    assert steps[1]["estimate_s"] == 20 and steps[1]["pool"] == "cold"
    assert steps[1]["prediction"]["cold"] is True
    # The job is the pool's backlog (KEDA's lag on worker-cold wakes it),
    # provisioned by the orchestrator before any worker of the pool ran.
    pending = 0.0
    for _ in range(20):
        pending = metric(url, "baton_consumer_pending_messages", stream="BATON_JOBS",
                         consumer="worker-cold")  # fmt: skip
        if pending:
            break
        await asyncio.sleep(0.25)
    assert pending == 1
    assert metric(url, "baton_steps_waiting_capacity_total", pool="cold") == 1
    # Longer than the step timeout (5 s) before the worker is up: the
    # deadline ran from the cold start's estimate, nothing failed or retried.
    await asyncio.sleep(3)
    pool_at_zero.worker(BATON_POOL="cold", BATON_SIM_LOAD_SECONDS="1.5")
    events = await zero_client.events("initech", body["task_id"], timeout=30)
    assert events[-1]["type"] == "completed", events[-1]
    steps = [e for e in events if e["type"] == "step"]
    assert [e["status"] for e in steps] == ["started", "waiting_capacity", "done"]
    assert steps[-1]["pool"] == "cold" and steps[-1]["phases"]["queue"] > 4
    assert metric(url, "baton_tasks_total", workflow="wake", outcome="completed") == 1


async def test_a_starting_worker_has_its_consumers_before_its_engine_loads(
    pool_at_zero: LocalStack, zero_client: Client
) -> None:
    """No delivery is wasted on a worker that is still loading: its pool's
    and its own consumers exist (and the pool's backlog keeps counting)
    while its engine loads; it takes jobs once it is ready."""
    wid = uid("w")
    worker = pool_at_zero.service("inference-worker", BATON_WORKER_ID=wid, BATON_POOL="slow",
                                  BATON_SIM_LOAD_SECONDS="6")  # fmt: skip
    info = None
    for _ in range(40):
        try:
            info = await zero_client.js.consumer_info("BATON_JOBS", "worker-slow")
            break
        except Exception:
            await asyncio.sleep(0.1)
    assert info is not None and info.config.filter_subject == "baton.jobs.slow"
    direct = [c.config.description for c in await zero_client.js.consumers_info("BATON_JOBS")]
    assert f"direct:slow:{wid}" in direct
    with pytest.raises(OSError):  # still loading: not ready
        urllib.request.urlopen(f"{worker.url}/readyz", timeout=1)
    worker.wait_ready(20)
