"""What security costs per step (``python -m bench security``): CPU of the
whole stack (nats-server, orchestrator, context store, worker; from
/proc) per chat step with JetStream's encryption at rest on and off, and
with each tenant's own copy of its events and token deltas on and off.

Two stacks side by side on the same box, each with Baton's accounts: one
nats-server encrypting its store (``cipher: chachapoly``, as ``baton up``
and deploy/ run it), one not. The tenant copies are streams in the tenant's
own account (``streams.TENANT_EVENTS`` / ``TENANT_TOKENS``, created by the
orchestrator); "off" points them at a subject nothing publishes (a stream
update, the orchestrator's own right), "on" restores them, so no production
switch exists for the benchmark. Four configurations, their order rotated
round by round; each a burst of chat tasks (one model step each,
zero-latency simulator, token streaming on) at a fixed number in flight.
Reported: CPU per step by process and ratios, each from one round's
interleaved sides, median over rounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack

from baton.accounts import tenant_api_prefix
from baton.bus import connect
from baton.dev.testing import LocalStack, connect_nats, secure_nats
from baton.natsd import NatsServer
from bench.stats import cpu_seconds, median
from proto import streams
from proto.streams import StreamSpec

ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "6"))
TASKS = int(os.environ.get("BATON_BENCH_TASKS", "400"))  # per configuration per round
IN_FLIGHT = 16
TENANT = "acme"
ENV = {
    "BATON_TENANTS": TENANT,
    "BATON_LOG_LEVEL": "WARNING",
    "BATON_SIM_DECODE_TPS": "0",  # zero latency: Baton's own work is all the work
    "BATON_SIM_PREFILL_TPS": "inf",
}
COPIES = (streams.TENANT_EVENTS, streams.TENANT_TOKENS)
CONFIGS = (("encrypted", True), ("encrypted", False), ("plain", True), ("plain", False))


def _off(spec: StreamSpec) -> StreamSpec:
    """The same stream listening on a subject nothing publishes."""
    return dataclasses.replace(spec, subjects=(f"bench.off.{spec.name}",))


class _Side:
    """One stack: its nats-server, services and a client of its tenant."""

    def __init__(self, name: str, server: NatsServer, work: Path) -> None:
        self.name = name
        self.server = server
        self.stack = LocalStack(server, work / name, env=dict(ENV))
        self.pending: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        self.stack.start()
        self.nc = await connect_nats(self.stack.nats_url)
        self.js = self.nc.jetstream()
        await self.nc.subscribe(f"baton.events.{TENANT}.>", cb=self._on_event)
        self.bus = await connect(self.stack.nats_url, name="bench-security")
        self.account = self.bus.account(tenant_api_prefix(TENANT))

    async def _on_event(self, msg: Any) -> None:
        ev = msgpack.unpackb(msg.data)
        if ev.get("type") in ("completed", "failed"):
            fut = self.pending.pop(ev.get("task_id", ""), None)
            if fut is None or fut.done():
                return
            if ev["type"] == "completed":
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(f"task failed: {ev}"))

    async def copies(self, on: bool) -> None:
        for spec in COPIES:
            await self.account.ensure_stream(spec if on else _off(spec))

    def pids(self) -> dict[str, int]:
        out = {p.name: p.proc.pid for p in self.stack.procs if p.proc is not None}
        assert self.server.proc is not None
        out["nats-server"] = self.server.proc.pid
        return out

    async def burst(self, n: int) -> float:
        """``n`` chat tasks, ``IN_FLIGHT`` at a time; seconds."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            async with sem:
                task_id = uuid.uuid4().hex
                done = self.pending[task_id] = loop.create_future()
                body = {"tenant": TENANT, "input": f"question {i}", "task_id": task_id}
                await self.js.publish(f"baton.tasks.{TENANT}.chat", msgpack.packb(body),
                                      headers={"Nats-Msg-Id": task_id})  # fmt: skip
                await asyncio.wait_for(done, 60)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0

    async def stop(self) -> None:
        await self.bus.close()
        await self.nc.close()
        self.stack.stop()
        self.server.stop()


async def _measure(side: _Side, copies: bool) -> dict[str, Any]:
    await side.copies(copies)
    pids = side.pids()
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    wall = await side.burst(TASKS)
    cpu = {k: (cpu_seconds(p) - cpu0[k]) * 1e3 / TASKS for k, p in pids.items()}
    return {"ms_per_step": round(sum(cpu.values()), 3),
            "by_process": {k: round(v, 3) for k, v in sorted(cpu.items())},
            "steps_per_s": round(TASKS / wall, 1)}  # fmt: skip


