"""Fair sharing between tenants (issue #13): one tenant floods, another's
single tasks must not wait behind the flood.

One run on a private nats-server with the three services as processes; the
inference worker is the **simulator** engine at its default decode rate
(400 tokens/s per sequence, 64 sequences at once), so a chat answer of 128
tokens takes ~0.3 s and the job queue matters. Rounds interleave two
orchestrator configurations on the same stack (the orchestrator restarted
between them):

* ``fair`` — the default fair dispatch (token shares since issue #21;
  measured by work in ``fairwork.py``);
* ``share-64`` — a count share equal to the worker's 64 sequences;
* ``fifo`` — a share larger than the flood: every task is taken at once and
  its job queued in the shared FIFO, as before fair dispatch.

Each round: ``PROBES_IDLE`` single chat tasks from tenant ``globex`` one
after another with nothing else running (unloaded latency), then tenant
``acme`` submits ``FLOOD`` chat tasks at once while ``globex`` keeps
submitting single tasks one after another until the flood has ended (loaded
latency). Latency is submit to terminal event, read from a core
subscription on each tenant's events. Reported per configuration: unloaded
and loaded latency (median, p90, max), the ratio of the loaded median to the
unloaded median (goal <= 2x), how many flood tasks had ended when each probe
did, and the flood's completion time; every flood task must end
``completed`` (nothing lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from baton.dev.testing import LocalStack, connect_nats, secure_nats, uid
from bench.stats import median, pct

FLOOD = 2000
FLOODER, PROBER = "acme", "globex"
PROBES_IDLE = 10
ROUNDS = 2  # per configuration, interleaved
GOAL_RATIO = 2.0
FLOOD_TIMEOUT = 240.0  # one flood, seconds
PROBE_TIMEOUT = 120.0
PROBE_GAP = 0.2  # seconds between a probe's end and the next probe

ENV = {
    "BATON_ENGINE": "sim",
    "BATON_SIM_DECODE_TPS": "400",  # the simulator's default, stated
    "BATON_HEARTBEAT_INTERVAL": "2",
    "BATON_PENDING_POLL_INTERVAL": "5",
    "BATON_LOG_LEVEL": "WARNING",
}
CONFIGS: dict[str, dict[str, str]] = {
    "fair": {},  # the shipped default: token shares (bench/fairwork.py measures them by work)
    # Count shares (the rule before token shares): 64 = the worker's sequences.
    "share-64": {"BATON_FAIR_POLICY": "count", "BATON_DEFAULT_LIMITS": json.dumps({"share": 64})},
    "fifo": {"BATON_FAIR_POLICY": "count", "BATON_DEFAULT_LIMITS": json.dumps({"share": 100_000})},
}


class Ends:
    """Terminal events of both tenants, by task id, from core subscriptions."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.outcome: dict[str, str] = {}
        self.flood_ended = 0
        self.flood_ids: set[str] = set()

    async def start(self) -> None:
        for tenant in (FLOODER, PROBER):
            await self.nc.subscribe(f"baton.events.{tenant}.*", cb=self._on_event)

    async def _on_event(self, msg: Msg) -> None:
        ev = msgpack.unpackb(msg.data)
        if ev.get("type") not in ("completed", "failed"):
            return
        tid = ev.get("task_id", "")
        if tid in self.outcome:
            return
        self.outcome[tid] = ev["type"]
        if tid in self.flood_ids:
            self.flood_ended += 1
        fut = self.waiting.get(tid)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    async def submit(self, tenant: str) -> tuple[str, float, asyncio.Future[float]]:
        tid = uid("f")
        fut = self.waiting[tid] = asyncio.get_running_loop().create_future()
        body = {"tenant": tenant, "input": f"hello from {tenant}", "task_id": tid}
        t0 = time.perf_counter()
        await self.js.publish(f"baton.tasks.{tenant}.chat", msgpack.packb(body),
                              headers={"Nats-Msg-Id": tid})  # fmt: skip
        return tid, t0, fut

    async def probe(self) -> tuple[float, int]:
        """One probe task: (latency, flood tasks ended when it ended)."""
        _, t0, fut = await self.submit(PROBER)
        t1 = await asyncio.wait_for(fut, PROBE_TIMEOUT)
        return t1 - t0, self.flood_ended


async def _round(ends: Ends) -> dict[str, Any]:
    idle = []
    for _ in range(PROBES_IDLE):
        idle.append((await ends.probe())[0])
        await asyncio.sleep(PROBE_GAP)
    ends.flood_ended, ends.flood_ids = 0, set()
    t0 = time.perf_counter()
    futs: list[asyncio.Future[float]] = []
    for chunk in range(0, FLOOD, 250):
        subs = await asyncio.gather(*(ends.submit(FLOODER) for _ in range(chunk, chunk + 250)))
        for tid, _, fut in subs:
            ends.flood_ids.add(tid)
            futs.append(fut)
            if ends.outcome.get(tid):  # ended before it was noted as the flood's
                ends.flood_ended += 1
    submitted = time.perf_counter() - t0
    flood = asyncio.gather(*futs)
    loaded: list[tuple[float, int]] = []
    deadline = time.monotonic() + FLOOD_TIMEOUT
    while not flood.done() and time.monotonic() < deadline:
        loaded.append(await ends.probe())
        await asyncio.sleep(PROBE_GAP)
    try:
        done_at = max(await asyncio.wait_for(flood, max(1.0, deadline - time.monotonic())))
    except TimeoutError:
        done_at = float("nan")
    lost = sum(1 for tid in ends.flood_ids if tid not in ends.outcome)
    failed = sum(1 for tid in ends.flood_ids if ends.outcome.get(tid) == "failed")
    return {
        "idle_s": idle,
        "loaded_s": [lat for lat, _ in loaded],
        "flood_ended_at_probe": [n for _, n in loaded],
        "flood_submit_s": round(submitted, 2),
        "flood_s": round(done_at - t0, 2),
        "flood_lost": lost,
        "flood_failed": failed,
    }


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan"), "n": 0}
    return {"median": round(median(values), 3), "p90": round(pct(values, 0.9), 3),
            "max": round(max(values), 3), "n": len(values)}  # fmt: skip


