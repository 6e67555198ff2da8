"""The cost of the tenant fence on the hot path: one chat task's round trip
(publish → ``completed``, simulator engine) on the bus as ``baton up`` runs it
— NATS operator mode: every identity a user JWT in a ``.creds`` file, accounts
from the ``full`` resolver, per-service identities, JetStream encrypted at
rest — against the same stack on an open nats-server, interleaved round by
round in one run. The fenced client is a tenant in its own account,
connected with its ``.creds`` (its task crosses the service import, its
events the stream import); the open one publishes straight into Baton's
subjects, as every client did before."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack

from baton.dev.testing import LocalStack, connect_nats, secure_nats
from baton.natsd import NatsServer
from bench.stats import pct

ROUNDS = 6
TASKS_PER_ROUND = 40
ENV = {"BATON_TENANTS": "acme", "BATON_LOG_LEVEL": "WARNING", "BATON_SIM_DECODE_TPS": "100000"}


async def _round_trips(url: str, subject: str, n: int) -> list[float]:
    nc = await connect_nats(url)
    js = nc.jetstream()
    out: list[float] = []
    try:
        for _ in range(n):
            task_id = uuid.uuid4().hex
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def on_event(msg: Any, fut: asyncio.Future[None] = done) -> None:
                if msgpack.unpackb(msg.data)["type"] in ("completed", "failed") and not fut.done():
                    fut.set_result(None)

            sub = await nc.subscribe(f"baton.events.acme.{task_id}", cb=on_event)
            t0 = time.perf_counter()
            body = {"tenant": "acme", "input": "hi", "task_id": task_id}
            await js.publish(subject, msgpack.packb(body), headers={"Nats-Msg-Id": task_id})
            await asyncio.wait_for(done, 30)
            out.append(time.perf_counter() - t0)
            await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def _main(work: Path) -> dict[str, Any]:
    fenced_nats = secure_nats(work / "fenced-nats", ("acme",)).start()  # operator mode
    assert "?creds=" in fenced_nats.url_for("acme"), "the fenced side must present a .creds"
    open_nats = NatsServer(work / "open-nats").start()
    fenced = LocalStack(fenced_nats, work / "fenced", env=dict(ENV)).start()
    opened = LocalStack(open_nats.url, work / "open", env=dict(ENV)).start()
    rounds = []
    try:
        for _ in range(2):  # warm both: connections, consumers, caches
            await _round_trips(fenced_nats.url_for("acme"), "baton.tasks.chat", 10)
            await _round_trips(open_nats.url, "baton.tasks.acme.chat", 10)
        for i in range(ROUNDS):
            order = [("on", True), ("off", False)][:: 1 if i % 2 == 0 else -1]
            got: dict[str, list[float]] = {}
            for name, on in order:
                if on:
                    got[name] = await _round_trips(
                        fenced_nats.url_for("acme"), "baton.tasks.chat", TASKS_PER_ROUND
                    )
                else:
                    got[name] = await _round_trips(
                        open_nats.url, "baton.tasks.acme.chat", TASKS_PER_ROUND
                    )
            p50_on, p50_off = statistics.median(got["on"]), statistics.median(got["off"])
            rounds.append({"p50_on_ms": round(p50_on * 1e3, 2),
                           "p50_off_ms": round(p50_off * 1e3, 2),
                           "p99_on_ms": round(pct(got["on"], 0.99) * 1e3, 2),
                           "p99_off_ms": round(pct(got["off"], 0.99) * 1e3, 2),
                           "ratio_p50": round(p50_on / p50_off, 3)})  # fmt: skip
    finally:
        fenced.stop()
        opened.stop()
        fenced_nats.stop()
        open_nats.stop()
    ratios = [r["ratio_p50"] for r in rounds]
    return {
        "rounds": rounds,
        "tasks_per_round": TASKS_PER_ROUND,
        "median_ratio_p50": round(statistics.median(ratios), 3),
        "goal": "fenced / open task round trip p50 <= 1.05",
        "fenced": "operator mode: .creds (user JWT + nkey), full resolver, encrypted store",
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {i + 1} | {x['p50_on_ms']} | {x['p50_off_ms']} | {x['ratio_p50']} | "
        f"{x['p99_on_ms']} | {x['p99_off_ms']} |"
        for i, x in enumerate(r["rounds"])
    )
    return f"""## Authentication on the hot path (`python -m bench auth`)

One chat task's round trip (publish → `completed`, simulator) through a
tenant's own account on the fenced bus as `baton up` runs it (NATS operator
mode: each identity a `.creds` user JWT, accounts from the `full` resolver,
service imports, per-service identities, encrypted store) against the same
stack on an open nats-server,
{r["tasks_per_round"]} sequential tasks per side per round, sides alternating
first. Median ratio of p50s: **{r["median_ratio_p50"]}** ({r["goal"]}).

| round | p50 fenced ms | p50 open ms | ratio | p99 fenced ms | p99 open ms |
| --- | --- | --- | --- | --- | --- |
{rows}
"""
