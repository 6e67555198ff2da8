"""Dead letters watched: a message that runs out of deliveries without Baton
terminating it (every delivery stalled) is announced by JetStream, counted by
the orchestrator (``baton_max_deliveries_total``), copied to BATON_DLQ, and an
operator lists, replays and purges it with ``baton dlq``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import msgpack
import nats.errors
from nats.js import api

from baton import cli
from baton.bus import HDR_DLQ_REASON, HDR_DLQ_SUBJECT, HDR_TASK_ID
from baton.dev.testing import Client, LocalStack, metric, uid
from baton.dlq import ended, parse_advisory, task_tenant


def test_advisories_are_parsed_or_refused() -> None:
    good = json.dumps({"type": "io.nats.jetstream.advisory.v1.max_deliver", "stream": "S",
                       "consumer": "c", "stream_seq": 7, "deliveries": 5}).encode()  # fmt: skip
    adv = parse_advisory(good)
    assert adv is not None and (adv.stream, adv.consumer, adv.stream_seq, adv.deliveries) == (
        "S",
        "c",
        7,
        5,
    )
    for bad in (b"", b"\xff", b"[]", b'{"stream": "S"}', b'{"stream":"S","consumer":"c","stream_seq":0}',
                b'{"stream":"S","consumer":"c","stream_seq":"7"}'):  # fmt: skip
        assert parse_advisory(bad) is None


def baton(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(list(argv))
    return rc, out.getvalue()


def test_a_letter_of_an_ended_task_is_told_apart() -> None:
    assert task_tenant("baton.tasks.acme.chat") == "acme"
    assert task_tenant("baton.jobs.small") is None
    assert task_tenant("baton.tasks.acme") is None
    assert task_tenant("baton.tasks.a b.chat") is None
    assert ended({"type": "failed", "error": {"code": "unavailable"}}) == "failed (unavailable)"
    assert ended({"type": "completed"}) == "completed"
    assert ended({"type": "accepted"}) is None and ended([1]) is None


async def test_a_message_out_of_deliveries_is_counted_copied_and_replayable(
    stack: LocalStack, client: Client, nats_url: str
) -> None:
    # A pool of its own on BATON_JOBS: the orchestrator may read Baton's streams
    # (to copy a dead letter), not any stream of the account.
    name, consumer = "BATON_JOBS", uid("dlqc")
    subject = f"baton.jobs.{uid('dlqpool')}"
    js = client.js
    await js.add_consumer(name, api.ConsumerConfig(durable_name=consumer, ack_policy=api.AckPolicy.EXPLICIT,
                                                   ack_wait=0.5, max_deliver=2, filter_subject=subject))  # fmt: skip
    await js.publish(subject, b"poison", headers={"Baton-Task-Id": "t-dlq"})
    sub = await js.pull_subscribe_bind(durable=consumer, stream=name)
    delivered = 0
    orch = stack.orchestrator.url
    labels = {"stream": name, "consumer": consumer}
    async with asyncio.timeout(30):  # every delivery "stalls": never acked
        while metric(orch, "baton_max_deliveries_total", **labels) < 1:
            with contextlib.suppress(TimeoutError):
                delivered += len(await sub.fetch(1, timeout=0.6))
    assert delivered == 2
    assert metric(orch, "baton_max_deliveries_total", **labels) == 1

    rc, out = await asyncio.to_thread(baton, "dlq", "list", "--consumer", consumer, "--json",
                                      "--nats-url", nats_url)  # fmt: skip
    assert rc == 0, out
    letters = json.loads(out)
    assert len(letters) == 1
    letter = letters[0]
    assert letter["subject"] == subject and letter["task_id"] == "t-dlq"
    assert "max deliveries (2)" in letter["reason"]

    before = (await js.stream_info(name)).state.messages
    rc, out = await asyncio.to_thread(
        baton, "dlq", "replay", str(letter["seq"]), "--nats-url", nats_url
    )
    assert rc == 0 and f"replayed to {subject}" in out, out
    assert (await js.stream_info(name)).state.messages == before + 1
    last = await js.get_last_msg(name, subject)
    assert last.data == b"poison"
    rc, out = await asyncio.to_thread(baton, "dlq", "list", "--consumer", consumer, "--json",
                                      "--nats-url", nats_url)  # fmt: skip
    assert json.loads(out) == []  # replayed letters leave the DLQ

    # purge: refused without --yes, then deletes only this consumer's letters
    await js.publish(f"baton.dlq.{consumer}", b"x", headers={"Baton-Original-Subject": subject})
    rc, _ = await asyncio.to_thread(
        baton, "dlq", "purge", "--consumer", consumer, "--nats-url", nats_url
    )
    assert rc != 0
    rc, out = await asyncio.to_thread(baton, "dlq", "purge", "--consumer", consumer, "--yes",
                                      "--nats-url", nats_url)  # fmt: skip
    assert rc == 0 and "purged 1" in out, out
    await sub.unsubscribe()
    await js.delete_consumer(name, consumer)
    await js.purge_stream(name, subject=subject)


async def _dead_task_handled(client: Client, seq: int) -> None:
    """Once the orchestrator settled BATON_DLQ's letter ``seq`` (its handler
    publishes what it publishes before the ack)."""
    for _ in range(300):
        info = await client.js.consumer_info("BATON_DLQ", "orchestrator-dead-tasks")
        if info.ack_floor.stream_seq >= seq:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"dead letter {seq} never handled")


async def test_a_dead_lettered_task_ends_failed_for_its_tenant_and_stays_replayable(
    stack: LocalStack, client: Client, nats_url: str
) -> None:
    """Whatever dead-lettered a tenant's task (a handler failing on its last
    delivery, or JetStream's max deliveries), the tenant sees ``failed`` with
    ``unavailable`` and the copy stays in BATON_DLQ; a finished task is left
    as it is."""
    tenant = "acme"
    task_id = uid("dead")
    watcher = await Client.connect(stack.url_for(tenant), tenant=tenant)
    try:
        sub = await watcher.nc.subscribe(f"baton.events.{tenant}.{task_id}")
        await watcher.nc.flush()
        headers = {HDR_TASK_ID: task_id, HDR_DLQ_SUBJECT: f"baton.tasks.{tenant}.chat",
                   HDR_DLQ_REASON: "handler failed on its last delivery"}  # fmt: skip
        body = msgpack.packb({"tenant": tenant, "input": "x", "task_id": task_id})
        ack = await client.js.publish("baton.dlq.orchestrator-tasks", body, headers=headers)
        event = msgpack.unpackb((await sub.next_msg(timeout=15)).data)
        assert event["type"] == "failed" and event["error"]["code"] == "unavailable", event
        assert "dlq replay" in event["error"]["message"]
        kept = await client.js.get_msg("BATON_DLQ", ack.seq)
        assert kept.data == body  # the copy stays for `baton dlq replay`
        # Replaying it is refused, loudly, and the letter kept: its tenant was
        # told it failed, and the same task id would start nothing (before,
        # the replay said "replayed" and the task silently stayed failed).
        rc, out = await asyncio.to_thread(baton, "dlq", "replay", str(ack.seq),
                                          "--nats-url", nats_url)  # fmt: skip
        assert rc == 1, out
        assert f"refused: task {task_id} of {tenant} already ended failed (unavailable)" in out
        assert "new task_id" in out
        assert (await client.js.get_msg("BATON_DLQ", ack.seq)).data == body
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            extra = await sub.next_msg(timeout=2)
            raise AssertionError(f"a refused replay published an event: {extra.data!r}")
        await client.js.delete_msg("BATON_DLQ", ack.seq)
        # A task that already finished keeps its one terminal event.
        done = await watcher.run("chat", {"tenant": tenant, "input": "hi", "task_id": uid()})
        assert done["type"] == "completed"
        after = await watcher.nc.subscribe(f"baton.events.{tenant}.{done['task_id']}")
        await watcher.nc.flush()
        headers[HDR_TASK_ID] = done["task_id"]
        late = await client.js.publish("baton.dlq.orchestrator-tasks", body, headers=headers)
        await _dead_task_handled(client, late.seq)  # its event, had it one, is out
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            extra = await after.next_msg(timeout=0.5)
            raise AssertionError(f"a finished task got another event: {extra.data!r}")
    finally:
        await watcher.close()
