"""Context store benchmarks (issue #4), on a private nats-server and a real
context store process.

1. Bytes on the bus per inference job at 10, 100 and 1,000 turns of history:
   Baton (the job carries a signed ref; the worker fetches a budgeted window)
   against a baseline whose job ships the full history. Every message one
   job puts on the bus is sent through a meter that counts its payload bytes.
2. Window latency, p50 / p99, for a 100-turn history and a 4k-token budget,
   interleaved with a raw JetStream KV get (direct) of a value the size of the
   window reply, in the same run.

Every loop is bounded in count and time. ``run(out_dir)`` writes
``context.json``; ``python -m bench.context`` prints it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from baton.bus import Bus, connect
from baton.dev.testing import secure_nats
from baton.stack import ServiceProcess
from proto import codec, subjects
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextAppendReply,
    InferenceJob,
    InferenceResult,
    Usage,
    WindowReply,
    WindowRequest,
)
from proto.streams import BucketSpec

TURNS = (10, 100, 1000)
TURN_CHARS = 300  # each user and assistant message
BUDGET = 4096
OUTPUT = "o" * 200
USAGE = Usage(prompt_tokens=4000, completion_tokens=50, gpu_seconds=0.1)
LATENCY_SAMPLES, LATENCY_SECONDS = 1000, 30.0


class FullHistoryJob(InferenceJob, kw_only=True):
    """The baseline: an inference job that carries the whole conversation."""

    messages: list[ChatMessage]


class Meter:
    """Sends on the bus and counts the payload bytes of every message sent
    and received, per category (NATS framing and headers excluded)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.bytes: dict[str, int] = {}

    def _add(self, category: str, n: int) -> None:
        self.bytes[category] = self.bytes.get(category, 0) + n

    async def publish(self, category: str, subject: str, body: Any) -> None:
        data = codec.encode(body)
        await self.bus._nc.publish(subject, data)
        self._add(category, len(data))

    async def request(self, category: str, subject: str, body: Any, reply_type: type[Any]) -> Any:
        data = codec.encode(body)
        msg = await self.bus._nc.request(subject, data, timeout=10)
        self._add(category, len(data) + len(msg.data))
        return codec.decode(msg.data, reply_type)


async def _history(bus: Bus, tenant: str, session: str, turns: int) -> Any:
    reply: ContextAppendReply | None = None
    for i in range(turns):
        pair = [
            ChatMessage(role="user", content=f"q{i} " + "u" * TURN_CHARS),
            ChatMessage(role="assistant", content=f"a{i} " + "a" * TURN_CHARS),
        ]
        req = ContextAppend(
            tenant=tenant,
            session=session,
            msg_id=f"t{i}",
            messages=pair,
            system="You are a careful assistant." if i == 0 else None,
        )
        reply = await bus.request(subjects.context_api("append", tenant), req, ContextAppendReply)
    assert reply is not None and reply.ref is not None
    return reply.ref


async def _one_job(m: Meter, tenant: str, session: str, ref: Any) -> None:
    """Baton: job (ref) -> window fetch -> append the answer -> result."""
    job = InferenceJob(
        job_id="j1",
        task_id="t1",
        tenant=tenant,
        session=session,
        workflow="chat",
        step="s1",
        agent="chat",
        ref=ref,
        max_tokens=256,
        context_budget=BUDGET,
    )
    await m.publish("job", subjects.job("bench"), job)
    w = await m.request(
        "window",
        subjects.context_api("window", tenant),
        WindowRequest(tenant=tenant, ref=ref, budget_tokens=BUDGET),
        WindowReply,
    )
    assert w.error is None, w.error
    out = ContextAppend(
        tenant=tenant,
        session=session,
        msg_id=f"out{time.time_ns()}",
        messages=[ChatMessage(role="assistant", content=OUTPUT)],
    )
    a = await m.request("append", subjects.context_api("append", tenant), out, ContextAppendReply)
    res = InferenceResult(
        job_id="j1",
        task_id="t1",
        tenant=tenant,
        session=session,
        step="s1",
        worker="w1",
        ref=a.ref,
        output=OUTPUT,
        usage=USAGE,
    )
    await m.publish("result", subjects.result(tenant, "t1"), res)


async def _baseline_job(m: Meter, tenant: str, session: str, ref: Any) -> None:
    """Baseline: the job ships the whole history; the result is the same."""
    history = (
        await m.bus.request(
            subjects.context_api("window", tenant),
            WindowRequest(tenant=tenant, ref=ref, budget_tokens=10**9),
            WindowReply,
        )
    ).messages
    assert len(history) == ref.version
    job = FullHistoryJob(
        job_id="j1",
        task_id="t1",
        tenant=tenant,
        session=session,
        workflow="chat",
        step="s1",
        agent="chat",
        ref=ref,
        max_tokens=256,
        messages=history,
    )
    await m.publish("baseline_job", subjects.job("bench"), job)
    res = InferenceResult(
        job_id="j1",
        task_id="t1",
        tenant=tenant,
        session=session,
        step="s1",
        worker="w1",
        output=OUTPUT,
        usage=USAGE,
    )
    await m.publish("baseline_result", subjects.result(tenant, "t1"), res)


