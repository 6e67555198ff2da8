"""A work queue's ack only unlinks a message: its bytes stay in the block
file while the block holds live messages. A consumer with ``erase_handled``
overwrites each message it handled (acked or terminated) first."""

from __future__ import annotations

import asyncio
import contextlib

from baton.bus import Delivery, Nak, Term, connect
from baton.dev.testing import uid
from baton.natsd import NatsServer
from proto.streams import ConsumerSpec, StreamSpec
from tests.ctx import raw_store_contains


async def test_handled_messages_are_overwritten_only_with_erase_handled(
    own_nats: NatsServer,
) -> None:
    secrets: dict[bool, list[bytes]] = {}
    for erase in (True, False):
        bus = await connect(own_nats.url, name="test-erase-handled")
        try:
            name = f"WQ_{'ERASE' if erase else 'PLAIN'}"
            stream = StreamSpec(name=name, subjects=(f"{name.lower()}.>",), retention="workqueue",
                                duplicate_window=1.0)  # fmt: skip
            spec = ConsumerSpec(stream=name, durable="c", filter_subject=f"{name.lower()}.>",
                                ack_wait=30.0, max_deliver=5, erase_handled=erase)  # fmt: skip
            await bus.provision(streams=[stream], consumers=[spec])
            secrets[erase] = [uid("ACKED").encode(), uid("TERMED").encode()]
            for body in (*secrets[erase], b"hold"):  # "hold" keeps the block alive
                await bus.publish(f"{name.lower()}.x", body)

            async def handle(d: Delivery) -> None:
                if d.data == b"hold":
                    raise Nak(30.0)
                if b"TERMED" in d.data:
                    raise Term("poison", dead_letter=False)

            loop = bus.consume(spec, handle)
            for _ in range(50):
                info = await bus._js.stream_info(name)
                if info.state.messages == 1:
                    break
                await asyncio.sleep(0.1)
            assert info.state.messages == 1  # both handled, "hold" still there
            bus.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop, 5)
        finally:
            await bus.close()
    await asyncio.sleep(0.2)
    for needle in secrets[True]:
        assert raw_store_contains(own_nats.store_dir, needle) == [], needle
    for needle in secrets[False]:  # the control: an ack alone leaves the bytes
        assert raw_store_contains(own_nats.store_dir, needle), needle


async def test_deleting_a_delivered_message_settles_it_on_the_server(own_nats: NatsServer) -> None:
    """What lets ``erase_handled`` skip the ack: JetStream drops a message
    deleted from the stream from its consumer's pending list (no ack pending,
    the ack floor moves past it, never redelivered), while the messages after
    it are still delivered, once each."""
    bus = await connect(own_nats.url, name="test-erase-settles")
    try:
        name = "WQ_SETTLE"
        stream = StreamSpec(name=name, subjects=("wq_settle.>",), retention="workqueue",
                            duplicate_window=1.0)  # fmt: skip
        spec = ConsumerSpec(stream=name, durable="c", filter_subject="wq_settle.>",
                            ack_wait=1.0, max_deliver=5)  # fmt: skip
        await bus.provision(streams=[stream], consumers=[spec])
        for body in (b"a", b"b", b"c"):
            await bus.publish("wq_settle.x", body)
        puller = await bus.puller(spec)
        got = await puller.fetch(2, 2.0)
        assert [d.data for d in got] == [b"a", b"b"]
        info = await bus._js.consumer_info(name, "c")
        assert (info.num_ack_pending, info.num_pending) == (2, 1)
        assert await bus.erase_messages(name, [d.stream_seq for d in got]) == 2  # no ack
        for _ in range(50):
            info = await bus._js.consumer_info(name, "c")
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.02)
        assert (info.num_ack_pending, info.num_pending) == (0, 1)
        assert info.ack_floor is not None and info.ack_floor.stream_seq == got[-1].stream_seq
        await asyncio.sleep(1.5)  # past the ack wait: an unsettled message would come again
        later = await puller.fetch(3, 1.0)
        assert [(d.data, d.num_delivered) for d in later] == [(b"c", 1)]
        await later[0].ack_sync()
        info = await bus._js.consumer_info(name, "c")
        assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
        assert (await bus._js.stream_info(name)).state.messages == 0
    finally:
        await bus.close()
