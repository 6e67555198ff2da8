"""Orchestration tax (issue #5), one run on a private nats-server and the three
services as processes, the inference worker on the simulator engine with zero
latency (no prefill or decode sleeps).

1. Per-step latency of ``research`` runs submitted one at a time: for every
   step of every completed run, ``finished_at - dispatched_at`` from the run
   state the orchestrator serves (``GET /v1/tasks/{id}``). Interleaved
   between those runs, in the same process and the same run: raw NATS core
   request-reply round trips to a trivial responder on a second connection,
   and the JetStream primitives a step is built from (a publish with its ack,
   a KV get, a KV compare-and-set). Reported: p50 / p99 of each and the ratio
   step / round trip — goal ≤ 4x at p50.
2. Where a step's time goes: more sequential runs with core-NATS taps on the
   jobs, results and context requests, cut into segments by timestamps taken
   on one machine's clock.
3. Steps per second at 32 runs in flight (a new one submitted as soon as
   one ends), steps counted from their run states, divided by the wall time
   from the first submit to the last terminal event. Interleaved, round by
   round, with the LangGraph peer (``bench/peer_langgraph.py``, its own
   process): the same graph with ``AsyncSqliteSaver`` (durable, in-process)
   and without a checkpointer (in memory), 32 ``ainvoke`` in flight. CPU per
   step: utime + stime from ``/proc/<pid>/stat`` over the measured window,
   summed over Baton's three service processes (and nats-server, reported
   apart), against the peer process's own.
4. The orchestrator's RSS (``VmRSS``) as steps accumulate, 32 runs in flight:
   sampled every 2,500 steps up to 10,000, or 50,000 with ``--long``.

Every loop is bounded in count and time; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from baton.dev.testing import LocalStack, connect_nats, metric, secure_nats, uid
from baton.natsd import free_port
from bench.hops import HopTap
from bench.stats import cpu_seconds, pct
from bench.tally import SERVER, KindTap
from proto import codec
from proto.messages import ContextAnswer, InferenceJob, InferenceResult, WindowRequest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = "research"
WARMUP_RUNS = 3
SEQUENTIAL_RUNS = 60
TAP_RUNS = 20
RTT_SAMPLES = 2000
PRIMITIVE_SAMPLES = 600  # each of: JetStream publish, KV get, KV update
RTT_PAYLOAD = b"x" * 256  # about an inference job's size
CONCURRENT = 32  # research runs in flight at once
BURST_RUNS = 160  # per round; a new run starts as soon as one ends
BURST_ROUNDS = 3  # each: Baton, LangGraph + SQLite, LangGraph in memory
PEER_RUNS = {"sqlite": 320, "memory": 640}  # per round (they are faster)
PEER_TIMEOUT = 120.0
RSS_EVERY = 2_500  # steps between RSS samples
RSS_STEPS = 10_000  # with --long (BATON_BENCH_LONG=1): 50,000
RSS_STEPS_LONG = 50_000
RSS_TIMEOUT = 600.0
SERVICE_CONNECTIONS = ("orchestrator", "context-store", "inference-worker")  # NATS names
TALLIED = (*SERVICE_CONNECTIONS, SERVER)
GOAL_VS_SQLITE = 2.0
GOAL_VS_MEMORY = 1.0
GOAL_CPU_MS = 1.5
GOAL_RSS_MIB = 2.0
GOAL_RATIO_P50 = 4.0
GOAL_MESSAGES = 12  # NATS messages per step, all service connections, both ways
GOAL_ROUND_TRIPS = 5  # sequential round trips per model step (bench/hops.py)
RARE_CONFLICTS = 0.05  # run-state compare-and-set conflicts per step: "rare" (#23)
HOP_FIGURES = ("sequential", "round_trips", "deliveries")
RUN_TIMEOUT = 30.0  # one research run, sequential
BURST_TIMEOUT = 60.0  # one round of concurrent runs
PHASE_SECONDS = 60.0  # any sequential phase

# The simulator with no latency at all: decode_tps <= 0 skips the per-token
# sleep and an infinite prefill rate makes the prefill sleep asyncio.sleep(0).
# Background intervals back at their production defaults (the test harness
# shortens them), logs at WARNING.
ENV = {
    "BATON_ENGINE": "sim",
    "BATON_SIM_DECODE_TPS": "0",
    "BATON_SIM_PREFILL_TPS": "inf",
    "BATON_HEARTBEAT_INTERVAL": "2",
    "BATON_PENDING_POLL_INTERVAL": "5",
    "BATON_LOG_LEVEL": "WARNING",
}

STEP_INCLUDES = (
    "the orchestrator's compare-and-set of the run state recording the dispatch, its "
    "`step started` event and the job publish (JetStream, acked), the worker's pull, "
    "its context-window request, the simulator (zero latency), the worker's `answer` "
    "request (the context store appends the answer, publishes the last token delta and "
    "then the result), the orchestrator's pull of the result and its KV reads up to the "
    "compare-and-set that records it"
)


def _q(values: list[float], scale: float, nd: int = 1) -> dict[str, float]:
    """p50 / p99 / mean (nearest rank) of ``values`` times ``scale``."""
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0, "n": 0}
    return {
        "p50": round(pct(values, 0.5) * scale, nd),
        "p99": round(pct(values, 0.99) * scale, nd),
        "mean": round(statistics.fmean(values) * scale, nd),
        "n": len(values),
    }


class Runner:
    """Submits research tasks with nats-py + msgpack and learns their end
    from a core subscription on the tenant's events (no JetStream consumer
    per task, so the client adds as little load as it can)."""

    def __init__(self, nc: NATS, orchestrator_url: str, tenant: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.url = orchestrator_url
        self.tenant = tenant
        self.ends: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.steps_done = 0  # `step done` events seen (every run of the tenant)

    async def start(self) -> None:
        await self.nc.subscribe(f"baton.events.{self.tenant}.*", cb=self._on_event)

    async def _on_event(self, msg: Msg) -> None:
        ev = msgpack.unpackb(msg.data)
        if ev.get("type") == "step" and ev.get("status") == "done" and not ev.get("call"):
            self.steps_done += 1
        fut = self.ends.get(ev.get("task_id", ""))
        if ev.get("type") in ("completed", "failed") and fut is not None and not fut.done():
            fut.set_result(ev)

    async def submit(self, text: str) -> str:
        task_id = uid("r")
        self.ends[task_id] = asyncio.get_running_loop().create_future()
        body = {"tenant": self.tenant, "input": text, "task_id": task_id}
        await self.js.publish(f"baton.tasks.{self.tenant}.{WORKFLOW}", msgpack.packb(body),
                              headers={"Nats-Msg-Id": task_id})  # fmt: skip
        return task_id

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        return await asyncio.wait_for(asyncio.shield(self.ends[task_id]), timeout)

    def _get(self, task_id: str) -> dict[str, Any]:
        url = f"{self.url}/v1/tasks/{task_id}?tenant={self.tenant}"
        with urllib.request.urlopen(url, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    async def state(self, task_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._get, task_id)


class Primitives:
    """Raw round trips measured from the benchmark process: core NATS
    request-reply to a trivial responder on another connection, a JetStream
    publish (acked), a KV get and a KV compare-and-set update."""

    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.kv = kv
        self.rtt: list[float] = []
        self.js_publish: list[float] = []
        self.kv_get: list[float] = []
        self.kv_update: list[float] = []
        self._rev = 0

    async def setup(self) -> None:
        self._rev = await self.kv.put("run", b"x" * 1024)

    async def rtt_chunk(self, n: int, keep: bool = True) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            await self.nc.request("bench.echo", RTT_PAYLOAD, timeout=2)
            if keep:
                self.rtt.append(time.perf_counter() - t0)

    async def js_chunk(self, n: int, keep: bool = True) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            await self.js.publish("bench.js.x", RTT_PAYLOAD)
            t1 = time.perf_counter()
            entry = await self.kv.get("run")
            t2 = time.perf_counter()
            assert entry.revision is not None
            self._rev = await self.kv.update("run", b"x" * 1024, last=entry.revision)
            t3 = time.perf_counter()
            if keep:
                self.js_publish.append(t1 - t0)
                self.kv_get.append(t2 - t1)
                self.kv_update.append(t3 - t2)


class Taps:
    """Core subscriptions that timestamp, on arrival in this process, the
    jobs, results and context requests of a run (correlated by job id)."""

    def __init__(self) -> None:
        self.job_seen: dict[str, float] = {}
        self.job_published: dict[str, float] = {}
        self.result_seen: dict[str, float] = {}
        self.results: dict[str, InferenceResult] = {}
        self.window_seen: dict[str, float] = {}
        self.append_seen: dict[str, float] = {}

    async def start(self, nc: NATS, tenant: str) -> list[Subscription]:
        async def on_job(msg: Msg) -> None:
            now = time.time()
            job = codec.decode(msg.data, InferenceJob)
            self.job_seen.setdefault(job.job_id, now)
            self.job_published.setdefault(job.job_id, job.published_at)

        async def on_result(msg: Msg) -> None:
            now = time.time()
            res = codec.decode(msg.data, InferenceResult)
            self.result_seen.setdefault(res.job_id, now)
            self.results.setdefault(res.job_id, res)

        async def on_window(msg: Msg) -> None:
            now = time.time()
            req = codec.decode(msg.data, WindowRequest)
            if req.done_msg_id:
                self.window_seen.setdefault(req.done_msg_id.removesuffix(":out"), now)

        async def on_append(msg: Msg) -> None:
            now = time.time()
            req = codec.decode(msg.data, ContextAnswer)
            if req.result is not None:  # a model step's answer, not a tool's output
                self.append_seen.setdefault(req.result.job_id, now)

        return [
            await nc.subscribe("baton.jobs.>", cb=on_job),
            await nc.subscribe(f"baton.results.{tenant}.>", cb=on_result),
            await nc.subscribe(f"baton.ctx.window.{tenant}", cb=on_window),
            await nc.subscribe(f"baton.ctx.answer.{tenant}", cb=on_append),
        ]

    def segments(self, tenant: str, task_id: str, steps: dict[str, Any]) -> list[dict[str, float]]:
        """Each tapped step's timeline, cut into ``SEGMENTS`` (seconds)."""
        out: list[dict[str, float]] = []
        seen = (self.job_seen, self.result_seen, self.window_seen, self.append_seen)
        for step_id, st in steps.items():
            job_id = f"{tenant}.{task_id}.{step_id}"
            if st.get("status") != "done" or any(job_id not in d for d in seen):
                continue
            res = self.results[job_id]
            started = self.job_published[job_id] + res.queue_seconds
            gen_end = started + res.usage.gpu_seconds
            out.append({
                "dispatch": self.job_seen[job_id] - st["dispatched_at"],
                "to_worker": self.window_seen[job_id] - self.job_seen[job_id],
                "window": started - self.window_seen[job_id],
                "engine": res.usage.gpu_seconds,
                "append": self.append_seen[job_id] - gen_end,
                "result": self.result_seen[job_id] - self.append_seen[job_id],
                "record": st["finished_at"] - self.result_seen[job_id],
            })  # fmt: skip
        return out


