"""Data residency on a real 3-node JetStream cluster in operator mode whose
servers carry region tags (n1, n2: ``region:eu``; n3: ``region:us``), with
the services as processes: a tenant created with ``--region eu`` has every
one of its streams (its task stream in BATON's account, its own account's
events and tokens) replicated on ``eu`` servers only — read from each
node's ``/jsz`` and from ``baton tenant where`` —, and completes a task; a
tenant without a region keeps today's placement (no tags)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import accounts, jwt
from baton.credentials import Credentials
from baton.dev.testing import Client, LocalStack, http_json, uid
from baton.tenants import TenantAdmin, TenantState
from baton.urls import with_creds
from proto import streams, subjects
from tests.chaos.cluster import Cluster

pytestmark = pytest.mark.timeout(180)

REPLICAS = 2  # a region of two servers holds an R2 stream whole
TAGS = {"n1": ("region:eu",), "n2": ("region:eu",), "n3": ("region:us",)}
ENV = {"BATON_STREAM_REPLICAS": str(REPLICAS), "BATON_TENANTS": "acme"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("residency")
    c = Cluster(root, tenants=["acme"], encrypt=False, tags=list(TAGS.values())).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stack(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {**ENV, "BATON_TENANT_ADMIN_DIR": str(cluster.data_dir)}  # the /v1/tenants API
    st = LocalStack(cluster, tmp_path_factory.mktemp("residency-work"), env=env).start()
    yield st
    st.stop()


def _held(cluster: Cluster, account: str, stream: str) -> set[str]:
    """The nodes whose own ``/jsz`` lists ``stream`` of ``account`` (its public key)."""
    out = set()
    for node in cluster.nodes:
        for acc in node.jsz().get("account_details") or []:  # type: ignore[union-attr]
            if account in (acc.get("name"), acc.get("id")) and any(
                s.get("name") == stream for s in acc.get("stream_detail") or []
            ):
                out.add(node.name)
    return out


def _where(cluster: Cluster, tenant: str, *, text: bool = False) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "tenant", "where", tenant,
         *(() if text else ("--json",)),
         "--data-dir", str(cluster.data_dir), "--nats-url", cluster.address],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "BATON_STREAM_REPLICAS": str(REPLICAS)},  # as the services'
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout if text else json.loads(out.stdout)


async def test_a_tenant_of_region_eu_keeps_every_stream_on_eu_servers(
    cluster: Cluster, stack: LocalStack
) -> None:
    started = time.monotonic()
    async with TenantAdmin(cluster.data_dir, cluster.address, replicas=REPLICAS) as admin:
        await admin.create("euco", region="eu")
        assert await admin.region("euco") == "eu"
    client = await Client.connect(with_creds(cluster.urls[0], cluster.creds_for("euco")),
                                  tenant="euco")  # fmt: skip
    try:
        done = await client.run("chat", {"tenant": "euco", "input": "hi", "task_id": uid()})
    finally:
        await client.close()
    assert done["type"] == "completed", done
    print(f"\ncreate --region eu -> first completed task {time.monotonic() - started:.2f} s")
    keys = Credentials.load_or_create(cluster.data_dir, []).keys()  # euco's too
    baton, euco = keys.account("BATON"), keys.account("euco")
    owned = [(baton, streams.tenant_tasks("euco").name), (euco, streams.TENANT_EVENTS.name),
             (euco, streams.TENANT_TOKENS.name)]  # fmt: skip
    for account, stream in owned:
        assert _held(cluster, account, stream) == {"n1", "n2"}, (stream, account)
    doc = _where(cluster, "euco")
    assert doc["region"] == "eu"
    assert [r["stream"] for r in doc["streams"]] == [s for _, s in owned]
    for row in doc["streams"]:
        assert row["placement"] == ["region:eu"], row
        assert len(row["servers"]) == REPLICAS, row
        for server in row["servers"]:
            assert server["tags"] == ["region:eu"], row
    # Its history and attachments: the context store's pair of region eu.
    assert [r["stream"] for r in doc["context"]] == ["BATON_CONTEXT_IN_eu",
                                                     "BATON_CONTEXT_ATTACHMENTS_IN_eu"]  # fmt: skip
    for row in doc["context"]:
        assert row["account"] == "BATON" and row["placement"] == ["region:eu"], row
        assert {s["name"] for s in row["servers"]} <= {"n1", "n2"}, row
    assert doc["context"][0]["servers"], doc["context"]  # its history is there
    text = _where(cluster, "euco", text=True)
    print(text)
    assert text.startswith("euco: region eu\n") and text.count("placement region:eu") == 5
    assert "BATON_CONTEXT_IN_eu" in text and text.count("(context store; shared)") == 2
    # The check above can fail: the shared streams are placed anywhere,
    # the us server among them.
    everywhere = set().union(*(_held(cluster, baton, s.name) for s in streams.ORCHESTRATOR_STREAMS))
    assert "n3" in everywhere, everywhere


async def test_a_tenant_without_a_region_is_placed_as_before(
    cluster: Cluster, stack: LocalStack
) -> None:
    doc = _where(cluster, "acme")
    assert doc["region"] is None
    assert len(doc["streams"]) == 3
    assert [r["stream"] for r in doc["context"]] == ["BATON_CONTEXT", "BATON_CONTEXT_ATTACHMENTS"]
    for row in doc["streams"]:
        assert row["placement"] == [], row
        assert len(row["servers"]) == REPLICAS, row


async def test_an_existing_tenant_given_a_region_has_its_streams_moved_there(
    cluster: Cluster, stack: LocalStack
) -> None:
    """acme (BATON_TENANTS, placed anywhere) given region eu: JetStream moves
    its streams' replicas to the eu servers, and it still runs tasks."""
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "tenant", "region", "acme", "eu",
         "--data-dir", str(cluster.data_dir), "--nats-url", cluster.address],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "BATON_STREAM_REPLICAS": str(REPLICAS)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    started = time.monotonic()
    while True:
        doc = _where(cluster, "acme")
        rows = doc["streams"]
        if all(r["placement"] == ["region:eu"] and {s["name"] for s in r["servers"]} <= {"n1", "n2"}
               and len(r["servers"]) == REPLICAS for r in rows):  # fmt: skip
            break
        assert time.monotonic() - started < 60, doc
        await asyncio.sleep(0.5)
    print(f"\nacme moved to eu in {time.monotonic() - started:.1f} s")
    client = await Client.connect(with_creds(cluster.urls[0], cluster.creds_for("acme")),
                                  tenant="acme")  # fmt: skip
    try:
        done = await client.run("chat", {"tenant": "acme", "input": "hi", "task_id": uid()})
    finally:
        await client.close()
    assert done["type"] == "completed", done


