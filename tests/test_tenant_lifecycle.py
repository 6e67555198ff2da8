"""Tenants at run time on a real nats-server in operator mode and real
service processes, none restarted: create (a task completes seconds later),
suspend (new tasks fail ``tenant_suspended``, data kept), rotate (the old
.creds refused by the server), delete (credentials refused, data erased from
the raw store, one audit record)."""

from __future__ import annotations

import asyncio
import http.cookies
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from baton import audit
from baton import sessions as S
from baton.bus import Bus, connect
from baton.dev.testing import Client, LocalStack, connect_nats, http_get, uid
from baton.natsd import NatsServer
from baton.tenants import TenantAdmin, TenantError, key_digest, read_registry
from tests.ctx import raw_store_contains

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {"BATON_TENANTS": "acme", "BATON_TENANT_ADMIN_DIR": str(server.store_dir)}
    st = LocalStack(server, tmp_path_factory.mktemp("tenancy-work"), env=env).start()
    yield st
    st.stop()


@pytest.fixture
async def admin(server: NatsServer, stack: LocalStack) -> AsyncIterator[TenantAdmin]:
    async with TenantAdmin(server.store_dir, server.address) as a:
        yield a


def _cli(server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton.cli", "tenant", *args, "--data-dir", str(server.store_dir),
         "--nats-url", server.address],
        capture_output=True, text=True, timeout=90, env={**os.environ},
    )  # fmt: skip


async def _chat(server: NatsServer, tenant: str, **kw: Any) -> dict[str, Any]:
    client = await Client.connect(server.url_for(tenant), tenant=tenant, **kw)
    try:
        return await client.run("chat", {"tenant": tenant, "input": "hi", "task_id": uid()})
    finally:
        await client.close()


async def _refused(server: NatsServer, path: Path, creds: bytes) -> None:
    """The server refuses a client presenting ``creds`` (written to ``path``
    for the client, removed after)."""
    path.write_bytes(creds)
    try:
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
            await nats.connect(server.address, user_credentials=str(path),
                               allow_reconnect=False, connect_timeout=2)  # fmt: skip
    finally:
        path.unlink()


async def test_a_tenant_created_with_the_cli_runs_a_task_within_seconds(
    server: NatsServer, stack: LocalStack
) -> None:
    started = time.monotonic()
    out = _cli(server, "create", "clico")
    assert out.returncode == 0, out.stderr
    path, key = out.stdout.splitlines()
    creds = Path(path)
    assert creds == server.creds_for("clico") and creds.stat().st_mode & 0o777 == 0o600
    assert key.startswith("bk-") and "shown once" in out.stderr, out
    assert not _stored_anywhere(server.store_dir, key)  # printed once, its digest kept
    done = await _chat(server, "clico")
    took = time.monotonic() - started
    assert done["type"] == "completed", done
    assert took < 20, took
    print(f"\ncli: tenant create -> first completed task {took:.2f} s")
    listed = _cli(server, "list", "--json")
    states = json.loads(listed.stdout)
    assert states["acme"] == "active" and states["clico"] == "active", states
    # The scaling signal (KEDA's Prometheus trigger) covers the new tenant.
    series = (
        'baton_consumer_pending_messages{consumer="orchestrator-tasks",stream="BATON_TASKS_clico"}'
    )
    deadline = time.monotonic() + 10
    while series not in http_get(f"{stack.orchestrator.url}/metrics"):
        assert time.monotonic() < deadline, "no backlog series for the new tenant"
        await asyncio.sleep(0.2)


