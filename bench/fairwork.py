"""Fair by work (issue #21): one tenant floods long tasks, another's short
chats must keep their solo latency — p95 within 1.25x.

One run on a private nats-server with the services as processes; the
inference worker is the **simulator** engine at its defaults (65,536 KV
tokens, 64 sequences, 400 tokens/s per sequence, batching without slowdown),
so what a short chat waits for is queueing, not a slower engine. Tasks:

* long (tenant ``acme``): a one-step workflow ``long`` with an input of ~1,700
  tokens and an answer of 256 — ~1,970 KV tokens and ~0.65 s of decode each,
  so the worker holds ~29 of them at once;
* short (tenant ``globex``): ``chat``, a 6-word input and a 128-token answer
  (~0.35 s end to end alone).

The flood is ``FLOOD_X`` (20) times the long tasks the worker runs at once,
all submitted together. The policies alternate round by round on one stack
(the orchestrator and the worker restarted between them):

* ``tokens`` — the shipped default: intake counts each tenant's steps in
  flight in tokens against its ``token_share`` (16,384), lending the share
  other tenants leave idle as far as the worker's KV cache holds it; the
  worker admits the tenant holding the fewest tokens first from a queue of 4;
* ``tokens-nolend`` — the same without lending (``BATON_FAIR_LEND=false``):
  each tenant at its share, alone or not (the rule of issue #21);
* ``count`` — the rule before: 32 tasks in flight per tenant, jobs admitted
  as they arrived, nothing fetched beyond what fits;
* ``count+queue`` — count shares at intake with the worker's fair queue, to
  tell which layer does the work; ``count64+queue`` the same with a count
  share of 64 (the pool's sequences; or two orchestrator replicas at 32).

Each round: ``PROBES_SOLO`` short chats one after another with nothing else
running (solo); then ``LONE`` long tasks of ``acme`` with nothing else
running (its throughput alone: what lending buys); then the flood, and
``ARRIVE_S`` later — ``acme`` has borrowed the pool by then — ``globex``
arrives and keeps submitting one chat after another until the flood has
ended (flooded). Latency is submit to terminal event (a core subscription on
each tenant's events). Reported per policy: solo and flooded p50/p95, the
p95 ratio (goal <= 1.25x), the lone tenant's tasks/s, the flood's time, and
that every task completed.
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

from baton.dev.testing import LocalStack, ServiceProcess, connect_nats, secure_nats, uid
from bench.stats import median, pct

FLOODER, PROBER = "acme", "globex"
KV_TOKENS = 65_536  # the simulator's default, stated
HEADROOM = 0.9  # BATON_KV_HEADROOM's default
LONG_INPUT = "lorem ipsum dolor " * 378  # 6,804 bytes: ~1,700 tokens at 4 bytes a token
LONG_ANSWER = 256
LONG_NEED = 6_804 // 4 + 30 + LONG_ANSWER  # prompt (input, system, template) + answer
FLOOD_X = 20
FLOOD = FLOOD_X * int(KV_TOKENS * HEADROOM // LONG_NEED)
PROBES_SOLO = 20
LONE = FLOOD // 4  # long tasks of acme alone, for its throughput
ARRIVE_S = 2.0  # seconds into the flood before globex's first chat
ROUNDS = 2  # per policy, interleaved
GOAL_RATIO = 1.25
FLOOD_TIMEOUT = 150.0  # one flood, seconds
PROBE_TIMEOUT = 60.0
PROBE_GAP = 0.05  # seconds between a probe's end and the next

LONG_WORKFLOW = f"""\
name: long
description: One long answer to a long input (the benchmark's long task).
agents:
  writer:
    role: assistant
    system: You write at length.
    max_tokens: {LONG_ANSWER}
steps:
  - id: answer
    agent: writer
"""
ENV = {
    "BATON_ENGINE": "sim",
    "BATON_SIM_DECODE_TPS": "400",
    "BATON_SIM_KV_TOKENS": str(KV_TOKENS),
    "BATON_HEARTBEAT_INTERVAL": "2",
    "BATON_PENDING_POLL_INTERVAL": "5",
    "BATON_LOG_LEVEL": "WARNING",
}
POLICIES: dict[str, dict[str, dict[str, str]]] = {
    "tokens": {"orchestrator": {"BATON_FAIR_POLICY": "tokens"},
               "worker": {"BATON_ADMISSION_ORDER": "tokens"}},
    "tokens-nolend": {"orchestrator": {"BATON_FAIR_POLICY": "tokens", "BATON_FAIR_LEND": "false"},
                      "worker": {"BATON_ADMISSION_ORDER": "tokens"}},
    "count": {"orchestrator": {"BATON_FAIR_POLICY": "count"},
              "worker": {"BATON_ADMISSION_ORDER": "fifo", "BATON_ADMISSION_QUEUE": "0"}},
    # Which layer does it: count shares at intake, the fair worker queue.
    "count+queue": {"orchestrator": {"BATON_FAIR_POLICY": "count"},
                    "worker": {"BATON_ADMISSION_ORDER": "tokens"}},
    # The same with a count share of 64 (the pool's sequences, the setting
    # the count rule's docs advised; or two orchestrator replicas at 32).
    "count64+queue": {"orchestrator": {"BATON_FAIR_POLICY": "count",
                                       "BATON_DEFAULT_LIMITS": json.dumps({"share": 64})},
                      "worker": {"BATON_ADMISSION_ORDER": "tokens"}},
}  # fmt: skip


Fut = asyncio.Future[float]


class Ends:
    """Terminal events of both tenants, by task id, from core subscriptions."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.waiting: dict[str, Fut] = {}
        self.outcome: dict[str, str] = {}

    async def start(self) -> None:
        for tenant in (FLOODER, PROBER):
            await self.nc.subscribe(f"baton.events.{tenant}.*", cb=self._on_event)

    async def _on_event(self, msg: Msg) -> None:
        ev = msgpack.unpackb(msg.data)
        tid = ev.get("task_id", "")
        if ev.get("type") not in ("completed", "failed") or tid in self.outcome:
            return
        self.outcome[tid] = ev["type"]
        fut = self.waiting.pop(tid, None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    async def submit(self, tenant: str, workflow: str, text: str) -> tuple[str, float, Fut]:
        tid = uid("w")
        fut = self.waiting[tid] = asyncio.get_running_loop().create_future()
        body = {"tenant": tenant, "input": text, "task_id": tid}
        t0 = time.perf_counter()
        await self.js.publish(f"baton.tasks.{tenant}.{workflow}", msgpack.packb(body),
                              headers={"Nats-Msg-Id": tid})  # fmt: skip
        return tid, t0, fut

    async def probe(self) -> float:
        _, t0, fut = await self.submit(PROBER, "chat", "hello, how are you today?")
        return await asyncio.wait_for(fut, PROBE_TIMEOUT) - t0


async def _flood(ends: Ends, n: int) -> tuple[float, list[str], Fut]:
    """Submit ``n`` long tasks of the flooder: when, their ids, and their
    ends (each one's terminal event's time)."""
    t0 = time.perf_counter()
    futs: list[Fut] = []
    ids: list[str] = []
    for chunk in range(0, n, 100):
        subs = await asyncio.gather(*(ends.submit(FLOODER, "long", LONG_INPUT)
                                      for _ in range(chunk, min(n, chunk + 100))))  # fmt: skip
        ids += [tid for tid, _, _ in subs]
        futs += [fut for _, _, fut in subs]
    return t0, ids, asyncio.gather(*futs)


async def _round(ends: Ends) -> dict[str, Any]:
    solo = []
    for _ in range(PROBES_SOLO):
        solo.append(await ends.probe())
        await asyncio.sleep(PROBE_GAP)
    t0, lone_ids, lone = await _flood(ends, LONE)
    lone_s = max(await asyncio.wait_for(lone, FLOOD_TIMEOUT)) - t0
    lone_done = sum(1 for tid in lone_ids if ends.outcome.get(tid) == "completed")
    t0, ids, flood = await _flood(ends, FLOOD)
    await asyncio.sleep(ARRIVE_S)  # acme alone on the pool: it borrows what lending allows
    flooded: list[float] = []
    deadline = time.monotonic() + FLOOD_TIMEOUT
    while not flood.done() and time.monotonic() < deadline:
        flooded.append(await ends.probe())
        await asyncio.sleep(PROBE_GAP)
    try:
        done_at = max(await asyncio.wait_for(flood, max(1.0, deadline - time.monotonic())))
    except TimeoutError:
        done_at = float("nan")
    completed = sum(1 for tid in ids if ends.outcome.get(tid) == "completed")
    return {"solo_s": solo, "flooded_s": flooded, "flood_s": round(done_at - t0, 2),
            "flood_completed": completed, "lone_s": round(lone_s, 2),
            "lone_completed": lone_done}  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "max": float("nan"), "n": 0}
    return {"p50": round(median(values), 3), "p95": round(pct(values, 0.95), 3),
            "max": round(max(values), 3), "n": len(values)}  # fmt: skip


async def _restart(stack: LocalStack, procs: dict[str, ServiceProcess], name: str) -> None:
    """The orchestrator and the worker of policy ``name``."""
    for key in ("orchestrator", "worker"):
        if key in procs:
            await asyncio.to_thread(stack.retire, procs.pop(key))
    env = POLICIES[name]
    procs["orchestrator"] = stack.service("orchestrator", **env["orchestrator"])
    procs["worker"] = stack.worker(**env["worker"])
    for p in procs.values():
        await asyncio.to_thread(p.wait_ready)


async def _main(work: Path) -> dict[str, Any]:
    server = secure_nats(work / "nats").start()
    workflows = work / "workflows"
    workflows.mkdir()
    (workflows / "long.yaml").write_text(LONG_WORKFLOW)
    stack = LocalStack(server, work / "stack", env={**ENV, "BATON_WORKFLOWS_DIR": str(workflows)})
    stack.workdir.mkdir(parents=True)
    nc: NATS | None = None
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in POLICIES}
    procs: dict[str, ServiceProcess] = {}
    try:
        await asyncio.to_thread(stack.service("context-store").wait_ready)
        nc = await connect_nats(server.url, name="bench-fairwork")
        ends = Ends(nc)
        await ends.start()
        for i in range(ROUNDS):
            for name in list(POLICIES) if i % 2 == 0 else reversed(POLICIES):
                await _restart(stack, procs, name)
                for _ in range(3):  # warm-up: connections, consumers, the prefix cache
                    await ends.probe()
                rounds[name].append(await _round(ends))
                r = rounds[name][-1]
                brief = _summary(r["solo_s"]), _summary(r["flooded_s"])
                print(f"fairwork {name} round {i}: solo {brief[0]} flooded {brief[1]}"
                      f" lone {r['lone_s']} s flood {r['flood_s']} s", flush=True)  # fmt: skip
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await asyncio.to_thread(stack.stop)
        server.stop()
    out: dict[str, Any] = {"flood": FLOOD, "flood_x": FLOOD_X, "long_need_tokens": LONG_NEED,
                           "kv_tokens": KV_TOKENS, "probes_solo_per_round": PROBES_SOLO,
                           "lone": LONE, "arrive_s": ARRIVE_S,
                           "rounds": ROUNDS, "policies": {}}  # fmt: skip
    for name, rs in rounds.items():
        solo = [v for r in rs for v in r["solo_s"]]
        flooded = [v for r in rs for v in r["flooded_s"]]
        s_solo, s_flooded = _summary(solo), _summary(flooded)
        out["policies"][name] = {
            "env": POLICIES[name],
            "solo_s": s_solo,
            "flooded_s": s_flooded,
            "ratio_p95": round(s_flooded["p95"] / s_solo["p95"], 2),
            "ratio_p50": round(s_flooded["p50"] / s_solo["p50"], 2),
            "ratio_p95_by_round": [
                round(pct(r["flooded_s"], 0.95) / pct(r["solo_s"], 0.95), 2) for r in rs
            ],
            "flood_s": [r["flood_s"] for r in rs],
            "flood_completed": [r["flood_completed"] for r in rs],
            "lone_s": [r["lone_s"] for r in rs],
            "lone_tasks_per_s": round(LONE / median([r["lone_s"] for r in rs]), 1),
            "lone_completed": [r["lone_completed"] for r in rs],
        }
    tok = out["policies"]["tokens"]
    count = out["policies"]["count"]
    slower = median(tok["flood_s"]) / median(count["flood_s"])
    out["flood_time_tokens_over_count"] = round(slower, 2)
    nolend = out["policies"]["tokens-nolend"]
    out["lone_lend_speedup"] = round(tok["lone_tasks_per_s"] / nolend["lone_tasks_per_s"], 2)
    out["goal_ratio"] = GOAL_RATIO
    out["goal_met"] = (
        tok["ratio_p95"] <= GOAL_RATIO
        and all(n == FLOOD for n in tok["flood_completed"])
        and all(n == LONE for n in tok["lone_completed"])
    )
    return out


