"""``Bus.consume`` keeps one pull request open per consumer (``baton.bus.pull``):
an idle loop does not re-ask every second, no more is asked for than the loop
may take (its slots, its gate), a restarted nats-server is survived, a request
lost without a word is noticed by its missing heartbeats, a request the server
ends (409) is asked again without spinning, and a stopped loop leaves nothing
reserved on the server; stopping one loop's handle ends that loop alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from baton.bus import Bus, Consumption, Delivery, connect
from baton.dev.testing import http_json, secure_nats, uid
from baton.natsd import NatsServer, free_port
from proto.streams import ConsumerSpec, StreamSpec


@pytest.fixture
def mon_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A private nats-server with its monitoring port (``/connz``)."""
    server = secure_nats(tmp_path / "nats", encrypt=False, monitor_port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
async def bus(mon_nats: NatsServer) -> AsyncIterator[Bus]:
    b = await connect(mon_nats.url, name="pull-test")
    yield b
    await b.close()


async def _queue(bus: Bus, ack_wait: float = 30.0) -> tuple[ConsumerSpec, str]:
    name = uid("PULL").replace("-", "_").upper()
    subject = name.lower()
    stream = StreamSpec(name=name, subjects=(f"{subject}.>",), retention="workqueue",
                        duplicate_window=5.0)  # fmt: skip
    spec = ConsumerSpec(stream=name, durable="c", filter_subject=f"{subject}.>",
                        ack_wait=ack_wait, max_deliver=5)  # fmt: skip
    await bus.provision(streams=[stream], consumers=[spec])
    return spec, f"{subject}.x"


def _in_msgs(server: NatsServer, name: str) -> int:
    """Messages the server received from the connection called ``name``."""
    conns = http_json(f"http://127.0.0.1:{server.monitor_port}/connz?limit=1024")["connections"]
    return sum(c["in_msgs"] for c in conns if c.get("name") == name)


async def _stop(bus: Bus, loop: Consumption) -> None:
    bus.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(loop, 10)


async def test_an_idle_consumer_keeps_one_request_open(mon_nats: NatsServer, bus: Bus) -> None:
    spec, subject = await _queue(bus)
    idle = await connect(mon_nats.url, name="pull-idle")
    got: list[float] = []
    try:
        loop = idle.consume(spec, lambda d: _note(got))
        await asyncio.sleep(1.0)
        before = _in_msgs(mon_nats, "pull-idle")
        await asyncio.sleep(6.0)
        asked = _in_msgs(mon_nats, "pull-idle") - before
        assert asked <= 1  # fetch() asked ~6 times here (one request per idle second)
        assert await _delivered_in(bus, subject, got) < 1.0  # the open request delivers at once
        await _stop(idle, loop)
    finally:
        await idle.close()


async def _note(got: list[float]) -> None:
    got.append(time.monotonic())


async def _delivered_in(bus: Bus, subject: str, got: list[float]) -> float:
    """Publish one message; seconds until a loop noting into ``got`` had it
    (inf: not within 2 s)."""
    sent = time.monotonic()
    await bus.publish(subject, b"x")
    for _ in range(100):
        if got:
            return got[0] - sent
        await asyncio.sleep(0.02)
    return float("inf")


async def test_no_more_is_delivered_than_the_loop_has_slots_for(bus: Bus) -> None:
    spec, subject = await _queue(bus)
    for i in range(10):
        await bus.publish(subject, str(i).encode())
    done: list[bytes] = []

    async def slow(d: Delivery) -> None:
        await asyncio.sleep(0.3)
        done.append(d.data)

    loop = bus.consume(spec, slow, concurrency=2)
    most = 0
    while len(done) < 10:
        info = await bus._js.consumer_info(spec.stream, spec.durable)
        most = max(most, info.num_ack_pending)
        assert info.num_waiting <= 2  # no pile of requests either
        await asyncio.sleep(0.05)
    await _stop(bus, loop)
    assert most == 2 and sorted(done) == [str(i).encode() for i in range(10)]


class _Gate:
    """A gate whose room the test sets (and may shrink while a request is open)."""

    def __init__(self, room: int) -> None:
        self.limit, self.taken = room, 0
        self.changed = asyncio.Event()

    def room(self) -> int:
        return self.limit - self.taken

    async def wait(self) -> None:
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), 1.0)

    def took(self, delivery: Delivery) -> None:
        self.taken += 1

    def release(self) -> None:
        self.taken -= 1
        self.changed.set()


