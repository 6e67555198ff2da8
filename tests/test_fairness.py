"""Fair dispatch and admission limits on real processes: a real nats-server,
the orchestrator, the context store and a simulator worker with room for 3
sequences at once, so the job queue matters.

Orders, not times: a probe task of one tenant submitted right behind another
tenant's flood ends before most of the flood does under fair dispatch, and
after nearly all of it with the share set above the flood (the FIFO the
issue measured) — the control that shows the assertion can fail.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack

from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import NatsServer

FLOOD = 40
FLOODER, PROBER = "wonka", "initech"
WORKER = {"BATON_MAX_NUM_SEQS": "3", "BATON_SIM_DECODE_TPS": "1000"}  # ~0.13 s an answer


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
        fifo = stack.service("orchestrator", BATON_DEFAULT_LIMITS='{"share": 1000}').wait_ready()
        before_fifo, flood = await _flood_then_probe(client, ends, taken=FLOOD)
        stack.retire(fifo)
        stack.service("orchestrator", BATON_DEFAULT_LIMITS='{"share": 3}').wait_ready()
        before_fair, flood2 = await _flood_then_probe(client, ends, taken=3)
        outcomes = {ends.events[t]["type"] for t in flood + flood2}
    finally:
        await client.close()
        stack.stop()
    assert outcomes == {"completed"}  # the floods completed, nothing lost or refused
    # FIFO: the probe's job queued behind the whole flood's.
    assert before_fifo >= FLOOD * 3 // 4, before_fifo
    # Fair: behind at most the flooder's share (3) and what the worker held.
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
