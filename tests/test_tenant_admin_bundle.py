"""The tenant lifecycle from the tenant-admin bundle alone (what compose and
Kubernetes mount into the orchestrator): the operator's and BATON's signing
keys and the system user's ``.creds``, never the operator's identity key.
On a real nats-server in operator mode and real service processes, the
orchestrator's ``/v1/tenants`` creates a tenant whose ``.creds`` submits and
reads its own subjects, suspends, rotates and deletes it; a directory
without the signing keys is refused with a clear error."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from baton import accounts, jwt
from baton.bus import connect
from baton.credentials import ADMIN_BUNDLE, SECRETS_FILE, Credentials
from baton.dev.testing import Client, LocalStack, uid
from baton.natsd import NatsServer
from baton.tenants import (
    AdminKeysError,
    KeysElsewhere,
    TenantAdmin,
    open_keys,
    read_registry,
    seal_keys,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def bundle(server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle as `baton nats-auth` writes it, copied away from the full keys."""
    creds = Credentials.load_or_create(server.store_dir, ["acme"])
    creds.write_admin_bundle(server.store_dir / ADMIN_BUNDLE, ["acme"])
    dest = tmp_path_factory.mktemp("admin") / "tenant-admin"
    shutil.copytree(server.store_dir / ADMIN_BUNDLE, dest)
    return dest


@pytest.fixture(scope="module")
def stack(
    server: NatsServer, bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    st = LocalStack(server, tmp_path_factory.mktemp("bundle-work"), env={"BATON_TENANTS": "acme"})
    st.workdir.mkdir(parents=True, exist_ok=True)
    # As in compose: the orchestrator's .creds is the bundle's (re-issued there per tenant).
    orch_creds = bundle / "secrets" / "creds" / f"{accounts.ORCHESTRATOR}.creds"
    admin_env = {"BATON_TENANT_ADMIN_DIR": str(bundle), "BATON_NATS_CREDS": str(orch_creds)}
    procs = [st.service("context-store"), st.service("orchestrator", **admin_env), st.worker()]
    try:
        for p in procs:
            p.wait_ready()
    except BaseException:
        st.stop()
        raise
    yield st
    st.stop()


def _call(url: str, body: dict[str, Any] | None = None, method: str = "POST") -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=90) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _chat(server: NatsServer, creds: Path, tenant: str) -> dict[str, Any]:
    client = await Client.connect(f"{server.address}?creds={creds}", tenant=tenant)
    try:
        return await client.run("chat", {"tenant": tenant, "input": "hi", "task_id": uid()})
    finally:
        await client.close()


async def _refused(server: NatsServer, creds: Path) -> None:
    with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
        await nats.connect(server.address, user_credentials=str(creds), allow_reconnect=False,
                           connect_timeout=2)  # fmt: skip


def test_the_bundle_holds_no_identity_key_of_the_operator_baton_or_sys(
    server: NatsServer, bundle: Path
) -> None:
    full = json.loads((server.store_dir / SECRETS_FILE).read_text())["nkeys"]
    secret = [full["operator"], full[f"account:{accounts.BATON_ACCOUNT}"],
              full[f"account:{accounts.SYSTEM_ACCOUNT}"], full["user:operator"]]  # fmt: skip
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    assert {p.relative_to(bundle).as_posix() for p in files} == {
        "secrets/nats.json",
        "secrets/creds/system.creds",
        "secrets/creds/orchestrator.creds",
    }
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
        text = path.read_text()
        assert not any(seed in text for seed in secret), path
    doc = json.loads((bundle / SECRETS_FILE).read_text())
    assert doc["bundle"] is True and "cipher_key" not in doc
    assert doc["nkeys"]["signing:operator"].startswith("SO")
    assert doc["nkeys"]["signing:BATON"].startswith("SA")
    # The server trusts both: the operator JWT and BATON's list them.
    keys = Credentials.load_or_create(server.store_dir, []).keys()
    conf = accounts.operator_auth(["acme"], keys, resolver_dir="jwt")
    op = jwt.decode(conf["operator"])
    assert op["nats"]["signing_keys"] == [keys.signing["operator"].public]
    baton = jwt.decode(conf["resolver_preload"][keys.account(accounts.BATON_ACCOUNT)])
    assert baton["nats"]["signing_keys"] == [keys.signing["BATON"].public]