def _post(url: str, body: dict[str, Any], method: str = "POST") -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"}, method=method)  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_the_http_api_places_a_tenant_and_refuses_a_region_too_small(
    cluster: Cluster, stack: LocalStack
) -> None:
    api = stack.orchestrator.url
    status, body = _post(f"{api}/v1/tenants", {"tenant": "euhttp", "region": "eu"})
    assert status == 201 and body["region"] == "eu", body
    try:
        doc = http_json(f"{api}/v1/tenants/euhttp/where")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"where: {e.code} {e.read()!r}") from e
    assert doc["region"] == "eu" and len(doc["streams"]) == 3, doc
    for row in doc["streams"]:
        assert {s["name"] for s in row["servers"]} <= {"n1", "n2"}, row
        assert row["placement"] == ["region:eu"], row
    # One us server cannot hold an R2 stream: refused before anything is made.
    status, body = _post(f"{api}/v1/tenants", {"tenant": "usco", "region": "us"})
    assert status == 400 and body["error"]["param"] == "region", body
    assert "n3" in body["error"]["message"], body
    assert "usco" not in http_json(f"{api}/v1/tenants")["tenants"]
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "tenant", "create", "usco", "--region", "us",
         "--data-dir", str(cluster.data_dir), "--nats-url", cluster.address],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "BATON_STREAM_REPLICAS": str(REPLICAS)},
    )  # fmt: skip
    assert out.returncode == 2 and "region 'us': 1 server(s)" in out.stderr, out.stderr


