"""The bus twin (``baton.dev.twin``) keeps the bus's contract: every test
here runs the same body against the twin and against a real nats-server, so
what the shells' tests rely on in the twin — msg-id de-duplication, KV
compare-and-set, nak with delay, redelivery up to ``max_deliver``, term,
ack, and how a pull request is answered (the pull loop's one wire) — is
what NATS does. A twin is never the only thing a behaviour is
tested against."""

from __future__ import annotations

import ast
import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from baton.bus import Bus, Delivery, Nak, Term, WrongLastSequence, connect
from baton.dev.testing import uid
from baton.dev.twin import TwinBucket, TwinBus, matches
from proto import subjects
from proto.messages import Cancel
from proto.streams import DEAD_LETTERS, BucketSpec, ConsumerSpec, StreamSpec


@pytest.fixture(params=["twin", "nats"])
async def door(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "twin":
        bus: Bus = TwinBus()
    else:
        bus = await connect(request.getfixturevalue("nats_url"), name="test-bus-twin")
    await bus.provision(streams=[DEAD_LETTERS])
    yield bus
    await bus.close()


async def _queue(bus: Bus, max_deliver: int = 3) -> tuple[ConsumerSpec, str]:
    prefix = uid("twin")
    stream = StreamSpec(uid("TWIN"), (f"{prefix}.>",), "workqueue", duplicate_window=60.0)
    spec = ConsumerSpec(stream.name, uid("c"), f"{prefix}.>", ack_wait=5.0, max_deliver=max_deliver)
    await bus.provision(streams=[stream], consumers=[spec])
    return spec, f"{prefix}.one"


async def _waited(cond, seconds: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.01)


async def _handle_until(bus: Bus, spec: ConsumerSpec, handler, done) -> None:  # type: ignore[no-untyped-def]
    """Run a loop until ``done()``, and 50 ms more (what else comes is seen), then stop it."""
    loop = bus.consume(spec, handler)
    try:
        await _waited(done, 10.0)
        await asyncio.sleep(0.05)
    finally:
        loop.stop()
    await asyncio.wait_for(loop, 10)


async def test_a_msg_id_is_stored_once_within_the_window(door: Bus) -> None:
    _, subject = await _queue(door)
    first = await door.publish(subject, b"a", msg_id="m-1")
    again = await door.publish(subject, b"a", msg_id="m-1")
    other = await door.publish(subject, b"b", msg_id="m-2")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.seq == first.seq and other.seq == first.seq + 1


async def test_kv_writes_are_compare_and_set(door: Bus) -> None:
    kv = await door.ensure_bucket(BucketSpec(name=uid("twinkv"), history=4))
    rev = await kv.create("acme.t1", b"v1")
    with pytest.raises(WrongLastSequence):
        await kv.create("acme.t1", b"again")
    rev2 = await kv.update("acme.t1", b"v2", last=rev)
    assert rev2 > rev
    with pytest.raises(WrongLastSequence):
        await kv.update("acme.t1", b"stale", last=rev)
    got = await kv.get("acme.t1")
    assert got is not None and (got.value, got.revision) == (b"v2", rev2)
    await kv.create("acme.t2", b"x")
    assert [e.key for e in await kv.entries("acme.*")] == ["acme.t1", "acme.t2"]
    assert await kv.get("acme.none") is None


async def test_a_nak_with_delay_comes_back_after_the_delay_and_an_ack_ends_it(door: Bus) -> None:
    spec, subject = await _queue(door)
    await door.publish(subject, b"x")
    seen: list[tuple[int, float]] = []

    async def handler(d: Delivery) -> None:
        seen.append((d.num_delivered, time.monotonic()))
        if d.num_delivered == 1:
            raise Nak(0.3)

    await _handle_until(door, spec, handler, lambda: len(seen) >= 2)
    await asyncio.sleep(0.2)  # an acked message never comes again
    await _handle_until(door, spec, handler, lambda: True)
    assert [n for n, _ in seen] == [1, 2]
    assert seen[1][1] - seen[0][1] >= 0.25


async def test_redelivery_stops_at_max_deliver_with_one_dead_letter(door: Bus) -> None:
    spec, subject = await _queue(door, max_deliver=3)
    await door.publish(subject, b"always naked", task_id="t-9")
    seen: list[int] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.num_delivered)
        raise Nak(0.02, "not yet")

    dlq = subjects.dead_letter(spec.durable)
    await _handle_until(door, spec, handler, lambda: len(seen) >= 3)
    await _handle_until(door, spec, handler, lambda: True)
    assert seen == [1, 2, 3]
    copy = await door.last_msg(DEAD_LETTERS.name, dlq)
    assert copy is not None and copy.data == b"always naked"
    assert copy.headers["Baton-Dead-Letter-Reason"].startswith("nak on last delivery")


