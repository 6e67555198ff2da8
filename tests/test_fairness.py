"""Fair dispatch: first the decisions as pure functions (no broker) — a
tenant's room under a token share, a run's load, the worker's fair order —
then on real processes: a real nats-server, the orchestrator, the context
store and a simulator worker with room for 3 sequences at once, so the job
queue matters.

Orders, not times: a probe task of one tenant submitted right behind another
tenant's flood ends before most of the flood does under fair dispatch, and
after nearly all of it with the share set above the flood (the FIFO the
issue measured) — the control that shows the assertion can fail.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import NatsServer
from proto.messages import Heartbeat, ReplicaLoad
from services.inference_worker.admission import Admission, Waiter, next_waiter
from services.orchestrator.fairness import (
    FairGate,
    PoolRoom,
    Replicas,
    allowance,
    run_load,
    token_room,
)
from services.orchestrator.limits import Limiter, TenantLimits
from services.orchestrator.pools import Catalogue, PoolSpec
from services.orchestrator.poolview import PoolView
from services.orchestrator.replicas import ReplicaLoads
from services.orchestrator.routing import HeartbeatTracker

FLOOD = 40
FLOODER, PROBER = "wonka", "initech"
WORKER = {"BATON_MAX_NUM_SEQS": "3", "BATON_SIM_DECODE_TPS": "1000"}  # ~0.13 s an answer


# -- the decisions, without a broker ---------------------------------------


def test_a_run_holds_its_steps_prompts_and_answers_in_flight() -> None:
    assert run_load([], history=5000) == 0  # nothing in flight holds nothing
    assert run_load([(0, 128)], history=40) == 168  # a chat: its input + its answer
    # Two parallel branches; one with a token budget for its window.
    assert run_load([(0, 192), (300, 256)], history=1000) == 1000 + 192 + 300 + 256


def test_token_room_counts_runs_of_the_typical_size() -> None:
    assert token_room(16384, held=0, typical=230, idle=True) == 71
    assert token_room(16384, held=16000, typical=230, idle=False) == 1
    assert token_room(16384, held=16384, typical=230, idle=False) == 0
    # A run larger than the whole share still runs, alone.
    assert token_room(1000, held=0, typical=5000, idle=True) == 1
    assert token_room(1000, held=0, typical=5000, idle=False) == 0


def _fill(gate: FairGate, tenant: str, load: int, n: int = 1000) -> list[str]:
    """Take ``tenant``'s deliveries while the gate has room, each a run that
    holds ``load`` tokens; the ids of the runs started."""
    started: list[str] = []
    for seq in range(1, n + 1):
        if gate.room(tenant) <= 0:
            break
        task = f"{tenant}{seq}"
        gate.reserve(tenant, seq)
        gate.load(tenant, task, load)  # its first step is stored before adoption
        gate.adopt(tenant, seq, task, now=0.0)
        started.append(task)
    return started


def test_token_shares_give_long_runs_fewer_slots_than_short_ones() -> None:
    gate = FairGate(lambda t: 16384, policy="tokens")
    long_runs = _fill(gate, "research", load=2000)
    chats = _fill(gate, "chat", load=200)
    # Each tenant holds about its share in tokens, not the same number of runs.
    assert 16384 - 2000 < 2000 * len(long_runs) <= 16384 + 2000, len(long_runs)
    assert 16384 - 2000 < 200 * len(chats) <= 16384 + 2000, len(chats)
    assert len(chats) > 8 * len(long_runs)
    # Under count shares both got the same slots, the long runs 10x the tokens.
    count = FairGate(lambda t: 32, policy="count")
    assert len(_fill(count, "research", 2000)) == len(_fill(count, "chat", 200)) == 32


def test_a_finished_or_lighter_run_gives_its_tokens_back() -> None:
    gate = FairGate(lambda t: 10000, policy="tokens")
    runs = _fill(gate, "a", load=2500)
    assert gate.room("a") == 0 and len(runs) == 4
    gate.finish("a", runs[0])
    assert gate.room("a") == 1
    gate.load("a", runs[1], 0)  # between steps: nothing in flight, nothing held
    assert gate.held("a") == 5000 and gate.room("a") >= 2
    gate.park("a", runs[2])  # waiting for a human: holds no share at all
    assert gate.held("a") == 2500


def test_deliveries_not_started_count_as_typical_runs() -> None:
    gate = FairGate(lambda t: 8192, policy="tokens")
    _fill(gate, "a", load=1000, n=2)
    assert gate.typical("a") == 1000
    gate.reserve("a", 10)
    gate.reserve("a", 11)
    assert gate.held("a") == 4000  # two runs + two deliveries being handled
    assert gate.room("a") == 4


POOL = PoolRoom(kv_tokens=58_982, seqs=64)  # one simulator worker at 0.9 headroom


def _lending(
    pool: PoolRoom = POOL, replicas: Callable[[], Replicas] = lambda: Replicas()
) -> FairGate:
    gate = FairGate(lambda t: 16384, policy="tokens", pool=lambda: pool, replicas=replicas)
    for t in ("acme", "globex", "initech", "wonka"):  # served tenants: a waker each
        gate.on_room(t, lambda: None)
    return gate


def test_a_tenant_alone_borrows_the_idle_shares_up_to_what_the_pool_holds() -> None:
    # Two idle tenants lend 32,768; the pool holds 58,982: the share + loans.
    assert allowance(16384, [(16384, 0), (16384, 0)], POOL, typical=2000) == 49152
    # Five idle tenants would lend more than the pool holds: the pool bounds it.
    assert allowance(16384, [(16384, 0)] * 5, POOL, typical=2000) == 58982
    # A lender's work is no longer idle, nor room in the pool.
    assert allowance(16384, [(16384, 16384)] * 5, POOL, typical=2000) == 16384
    # Sequence slots bound it too: 64 runs of 500 tokens, not 117.
    assert allowance(16384, [(16384, 0)] * 5, POOL, typical=500) == 64 * 500
    # Nothing known of the pool (no heartbeat): no loan; the share stays.
    assert allowance(16384, [(16384, 0)] * 5, PoolRoom(), typical=2000) == 16384

    gate = _lending()
    long_runs = _fill(gate, "acme", load=1970)
    # 29 long runs fill the worker's KV, not the 8 its share allowed (the
    # old gate, which had no lending, gave it int(16384 / 1970) + 1 at most).
    assert len(long_runs) == 58982 // 1970, len(long_runs)
    assert len(_fill(FairGate(lambda t: 16384, policy="tokens"), "acme", 1970)) <= 9


def test_replicas_lend_their_part_of_what_all_of_them_leave_free() -> None:
    idle = [(4096, 0.0)] * 20  # idle shares far beyond the pool: the pool bounds
    # Two replicas holding nothing: half the pool each (the old rule: all of it each).
    assert allowance(4096, idle, POOL, 2000, Replicas(count=2)) == 58982 / 2
    # A peer holds 30,000: this replica's part is half of the 28,982 left.
    assert allowance(4096, idle, POOL, 2000, Replicas(count=2, elsewhere=30000)) == 14491
    # It keeps what it held and takes half of what neither holds.
    held_here = Replicas(count=2, elsewhere=20000, here=20000)
    assert allowance(4096, idle, POOL, 2000, held_here) == 20000 + 18982 / 2
    # Its other tenants' work on it is counted in its part, as before.
    assert allowance(4096, [(4096, 5000.0), *idle], POOL, 2000, held_here) == 29491 - 5000
    # Alone, what it told the others it held changes nothing: the whole pool.
    assert allowance(4096, idle, POOL, 2000, Replicas(count=1, here=20000)) == 58982
    # The pool full of the peers' work: the tenant keeps its own share.
    assert allowance(4096, idle, POOL, 2000, Replicas(count=3, elsewhere=58982)) == 4096


def _rounds(gates: list[FairGate], beacons: list[ReplicaLoads], n: int) -> list[int]:
    """``n`` rounds: each replica sends its beacon to the others, then all
    fill ``acme``'s runs of 1,970 tokens (the later ones before hearing of
    the earlier ones' runs: they start at the same moment); the tokens all
    of them hold after each round."""
    total = []
    for _ in range(n):
        for i, (gate, peers) in enumerate(zip(gates, beacons, strict=True)):
            load = peers.beacon(gate.holding())
            for j, other in enumerate(beacons):
                if j != i:
                    other.heard(load, f"baton.orchestrators.load.{peers.replica}")
        for gate in gates:
            _fill(gate, "acme", load=1970)
        total.append(round(sum(g.holding() for g in gates)))
    return total


def _replicas(n: int) -> tuple[list[FairGate], list[ReplicaLoads]]:
    """``n`` replicas' gates lending out of ``POOL``, with their beacons."""
    beacons = [ReplicaLoads(f"o{i}", every=1.0, clock=lambda: 0.0) for i in range(n)]
    gates = []
    for b in beacons:
        gates.append(_lending(replicas=b.view))
    return gates, beacons


