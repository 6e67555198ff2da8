"""Documents for the ``search`` tool: uploaded through the API and over NATS,
indexed by every tool worker, kept across restarts, erased with the tenant."""

from __future__ import annotations

import asyncio
import json

import msgpack
import nats

from baton.bus import Bus
from baton.dev.testing import LocalStack, uid
from baton.documents import put_document
from baton.urls import split_creds
from proto import subjects
from proto.messages import ContextDelete, DocumentPut
from proto.streams import DOCUMENTS
from tests.ctx import ask
from tests.harness import http_post
from tests.tools import call_tool, session_with_call


async def search(bus: Bus, tenant: str, query: str, pool: str = "default") -> list[str]:
    session = uid("s")
    ref = await session_with_call(bus, tenant, session)
    res = await call_tool(
        bus, tenant, session, ref, "search", {"query": query}, pool=pool, call=uid("c")
    )
    assert res.outcome == "ok", res.error
    return [h["doc_id"] for h in json.loads(res.preview)["hits"]]


async def stored(bus: Bus, tenant: str) -> int:
    info = await bus._js.stream_info(
        DOCUMENTS.name, subjects_filter=f"{subjects.DOCUMENTS}.{tenant}.>"
    )
    return sum((info.state.subjects or {}).values())


async def test_a_document_uploaded_through_the_api_is_searchable_at_once(
    stack: LocalStack, bus: Bus
) -> None:
    tenant = uid("acme")
    url = f"{stack.orchestrator.url}/v1/documents"
    up = http_post(url, {"tenant": tenant, "doc_id": "kb1", "title": "Refunds",
                         "text": "Refunds are issued within fourteen days of purchase."}, 201)  # fmt: skip
    assert (up["tenant"], up["doc_id"]) == (tenant, "kb1") and up["seq"] > 0
    assert await search(bus, tenant, "how many days for a refund?") == ["kb1"]
    bad = http_post(url, {"tenant": tenant, "doc_id": "no spaces", "text": "x"}, 400)
    assert bad["error"]["code"] == "invalid_field" and bad["error"]["param"] == "doc_id"


async def test_a_later_upload_replaces_the_document(stack: LocalStack, bus: Bus) -> None:
    tenant = uid("acme")
    await put_document(bus, DocumentPut(tenant=tenant, doc_id="d", text="the colour is red"))
    await put_document(bus, DocumentPut(tenant=tenant, doc_id="d", text="the colour is blue"))
    assert await search(bus, tenant, "blue") == ["d"]
    assert await search(bus, tenant, "red") == []


async def test_erasing_a_tenant_erases_its_documents_from_the_stream_and_the_index(
    stack: LocalStack, bus: Bus
) -> None:
    tenant, keep = uid("gone"), uid("kept")
    for t in (tenant, keep):
        await put_document(bus, DocumentPut(tenant=t, doc_id="d1", text="quarterly revenue report"))
    assert await search(bus, tenant, "revenue") == ["d1"]
    reply = await ask(bus, "delete", ContextDelete(tenant=tenant))
    assert reply.error is None and reply.documents == 1
    assert await stored(bus, tenant) == 0
    assert await search(bus, tenant, "revenue") == []
    assert await search(bus, keep, "revenue") == ["d1"]  # only that tenant


