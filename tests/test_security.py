"""The bus as a hostile tenant sees it: tenant globex, with globex's own
credentials, tries what an unauthenticated client could do before the bus had
doors. Every refusal is asserted on what the server said (the client's
permission-violation errors, and the server's log), not only on silence."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from baton.dev.testing import Client, LocalStack, uid
from baton.urls import split_creds

ATTACKER, VICTIM = "globex", "acme"

# Internal subjects no tenant may touch (subscribe), each one refused.
INTERNAL = [
    f"baton.events.{VICTIM}.>", "baton.events.>", "baton.jobs.>", "baton.results.>",
    "baton.ctx.>", f"baton.ctx.get.{VICTIM}", "baton.ctxlog.>", "baton.ctxinval.>",
    "baton.region.>", f"baton.region.eu.ctxlog.{VICTIM}.>",
    "baton.workers.heartbeat.>", "baton.timers.>", "baton.dlq.>", "baton.cancel.>",
    "baton.tokens.>", "baton.orchestrators.load.>", "$KV.baton-runs.>", ">",
]  # fmt: skip


class Hostile:
    """A connection that records what the server refused it."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.nc: Any = None

    async def connect(self, url: str) -> Hostile:
        async def on_error(exc: Exception) -> None:
            self.refused.append(str(exc).lower())

        servers, creds = split_creds(url)
        self.nc = await nats.connect(servers, error_cb=on_error, allow_reconnect=False,
                                     user_credentials=creds)  # fmt: skip
        return self

    async def said(self, fragment: str, timeout: float = 3.0) -> bool:
        async with asyncio.timeout(timeout):
            while not any(fragment.lower() in r for r in self.refused):
                await asyncio.sleep(0.02)
        return True


@pytest.fixture
async def attacker(stack: LocalStack) -> AsyncIterator[Hostile]:
    h = await Hostile().connect(stack.url_for(ATTACKER))
    yield h
    await h.nc.close()


async def test_an_anonymous_connection_is_refused(stack: LocalStack) -> None:
    address = split_creds(stack.nats_url)[0].split("://", 1)[1].split("@")[-1]
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(f"nats://{address}", allow_reconnect=False, connect_timeout=2)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(f"nats://{ATTACKER}:wrong@{address}", allow_reconnect=False)


@pytest.mark.parametrize("subject", INTERNAL)
async def test_a_tenant_is_refused_every_other_tenants_and_every_internal_subject(
    attacker: Hostile, subject: str
) -> None:
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    await attacker.nc.subscribe(subject, cb=on_msg)
    assert await attacker.said(f'permissions violation for subscription to "{subject}"')
    assert got == []


async def test_a_tenant_cannot_call_the_context_store_or_publish_internal_subjects(
    attacker: Hostile,
) -> None:
    for subject in (f"baton.ctx.get.{VICTIM}", f"baton.ctx.append.{VICTIM}",
                    f"baton.ctx.delete.{VICTIM}", "baton.jobs.default", "baton.cancel.acme.t1",
                    f"baton.results.{VICTIM}.t1", "baton.workers.heartbeat.default.w1",
                    "baton.orchestrators.load.o1"):  # fmt: skip
        await attacker.nc.publish(subject, msgpack.packb({"tenant": VICTIM}))
        assert await attacker.said(f'permissions violation for publish to "{subject}"')


async def test_a_tenant_cannot_administer_jetstream_or_reach_the_run_store(
    attacker: Hostile,
) -> None:
    js = attacker.nc.jetstream(timeout=1.0)
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_stream(name="STEAL", subjects=["baton.>"])
    assert await attacker.said('publish to "$js.api.stream.create.steal"')
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream("BATON_EVENTS")  # even its own copy
    assert await attacker.said('publish to "$js.api.stream.delete.baton_events"')
    with pytest.raises(nats.errors.TimeoutError):
        await js.purge_stream("BATON_EVENTS")
    # Baton's streams and KV are not in the tenant's account at all.
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.NotFoundError)):
        await js.stream_info(f"BATON_TASKS_{VICTIM}")
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
        kv = await js.key_value("baton-runs")
        await kv.get(f"{VICTIM}.anything")


async def test_a_body_naming_another_tenant_fails_forbidden_and_never_runs(
    stack: LocalStack, client: Client
) -> None:
    forger = await Client.connect(stack.url_for(ATTACKER), tenant=ATTACKER)
    victim = await Client.connect(stack.url_for(VICTIM), tenant=VICTIM)
    try:
        task_id = uid()
        await forger.publish("chat", {"tenant": VICTIM, "input": "as acme", "task_id": task_id,
                                      "session": "their-session"}, msg_id=task_id)  # fmt: skip
        [failed] = await forger.events(ATTACKER, task_id)
        assert failed["type"] == "failed" and failed["error"]["code"] == "forbidden"
        # Nothing ran as the victim: no run, no event in Baton's account or the victim's.
        kv = await client.js.key_value("baton-runs")
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(f"{VICTIM}.{task_id}")
        assert await victim.events(VICTIM, task_id, timeout=1.5, until_terminal=False) == []
    finally:
        await forger.close()
        await victim.close()