async def test_the_bundle_alone_creates_suspends_rotates_and_deletes_a_tenant(
    server: NatsServer, bundle: Path, stack: LocalStack, tmp_path: Path
) -> None:
    base = f"{stack.orchestrator.url}/v1/tenants"
    status, body = _call(base, {"tenant": "bundleco"})
    assert status == 201, body
    # Its HTTP API key is answered once: the pod's copy of the bundle keeps none.
    assert body["api_key"].startswith("bk-")
    assert not [p for p in bundle.rglob("*") if p.is_file() and body["api_key"] in p.read_text()]
    creds = tmp_path / "bundleco.creds"
    creds.write_text(body["creds"])
    done = await _chat(server, creds, "bundleco")  # submits, reads its own events
    assert done["type"] == "completed", done
    # Its account was signed by the operator's signing key, not the identity key.
    keys = Credentials.load_or_create(bundle, []).keys()
    pub = keys.account("bundleco")
    claims = jwt.decode((server.resolver_dir / f"{pub}.jwt").read_text())
    assert claims["iss"] == keys.signing["operator"].public, claims["iss"]
    orch = jwt.decode(jwt.creds_jwt((bundle / "secrets/creds/orchestrator.creds").read_text()))
    assert orch["iss"] == keys.signing["BATON"].public
    assert orch["nats"]["issuer_account"] == keys.account(accounts.BATON_ACCOUNT)
    # Its own JetStream copy of its events replays for it.
    nc = await nats.connect(server.address, user_credentials=str(creds))
    try:
        info = await nc.jetstream().stream_info("BATON_EVENTS")
        assert info.state.messages >= 1, info
    finally:
        await nc.close()

    status, body = _call(f"{base}/bundleco/suspend", {})
    assert status == 200 and body["state"] == "suspended", body
    await asyncio.sleep(0.5)  # the orchestrator follows the registry
    refused = await _chat(server, creds, "bundleco")
    assert refused["type"] == "failed" and refused["error"]["code"] == "tenant_suspended"
    status, body = _call(f"{base}/bundleco/resume", {})
    assert status == 200, body
    await asyncio.sleep(0.5)

    status, body = _call(f"{base}/bundleco/rotate", {})
    assert status == 200, body
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.address, user_credentials=str(creds), allow_reconnect=False,
                           connect_timeout=2)  # fmt: skip
    creds.write_text(body["creds"])
    assert (await _chat(server, creds, "bundleco"))["type"] == "completed"

    status, body = _call(f"{base}/bundleco", method="DELETE")
    assert status == 200 and body["state"] == "deleted", body
    with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
        await nats.connect(server.address, user_credentials=str(creds), allow_reconnect=False,
                           connect_timeout=2)  # fmt: skip
    status, body = _call(base, method="GET")
    assert status == 200 and "bundleco" not in body["tenants"] and "acme" in body["tenants"]
    # The deployment's own tenant still runs: BATON kept its imports.
    assert (await _chat(server, server.creds_for("acme"), "acme"))["type"] == "completed"


def test_a_tenants_sealed_keys_open_only_with_the_deployments_signing_key_and_name(
    tmp_path: Path,
) -> None:
    """What the registry entry carries: the tenant's seeds and revocations,
    opened by any holder of the operator's signing key (the full keys, any
    copy of the bundle) for that tenant only."""
    full = Credentials.load_or_create(tmp_path / "full", ["acme"])
    full.nkeys["revocations:acme"] = json.dumps({"UOLD": 1})
    sealed = seal_keys(full, "acme")
    assert not any(v in sealed for k, v in full.nkeys.items() if k.endswith(":acme"))
    full.write_admin_bundle(tmp_path / "bundle", ["acme"])
    bundle = Credentials.load_or_create(tmp_path / "bundle", [])
    mine = {k: v for k, v in full.nkeys.items() if k.endswith(":acme")}
    assert open_keys(bundle, "acme", sealed) == mine
    with pytest.raises(KeysElsewhere):
        open_keys(bundle, "beta", sealed)  # another tenant's entry
    with pytest.raises(KeysElsewhere):
        open_keys(Credentials.load_or_create(tmp_path / "other", []), "acme", sealed)


