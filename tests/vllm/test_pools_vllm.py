"""Pool placement on two real worker pools on vLLM-CPU (the tiny model), two
engine configurations: ``small`` (512-token context, a 1,024-token KV cache,
cheap) and ``large`` (2,048-token context, 4,096-token KV cache, 8x the
price). An agent may use either. The catalogue states both as they are, so
every decision is the scheduler's own (the moved-by-the-worker path is in
tests/test_pools_e2e.py).

Which process ran a step is checked three ways: the step's ``pool`` on its
events, the worker id the orchestrator recorded from the result (the task's
``steps``), and each worker's own job counter.

A step whose agent has a latency target spills over to the dearer pool
while the cheap one is at zero (its cold start would miss the target), on
the same engines. Spill-over of a saturated pool is not here: on this box
the tiny model decodes a step in well under a second, so a target between
one run and two is a matter of milliseconds; it is tested on the simulator
(tests/test_scheduling.py, tests/test_pools_e2e.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from baton.dev.testing import Client, LocalStack, http_json, metric, uid
from baton.natsd import NatsServer
from baton.stack import ServiceProcess
from tests.harness import one_step

pytestmark = pytest.mark.vllm

WORKFLOW = one_step("ask", max_tokens=16, pools=["small", "large"])
# The same agent, in a hurry: a cold start of the cheap pool misses its target.
SOON = one_step("soon", max_tokens=16, pools=["small", "large"], latency_target=30)
# The tiny model's KV: 2 layers x (K, V) x 4 heads x 64 x 2 bytes = 2 KiB a token.
ENGINES = {
    "small": {"BATON_MAX_MODEL_LEN": "512", "BATON_KV_CACHE_MEMORY_BYTES": str(2 * 2**20),
              "BATON_MAX_NUM_SEQS": "4"},
    "large": {"BATON_MAX_MODEL_LEN": "2048", "BATON_KV_CACHE_MEMORY_BYTES": str(8 * 2**20),
              "BATON_MAX_NUM_SEQS": "8"},
}  # fmt: skip
COLD_START_S = 240  # a vLLM-CPU worker's start on a loaded 2-core box, with margin
POOLS = {
    "small": {"max_model_len": 512, "kv_tokens": 1024, "max_seqs": 4, "usd_per_gpu_hour": 0.5,
              "prefill_tps": 5000, "decode_tps": 50, "cold_start_s": COLD_START_S},
    "large": {"max_model_len": 2048, "kv_tokens": 4096, "max_seqs": 8, "usd_per_gpu_hour": 4.0,
              "prefill_tps": 5000, "decode_tps": 50, "cold_start_s": COLD_START_S},
}  # fmt: skip
# The tiny model's tokenizer counts ~6 tokens per repeat of this (30 bytes);
# the orchestrator's estimate (bytes / 4) says ~7.5: it never underestimates.
FILLER = "return the value of self and "
LONG = FILLER * 150  # ~900 tokens: more than small holds, within large
HUGE = FILLER * 400  # ~2,400 tokens (estimated ~3,000): no pool holds it
START_S = 300.0


def _worker(stack: LocalStack, pool: str) -> tuple[str, ServiceProcess]:
    wid = uid(f"w{pool}")
    return wid, stack.service("inference-worker", BATON_POOL=pool, BATON_WORKER_ID=wid,
                              **ENGINES[pool])  # fmt: skip


@pytest.fixture
def two_pools(
    own_nats: NatsServer, tmp_path: Path, tiny_model_dir: Path
) -> Iterator[tuple[LocalStack, dict[str, tuple[str, ServiceProcess]]]]:
    s = LocalStack(own_nats, tmp_path / "s", env={
        "BATON_ENGINE": "vllm", "BATON_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1"})  # fmt: skip
    try:
        s.start(workers=0, workflows={"ask.yaml": WORKFLOW, "soon.yaml": SOON}, pools=POOLS)
        workers = {pool: _worker(s, pool) for pool in ("small", "large")}
        for _, proc in workers.values():  # both engines load at once
            proc.wait_ready(START_S)
        yield s, workers
    finally:
        s.stop()


async def _heartbeats(client: Client, seconds: float) -> dict[str, dict[str, Any]]:
    """The last heartbeat of each worker over ``seconds``."""
    seen: dict[str, dict[str, Any]] = {}

    async def on(msg: Any) -> None:
        beat = msgpack.unpackb(msg.data)
        seen[beat["worker"]] = beat

    sub = await client.nc.subscribe("baton.workers.heartbeat.*.*", cb=on)
    await asyncio.sleep(seconds)
    await sub.unsubscribe()
    return seen


async def _run(
    client: Client, text: str, timeout: float = 60, workflow: str = "ask"
) -> tuple[str, list[dict[str, Any]]]:
    task_id = uid()
    body = {"tenant": "initech", "input": text, "task_id": task_id}
    await client.publish(workflow, body, msg_id=task_id)
    return task_id, await client.events("initech", task_id, timeout=timeout)


async def _first_beat(client: Client, worker: str, start: Any, timeout: float) -> dict[str, Any]:
    """The first heartbeat of ``worker``, which ``start()`` starts."""
    got: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def on(msg: Any) -> None:
        beat = msgpack.unpackb(msg.data)
        if beat["worker"] == worker and not got.done():
            got.set_result(beat)

    sub = await client.nc.subscribe("baton.workers.heartbeat.*.*", cb=on)
    try:
        start()
        return await asyncio.wait_for(got, timeout)
    finally:
        await sub.unsubscribe()


def _step(url: str, task_id: str) -> dict[str, Any]:
    steps: dict[str, Any] = http_json(f"{url}/v1/tasks/{task_id}?tenant=initech")["steps"]
    return dict(steps["r1.answer"])


def _statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["status"] for e in events if e["type"] == "step"]


def _done(proc: ServiceProcess, pool: str) -> float:
    return metric(proc.url, "baton_worker_jobs_total", pool=pool, outcome="completed")


@pytest.mark.timeout(2 * START_S, func_only=True)
async def test_two_vllm_pools_place_by_context_and_hold_a_step_for_a_pool_at_zero(
    two_pools: tuple[LocalStack, dict[str, tuple[str, ServiceProcess]]], own_client: Client
) -> None:
    stack, workers = two_pools
    url = stack.orchestrator.url
    (small_id, small), (large_id, large) = workers["small"], workers["large"]

    # Two engine configurations, as the engines measured them: different
    # context lengths and KV capacities.
    beats = await _heartbeats(own_client, 1.5)
    assert beats[small_id]["ready"] and beats[large_id]["ready"], beats
    assert beats[small_id]["max_model_len"] == 512
    assert beats[large_id]["max_model_len"] == 2048
    assert beats[large_id]["kv_tokens"] >= 4 * beats[small_id]["kv_tokens"] > 0
    assert metric(url, "baton_pool_catalogue_drift_total") == 0

    # A short step: the cheap pool, run by its worker.
    task, events = await _run(own_client, "hello")
    assert events[-1]["type"] == "completed", events[-1]
    started, done = (e for e in events if e["type"] == "step")
    assert (started["pool"], started["pool_reason"]) == ("small", "cheapest")
    assert done["pool"] == "small" and _step(url, task)["worker"] == small_id
    assert (_done(small, "small"), _done(large, "large")) == (1, 0)

    # A long step (~900 tokens): the small pool cannot hold it, so it goes
    # to the large one at dispatch (not moved there by a refusal).
    task, events = await _run(own_client, LONG)
    assert events[-1]["type"] == "completed", events[-1]
    assert _statuses(events) == ["started", "done"]
    started, done = (e for e in events if e["type"] == "step")
    assert started["pool"] == "large" and started["prediction"]["kv_tokens"] > 512
    step = _step(url, task)
    assert done["pool"] == "large" and step["worker"] == large_id and step["attempt"] == 1
    assert done["usage"]["prompt_tokens"] > 512  # the engine's own count
    assert (_done(small, "small"), _done(large, "large")) == (1, 1)
    assert metric(url, "baton_pool_decisions_total", reason="moved") == 0

    # A step no pool holds fails at once with its code; no worker sees it.
    t0 = time.monotonic()
    _, events = await _run(own_client, HUGE)
    took = time.monotonic() - t0
    assert events[-1]["type"] == "failed", events[-1]
    assert events[-1]["error"]["code"] == "prompt_too_long"
    assert "holds 2048" in events[-1]["error"]["message"]
    assert took < 10, took
    assert metric(url, "baton_pool_decisions_total", chosen="none", reason="too_long") == 1
    assert (_done(small, "small"), _done(large, "large")) == (1, 1)
    for proc, pool in ((small, "small"), (large, "large")):
        refused = metric(proc.url, "baton_worker_jobs_total", pool=pool, outcome="prompt_too_long")
        assert refused == 0

    # The small pool scaled to zero: its worker stops. A short step still
    # goes there (cheapest; no latency target) and waits for capacity ...
    stack.retire(small)
    await asyncio.sleep(1)  # its leaving heartbeat is in
    task = uid()
    await own_client.publish("ask", {"tenant": "initech", "input": "hello again",
                                     "task_id": task}, msg_id=task)  # fmt: skip
    events = await own_client.events("initech", task, timeout=3, until_terminal=False)
    assert _statuses(events) == ["started", "waiting_capacity"], events
    waiting = events[-1]
    assert waiting["pool"] == "small" and waiting["estimate_s"] == COLD_START_S
    assert metric(url, "baton_steps_waiting_capacity_total", pool="small") == 1
    # An agent with a 30 s target does not wait for the cold start: it
    # spills over to the dearer pool, which is warm, and is answered there.
    soon, events = await _run(own_client, "hello soon", workflow="soon")
    assert events[-1]["type"] == "completed", events[-1]
    started, done = (e for e in events if e["type"] == "step")
    assert (started["pool"], started["pool_reason"]) == ("large", "spill_cold")
    assert _step(url, soon)["worker"] == large_id
    assert metric(url, "baton_pool_decisions_total", chosen="large", reason="spill_cold") == 1
    assert _done(large, "large") == 2
    # ... until a new worker of the pool starts (a whole vLLM load), and runs
    # there: no retry, no failure, the large pool untouched.
    # Its engine boots off the worker's event loop: it heartbeats while loading.
    new_id = uid("wsmall")
    started: list[ServiceProcess] = []
    beat = await _first_beat(own_client, new_id, lambda: started.append(stack.service(
        "inference-worker", BATON_POOL="small", BATON_WORKER_ID=new_id, **ENGINES["small"])),
        timeout=60)  # fmt: skip
    assert beat["ready"] is False, beat
    new = started[0]
    events = await own_client.events("initech", task, timeout=START_S)
    assert events[-1]["type"] == "completed", events[-1]
    assert _statuses(events) == ["started", "waiting_capacity", "done"]
    step = _step(url, task)
    assert step["worker"] == new_id and step["attempt"] == 1 and step["pool"] == "small"
    assert events[-2]["phases"]["queue"] > 2  # it waited for the engine to load
    assert (_done(new, "small"), _done(large, "large")) == (1, 2)
    assert metric(url, "baton_tasks_total", workflow="ask", outcome="completed") == 3
    assert metric(url, "baton_tasks_total", workflow="ask", outcome="failed") == 1