SEGMENTS = {
    "dispatch": "orchestrator: run-state CAS, `step started` event, job publish",
    "to_worker": "JetStream delivery to the worker's pull, until its window request",
    "window": "context window round trip (+ admission) until generation starts",
    "engine": "simulator generation (zero latency)",
    "append": "generation end until the worker's `answer` request",
    "result": "the store's append (and last delta), then its result publish",
    "record": "orchestrator: result pull, run-state KV reads, until recorded",
}


def _text(i: int) -> str:
    return f"Question {i}: how should the cache and the queue share work in design {i}?"


async def _sequential(
    runner: Runner,
    n: int,
    between: Callable[[], Awaitable[None]] | None,
    offset: int,
) -> list[tuple[str, dict[str, Any], float]]:
    """``n`` runs one at a time; (task id, run state, client-seen seconds)."""
    done: list[tuple[str, dict[str, Any], float]] = []
    deadline = time.monotonic() + PHASE_SECONDS
    for i in range(n):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        task_id = await runner.submit(_text(offset + i))
        end = await runner.wait(task_id, RUN_TIMEOUT)
        wall = time.perf_counter() - t0
        if end["type"] != "completed":
            raise RuntimeError(f"research run {task_id} failed: {end}")
        done.append((task_id, await runner.state(task_id), wall))
        if between is not None:
            await between()
    return done