def run(work: Path) -> dict[str, Any]:
    """Run the benchmark in ``work`` (a scratch directory)."""
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for these results."""
    rows = []
    for name, c in r["policies"].items():
        s, f = c["solo_s"], c["flooded_s"]
        floods = " / ".join(f"{x:.1f}" for x in c["flood_s"])
        done = " / ".join(str(n) for n in c["flood_completed"])
        by_round = " / ".join(f"{x:.2f}" for x in c["ratio_p95_by_round"])
        lone = " / ".join(f"{x:.1f}" for x in c.get("lone_s", []))
        rows.append(
            f"| {name} | {s['p50']:.2f} / {s['p95']:.2f} | {f['p50']:.2f} / {f['p95']:.2f} |"
            f" {f['max']:.2f} | **{c['ratio_p95']:.2f}x** ({by_round}) | {c['ratio_p50']:.2f}x |"
            f" {c.get('lone_tasks_per_s', float('nan')):.1f} ({lone}) |"
            f" {floods} | {done} of {r['flood']} |"
        )
    tok = r["policies"]["tokens"]
    met = "met" if r["goal_met"] else "**missed**"
    return "\n".join(
        [
            "## Fair by work (`python -m bench fairwork`)",
            "",
            f"Tenant `acme` submits {r['flood']:,} long tasks at once ({r['flood_x']}x the"
            f" ~{r['long_need_tokens']:,}-token jobs the worker holds at once: ~1,700 prompt"
            " tokens, 256 generated); tenant `globex` submits short chats (128 tokens) one"
            " after another, before the flood (solo) and from"
            f" {r.get('arrive_s', 0):g} s into it — `acme` alone on the pool until then —"
            " until it has ended (flooded). Before the flood, `acme` runs"
            f" {r.get('lone', 0)} long tasks with nothing else running (lone: its"
            " throughput alone)."
            f" **Simulator** engine ({r['kv_tokens']:,} KV tokens, 64 sequences, 400"
            " tokens/s per sequence, no slowdown from batching: a flooded chat waits only in"
            " queues), one worker; `tokens` is the shipped policy (a tenant's steps in flight"
            " counted in tokens against its `token_share` of 16,384, plus the share other"
            " tenants leave idle, lent as far as the worker's KV cache and slots hold it; the"
            " worker admits the tenant holding the fewest tokens first from a queue of 4),"
            " `tokens-nolend` the same without lending (`BATON_FAIR_LEND=false`), `count` the rule"
            " before (32 tasks per tenant, FIFO admission, no queue), `count+queue` count"
            " shares with the fair worker queue, `count64+queue` the same with a count share"
            " of 64 (the pool's sequences, as the count rule's docs advised, or two"
            f" orchestrator replicas at 32); {r['rounds']} rounds each, interleaved on"
            " one stack (the orchestrator and the worker restarted between policies)."
            " Seconds, submit to terminal event.",
            "",
            "| policy | solo p50 / p95 | flooded p50 / p95 | flooded max |"
            " flooded/solo p95 (per round) | flooded/solo p50 | lone tasks/s (s per round) |"
            " flood s (per round) | flood completed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Goal: the short chats' flooded p95 ≤ {r['goal_ratio']:g}x their solo p95 with"
            f" the flood completing — {met} ({tok['ratio_p95']:.2f}x under `tokens`, pooled"
            " over the rounds, `globex` arriving while `acme` holds the loan). Lending: a"
            f" tenant alone runs {r['lone_lend_speedup']:.1f}x the tasks per second it did"
            " capped at its share (`tokens` against `tokens-nolend`, lone column: 16,384 of"
            " the worker's 58,982 KV tokens without the loan, the pool with it); the flood"
            f" takes {r['flood_time_tokens_over_count']:.1f}x as long as under `count`.",
            "",
            "Which layer: "
            + "; ".join(
                f"`{name}` {c['ratio_p95']:.2f}x (flood {median(c['flood_s']):.1f} s)"
                for name, c in r["policies"].items()
                if not name.startswith("tokens")
            )
            + ". The worker's fair queue alone helps only while a tenant's count share"
            " exceeds what the worker runs at once by less than the queue (4 jobs); the"
            " token share bounds a tenant's queued work whatever its tasks' length (per"
            " orchestrator replica, as the count was).",
        ]
    )
