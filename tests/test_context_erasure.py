"""Deletion and retention leave nothing in the raw JetStream store; the
operator HTTP API refuses other tenants; no history travels between services."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import nats.js.errors
import pytest

from baton.bus import Bus, connect
from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import NatsServer
from proto import codec, subjects
from proto.messages import (
    ContextAttach,
    ContextDelete,
    ContextFork,
    ContextGet,
    ContextStats,
    InferenceJob,
)
from proto.sizes import MAX_SERVICE_MESSAGE_BYTES
from tests.ctx import append, ask, raw_store_contains, window


async def _raw_subjects(bus: Bus, pattern: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for stream in ("BATON_CONTEXT", "BATON_CONTEXT_ATTACHMENTS"):
        out |= (await bus._js.stream_info(stream, subjects_filter=pattern)).state.subjects or {}
    return out


async def _assert_gone(bus: Bus, store_dir: Path | None, tenant: str, secret: bytes) -> None:
    assert await _raw_subjects(bus, f"baton.*.{tenant}.>") == {}
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus._js.get_last_msg("BATON_CONTEXT", f"baton.ctxlog.{tenant}.>", direct=True)
    if store_dir is not None:  # the file store's own bytes, overwritten not just unlinked
        await asyncio.sleep(0.2)
        assert raw_store_contains(store_dir, secret) == []


async def test_deleting_a_session_erases_its_log_forks_and_attachments_from_the_raw_store(
    bus: Bus, nats_env: tuple[str, NatsServer | None]
) -> None:
    tenant, session, kid, keep = uid("acme"), uid("s"), uid("k"), uid("keep")
    secret = uid("SECRET").encode()
    await append(bus, tenant, session, "m1", f"my card is {secret.decode()}", system="sys")
    ref = (await append(bus, tenant, session, "m2", "ok", role="assistant")).ref
    assert ref is not None
    att = await ask(bus, "attach", ContextAttach(tenant=tenant, session=session, name="doc",
                                                 data=b"scan " + secret))  # fmt: skip
    assert att.error is None
    assert (await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=kid))).error is None
    await append(bus, tenant, kid, "w1", f"worker saw {secret.decode()}")
    await append(bus, tenant, keep, "m1", "unrelated")
    server = nats_env[1]
    store_dir = server.store_dir if server is not None else None
    if store_dir is not None:
        assert raw_store_contains(store_dir, secret)  # the check below can fail

    reply = await ask(bus, "delete", ContextDelete(tenant=tenant, session=session))
    assert reply.error is None
    assert (reply.sessions, reply.records, reply.attachments) == (
        2,
        5,
        1,
    )  # parent: 2 + fork note; child: fork + 1
    remaining = await _raw_subjects(bus, f"baton.*.{tenant}.>")
    assert remaining == {subjects.context_log(tenant, keep): 1}
    if store_dir is not None:
        await asyncio.sleep(0.2)
        assert raw_store_contains(store_dir, secret) == []
    assert (await window(bus, tenant, ref, 4096)).error.code == "unknown_session"  # type: ignore[union-attr]
    got = await ask(bus, "get", ContextGet(tenant=tenant, session=kid))
    assert got.error.code == "unknown_session"
    # The session id can be used again, from scratch.
    again = await append(bus, tenant, session, "m1", "fresh start")
    assert (again.length, again.duplicate) == (1, False)


async def test_deleting_a_tenant_erases_every_session_and_spares_other_tenants(
    bus: Bus, nats_env: tuple[str, NatsServer | None]
) -> None:
    tenant, other = uid("gone"), uid("stays")
    secret = uid("TENANTSECRET").encode()
    for s in (uid("s"), uid("s"), uid("s")):
        await append(bus, tenant, s, "m1", f"{secret.decode()} in {s}")
        await ask(bus, "attach", ContextAttach(tenant=tenant, session=s, name="a", data=secret))
    await append(bus, other, "s1", "m1", "other tenant")
    reply = await ask(bus, "delete", ContextDelete(tenant=tenant))
    assert (reply.sessions, reply.records, reply.attachments) == (3, 3, 3)
    server = nats_env[1]
    await _assert_gone(bus, server.store_dir if server else None, tenant, secret)
    stats = await ask(bus, "stats", ContextStats(tenant=other))
    assert (stats.sessions, stats.records) == (1, 1)


async def test_retention_expires_idle_sessions_of_a_short_lived_tenant(
    own_nats: NatsServer, tmp_path: Path
) -> None:
    brief, forever = uid("brief"), uid("forever")
    stack = LocalStack(own_nats, tmp_path / "stack")
    stack.workdir.mkdir(parents=True)
    store = stack.service("context-store", BATON_RETENTION_PER_TENANT=json.dumps({brief: 1.5}),
                          BATON_RETENTION_SWEEP_INTERVAL="0.3")  # fmt: skip
    try:
        store.wait_ready()
        bus = await connect(own_nats.url, name="test-retention")
        try:
            secret = uid("EXPIRES").encode()
            await append(bus, brief, "old", "m1", secret.decode())
            await append(bus, forever, "old", "m1", "kept")
            deadline = asyncio.get_running_loop().time() + 10
            while await _raw_subjects(bus, f"baton.ctxlog.{brief}.old"):
                assert asyncio.get_running_loop().time() < deadline, "never expired"
                await append(bus, brief, "busy", uid("m"), "still here")  # active: kept
                await asyncio.sleep(0.2)
            assert subjects.context_log(brief, "busy") in await _raw_subjects(
                bus, f"baton.*.{brief}.>"
            )
            assert await _raw_subjects(bus, f"baton.*.{forever}.>") == {
                subjects.context_log(forever, "old"): 1
            }
            await asyncio.sleep(0.2)
            assert raw_store_contains(own_nats.store_dir, secret) == []
        finally:
            await bus.close()
    finally:
        stack.stop()


def _http(method: str, url: str, key: str | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_the_operator_api_reads_and_deletes_a_session_and_refuses_other_tenants(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, session = uid("acme"), uid("s")
    await append(bus, tenant, session, "m1", "hello", system="sys")
    keys = {"k-acme": tenant, "k-evil": uid("evil"), "k-op": "*"}
    store = stack.service("context-store", BATON_API_KEYS=json.dumps(keys)).wait_ready()
    try:
        base = store.url
        url = f"{base}/v1/sessions/{tenant}/{session}"
        status, body = _http("GET", url, "k-acme")
        assert status == 200 and body["length"] == 2 and body["tokens_estimate"] > 0
        assert _http("GET", url, "k-evil")[0] == 403
        assert _http("DELETE", url, "k-evil")[0] == 403
        assert _http("GET", url)[0] == 401
        assert _http("GET", url, "k-wrong")[0] == 401
        assert _http("GET", f"{base}/v1/sessions/{tenant}/{uid('none')}", "k-op")[0] == 404
        assert _http("GET", f"{base}/v1/tenants/{tenant}/stats", "k-op")[1]["sessions"] == 1
        status, body = _http("DELETE", url, "k-acme")
        assert status == 200 and body["sessions"] == 1
        assert _http("GET", url, "k-acme")[0] == 404
    finally:
        store.terminate()
        stack.procs.remove(store)


async def test_jobs_and_results_between_services_never_carry_the_history(
    stack: LocalStack, client: Client
) -> None:
    tenant, session = "acme", uid("s")
    seen: list[tuple[str, bytes]] = []

    async def tap(msg: object) -> None:
        seen.append((msg.subject, msg.data))  # type: ignore[attr-defined]

    subs = [await client.nc.subscribe(f"{p}.>", cb=tap) for p in (subjects.JOBS, subjects.RESULTS)]
    markers = [uid("TURN") for _ in range(4)]
    for i, marker in enumerate(markers):
        body = {
            "tenant": tenant,
            "input": f"{marker} " + "z" * 400,
            "task_id": uid(),
            "session": session,
        }
        done = await client.run("chat", body)
        assert done["type"] == "completed"
        assert done["output"].startswith(f"[sim: {2 * i + 2} messages")  # resolved by ref
    await client.nc.flush()
    for sub in subs:
        await sub.unsubscribe()
    jobs = [data for subj, data in seen if subj.startswith(subjects.JOBS)]
    assert len(jobs) == 4 and len(seen) == 8
    for subj, data in seen:
        assert len(data) < MAX_SERVICE_MESSAGE_BYTES, subj
        assert not any(m.encode() in data for m in markers), subj
    sizes = [len(d) for d in jobs]
    assert max(sizes) - min(sizes) <= 4  # constant as the history grows 2 -> 8 messages
    assert all(codec.decode(d, InferenceJob).ref.version > 0 for d in jobs)