def test_replicas_lending_at_once_fill_the_pool_between_them_not_once_each() -> None:
    gates, beacons = _replicas(2)
    totals = _rounds(gates, beacons, 5)
    # Together they hold what the pool holds, within a run each, every round.
    assert all(58982 - 2 * 1970 < t <= 58982 for t in totals), totals
    # The old rule (each replica against the whole pool): twice the pool.
    old = [_lending(), _lending()]
    assert sum(len(_fill(g, "acme", load=1970)) for g in old) == 2 * (58982 // 1970)
    # Three replicas: the same pool, not three of them.
    assert all(t <= 58982 for t in _rounds(*_replicas(3), 5))


def test_a_replica_whose_peer_is_idle_grows_to_the_pool_then_alone_to_all_of_it() -> None:
    gates, beacons = _replicas(2)
    _rounds(gates[:1], beacons[:1], 1)  # no peer heard of yet: alone, all of it
    assert gates[0].holding() == 29 * 1970
    gates, beacons = _replicas(2)
    busy, peers = gates[0], beacons[0]
    grown = []
    for _ in range(8):  # the peer takes nothing: each beacon, half of what is free
        peers.heard(beacons[1].beacon(0.0), "baton.orchestrators.load.o1")
        peers.beacon(busy.holding())
        _fill(busy, "acme", load=1970)
        grown.append(round(busy.holding()))
    assert grown[:4] == [14 * 1970, 21 * 1970, 25 * 1970, 27 * 1970], grown
    assert grown[-1] > 58982 - 2 * 1970, grown  # within a run of the pool per replica
    peers.clock = lambda: 10.0  # the peer is gone: the rest of the pool
    _fill(busy, "acme", load=1970)
    assert busy.holding() == 29 * 1970


def test_replica_loads_forget_a_silent_peer_and_ignore_their_own_beacon() -> None:
    now = [0.0]
    loads = ReplicaLoads("o1", every=1.0, clock=lambda: now[0])
    loads.heard(loads.beacon(5000.0), "baton.orchestrators.load.o1")  # its own
    loads.heard(ReplicaLoad(replica="o2", held_tokens=7000), "baton.orchestrators.load.o2")
    loads.heard(ReplicaLoad(replica="o3", held_tokens=1), "baton.orchestrators.load.o9")  # spoof
    assert loads.view() == Replicas(count=2, elsewhere=7000, here=5000)
    now[0] = 2.9  # within three intervals
    assert loads.view().count == 2
    now[0] = 3.1  # silent for three: it holds nothing
    assert loads.view() == Replicas(count=1, elsewhere=0, here=5000)
    # A peer that beacons every 5 s is kept for 15.
    loads.heard(ReplicaLoad(replica="o4", held_tokens=1, every=5.0), "baton.orchestrators.load.o4")
    now[0] = 3.1 + 14.0
    assert loads.view().count == 2


def test_a_lender_that_arrives_gets_its_share_and_the_borrower_stops() -> None:
    gate = _lending()
    borrowed = _fill(gate, "acme", load=1970)
    assert gate.room("acme") == 0
    # globex arrives: its own share is all its room, whatever acme borrowed.
    chats = _fill(gate, "globex", load=200)
    assert 16384 - 200 < 200 * len(chats) <= 16384 + 200, len(chats)
    # acme fetches nothing new until its runs have ended down to what is
    # left: the pool less globex's work; its running runs are not touched.
    assert gate.active("acme") == len(borrowed)
    assert gate.limit("acme") == 58982 - gate.held("globex")
    ended = 0
    while gate.room("acme") == 0:
        gate.finish("acme", borrowed[ended])
        ended += 1
    # It fetches again once what it holds and globex's share leave room in
    # the pool for one more of its runs, and not before.
    assert gate.held("acme") + gate.held("globex") + 1970 <= 58982
    assert gate.held("acme") + 1970 + gate.held("globex") + 1970 > 58982
    # Once globex is done, the loan grows back to the pool.
    for run in chats:
        gate.finish("globex", run)
    assert gate.limit("acme") == 58982


def test_a_freed_share_wakes_a_borrower_waiting_for_room() -> None:
    gate = _lending()
    woken: list[str] = []
    gate.on_room("acme", lambda: woken.append("acme"))
    _fill(gate, "acme", load=1970)
    chats = _fill(gate, "globex", load=200)
    woken.clear()
    gate.finish("globex", chats[0])  # globex's run ends: acme's allowance grew
    assert woken == ["acme"]
    # Without lending a tenant wakes only for its own runs.
    plain = FairGate(lambda t: 16384, policy="tokens")
    plain.on_room("acme", lambda: woken.append("plain"))
    _fill(plain, "globex", load=200, n=3)
    plain.finish("globex", "globex1")
    assert woken == ["acme"]


def test_the_pool_room_is_what_live_ready_workers_state() -> None:
    hb = HeartbeatTracker()
    view = PoolView(Catalogue({"big": PoolSpec(name="big", max_seqs=16)}), hb, stale_after=6.0)
    assert view.room() == PoolRoom()  # nobody heard from: nothing to lend
    now = time.time()

    def beat(worker: str, pool: str = "small", **kw: Any) -> None:
        fields: dict[str, Any] = {"ready": True, "ts": now, "kv_capacity_tokens": 58982,
                                  "max_seqs": 64, **kw}  # fmt: skip
        hb.last[(pool, worker)] = Heartbeat(worker=worker, pool=pool, engine="sim", **fields)

    beat("w1")
    beat("w2", pool="big", max_seqs=0)  # slots not measured yet: the catalogue's
    beat("w3", ts=now - 60)  # silent for a minute
    beat("w4", ready=False)  # starting
    beat("w5", leaving=True)
    assert view.room() == PoolRoom(kv_tokens=2 * 58982, seqs=64 + 16)


def test_count_shares_lend_nothing() -> None:
    gate = FairGate(lambda t: 32, policy="count", pool=lambda: POOL)
    assert len(_fill(gate, "acme", load=10)) == 32


def test_shares_come_from_the_tenant_limits_in_either_unit() -> None:
    lim = Limiter(TenantLimits(), {"big": TenantLimits(token_share=65536, share=64)})
    assert lim.share("big", "tokens") == 65536 and lim.share("big", "count") == 64
    assert lim.share("other", "tokens") == 16384 and lim.share("other", "count") == 32


def _waiter(tenant: str, need: int, arrival: int) -> Waiter:
    return Waiter(tenant, need, arrival, granted=None)  # type: ignore[arg-type]


def test_the_worker_admits_the_tenant_holding_fewest_tokens_first() -> None:
    waiting = [_waiter("flood", 2000, 0), _waiter("flood", 2000, 1), _waiter("chat", 160, 2)]
    assert next_waiter(waiting, {"flood": 40000}, "tokens") == 2
    assert next_waiter(waiting, {"flood": 40000}, "fifo") == 0
    # Within a tenant, and between tenants holding the same, arrival order.
    assert next_waiter(waiting[:2], {}, "tokens") == 0
    assert next_waiter([_waiter("b", 1, 0), _waiter("a", 1, 1)], {}, "tokens") == 0


async def test_admission_lets_a_short_job_pass_a_busy_tenants_queue() -> None:
    adm = Admission(10000, 64, headroom=1.0, queue=4)
    for _ in range(4):
        await adm.acquire(2000, "flood")
    order: list[str] = []

    async def job(tenant: str, need: int) -> None:
        await adm.acquire(need, tenant)
        order.append(tenant)

    waiting = [asyncio.create_task(job("flood", 2000)) for _ in range(3)]
    await asyncio.sleep(0)
    chat = asyncio.create_task(job("chat", 160))
    await asyncio.sleep(0)
    assert order == ["flood"]  # 8,000 + 2,000 fit; the next 2,000 do not
    await adm.release(2000, "flood")
    await asyncio.sleep(0)
    assert order == ["flood", "chat"]  # before the flood's two queued ahead of it
    assert adm.held == {"flood": 8000, "chat": 160}
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, chat, return_exceptions=True)
    assert adm.tokens == 8160 and adm.seqs == 5  # cancelled waits took nothing
    assert adm.room_for(held_waiting=0) >= 4  # the queue is fetched beyond what fits