async def conflicts(url: str) -> float:
    """Run-state writes of ``research`` runs that lost their compare-and-set
    so far (the orchestrator's ``baton_run_write_conflicts_total``)."""
    name, wf = "baton_run_write_conflicts_total", WORKFLOW
    return await asyncio.to_thread(metric, url, name, workflow=wf)


def _contention(runs: int, steps: int, lost: float) -> dict[str, Any]:
    return {"conflicts": int(lost), "conflicts_per_run": round(lost / max(1, runs), 3),
            "conflicts_per_step": round(lost / max(1, steps), 4)}  # fmt: skip


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _messages(monitor: int | None) -> dict[str, tuple[int, int]]:
    """Messages each named connection sent and received so far (nats-server's
    /connz: in_msgs, out_msgs); empty without a monitoring port."""
    if monitor is None:
        return {}
    url = f"http://127.0.0.1:{monitor}/connz?limit=1024"
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.loads(r.read())
    return {c["name"]: (c["in_msgs"], c["out_msgs"]) for c in doc["connections"] if c.get("name")}


async def _burst(
    runner: Runner,
    total: int,
    offset: int,
    pids: dict[str, int],
    monitor: int | None = None,
    tap: KindTap | None = None,
) -> dict[str, Any]:
    """``total`` runs, ``CONCURRENT`` in flight at once; CPU seconds of each
    process in ``pids`` over the same window. ``tap``: every message sorted
    by kind too (its own CPU then shares the box: not a measured round)."""
    slots = asyncio.Semaphore(CONCURRENT)
    deadline = time.monotonic() + BURST_TIMEOUT

    async def one(i: int) -> tuple[str, str]:
        async with slots:
            task_id = await runner.submit(_text(offset + i))
            end = await runner.wait(task_id, max(1.0, deadline - time.monotonic()))
            return task_id, end["type"]

    msgs0 = await asyncio.to_thread(_messages, monitor)
    if tap is not None:
        await tap.start(runner.nc)
    lost0 = await conflicts(runner.url)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    ends = await asyncio.gather(*(one(i) for i in range(total)))
    wall = time.perf_counter() - t0
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    if tap is not None:
        await runner.nc.flush()
        await tap.stop()
    msgs1 = await asyncio.to_thread(_messages, monitor)
    lost = await conflicts(runner.url) - lost0  # counted before each run's terminal event
    states = [await runner.state(t) for t, _ in ends]
    steps = sum(len(s.get("steps", {})) for s in states)
    baton = sum(v for k, v in cpu.items() if k != "nats-server")
    return {
        "runs": total,
        "in_flight": CONCURRENT,
        "completed": sum(kind == "completed" for _, kind in ends),
        "steps": steps,
        "wall_s": round(wall, 3),
        "steps_per_s": round(steps / wall, 1),
        "runs_per_s": round(total / wall, 2),
        "cpu_ms_per_step": {k: round(v / steps * 1e3, 3) for k, v in cpu.items()},
        **_contention(total, steps, lost),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # the box is shared: context for the CPU
        "cpu_ms_per_step_services": round(baton / steps * 1e3, 3),
        "cpu_ms_per_step_with_nats": round(sum(cpu.values()) / steps * 1e3, 3),
        # per service connection: messages it sent, messages it was sent, per step
        "messages_per_step": {
            name: [round((msgs1[name][i] - msgs0[name][i]) / steps, 2) for i in (0, 1)]
            for name in msgs1
            if name in msgs0 and name in SERVICE_CONNECTIONS
        },
        # nats-server's row: the mirror image of the services' (a check on the tap)
        **({"messages_by_kind": tap.per_step(steps, TALLIED)} if tap else {}),
    }


