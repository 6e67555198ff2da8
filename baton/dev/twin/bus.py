"""``TwinBus``: ``Bus`` in memory (see the package's docstring)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import nats.errors
import nats.js.errors

from baton.bus import (
    Bucket,
    Bus,
    Handler,
    Message,
    Published,
    Request,
    Responder,
    Subscription,
)
from baton.bus.delivery import _headers
from baton.bus.messaging import Listener
from baton.metrics import UNDECODABLE
from proto import codec
from proto.streams import BucketSpec, ConsumerSpec, StreamSpec

from .bucket import TwinBucket
from .client import _Client, _Unplugged
from .streams import _Consumer, _Stored, _Stream, matches

T = TypeVar("T")
R = TypeVar("R")


class TwinBus(Bus):
    """``Bus`` in memory: see the module's docstring for what it simulates."""

    def __init__(self) -> None:
        self.link = _Client(self)  # what the pull loop uses of nats-py's client
        super().__init__(cast(Any, self.link), js=cast(Any, _Unplugged()))
        self.streams: dict[str, _Stream] = {}
        self.durables: dict[str, _Consumer] = {}  # by durable name (unique in the twin)
        self.buckets: dict[str, TwinBucket] = {}
        self._subs: list[tuple[str, Callable[[Message], Awaitable[None]]]] = []
        self._responders: list[tuple[str, Responder]] = []
        self._acks: dict[str, bytes] = {}  # inbox -> JetStream's ack of a ``publish_for``
        self._inboxes = 0
        self._skew = 0.0
        self._timer: asyncio.TimerHandle | None = None
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
        """Something changed (a publish, a settlement, the clock): answer the
        waiting pull requests, and look again when the next one is due."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = [t for c in self.durables.values() if (t := c.serve()) is not None]
        if due:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.001, min(due) - self.now()), self._wake)

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
        """Remove ``seqs``; a consumer holding one settles it (JetStream drops
        a deleted message from its consumers' pending lists, as an ack)."""
        msgs, erased = self.streams[stream].msgs, 0
        for seq in list(seqs):
            if msgs.pop(seq, None) is not None:
                erased += 1
                for c in self.durables.values():
                    if c.spec.stream == stream:
                        c.erased(seq)
        return erased

    async def last_msg(self, stream: str, subject: str) -> Message | None:
        found = self.messages(subject, stream=stream)
        return found[-1] if found else None

    def messages(self, pattern: str, *, stream: str | None = None) -> list[Message]:
        """Every stored message on subjects matching ``pattern``, in order of storing."""
        found = [
            (m.time, m.seq, m)
            for s in self.streams.values()
            for m in s.msgs.values()
            if matches(pattern, m.subject) and stream in (None, s.spec.name)
        ]
        return [
            Message(m.subject, m.data, dict(m.headers), m.seq, m.time)
            for _, _, m in sorted(found, key=lambda x: (x[0], x[1]))
        ]

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
        reply = await responder(Request(subject, codec.encode(body), _headers(None, task_id, None)))
        if reply is None:
            raise TimeoutError(f"no reply on {subject}")
        return codec.decode(reply if isinstance(reply, bytes) else codec.encode(reply), reply_type)

    async def request_raw(
        self, subject: str, payload: bytes, *, timeout: float = 5.0, task_id: str | None = None
    ) -> bytes:
        """A request whose reply may be JetStream's ack of a message its
        responder published with ``publish_for`` (the store's ``answer``)."""
        responder = next((r for p, r in self._responders if matches(p, subject)), None)
        if responder is None:
            raise nats.errors.NoRespondersError
        self._inboxes += 1
        inbox = f"_INBOX.twin.request.{self._inboxes}"
        reply = await responder(Request(subject, payload, _headers(None, task_id, None), inbox))
        if reply is None:
            ack = self._acks.pop(inbox, None)
            if ack is None:
                raise TimeoutError(f"no reply on {subject}")
            return ack
        return reply if isinstance(reply, bytes) else codec.encode(reply)

    async def publish_for(
        self, subject: str, body: Any, *, reply: str, msg_id: str, task_id: str | None = None
    ) -> None:
        p = await self.publish(subject, body, msg_id=msg_id, task_id=task_id)
        ack = {"stream": p.stream, "seq": p.seq, **({"duplicate": True} if p.duplicate else {})}
        self._acks[reply] = json.dumps(ack).encode()

    # -- lifecycle -----------------------------------------------------------------

    async def flush(self, timeout: int = 2) -> None:
        pass

    @property
    def connected(self) -> bool:
        return not self.closed

    async def close(self, *, flush: bool = True) -> None:
        self.stop()
        self.closed = True
        self.link.close()
        if self._timer is not None:
            self._timer.cancel()