class Ends:
    """The order in which tasks end, from a core subscription on events."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.accepted: set[str] = set()

    async def on_msg(self, msg: Any) -> None:
        ev = msgpack.unpackb(msg.data)
        if ev["type"] == "accepted":
            self.accepted.add(ev["task_id"])
        if ev["type"] in ("completed", "failed") and ev["task_id"] not in self.events:
            self.events[ev["task_id"]] = ev
            self.order.append(ev["task_id"])

    async def wait(self, ids: list[str], timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(i in self.events for i in ids):
                await asyncio.sleep(0.05)


async def _flood_then_probe(client: Client, ends: Ends, taken: int) -> tuple[int, list[str]]:
    """Publish the flood and, once the orchestrator has taken ``taken`` of
    it, one probe; how many flood tasks ended before the probe."""
    flood = [uid("fl") for _ in range(FLOOD)]
    await asyncio.gather(*(client.publish("chat", {"tenant": FLOODER, "input": "flood",
                                                   "task_id": t}, msg_id=t) for t in flood))  # fmt: skip
    async with asyncio.timeout(30):
        while len(ends.accepted & set(flood)) < taken:
            await asyncio.sleep(0.01)
    probe = uid("pr")
    await client.publish("chat", {"tenant": PROBER, "input": "probe", "task_id": probe},
                         msg_id=probe)  # fmt: skip
    await ends.wait([*flood, probe])
    before = [t for t in ends.order[: ends.order.index(probe)] if t in set(flood)]
    return len(before), flood


async def test_a_flood_does_not_starve_another_tenant(own_nats: NatsServer, tmp_path: Path) -> None:
    stack = LocalStack(own_nats, tmp_path / "s")
    stack.workdir.mkdir(parents=True)
    stack.service("context-store").wait_ready()
    stack.worker(**WORKER).wait_ready()
    client = await Client.connect(own_nats.url)
    ends = Ends()
    await client.nc.subscribe("baton.events.*.*", cb=ends.on_msg)
    try:
        # Shares in tokens (the default policy): a chat here holds ~133.
        fifo = stack.service("orchestrator",
                             BATON_DEFAULT_LIMITS='{"token_share": 1000000}').wait_ready()  # fmt: skip
        before_fifo, flood = await _flood_then_probe(client, ends, taken=FLOOD)
        stack.retire(fifo)
        stack.service("orchestrator", BATON_DEFAULT_LIMITS='{"token_share": 450}').wait_ready()
        before_fair, flood2 = await _flood_then_probe(client, ends, taken=3)
        outcomes = {ends.events[t]["type"] for t in flood + flood2}
    finally:
        await client.close()
        stack.stop()
    assert outcomes == {"completed"}  # the floods completed, nothing lost or refused
    # FIFO: the probe's job queued behind the whole flood's.
    assert before_fifo >= FLOOD * 3 // 4, before_fifo
    # Fair: behind at most the flooder's share (~3 chats) and what the worker held.
    assert before_fair <= FLOOD // 4, (before_fair, before_fifo)


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as exc:  # headers: case-insensitive
        return exc.code, exc.headers, json.loads(exc.read())


async def test_tasks_over_a_limit_fail_rate_limited_with_a_retry_hint(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    limits = {
        "umbrella": {"tasks_per_second": 0.1, "burst": 2},
        "hooli": {"max_in_flight": 2},
        "gone": {"tokens_per_minute": 50},
    }
    stack = LocalStack(own_nats, tmp_path / "s", env={"BATON_TENANT_LIMITS": json.dumps(limits)})
    stack.start(workers=0)
    stack.worker(**WORKER).wait_ready()
    client = await Client.connect(own_nats.url)
    ends = Ends()
    await client.nc.subscribe("baton.events.*.*", cb=ends.on_msg)
    try:

        async def burst(tenant: str, n: int) -> list[str]:
            ids = [uid("rl") for _ in range(n)]
            for t in ids:  # in order: the limits are about submission order
                await client.publish("chat", {"tenant": tenant, "input": "x", "task_id": t},
                                     msg_id=t)  # fmt: skip
            await ends.wait(ids)
            return [ends.events[t]["type"] for t in ids]

        # A bucket of 2 at 0.1/s: the first two pass, the rest would wait 10 s each.
        assert await burst("umbrella", 5) == ["completed"] * 2 + ["failed"] * 3
        # Two older tasks unfinished: every later one of the burst is refused.
        assert await burst("hooli", 5) == ["completed"] * 2 + ["failed"] * 3
        # One task's tokens exceed the minute's 50: the next is refused.
        assert await burst("gone", 1) == ["completed"]
        assert await burst("gone", 1) == ["failed"]
        refused = [e for e in ends.events.values() if e["type"] == "failed"]
        assert {e["error"]["code"] for e in refused} == {"rate_limited"}
        assert {e["error"]["layer"] for e in refused} == {"orchestration"}
        assert all(e["error"]["retry_after"] > 0 for e in refused)
        last = refused[-1]["error"]  # tokens: the first task's usage leaves the window
        assert 30 < last["retry_after"] <= 60, last

        # The HTTP API answers 429 with the one error shape and Retry-After,
        # and publishes nothing.
        url = f"{stack.orchestrator.url}/v1/tasks"
        stored = (await client.js.stream_info("BATON_TASKS_umbrella")).state.last_seq
        status, headers, body = _post(url, {"tenant": "umbrella", "input": "x"})
        assert status == 429, body
        assert (await client.js.stream_info("BATON_TASKS_umbrella")).state.last_seq == stored
        assert body["error"]["code"] == "rate_limited"
        assert body["error"]["type"] == "rate_limit_error"
        assert int(headers["Retry-After"]) >= 1
        status, _, body = _post(url, {"tenant": "acme", "input": "x"})  # no limits
        assert status == 202, body
    finally:
        await client.close()
        stack.stop()


LONG_WORKFLOW = """\
name: long
description: One long answer to a long input.
agents:
  writer:
    role: assistant
    system: You write at length.
    max_tokens: 64