async def test_a_created_tenant_is_fenced_like_the_others(
    server: NatsServer, admin: TenantAdmin
) -> None:
    started = time.monotonic()
    await admin.create("apico")
    done = await _chat(server, "apico")
    assert done["type"] == "completed", done
    print(f"\napi: tenant create -> first completed task {time.monotonic() - started:.2f} s")
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc).lower())

    nc = await connect_nats(server.url_for("apico"), error_cb=on_error, allow_reconnect=False)
    try:
        await nc.subscribe("baton.events.acme.>")
        await nc.publish("baton.tasks.acme.chat", b"x")
        await nc.flush()
        for _ in range(100):
            if len(refused) >= 2:
                break
            await asyncio.sleep(0.03)
        assert any("subscription" in r and "baton.events.acme" in r for r in refused), refused
        assert any("publish" in r and "baton.tasks.acme.chat" in r for r in refused), refused
    finally:
        await nc.close()


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_a_suspended_tenant_is_refused_new_tasks_and_keeps_its_data(
    server: NatsServer, stack: LocalStack, admin: TenantAdmin
) -> None:
    await admin.create("pauseco")
    before = await _chat(server, "pauseco")
    assert before["type"] == "completed"
    await admin.suspend("pauseco")
    assert (await admin.list())["pauseco"] == "suspended"
    await asyncio.sleep(0.5)  # the orchestrator follows the registry
    refused = await _chat(server, "pauseco")
    assert refused["type"] == "failed" and refused["error"]["code"] == "tenant_suspended", refused
    status, body = _post(f"{stack.orchestrator.url}/v1/tasks",
                         {"workflow": "chat", "tenant": "pauseco", "input": "hi"})  # fmt: skip
    assert status == 403 and body["error"]["code"] == "tenant_suspended", body
    # Its data stays: the earlier task still answers.
    with urllib.request.urlopen(
        f"{stack.orchestrator.url}/v1/tasks/{before['task_id']}?tenant=pauseco", timeout=10
    ) as r:
        assert json.loads(r.read())["status"] == "completed"
    await admin.resume("pauseco")
    await asyncio.sleep(0.5)
    assert (await _chat(server, "pauseco"))["type"] == "completed"


async def test_rotation_makes_the_server_refuse_the_old_creds(
    server: NatsServer, admin: TenantAdmin, tmp_path: Path
) -> None:
    await admin.create("rotco")
    old = tmp_path / "old.creds"
    old.write_bytes(server.creds_for("rotco").read_bytes())
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    live = await nats.connect(server.address, user_credentials=str(old), allow_reconnect=False,
                              closed_cb=on_closed)  # fmt: skip
    out = _cli(server, "rotate", "rotco")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(server.creds_for("rotco")), out.stdout
    assert out.stdout.splitlines()[1].startswith("bk-"), out.stdout
    await asyncio.wait_for(closed.wait(), 5)  # the live connection of the old user
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.address, user_credentials=str(old), allow_reconnect=False,
                           connect_timeout=2)  # fmt: skip
    assert old.read_bytes() != server.creds_for("rotco").read_bytes()
    assert (await _chat(server, "rotco"))["type"] == "completed"
    await live.close()


async def test_delete_revokes_the_creds_erases_the_data_and_is_audited(
    server: NatsServer, stack: LocalStack, admin: TenantAdmin
) -> None:
    await admin.create("doomed")
    secret = uid("DOOMEDSECRET")
    client = await Client.connect(server.url_for("doomed"), tenant="doomed")
    task = {"tenant": "doomed", "input": f"remember {secret}", "task_id": uid()}
    assert (await client.run("chat", task))["type"] == "completed"
    await client.close()
    store = server.store_dir / "jetstream"
    assert raw_store_contains(store, secret.encode())  # the check below can fail
    creds = server.creds_for("doomed")
    kept = creds.read_bytes()
    out = _cli(server, "delete", "doomed")
    assert out.returncode == 0, out.stderr
    assert not creds.exists()
    await _refused(server, creds, kept)
    deadline = time.monotonic() + 30
    while raw_store_contains(store, secret.encode()):
        assert time.monotonic() < deadline, raw_store_contains(store, secret.encode())
        await asyncio.sleep(0.5)
    bus = await connect(server.url, name="test-tenancy")
    try:
        records = await audit.read(bus, tenant="doomed", action=audit.ERASE_TENANT)
        assert len(records) == 1, records
    finally:
        await bus.close()
    assert "doomed" not in await admin.list()