def _peer_available() -> str | None:
    """None when the LangGraph peer can run, else why not."""
    for name in ("langgraph", "langgraph.checkpoint.sqlite"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"not installed ({name}): pip install -e '.[bench]'"
    return None


async def _peer(mode: str, work: Path) -> dict[str, Any]:
    """One round of the LangGraph peer, in its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.peer_langgraph", mode, str(PEER_RUNS[mode]),
        str(CONCURRENT), str(work),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PEER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"langgraph peer ({mode}) failed: {err.decode()[-2000:]}")
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return doc


async def _rss_curve(runner: Runner, pid: int, total: int) -> list[dict[str, float]]:
    """Runs kept ``CONCURRENT`` in flight until ``total`` more steps are
    done; the orchestrator's RSS every ``RSS_EVERY`` steps."""
    base = runner.steps_done
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + RSS_TIMEOUT
    stop = asyncio.Event()
    counter = iter(range(10**9))

    async def loop() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            task_id = await runner.submit(_text(100_000 + next(counter)))
            end = await runner.wait(task_id, BURST_TIMEOUT)
            runner.ends.pop(task_id, None)
            if end["type"] != "completed":
                raise RuntimeError(f"research run {task_id} failed: {end}")

    async def sample() -> None:
        nxt = RSS_EVERY
        while nxt <= total and time.monotonic() < deadline:
            if runner.steps_done - base >= nxt:
                samples.append({"steps": nxt, "rss_mib": round(rss_mib(pid), 2)})
                nxt += RSS_EVERY
            await asyncio.sleep(0.05)
        stop.set()

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(loop() for _ in range(CONCURRENT)))
    await sampler
    return samples


def _step_latencies(runs: list[tuple[str, dict[str, Any], float]]) -> list[float]:
    return [
        st["finished_at"] - st["dispatched_at"]
        for _, state, _ in runs
        for st in state["steps"].values()
        if st.get("status") == "done"
    ]


def _between_steps(runs: list[tuple[str, dict[str, Any], float]]) -> list[float]:
    """The last answer recorded -> the next step dispatched: orchestration
    outside the step figure (the `step done` event, the next dispatch's KV
    read). Parallel siblings, dispatched together, are skipped."""
    gaps: list[float] = []
    for _, state, _ in runs:
        steps = sorted(state["steps"].values(), key=lambda s: s["dispatched_at"])
        recorded = steps[0]["finished_at"] if steps else 0.0
        for st in steps[1:]:
            if st["dispatched_at"] >= recorded:
                gaps.append(st["dispatched_at"] - recorded)
            recorded = max(recorded, st["finished_at"])
    return gaps