steps:
  - id: answer
    agent: writer
"""
LONG_INPUT = "lorem ipsum " * 340  # ~1,000 tokens: a long task's KV is its prompt's
# Room for ~5 long jobs at once (6,000 KV tokens x 0.9 / ~1,090), 250 tokens/s.
SMALL_WORKER = {"BATON_SIM_KV_TOKENS": "6000", "BATON_MAX_NUM_SEQS": "16",
                "BATON_SIM_DECODE_TPS": "250"}  # fmt: skip
LONG_FLOOD = 40


async def _ended_during_probe(client: Client, ends: Ends) -> tuple[int, list[str]]:
    """``wonka`` floods long tasks; once its intake took what its share
    allows, ``initech`` submits one short chat. How many flood tasks ended
    while that chat was waiting: the work queued ahead of it."""
    flood = [uid("lf") for _ in range(LONG_FLOOD)]
    await asyncio.gather(*(client.publish("long", {"tenant": FLOODER, "input": LONG_INPUT,
                                                   "task_id": t}, msg_id=t) for t in flood))  # fmt: skip
    async with asyncio.timeout(30):
        while len(ends.accepted & set(flood)) < 2:
            await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)  # intake fills the flooder's share (32 under count)
    probe = uid("pr")
    before = len(ends.order)
    await client.publish("chat", {"tenant": PROBER, "input": "probe", "task_id": probe,
                                  "max_tokens": 8}, msg_id=probe)  # fmt: skip
    await ends.wait([*flood, probe], timeout=90)
    during = ends.order[before : ends.order.index(probe)]
    return sum(1 for t in during if t in set(flood)), flood


async def test_long_tasks_hold_their_token_share_not_a_pool_of_slots(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    """Tenant ``wonka``'s long tasks (~1,090 tokens each) against ``initech``'s
    short chat, on a worker with room for ~5 long jobs. Under count shares
    (32 tasks) the flooder's jobs fill the worker and queue ahead of the
    chat's; under a token share of 2,500 it holds ~2 long jobs, so the chat
    waits behind at most those and the worker's own few."""
    workflows = tmp_path / "wf"
    workflows.mkdir()
    (workflows / "long.yaml").write_text(LONG_WORKFLOW)
    stack = LocalStack(own_nats, tmp_path / "s", env={"BATON_WORKFLOWS_DIR": str(workflows)})
    stack.workdir.mkdir(parents=True)
    stack.service("context-store").wait_ready()
    stack.worker(**SMALL_WORKER).wait_ready()
    client = await Client.connect(own_nats.url)
    ends = Ends()
    await client.nc.subscribe("baton.events.*.*", cb=ends.on_msg)
    limits = json.dumps({"token_share": 2500, "share": 32})
    try:
        count = stack.service("orchestrator", BATON_FAIR_POLICY="count",
                              BATON_DEFAULT_LIMITS=limits).wait_ready()  # fmt: skip
        behind_count, flood = await _ended_during_probe(client, ends)
        stack.retire(count)
        stack.service("orchestrator", BATON_FAIR_POLICY="tokens",
                      BATON_DEFAULT_LIMITS=limits).wait_ready()  # fmt: skip
        behind_tokens, flood2 = await _ended_during_probe(client, ends)
        outcomes = {ends.events[t]["type"] for t in flood + flood2}
    finally:
        await client.close()
        stack.stop()
    assert outcomes == {"completed"}  # both floods completed, nothing refused
    # Count: the chat's job queued behind ~the flooder's 32 minus what ran.
    assert behind_count >= 15, (behind_count, behind_tokens)
    # Tokens: behind the ~2 long jobs of the share, and the worker's queue.
    assert behind_tokens <= 6, (behind_tokens, behind_count)