async def test_the_index_survives_a_restart_and_drops_what_was_erased_meanwhile(
    stack: LocalStack, bus: Bus
) -> None:
    pool, worker = uid("idx"), uid("tw")
    env = {"BATON_POOL": pool, "BATON_WORKER_ID": worker, "BATON_BUILTIN_TOOLS": '["search"]'}
    a, b = uid("a"), uid("b")
    proc = stack.service("tool-worker", **env).wait_ready()
    await put_document(bus, DocumentPut(tenant=a, doc_id="x", text="kafka partitions and offsets"))
    await put_document(bus, DocumentPut(tenant=b, doc_id="y", text="kafka consumer groups"))
    assert await search(bus, a, "kafka", pool) == ["x"]
    stack.retire(proc)
    assert (await ask(bus, "delete", ContextDelete(tenant=b))).documents == 1  # while it is down
    again = stack.service("tool-worker", **env).wait_ready()
    try:
        assert await search(bus, a, "kafka", pool) == ["x"]
        assert await search(bus, b, "kafka", pool) == []
        assert again.log_path is not None
        opened = [json.loads(line) for line in again.log_path.read_text().splitlines()
                  if "search_index_opened" in line]  # fmt: skip
        assert opened and opened[-1]["resumed_after"] > 0  # read from its file, not rebuilt
    finally:
        stack.retire(again)


async def test_a_tenant_uploads_over_nats_with_its_own_credentials_pinned_to_itself(
    stack: LocalStack, bus: Bus
) -> None:
    """Tenant wonka publishes ``baton.docs.<doc_id>`` in its own account: the
    server files it under wonka, searchable by wonka only. A body naming
    another tenant is not indexed for anyone, and another tenant's subject
    is refused by the server."""
    tenant, word, other = "wonka", uid("zq"), uid("zq")
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc).lower())

    servers, creds = split_creds(stack.url_for(tenant))
    nc = await nats.connect(servers, error_cb=on_error, allow_reconnect=False,
                               user_credentials=creds)  # fmt: skip
    try:
        js = nc.jetstream()
        doc = {"tenant": tenant, "doc_id": f"{word}a", "text": f"the {word} recipe uses cocoa"}
        ack = await js.publish(f"baton.docs.{word}a", msgpack.packb(doc))
        assert ack.stream == DOCUMENTS.name
        # A body claiming another tenant, on wonka's own subject: filed under wonka, skipped.
        forged = {"tenant": "acme", "doc_id": f"{word}b", "text": f"{other} forged into acme"}
        await js.publish(f"baton.docs.{word}b", msgpack.packb(forged))
        await nc.publish(f"baton.docs.acme.{word}c", msgpack.packb(forged | {"doc_id": f"{word}c"}))
        await nc.flush()
        async with asyncio.timeout(5):
            while not any(f'publish to "baton.docs.acme.{word}c"' in r for r in refused):
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert await search(bus, tenant, f"{word} recipe") == [f"{word}a"]
    assert await search(bus, tenant, other) == []
    assert await search(bus, "acme", other) == []
    info = await bus._js.stream_info(DOCUMENTS.name, subjects_filter=f"{subjects.DOCUMENTS}.>")
    mine = {s for s in info.state.subjects or {} if word in s}
    assert mine == {f"baton.docs.wonka.{word}a", f"baton.docs.wonka.{word}b"}


async def test_one_tenants_message_id_never_drops_another_tenants_document(
    stack: LocalStack, bus: Bus
) -> None:
    """Two tenants put the same doc id with the same Nats-Msg-Id: both are
    stored and indexed, each for its own tenant."""
    word = uid("dd")
    for tenant in ("wonka", "hooli"):
        servers, creds = split_creds(stack.url_for(tenant))
        nc = await nats.connect(servers, allow_reconnect=False, user_credentials=creds)
        try:
            doc = {"tenant": tenant, "doc_id": word, "text": f"{word} belongs to {tenant}"}
            ack = await nc.jetstream().publish(f"baton.docs.{word}", msgpack.packb(doc),
                                               headers={"Nats-Msg-Id": f"doc-{word}"})  # fmt: skip
            assert not ack.duplicate, tenant
        finally:
            await nc.close()
        await asyncio.sleep(0.3)  # past the stream's 100 ms de-duplication window
    for tenant in ("wonka", "hooli"):
        async with asyncio.timeout(10):
            while await search(bus, tenant, f"{word} belongs to {tenant}") != [word]:
                await asyncio.sleep(0.1)
