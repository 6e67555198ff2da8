"""The LangGraph peer of the orchestrator benchmark: Baton's ``research``
graph (supervisor -> retrieval || coding -> validation -> back to the
supervisor or on to the summary, at most 3 rounds) as a LangGraph
``StateGraph`` with a fake zero-latency LLM, ``runs`` runs kept
``concurrency`` in flight with ``ainvoke``.

Modes: ``sqlite`` checkpoints every superstep with ``AsyncSqliteSaver`` (a
file on local disk: durable, in-process; LangGraph's default durability,
``async``); ``memory`` has no checkpointer.

Run as its own process (``python -m bench.peer_langgraph MODE RUNS
CONCURRENCY DIR``) so its CPU time, read from ``/proc/self/stat`` around the
measured window, is LangGraph's alone. Prints one JSON line. Optional
dependency: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import operator
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from bench.stats import cpu_seconds

ROUNDS = 3  # research.yaml
# The simulator's answer is max_tokens words; the same sizes here.
MAX_TOKENS = {"supervisor": 96, "retrieval": 96, "coding": 128, "validation": 0}
_WORDS = ("cache", "queue", "design", "share", "work", "token", "batch", "route")


def revise(thread: str, round_: int) -> bool:
    """The validator's verdict: a hash of the run and round, half revise
    (the simulator picks the enum value by the prompt's hash the same way)."""
    return hashlib.sha256(f"{thread}:{round_}".encode()).digest()[0] % 2 == 1


class State(TypedDict):
    question: str
    thread: str
    round: int
    messages: Annotated[list[dict[str, str]], operator.add]
    verdict: str
    steps: Annotated[int, operator.add]


async def llm(agent: str, messages: list[dict[str, str]]) -> str:
    """Zero latency: one await, as an async client's call would yield."""
    await asyncio.sleep(0)
    n = MAX_TOKENS[agent]
    head = f"[fake: {len(messages)} messages]"
    return " ".join([head, *(_WORDS[i % len(_WORDS)] for i in range(n))])


def build(checkpointer: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    async def supervisor(s: State) -> dict[str, Any]:
        text = await llm("supervisor", s["messages"])
        return {"messages": [{"role": "supervisor", "content": text}],
                "round": s["round"] + 1, "steps": 1}  # fmt: skip

    async def retrieval(s: State) -> dict[str, Any]:
        text = await llm("retrieval", s["messages"])
        return {"messages": [{"role": "retrieval", "content": text}], "steps": 1}

    async def coding(s: State) -> dict[str, Any]:
        text = await llm("coding", s["messages"])
        return {"messages": [{"role": "coding", "content": text}], "steps": 1}

    async def validation(s: State) -> dict[str, Any]:
        await llm("validation", s["messages"])
        verdict = "revise" if revise(s["thread"], s["round"]) else "accept"
        content = json.dumps({"next": verdict})
        return {"messages": [{"role": "validation", "content": content}],
                "verdict": verdict, "steps": 1}  # fmt: skip

    async def summarize(s: State) -> dict[str, Any]:
        text = await llm("supervisor", s["messages"])
        return {"messages": [{"role": "supervisor", "content": text}], "steps": 1}

    def route(s: State) -> str:
        return "plan" if s["verdict"] == "revise" and s["round"] < ROUNDS else "summarize"

    g: Any = StateGraph(State)
    g.add_node("plan", supervisor)
    g.add_node("retrieval", retrieval)
    g.add_node("coding", coding)
    g.add_node("validate", validation)
    g.add_node("summarize", summarize)
    g.add_edge(START, "plan")
    g.add_edge("plan", "retrieval")
    g.add_edge("plan", "coding")
    g.add_edge(["retrieval", "coding"], "validate")
    g.add_conditional_edges("validate", route, ["plan", "summarize"])
    g.add_edge("summarize", END)
    return g.compile(checkpointer=checkpointer)


async def _burst(graph: Any, runs: int, concurrency: int, offset: int) -> tuple[int, int]:
    slots = asyncio.Semaphore(concurrency)
    steps = 0

    async def one(i: int) -> None:
        nonlocal steps
        thread = f"run-{offset + i}"
        question = f"Question {i}: how should the cache and the queue share work in design {i}?"
        async with slots:
            out = await graph.ainvoke(
                {"question": question, "thread": thread, "round": 0, "steps": 0,
                 "messages": [{"role": "user", "content": question}], "verdict": ""},
                {"configurable": {"thread_id": thread}, "recursion_limit": 100},
            )  # fmt: skip
        steps += out["steps"]

    await asyncio.gather(*(one(i) for i in range(runs)))
    return runs, steps


async def measure(mode: str, runs: int, concurrency: int, work: Path) -> dict[str, Any]:
    """One round: a short warm-up, then ``runs`` runs measured."""
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        saver = None
        if mode == "sqlite":
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            db = work / f"langgraph-{os.getpid()}.sqlite"
            saver = await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(str(db)))
        elif mode != "memory":
            raise SystemExit(f"unknown mode {mode!r}")
        graph = build(saver)
        await _burst(graph, min(8, runs), concurrency, 1_000_000)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        done, steps = await _burst(graph, runs, concurrency, 0)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {
        "mode": mode,
        "runs": done,
        "in_flight": concurrency,
        "steps": steps,
        "wall_s": round(wall, 3),
        "steps_per_s": round(steps / wall, 1),
        "cpu_ms_per_step": round(cpu / steps * 1e3, 3),
    }


def main(argv: list[str]) -> int:
    mode, runs, concurrency, work = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    print(json.dumps(asyncio.run(measure(mode, runs, concurrency, work))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
