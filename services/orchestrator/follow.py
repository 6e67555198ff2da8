"""Reading a task as it runs: its events (stream ``BATON_EVENTS``) and its
token deltas (stream ``BATON_TOKENS``), each from a stream sequence, so an
HTTP client that reconnects with the last sequence it saw resumes with no
gap and no repeat. Shared by the SSE routes and the OpenAI-compatible API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from baton.bus import Bus, Message
from proto import codec, streams, subjects
from proto.messages import Completed, Failed, TaskEvent, TokenDelta


@dataclass(frozen=True, slots=True)
class Item:
    """One event or one token delta, with its stream sequence."""

    kind: str  # "event" | "token"
    seq: int
    event: TaskEvent | None = None
    delta: TokenDelta | None = None

    @property
    def terminal(self) -> bool:
        return isinstance(self.event, Completed | Failed)


def _event(msg: Message) -> Item:
    ev: TaskEvent = codec.decode(msg.data, TaskEvent)  # type: ignore[arg-type]
    return Item("event", msg.seq, event=ev)


def _token(msg: Message) -> Item:
    return Item("token", msg.seq, delta=codec.decode(msg.data, TokenDelta))


async def replay_events(
    bus: Bus, tenant: str, task_id: str, *, follow: bool = False, timeout: float = 300.0,
    start_seq: int = 0,
) -> AsyncIterator[Item]:  # fmt: skip
    """A task's events from ``start_seq`` (0 = the first); with ``follow``,
    keep going until the terminal event (or ``timeout`` of silence)."""
    sub = await bus.ordered(subjects.event(tenant, task_id), start_seq=start_seq)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout if follow else 0.25)
            except TimeoutError:
                return
            item = _event(msg)
            yield item
            if item.terminal:
                return
    finally:
        await sub.unsubscribe()


async def follow_task(
    bus: Bus, tenant: str, task_id: str, *, events_from: int = 0, tokens_from: int = 0,
    with_events: bool = True, timeout: float = 600.0,
) -> AsyncIterator[Item]:  # fmt: skip
    """Events and token deltas as they are stored, until the terminal event.

    The terminal event comes last: every delta stored before it is yielded
    first (workers store a step's deltas before its answer), so a reader
    that stops at ``completed`` has all the text. ``with_events=False``
    yields deltas only (the terminal event still ends the iteration).
    Raises ``TimeoutError`` after ``timeout`` seconds without anything new.
    """
    queue: asyncio.Queue[Item] = asyncio.Queue()

    async def on_event(msg: Message) -> None:
        await queue.put(_event(msg))

    async def on_token(msg: Message) -> None:
        await queue.put(_token(msg))

    ev_sub = await bus.ordered(subjects.event(tenant, task_id), start_seq=events_from, cb=on_event)
    tok_sub = await bus.ordered(
        subjects.tokens(tenant, task_id), start_seq=tokens_from, cb=on_token
    )
    last_token = tokens_from - 1
    try:
        while True:
            item = await asyncio.wait_for(queue.get(), timeout)
            if item.kind == "token":
                if item.seq > last_token:
                    last_token = item.seq
                    yield item
                continue
            if not item.terminal:
                if with_events:
                    yield item
                continue
            # The end: what the live consumer has not delivered yet is read
            # from the stream, up to its last delta.
            await tok_sub.unsubscribe()
            while not queue.empty():
                rest = queue.get_nowait()
                if rest.kind == "token" and rest.seq > last_token:
                    last_token = rest.seq
                    yield rest
            async for msg in bus.read_subject(streams.TOKENS.name, subjects.tokens(tenant, task_id),
                                              start_seq=max(1, last_token + 1)):  # fmt: skip
                tail = _token(msg)
                if tail.seq > last_token:
                    last_token = tail.seq
                    yield tail
            yield item
            return
    finally:
        for sub in (ev_sub, tok_sub):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def as_dict(item: Item) -> dict[str, Any]:
    """The event or delta as JSON-ready data."""
    out: dict[str, Any] = msgspec.to_builtins(item.event if item.event is not None else item.delta)
    return out