async def _most_at_once(client: Client, ends: Ends, n: int) -> int:
    """``wonka`` alone submits ``n`` long tasks; the most of them running
    at once (accepted and not ended), from the order of their events."""
    flood = [uid("lo") for _ in range(n)]
    running = most = 0
    seen: set[str] = set()

    async def on_msg(msg: Any) -> None:
        nonlocal running, most
        ev = msgpack.unpackb(msg.data)
        if ev["task_id"] not in flood or (ev["task_id"], ev["type"]) in seen:
            return
        seen.add((ev["task_id"], ev["type"]))
        running += {"accepted": 1, "completed": -1, "failed": -1}.get(ev["type"], 0)
        most = max(most, running)

    sub = await client.nc.subscribe(f"baton.events.{FLOODER}.*", cb=on_msg)
    await asyncio.gather(*(client.publish("long", {"tenant": FLOODER, "input": LONG_INPUT,
                                                   "task_id": t}, msg_id=t) for t in flood))  # fmt: skip
    await ends.wait(flood, timeout=90)
    await sub.unsubscribe()
    assert {ends.events[t]["type"] for t in flood} == {"completed"}
    return most


async def _small_worker(
    own_nats: NatsServer, tmp_path: Path, **worker: str
) -> tuple[LocalStack, Client, Ends]:
    """A context store and one worker with room for ~5 long tasks (its
    heartbeats every 0.5 s; ``worker``: more of its settings), the ``long``
    workflow, a client following every task's events; no orchestrator yet."""
    workflows = tmp_path / "wf"
    workflows.mkdir()
    (workflows / "long.yaml").write_text(LONG_WORKFLOW)
    stack = LocalStack(own_nats, tmp_path / "s", env={"BATON_WORKFLOWS_DIR": str(workflows)})
    stack.workdir.mkdir(parents=True)
    stack.service("context-store").wait_ready()
    stack.worker(**{**SMALL_WORKER, "BATON_HEARTBEAT_INTERVAL": "0.5", **worker}).wait_ready()
    client = await Client.connect(own_nats.url)
    ends = Ends()
    await client.nc.subscribe("baton.events.*.*", cb=ends.on_msg)
    return stack, client, ends


