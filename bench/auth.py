"""The cost of the tenant fence on the hot path: one chat task's round trip
(publish → ``completed``, simulator engine) on the bus as ``baton up`` runs it
— NATS operator mode: every identity a user JWT in a ``.creds`` file, accounts
from the ``full`` resolver, per-service identities, JetStream encrypted at
rest — against the same stack on an open nats-server, interleaved round by
round in one run. The fenced client is a tenant in its own account,
connected with its ``.creds`` (its task crosses the service import, its
events the stream import); the open one publishes straight into Baton's
subjects, as every client did before.

The difference is broken down by adding one thing at a time, every
configuration measured in every round (same nats-server binary, the order
rotated round by round):

* ``open``: no accounts, no encryption (the baseline);
* ``accounts``: operator mode, accounts and per-service identities, the
  client in BATON's account (no import on its path), store plain, no copies;
* ``auth``: the same with the client as the tenant in its own account, so
  its task crosses the service import and its events the stream import —
  the authentication's whole own cost (JWT operator mode + accounts +
  imports);
* ``auth+copies``: plus the tenant's own copies of its events and token
  deltas (``streams.TENANT_EVENTS`` / ``TENANT_TOKENS``);
* ``auth+encryption``: plus encryption at rest, no copies;
* ``fenced``: all of it, as ``baton up`` runs it (the headline ratio).

One stack per server configuration (open; plain or encrypted store, copies
on or off), all running side by side; ``accounts`` and ``auth`` share one
and differ only in the client. Copies off: the copy streams re-pointed at a
subject nothing publishes (as ``bench security``, whose CPU figures under
load cover encryption and copies). Tasks are interleaved one by one across
the configurations, so load on shared cores that comes and goes falls on
every configuration alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack

from baton import accounts
from baton.bus import connect
from baton.dev.testing import LocalStack, connect_nats, secure_nats
from baton.natsd import NatsServer
from bench.stats import cpu_seconds, pct
from proto import streams
from proto.streams import StreamSpec

ROUNDS = int(os.environ.get("BATON_BENCH_ROUNDS", "6"))
TASKS_PER_ROUND = int(os.environ.get("BATON_BENCH_TASKS", "40"))
TENANT = "acme"
ENV = {"BATON_TENANTS": TENANT, "BATON_LOG_LEVEL": "WARNING", "BATON_SIM_DECODE_TPS": "100000"}
COPIES = (streams.TENANT_EVENTS, streams.TENANT_TOKENS)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    stack: str  # open | plain | encrypted
    tenant_client: bool  # the tenant in its own account (imports) or a client inside BATON
    copies: bool
    what: str


CONFIGS = (
    Config("open", "open", False, False, "open nats-server: no accounts, store plain"),
    Config("accounts", "plain", False, False,
           "operator mode, accounts, per-service identities; client in BATON's account"),
    Config("auth", "plain", True, False,
           "+ the tenant's own account: task via the service import, events via the stream import"),
    Config("auth+copies", "plain", True, True, "+ the tenant's copies of its events and tokens"),
    Config("auth+encryption", "encrypted", True, False, "+ encryption at rest (no copies)"),
    Config("fenced", "encrypted", True, True, "all of it, as `baton up` runs it"),
)  # fmt: skip
# What each ratio isolates: (label, numerator, denominator).
STEPS = (
    ("operator mode + accounts + service identities", "accounts", "open"),
    ("the tenant's imports (service + stream)", "auth", "accounts"),
    ("authentication's own cost (JWT operator mode + accounts + imports)", "auth", "open"),
    ("tenant copies, over auth", "auth+copies", "auth"),
    ("encryption at rest, over auth", "auth+encryption", "auth"),
    ("copies, over auth + encryption", "fenced", "auth+encryption"),
    ("all of it: fenced / open", "fenced", "open"),
)


def _off(spec: StreamSpec) -> StreamSpec:
    """The same stream listening on a subject nothing publishes."""
    return dataclasses.replace(spec, subjects=(f"bench.off.{spec.name}",))


class _Client:
    """One client connection, submitting one task at a time: seconds to
    ``completed``, and to the submission's acknowledgement (the part the
    service import can touch)."""

    def __init__(self, url: str, subject: str) -> None:
        self.url, self.subject = url, subject

    async def open(self) -> None:
        self.nc = await connect_nats(self.url)
        self.js = self.nc.jetstream()

    async def task(self) -> tuple[float, float]:
        task_id = uuid.uuid4().hex
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_event(msg: Any) -> None:
            if msgpack.unpackb(msg.data)["type"] in ("completed", "failed") and not done.done():
                done.set_result(None)

        sub = await self.nc.subscribe(f"baton.events.{TENANT}.{task_id}", cb=on_event)
        t0 = time.perf_counter()
        body = {"tenant": TENANT, "input": "hi", "task_id": task_id}
        await self.js.publish(self.subject, msgpack.packb(body), headers={"Nats-Msg-Id": task_id})
        ack = time.perf_counter() - t0
        await asyncio.wait_for(done, 30)
        total = time.perf_counter() - t0
        await sub.unsubscribe()
        return total, ack

    async def close(self) -> None:
        await self.nc.close()


class _Stack:
    """A nats-server and Baton's services on it; the tenant's copies on or off."""

    def __init__(self, name: str, server: NatsServer, work: Path, copies: bool) -> None:
        self.name, self.server, self.with_copies = name, server, copies
        self.stack = LocalStack(server, work / name, env=dict(ENV))

    async def start(self) -> None:
        self.server.start()
        self.stack.start()
        if self.server.auth is not None and not self.with_copies:
            bus = await connect(self.server.url, name="bench-auth")
            try:
                account = bus.account(accounts.tenant_api_prefix(TENANT))
                for spec in COPIES:
                    await account.ensure_stream(_off(spec))
            finally:
                await bus.close()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each of the stack's processes."""
        pids = {p.name: p.proc.pid for p in self.stack.procs if p.proc is not None}
        assert self.server.proc is not None
        pids["nats-server"] = self.server.proc.pid
        return {name: cpu_seconds(pid) for name, pid in pids.items()}

    def client(self, tenant: bool) -> _Client:
        if tenant:  # in its own account: its task crosses the import
            return _Client(self.server.url_for(TENANT), "baton.tasks.chat")
        return _Client(self.server.url, f"baton.tasks.{TENANT}.chat")

    def stop(self) -> None:
        self.stack.stop()
        self.server.stop()