async def test_a_term_is_never_redelivered_and_dead_letters_only_if_it_says_so(door: Bus) -> None:
    spec, subject = await _queue(door)
    await door.publish(subject, b"poison")
    await door.publish(subject, b"answered")
    seen: list[bytes] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.data)
        raise Term("bad", dead_letter=d.data == b"poison")

    await _handle_until(door, spec, handler, lambda: len(seen) >= 2)
    await asyncio.sleep(0.1)
    await _handle_until(door, spec, handler, lambda: True)
    assert sorted(seen) == [b"answered", b"poison"]
    copy = await door.last_msg(DEAD_LETTERS.name, subjects.dead_letter(spec.durable))
    assert copy is not None and copy.data == b"poison"


async def test_an_erased_delivery_is_settled_without_an_ack(
    door: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a delivered message from its stream takes it off the
    consumer's pending list as an ack does: with ``erase_handled`` a handled
    message is erased and no ack is sent, yet it never comes again (past its
    ack wait) while the next one still does. An erasure that fails is acked."""
    prefix = uid("twin")
    stream = StreamSpec(uid("TWIN"), (f"{prefix}.>",), "workqueue", duplicate_window=60.0)
    spec = ConsumerSpec(stream.name, uid("c"), f"{prefix}.>", ack_wait=1.0, max_deliver=3,
                        erase_handled=True)  # fmt: skip
    await door.provision(streams=[stream], consumers=[spec])
    acks: list[bytes] = []
    real_ack = Delivery.ack

    async def counted(d: Delivery) -> None:
        acks.append(d.data)
        await real_ack(d)

    monkeypatch.setattr(Delivery, "ack", counted)
    seen: list[tuple[bytes, int]] = []

    async def handler(d: Delivery) -> None:
        seen.append((d.data, d.num_delivered))

    async def past_ack_wait() -> None:
        if isinstance(door, TwinBus):
            door.advance(1.5)
        else:
            await asyncio.sleep(1.5)

    await door.publish(f"{prefix}.one", b"a")
    await _handle_until(door, spec, handler, lambda: len(seen) >= 1)
    await past_ack_wait()
    await door.publish(f"{prefix}.one", b"b")
    await _handle_until(door, spec, handler, lambda: len(seen) >= 2)
    await _handle_until(door, spec, handler, lambda: True)
    assert seen == [(b"a", 1), (b"b", 1)] and acks == []

    async def broken(stream: str, seqs: object) -> int:
        raise RuntimeError("no erasure today")

    monkeypatch.setattr(door, "erase_messages", broken)
    await door.publish(f"{prefix}.one", b"c")
    await _handle_until(door, spec, handler, lambda: len(seen) >= 3)
    await past_ack_wait()
    await _handle_until(door, spec, handler, lambda: True)
    assert seen[2:] == [(b"c", 1)] and acks == [b"c"]


async def test_stopping_a_loops_handle_ends_that_loop_alone(door: Bus) -> None:
    spec, subject = await _queue(door)
    other_spec, other_subject = await _queue(door)
    got: list[bytes] = []
    other: list[bytes] = []

    async def into(seen: list[bytes], d: Delivery) -> None:
        seen.append(d.data)

    first = door.consume(spec, lambda d: into(got, d))
    beside = door.consume(other_spec, lambda d: into(other, d))
    await door.publish(subject, b"1")
    await _waited(lambda: got == [b"1"])
    first.stop()
    await asyncio.wait_for(first, 5)  # ended: awaiting it returns
    await door.publish(subject, b"2")
    await door.publish(other_subject, b"x")
    await _waited(lambda: other == [b"x"])  # the other loop goes on
    await asyncio.sleep(0.1)
    assert got == [b"1"]  # the stopped one takes nothing more
    second = door.consume(spec, lambda d: into(got, d))
    await _waited(lambda: got == [b"1", b"2"])  # what it left is there for the next loop
    second.stop()
    beside.stop()
    await asyncio.wait_for(asyncio.gather(second, beside), 5)


async def _pass(door: Bus, seconds: float) -> None:
    """Let ``seconds`` pass: the twin's clock moves on at once, a real server's is waited out."""
    if isinstance(door, TwinBus):
        door.advance(seconds)
        await asyncio.sleep(0.01)  # the inbox's task hands over what arrived
    else:
        await asyncio.sleep(seconds)


async def test_a_pull_request_is_answered_as_nats_server_answers_it(door: Bus) -> None:
    """What ``Bus.consume``'s pull loop (``baton.bus.pull``) hears on its
    inbox: messages as they come, a 100 heartbeat per idle interval, a 408
    at expiry carrying what was not delivered; a full batch ends in silence;
    a request whose inbox nobody listens on any more is dropped; a request
    to no consumer is a 503."""
    spec, subject = await _queue(door)
    nc = door._nc
    heard: list[tuple[str, str]] = []

    async def on(msg: Msg) -> None:
        h = msg.headers or {}
        said = (h.get("Status", msg.data.decode()), h.get("Nats-Pending-Messages", ""))
        if not heard or said != heard[-1] or said[0] != "100":  # heartbeats: once a row
            heard.append(said)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on)

    async def ask(batch: int, expires: float, beat: float = 0.0, durable: str = spec.durable,
                  reply: str = inbox) -> None:  # fmt: skip
        body = {"batch": batch, "expires": int(expires * 1e9), "idle_heartbeat": int(beat * 1e9)}
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{durable}",
                         json.dumps(body).encode(), reply=reply)  # fmt: skip
        await door.flush()

    await ask(3, expires=1.0, beat=0.3)
    await door.publish(subject, b"a")
    await _pass(door, 0.1)
    assert heard == [("a", "")]
    await _pass(door, 0.35)
    assert heard == [("a", ""), ("100", "")]
    await _pass(door, 0.65)
    assert heard == [("a", ""), ("100", ""), ("408", "2")]

    heard.clear()
    await door.publish(subject, b"b")
    await door.publish(subject, b"c")
    await ask(2, expires=0.3)
    await _pass(door, 0.5)
    assert heard == [("b", ""), ("c", "")]  # the batch is full: no 408

    heard.clear()
    await ask(1, expires=5.0)
    await sub.drain()  # the request's inbox has no listener now
    await door.publish(subject, b"d")
    other = nc.new_inbox()
    await nc.subscribe(other, cb=on)
    await ask(1, expires=5.0, reply=other)
    await _pass(door, 0.1)
    assert heard == [("d", "")]  # the new request took it, not the dropped one
    await ask(1, expires=1.0, durable="nobody", reply=other)
    await _pass(door, 0.1)
    assert heard[1][0] == "503"


async def test_a_typed_subscription_and_a_request_reach_their_handlers(door: Bus) -> None:
    subject = uid("twin-cancel")
    got: list[Cancel] = []
    arrived = asyncio.Event()

    async def on_cancel(c: Cancel, _on: str) -> None:
        got.append(c)
        arrived.set()

    async def echo(req):  # type: ignore[no-untyped-def]
        return Cancel(tenant="t", task_id=req.task_id or "?")

    await door.subscribe(subject, Cancel, on_cancel)
    await door.serve([f"{subject}.ask"], echo)
    await door.flush()
    await door.notify(subject, Cancel(tenant="t", task_id="k1"))
    await asyncio.wait_for(arrived.wait(), 5)
    reply = await door.request(f"{subject}.ask", Cancel(tenant="t", task_id="x"), Cancel,
                               task_id="k2")  # fmt: skip
    assert [c.task_id for c in got] == ["k1"] and reply.task_id == "k2"


def test_subjects_match_as_nats_matches_them() -> None:
    assert matches("a.*.c", "a.b.c") and not matches("a.*.c", "a.b.d")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")
    assert not matches("a.b", "a.b.c") and matches("a.b", "a.b")


async def test_what_the_twin_does_not_simulate_fails_loudly() -> None:
    twin = TwinBus()
    with pytest.raises(NotImplementedError, match="real nats-server"):
        await twin.stream_info("BATON_EVENTS")


SHELLS = (
    "services/orchestrator/conductor.py",
    "services/orchestrator/intake.py",
    "services/orchestrator/runs.py",
    "services/inference_worker/jobs.py",
    "services/inference_worker/deltas.py",
    "baton/context_client.py",
)
# The real Bus's own logic, inherited by the twin and run on it as it is.
INHERITED = {"consume", "settle", "dead_letter", "erase", "provision", "stop", "stopping",
             "wait_stopped"}  # fmt: skip


def _door_uses(path: Path) -> set[str]:
    """Attributes the module reads off a bus or a KV bucket (``bus.X``,
    ``self.bus.X``, ``self.bucket.X``)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if owner in ("bus", "self.bus", "self.bucket"):
                used.add(node.attr)
    return used


def test_the_twin_simulates_every_door_method_the_shells_use() -> None:
    """What the conductor, intake, run store, job handler and token stream
    call on the bus is either the twin's own or the real logic it inherits:
    none of it falls through to the NotImplementedError of a real-only call."""
    root = Path(__file__).resolve().parent.parent
    used = set().union(*(_door_uses(root / p) for p in SHELLS))
    own = {n for cls in (TwinBus, TwinBucket) for n in vars(cls)}
    assert {"publish", "request", "notify", "consume", "get", "create", "update"} <= used
    assert used - own - INHERITED == set()