async def test_a_tenant_alone_borrows_the_idle_shares_the_worker_holds(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    """Tenant ``wonka`` alone, with a token share of one long task (~1,090
    tokens) on a worker with room for ~5: capped at its share it runs one or
    two at once; lending the idle tenants' shares, as many as the worker's
    KV cache holds (its heartbeats), and never more."""
    stack, client, ends = await _small_worker(own_nats, tmp_path)
    limits = json.dumps({"token_share": 1200})
    try:
        capped = stack.service("orchestrator", BATON_FAIR_LEND="false",
                               BATON_DEFAULT_LIMITS=limits).wait_ready()  # fmt: skip
        alone_capped = await _most_at_once(client, ends, 16)
        stack.retire(capped)
        stack.service("orchestrator", BATON_DEFAULT_LIMITS=limits).wait_ready()
        await asyncio.sleep(1.0)  # a heartbeat: the pool's room is known
        alone_lending = await _most_at_once(client, ends, 16)
    finally:
        await client.close()
        stack.stop()
    assert alone_capped <= 2, alone_capped
    # 6,000 KV x 0.9 headroom / ~1,090 a task: 4 fit (a fifth while the
    # gate's estimate of a run is below the worker's).
    assert 4 <= alone_lending <= 5, (alone_lending, alone_capped)


async def test_two_replicas_lend_one_workers_room_between_them_not_twice(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    """Tenant ``wonka`` alone on two orchestrator replicas pulling its one
    task stream, over one worker with room for ~5 long tasks: each replica
    lends out of what the worker holds less what the other's runs hold (its
    load beacon), so together they run no more at once than the worker
    holds. Each against the whole worker (the old rule) they ran 6-8.
    Answers of ~1 s (60 tokens/s): runs overlap, so the gates bind, not
    the intake's pace."""
    stack, client, ends = await _small_worker(own_nats, tmp_path, BATON_SIM_DECODE_TPS="60")
    env = {"BATON_DEFAULT_LIMITS": json.dumps({"token_share": 1200}),
           "BATON_REPLICA_LOAD_EVERY": "0.5"}  # fmt: skip
    beacons: set[str] = set()

    async def on_beacon(msg: Any) -> None:
        beacons.add(msg.subject)

    await client.nc.subscribe("baton.orchestrators.load.*", cb=on_beacon)
    try:
        replicas = [stack.service("orchestrator", **env) for _ in range(2)]
        for proc in replicas:
            proc.wait_ready()
        async with asyncio.timeout(10):  # both beacon, so each knows the other
            while len(beacons) < 2:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a beacon of each heard by the other, a heartbeat
        most = await _most_at_once(client, ends, 16)
    finally:
        await client.close()
        stack.stop()
    print(f"\ntwo replicas, one worker: at most {most} long tasks at once")
    # 6,000 KV x 0.9 / ~1,090 a task: 4 fit, a fifth while the gates'
    # estimate of a run is below the worker's; more than the two the
    # replicas' shares alone allow: they still lend.
    assert 3 <= most <= 5, most
