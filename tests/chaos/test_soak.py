"""The soak: a steady task rate on the simulator for ``BATON_SOAK_MINUTES``
(2 in CI via ``make test-chaos``; 30 with ``make soak``), a fault every
``BATON_SOAK_FAULT_EVERY`` seconds (SIGKILL of the worker or the
orchestrator, restarted), sampled every 5 s from outside: RSS of every
service process, JetStream consumer count, server subscriptions, task
latency per window. It fails on a lost task, on consumers or subscriptions
that grow, on RSS of a never-restarted process that grows more than the
tolerance, and on a p99 that drifts. ``BATON_SOAK_PLOT=path.png`` writes a
plot of RSS and p99 over time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest

from baton.dev.testing import LocalStack, connect_nats, secure_nats, uid
from baton.natsd import free_port

MINUTES = float(os.environ.get("BATON_SOAK_MINUTES", "2"))
FAULT_EVERY = float(os.environ.get("BATON_SOAK_FAULT_EVERY", "40"))
RATE = 4.0  # tasks per second
SAMPLE = 5.0  # seconds
SOAK_CACHED_SESSIONS = 64  # < the tasks of the first 20 s
RSS_TOLERANCE = float(os.environ.get("BATON_SOAK_RSS_TOLERANCE", "0.05"))  # the goal

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(int(MINUTES * 60 + 300))]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def _varz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=2) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def test_a_soak_keeps_memory_consumers_and_latency_flat(tmp_path: Path) -> None:
    monitor = free_port()
    server = secure_nats(tmp_path / "nats", monitor_port=monitor).start()
    # Every task is a new session: the context store's session cache (2,048 by
    # default) would take 8.5 min at 4/s to fill, and a filling cache is not
    # a leak (it was the +9% of the first 10-minute soak). Small here, so it is
    # full before the first sample and RSS growth means memory not bounded.
    env = {"BATON_TENANTS": "acme", "BATON_CACHED_SESSIONS": str(SOAK_CACHED_SESSIONS)}
    stack = LocalStack(server, tmp_path / "stack", env=env).start()
    nc = await connect_nats(server.url)
    js = nc.jetstream()
    tenant = "acme"
    submitted: dict[str, float] = {}
    ended: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    stop = False

    async def load() -> None:
        i = 0
        while not stop:
            task_id = uid()
            submitted[task_id] = time.time()
            body = {"tenant": tenant, "task_id": task_id, "input": f"soak {i}"}
            await js.publish(
                f"baton.tasks.{tenant}.chat", msgpack.packb(body), headers={"Nats-Msg-Id": task_id}
            )
            i += 1
            await asyncio.sleep(1 / RATE)

    async def follow() -> None:
        sub = await nc.subscribe(f"baton.events.{tenant}.*")
        async for msg in sub.messages:
            ev = msgpack.unpackb(msg.data)
            if ev["type"] in ("completed", "failed"):
                ended.setdefault(ev["task_id"], time.time())

    async def faults() -> None:
        n = 0
        while not stop:
            await asyncio.sleep(FAULT_EVERY)
            name = ("inference-worker", "orchestrator")[n % 2]
            n += 1
            victim = next(p for p in reversed(stack.procs) if p.name == name and p.alive())
            victim.kill()
            fresh = stack.worker() if name == "inference-worker" else stack.service(name)
            await asyncio.to_thread(fresh.wait_ready, 60)

    async def sampler(t0: float) -> None:
        while not stop:
            now = time.time()
            rss = {p.name: psutil.Process(p.proc.pid).memory_info().rss / 2**20
                   for p in stack.procs if p.alive() and p.proc}  # fmt: skip
            streams = await js.streams_info()
            names = set()
            for s in streams:
                if s.state.consumer_count:
                    names |= {f"{s.config.name}/{c.name}"
                              for c in await js.consumers_info(s.config.name)}  # fmt: skip
            window = [ended[t] - s for t, s in submitted.items()
                      if t in ended and now - SAMPLE <= ended[t] < now]  # fmt: skip
            samples.append({
                "t": now - t0, "rss_mb": rss,
                "consumers": sum(s.state.consumer_count for s in streams),
                "consumer_names": names,
                "subscriptions": _varz(monitor)["subscriptions"],
                "p99": _pct(window, 0.99), "done": len(window),
            })  # fmt: skip
            await asyncio.sleep(SAMPLE)

    t0 = time.time()
    follower = asyncio.create_task(follow())
    jobs = [asyncio.create_task(c) for c in (load(), faults(), sampler(t0))]
    try:
        await asyncio.sleep(MINUTES * 60)
        stop = True
        await asyncio.gather(*jobs)
        async with asyncio.timeout(90):
            while set(submitted) - set(ended):
                await asyncio.sleep(0.5)
    finally:
        stop = True
        follower.cancel()
        await nc.close()
        stack.stop()
        server.stop()

    warm = [s for s in samples if s["t"] >= 20]  # after start-up and the first tasks
    first, last = warm[0], warm[-1]
    cs0 = first["rss_mb"].get("context-store")  # never restarted: its RSS must stay flat
    cs1 = last["rss_mb"].get("context-store")
    p99s = [s["p99"] for s in warm if s["done"]]
    half = len(p99s) // 2
    print(f"\nsoak {MINUTES:.0f} min at {RATE}/s: {len(submitted)} tasks, {len(ended)} ended; "
          f"context-store RSS {cs0:.0f} -> {cs1:.0f} MiB; consumers {first['consumers']} -> "
          f"{last['consumers']}; subscriptions {first['subscriptions']} -> {last['subscriptions']}; "
          f"p99 first half {_pct(p99s[:half], 0.5):.2f}s, second half {_pct(p99s[half:], 0.5):.2f}s")  # fmt: skip
    plot = os.environ.get("BATON_SOAK_PLOT")
    if plot:
        _plot(samples, Path(plot))
    assert not set(submitted) - set(ended), "tasks without a terminal event"
    # A restarted worker's own consumer exists before its dead predecessor's
    # is rescued and deleted: judge the fewest over the last 30 s.
    settled = min(s["consumers"] for s in warm[-6:])
    assert last["subscriptions"] <= first["subscriptions"] + 10, "subscriptions piled up"
    assert cs1 <= cs0 * (1 + RSS_TOLERANCE), f"context-store RSS grew {cs0:.0f} -> {cs1:.0f} MiB"
    assert _pct(p99s[half:], 0.5) <= 2 * max(_pct(p99s[:half], 0.5), 0.5), "p99 drifted"
    # (8 -> 9 was a SIGKILLed orchestrator's tool-catalog KV watch, which
    # nats-py asks the server to keep for 5 min; now 30 s.)
    lasting = set.intersection(*(s["consumer_names"] for s in warm[-6:]))
    assert settled <= first["consumers"], (
        f"JetStream consumers {first['consumers']} -> {settled}: new {sorted(lasting - first['consumer_names'])}"
    )


def _plot(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s["t"] / 60 for s in samples]
    for name in ("context-store", "orchestrator", "inference-worker"):
        a.plot(t, [s["rss_mb"].get(name, float("nan")) for s in samples], label=name)
    a.set_ylabel("RSS (MiB)")
    a.legend()
    b.plot(t, [s["p99"] for s in samples], color="tab:red")
    b.set_ylabel("task p99 per 5 s (s)")
    b.set_xlabel("minutes (a worker or orchestrator SIGKILLed every "
                 f"{FAULT_EVERY:.0f} s)")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