def _tenant_op(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton.cli", "tenant", *args,
         "--data-dir", str(cluster.data_dir), "--nats-url", cluster.address],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "BATON_STREAM_REPLICAS": str(REPLICAS)},
    )  # fmt: skip


async def test_a_tenant_with_history_is_not_moved_and_one_without_moves_at_once(
    cluster: Cluster, stack: LocalStack
) -> None:
    """euco ran a task (its history is in BATON_CONTEXT_IN_eu): moving it is
    refused, by the API (409, the one error shape) and the CLI (exit 2),
    and its region stays. euhttp, with no history, is refused only for the
    region's size (acme, with none, moved at once above)."""
    status, body = _post(
        f"{stack.orchestrator.url}/v1/tenants/euco/region", {"region": "us"}, "PUT"
    )
    assert status == 409 and body["error"]["code"] == "conflict", body
    assert "not migrated" in body["error"]["message"], body
    out = _tenant_op(cluster, "region", "euco", "us")
    assert out.returncode == 2 and "session(s)" in out.stderr, out.stderr
    async with TenantAdmin(cluster.data_dir, cluster.address, replicas=REPLICAS) as admin:
        assert await admin.region("euco") == "eu"
        status, body = _post(
            f"{stack.orchestrator.url}/v1/tenants/euhttp/region", {"region": "us"}, "PUT"
        )
        # No history: only the region's size stands in the way (one us server, R2).
        assert status == 400 and body["error"]["param"] == "region", body
        await admin.set_region("euhttp", "eu")  # its own region: nothing to do
        assert await admin.region("euhttp") == "eu"


HOME = "eu"  # BATON_HOME_REGION of the last test ("" to see it fail without one)


