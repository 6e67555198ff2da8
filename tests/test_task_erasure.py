"""Erasing a session (or a tenant) erases its tasks too: their events, run
entries (with metadata and outputs), pending results and dead letters leave
the raw JetStream store, the API answers 404 ``erased``, and the audit trail
says who erased what. Real nats-server, real service processes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack

from baton import audit
from baton.bus import HDR_DLQ_SUBJECT, HDR_TASK_ID, Bus, connect
from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import NatsServer
from proto import codec, subjects
from proto.messages import ContextDelete, SessionsErased
from proto.streams import DEAD_LETTERS, EVENTS, RUNS, TOKENS
from services.orchestrator.erasure import dead_letter_matches, tasks_to_erase, tombstone
from services.orchestrator.state import RunState, StepState
from tests.ctx import ask, raw_store_contains

# -- the decisions, without a broker -----------------------------------------


def _run(tenant: str, task_id: str, session: str, **steps: str) -> RunState:
    return RunState(tenant=tenant, task_id=task_id, session=session, workflow="chat", task_seq=1,
                    steps={k: StepState(agent="a", pool="p", session=v) for k, v in steps.items()})  # fmt: skip


def test_the_tasks_of_an_erased_session_are_those_that_ran_on_it_or_on_its_forks() -> None:
    runs = [
        _run("acme", "t1", "s1"),
        _run("acme", "t2", "s2", step="fork-of-s9"),  # a step ran on an erased fork
        _run("acme", "t3", "s3"),
        _run("other", "t4", "s1"),  # same session id, another tenant
    ]
    erasure = SessionsErased(tenant="acme", sessions=["s1", "fork-of-s9"])
    assert tasks_to_erase(erasure, runs) == ["t1", "t2"]
    assert tasks_to_erase(SessionsErased(tenant="acme", whole_tenant=True), runs) == [
        "t1", "t2", "t3",
    ]  # fmt: skip
    assert tasks_to_erase(SessionsErased(tenant="nobody", whole_tenant=True), runs) == []


def test_a_tombstone_keeps_ids_only_and_is_made_once() -> None:
    r = _run("acme", "t1", "s1", step="s1")
    r.metadata, r.output, r.status = {"card": "4111"}, "the answer", "completed"
    assert tombstone(r) is True
    assert (r.status, r.metadata, r.steps, r.output, r.task_seq) == ("erased", {}, {}, "", -1)
    assert (r.tenant, r.task_id, r.session) == ("acme", "t1", "s1")
    assert r.terminal and tombstone(r) is False


def test_a_dead_letter_matches_by_task_id_and_tenant() -> None:
    ids = {"t1"}
    result = {HDR_TASK_ID: "t1", HDR_DLQ_SUBJECT: "baton.results.acme.t1"}
    assert dead_letter_matches(result, b"", "acme", ids)
    assert not dead_letter_matches(result, b"", "other", ids)  # same id, another tenant
    task = {HDR_TASK_ID: "t1", HDR_DLQ_SUBJECT: "baton.tasks.chat"}
    assert dead_letter_matches(task, msgpack.packb({"tenant": "acme"}), "acme", ids)
    assert not dead_letter_matches(task, msgpack.packb({"tenant": "other"}), "acme", ids)
    assert not dead_letter_matches(task, b"\xc1 not msgpack", "acme", ids)
    assert not dead_letter_matches({HDR_TASK_ID: "t2"}, b"", "acme", ids)


# -- end to end ----------------------------------------------------------------


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _delete(url: str) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10) as r:
        return json.loads(r.read())


async def _until_erased(stack: LocalStack, bus: Bus, tenant: str, task_ids: list[str]) -> None:
    """Until the orchestrator's ``erase_tasks`` record (written once it is
    done), then check each task answers 404 ``erased``."""
    deadline = asyncio.get_running_loop().time() + 20
    while not await audit.read(bus, tenant=tenant, action=audit.ERASE_TASKS):
        assert asyncio.get_running_loop().time() < deadline, "the tasks were never erased"
        await asyncio.sleep(0.2)
    for task_id in task_ids:
        url = f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}"
        while (got := await asyncio.to_thread(_get, url))[0] != 404:
            assert asyncio.get_running_loop().time() < deadline, f"{task_id} never erased: {got}"
            await asyncio.sleep(0.2)
        assert got[1]["error"]["code"] == "erased", got


async def _run_task(client: Client, tenant: str, session: str, secret: str) -> tuple[str, str]:
    """Run a chat task whose input and metadata carry ``secret``; (task_id, output text)."""
    task_id = uid()
    done = await client.run("chat", {"tenant": tenant, "task_id": task_id, "session": session,
                                     "input": f"my card is {secret}",
                                     "metadata": {"note": f"meta {secret}"}})  # fmt: skip
    assert done["type"] == "completed", done
    return task_id, done["output"].split("] ", 1)[1]  # the generated words, unique per prompt


async def _kv_entries(bus: Bus, tenant: str, task_id: str) -> list[RunState]:
    subject = f"$KV.{RUNS.name}.{tenant}.{task_id}"
    return [codec.decode(m.data, RunState) async for m in bus.read_subject(RUNS.stream, subject)]


def _store(nats_env: tuple[str, NatsServer | None]) -> Path | None:
    return nats_env[1].store_dir if nats_env[1] is not None else None


async def test_deleting_a_session_erases_its_tasks_events_runs_and_dead_letters(
    stack: LocalStack, client: Client, bus: Bus, nats_env: tuple[str, NatsServer | None]
) -> None:
    tenant, other, session, kept_session = "erase-a", "erase-b", uid("s"), uid("keep")
    secret = uid("TASKSECRET")
    erased = [await _run_task(client, tenant, session, secret) for _ in range(2)]
    kept = await _run_task(client, tenant, kept_session, uid("KEPT"))
    theirs = await _run_task(client, other, session, uid("THEIRS"))  # same session id
    # A dead letter of an erased task (as the transport writes one), and one of
    # another tenant's task under the same id, which must stay.
    for t, body in ((tenant, secret), (other, "not theirs to erase")):
        await bus.publish(subjects.dead_letter("orchestrator-results"), body.encode(),
                          task_id=erased[0][0], headers={
                              HDR_DLQ_SUBJECT: subjects.result(t, erased[0][0])})  # fmt: skip
    store = _store(nats_env)
    outputs = [out.encode() for _, out in erased]
    if store is not None:  # the checks below can fail: the text is there now
        await asyncio.sleep(0.2)
        assert raw_store_contains(store, secret.encode())
        assert all(raw_store_contains(store, o) for o in outputs)

    ctx = next(p for p in stack.procs if p.name == "context-store")
    reply = await asyncio.to_thread(_delete, f"{ctx.url}/v1/sessions/{tenant}/{session}")
    assert reply["sessions"] == 1
    await _until_erased(stack, bus, tenant, [t for t, _ in erased])

    for task_id, _ in erased:
        events = f"{stack.orchestrator.url}/v1/tasks/{task_id}/events?tenant={tenant}"
        status, body = await asyncio.to_thread(_get, events)
        assert status == 404 and body["error"]["code"] == "erased"
        [entry] = await _kv_entries(bus, tenant, task_id)  # one revision left: the tombstone
        assert (entry.status, entry.metadata, entry.steps, entry.output) == ("erased", {}, {}, "")
    left = await bus._js.stream_info(EVENTS.name, subjects_filter=f"{subjects.EVENTS}.{tenant}.>")
    assert left.state.subjects == {subjects.event(tenant, kept[0]): 4}  # accepted, 2 steps, done
    deltas = await bus._js.stream_info(TOKENS.name, subjects_filter=f"{subjects.TOKENS}.{tenant}.>")
    assert set(deltas.state.subjects or {}) == {subjects.tokens(tenant, kept[0])}
    dlq = [m async for m in bus.read_subject(DEAD_LETTERS.name, f"{subjects.DEAD_LETTERS}.>")]
    assert b"not theirs to erase" in [m.data for m in dlq]
    assert secret.encode() not in [m.data for m in dlq]
    for t, task_id in ((tenant, kept[0]), (other, theirs[0])):  # untouched
        status, body = await asyncio.to_thread(
            _get, f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={t}"
        )
        assert status == 200 and body["status"] == "completed" and body["events"]
    if store is not None:
        await asyncio.sleep(0.2)
        assert raw_store_contains(store, secret.encode()) == []
        for o in outputs:
            assert raw_store_contains(store, o) == [], o
        assert raw_store_contains(store, kept[1].encode())  # the grep does find what is kept

    trail = await audit.read(bus, tenant=tenant)
    by_action = {r.action: r for r in trail}
    assert by_action["erase_session"].target == f"{tenant}/{session}"
    assert by_action["erase_session"].actor == "anonymous"  # no API keys on this stack
    assert by_action["erase_session"].service == "context-store"
    tasks = by_action["erase_tasks"]
    assert tasks.service == "orchestrator" and tasks.detail["tasks"] == 2
    assert tasks.detail["dead_letters"] == 1 and tasks.detail[EVENTS.name] == 8, tasks.detail
    assert tasks.detail[TOKENS.name] > 0, tasks.detail
    assert secret not in json.dumps([codec.decode(codec.encode(r), dict) for r in trail])


async def test_deleting_a_tenant_erases_every_task_of_the_tenant_only(
    stack: LocalStack, client: Client, bus: Bus, nats_env: tuple[str, NatsServer | None]
) -> None:
    tenant, other = "gone", "stays"  # tenants of their own: the first is erased whole
    secret = uid("TENANTTASK")
    erased = [await _run_task(client, tenant, uid("s"), secret) for _ in range(3)]
    kept = await _run_task(client, other, uid("s"), uid("OTHER"))
    reply = await ask(bus, "delete", ContextDelete(tenant=tenant))
    assert reply.error is None and reply.sessions == 3
    await _until_erased(stack, bus, tenant, [t for t, _ in erased])
    left = await bus._js.stream_info(EVENTS.name, subjects_filter=f"{subjects.EVENTS}.{tenant}.>")
    assert not left.state.subjects
    status, body = await asyncio.to_thread(
        _get, f"{stack.orchestrator.url}/v1/tasks/{kept[0]}?tenant={other}"
    )
    assert status == 200 and body["status"] == "completed"
    store = _store(nats_env)
    if store is not None:
        await asyncio.sleep(0.2)
        assert raw_store_contains(store, secret.encode()) == []
        assert all(raw_store_contains(store, o.encode()) == [] for _, o in erased)
    [rec] = [r for r in await audit.read(bus, tenant=tenant, action=audit.ERASE_TENANT)]
    assert (rec.actor, rec.target, rec.detail["sessions"]) == ("bus", tenant, 3)
    [done] = await audit.read(bus, tenant=tenant, action=audit.ERASE_TASKS)
    assert done.detail["tasks"] == 3


async def test_operators_read_the_trail_over_http_and_the_cli_and_tenants_cannot(
    stack: LocalStack, bus: Bus
) -> None:
    tenant = uid("aud")
    assert (await ask(bus, "delete", ContextDelete(tenant=tenant, session="s1"))).error is None
    keys = {"k-op": "*", "k-acme": tenant}
    store = stack.service("context-store", BATON_API_KEYS=json.dumps(keys)).wait_ready()
    try:
        url = f"{store.url}/v1/audit?tenant={tenant}&action=erase_session"

        def get(key: str) -> tuple[int, Any]:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, body = await asyncio.to_thread(get, "k-op")
        assert status == 200
        [rec] = body["records"]
        assert (rec["actor"], rec["target"], rec["outcome"]) == ("bus", f"{tenant}/s1", "ok")
        status, body = await asyncio.to_thread(get, "k-acme")  # a tenant's own key: refused
        assert status == 403 and body["error"]["code"] == "forbidden"
    finally:
        store.terminate()
        stack.procs.remove(store)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "baton.cli", "audit", "--tenant", tenant, "--nats-url",
        stack.nats_url, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    actions = [json.loads(line)["action"] for line in out.decode().splitlines()]
    assert "erase_session" in actions


async def test_a_running_task_erased_mid_flight_publishes_nothing_more(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    # Nobody serves the pool: the task stays running until its step times out
    # (2 attempts of 3 s); erased before that, it must never fail or complete.
    (tmp_path / "lonely.yaml").write_text(
        "name: lonely\nagents:\n"
        "  ghost: {role: ghost, system: nobody serves this pool, pool: nowhere, timeout: 3}\n"
        "steps:\n  - id: wait\n    agent: ghost\n"
    )
    stack = LocalStack(own_nats, tmp_path / "s", env={"BATON_WORKFLOWS_DIR": str(tmp_path)})
    stack.workdir.mkdir(parents=True)
    for name in ("context-store", "orchestrator"):
        stack.service(name).wait_ready()
    client = await Client.connect(own_nats.url)
    bus = await connect(own_nats.url, name="test-erase-running")
    try:
        tenant, task_id, session = "umbrella", uid(), uid("s")
        secret = uid("INFLIGHT")
        await client.publish("lonely", {"tenant": tenant, "input": secret, "task_id": task_id,
                                        "session": session, "metadata": {"m": secret}})  # fmt: skip
        started = await client.events(tenant, task_id, timeout=2, until_terminal=False,
                                      until=lambda got: len(got) >= 2)  # fmt: skip
        assert [e["type"] for e in started] == ["accepted", "step"]
        assert (
            await ask(bus, "delete", ContextDelete(tenant=tenant, session=session))
        ).error is None
        await _until_erased(stack, bus, tenant, [task_id])
        [rec] = await audit.read(bus, tenant=tenant, action=audit.ERASE_TASKS)
        assert rec.detail["running"] == 1 and rec.detail["tasks"] == 1
        # Past both step timeouts (2 x 3 s from the dispatch) and a second:
        # the watchdog finds a tombstone.
        await asyncio.sleep(max(0.0, started[-1]["ts"] + 7 - time.time()))
        assert await client.events(tenant, task_id, timeout=1, until_terminal=False) == []
        [entry] = await _kv_entries(bus, tenant, task_id)
        assert entry.status == "erased" and entry.metadata == {}
        await asyncio.sleep(0.2)
        assert raw_store_contains(own_nats.store_dir, secret.encode()) == []
    finally:
        await bus.close()
        await client.close()
        stack.stop()