async def test_a_gate_that_shrinks_under_an_open_request_is_never_exceeded(bus: Bus) -> None:
    spec, subject = await _queue(bus, ack_wait=2.0)
    gate = _Gate(5)
    running, most, done = 0, 0, []

    async def handle(d: Delivery) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(1.0)  # longer than ack_wait / 3: held ones need keeping alive
        running -= 1
        done.append(d.data)
        gate.release()

    loop = bus.consume(spec, handle, gate=gate)
    await asyncio.sleep(0.5)  # a request for 5 is open
    gate.limit = 1  # e.g. another tenant borrowed the rest
    for i in range(3):
        await bus.publish(subject, str(i).encode())
    await asyncio.sleep(0.5)  # one runs, the rest are held and the open request withdrawn
    for i in range(3, 6):
        await bus.publish(subject, str(i).encode())
    await asyncio.sleep(0.3)
    info = await bus._js.consumer_info(spec.stream, spec.durable)
    # One runs, at most two are held (those on their way when the request was
    # withdrawn): a request left open would have taken all 5 it asked for.
    assert info.num_ack_pending <= 3 and info.num_pending >= 3
    for _ in range(300):
        if len(done) == 6:
            break
        await asyncio.sleep(0.05)
    await _stop(bus, loop)
    assert most == 1 and sorted(done) == [str(i).encode() for i in range(6)]
    info = await bus._js.consumer_info(spec.stream, spec.durable)
    assert info.num_redelivered == 0  # the held ones were kept alive, not redelivered


async def test_the_loop_asks_again_after_nats_restarts(mon_nats: NatsServer, bus: Bus) -> None:
    spec, subject = await _queue(bus)
    got: list[float] = []
    loop = bus.consume(spec, lambda d: _note(got))
    await asyncio.sleep(0.5)
    mon_nats.restart()  # same port, same store; the open request is forgotten
    for _ in range(100):
        with contextlib.suppress(Exception):
            await bus.publish(subject, b"after", msg_id="after-1")
            break
        await asyncio.sleep(0.2)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.05)
    await _stop(bus, loop)
    assert len(got) == 1


async def test_a_stopped_loop_leaves_nothing_reserved(mon_nats: NatsServer, bus: Bus) -> None:
    spec, subject = await _queue(bus)  # ack_wait 30 s: a stranded message would wait that long
    first = await connect(mon_nats.url, name="pull-first")
    try:
        loop = first.consume(spec, lambda d: _note([]))
        await asyncio.sleep(0.5)
        await _stop(first, loop)  # its connection stays open
        got: list[float] = []
        other = bus.consume(spec, lambda d: _note(got))
        await asyncio.sleep(0.3)
        took = await _delivered_in(bus, subject, got)
        await _stop(bus, other)
        assert took < 1.0
    finally:
        await first.close()


async def test_stopping_a_handle_ends_that_loop_alone(bus: Bus) -> None:
    """``stop()`` on one loop's handle: its open pull request is withdrawn (what
    comes next goes to another loop at once, not to a request nobody reads
    for ack_wait, 30 s), its handler in flight finishes and is acked, and a
    loop on another consumer of the same bus goes on."""
    spec, subject = await _queue(bus)
    other_spec, other_subject = await _queue(bus)
    release = asyncio.Event()
    first: list[bytes] = []

    async def held(d: Delivery) -> None:
        first.append(d.data)
        await release.wait()

    later: list[float] = []
    other: list[float] = []
    a = bus.consume(spec, held, concurrency=4)  # one in flight, a request for 3 open
    c = bus.consume(other_spec, lambda d: _note(other))
    await bus.publish(subject, b"first")
    for _ in range(100):
        if first:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    a.stop()
    await asyncio.sleep(0.3)
    for i in range(3):
        await bus.publish(subject, f"later-{i}".encode())
    await asyncio.sleep(0.3)
    assert first == [b"first"]  # nothing more reached the stopped loop
    assert not a.task.done()  # awaiting it waits for its handler  # type: ignore[union-attr]
    b = bus.consume(spec, lambda d: _note(later))
    for _ in range(100):
        if len(later) == 3:
            break
        await asyncio.sleep(0.02)
    assert len(later) == 3  # within 2 s: none stranded on the stopped loop's request
    assert await _delivered_in(bus, other_subject, other) < 1.0  # the other consumer goes on
    release.set()
    await asyncio.wait_for(a, 5)
    for _ in range(50):  # every message acked (the first by the stopped loop), none again
        info = await bus._js.consumer_info(spec.stream, spec.durable)
        if info.num_pending == info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert (info.num_pending, info.num_ack_pending, len(first), len(later)) == (0, 0, 1, 3)
    await _stop(bus, b)
    await asyncio.wait_for(c, 5)