async def bytes_per_job(bus: Bus) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for turns in TURNS:
        tenant, session = "bench", f"h{turns}"
        ref = await _history(bus, tenant, session, turns)
        m = Meter(bus)
        await _one_job(m, tenant, session, ref)
        await _baseline_job(m, tenant, session, ref)
        b = m.bytes
        rows[str(turns)] = {
            "history_messages": ref.version,
            "baton_job": b["job"],
            "baton_result": b["result"],
            "baton_between_services": b["job"] + b["result"],
            "baton_window_fetch": b["window"],
            "baton_append": b["append"],
            "baton_total": b["job"] + b["result"] + b["window"] + b["append"],
            "baseline_job": b["baseline_job"],
            "baseline_total": b["baseline_job"] + b["baseline_result"],
        }
    first, last = rows[str(TURNS[0])], rows[str(TURNS[-1])]
    keys = ("baton_between_services", "baton_total", "baseline_total")
    mid = rows[str(TURNS[1])]
    return {
        "by_turns": rows,
        "ratio_1000_to_10": {k: round(last[k] / first[k], 3) for k in keys},
        "ratio_1000_to_100": {k: round(last[k] / mid[k], 3) for k in keys},
    }


def _pcts(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_us": round(q[49] * 1e6, 1), "p99_us": round(q[98] * 1e6, 1), "n": len(samples)}


async def window_latency(bus: Bus) -> dict[str, Any]:
    tenant, session = "bench", "h100"
    ref = await _history(bus, tenant, session, 100)  # already there: idempotent appends
    req = WindowRequest(tenant=tenant, ref=ref, budget_tokens=BUDGET)
    subject = subjects.context_api("window", tenant)
    sample = await bus.request(subject, req, WindowReply)
    size = len(codec.encode(sample))
    kv = await bus.ensure_bucket(BucketSpec(name="bench-window", history=1))
    await kv.put("w", b"x" * size)
    window_s: list[float] = []
    kv_s: list[float] = []
    deadline = time.monotonic() + LATENCY_SECONDS
    for _ in range(50):  # warm-up
        await bus.request(subject, req, WindowReply)
        await kv.get("w")
    while len(window_s) < LATENCY_SAMPLES and time.monotonic() < deadline:
        t0 = time.perf_counter()
        w = await bus.request(subject, req, WindowReply)
        t1 = time.perf_counter()
        await kv.get("w")
        t2 = time.perf_counter()
        assert w.error is None
        window_s.append(t1 - t0)
        kv_s.append(t2 - t1)
    return {
        "history_turns": 100,
        "budget_tokens": BUDGET,
        "window_messages": len(sample.messages),
        "window_tokens": sample.tokens,
        "window_reply_bytes": size,
        "window": _pcts(window_s),
        "kv_get_same_size": _pcts(kv_s),
    }


async def _main(workdir: Path) -> dict[str, Any]:
    server = secure_nats(workdir / "nats").start()
    store = ServiceProcess(
        "context-store",
        {
            "BATON_NATS_URL": server.url_for("context-store"),
            "BATON_DATA_DIR": str(workdir),
            "BATON_CONTEXT_KEY": "bench-only-key-0123456789abcdef",
            "BATON_LOG_LEVEL": "WARNING",
            "BATON_ALLOW_NO_API_KEYS": "true",
        },
        log_path=workdir / "context-store.log",
    ).start()
    try:
        await asyncio.to_thread(store.wait_ready, 60.0)
        bus = await connect(server.url, name="bench")
        try:
            sizes = await bytes_per_job(bus)
            latency = await window_latency(bus)
        finally:
            await bus.close()
    finally:
        store.terminate(10)
        server.stop()
    return {"bytes_per_job": sizes, "window_latency": latency}


def run(work: Path) -> dict[str, Any]:
    """Run both benchmarks in ``work`` (a scratch directory)."""
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for these results."""
    b, w = r["bytes_per_job"], r["window_latency"]
    rows = [
        f"| {t} turns | {v['history_messages']:,} | {v['baton_between_services']:,} | "
        f"{v['baton_window_fetch']:,} | {v['baton_total']:,} | {v['baseline_total']:,} |"
        for t, v in b["by_turns"].items()
    ]
    r10, r100 = b["ratio_1000_to_10"], b["ratio_1000_to_100"]
    return "\n".join([
        "## Context store",
        "",
        "A private nats-server and a real context store process; each turn is a user and an",
        "assistant message of ~300 characters. Bytes are message payloads per inference job.",
        "Baton: a signed ref in the job, a window fetch (4,096-token budget), the answer's",
        "append and a result. Baseline: the whole history shipped in the job.",
        "",
        "| history | messages | Baton between services | Baton window fetch | Baton total | "
        "baseline total |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Ratio 1,000-turn / 10-turn: **Baton between services {r10['baton_between_services']}**"
        f" (goal ≤ 1.1), baseline {r10['baseline_total']}. From 100 to 1,000 turns Baton's total"
        f" grows {r100['baton_total']}x (the window is capped by the budget), the baseline's"
        f" {r100['baseline_total']}x.",
        "",
        f"Window request, {w['history_turns']}-turn history, {w['budget_tokens']}-token budget"
        f" ({w['window_messages']} messages, {w['window_reply_bytes']:,} bytes): p50 "
        f"{w['window']['p50_us']:.0f} µs / p99 {w['window']['p99_us']:.0f} µs, beside a raw"
        f" JetStream KV get of the same size in the same run: p50 "
        f"{w['kv_get_same_size']['p50_us']:.0f} µs / p99 {w['kv_get_same_size']['p99_us']:.0f} µs.",
    ])  # fmt: skip
