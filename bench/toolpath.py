"""A tool call's round trip in NATS messages (issue #23): the caller
publishes a ``ToolJob`` (``search``, first delivery: no stored-result
look-up) and waits for its ``ToolResult``; nats-server's ``/connz`` counts
what each connection sent and received over the round, per call. A private
nats-server, a context store and a tool worker per stack.

``BATON_BENCH_VERSUS=<checkout>`` measures a second stack beside this one,
the services of another checkout (e.g. ``/work/main``), each stack on its
own nats-server, rounds interleaved (this, that, this, that...). Each
service process gets its checkout on ``PYTHONPATH`` and runs in the
scratch directory, so neither checkout shadows the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.bus import Bus, connect
from baton.natsd import NatsServer, free_port
from baton.stack import ServiceProcess
from bench.tools import TENANT, Caller, _session

ROOT = Path(__file__).resolve().parents[1]
VERSUS = "BATON_BENCH_VERSUS"
WARMUP, ROUNDS, CALLS = 10, 3, 100  # calls, rounds per stack, sequential calls a round
CONNECTIONS = ("context-store", "tool-worker", "bench")


def _messages(monitor: int) -> dict[str, tuple[int, int]]:
    url = f"http://127.0.0.1:{monitor}/connz?limit=1024"
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.loads(r.read())
    out: dict[str, tuple[int, int]] = {}
    for c in doc["connections"]:
        name = c.get("name") or ""
        key = next((k for k in CONNECTIONS if name.startswith(k)), None)
        if key is not None:
            i, o = out.get(key, (0, 0))
            out[key] = (i + c["in_msgs"], o + c["out_msgs"])
    return out


@dataclass
class Side:
    label: str
    root: Path
    server: NatsServer | None = None
    procs: list[ServiceProcess] = field(default_factory=list)
    bus: Bus | None = None
    caller: Caller | None = None
    session: tuple[str, Any] = ("", None)
    monitor: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    n: int = 0

    async def start(self, work: Path) -> None:
        self.monitor = free_port()
        self.server = NatsServer(work / self.label / "nats", monitor_port=self.monitor).start()
        env = {"BATON_NATS_URL": self.server.url, "BATON_DATA_DIR": str(work / self.label),
               "BATON_CONTEXT_KEY": "bench-only-key-0123456789abcdef",
               "BATON_LOG_LEVEL": "WARNING", "BATON_ALLOW_NO_API_KEYS": "true",
               "PYTHONPATH": str(self.root)}  # fmt: skip
        logs = work / self.label
        self.procs = [
            ServiceProcess("context-store", env, log_path=logs / "context-store.log").start(),
            ServiceProcess("tool-worker", {**env, "BATON_POOL": "default", "BATON_WORKER_ID":
                                           "tw0", "BATON_BUILTIN_TOOLS": '["search"]'},
                           log_path=logs / "tool-worker.log").start(),
        ]  # fmt: skip
        for p in self.procs:
            await asyncio.to_thread(p.wait_ready, 60.0)
        self.bus = await connect(self.server.url, name="bench")
        self.caller = Caller(self.bus, f"t{self.label}")
        await self.caller.start()
        session = f"s{self.label}"
        self.session = (session, await _session(self.bus, session))
        for _ in range(WARMUP):
            await self.call()

    async def call(self) -> float:
        assert self.caller is not None
        self.n += 1
        session, ref = self.session
        t0 = time.perf_counter()
        res = await self.caller.call("default", session, ref, "search", {"query": "raft"},
                                     f"c{self.n}")  # fmt: skip
        assert res.error is None and res.ref is not None, res
        return time.perf_counter() - t0

    async def round(self) -> None:
        assert self.bus is not None
        await self.bus.flush()
        await asyncio.sleep(0.3)  # the last round's acks settled
        before = await asyncio.to_thread(_messages, self.monitor)
        walls = [await self.call() for _ in range(CALLS)]
        await asyncio.sleep(0.3)
        after = await asyncio.to_thread(_messages, self.monitor)
        per = {k: ((after[k][0] - before[k][0]) / CALLS, (after[k][1] - before[k][1]) / CALLS)
               for k in CONNECTIONS if k in after and k in before}  # fmt: skip
        self.rounds.append({"p50_ms": round(statistics.median(walls) * 1000, 3), "per_call": per})

    async def stop(self) -> None:
        if self.bus is not None:
            await self.bus.close()
        for p in self.procs:
            p.terminate(10)
        if self.server is not None:
            self.server.stop()

    def result(self) -> dict[str, Any]:
        def med(f: Any) -> float:
            return round(statistics.median(f(r) for r in self.rounds), 3)

        out: dict[str, Any] = {"checkout": str(self.root), "rounds": self.rounds}
        out["p50_ms"] = med(lambda r: r["p50_ms"])
        for k in CONNECTIONS:
            out[f"{k}_in"] = med(lambda r, k=k: r["per_call"][k][0])
            out[f"{k}_out"] = med(lambda r, k=k: r["per_call"][k][1])
        # As the step benches count: what each connection sent (``in_msgs``)
        # and was delivered (``out_msgs``), summed over the three connections.
        out["messages_per_call"] = med(
            lambda r: sum(r["per_call"][k][0] + r["per_call"][k][1] for k in CONNECTIONS)
        )
        return out


async def _main(work: Path, versus: Path | None) -> dict[str, Any]:
    os.chdir(work)  # ``python -m`` puts the working directory first on sys.path
    sides = [Side("this", ROOT)]
    if versus is not None:
        sides.append(Side("that", versus))
    try:
        for s in sides:
            await s.start(work)
        for _ in range(ROUNDS):
            for s in sides:
                await s.round()
    finally:
        for s in sides:
            await s.stop()
    out: dict[str, Any] = {"calls_per_round": CALLS, "tenant": TENANT}
    out |= {s.label: s.result() for s in sides}
    out["machine"] = f"{os.cpu_count()} shared cores, no GPU"
    return out


def run(work: Path) -> dict[str, Any]:
    versus = os.environ.get(VERSUS)
    return asyncio.run(_main(work, Path(versus).resolve() if versus else None))


def markdown(r: dict[str, Any]) -> str:
    this, that = r["this"], r.get("that")
    head = [
        "## Tool round trip (messages)",
        "",
        "A private nats-server, a context store and a tool worker per stack",
        f"(`python -m bench toolpath`): {r['calls_per_round']} sequential `search` calls a",
        "round (first deliveries), NATS messages per call from nats-server's `/connz`",
        "(what each connection sent and was delivered, in + out), median of",
        f"{len(this['rounds'])} rounds per stack"
        + (", the two stacks' rounds interleaved." if that else "."),
        "",
    ]
    rows = [
        "| stack | messages per call (in + out) | context store in / out | "
        "tool worker in / out | caller in / out | p50 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label in ("this", "that"):
        s = r.get(label)
        if s is None:
            continue
        rows.append(
            f"| {label} (`{s['checkout']}`) | {s['messages_per_call']} | "
            f"{s['context-store_in']} / {s['context-store_out']} | "
            f"{s['tool-worker_in']} / {s['tool-worker_out']} | "
            f"{s['bench_in']} / {s['bench_out']} | {s['p50_ms']} |"
        )
    return "\n".join(head + rows)
