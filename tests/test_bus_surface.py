"""The door to NATS, ``baton.bus``: its public surface is pinned (a name
added or removed is a decision, made here), nats-py's client stays private,
each module holds one concern in a readable size, and a typed subscription
decodes once, counts what it cannot decode and binds the task's ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

import baton.bus
from baton.bus import Bus, connect
from baton.bus.flusher import PATCHED, patchable
from baton.dev.testing import uid
from baton.metrics import UNDECODABLE
from proto.messages import Cancel

BUS = Path(baton.bus.__file__).parent
MAX_MODULE_LINES = 450

PUBLIC = {
    "DIRECT_LOOKUPS", "HDR_DLQ_REASON", "HDR_DLQ_SUBJECT", "HDR_EXPECTED_LAST_SUBJECT_SEQ",
    "HDR_MSG_ID", "HDR_TASK_ID", "HDR_TRACEPARENT", "TRANSIENT",
    "Bucket", "Bus", "BusClosed", "BusUnavailable", "Delivery", "Entry", "Gate", "Handler",
    "Msg", "Nak", "NotFound", "Outcome", "Puller", "Request", "Responder", "Settlement", "Term",
    "TransportError", "WrongLastSequence", "connect", "settlement", "tls_context",
}  # fmt: skip

BUS_METHODS = {
    # provisioning
    "provision", "ensure_stream", "ensure_consumer", "ensure_bucket", "reaches_account",
    # sending
    "publish", "notify", "request", "serve", "subscribe", "subscribe_raw",
    # consuming
    "consume", "puller", "settle", "erase", "dead_letter",
    "stop", "stopping", "wait_stopped", "flush", "close",
    # streams and their messages
    "account", "read_subject", "ordered", "stream_info", "subjects", "purge", "get_msg",
    "last_msg", "publish_if_last", "sequences", "erase_messages", "erase_subject",
    "consumers", "delete_consumer", "pending", "waiting",
}  # fmt: skip


def test_the_public_surface_is_pinned() -> None:
    assert set(baton.bus.__all__) == PUBLIC
    assert all(hasattr(baton.bus, name) for name in PUBLIC)


def test_the_bus_methods_are_pinned_and_nats_py_stays_private() -> None:
    public = {name for name in dir(Bus) if not name.startswith("_")}
    assert public == BUS_METHODS
    bus = Bus(None, js=object())  # type: ignore[arg-type]
    assert not hasattr(bus, "nc") and not hasattr(bus, "js")


def test_every_module_of_the_door_is_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in BUS.glob("*.py")}
    assert len(sizes) >= 8
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_flusher_patch_applies_only_to_the_nats_py_it_was_written_for() -> None:
    low, high = PATCHED
    assert low < high
    assert patchable()  # the pinned nats-py (pyproject: >=2.16,<3) is one


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await connect(nats_url, name="test")
    yield b
    await b.close()


async def test_a_typed_subscription_decodes_counts_the_undecodable_and_binds_the_task(
    bus: Bus,
) -> None:
    subject = uid("cancel")
    got: list[tuple[Cancel, str, dict[str, object]]] = []
    arrived = asyncio.Event()

    async def on_cancel(cancel: Cancel, on: str) -> None:
        got.append((cancel, on, structlog.contextvars.get_contextvars()))
        arrived.set()

    await bus.subscribe(subject, Cancel, on_cancel)
    await bus.flush()
    undecodable = UNDECODABLE.labels(subject)
    before = undecodable._value.get()
    await bus.notify(subject, b"\xc1 not msgpack")
    await bus.notify(subject, Cancel(tenant="t1", task_id="task-1"), task_id="task-1")
    await asyncio.wait_for(arrived.wait(), 5)
    assert [(c.tenant, c.task_id, on) for c, on, _ in got] == [("t1", "task-1", subject)]
    assert got[0][2].get("task_id") == "task-1"
    assert undecodable._value.get() == before + 1