class _LossyRelay:
    """A TCP relay in front of nats-server that, while ``losing``, drops the
    pull requests (``CONSUMER.MSG.NEXT``) a client sends — as a server shedding
    JetStream API requests under load does: the server never hears them, so
    it never answers, not even with a heartbeat."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.losing, self.lost = upstream, False, 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream)
        for pipe in (self._down(sr, cw), self._up(cr, sw)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _down(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Client to server, one protocol operation at a time."""
        with contextlib.suppress(Exception):
            while line := await r.readuntil(b"\r\n"):
                op = line.split(b" ", 1)[0].upper()
                if op in (b"PUB", b"HPUB"):  # ... <total size>\r\n<payload>\r\n
                    line += await r.readexactly(int(line.split()[-1]) + 2)
                    if self.losing and b".CONSUMER.MSG.NEXT." in line.split(b"\r\n", 1)[0]:
                        self.lost += 1
                        continue
                w.write(line)
                await w.drain()
        w.close()

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def test_a_request_lost_without_a_word_is_asked_again_when_its_heartbeats_stop(
    mon_nats: NatsServer, bus: Bus
) -> None:
    """The server never heard the loop's request: no message, no heartbeat,
    no 408 comes. Two missed heartbeats later the loop asks again, and every
    message is handled once (without this, the loop would wait forever on a
    request it believes open)."""
    spec, subject = await _queue(bus)
    relay = _LossyRelay(mon_nats.port)
    port = await relay.start()
    lossy = await connect(mon_nats.url.replace(f":{mon_nats.port}", f":{port}"), name="pull-lossy")
    handled: list[bytes] = []

    async def handle(d: Delivery) -> None:
        handled.append(d.data)

    try:
        relay.losing = True
        with structlog.testing.capture_logs() as logs:
            loop = lossy.consume(spec, handle)
            await asyncio.sleep(0.5)
            relay.losing = False  # the next request gets through
            for i in range(5):
                await bus.publish(subject, b"%d" % i)
            await asyncio.sleep(1.0)
            assert relay.lost >= 1 and handled == []  # its request is gone
            for _ in range(100):  # heartbeats every 2 s: missed for 4.5 s
                if len(handled) == 5:
                    break
                await asyncio.sleep(0.1)
            for i in range(5, 8):  # and the loop goes on
                await bus.publish(subject, b"%d" % i)
            for _ in range(50):
                if len(handled) == 8:
                    break
                await asyncio.sleep(0.05)
            await _stop(lossy, loop)
    finally:
        await lossy.close()
        await relay.close()
    assert sorted(handled) == [b"%d" % i for i in range(8)]
    info = await bus._js.consumer_info(spec.stream, spec.durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    reissued = [e for e in logs if e["event"] == "pull_reissued"]
    assert [e["reason"] for e in reissued] == ["heartbeat_missed"]


async def test_a_request_the_server_ends_is_asked_again_without_spinning(
    mon_nats: NatsServer, bus: Bus
) -> None:
    """The consumer is deleted under the loop's open request (409 Consumer
    Deleted), then, while it is gone, every request is refused (503); once
    it is back the loop takes what comes, at once. Each refusal is logged and
    waited on: no request storm."""
    spec, subject = await _queue(bus)
    loop_bus = await connect(mon_nats.url, name="pull-ended")
    handled: list[bytes] = []

    async def handle(d: Delivery) -> None:
        handled.append(d.data)

    try:
        with structlog.testing.capture_logs() as logs:
            loop = loop_bus.consume(spec, handle)
            await asyncio.sleep(0.5)
            before = _in_msgs(mon_nats, "pull-ended")
            await bus.delete_consumer(spec)
            await asyncio.sleep(2.0)
            asked = _in_msgs(mon_nats, "pull-ended") - before
            await bus.ensure_consumer(spec)
            sent = time.monotonic()
            await bus.publish(subject, b"back")
            for _ in range(100):
                if handled:
                    break
                await asyncio.sleep(0.02)
            took = time.monotonic() - sent
            await _stop(loop_bus, loop)
    finally:
        await loop_bus.close()
    reasons = [e["reason"] for e in logs if e["event"] == "pull_reissued"]
    assert reasons[0].startswith("409 Consumer Deleted") and len(reasons) >= 2
    assert asked <= 6  # about one request per 0.5 s while refused, not a spin
    assert handled == [b"back"] and took < 1.5  # before heartbeats would have been missed