async def _main(work: Path) -> dict[str, Any]:
    monitor = free_port()
    server = secure_nats(work / "nats", monitor_port=monitor).start()
    stack = LocalStack(server, work / "stack", env=ENV)
    nc: NATS | None = None
    responder: NATS | None = None
    try:
        await asyncio.to_thread(stack.start, 1)
        nc = await connect_nats(server.url, name="bench-orchestrator")
        responder = await connect_nats(server.url, name="bench-echo")

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("bench.echo", cb=echo)
        await responder.flush()
        js = nc.jetstream()
        await js.add_stream(name="BENCH_JS", subjects=["bench.js.>"], max_msgs=10_000)
        kv = await js.create_key_value(bucket="bench-kv", history=1)
        prim = Primitives(nc, kv)
        await prim.setup()

        # Warm-up: connections, consumers, the worker's direct consumer routing.
        tenant = "acme"
        runner = Runner(nc, stack.orchestrator.url, tenant)
        await runner.start()
        await _sequential(runner, WARMUP_RUNS, None, 10_000)
        await prim.rtt_chunk(200, keep=False)
        await prim.js_chunk(50, keep=False)

        # 1. Sequential runs, raw round trips interleaved between them.
        rtt_chunk = -(-RTT_SAMPLES // SEQUENTIAL_RUNS)
        js_chunk = -(-PRIMITIVE_SAMPLES // SEQUENTIAL_RUNS)

        async def interleave() -> None:
            await prim.rtt_chunk(min(rtt_chunk, RTT_SAMPLES - len(prim.rtt)))
            await prim.js_chunk(min(js_chunk, PRIMITIVE_SAMPLES - len(prim.js_publish)))

        lost0 = await conflicts(stack.orchestrator.url)
        seq = await _sequential(runner, SEQUENTIAL_RUNS, interleave, 0)
        seq_lost = await conflicts(stack.orchestrator.url) - lost0
        step_s = _step_latencies(seq)
        step_ms, rtt_us = _q(step_s, 1e3, 2), _q(prim.rtt, 1e6)

        # 2. Where the time goes: more sequential runs with the bus tapped.
        taps = Taps()
        tap_tenant = "globex"
        tap_subs = await taps.start(nc, tap_tenant)
        hop_tap = HopTap()
        await hop_tap.start(nc)
        tap_runner = Runner(nc, stack.orchestrator.url, tap_tenant)
        await tap_runner.start()
        tapped = await _sequential(tap_runner, TAP_RUNS, None, 20_000)
        for sub in tap_subs:
            await sub.unsubscribe()
        await hop_tap.stop()
        hops = hop_tap.steps(tapped)
        by_segment: dict[str, list[float]] = {k: [] for k in SEGMENTS}
        for task_id, state, _ in tapped:
            for seg in taps.segments(tap_tenant, task_id, state["steps"]):
                for k, v in seg.items():
                    by_segment[k].append(v)
        breakdown = {k: _q(v, 1e3, 2) for k, v in by_segment.items()}

        # 3. Throughput and CPU per step: CONCURRENT runs in flight, rounds
        # interleaved with the LangGraph peer.
        pids = {p.name: p.proc.pid for p in stack.procs if p.proc is not None}
        assert server.proc is not None
        pids["nats-server"] = server.proc.pid
        peer_missing = _peer_available()
        bursts, peers = [], []
        for r in range(BURST_ROUNDS):
            bursts.append(await _burst(runner, BURST_RUNS, 30_000 + 1000 * r, pids, monitor))
            if peer_missing is None:
                peers.append({mode: await _peer(mode, work) for mode in PEER_RUNS})

        # Which messages make a step: one more round, every message tapped.
        tallied = await _burst(runner, BURST_RUNS, 40_000, pids, monitor, KindTap())

        # 4. The orchestrator's memory as steps accumulate.
        rss_steps = RSS_STEPS_LONG if os.environ.get("BATON_BENCH_LONG") == "1" else RSS_STEPS
        rss = await _rss_curve(runner, stack.orchestrator.proc.pid, rss_steps)  # type: ignore[union-attr]
    finally:
        for conn in (nc, responder):
            if conn is not None:
                with contextlib.suppress(Exception):  # best effort; the server goes next
                    await conn.close()
        await asyncio.to_thread(stack.stop)
        server.stop()

    per_run = Counter(len(state["steps"]) for _, state, _ in seq)
    ratio_p50 = step_ms["p50"] / (rtt_us["p50"] / 1e3)
    ratio_p99 = step_ms["p99"] / (rtt_us["p99"] / 1e3)
    return {
        "machine": f"{os.cpu_count()} cores; nats-server, 3 service processes, 1 sim worker",
        "engine": "sim, zero latency (BATON_SIM_DECODE_TPS=0, BATON_SIM_PREFILL_TPS=inf)",
        "workflow": WORKFLOW,
        "sequential_runs": len(seq),
        "steps_measured": len(step_s),
        "steps_per_run": {str(k): v for k, v in sorted(per_run.items())},
        "step_ms": step_ms,
        "rtt_payload_bytes": len(RTT_PAYLOAD),
        "rtt_us": rtt_us,
        "ratio_step_to_rtt_p50": round(ratio_p50, 1),
        "ratio_step_to_rtt_p99": round(ratio_p99, 1),
        "goal_ratio_p50": GOAL_RATIO_P50,
        "goal_met": ratio_p50 <= GOAL_RATIO_P50,
        "primitives_us": {
            "js_publish_acked": _q(prim.js_publish, 1e6),
            "kv_get": _q(prim.kv_get, 1e6),
            "kv_update_cas": _q(prim.kv_update, 1e6),
        },
        "sequential_contention": _contention(
            len(seq), sum(len(s["steps"]) for _, s, _ in seq), seq_lost
        ),
        "conflicts_per_step": round(statistics.median(b["conflicts_per_step"] for b in bursts), 4),
        "conflicts_per_run": round(statistics.median(b["conflicts_per_run"] for b in bursts), 3),
        "between_steps_ms": _q(_between_steps(seq), 1e3, 2),
        "run_ms": _q([w for _, _, w in seq], 1e3, 1),
        "breakdown_runs": len(tapped),
        "breakdown_ms": breakdown,
        "breakdown_step_ms": _q(_step_latencies(tapped), 1e3, 2),
        # per step that ran alone, from a tap on every message (bench/hops.py)
        "hops_steps": len(hops),
        **{f"hops_{k}": _q([float(h[k]) for h in hops], 1.0, 1) for k in HOP_FIGURES},
        "concurrent": CONCURRENT,
        "bursts": bursts,
        # one more round with every message tapped: which messages make a step
        # (bench/tally.py), beside /connz's totals for the same round
        "messages_by_kind": tallied["messages_by_kind"],
        "messages_tallied_round": tallied["messages_per_step"],
        "steps_per_s": round(statistics.median(b["steps_per_s"] for b in bursts), 1),
        "cpu_ms_per_step": round(
            statistics.median(b["cpu_ms_per_step_services"] for b in bursts), 3
        ),
        "cpu_ms_per_step_with_nats": round(
            statistics.median(b["cpu_ms_per_step_with_nats"] for b in bursts), 3
        ),
        **_versus(bursts, peers, peer_missing),
        "rss": rss,
        **_rss_summary(rss),
    }


def _versus(
    bursts: list[dict[str, Any]], peers: list[dict[str, Any]], missing: str | None
) -> dict[str, Any]:
    """Baton against the peer, round by round (median of the rounds' ratios)."""
    if missing is not None:
        return {"peer": None, "peer_missing": missing}
    out: dict[str, Any] = {"peer": "langgraph", "peer_rounds": peers}
    for mode in PEER_RUNS:
        pairs = zip(bursts, peers, strict=True)
        ratios = [b["steps_per_s"] / p[mode]["steps_per_s"] for b, p in pairs]
        out[f"vs_{mode}"] = round(statistics.median(ratios), 3)
        out[f"vs_{mode}_rounds"] = [round(x, 3) for x in ratios]
        out[f"peer_{mode}_steps_per_s"] = round(
            statistics.median(p[mode]["steps_per_s"] for p in peers), 1
        )
        out[f"peer_{mode}_cpu_ms_per_step"] = round(
            statistics.median(p[mode]["cpu_ms_per_step"] for p in peers), 3
        )
    return out


def _rss_summary(rss: list[dict[str, float]]) -> dict[str, Any]:
    by = {int(x["steps"]): x["rss_mib"] for x in rss}
    lo = by.get(10_000)
    hi = by.get(RSS_STEPS_LONG)
    return {
        "rss_mib_at_10k": lo,
        "rss_mib_at_50k": hi,
        "rss_growth_10k_50k_mib": round(hi - lo, 2) if lo is not None and hi is not None else None,
    }


def run(work: Path) -> dict[str, Any]:
    """Run the benchmark in ``work`` (a scratch directory)."""
    return asyncio.run(_main(work))


HOPS = (
    "run-state CAS, then the `step started` event and the job publish together (orchestrator,"
    " their acks awaited at once); JetStream delivery, window request, `answer` request (worker;"
    " in the context store the answer's append and the last token delta's publish together,"
    " then the result's publish, whose ack is the worker's reply); JetStream delivery,"
    " run-state CAS (orchestrator; its KV reads come from its cache when it wrote the run last)"
)


def markdown(r: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for these results."""
    s, t, p, b = r["step_ms"], r["rtt_us"], r["primitives_us"], r["breakdown_ms"]
    bs = r["breakdown_step_ms"]
    met = "met" if r["goal_met"] else f"**missed** ({r['ratio_step_to_rtt_p50']}x)"
    per_run = ", ".join(f"{n} steps: {c}" for n, c in r["steps_per_run"].items())
    rounds = " / ".join(f"{x['steps_per_s']:.0f}" for x in r["bursts"])
    burst = r["bursts"][0]
    seg_rows = [
        f"| {name} | {desc} | {b[name]['p50']:.2f} | {b[name]['p99']:.2f} |"
        for name, desc in SEGMENTS.items()
    ]
    seg_sum = sum(b[name]["p50"] for name in SEGMENTS)
    pulls = ("to_worker", "record")
    stalled = max(b[k]["p99"] for k in pulls) > max(20.0, 10 * max(b[k]["p50"] for k in pulls))
    if stalled:
        tail = (
            f"The segments' p50s add up to {seg_sum:.1f} ms against a p50 of"
            f" {bs['p50']:.1f} ms for the same tapped steps: the rest is time delivered"
            " messages wait inside pulls,"
            f" `to_worker` and `record` reaching {b['to_worker']['p99']:.0f} and"
            f" {b['record']['p99']:.0f} ms at p99. The idle pull loops (the orchestrator's"
            " `Bus.consume`, the worker's `pull`) fetch a batch with a 1 s timeout; when a"
            " late 408 from the previous, expired pull request reaches a new batch fetch,"
            " nats-py sends a second pull request that outlives the fetch, and the next"
            " message delivered to it waits for the rest of that batch, up to the fetch"
            " timeout. Fetching one message while idle removes the wait."
        )
    else:
        tail = (
            f"The segments' p50s add up to {seg_sum:.1f} ms against a p50 of"
            f" {bs['p50']:.1f} ms for the same tapped steps; no pull waits beyond its p50 by"
            " more than 10x at p99."
        )
    return "\n".join([
        "## Orchestrator",
        "",
        f"{r['machine']}; engine: {r['engine']}. `{r['workflow']}` runs submitted one at a"
        f" time; {r['rtt_us']['n']:,} raw request-reply round trips ({r['rtt_payload_bytes']}"
        "-byte payload, nats-py to a trivial responder on a second connection) interleaved"
        " between those runs in the same run.",
        "",
        "| measure | result | goal |",
        "| --- | --- | --- |",
        f"| step latency p50 / p99 | {s['p50']:.2f} ms / {s['p99']:.2f} ms | |",
        f"| raw NATS request-reply p50 / p99 | {t['p50']:.0f} µs / {t['p99']:.0f} µs | |",
        f"| step / round trip, p50 (p99) | {r['ratio_step_to_rtt_p50']}x"
        f" ({r['ratio_step_to_rtt_p99']}x) | ≤ {r['goal_ratio_p50']:.0f}x at p50: {met} |",
        f"| steps per second, {burst['in_flight']} runs in flight | {r['steps_per_s']:.0f}"
        f" (rounds of {burst['runs']} runs: {rounds}) | reported |",
        *_peer_rows(r),
        f"| whole `{r['workflow']}` run, sequential, p50 / p99 | {r['run_ms']['p50']:.0f} ms /"
        f" {r['run_ms']['p99']:.0f} ms | reported |",
        f"| runs measured | {r['sequential_runs']} sequential ({r['steps_measured']} steps;"
        f" {per_run}), {r['breakdown_runs']} tapped, {len(r['bursts'])} x"
        f" {burst['runs']} concurrent | |",
        "",
        f"A step is `finished_at - dispatched_at` in the run state: {STEP_INCLUDES}."
        f" Between the last answer recorded and the next dispatch the orchestrator spends"
        f" another {r['between_steps_ms']['p50']:.2f} ms (p50), outside the step figure.",
        "",
        f"A step is about nine hops in sequence, each at least one round trip: {HOPS}"
        f" (this section's figures were measured {r.get('measured_at', '')}; the short round"
        " below, `python -m bench steppath`, measures the path as it is now beside another"
        " checkout's)."
        " Measured in the same run from the benchmark process: a JetStream publish with its"
        f" ack p50 {p['js_publish_acked']['p50']:.0f} µs, a KV get"
        f" {p['kv_get']['p50']:.0f} µs, a KV compare-and-set"
        f" {p['kv_update_cas']['p50']:.0f} µs. Even at one raw round trip per hop a step"
        " would be about 9x; ≤ 4x needs fewer hops, not faster ones. Where a step's time"
        f" goes, from core-NATS taps on {r['breakdown_runs']} more sequential runs (one"
        " clock, ms):",
        "",
        "| segment | what | p50 | p99 |",
        "| --- | --- | ---: | ---: |",
        *seg_rows,
        "",
        tail,
        *_peer_notes(r),
    ])  # fmt: skip


def _loads(r: dict[str, Any]) -> str:
    return " / ".join(f"{b.get('loadavg_1m', 0):.1f}" for b in r["bursts"])


def _met(ok: bool, shown: str) -> str:
    return "met" if ok else f"**missed** ({shown})"


def _peer_rows(r: dict[str, Any]) -> list[str]:
    cpu, cpu_n = r["cpu_ms_per_step"], r["cpu_ms_per_step_with_nats"]
    rows = []
    if r.get("peer"):
        vs_s, vs_m = r["vs_sqlite"], r["vs_memory"]
        rows += [
            f"| LangGraph + AsyncSqliteSaver (durable), steps per second | "
            f"{r['peer_sqlite_steps_per_s']:.0f} | |",
            f"| LangGraph in memory, 32 concurrent `ainvoke`, steps per second | "
            f"{r['peer_memory_steps_per_s']:.0f} | |",
            f"| Baton / LangGraph + SQLite, steps per second (rounds) | {vs_s:.2f}x"
            f" ({', '.join(f'{x:.2f}' for x in r['vs_sqlite_rounds'])}) |"
            f" ≥ {GOAL_VS_SQLITE:.0f}x: {_met(vs_s >= GOAL_VS_SQLITE, f'{vs_s:.2f}x')} |",
            f"| Baton / LangGraph in memory, steps per second (rounds) | {vs_m:.2f}x"
            f" ({', '.join(f'{x:.2f}' for x in r['vs_memory_rounds'])}) |"
            f" ≥ {GOAL_VS_MEMORY:.0f}x: {_met(vs_m >= GOAL_VS_MEMORY, f'{vs_m:.2f}x')} |",
        ]
    else:
        rows.append(f"| LangGraph peer | {r['peer_missing']} | |")
    lg = r.get("peer_sqlite_cpu_ms_per_step")
    cpu_ok = cpu <= GOAL_CPU_MS and (lg is None or cpu <= lg)
    per = r["bursts"][0]["cpu_ms_per_step"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in per.items())
    rows += [
        f"| CPU per step, Baton's 3 service processes (with nats-server) | {cpu:.2f} ms"
        f" ({cpu_n:.2f} ms; round 1: {parts}) | ≤ {GOAL_CPU_MS} ms and ≤ LangGraph + SQLite's:"
        f" {_met(cpu_ok, f'{cpu:.2f} ms')} |",
    ]
    msgs = r["bursts"][0].get("messages_per_step") or {}
    if msgs:
        total = sum(a + b for a, b in msgs.values())
        parts = ", ".join(f"{k} {a:.1f} / {b:.1f}" for k, (a, b) in msgs.items())
        rows.append(f"| NATS messages per step, sent / received (round 1) | {total:.0f} in all:"
                    f" {parts} | ≤ {GOAL_MESSAGES}: {_met(total <= GOAL_MESSAGES, f'{total:.0f}')}"
                    " |")  # fmt: skip
    kinds = r.get("messages_by_kind") or {}
    if kinds:
        rows.append("| what a step's messages are, per step (one more round, every message"
                    f" tapped: `bench/tally.py`; JSON `messages_by_kind`) | {_top_kinds(kinds)}"
                    " | |")  # fmt: skip
    lone = r.get("sequential_contention")
    if lone is not None:
        rounds = ", ".join(f"{b['conflicts_per_step']:.3f}" for b in r["bursts"])
        worst = max(lone["conflicts_per_step"], r["conflicts_per_step"])
        rows.append(f"| run-state compare-and-set conflicts per `research` run (per step): one"
                    f" run at a time; {CONCURRENT} in flight, median of rounds |"
                    f" {lone['conflicts_per_run']:.2f} ({lone['conflicts_per_step']:.3f});"
                    f" {r['conflicts_per_run']:.2f} ({r['conflicts_per_step']:.3f}; rounds"
                    f" {rounds}) | rare, ≤ {RARE_CONFLICTS} per step:"
                    f" {_met(worst <= RARE_CONFLICTS, f'{worst:.3f}')} |")  # fmt: skip
    seq = r.get("hops_sequential")
    if seq:
        rt, dl, p50 = r["hops_round_trips"], r["hops_deliveries"], seq["p50"]
        rows.append(f"| sequential round trips per model step, p50 (mean; {r['hops_steps']} steps"
                    f" that ran alone, tapped) | {seq['p50']:.0f} ({seq['mean']:.1f}; of"
                    f" {rt['mean']:.1f} round trips, and {dl['mean']:.1f} deliveries to pulls) |"
                    f" ≤ {GOAL_ROUND_TRIPS}: {_met(p50 <= GOAL_ROUND_TRIPS, f'{p50:.0f}')}"
                    " |")  # fmt: skip
    if lg is not None:
        rows.append(
            f"| CPU per step, LangGraph + SQLite (LangGraph in memory) | {lg:.2f} ms"
            f" ({r['peer_memory_cpu_ms_per_step']:.2f} ms) | |"
        )
    curve = " → ".join(f"{x['rss_mib']:.1f}" for x in r["rss"])
    growth = r["rss_growth_10k_50k_mib"]
    if growth is None:
        rows.append(f"| orchestrator RSS every {RSS_EVERY:,} steps, MiB | {curve} | 10k → 50k"
                    " flat ± 2 MiB: not measured (`python -m bench orchestrator --long`)"
                    " |")  # fmt: skip
    else:
        ok = abs(growth) <= GOAL_RSS_MIB
        rows.append(f"| orchestrator RSS every {RSS_EVERY:,} steps, MiB | {curve} | 10k → 50k"
                    f" flat ± {GOAL_RSS_MIB:.0f} MiB: {_met(ok, f'{growth:+.1f} MiB')}"
                    " |")  # fmt: skip
    return rows


def _top_kinds(kinds: dict[str, Any], n: int = 6) -> str:
    """Each service's ``n`` biggest kinds of what it sends (each request's
    reply and each publish's ack come back as many)."""
    parts = []
    for name, row in kinds.items():
        if name == SERVER:  # the mirror image of the services' rows
            continue
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(row["sent_by_kind"].items())[:n])
        parts.append(f"{name} sends {row['sent']:.1f} ({top}), receives {row['received']:.1f}")
    return "; ".join(parts)


def _peer_notes(r: dict[str, Any]) -> list[str]:
    if not r.get("peer"):
        return []
    return [
        "",
        "The peer (`bench/peer_langgraph.py`, `pip install -e '.[bench]'`) is the `research`"
        " graph as a LangGraph `StateGraph` — plan → retrieval ‖ coding → validate → plan or"
        " summarize, at most 3 rounds, the validator's verdict a hash of run and round (half"
        " revise) — with a zero-latency fake LLM answering as many words as the simulator."
        f" It runs in its own process, {CONCURRENT} `ainvoke` in flight, rounds interleaved with"
        f" Baton's ({PEER_RUNS['sqlite']} runs with `AsyncSqliteSaver` on local disk, LangGraph's"
        f" default durability `async`; {PEER_RUNS['memory']} without a checkpointer). CPU per"
        " step is utime + stime from `/proc/<pid>/stat` over the measured window: the peer"
        " process's, Baton's summed over orchestrator, context store and worker (nats-server"
        " in brackets); the benchmark's own client is in neither.",
        "",
        f"At {CONCURRENT} in flight Baton is CPU-bound: {r['cpu_ms_per_step_with_nats']:.2f} ms of"
        f" CPU per step with nats-server would cap two otherwise idle cores at about"
        f" {2000 / r['cpu_ms_per_step_with_nats']:.0f} steps/s (the box is shared: the 1-minute"
        f" load average during the rounds was {_loads(r)}), and that CPU is spent per"
        " message (each one a parse, a dispatch and a syscall share in a Python client and in"
        " nats-server), where LangGraph's step is a function call and, with the saver, a"
        " SQLite row. Steps per second follow CPU per step; both move only with fewer"
        " messages per step.",
    ]