async def test_with_home_region_eu_a_tenant_of_eu_runs_with_the_us_server_stopped(
    cluster: Cluster, stack: LocalStack
) -> None:
    """The services restarted with BATON_HOME_REGION=eu move every shared
    stream and bucket to the eu servers; then, with n3 (us) stopped, euco
    completes a turn and its history grows in BATON_CONTEXT_IN_eu. (Without
    a home region, the shared streams with a replica on n3 lose their
    quorum of two and the turn never ends: the report of this change.)"""
    for proc in list(stack.procs):
        stack.retire(proc)
    stack.env["BATON_HOME_REGION"] = HOME
    stack.start()
    n3 = cluster.node("n3")
    started = time.monotonic()
    while HOME:  # n3 holds nothing any more: every stream of every account moved
        held = [(a.get("name"), s.get("name")) for a in n3.jsz().get("account_details") or []  # type: ignore[union-attr]
                for s in a.get("stream_detail") or []]  # fmt: skip
        if not held:
            break
        assert time.monotonic() - started < 90, held
        await asyncio.sleep(0.5)
    print(f"\nhome region {HOME or '(none)'}: every stream off n3 in "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    eu = streams.context_home("eu").log.name
    async with TenantAdmin(cluster.data_dir, cluster.address, replicas=REPLICAS) as admin:
        assert admin.op is not None
        before = (await admin.op.stream_info(eu)).messages
    assert before > 0  # euco's first task
    n3.stop()
    # If n3 led the meta group, the eu servers elect a leader among themselves
    # first: until then JetStream API calls answer 503 (the services retry them;
    # this client's subscribe does not).
    deadline = time.monotonic() + 30
    while cluster.meta_leader() in (None, "n3"):
        assert time.monotonic() < deadline, "no meta leader on the eu servers"
        await asyncio.sleep(0.2)
    try:
        client = await Client.connect(with_creds(cluster.urls[0], cluster.creds_for("euco")),
                                      tenant="euco")  # fmt: skip
        try:
            t0 = time.monotonic()
            done = await client.run("chat", {"tenant": "euco", "input": "hi again",
                                             "task_id": uid()}, timeout=60.0)  # fmt: skip
            print(f"turn with n3 stopped: {time.monotonic() - t0:.2f} s")
        finally:
            await client.close()
        assert done["type"] == "completed", done
        async with TenantAdmin(cluster.data_dir, cluster.address, replicas=REPLICAS) as admin:
            assert admin.op is not None
            after = (await admin.op.stream_info(eu)).messages
        print(f"{eu}: {before} -> {after} messages")
        assert after > before
    finally:
        n3.spawn()
        n3.wait_ready()


def test_placement_is_a_pure_function_of_the_region() -> None:
    assert streams.region_tags("eu") == ("region:eu",)
    assert streams.region_tags(None) == streams.region_tags("") == ()
    with pytest.raises(ValueError):
        streams.region_tags("eu west")  # not an id: never a tag
    placed = streams.tenant_streams("acme", "eu")
    assert [s.name for s in placed] == ["BATON_TASKS_acme", "BATON_EVENTS", "BATON_TOKENS"]
    assert all(s.placement_tags == ("region:eu",) for s in placed)
    assert all(s.placement_tags == () for s in streams.tenant_streams("acme"))
    assert streams.placed(streams.TENANT_EVENTS, None) is streams.TENANT_EVENTS


def test_the_region_rides_in_the_registry_entry() -> None:
    state = TenantState("euco", "active", 1.0, "sha256:x", "eu")
    assert TenantState.decode("euco", state.encode()) == state
    old = b'{"state": "active", "changed_at": 1.0}'  # written before regions
    assert TenantState.decode("acme", old).region == ""


def test_a_deleted_tenant_is_never_given_keys_again(tmp_path: Path) -> None:
    creds = Credentials.load_or_create(tmp_path, ["acme", "doomed"])
    creds.forget("doomed")
    creds.save()
    again = Credentials.load_or_create(tmp_path, ["acme", "doomed"])  # BATON_TENANTS unchanged
    assert again.tenants() == ["acme"] and again.deleted == ["doomed"]
    assert again.live(["acme", "doomed"]) == ["acme"]
    assert "doomed" not in again.api_keys


def test_server_tags_reach_the_server_config(tmp_path: Path) -> None:
    creds = Credentials.load_or_create(tmp_path, ["acme"])
    conf = accounts.render_operator(["acme"], creds.keys(), resolver_dir="jwt",
                                    server_tags=["region:eu"])  # fmt: skip
    assert conf["server_tags"] == ["region:eu"]
    assert "server_tags" not in accounts.render_operator(["acme"], creds.keys(), resolver_dir="j")


def test_the_context_store_maps_a_tenant_region_to_one_pair_of_streams() -> None:
    shared = streams.context_home(None)
    assert streams.context_home("") is shared
    assert (shared.log, shared.attachments) == (streams.CONTEXT, streams.CONTEXT_ATTACHMENTS)
    assert shared.log_subject("acme", "s1") == subjects.context_log("acme", "s1")
    assert shared.attachment_subject("acme", "s1", "a") == subjects.context_attachment(
        "acme", "s1", "a"
    )
    eu = streams.context_home("eu")
    assert (eu.log.name, eu.attachments.name) == (
        "BATON_CONTEXT_IN_eu",
        "BATON_CONTEXT_ATTACHMENTS_IN_eu",
    )
    assert eu.log.placement_tags == eu.attachments.placement_tags == ("region:eu",)
    assert eu.log_subject("acme", "s1") == "baton.region.eu.ctxlog.acme.s1"
    assert eu.attachment_subject("acme", "s1", "a") == "baton.region.eu.ctxatt.acme.s1.a"
    assert eu.log_pattern("acme") == "baton.region.eu.ctxlog.acme.*"
    assert eu.attachment_pattern("acme") == "baton.region.eu.ctxatt.acme.*.*"
    assert eu.log_origin(eu.log_subject("acme", "s1")) == ("acme", "s1")
    assert shared.log_origin(shared.log_subject("acme", "s1")) == ("acme", "s1")
    # The limits of the shared streams, one pair per region (not per tenant).
    assert eu.log.max_msg_size == streams.CONTEXT.max_msg_size
    assert streams.context_home("eu") == eu
    with pytest.raises(ValueError):
        streams.context_home("eu.west")  # never a token of a subject or part of a name


def _overlap(a: str, b: str) -> bool:
    """Whether two subject patterns can match one subject (NATS's rules)."""
    x, y = a.split("."), b.split(".")
    for i, (p, q) in enumerate(zip(x, y, strict=False)):
        if ">" in (p, q):
            return True
        if p != q and "*" not in (p, q):
            return False
        if i == min(len(x), len(y)) - 1:
            return len(x) == len(y)
    return False


def test_no_regional_context_stream_overlaps_another_stream() -> None:
    """JetStream refuses a stream whose subjects overlap another's."""
    regional = [s for r in ("eu", "us") for s in (streams.context_home(r).log,
                                                  streams.context_home(r).attachments)]  # fmt: skip
    others = [*streams.ALL_STREAMS, streams.tenant_tasks("acme"), *regional]
    for spec in regional:
        for other in others:
            if other is spec:
                continue
            for a in spec.subjects:
                for b in other.subjects:
                    assert not _overlap(a, b), (spec.name, a, other.name, b)
    assert _overlap("baton.ctxlog.>", "baton.ctxlog.a.b")  # the check itself
    assert _overlap("baton.region.*.ctxlog.>", "baton.region.eu.ctxlog.>")


def test_the_context_store_may_use_each_region_stream_by_name_and_no_other_role_may() -> None:
    roles = accounts.service_roles(["acme"], regions=["eu", "us"])
    store = roles[accounts.CONTEXT_STORE].permissions(["acme"])["publish"]["allow"]
    assert "baton.region.*.ctxlog.>" in store and "baton.region.*.ctxatt.>" in store
    for name in ("BATON_CONTEXT_IN_eu", "BATON_CONTEXT_ATTACHMENTS_IN_us"):
        assert f"$JS.API.STREAM.CREATE.{name}" in store
        assert f"$JS.API.STREAM.MSG.DELETE.{name}" in store
    # Named one by one: no wildcard over stream names.
    assert not [p for p in store if p.startswith("$JS.API.") and p.split(".")[-1] == "*"]
    assert not any("_IN_eu" in p for p in accounts.service_roles(["acme"])[
        accounts.CONTEXT_STORE].permissions(["acme"])["publish"]["allow"])  # fmt: skip
    # It reads and follows the tenant registry, never writes it.
    assert "$JS.API.CONSUMER.CREATE.KV_baton-tenants.>" in store
    assert not any(p.startswith("$KV.baton-tenants") for p in store)
    assert "$JS.API.STREAM.UPDATE.KV_baton-tenants" not in store
    for role in set(roles) - {accounts.CONTEXT_STORE}:
        allowed = roles[role].permissions(["acme"])["publish"]["allow"]
        assert not any("baton.region" in p or "_IN_" in p for p in allowed), role


def test_the_regions_ride_in_the_secrets_and_the_store_creds(tmp_path: Path) -> None:
    creds = Credentials.load_or_create(tmp_path, ["acme"])
    creds.regions.append("eu")
    creds.save()
    again = Credentials.load_or_create(tmp_path, ["acme"])
    assert again.regions == ["eu"]
    path = again.write_creds(["acme"])[accounts.CONTEXT_STORE]
    claims = jwt.decode(jwt.creds_jwt(path.read_text()))
    assert "$JS.API.STREAM.CREATE.BATON_CONTEXT_IN_eu" in claims["nats"]["pub"]["allow"]
