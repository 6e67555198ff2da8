"""Baton's own small types for what crosses the door: nothing nats-py
defines leaves ``baton.bus`` (``tests/test_bus_surface.py`` reads every
public signature). Each is built from nats-py's at the edge, here."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.msg import Msg

from proto import codec

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Message:
    """One message read from a subscription or a stream. ``seq``, ``time``
    and ``pending`` are set when it came from a stream (0 / None / 0 for a
    core message): its stream sequence, when it was stored (epoch seconds)
    and how many more the consumer had after it."""

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    time: float | None = None
    pending: int = 0

    def decode(self, type_: type[T]) -> T:
        return codec.decode(self.data, type_)

    @classmethod
    def _of(cls, msg: Msg) -> Message:
        seq, at, pending = 0, None, 0
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            meta = msg.metadata
            seq, pending = meta.sequence.stream, int(meta.num_pending or 0)
            at = meta.timestamp.timestamp() if meta.timestamp is not None else None
        return cls(msg.subject, msg.data or b"", dict(msg.headers or {}), seq, at, pending)

    @classmethod
    def _stored(cls, raw: Any) -> Message:
        """From a stream's direct or API get (nats-py's ``RawStreamMsg``)."""
        at = raw.time.timestamp() if raw.time is not None else None
        return cls(raw.subject or "", raw.data or b"", dict(raw.headers or {}), raw.seq or 0, at)


# A raw subscription's or an ordered consumer's callback.
Callback = Callable[[Message], Awaitable[None]]


def callback(cb: Callback | None) -> Callable[[Msg], Awaitable[None]] | None:
    """nats-py's callback for ``cb``: each message converted at the door."""
    if cb is None:
        return None

    async def on_msg(msg: Msg) -> None:
        await cb(Message._of(msg))

    return on_msg


class Subscription:
    """A live subscription (core, or an ordered consumer): read with
    ``next_msg`` when it has no callback, ``unsubscribe`` to end it."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def next_msg(self, timeout: float = 1.0) -> Message:
        """The next message. Raises ``TimeoutError`` after ``timeout``."""
        return Message._of(await self._sub.next_msg(timeout=timeout))

    @property
    def queued(self) -> int:
        """Messages received but not yet handed to the callback."""
        return int(self._sub.pending_msgs)

    async def position(self) -> tuple[int, int]:
        """An ordered consumer's (last delivered stream sequence, messages
        still pending)."""
        info = await self._sub.consumer_info()
        return int(info.delivered.stream_seq or 0), int(info.num_pending or 0)

    async def unsubscribe(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


@dataclass(frozen=True, slots=True)
class Published:
    """A JetStream publish's acknowledgement: ``duplicate`` when its
    ``Nats-Msg-Id`` was already stored."""

    stream: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream's state (``subjects``: message counts per subject, when
    asked for with a filter) and placement."""

    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int
    subjects: dict[str, int] = field(default_factory=dict)
    # Where it lives: its placement tags, and the servers holding a replica
    # (the leader first; one server's name on a single server).
    placement_tags: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Consumer:
    """A durable consumer as the server holds it."""

    name: str
    description: str
    filter_subject: str
    ack_wait: float
    max_deliver: int