async def test_a_directory_without_the_signing_keys_is_refused(
    server: NatsServer, bundle: Path, tmp_path: Path
) -> None:
    stripped = tmp_path / "stripped"
    shutil.copytree(bundle, stripped)
    doc = json.loads((stripped / SECRETS_FILE).read_text())
    for k in ("signing:operator", "signing:BATON"):
        del doc["nkeys"][k]
    (stripped / SECRETS_FILE).write_text(json.dumps(doc))
    with pytest.raises(AdminKeysError, match="operator's signing key, BATON's signing key"):
        TenantAdmin(stripped, server.address)
    with pytest.raises(AdminKeysError, match="no tenant keys"):
        TenantAdmin(tmp_path / "empty", server.address)
    assert not (tmp_path / "empty").exists()  # nothing created in its place


async def test_a_replica_with_its_own_copy_of_the_bundle_follows_and_keeps_the_others(
    server: NatsServer, stack: LocalStack, tmp_path: Path
) -> None:
    """Two orchestrators, each with its own copy of the bundle (Kubernetes
    pods copy it from the Secret): a tenant created through one is served by
    the other, which re-issues its own .creds; a tenant created through the
    other keeps the first one in BATON's imports (its account key is in the
    registry); the other rotates it (its keys are sealed in the registry
    entry, which a pod that did not create it, or restarted, opens) and
    deletes it."""
    copy = tmp_path / "pod-b"
    shutil.copytree(server.store_dir / ADMIN_BUNDLE, copy)
    own = copy / "secrets" / "creds" / f"{accounts.ORCHESTRATOR}.creds"
    b = stack.service("orchestrator", BATON_TENANT_ADMIN_DIR=str(copy),
                      BATON_NATS_CREDS=str(own)).wait_ready()  # fmt: skip
    try:
        a_url, b_url = f"{stack.orchestrator.url}/v1/tenants", f"{b.url}/v1/tenants"
        status, body = _call(a_url, {"tenant": "replica"})
        assert status == 201, body
        first = tmp_path / "replica.creds"
        first.write_text(body["creds"])
        deadline = asyncio.get_running_loop().time() + 15
        while "BATON_TASKS_replica" not in json.dumps(jwt.decode(jwt.creds_jwt(own.read_text()))):
            assert asyncio.get_running_loop().time() < deadline, "B never re-issued its .creds"
            await asyncio.sleep(0.2)
        status, body = _call(b_url, {"tenant": "replicb"})
        assert status == 201, body
        second = tmp_path / "replicb.creds"
        second.write_text(body["creds"])
        keys = Credentials.load_or_create(server.store_dir, []).keys()
        baton = jwt.decode((server.resolver_dir /
                            f"{keys.account(accounts.BATON_ACCOUNT)}.jwt").read_text())  # fmt: skip
        imported = {i["name"] for i in baton["nats"]["imports"]}
        assert {"js-acme", "js-replica", "js-replicb"} <= imported, imported
        assert (await _chat(server, first, "replica"))["type"] == "completed"
        assert (await _chat(server, second, "replicb"))["type"] == "completed"
        # B did not make it (nor does a restarted pod keep it): it rotates it
        # with the keys sealed in the registry entry.
        status, body = _call(f"{b_url}/replica/rotate", {})
        assert status == 200, body
        await _refused(server, first)
        by_b = tmp_path / "replica-b.creds"
        by_b.write_text(body["creds"])
        assert (await _chat(server, by_b, "replica"))["type"] == "completed"
        # A rotates it next with the registry's keys, not its own stale copy:
        # B's user is refused as well as the first one.
        status, body = _call(f"{a_url}/replica/rotate", {})
        assert status == 200, body
        await _refused(server, by_b)
        await _refused(server, first)
        by_a = tmp_path / "replica-a.creds"
        by_a.write_text(body["creds"])
        assert (await _chat(server, by_a, "replica"))["type"] == "completed"
        # The registry holds them sealed: no seed of the tenant in the clear.
        seeds = [v for k, v in Credentials.load_or_create(copy, []).nkeys.items()
                 if k.endswith(":replica") and v.startswith("S")]  # fmt: skip
        bus = await connect(server.url, name="test-registry")
        try:
            entry = (await read_registry(bus))["replica"]
        finally:
            await bus.close()
        assert seeds and entry.keys and not any(seed in entry.encode().decode() for seed in seeds)
        status, body = _call(f"{b_url}/replica", method="DELETE")
        assert status == 200, body
        await _refused(server, by_a)
        assert (await _chat(server, second, "replicb"))["type"] == "completed"
    finally:
        stack.retire(b)
