"""The door to NATS, ``baton.bus``: its public surface is pinned (a name
added or removed is a decision, made here), nats-py's client stays private,
each module holds one concern in a readable size, and a typed subscription
decodes once, counts what it cannot decode and binds the task's ids."""

from __future__ import annotations

import asyncio
import inspect
import re
import typing
from collections.abc import AsyncIterator, Iterator
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
    "Bucket", "Bus", "BusClosed", "BusUnavailable", "Consumer", "Consumption", "Delivery",
    "Entry", "Gate", "Handler", "Message", "Nak", "NotFound", "Outcome", "Published", "Puller",
    "Request", "Responder", "Settlement", "StreamState", "Subscription", "Term", "TransportError",
    "WrongLastSequence", "connect", "settlement", "tls_context",
}  # fmt: skip

BUS_METHODS = {
    # provisioning
    "provision", "ensure_stream", "ensure_consumer", "ensure_bucket", "reaches_account",
    "delete_stream", "open_bucket", "stream_names",
    # sending
    "publish", "publish_for", "notify", "request", "request_raw", "gather_raw", "serve", "subscribe", "subscribe_raw",
    # consuming
    "consume", "puller", "settle", "erase", "dead_letter",
    "stop", "stopping", "connected", "wait_stopped", "flush", "close", "refresh_credentials",
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


def _types_in(hint: object) -> Iterator[object]:
    yield hint
    for arg in typing.get_args(hint):
        yield from _types_in(arg)


def _nats_types_in_signatures(owner: object) -> dict[str, list[str]]:
    """Every nats-py type named by a public signature of ``owner`` (a class:
    its public methods and properties; a function: itself)."""
    members = (
        [(n, m) for n, m in inspect.getmembers(owner) if not n.startswith("_")]
        if inspect.isclass(owner)
        else [(getattr(owner, "__name__", "?"), owner)]
    )
    found: dict[str, list[str]] = {}
    for name, member in members:
        target = member.fget if isinstance(member, property) else member
        if not callable(target) or inspect.isclass(target):
            continue
        hints = typing.get_type_hints(target)
        bad = [
            repr(t)
            for hint in hints.values()
            for t in _types_in(hint)
            if (getattr(t, "__module__", "") or "").split(".")[0] == "nats"
        ]
        if bad:
            found[name] = bad
    return found


def test_no_nats_py_type_crosses_the_door() -> None:
    """Every public signature of the door names Baton's own types only: a
    caller never holds a nats-py ``Msg``, ``PubAck``, ``StreamInfo`` etc."""
    crossing = {
        f"{name}.{member}": bad
        for name in sorted(PUBLIC)
        for member, bad in _nats_types_in_signatures(getattr(baton.bus, name)).items()
        if callable(getattr(baton.bus, name))
    }
    assert crossing == {}


def test_the_nats_type_check_can_fail() -> None:
    from nats.aio.msg import Msg

    def leaky(msg: Msg) -> None: ...

    leaky.__annotations__ = {"msg": Msg, "return": None}  # resolved, as a module's would be
    assert _nats_types_in_signatures(leaky) == {"leaky": ["<class 'nats.aio.msg.Msg'>"]}


def test_every_module_of_the_door_is_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in BUS.glob("*.py")}
    assert len(sizes) >= 8
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_flusher_patch_applies_only_to_the_nats_py_it_was_written_for() -> None:
    low, high = PATCHED
    assert low < high
    assert patchable()  # the pinned nats-py (pyproject: >=2.16,<3) is one


def test_nats_py_privates_are_reached_only_by_the_flusher_patch_and_the_tls_check() -> None:
    """nats-py's private attributes change without notice: only the flusher
    patch (applied to the nats-py versions it was written for) and the check
    that the server offered TLS (nats-py has no public word for it) reach them."""
    privates = re.compile(r"\b(?:nc|js|kv|msg|sub|_nc|_js|_kv|_msg|_sub)\._[a-z]\w*")
    touched = {p.name: sorted(set(privates.findall(p.read_text()))) for p in BUS.glob("*.py")}
    touched = {name: found for name, found in touched.items() if found}
    assert touched.pop("connection.py") == ["nc._server_info"]
    assert list(touched) == ["flusher.py"]


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