async def test_task_ids_de_duplicate_per_tenant_only(stack: LocalStack) -> None:
    a = await Client.connect(stack.url_for(VICTIM), tenant=VICTIM)
    b = await Client.connect(stack.url_for(ATTACKER), tenant=ATTACKER)
    try:
        task_id = uid()
        ack_a = await a.publish("chat", {"tenant": VICTIM, "input": "mine", "task_id": task_id},
                                msg_id=task_id)  # fmt: skip
        # The same id from another tenant: not dropped, and no hint that it exists.
        ack_b = await b.publish("chat", {"tenant": ATTACKER, "input": "mine too",
                                         "task_id": task_id}, msg_id=task_id)  # fmt: skip
        assert not ack_a.duplicate and not ack_b.duplicate
        assert ack_a.stream != ack_b.stream  # one task stream per tenant
        again = await a.publish("chat", {"tenant": VICTIM, "input": "mine", "task_id": task_id},
                                msg_id=task_id)  # fmt: skip
        assert again.duplicate  # within a tenant the header still de-duplicates
        done_a = (await a.events(VICTIM, task_id))[-1]
        done_b = (await b.events(ATTACKER, task_id))[-1]
        assert done_a["type"] == done_b["type"] == "completed"
        assert done_a["session"] == done_b["session"] == task_id  # each in its own tenant
    finally:
        await a.close()
        await b.close()


async def test_a_tenant_replays_its_own_events_by_jetstream_and_sees_no_one_elses(
    stack: LocalStack,
) -> None:
    mine = await Client.connect(stack.url_for(VICTIM), tenant=VICTIM)
    other = await Client.connect(stack.url_for(ATTACKER), tenant=ATTACKER)
    try:
        task_id = uid()
        done = await mine.run("chat", {"tenant": VICTIM, "input": "hello", "task_id": task_id})
        assert done["type"] == "completed"
        # Look the stream up by subject, then an ordered consumer from the start.
        name = await mine.js.find_stream_name_by_subject(f"baton.events.{VICTIM}.{task_id}")
        assert name == "BATON_EVENTS"
        replay = await mine.events(VICTIM, task_id)  # ordered consumer, DeliverPolicy.ALL
        assert replay[0]["type"] == "accepted" and replay[-1] == done
        # The same replay for the victim's task, from the attacker's account: nothing.
        sub = await other.js.subscribe(
            f"baton.events.{VICTIM}.>", ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )  # fmt: skip
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=1.0)
    finally:
        await mine.close()
        await other.close()


async def test_a_worker_identity_cannot_publish_a_task_or_read_events(stack: LocalStack) -> None:
    worker = await Hostile().connect(stack.url_for("inference-worker"))
    try:
        await worker.nc.publish(f"baton.tasks.{VICTIM}.chat", b"{}")
        assert await worker.said(f'publish to "baton.tasks.{VICTIM}.chat"')
        await worker.nc.subscribe(f"baton.events.{VICTIM}.>")
        assert await worker.said(f'subscription to "baton.events.{VICTIM}.>"')
        await worker.nc.publish("baton.ctxlog.acme.s1", b"x")  # only the store writes history
        assert await worker.said('publish to "baton.ctxlog.acme.s1"')
        await worker.nc.publish("baton.region.eu.ctxlog.acme.s1", b"x")  # nor a region's
        assert await worker.said('publish to "baton.region.eu.ctxlog.acme.s1"')
    finally:
        await worker.nc.close()


async def test_the_server_logs_each_violation(stack: LocalStack, attacker: Hostile) -> None:
    log = stack.nats.log_path if not isinstance(stack.nats, str) else None  # type: ignore[union-attr]
    if log is None:
        pytest.skip("the NATS server is not this test's")
    await attacker.nc.subscribe("baton.jobs.>")
    assert await attacker.said("baton.jobs.>")
    await asyncio.sleep(0.2)
    # Operator mode names the account by key and label, the user by its key.
    line = re.compile(rf'"A[A-Z0-9]{{55}}/{ATTACKER}/jwt:U[A-Z0-9]{{55}}" - Subscription Violation'
                      r' - Subject "baton\.jobs\.>"')  # fmt: skip
    assert line.search(log.read_text())


def test_urls_in_logs_and_errors_never_show_a_password() -> None:
    from baton.urls import redact

    for url, shown in (
        ("nats://acme:s3cret@127.0.0.1:4222", "nats://acme:***@127.0.0.1:4222"),
        ("nats://a:s1@h:1,nats://b:s2@h:2", "nats://a:***@h:1,nats://b:***@h:2"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ):
        assert redact(url) == shown


def test_generated_secrets_never_start_with_a_digit() -> None:
    # nats-server reads a $VARIABLE's value as a config token: "1e5..." is a number, refused.
    from baton.credentials import new_secret

    assert all(new_secret()[0].isalpha() for _ in range(200))


async def test_a_tool_worker_stores_its_output_only_through_the_answer_op(
    stack: LocalStack,
) -> None:
    """Its output and result go in one ``answer`` request: no ``append``."""
    worker = await Hostile().connect(stack.url_for("tool-worker"))
    try:
        await worker.nc.publish(f"baton.ctx.append.{VICTIM}", b"x")
        assert await worker.said(f'publish to "baton.ctx.append.{VICTIM}"')
    finally:
        await worker.nc.close()