async def test_the_operator_http_api_creates_a_tenant_that_runs_a_task(
    server: NatsServer, stack: LocalStack, tmp_path: Path
) -> None:
    started = time.monotonic()
    status, body = _post(f"{stack.orchestrator.url}/v1/tenants", {"tenant": "httpco"})
    assert status == 201, body
    creds = tmp_path / "httpco.creds"
    creds.write_text(body["creds"])
    client = await Client.connect(f"{server.address}?creds={creds}", tenant="httpco")
    try:
        done = await client.run("chat", {"tenant": "httpco", "input": "hi", "task_id": uid()})
    finally:
        await client.close()
    assert done["type"] == "completed", done
    print(f"\nhttp: POST /v1/tenants -> first completed task {time.monotonic() - started:.2f} s")
    status, body = _post(f"{stack.orchestrator.url}/v1/tenants", {"tenant": "httpco"})
    assert status == 409 and body["error"]["code"] == "conflict", body
    status, body = _post(f"{stack.orchestrator.url}/v1/tenants/httpco/suspend", {})
    assert status == 200 and body["state"] == "suspended", body
    with urllib.request.urlopen(f"{stack.orchestrator.url}/v1/tenants", timeout=10) as r:
        assert json.loads(r.read())["tenants"]["httpco"] == "suspended"


