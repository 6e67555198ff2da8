"""Fuzzing every bus entry point of a running stack (real nats-server, the
three services, simulator engine): the task subject, each ``baton.ctx.<op>``,
results and worker heartbeats.

The oracle is outside the services: events read back from BATON_EVENTS, the
services' own counters, and the consumers' redelivery counts. Every readable
bad task gets exactly one ``failed`` event with its code; every unreadable
one is counted and terminated on its first delivery; nothing is redelivered;
the stack still serves a normal task afterwards. Counts per entry point are
printed (``-s``); every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from typing import Any

import msgpack
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import ConsumerConfig, DeliverPolicy

from baton.dev.testing import Client, LocalStack, http_get, metric, uid
from proto.subjects import CONTEXT_OPS
from proto.submission import TaskRejected, parse_task
from services.context_store.service import REQUEST_TYPES
from tests.test_fuzz_proto import json_like, nested, raw_map, raw_str, task_bodies

WORKFLOWS = frozenset({"chat", "research"})


def draw_all(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy``, reproducibly (derandomized)."""
    out: list[Any] = []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out[:n]


async def read_events(
    client: Client, tenant: str, *, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Every event of ``tenant`` stored so far, via one ordered consumer."""
    got: list[dict[str, Any]] = []
    sub = await client.js.subscribe(f"baton.events.{tenant}.>", ordered_consumer=True,
                                    config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))  # fmt: skip
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return got
            got.append(msgpack.unpackb(msg.data))
            if len(got) > 100_000:
                raise AssertionError("runaway event stream")
    finally:
        await sub.unsubscribe()


async def consumer_redelivered(client: Client, stream: str, durable: str) -> int:
    info = await client.js.consumer_info(stream, durable)
    return int(info.num_redelivered or 0)


async def test_the_task_subject_answers_every_readable_body_once_and_never_redelivers(
    stack: LocalStack, client: Client
) -> None:
    tenant = "fuzz"  # a tenant of its own: every event it has is this test's
    cases = draw_all(task_bodies(tenant=tenant), 240)
    orch = stack.orchestrator.url
    rejected0 = metric(orch, "baton_rejected_tasks_total")
    naks0 = metric(
        orch, "baton_messages_handled_total", consumer="orchestrator-tasks", outcome="nak"
    )
    # task_id -> "completed" or the failed code; copies with one task id may be
    # handled concurrently: any copy's outcome, but exactly one terminal event.
    expect: dict[str, set[str]] = {}
    unaddressable = rejected = 0
    kinds: Counter[str] = Counter()
    for data, kind in cases:
        kinds[kind] += 1
        wf = "chat"
        try:
            task = parse_task(data, tenant=tenant, workflow=wf, known_workflows=WORKFLOWS,
                              fallback_task_id="?")  # fmt: skip
            assert task.task_id is not None
            if task.task_id != "?":  # else named by its stream sequence: not predictable here
                expect.setdefault(task.task_id, set()).add("completed")
        except TaskRejected as r:
            rejected += 1
            if r.addressable and r.tenant == tenant and r.task_id != "?":
                assert r.task_id is not None
                expect.setdefault(r.task_id, set()).add(str(r.code))
            elif not r.addressable:
                unaddressable += 1
        await client.publish(wf, data, raw=True, as_tenant=tenant)
    # An unknown workflow: readable, answered with its code.
    wrong = uid()
    await client.publish("nosuch", {"tenant": tenant, "input": "x", "task_id": wrong})
    expect[wrong], rejected = {"unknown_workflow"}, rejected + 1

    deadline = time.monotonic() + 90
    while True:
        events = await read_events(client, tenant)
        terminal: dict[str, list[str]] = {}
        for e in events:
            if e["type"] in ("completed", "failed"):
                code = "completed" if e["type"] == "completed" else e["error"]["code"]
                terminal.setdefault(e["task_id"], []).append(code)
        if set(expect) <= set(terminal) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    missing = sorted(set(expect) - set(terminal))
    assert not missing, f"{len(missing)} tasks without a terminal event: {missing[:5]}"
    for task_id, want in expect.items():
        assert len(terminal[task_id]) == 1 and terminal[task_id][0] in want, (
            task_id,
            terminal[task_id],
            want,
        )
    extra = set(terminal) - set(expect)  # only tasks named by their stream sequence
    assert all(t.startswith("seq") for t in extra), extra
    assert metric(orch, "baton_rejected_tasks_total") - rejected0 == rejected
    naks = metric(
        orch, "baton_messages_handled_total", consumer="orchestrator-tasks", outcome="nak"
    )
    assert naks - naks0 == 0, "a task body was redelivered"
    codes = Counter(outcome for got in terminal.values() for outcome in got)
    print(f"\nfuzz baton.tasks (bus): {len(cases) + 1} bodies, {unaddressable} unreadable "
          f"(counted, terminated), answered {dict(codes)}, kinds {dict(kinds)}")  # fmt: skip


def ctx_bodies(tenant: str) -> st.SearchStrategy[bytes]:
    """Bodies for a context op: shapes near the real ones, and hostile ones."""
    near = st.fixed_dictionaries(
        {"tenant": st.sampled_from([tenant, "other", "a.b", ""])},
        optional={"session": st.text(max_size=70), "msg_id": st.text(max_size=8),
                  "messages": json_like, "ref": json_like, "budget_tokens": json_like,
                  "start": st.integers(-(2**63), 2**63), "limit": st.integers(-(2**63), 2**63),
                  "child": st.text(max_size=70), "name": st.text(max_size=8), "data": st.binary(max_size=64),
                  "tokens": st.floats()},
    ).map(msgspec.msgpack.encode)  # fmt: skip
    hostile = st.one_of(
        json_like.map(msgspec.msgpack.encode),
        st.binary(max_size=128),
        st.integers(33, 50_000).map(nested),
        st.binary(min_size=1, max_size=6).map(
            lambda b: raw_map(
                [
                    (raw_str(b"tenant"), raw_str(tenant.encode())),
                    (raw_str(b"session"), raw_str(b + b"\xff")),
                ]
            )
        ),
    )
    return st.one_of(near, hostile)


async def test_every_context_op_replies_to_hostile_requests_with_a_code(
    stack: LocalStack, client: Client
) -> None:
    tenant = uid("fzc")
    bodies = draw_all(ctx_bodies(tenant), 60)
    tally: dict[str, Counter[str]] = {}
    async with asyncio.timeout(120):
        for op in CONTEXT_OPS:
            reply_type = REQUEST_TYPES[op][1]
            for data in bodies:
                msg = await client.nc.request(f"baton.ctx.{op}.{tenant}", data, timeout=5)
                reply = msgspec.msgpack.decode(msg.data, type=reply_type)
                code = reply.error.code if reply.error is not None else "ok"
                assert code != "context_unavailable", (op, data[:80], reply.error)
                tally.setdefault(op, Counter())[code] += 1
    for op, counts in tally.items():
        print(f"\nfuzz baton.ctx.{op}: {sum(counts.values())} requests {dict(counts)}")
    # Still serving.
    done = await client.run("chat", {"tenant": "hooli", "input": "hi", "task_id": uid()})
    assert done["type"] == "completed"


def result_bodies(tenant: str) -> st.SearchStrategy[bytes]:
    near = st.fixed_dictionaries(
        {"job_id": st.text(max_size=8), "task_id": st.sampled_from([uid(), "a.b"]),
         "tenant": st.sampled_from([tenant, ""]), "session": st.text(max_size=8),
         "step": st.text(max_size=8), "worker": st.text(max_size=8)},
        optional={"usage": st.fixed_dictionaries({"gpu_seconds": st.sampled_from([math.nan, math.inf, -1.0])}),
                  "ref": json_like, "error": json_like},
    ).map(msgspec.msgpack.encode)  # fmt: skip
    return st.one_of(near, json_like.map(msgspec.msgpack.encode), st.binary(max_size=64),
                     st.integers(33, 50_000).map(nested))  # fmt: skip


async def test_hostile_results_are_terminated_on_first_delivery(
    stack: LocalStack, client: Client
) -> None:
    tenant = uid("fzr")
    bodies = draw_all(result_bodies(tenant), 80)
    orch = stack.orchestrator.url
    labels = {"consumer": "orchestrator-results"}
    term0 = metric(orch, "baton_messages_handled_total", outcome="term", **labels)
    nak0 = metric(orch, "baton_messages_handled_total", outcome="nak", **labels)
    redelivered0 = await consumer_redelivered(client, "BATON_RESULTS", "orchestrator-results")
    for i, data in enumerate(bodies):
        await client.js.publish(f"baton.results.{tenant}.r{i}", data)
    async with asyncio.timeout(30):
        while metric(orch, "baton_messages_handled_total", outcome="term", **labels) - term0 < len(
            bodies
        ):
            await asyncio.sleep(0.2)
    assert metric(orch, "baton_messages_handled_total", outcome="nak", **labels) == nak0
    assert (
        await consumer_redelivered(client, "BATON_RESULTS", "orchestrator-results") == redelivered0
    )
    print(f"\nfuzz baton.results: {len(bodies)} results, all terminated on first delivery")


async def test_hostile_heartbeats_neither_break_nor_misroute_anything(
    stack: LocalStack, client: Client
) -> None:
    tenant, session = "wonka", uid("s")
    bodies = draw_all(st.one_of(json_like.map(msgspec.msgpack.encode), st.binary(max_size=64),
                                st.integers(33, 50_000).map(nested)), 80)  # fmt: skip
    for data in bodies:
        await client.nc.publish("baton.workers.heartbeat.default.junk", data)
    # A ghost that claims this session's cache forever (ts = inf) and a worker
    # name that is not a subject token: neither may attract the session's job.
    ghost = {"worker": "ghost", "pool": "default", "ready": True, "engine": "sim",
             "kv_capacity_tokens": 10**9, "warm_sessions": [f"{tenant}.{session}"], "ts": math.inf}  # fmt: skip
    await client.nc.publish("baton.workers.heartbeat.default.ghost", msgpack.packb(ghost))
    await client.nc.publish(
        "baton.workers.heartbeat.default.a", msgpack.packb({**ghost, "worker": "a.b"})
    )
    for i in range(300):  # many made-up workers: tracked up to a cap, not forever
        await client.nc.publish(f"baton.workers.heartbeat.default.fake{i}",
                                msgpack.packb({**ghost, "worker": f"fake{i}", "ts": time.time(),
                                               "ready": False, "warm_sessions": []}))  # fmt: skip
    await client.nc.flush()
    done = await client.run("chat", {"tenant": tenant, "session": session, "input": "hi",
                                     "task_id": uid()}, timeout=30)  # fmt: skip
    assert done["type"] == "completed"
    text = http_get(f"{stack.orchestrator.url}/metrics")
    assert 'worker="ghost"' not in text and 'worker="a.b"' not in text
    print(f"\nfuzz baton.workers.heartbeat: {len(bodies) + 302} heartbeats, the stack still routes")