async def _main(work: Path) -> dict[str, Any]:
    server = secure_nats(work / "nats").start()
    stack = LocalStack(server, work / "stack", env=ENV)
    nc: NATS | None = None
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    try:
        await asyncio.to_thread(stack.start, 1)
        nc = await connect_nats(server.url, name="bench-fairness")
        ends = Ends(nc)
        await ends.start()
        for _ in range(2):  # warm-up: connections, consumers
            await ends.probe()
        for i in range(ROUNDS):
            for name in list(CONFIGS) if i % 2 == 0 else reversed(CONFIGS):
                orch = stack.orchestrator
                await asyncio.to_thread(stack.retire, orch)
                proc = stack.service("orchestrator", **CONFIGS[name])
                await asyncio.to_thread(proc.wait_ready)
                await ends.probe()  # this orchestrator's warm-up
                rounds[name].append(await _round(ends))
                print(f"fairness {name} round {i}: {json.dumps(_brief(rounds[name][-1]))}",
                      flush=True)  # fmt: skip
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await asyncio.to_thread(stack.stop)
        server.stop()
    out: dict[str, Any] = {"flood": FLOOD, "probes_idle_per_round": PROBES_IDLE,
                           "rounds": ROUNDS, "configs": {}}  # fmt: skip
    for name, rs in rounds.items():
        idle = [v for r in rs for v in r["idle_s"]]
        loaded = [v for r in rs for v in r["loaded_s"]]
        s_idle, s_loaded = _summary(idle), _summary(loaded)
        out["configs"][name] = {
            "env": CONFIGS[name],
            "unloaded_s": s_idle,
            "loaded_s": s_loaded,
            "ratio_median": round(s_loaded["median"] / s_idle["median"], 2),
            "ratio_p90": round(s_loaded["p90"] / s_idle["median"], 2),
            "flood_s": [r["flood_s"] for r in rs],
            "flood_lost": sum(r["flood_lost"] for r in rs),
            "flood_failed": sum(r["flood_failed"] for r in rs),
            "flood_ended_at_probe": [r["flood_ended_at_probe"] for r in rs],
        }
    fair, fifo = out["configs"]["fair"], out["configs"]["fifo"]
    out["flood_time_fair_over_fifo"] = round(median(fair["flood_s"]) / median(fifo["flood_s"]), 2)
    out["goal_ratio"] = GOAL_RATIO
    out["goal_met"] = fair["ratio_median"] <= GOAL_RATIO and fair["flood_lost"] == 0
    return out


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {"idle_median": round(median(r["idle_s"]), 3),
            "loaded": _summary(r["loaded_s"]), "flood_s": r["flood_s"],
            "lost": r["flood_lost"], "failed": r["flood_failed"]}  # fmt: skip


def run(work: Path) -> dict[str, Any]:
    """Run the benchmark in ``work`` (a scratch directory)."""
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for these results."""
    rows = []
    for name, c in r["configs"].items():
        u, lo = c["unloaded_s"], c["loaded_s"]
        floods = " / ".join(f"{s:.1f}" for s in c["flood_s"])
        rows.append(
            f"| {name} | {u['median']:.2f} | {lo['median']:.2f} | {lo['p90']:.2f} |"
            f" {lo['max']:.2f} | {c['ratio_median']:.2f}x | {floods} |"
            f" {c['flood_lost']} / {c['flood_failed']} |"
        )
    fair = r["configs"]["fair"]
    met = "met" if r["goal_met"] else "**missed**"
    return "\n".join(
        [
            "## Fairness between tenants (`python -m bench fairness`)",
            "",
            f"Tenant `acme` submits {r['flood']:,} chat tasks at once; tenant `globex` submits"
            " single chat tasks one after another, before the flood (unloaded) and until it"
            " has ended (loaded). Simulator engine at 400 tokens/s per sequence (a 128-token"
            " answer takes ~0.3 s), one worker; `fair` is the shipped share, `fifo` a share"
            f" larger than the flood (every job queued at once, as before); {r['rounds']} rounds"
            " each, interleaved on one stack. Seconds, submit to terminal event.",
            "",
            "| config | unloaded median | loaded median | loaded p90 | loaded max |"
            " loaded/unloaded | flood s (per round) | flood lost / failed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Goal: loaded ≤ {r['goal_ratio']:g}x unloaded with the flood completing —"
            f" {met} ({fair['ratio_median']:.2f}x at the median, {fair['ratio_p90']:.2f}x at"
            f" p90). The flood takes {r['flood_time_fair_over_fifo']:.2f}x as long under `fair`"
            " as under `fifo`.",
        ]
    )
