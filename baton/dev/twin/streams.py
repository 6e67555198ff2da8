"""The twin's JetStream: streams (msg-id de-duplication), durable pull
consumers (ack, nak with delay, term, ack wait, ``max_deliver``), and the
message in nats-py's shape that the real ``Delivery`` wraps."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from nats.aio.msg import Msg

from baton.bus import BusClosed, Delivery, Puller
from proto.streams import ConsumerSpec, StreamSpec

if TYPE_CHECKING:
    from .bus import TwinBus


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


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
        self.settled: dict[int, str] = {}  # seq -> ack | term | exhausted | erased

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
            num_pending=len(self._new()),
            num_delivered=self.count[seq],
            timestamp=datetime.datetime.fromtimestamp(m.time),
            stream=self.spec.stream,
            consumer=self.spec.durable,
        )
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

    def erased(self, seq: int) -> None:
        """``seq`` was deleted from the stream: as JetStream does, settle it
        if it was out or due again (no redelivery, no longer pending)."""
        out, again = self.out.pop(seq, None), self.again.pop(seq, None)
        if out is not None or again is not None:
            self.settled[seq] = "erased"
        self.twin._wake()


class _Wire(Msg):
    """A delivered message in nats-py's own shape, so the real ``Delivery``
    wraps it; its acks go to the twin's consumer."""

    def __init__(self, consumer: _Consumer, seq: int, m: _Stored, meta: Msg.Metadata) -> None:
        super().__init__(
            cast(Any, None),
            subject=m.subject,
            reply="$JS.ACK.twin",
            data=m.data,
            headers=dict(m.headers),
            _metadata=meta,
        )
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