async def _main(work: Path) -> dict[str, Any]:
    sides = {
        "encrypted": _Side("encrypted", secure_nats(work / "enc-nats", (TENANT,)), work),
        "plain": _Side("plain", secure_nats(work / "plain-nats", (TENANT,), encrypt=False), work),
    }
    rounds: list[dict[str, Any]] = []
    try:
        for s in sides.values():
            s.server.start()
            await s.start()
        for s in sides.values():  # warm: connections, consumers, caches
            for copies in (True, False):
                await _measure(s, copies)
        for r in range(ROUNDS):
            order = CONFIGS[r % 4 :] + CONFIGS[: r % 4]
            got: dict[str, Any] = {}
            for name, copies in order:
                got[f"{name}/{'copies' if copies else 'no copies'}"] = await _measure(
                    sides[name], copies
                )
            got["load_1m"] = round(os.getloadavg()[0], 2)
            rounds.append(got)
            print(f"security round {r + 1}: " + ", ".join(
                f"{k} {v['ms_per_step']} ms" for k, v in got.items() if isinstance(v, dict)
            ), flush=True)  # fmt: skip
    finally:
        for s in sides.values():
            await s.copies(True)
            await s.stop()

    def ratio(a: str, b: str) -> list[float]:
        return [round(x[a]["ms_per_step"] / x[b]["ms_per_step"], 3) for x in rounds]

    enc = ratio("encrypted/copies", "plain/copies")
    enc_nc = ratio("encrypted/no copies", "plain/no copies")
    cop = ratio("encrypted/copies", "encrypted/no copies")
    cop_plain = ratio("plain/copies", "plain/no copies")
    both = ratio("encrypted/copies", "plain/no copies")
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], dict)]
    procs = sorted(rounds[0][keys[0]]["by_process"])
    return {
        "machine": f"{os.cpu_count()} cores; zero-latency simulator; chat tasks, one step each",
        "rounds": rounds,
        "tasks_per_config_per_round": TASKS,
        "in_flight": IN_FLIGHT,
        "median_ms_per_step": {
            k: round(median([x[k]["ms_per_step"] for x in rounds]), 3) for k in keys
        },
        "median_by_process": {
            k: {p: round(median([x[k]["by_process"][p] for x in rounds]), 3) for p in procs}
            for k in keys
        },
        "encryption_ratio": {
            "with_copies": round(median(enc), 3),
            "without_copies": round(median(enc_nc), 3),
            "per_round": enc,
        },
        "copies_ratio": {
            "encrypted": round(median(cop), 3),
            "plain": round(median(cop_plain), 3),
            "per_round": cop,
        },
        "both_ratio": round(median(both), 3),
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    med, byp = r["median_ms_per_step"], r["median_by_process"]
    procs = sorted(next(iter(byp.values())))
    rows = "\n".join(
        f"| {k} | {med[k]} | " + " | ".join(str(byp[k][p]) for p in procs) + " |" for k in med
    )
    e, c = r["encryption_ratio"], r["copies_ratio"]
    enc, cop = ", ".join(map(str, e["per_round"])), ", ".join(map(str, c["per_round"]))
    return f"""## What security costs (`python -m bench security`)

{r["machine"]}; two stacks with Baton's accounts side by side, one
nats-server encrypting JetStream at rest (chachapoly), one not; the tenant's
own copies of its events and token deltas on or off (off: the copy streams
re-pointed at a subject nothing publishes). {r["tasks_per_config_per_round"]} tasks
per configuration per round, {r["in_flight"]} in flight, {len(r["rounds"])} rounds with
the four configurations' order rotated. CPU per step is utime + stime of the
stack's processes (nats-server included) over each burst; ratios are taken
within a round, median over rounds.

| configuration | CPU ms per step | {" | ".join(procs)} |
| --- | ---: | {" | ".join("---:" for _ in procs)} |
{rows}

| cost | ratio (median) | per round |
| --- | ---: | --- |
| encryption at rest, with the copies (encrypted / plain) | {e["with_copies"]} | {enc} |
| encryption at rest, without the copies | {e["without_copies"]} | |
| tenant copies, encrypted store (copies / none) | {c["encrypted"]} | {cop} |
| tenant copies, plain store | {c["plain"]} | |
| both (encrypted + copies / plain without) | {r["both_ratio"]} | |

Per-message erasure has no switch to measure it by (it is on every handled
message); it is not in this table.
"""