def _stored_anywhere(root: Path, secret: str) -> list[Path]:
    """The files under ``root`` holding ``secret`` (the data dir, logs)."""
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _http(url: str, key: str, body: dict[str, Any] | None = None,
          method: str | None = None) -> tuple[int, Any]:  # fmt: skip
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, method=method or ("POST" if data else "GET"),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def _console_login(url: str, key: str) -> str:
    """Log in to the run console at ``url`` by a login link for ``key``
    (``baton console``'s way); returns the session cookie."""
    status, doc = _http(f"{url}/ui/login-link", key, {})
    assert status == 200 and doc["path"].startswith("/ui/login?token="), doc
    token = doc["path"].split("token=", 1)[1]
    with urllib.request.urlopen(f"{url}{doc['path']}", timeout=10) as r:  # the link's page
        assert b"Continue" in r.read()
    form = urllib.parse.urlencode({"token": token}).encode()
    try:
        urllib.request.build_opener(_NoRedirect).open(f"{url}/ui/login", form, timeout=10)
        raise AssertionError("no redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 303 and e.headers["Location"] == "/ui/", (e.code, e.headers)
        cookie = http.cookies.SimpleCookie(e.headers["Set-Cookie"])[S.COOKIE]
    return f"{S.COOKIE}={cookie.value}"


def _form(url: str, form: bytes) -> tuple[int, Any]:
    """POST a console form, not following its redirect: (status, JSON body,
    or the redirect's location)."""
    try:
        with urllib.request.build_opener(_NoRedirect).open(url, form, timeout=10) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if e.code != 303 else e.headers["Location"]


def _with_cookie(url: str, cookie: str) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Cookie": cookie})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _until_status(urls: list[str], key: str, want: int, what: str) -> float:
    """Seconds until every one of ``urls`` answers ``key`` (or, one
    starting with ``baton_session=``, that session cookie) with ``want``."""
    started = time.monotonic()
    while True:
        got = [(_with_cookie if key.startswith(S.COOKIE) else _http)(u, key)[0] for u in urls]
        if all(g == want for g in got):
            return time.monotonic() - started
        assert time.monotonic() - started < 10, f"{what}: {got}, not {want}"
        await asyncio.sleep(0.05)


async def test_a_created_tenants_http_key_follows_its_lifecycle_on_every_replica(
    server: NatsServer, stack: LocalStack, admin: TenantAdmin
) -> None:
    """With API keys on, on two orchestrator replicas and a restart: the key
    ``POST /v1/tenants`` answers (once; only its digest is in the registry)
    submits and reads its tenant's task, on either replica; another tenant's
    key cannot read it; ``rotate`` refuses the old key and accepts the new
    one; ``suspend`` refuses it (403 ``tenant_suspended``), ``delete`` (401).
    No key reaches a log or a file."""
    operator, acme = uid("bk-op"), uid("bk-acme")
    keys = {"BATON_API_KEYS": json.dumps({operator: "*", acme: "acme"}),
            "BATON_ALLOW_NO_API_KEYS": "false"}  # fmt: skip
    a = stack.service("orchestrator", **keys)
    b = stack.service("orchestrator", **keys)
    store = stack.service("context-store", **keys)  # its HTTP API follows the registry too
    c = None
    try:
        a.wait_ready()
        b.wait_ready()
        store.wait_ready()
        stats = f"{store.url}/v1/tenants/keyco/stats"
        status, made = _http(f"{a.url}/v1/tenants", operator, {"tenant": "keyco"})
        assert status == 201, made
        key = made["api_key"]
        assert key.startswith("bk-") and "creds" in made
        entry = (await read_registry(admin.op))["keyco"]  # type: ignore[arg-type]
        assert entry.api_key == key_digest(key)
        assert not _stored_anywhere(server.store_dir, key)

        # Its key submits and reads its task, on either replica.
        await _until_status([f"{a.url}/v1/tasks", f"{b.url}/v1/tasks", stats], key, 200, "new key")
        status, accepted = _http(f"{a.url}/v1/tasks", key, {"workflow": "chat", "input": "hi"})
        assert status == 202 and accepted["tenant"] == "keyco", accepted
        task = f"{b.url}/v1/tasks/{accepted['task_id']}"
        task_a = task.replace(b.url, a.url)
        deadline = time.monotonic() + 30
        while (doc := _http(task, key))[1].get("status") != "completed":
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.2)
        status, body = _http(task, acme)  # another tenant's key
        assert status == 404 and body["error"]["code"] == "unknown_task", body
        status, body = _http(f"{a.url}/v1/tenants", key)  # the operator's API only
        assert status == 403 and body["error"]["code"] == "forbidden", body

        # Its key (only its digest is known) opens a console session, valid on both replicas.
        session = _console_login(a.url, key)
        for url in (a.url, b.url):
            status, me = _with_cookie(f"{url}/ui/session", session)
            assert status == 200 and me["scope"] == "keyco" and me["tenants"] == ["keyco"], me
            status, page = _with_cookie(f"{url}/v1/tasks", session)
            assert status == 200, page
            assert [t["task_id"] for t in page["tasks"]] == [accepted["task_id"]], page

        # Rotation: the old key refused on both replicas, the new one accepted.
        status, rotated = _http(f"{a.url}/v1/tenants/keyco/rotate", operator, {})
        assert status == 200 and rotated["api_key"] != key, rotated
        urls = [task, task_a, stats]
        took = await _until_status(urls, key, 401, "old key after rotate")
        print(f"\nrotate -> old key refused on both replicas and the store after "
              f"{took * 1000:.0f} ms")  # fmt: skip
        # ... and the console session it opened, on both replicas
        await _until_status([f"{u}/{p}" for u in (a.url, b.url) for p in ("ui/session", "v1/tasks")],
                            session, 401, "the old key's session after rotate")  # fmt: skip
        status, body = _http(task, key)
        assert body["error"]["code"] == "unauthorized", body
        new = rotated["api_key"]
        await _until_status(urls, new, 200, "new key after rotate")
        assert not _stored_anywhere(server.store_dir, new)

        # A restarted replica knows the new key from the registry alone.
        stack.retire(b)
        c = stack.service("orchestrator", **keys).wait_ready()
        task_c, b = task.replace(b.url, c.url), None
        await _until_status([task_c], new, 200, "new key after a restart")
        assert _http(task_c, key)[0] == 401

        # Suspended: refused with the one error body, data kept (the operator reads it).
        session = _console_login(c.url, new)  # the new key's session
        early = _http(f"{c.url}/ui/login-link", new, {})[1]["path"]  # used once suspended
        assert _with_cookie(f"{a.url}/v1/tasks", session)[0] == 200
        assert _http(f"{a.url}/v1/tenants/keyco/suspend", operator, {})[0] == 200
        urls = [task_a, task_c, stats]
        await _until_status(urls, new, 403, "suspended")
        await _until_status([task_a, task_c], session, 403, "suspended (session)")
        status, body = _http(task_c, new)
        assert body["error"]["code"] == "tenant_suspended" and body["error"]["type"], body
        # ... and no console login hands it a session (its calls would all be 403).
        for url in (a.url, c.url):
            status, body = _http(f"{url}/ui/login-link", new, {})
            assert status == 403 and body["error"]["code"] == "tenant_suspended", body
            # The forms a person fills in: back to the login page, which says why.
            form = urllib.parse.urlencode({"key": new}).encode()
            assert _form(f"{url}/ui/login", form) == (303, "/ui/?login=suspended")
        token = urllib.parse.urlencode({"token": early.split("token=", 1)[1]}).encode()
        assert _form(f"{c.url}/ui/login", token) == (303, "/ui/?login=suspended")
        assert _http(f"{task_c}?tenant=keyco", operator)[1]["status"] == "completed"
        assert _http(f"{a.url}/v1/tenants/keyco/resume", operator, {})[0] == 200
        await _until_status(urls, new, 200, "resumed")

        # Deleted: refused (unknown key) everywhere.
        assert _http(f"{a.url}/v1/tenants/keyco", operator, method="DELETE")[0] == 200
        await _until_status(urls, new, 401, "deleted")
        await _until_status([task_a, task_c], session, 401, "deleted (session)")
        assert _http(f"{a.url}/v1/tasks", acme)[0] == 200  # the other tenant's key still works
        for secret in (key, new):  # in no log (retired replicas' too), no file
            assert not _stored_anywhere(stack.workdir, secret)
            assert not _stored_anywhere(server.store_dir, secret)
    finally:
        for p in (a, b, c, store):
            if p is not None:
                stack.retire(p)


