"""A model step's cost in a short round (issue #23): NATS messages per step
(nats-server's ``/connz`` per service connection, and every message sorted
by kind: ``bench/tally.py``), sequential round trips per model step
(``bench/hops.py``) and CPU per step, from the same stack and load as
``python -m bench orchestrator`` (the ``research`` workflow on the
zero-latency simulator, 32 runs in flight) in about a minute instead of
its quarter of an hour (no sequential latencies, peer or RSS curve).

``BATON_BENCH_VERSUS=<checkout>`` measures a second stack beside this one:
the same round against the services of another checkout (e.g. ``/work/main``,
or the commit before a change), each stack on its own nats-server, their
rounds interleaved (this, that, this, that...) so a before / after is one
run on one box. Both stacks run the benchmark process's interpreter; each
service process gets its checkout on ``PYTHONPATH`` and the scratch
directory as its working directory, so neither checkout shadows the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from baton.credentials import Credentials
from baton.dev.testing import LocalStack, connect_nats, secure_nats
from baton.natsd import NatsServer, free_port
from bench.hops import HopTap
from bench.orchestrator import (
    ENV,
    SERVICE_CONNECTIONS,
    TALLIED,
    Runner,
    _burst,
    _q,
    _sequential,
    _top_kinds,
)
from bench.tally import KindTap

ROOT = Path(__file__).resolve().parents[1]
VERSUS = "BATON_BENCH_VERSUS"
WARMUP_RUNS = 3
TAP_RUNS = 15  # sequential runs with every message tapped (hops)
ROUNDS = 3  # per stack, interleaved
ROUND_RUNS = 120  # research runs per round, 32 in flight
HOP_FIGURES = ("sequential", "round_trips", "deliveries")


@dataclass
class Side:
    """One stack under measurement: its checkout, server, services, client."""

    label: str
    root: Path
    server: NatsServer | None = None
    stack: LocalStack | None = None
    nc: NATS | None = None
    runner: Runner | None = None
    monitor: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    hops: list[dict[str, int]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    tallied: dict[str, Any] = field(default_factory=dict)

    async def start(self, work: Path) -> None:
        self.monitor = free_port()
        self.server = secure_nats(work / self.label / "nats", monitor_port=self.monitor)
        _configured_by(self.server, self.root)
        self.server.start()
        env = {**ENV, "PYTHONPATH": str(self.root)}
        self.stack = LocalStack(self.server, work / self.label / "stack", env=env)
        await asyncio.to_thread(self.stack.start, 1)
        self.nc = await connect_nats(self.server.url, name=f"bench-steppath-{self.label}")
        self.runner = Runner(self.nc, self.stack.orchestrator.url, "acme")
        await self.runner.start()
        await _sequential(self.runner, WARMUP_RUNS, None, 10_000)
        self.pids = {p.name: p.proc.pid for p in self.stack.procs if p.proc is not None}
        assert self.server.proc is not None
        self.pids["nats-server"] = self.server.proc.pid

    async def tap_hops(self) -> None:
        assert self.nc is not None and self.runner is not None
        tap = HopTap()
        await tap.start(self.nc)
        runs = await _sequential(self.runner, TAP_RUNS, None, 20_000)
        await self.nc.flush()
        await tap.stop()
        self.hops = tap.steps(runs)

    async def round(self, i: int) -> None:
        assert self.runner is not None
        self.rounds.append(await _burst(self.runner, ROUND_RUNS, 30_000 + 1000 * i, self.pids,
                                        self.monitor))  # fmt: skip

    async def tally(self) -> None:
        assert self.runner is not None
        self.tallied = await _burst(self.runner, ROUND_RUNS, 40_000, self.pids, self.monitor,
                                    KindTap())  # fmt: skip

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.stack is not None:
            await asyncio.to_thread(self.stack.stop)
        if self.server is not None:
            self.server.stop()

    def result(self) -> dict[str, Any]:
        def median(key: str) -> float:
            return round(statistics.median(r[key] for r in self.rounds), 3)

        per_round = [sum(a + b for a, b in r["messages_per_step"].values()) for r in self.rounds]
        git = ["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"]
        head = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
        return {
            "checkout": str(self.root),
            "commit": head,
            "hops_steps": len(self.hops),
            **{f"hops_{k}": _q([float(h[k]) for h in self.hops], 1.0, 1) for k in HOP_FIGURES},
            "messages_per_step": round(statistics.median(per_round), 1),
            "messages_per_step_rounds": [round(x, 1) for x in per_round],
            "messages_per_step_by_service": self.rounds[0]["messages_per_step"],
            "cpu_ms_per_step": median("cpu_ms_per_step_services"),
            "cpu_ms_per_step_with_nats": median("cpu_ms_per_step_with_nats"),
            "cpu_ms_per_step_rounds": [r["cpu_ms_per_step_with_nats"] for r in self.rounds],
            "steps_per_s": median("steps_per_s"),
            "rounds": self.rounds,
            "messages_by_kind": self.tallied.get("messages_by_kind", {}),
        }


def _configured_by(server: NatsServer, root: Path) -> None:
    """Have ``root``'s code write ``server``'s configuration and ``.creds``:
    each service identity's permissions are its checkout's (a change may
    move one), the keys the same files this process reads."""
    code = (
        "import sys; from pathlib import Path; from baton.dev.testing import secure_nats; "
        "s = secure_nats(Path(sys.argv[1]), monitor_port=int(sys.argv[3])); "
        "s.port = int(sys.argv[2]); s._write_config()"
    )

    def write() -> None:
        args = [str(server.store_dir), str(server.port), str(server.monitor_port)]
        subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=server.store_dir,
                       env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
        assert server.auth is not None and server.auth.credentials.data_dir is not None
        server.auth.credentials = Credentials.load_or_create(server.auth.credentials.data_dir, [])

    server._write_config = write  # type: ignore[method-assign]


async def _main(work: Path) -> dict[str, Any]:
    # The services' working directory is the scratch one: ``python -m``
    # puts it first on their path, where this checkout would shadow another.
    os.chdir(work)
    sides = [Side("this", ROOT)]
    other = os.environ.get(VERSUS)
    if other:
        sides.append(Side("versus", Path(other)))  # an absolute path
    try:
        for s in sides:
            await s.start(work)
        for s in sides:
            await s.tap_hops()
        for i in range(ROUNDS):
            for s in sides:
                await s.round(i)
        for s in sides:
            await s.tally()
    finally:
        for s in sides:
            await s.stop()
    return {
        "machine": f"{os.cpu_count()} cores; per stack: nats-server, 3 service processes, 1 sim "
        "worker",
        "engine": "sim, zero latency (BATON_SIM_DECODE_TPS=0, BATON_SIM_PREFILL_TPS=inf)",
        "workflow": "research",
        "rounds": ROUNDS,
        "round_runs": ROUND_RUNS,
        "tap_runs": TAP_RUNS,
        "connections": list(SERVICE_CONNECTIONS),
        "tallied": list(TALLIED),
        "stacks": {s.label: s.result() for s in sides},
    }


def run(work: Path) -> dict[str, Any]:
    """Run the benchmark in ``work`` (a scratch directory)."""
    return asyncio.run(_main(work))


def markdown(r: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for these results."""
    stacks = r["stacks"]
    rows = [
        "| stack (checkout) | messages per step, all services both ways (rounds) | "
        "sequential round trips per model step, p50 (mean; steps) | CPU per step, services "
        "(with nats-server; rounds) | steps/s |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for label, s in stacks.items():
        seq = s["hops_sequential"]
        msgs = ", ".join(f"{x:.1f}" for x in s["messages_per_step_rounds"])
        cpu = ", ".join(f"{x:.2f}" for x in s["cpu_ms_per_step_rounds"])
        rows.append(
            f"| {label} (`{Path(s['checkout']).name}` at {s.get('commit') or '?'}) |"
            f" {s['messages_per_step']:.1f} ({msgs}) |"
            f" {seq['p50']:.0f} ({seq['mean']:.1f}; {s['hops_steps']}) |"
            f" {s['cpu_ms_per_step']:.2f} ms ({s['cpu_ms_per_step_with_nats']:.2f} ms; {cpu}) |"
            f" {s['steps_per_s']:.0f} |"
        )
    kinds = [f"- {label}: {_top_kinds(s['messages_by_kind'])}" for label, s in stacks.items()]
    return "\n".join(
        [
            "## A model step's messages, round trips and CPU, short round"
            " (`python -m bench steppath`)",
            "",
            f"{r['machine']}; engine: {r['engine']}. The orchestrator benchmark's load in about a"
            f" minute: `{r['workflow']}` runs, {r['tap_runs']} of them one at a time with every"
            f" message tapped (sequential round trips, `bench/hops.py`), then {r['rounds']} rounds"
            f" of {r['round_runs']} runs 32 in flight (messages per step from nats-server's"
            " `/connz`, CPU per step from `/proc`), then one more round with every message sorted"
            " by kind (`bench/tally.py`). With `BATON_BENCH_VERSUS=<checkout>` a second stack runs"
            " another checkout's services on its own nats-server, rounds interleaved.",
            "",
            *rows,
            "",
            "What a step's messages are, per step (the tallied round):",
            "",
            *kinds,
        ]
    )
