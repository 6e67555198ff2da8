"""What tracing costs (issue #19): task throughput with OpenTelemetry off
(the default: no exporter configured, no SDK) against on (every service
exporting every span over OTLP/HTTP to a local receiver), and off against
the code before OpenTelemetry (the hand-built ``traceparent`` on every
message), when ``BATON_BENCH_BEFORE=<git ref>`` names that code.

Each side is its own stack (a private nats-server, context store,
orchestrator and one simulator worker with zero latency, so Baton's own
message handling is all the work there is: the worst case for tracing's
share), all up at once. Each round runs a burst of ``research`` tasks
(``TASKS`` of them, ``IN_FLIGHT`` at a time) on every side in turn, the
order rotating round by round; throughput is tasks per wall second of the
burst, CPU is the services' utime + stime over it. Reported: the median of
the rounds' ratios. Bounded: ``ROUNDS`` rounds, each burst at most
``BURST_TIMEOUT`` s.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import nats

from baton.testing import LocalStack, secure_nats
from baton.trace_receiver import TraceReceiver
from bench.orchestrator import ENV, Runner, _text
from bench.stats import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 6
TASKS = 96  # research tasks per burst
IN_FLIGHT = 16
WARMUP = 8
BURST_TIMEOUT = 90.0
GOAL = 0.97  # throughput on / off


class Side:
    """One stack and a client of it."""

    def __init__(self, name: str, work: Path, env: dict[str, str]) -> None:
        self.name = name
        self.server = secure_nats(work / name / "nats").start()
        self.stack = LocalStack(self.server, work / name / "stack", env={**ENV, **env})
        self.runner: Runner | None = None
        self.offset = 0

    async def start(self) -> None:
        await asyncio.to_thread(self.stack.start, 1)
        nc = await nats.connect(self.server.url, name=f"bench-tracing-{self.name}")
        self.runner = Runner(nc, self.stack.orchestrator.url, "acme")
        await self.runner.start()

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.stack.procs if p.proc is not None]

    async def burst(self, n: int) -> dict[str, float]:
        runner = self.runner
        assert runner is not None
        slots = asyncio.Semaphore(IN_FLIGHT)
        deadline = time.monotonic() + BURST_TIMEOUT

        async def one(i: int) -> str:
            async with slots:
                task_id = await runner.submit(_text(self.offset + i))
                end = await runner.wait(task_id, max(1.0, deadline - time.monotonic()))
                return str(end["type"])

        cpu0 = sum(cpu_seconds(p) for p in self.pids())
        t0 = time.perf_counter()
        ends = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p) for p in self.pids()) - cpu0
        self.offset += n
        if any(e != "completed" for e in ends):
            raise RuntimeError(f"{self.name}: {ends.count('completed')} of {n} completed")
        return {"tasks_per_s": round(n / wall, 2), "cpu_ms_per_task": round(cpu / n * 1e3, 2),
                "loadavg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.nc.close()
        await asyncio.to_thread(self.stack.stop)
        self.server.stop()


def _tree_of(ref: str, dest: Path) -> Path:
    """The source tree of git ``ref``, exported to ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


async def _main(work: Path) -> dict[str, Any]:
    before = os.environ.get("BATON_BENCH_BEFORE", "")
    with TraceReceiver(keep=False) as receiver:
        # Tracing settings are the services' own: none of the bench's may leak in.
        off_env = {k: "" for k in os.environ if k.startswith("OTEL_")}
        on_env = {**off_env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                  "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}  # fmt: skip
        sides = [Side("off", work, off_env), Side("on", work, on_env)]
        if before:
            tree = _tree_of(before, work / "before-tree")
            sides.append(Side("before", work, {**off_env, "PYTHONPATH": str(tree)}))
        try:
            for side in sides:
                await side.start()
                await side.burst(WARMUP)
            rounds: list[dict[str, dict[str, float]]] = []
            for i in range(ROUNDS):
                order = sides[i % len(sides) :] + sides[: i % len(sides)]
                rounds.append({s.name: await s.burst(TASKS) for s in order})
        finally:
            for side in sides:
                await side.stop()  # the services export what they still hold
        spans = receiver.count

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [round(r[a][key] / r[b][key], 3) for r in rounds]

    on_off = ratios("on", "off", "tasks_per_s")
    out: dict[str, Any] = {
        "tasks_per_burst": TASKS,
        "in_flight": IN_FLIGHT,
        "rounds": rounds,
        "on_vs_off_rounds": on_off,
        "on_vs_off": statistics.median(on_off),
        "cpu_on_vs_off": statistics.median(ratios("on", "off", "cpu_ms_per_task")),
        "spans_per_task": round(spans / (WARMUP + TASKS * ROUNDS), 1),
        "goal": f"on / off >= {GOAL}",
        "goal_met": statistics.median(on_off) >= GOAL,
        "before": before or None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if before:
        off_before = ratios("off", "before", "tasks_per_s")
        out["off_vs_before_rounds"] = off_before
        out["off_vs_before"] = statistics.median(off_before)
        out["cpu_off_vs_before"] = statistics.median(ratios("off", "before", "cpu_ms_per_task"))
    return out


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    names = ["off", "on"] + (["before"] if r.get("before") else [])
    head = " | ".join(f"{n} tasks/s | {n} CPU ms/task" for n in names)

    def row(i: int, x: dict[str, dict[str, float]]) -> str:
        cells = [f"{x[n]['tasks_per_s']} | {x[n]['cpu_ms_per_task']}" for n in names]
        return (
            f"| {i + 1} | {' | '.join(cells)} | {r['on_vs_off_rounds'][i]} | "
            f"{x['off']['loadavg_1m']} |"
        )

    rows = "\n".join(row(i, x) for i, x in enumerate(r["rounds"]))
    met = "met" if r["goal_met"] else "**missed**"
    before = ""
    if r.get("before"):
        before = (
            f"\n\nOff against the code before OpenTelemetry (`{r['before']}`, its hand-built"
            f" `traceparent` stamped on every message): throughput ratio"
            f" **{r['off_vs_before']}** (rounds: {', '.join(map(str, r['off_vs_before_rounds']))}),"
            f" CPU per task ratio {r['cpu_off_vs_before']}."
        )
    sep = " | ".join("---" for _ in names for _ in range(2))
    return f"""## Tracing on and off (`python -m bench tracing`)

`research` tasks ({r["tasks_per_burst"]} per burst, {r["in_flight"]} in flight) on
stacks with the zero-latency simulator, so Baton's own message handling is
all the work: off is the default (no exporter, no SDK), on exports every
span over OTLP/HTTP to a local receiver ({r["spans_per_task"]} spans per task).
Rounds rotate the order of the sides. Throughput on / off, median of rounds:
**{r["on_vs_off"]}** (goal ≥ 0.97: {met}); CPU per task on / off
{r["cpu_on_vs_off"]}.{before}

| round | {head} | on / off | load 1m |
| --- | {sep} | --- | --- |
{rows}
"""