async def test_a_create_that_failed_half_way_is_finished_by_the_next_call(
    server: NatsServer, stack: LocalStack, admin: TenantAdmin
) -> None:
    """A push that times out (an election, a restart) leaves the tenant half
    made: not listed, and the next ``create`` finishes it with the same keys
    instead of answering "exists" with nothing registered (seen in the chaos
    tier: the orchestrator never heard of the tenant)."""
    served = admin._push_baton

    async def times_out() -> None:
        raise TimeoutError("the resolver did not answer")

    admin._push_baton = times_out  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await admin.create("halfco")
    assert "halfco" not in await admin.list()
    admin._push_baton = served  # type: ignore[method-assign]
    await admin.create("halfco")
    assert (await admin.list())["halfco"] == "active"
    done = await _chat(server, "halfco")
    assert done["type"] == "completed", done


async def test_a_delete_whose_tombstone_push_failed_is_finished_by_the_next_call(
    server: NatsServer, stack: LocalStack, admin: TenantAdmin
) -> None:
    """The keys are forgotten before the tombstone goes out: a push that
    times out then must not leave the account live with nothing left to
    revoke it. The next ``delete`` pushes the tombstone; the old .creds is
    refused."""
    await admin.create("halfgone")
    assert (await _chat(server, "halfgone"))["type"] == "completed"
    kept = server.creds_for("halfgone").read_bytes()
    pushed = admin._push

    async def times_out(token: str, *, attempts: int = 3) -> None:
        raise TimeoutError("the resolver did not answer")

    admin._push = times_out  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await admin.delete("halfgone")
    admin._push = pushed  # type: ignore[method-assign]
    assert "halfgone" not in await admin.list()
    with pytest.raises(TenantError, match="not deleted yet"):
        await admin.create("halfgone")  # a new account would leave the old one live
    await admin.delete("halfgone")
    await _refused(server, server.store_dir / "halfgone-kept.creds", kept)


async def test_the_services_were_never_restarted(server: NatsServer, stack: LocalStack) -> None:
    assert server.running
    assert all(p.proc is not None and p.proc.poll() is None for p in stack.procs)
    bus = await connect(server.url_for("acme"), name="acme-still")
    # Closed: left open, it reconnects to the stopped server and logs to the
    # stdout of later tests (test_cli parses its stdout as JSON).
    await bus.close()
    assert isinstance(bus, Bus)
