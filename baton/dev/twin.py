"""The bus twin: an in-memory simulator of the part of ``baton.bus.Bus``
that the service shells hold — the orchestrator's conductor and intake, the
worker's job handler — so they run in milliseconds, in one process, with no
nats-server (httpx's ``MockTransport``, FastStream's ``TestNatsBroker``).

Dev tooling, never the runtime. It is the same class surface, not a look-alike:
``TwinBus`` subclasses ``Bus`` and ``TwinBucket`` subclasses ``Bucket`` (mypy
checks every override against the real signature), a handler is handed the
real ``Delivery`` (around a message in nats-py's own shape), and the pull
loop and its settlement are the real ones, inherited: ``Bus.consume`` ->
``settle`` -> ``outcomes.settlement`` -> ack / nak / term / dead letter.

Simulated (each pinned against a real nats-server by ``tests/test_bus_twin.py``):

* JetStream publish: streams by subject, ``Nats-Msg-Id`` de-duplicated within
  the stream's ``duplicate_window``; work-queue retention drops what is acked.
* Pull consumers: ``ack``; ``nak(delay)`` redelivered after the delay;
  ``term``; an unsettled delivery redelivered after ``ack_wait`` (extended by
  ``in_progress``); no redelivery past ``max_deliver``.
* KV (``ensure_bucket``): revisions, ``create`` / ``update`` compare-and-set
  (``WrongLastSequence``), and ``before_write``, a hook to inject a race
  (another replica writing between a read and a write).
* Core NATS: ``notify`` / typed ``subscribe``; ``serve`` / ``request`` (no
  responder: ``NoRespondersError``, as nats-py raises; a responder answering
  None: ``TimeoutError`` at once, the timeout is not waited out).

Not simulated (a call raises ``NotImplementedError``: test it on a real
server): stream reads and replays, ``publish_if_last``, KV watches, accounts,
``max_ack_pending``, lagging replicas. Time: the twin's clock is the wall
clock plus ``advance()``'s skew, which moves nak delays, ack waits and the
de-duplication window without waiting.

Tests drive it two ways: the real loops (``consume``), or one delivery at a
time in an order they choose (``deliver``; ``ready`` lists what may come).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from baton.bus import (
    Bucket,
    Bus,
    BusClosed,
    Delivery,
    Entry,
    Handler,
    Message,
    Published,
    Puller,
    Request,
    Responder,
    Subscription,
    WrongLastSequence,
)
from baton.bus.delivery import _headers
from baton.bus.messaging import Listener
from baton.metrics import UNDECODABLE
from proto import codec
from proto.streams import BucketSpec, ConsumerSpec, StreamSpec

T = TypeVar("T")
R = TypeVar("R")


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class _Unplugged:
    """Stands where ``Bus`` keeps nats-py's client: any use names what the
    twin does not simulate."""

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(f"the bus twin does not simulate nats-py's {name!r}: "
                                  "test this on a real nats-server")  # fmt: skip


@dataclass
class _Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: float


@dataclass
class _Stream:
    spec: StreamSpec
    msgs: dict[int, _Stored] = field(default_factory=dict)
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)  # msg id -> (seq, when)
    last: int = 0


class _Consumer:
    """A durable pull consumer's state: where it is in the stream, what is
    out (with its ack deadline), what waits to come again (and when)."""

    def __init__(self, spec: ConsumerSpec, stream: _Stream, twin: TwinBus) -> None:
        self.spec, self.stream, self.twin = spec, stream, twin
        self.out: dict[int, float] = {}  # seq -> ack deadline
        self.again: dict[int, float] = {}  # seq -> redelivered from then
        self.count: dict[int, int] = {}  # seq -> deliveries so far
        self.settled: dict[int, str] = {}  # seq -> ack | term | exhausted

    def _expire(self, now: float) -> None:
        for seq, deadline in list(self.out.items()):
            if deadline <= now:
                del self.out[seq]
                self._again(seq, now)

    def _again(self, seq: int, at: float) -> None:
        max_deliver = self.spec.max_deliver
        if 0 < max_deliver <= self.count[seq]:
            self.settled[seq] = "exhausted"  # JetStream stops (and advises)
        elif seq in self.stream.msgs:
            self.again[seq] = at

    def _new(self) -> list[int]:
        """Sequences on the filter never delivered yet."""
        f = self.spec.filter_subject
        return [
            s for s, m in self.stream.msgs.items() if s not in self.count and matches(f, m.subject)
        ]

    def ready(self) -> list[int]:
        """Sequences that may be delivered now: redeliveries due, then new ones."""
        now = self.twin.now()
        self._expire(now)
        due = [s for s, at in self.again.items() if at <= now and s in self.stream.msgs]
        return sorted(due) + self._new()

    def next_due(self) -> float | None:
        times = [*self.again.values(), *self.out.values()]
        return min(times) if times else None

    def take(self, seq: int) -> Delivery:
        m = self.stream.msgs[seq]
        self.again.pop(seq, None)
        self.count[seq] = self.count.get(seq, 0) + 1
        self.out[seq] = self.twin.now() + self.spec.ack_wait
        meta = Msg.Metadata(
            sequence=Msg.Metadata.SequencePair(consumer=0, stream=seq),
            num_pending=len(self._new()), num_delivered=self.count[seq],
            timestamp=datetime.datetime.fromtimestamp(m.time), stream=self.spec.stream,
            consumer=self.spec.durable,
        )  # fmt: skip
        return Delivery(_Wire(self, seq, m, meta))

    def settle(self, seq: int, how: str, delay: float = 0.0) -> None:
        if self.out.pop(seq, None) is None:
            return  # expired meanwhile: already due again
        if how == "nak":
            self._again(seq, self.twin.now() + delay)
        elif how == "progress":
            self.out[seq] = self.twin.now() + self.spec.ack_wait
        else:
            self.settled[seq] = how
            if self.stream.spec.retention == "workqueue":
                self.stream.msgs.pop(seq, None)
        self.twin._wake()


class _Wire(Msg):
    """A delivered message in nats-py's own shape, so the real ``Delivery``
    wraps it; its acks go to the twin's consumer."""

    def __init__(self, consumer: _Consumer, seq: int, m: _Stored, meta: Msg.Metadata) -> None:
        super().__init__(cast(Any, None), subject=m.subject, reply="$JS.ACK.twin", data=m.data,
                         headers=dict(m.headers), _metadata=meta)  # fmt: skip
        self._consumer, self._seq = consumer, seq

    async def ack(self) -> None:
        self._consumer.settle(self._seq, "ack")

    async def ack_sync(self, timeout: float = 1.0) -> Msg:
        self._consumer.settle(self._seq, "ack")
        return self

    async def nak(self, delay: int | float | None = None) -> None:
        self._consumer.settle(self._seq, "nak", delay or 0.0)

    async def term(self) -> None:
        self._consumer.settle(self._seq, "term")

    async def in_progress(self) -> None:
        self._consumer.settle(self._seq, "progress")