def _stacks(work: Path) -> dict[str, _Stack]:
    def fenced(name: str, encrypt: bool, copies: bool) -> _Stack:
        server = secure_nats(work / f"{name}-nats", (TENANT,), encrypt=encrypt)
        return _Stack(name, server, work, copies)

    return {
        "open": _Stack("open", NatsServer(work / "open-nats"), work, copies=False),
        "plain": fenced("plain", False, False),
        "plain+copies": fenced("plain+copies", False, True),
        "encrypted": fenced("encrypted", True, False),
        "encrypted+copies": fenced("encrypted+copies", True, True),
    }


def _stack_of(cfg: Config) -> str:
    if cfg.stack == "open":
        return "open"
    return cfg.stack + ("+copies" if cfg.copies else "")


async def _main(work: Path) -> dict[str, Any]:
    stacks = _stacks(work)
    assert "?creds=" in stacks["encrypted+copies"].server.url_for(TENANT), "fenced: a .creds"
    clients: dict[str, _Client] = {}
    rounds: list[dict[str, Any]] = []
    try:
        for s in stacks.values():
            await s.start()
        clients = {c.name: stacks[_stack_of(c)].client(c.tenant_client) for c in CONFIGS}
        for cl in clients.values():
            await cl.open()
        for _ in range(20):  # warm every configuration: connections, consumers, caches
            for cl in clients.values():
                await cl.task()
        cpu0 = {name: s.cpu() for name, s in stacks.items()}
        for i in range(ROUNDS):
            got: dict[str, tuple[list[float], list[float]]] = {c.name: ([], []) for c in CONFIGS}
            for j in range(TASKS_PER_ROUND):
                # Task by task, the configurations' order rotated (and
                # reversed every other round): load that comes and goes
                # on shared cores falls on every configuration alike.
                k = (i * TASKS_PER_ROUND + j) % len(CONFIGS)
                order = CONFIGS[k:] + CONFIGS[:k]
                for cfg in order[:: -1 if i % 2 else 1]:
                    total, acked = await clients[cfg.name].task()
                    got[cfg.name][0].append(total)
                    got[cfg.name][1].append(acked)
            row: dict[str, Any] = {
                name: {"p50_ms": round(statistics.median(v) * 1e3, 2),
                       "p99_ms": round(pct(v, 0.99) * 1e3, 2),
                       "ack_p50_ms": round(statistics.median(a) * 1e3, 3)}
                for name, (v, a) in got.items()
            }  # fmt: skip
            row["ratios"] = {
                f"{a}/{b}": round(statistics.median(got[a][0]) / statistics.median(got[b][0]), 3)
                for _, a, b in STEPS
            }
            row["load_1m"] = round(os.getloadavg()[0], 2)
            rounds.append(row)
            print(f"auth round {i + 1}: " + ", ".join(
                f"{c.name} {row[c.name]['p50_ms']}" for c in CONFIGS), flush=True)  # fmt: skip
        tasks = {n: sum(TASKS_PER_ROUND * ROUNDS for c in CONFIGS if _stack_of(c) == n)
                 for n in stacks}  # fmt: skip
        cpu = {
            n: {k: round((v - cpu0[n][k]) * 1e3 / tasks[n], 3) for k, v in sorted(s.cpu().items())}
            for n, s in stacks.items()
        }
    finally:
        for cl in clients.values():
            if hasattr(cl, "nc"):
                await cl.close()
        for s in stacks.values():
            s.stop()
    med = {
        key: round(statistics.median(r["ratios"][key] for r in rounds), 3)
        for key in rounds[0]["ratios"]
    }
    p50 = {
        c.name: round(statistics.median(r[c.name]["p50_ms"] for r in rounds), 2) for c in CONFIGS
    }
    ack = {
        c.name: round(statistics.median(r[c.name]["ack_p50_ms"] for r in rounds), 3)
        for c in CONFIGS
    }
    return {
        "rounds": rounds,
        "tasks_per_round": TASKS_PER_ROUND,
        "load_1m": [r["load_1m"] for r in rounds],
        "configs": {c.name: c.what for c in CONFIGS},
        "median_p50_ms": p50,
        "median_ack_p50_ms": ack,
        "cpu_ms_per_task": {n: {"total": round(sum(v.values()), 3), **v} for n, v in cpu.items()},
        "steps": [{"what": w, "ratio": f"{a}/{b}", "median": med[f"{a}/{b}"]} for w, a, b in STEPS],
        "median_ratio_p50": med["fenced/open"],
        "auth_ratio_p50": med["auth/open"],
        "goal": "fenced / open task round trip p50 <= 1.05",
        "fenced": "operator mode: .creds (user JWT + nkey), full resolver, encrypted store",
    }


