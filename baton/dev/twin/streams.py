"""The twin's JetStream: streams (msg-id de-duplication), durable pull
consumers (ack, nak with delay, term, ack wait, ``max_deliver``, the pull
requests waiting on them), and the message in nats-py's shape that the real
``Delivery`` wraps."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from nats.aio.msg import Msg

from baton.bus import Delivery
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


@dataclass
class _Pull:
    """A pull request (``CONSUMER.MSG.NEXT``) waiting on a consumer; times on the twin's clock."""

    inbox: str
    left: int  # messages still to deliver
    expires: float  # inf: never
    beat: float  # idle heartbeat interval (0: none)
    beat_at: float


class _Consumer:
    """A durable pull consumer's state: where it is in the stream, what is
    out (with its ack deadline), what waits to come again (and when)."""

    def __init__(self, spec: ConsumerSpec, stream: _Stream, twin: TwinBus) -> None:
        self.spec, self.stream, self.twin = spec, stream, twin
        self.out: dict[int, float] = {}  # seq -> ack deadline
        self.again: dict[int, float] = {}  # seq -> redelivered from then
        self.count: dict[int, int] = {}  # seq -> deliveries so far
        self.settled: dict[int, str] = {}  # seq -> ack | term | exhausted | erased
        self.waiting: list[_Pull] = []  # open pull requests, oldest first

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

    def serve(self) -> float | None:
        """Answer the waiting pull requests as nats-server does (pinned by
        tests/test_bus_twin.py): what is ready goes to the oldest request
        first; a request is done once its batch is delivered (nothing is
        said), ends with a 408 carrying ``Nats-Pending-Messages`` when it
        expires, hears a 100 heartbeat after each idle interval, and is
        dropped once nobody listens on its inbox. Returns when (twin's
        clock) there may be something to do again (None: nothing waits)."""
        link, now = self.twin.link, self.twin.now()
        ready = self.ready() if self.waiting else []
        for r in list(self.waiting):
            if not link.listens(r.inbox):
                self.waiting.remove(r)
                continue
            while r.left and ready:
                link.deliver(r.inbox, self._wire(ready.pop(0)))
                r.left, r.beat_at = r.left - 1, now + r.beat
            if not r.left:
                self.waiting.remove(r)
            elif r.expires <= now:
                self.waiting.remove(r)
                link.status(r.inbox, "408", "Request Timeout", pending=r.left)
            elif r.beat and r.beat_at <= now:
                link.status(r.inbox, "100", "Idle Heartbeat")
                r.beat_at = now + r.beat
        if not self.waiting:
            return None
        times = [t for r in self.waiting for t in (r.expires, r.beat_at if r.beat else now)]
        times += [*self.again.values(), *self.out.values()]
        return min((t for t in times if t > now), default=None)

    def take(self, seq: int) -> Delivery:
        return Delivery(self._wire(seq))

    def _wire(self, seq: int) -> _Wire:
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
        return _Wire(self, seq, m, meta)

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