class _TwinPuller(Puller):
    __slots__ = ("_consumer",)

    def __init__(self, consumer: _Consumer) -> None:
        super().__init__(consumer.spec, cast(Any, None))
        self._consumer = consumer

    async def fetch(self, n: int, timeout: float) -> list[Delivery]:
        twin = self._consumer.twin
        deadline = time.monotonic() + timeout
        while True:
            if twin.closed:
                raise BusClosed("the bus twin is closed")
            if twin.stopping:
                return []
            ready = self._consumer.ready()
            if ready:
                return [self._consumer.take(s) for s in ready[: max(1, n)]]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            due = self._consumer.next_due()
            if due is not None:
                left = min(left, max(0.001, due - twin.now()))
            await twin._changed(left)

    async def stop(self) -> None:
        pass


class TwinBucket(Bucket):
    """A KV bucket in memory: revisions and compare-and-set, as ``Bucket``."""

    def __init__(self, spec: BucketSpec) -> None:  # no nats-py KeyValue behind it
        self.spec = spec
        self.erasable = spec.erasable
        self.revision = 0
        self.history: dict[str, list[Entry]] = {}
        # Called with the key before every create/update/put: a test injects a
        # race there (``race``: another writer stores the key first).
        self.before_write: Callable[[str], None] | None = None
        self.log: list[Entry] = []  # every write, in order (what a shell stored, and when)
        self.conflicts = 0  # writes refused by compare-and-set

    def _newest(self, key: str) -> Entry | None:
        revs = self.history.get(key)
        return revs[-1] if revs else None

    def _store(self, key: str, value: bytes) -> int:
        self.revision += 1
        entry = Entry(key, value, self.revision)
        self.history.setdefault(key, []).append(entry)
        del self.history[key][: -max(1, self.spec.history)]
        self.log.append(entry)
        return self.revision

    def race(self, key: str) -> None:
        """Another writer stores ``key`` again as it is (its revision moves on)."""
        e = self._newest(key)
        if e is not None and not e.deleted:
            self._store(key, e.value)

    def _check(self, key: str, last: int | None) -> None:
        if self.before_write is not None:
            self.before_write(key)
        e = self._newest(key)
        now = 0 if e is None or e.deleted else e.revision
        if last is not None and now != last:
            self.conflicts += 1
            raise WrongLastSequence(f"wrong last sequence: {now} (expected {last})")

    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        e = self._newest(key)
        return None if e is None or e.deleted else e

    async def create(self, key: str, value: bytes) -> int:
        self._check(key, 0)
        return self._store(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self._check(key, last)
        return self._store(key, value)

    async def put(self, key: str, value: bytes) -> int:
        self._check(key, None)
        return self._store(key, value)

    async def entries(self, pattern: str = ">", *, limit: int = 10_000) -> list[Entry]:
        newest = [revs[-1] for k, revs in sorted(self.history.items()) if matches(pattern, k)]
        return [e for e in newest if not e.deleted][:limit]

    async def follow(self, *, inactive_threshold: float = 30.0) -> AsyncIterator[Entry]:
        raise NotImplementedError("the bus twin does not simulate KV watches")
        yield  # pragma: no cover  (an async generator, as Bucket.follow)

    async def erase_revision(self, revision: int) -> None:
        if self.erasable:
            for revs in self.history.values():
                revs[:] = [e for e in revs if e.revision != revision or e is revs[-1]]

    async def erase_history(self, key: str, *, keep_after: int) -> int:
        if not self.erasable:
            return 0
        revs = self.history.get(key, [])
        kept = [e for e in revs if e.revision >= keep_after]
        self.history[key] = kept
        return len(revs) - len(kept)


class TwinBus(Bus):
    """``Bus`` in memory: see the module's docstring for what it simulates."""

    def __init__(self) -> None:
        super().__init__(cast(Any, _Unplugged()), js=cast(Any, _Unplugged()))
        self.streams: dict[str, _Stream] = {}
        self.durables: dict[str, _Consumer] = {}  # by durable name (unique in the twin)
        self.buckets: dict[str, TwinBucket] = {}
        self._subs: list[tuple[str, Callable[[Message], Awaitable[None]]]] = []
        self._responders: list[tuple[str, Responder]] = []
        self._skew = 0.0
        self._event = asyncio.Event()
        self.closed = False
        # Called with each JetStream publish's subject before it is stored: a
        # test raises there to lose an effect (a crash after a stored change).
        self.before_publish: Callable[[str], None] | None = None

    # -- time ------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._skew

    def advance(self, seconds: float) -> None:
        """Move the twin's clock on: nak delays, ack waits and the
        de-duplication window see the time pass (the shells' clocks do not)."""
        self._skew += seconds
        self._wake()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def _changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)

    # -- provisioning ------------------------------------------------------------

    async def ensure_stream(self, spec: StreamSpec) -> None:
        if spec.name in self.streams:
            self.streams[spec.name].spec = spec
        else:
            self.streams[spec.name] = _Stream(spec)

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        c = self.durables.get(spec.durable)
        if c is None or c.spec.stream != spec.stream:
            self.durables[spec.durable] = _Consumer(spec, self.streams[spec.stream], self)
        else:
            c.spec = spec

    async def ensure_bucket(self, spec: BucketSpec) -> Bucket:
        return self.buckets.setdefault(spec.name, TwinBucket(spec))

    # -- JetStream ---------------------------------------------------------------

    def _stream_of(self, subject: str) -> _Stream:
        for s in self.streams.values():
            if any(matches(p, subject) for p in s.spec.subjects):
                return s
        raise nats.js.errors.NoStreamResponseError

    async def publish(
        self,
        subject: str,
        body: Any,
        *,
        msg_id: str | None = None,
        task_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Published:
        if self.before_publish is not None:
            self.before_publish(subject)
        stream = self._stream_of(subject)
        data = body if isinstance(body, bytes) else codec.encode(body)
        now = self.now()
        if msg_id:
            seen = stream.ids.get(msg_id)
            if seen is not None and now - seen[1] < stream.spec.duplicate_window:
                return Published(stream.spec.name, seen[0], True)
        stream.last += 1
        stored = _Stored(stream.last, subject, data, _headers(msg_id, task_id, headers), now)
        stream.msgs[stored.seq] = stored
        if msg_id:
            stream.ids[msg_id] = (stored.seq, now)
        self._wake()
        await self._fan_out(Message(subject, data, dict(stored.headers), stored.seq, now))
        return Published(stream.spec.name, stored.seq, False)

    async def puller(self, spec: ConsumerSpec) -> Puller:
        if spec.durable not in self.durables:
            await self.ensure_consumer(spec)
        return _TwinPuller(self.durables[spec.durable])

    def ready(self, durable: str) -> list[int]:
        """Stream sequences the consumer may be handed now, oldest first."""
        return self.durables[durable].ready()

    def unsettled(self, durable: str) -> int:
        """Messages the consumer has yet to see settled: new, out, or due again later."""
        c = self.durables[durable]
        c.ready()
        return len(c._new()) + len(c.out) + len(c.again)

    def next_due(self, durable: str) -> float | None:
        """When the consumer's next naked or unacked message may come again
        (the twin's clock; None: none waits)."""
        return self.durables[durable].next_due()

    async def deliver(self, durable: str, handler: Handler, seq: int | None = None) -> bool:
        """Hand one message (``seq``, or the oldest ready) to ``handler`` and
        settle it by its outcome, as ``consume`` would; False: none was ready."""
        c = self.durables[durable]
        ready = c.ready()
        if not ready:
            return False
        await self.settle(c.spec, c.take(seq if seq is not None else ready[0]), handler)
        return True

    async def erase_messages(self, stream: str, seqs: Iterable[int]) -> int:
        msgs = self.streams[stream].msgs
        return sum(msgs.pop(s, None) is not None for s in list(seqs))

    async def last_msg(self, stream: str, subject: str) -> Message | None:
        found = self.messages(subject, stream=stream)
        return found[-1] if found else None

    def messages(self, pattern: str, *, stream: str | None = None) -> list[Message]:
        """Every stored message on subjects matching ``pattern``, in order of storing."""
        found = [(m.time, m.seq, m) for s in self.streams.values() for m in s.msgs.values()
                 if matches(pattern, m.subject) and stream in (None, s.spec.name)]  # fmt: skip
        return [Message(m.subject, m.data, dict(m.headers), m.seq, m.time)
                for _, _, m in sorted(found, key=lambda x: (x[0], x[1]))]  # fmt: skip

    # -- core NATS ---------------------------------------------------------------

    async def _fan_out(self, msg: Message) -> None:
        for pattern, cb in list(self._subs):
            if matches(pattern, msg.subject):
                await cb(msg)

    async def subscribe(
        self, subject: str, type_: type[T], handler: Listener[T], *, queue: str = ""
    ) -> Subscription:
        undecodable = UNDECODABLE.labels(subject)

        async def on_msg(msg: Message) -> None:
            try:
                body = codec.decode(msg.data, type_)
            except codec.DecodeError:
                undecodable.inc()
                return
            await handler(body, msg.subject)

        self._subs.append((subject, on_msg))
        return Subscription(None)

    async def notify(self, subject: str, body: Any, *, task_id: str | None = None) -> None:
        data = body if isinstance(body, bytes) else codec.encode(body)
        await self._fan_out(Message(subject, data, _headers(None, task_id, None)))

    async def serve(
        self,
        subjects_: Sequence[str],
        responder: Responder,
        *,
        queue: str = "",
        concurrency: int = 64,
    ) -> None:
        self._responders.extend((s, responder) for s in subjects_)

    async def request(
        self,
        subject: str,
        body: Any,
        reply_type: type[R],
        *,
        timeout: float = 5.0,
        task_id: str | None = None,
    ) -> R:
        responder = next((r for p, r in self._responders if matches(p, subject)), None)
        if responder is None:
            raise nats.errors.NoRespondersError
        reply = await responder(Request(subject, codec.encode(body),
                                        _headers(None, task_id, None)))  # fmt: skip
        if reply is None:
            raise TimeoutError(f"no reply on {subject}")
        return codec.decode(reply if isinstance(reply, bytes) else codec.encode(reply), reply_type)

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        super().stop()
        self._wake()  # a fetch waiting for messages looks again, and sees the stop

    async def flush(self, timeout: int = 2) -> None:
        pass

    async def close(self) -> None:
        self.stop()
        self.closed = True
        self._wake()
