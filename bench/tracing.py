"""What tracing costs (issue #19): task throughput with OpenTelemetry off
(the default: no exporter configured, no SDK) against on (every service
exporting every span over OTLP/HTTP to a local receiver), and off against
the code before OpenTelemetry (the hand-built ``traceparent`` on every
message), when ``BATON_BENCH_BEFORE=<git ref>`` names that code.

Two workloads of ``research`` tasks, each on stacks (a private nats-server,
context store, orchestrator, one simulator worker) of its own per side, the
sides of a workload up at once:

* ``engine`` — the simulator at its default pace (400 tokens/s per sequence,
  continuous batching: faster than most GPUs serve one sequence) with 8
  tasks in flight: the engine is the bottleneck and the CPU services have
  headroom, as a deployment scaled on its queues runs them. The goal is set
  here.
* ``baton`` — the simulator with zero latency, so Baton's own message
  handling is all the work there is: the worst case for tracing's share,
  reported as measured.

Each round runs a burst of tasks on every side in turn, the order rotating
round by round; throughput is tasks per wall second of the burst, CPU the
services' utime + stime over it. Reported: the median of the rounds'
ratios. Bounded: ``ROUNDS`` rounds, each burst at most ``BURST_TIMEOUT`` s.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from baton.dev.testing import LocalStack, connect_nats, secure_nats
from baton.dev.trace_receiver import TraceReceiver
from bench.orchestrator import ENV, Runner, _text
from bench.stats import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 6
WARMUP = 8
BURST_TIMEOUT = 90.0
GOAL = 0.97  # throughput on / off, engine workload
SIM_DEFAULTS = {"BATON_SIM_DECODE_TPS": "400", "BATON_SIM_PREFILL_TPS": "20000"}
# name -> (environment over bench.orchestrator.ENV, tasks per burst, tasks in flight)
WORKLOADS: dict[str, tuple[dict[str, str], int, int]] = {
    "engine": (SIM_DEFAULTS, 32, 8),
    "baton": ({}, 96, 16),
}


class Side:
    """One stack and a client of it."""

    def __init__(self, name: str, work: Path, env: dict[str, str], in_flight: int) -> None:
        self.name = name
        self.in_flight = in_flight
        self.server = secure_nats(work / name / "nats").start()
        self.stack = LocalStack(self.server, work / name / "stack", env={**ENV, **env})
        self.runner: Runner | None = None
        self.offset = 0

    async def start(self) -> None:
        await asyncio.to_thread(self.stack.start, 1)
        nc = await connect_nats(self.server.url, name=f"bench-tracing-{self.name}")
        self.runner = Runner(nc, self.stack.orchestrator.url, "acme")
        await self.runner.start()

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.stack.procs if p.proc is not None]

    async def burst(self, n: int) -> dict[str, float]:
        runner = self.runner
        assert runner is not None
        slots = asyncio.Semaphore(self.in_flight)
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


async def _workload(
    name: str, work: Path, receiver: TraceReceiver, before: Path | None
) -> dict[str, Any]:
    env, tasks, in_flight = WORKLOADS[name]
    # Tracing settings are the services' own: none of the bench's may leak in.
    off = {**env, **{k: "" for k in os.environ if k.startswith("OTEL_")}}
    on = {**off, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}  # fmt: skip
    sides = [Side("off", work / name, off, in_flight), Side("on", work / name, on, in_flight)]
    if before is not None:
        sides.append(Side("before", work / name, {**off, "PYTHONPATH": str(before)}, in_flight))
    spans0 = receiver.count
    try:
        for side in sides:
            await side.start()
            await side.burst(WARMUP)
        rounds: list[dict[str, dict[str, float]]] = []
        for i in range(ROUNDS):
            order = sides[i % len(sides) :] + sides[: i % len(sides)]
            rounds.append({s.name: await s.burst(tasks) for s in order})
    finally:
        for side in sides:
            await side.stop()  # the services export what they still hold

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [round(r[a][key] / r[b][key], 3) for r in rounds]

    on_off = ratios("on", "off", "tasks_per_s")
    out: dict[str, Any] = {
        "tasks_per_burst": tasks,
        "in_flight": in_flight,
        "rounds": rounds,
        "on_vs_off_rounds": on_off,
        "on_vs_off": statistics.median(on_off),
        "cpu_on_vs_off": statistics.median(ratios("on", "off", "cpu_ms_per_task")),
        "spans_per_task": round((receiver.count - spans0) / (WARMUP + tasks * ROUNDS), 1),
    }
    # The services' extra CPU with tracing on, per span exported.
    extra = statistics.median(r["on"]["cpu_ms_per_task"] - r["off"]["cpu_ms_per_task"]
                              for r in rounds)  # fmt: skip
    out["cpu_ms_per_span"] = round(extra / max(1.0, out["spans_per_task"]), 3)
    if before is not None:
        off_before = ratios("off", "before", "tasks_per_s")
        out["off_vs_before_rounds"] = off_before
        out["off_vs_before"] = statistics.median(off_before)
        out["cpu_off_vs_before"] = statistics.median(ratios("off", "before", "cpu_ms_per_task"))
    return out


async def _main(work: Path) -> dict[str, Any]:
    ref = os.environ.get("BATON_BENCH_BEFORE", "")
    before = _tree_of(ref, work / "before-tree") if ref else None
    with TraceReceiver(keep=False) as receiver:
        results = {name: await _workload(name, work, receiver, before) for name in WORKLOADS}
    return {
        **results,
        "goal": f"engine workload: on / off >= {GOAL}",
        "goal_met": results["engine"]["on_vs_off"] >= GOAL,
        "before": ref or None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def _table(w: dict[str, Any], names: list[str]) -> str:
    head = " | ".join(f"{n} tasks/s | {n} CPU ms/task" for n in names)
    sep = " | ".join("---" for _ in names for _ in range(2))

    def row(i: int, x: dict[str, dict[str, float]]) -> str:
        cells = [f"{x[n]['tasks_per_s']} | {x[n]['cpu_ms_per_task']}" for n in names]
        return (
            f"| {i + 1} | {' | '.join(cells)} | {w['on_vs_off_rounds'][i]} | "
            f"{x['off']['loadavg_1m']} |"
        )

    rows = "\n".join(row(i, x) for i, x in enumerate(w["rounds"]))
    return f"| round | {head} | on / off | load 1m |\n| --- | {sep} | --- | --- |\n{rows}"


def markdown(r: dict[str, Any]) -> str:
    names = ["off", "on"] + (["before"] if r.get("before") else [])
    e, b = r["engine"], r["baton"]
    met = "met" if r["goal_met"] else "**missed**"
    before = ""
    if r.get("before"):
        before = (
            f"\n\nOff against the code before OpenTelemetry (`{r['before']}`, its hand-built"
            f" `traceparent` on every message), throughput ratio: **{e['off_vs_before']:.3f}**"
            f" (engine), **{b['off_vs_before']:.3f}** (zero latency); CPU per task ratio"
            f" {e['cpu_off_vs_before']:.2f} / {b['cpu_off_vs_before']:.2f}."
        )
    return f"""## Tracing on and off (`python -m bench tracing`)

`research` tasks; off is the default (no exporter, no SDK), on exports every
span over OTLP/HTTP to a local receiver ({e["spans_per_task"]} spans per task).
Rounds rotate the order of the sides.

- **Engine workload** (simulator at its default pace, 400 tokens/s per
  sequence; {e["tasks_per_burst"]} tasks per burst, {e["in_flight"]} in flight):
  throughput on / off, median of rounds **{e["on_vs_off"]:.3f}** (goal ≥ {GOAL}:
  {met}); CPU per task on / off {e["cpu_on_vs_off"]:.2f}.
- **Zero-latency simulator** (Baton's own message handling is all the work:
  the worst case; {b["tasks_per_burst"]} tasks per burst, {b["in_flight"]} in
  flight): throughput on / off **{b["on_vs_off"]:.3f}**; CPU per task on / off
  {b["cpu_on_vs_off"]:.2f}: the SDK spends {b["cpu_ms_per_span"]} ms of the services'
  CPU per span exported (creation, attributes, OTLP encoding in the
  exporter's thread). Where CPU is the bottleneck, sample
  (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, docs/tracing.md).{before}

Engine workload:

{_table(e, names)}

Zero-latency simulator:

{_table(b, names)}
"""