def run(work: Path) -> dict[str, Any]:
    return asyncio.run(_main(work))


def _met(ratio: float) -> str:
    return "met" if ratio <= 1.05 else "missed"


def _markdown_fenced_open(r: dict[str, Any]) -> str:
    """A result from before the breakdown: fenced against open only."""
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
(Measured before the breakdown by difference: `python -m bench auth`
now measures each of them apart; re-run it.)

| round | p50 fenced ms | p50 open ms | ratio | p99 fenced ms | p99 open ms |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


def markdown(r: dict[str, Any]) -> str:
    if "steps" not in r:
        return _markdown_fenced_open(r)
    names = list(r["configs"])
    cfg_rows = "\n".join(
        f"| {n} | {r['configs'][n]} | {r['median_p50_ms'][n]} | {r['median_ack_p50_ms'][n]} |"
        for n in names
    )
    step_rows = "\n".join(
        f"| {s['what']} | {s['ratio']} | {s['median']} | "
        + ", ".join(str(x["ratios"][s["ratio"]]) for x in r["rounds"])
        + " |"
        for s in r["steps"]
    )
    round_rows = "\n".join(
        f"| {i + 1} | " + " | ".join(f"{x[n]['p50_ms']} / {x[n]['p99_ms']}" for n in names) + " |"
        for i, x in enumerate(r["rounds"])
    )
    full, auth = r["median_ratio_p50"], r["auth_ratio_p50"]
    full_k, auth_k = "fenced/open", "auth/open"

    def lo(k: str) -> float:
        return min(x["ratios"][k] for x in r["rounds"])

    def hi(k: str) -> float:
        return max(x["ratios"][k] for x in r["rounds"])

    cpu = r["cpu_ms_per_task"]
    procs = sorted(k for k in next(iter(cpu.values())) if k != "total")
    cpu_rows = "\n".join(
        f"| {n} | {v['total']} | " + " | ".join(str(v.get(p, "")) for p in procs) + " |"
        for n, v in cpu.items()
    )
    return f"""## Authentication on the hot path (`python -m bench auth`)

One chat task's round trip (publish → `completed`, simulator) through a
tenant's own account on the fenced bus as `baton up` runs it (NATS operator
mode: each identity a `.creds` user JWT, accounts from the `full` resolver,
service imports, per-service identities, encrypted store, the tenant's
copies of its events) against the same stack on an open nats-server, and
between them configurations that add one difference at a time. Five
stacks side by side (open; fenced with the store plain or encrypted, each
with the tenant's copies on or off — off: re-pointed at a subject nothing
publishes; the same nats-server binary); `accounts` and `auth` share the
plain stack without copies and differ only in where the client sits.
{r["tasks_per_round"]} sequential tasks per configuration per round,
{len(r["rounds"])} rounds, interleaved task by task (the configurations'
order rotated at each task and reversed every other round, so load that
comes and goes on shared cores falls on all alike); ratios of p50s within a
round, median over rounds. CPU per task is the utime + stime of each
stack's processes (nats-server included) over all rounds, divided by the
tasks that stack served — idle work (heartbeats, timers) included, so the
plain stack, which serves two configurations, shows less per task.

Fenced / open: **{full}** ({r["goal"]}: {_met(full)}). Authentication's own
cost (operator mode, accounts, imports; store plain, no copies): **{auth}**
({_met(auth)} against the same 5%). Per round they range
{lo(full_k)} to {hi(full_k)} and {lo(auth_k)} to {hi(auth_k)}: on shared cores a
difference under about 5% is within one run's noise.

| configuration | what | round trip p50 ms | submit ack p50 ms |
| --- | --- | ---: | ---: |
{cfg_rows}

| difference | ratio | median | per round |
| --- | --- | ---: | --- |
{step_rows}

| stack | CPU ms per task | {" | ".join(procs)} |
| --- | ---: | {" | ".join("---:" for _ in procs)} |
{cpu_rows}

| round | {" | ".join(f"{n} p50 / p99 ms" for n in names)} |
| --- | {" | ".join("---" for _ in names)} |
{round_rows}
"""
