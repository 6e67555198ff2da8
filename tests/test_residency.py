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

from baton import accounts
from baton.credentials import Credentials
from baton.dev.testing import Client, LocalStack, http_json, uid
from baton.tenants import TenantAdmin, TenantState
from baton.urls import with_creds
from proto import streams
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
    text = _where(cluster, "euco", text=True)
    print(text)
    assert text.startswith("euco: region eu\n") and text.count("placement region:eu") == 3
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


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
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
