"""Durable token streams: a generation's text as ``TokenDelta`` batches on
``baton.tokens.<tenant>.<task_id>`` (stream ``BATON_TOKENS``).

The worker hands every engine chunk to ``TokenSink.add``, which only appends
to the generation's buffer. One ticker per worker (not one task per
generation) wakes every ``batch_interval`` seconds and publishes, for each
open generation with text waiting, what accumulated as one delta; the
publishes of a tick go out together and their acks come back together. The
interval grows with the number of open streams (``base`` up to
``STREAMS_PER_BASE`` streams, then in proportion, capped at ``ceiling``),
so a worker sends at most about ``STREAMS_PER_BASE / base`` deltas a second
(133 at 30 ms) until the cap, whatever the engine's speed: the number of
messages follows time, never token count. A generation's first text waits
for the next tick like the rest (at most one interval: 30 ms with one stream
open), so an answer generated whole within one interval, as the simulator's
or a short one, is one delta, the final one, instead of a first delta and a
final one (the simulator's steps sent 2.0 each). Publishing never blocks the
generation. Each delta's ``Nats-Msg-Id`` is
``<job_id>#<attempt>.<index>`` (``keys.token_delta``): a publish retried
after a lost ack is stored once; one delta per generation is in flight at a
time, so a generation's deltas are stored in ``index`` order.

``take_final()`` ends a generation whose answer will be stored: the rest
goes, with ``final`` set, into the worker's ``ContextAnswer``, and the
context store publishes it beside the answer's append and before the result,
so the deltas of a step's attempt are in the stream before its ``step done``
event (which follows the result) and concatenate to the stored text.
``close`` ends any other generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import structlog
from prometheus_client import Histogram

from baton.bus import Bus
from proto import keys, subjects
from proto.messages import InferenceJob, TokenDelta

log = structlog.get_logger("inference_worker.deltas")

_PUBLISH_ATTEMPTS = 3
# Open streams a tick of the base interval serves. Each delta costs ~80 µs in
# the publisher and 25-40 µs in nats-server, about half of Baton's CPU per
# generated token: 4 (was 8) halves the deltas of a busy worker while every
# stream still gets one at least every ``ceiling`` (at 30 ms the interval
# reaches 250 ms with 33 streams open).
STREAMS_PER_BASE = 4
DEFAULT_CEILING = 0.25  # seconds: the longest a reader waits for the next delta


def batch_interval(base: float, streams: int, ceiling: float = DEFAULT_CEILING) -> float:
    """Seconds between ticks with ``streams`` generations open: ``base`` up
    to ``STREAMS_PER_BASE`` of them, then growing in proportion (the worker's
    delta rate stays at ``STREAMS_PER_BASE / base`` a second), never above
    ``ceiling`` (nor below ``base``)."""
    grown = base * max(1.0, streams / STREAMS_PER_BASE)
    return max(base, min(grown, ceiling))


class TokenSink(Protocol):
    def add(self, text: str) -> None: ...

    async def close(self, *, final: bool) -> None: ...

    async def take_final(self) -> TokenDelta | None: ...


class _Off:
    """Streaming disabled: a sink that drops everything."""

    def add(self, text: str) -> None:
        pass

    async def close(self, *, final: bool) -> None:
        pass

    async def take_final(self) -> TokenDelta | None:
        return None


class _Stream:
    """One generation's deltas; its publisher's ticker flushes it."""

    def __init__(self, owner: TokenPublisher, bus: Bus, job: InferenceJob, attempt: str) -> None:
        self.owner = owner
        self.bus = bus
        self.since = 0.0  # when the oldest pending text was generated
        self.job = job
        self.attempt = attempt
        self.subject = subjects.tokens(job.tenant, job.task_id)
        self.pending: list[str] = []
        self.index = 0
        self.offset = 0
        self.failed = False
        self.closed = False
        self.flushing: asyncio.Task[None] | None = None  # the delta in flight
        self._lock = asyncio.Lock()

    def add(self, text: str) -> None:
        if text and not self.closed:
            if not self.pending:
                self.since = time.time()
            self.pending.append(text)

    def due(self) -> bool:
        """Text waiting and no delta of this generation in flight."""
        return bool(self.pending) and not self.failed and self.flushing is None

    async def _flush(self, *, final: bool) -> None:
        async with self._lock:
            if (not self.pending and not final) or self.failed:
                return
            since = self.since
            delta = self._next(final)
            text = delta.text
            msg_id = keys.token_delta(self.job.job_id, self.attempt, self.index)
            for attempt in range(_PUBLISH_ATTEMPTS):
                try:
                    await self.bus.publish(
                        self.subject, delta, msg_id=msg_id, task_id=self.job.task_id
                    )
                    break
                except Exception as exc:
                    if attempt == _PUBLISH_ATTEMPTS - 1:
                        # A hole would break concatenation: stop this attempt's
                        # deltas; readers still get the answer from the events.
                        self.failed = True
                        log.warning("token_publish_failed", error=repr(exc), step=self.job.step)
                        return
                    await asyncio.sleep(0.1 * (attempt + 1))
            self.index += 1
            self.offset += len(text)
            if text and self.owner.lag is not None:
                self.owner.lag.observe(time.time() - since)

    def _next(self, final: bool) -> TokenDelta:
        """The pending text as the next delta (taken from ``pending``)."""
        text = "".join(self.pending)
        self.pending.clear()
        return TokenDelta(
            task_id=self.job.task_id, tenant=self.job.tenant, step=self.job.step,
            agent=self.job.agent, attempt=self.attempt, index=self.index,
            offset=self.offset, text=text, final=final, ts=time.time(),
        )  # fmt: skip

    async def take_final(self) -> TokenDelta | None:
        """Stop, and return what is left as the final delta, unpublished: the
        context store publishes it beside the answer (``ContextAnswer``).
        None when this generation's deltas failed (a hole would break
        concatenation)."""
        self.closed = True
        self.owner.forget(self)
        if self.flushing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flushing)
        async with self._lock:
            if self.failed:
                return None
            since = self.since
            delta = self._next(final=True)
            self.index += 1
            self.offset += len(delta.text)
            # Its lag as it leaves for the store (which publishes it at once):
            # an answer whole within one tick has no other delta to observe.
            if delta.text and self.owner.lag is not None:
                self.owner.lag.observe(time.time() - since)
            return delta

    def start_flush(self) -> None:
        task = asyncio.create_task(self._flush(final=False))
        self.flushing = task
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        if self.flushing is task:
            self.flushing = None
        if not task.cancelled() and task.exception() is not None:  # _flush catches publishes
            log.warning("token_flush_failed", error=repr(task.exception()))

    async def close(self, *, final: bool) -> None:
        """Stop; with ``final``, publish what is left as the last delta."""
        self.closed = True
        self.owner.forget(self)
        if self.flushing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flushing)
        if final:
            await self._flush(final=True)


class TokenPublisher:
    """Opens a sink per generation and flushes them all from one ticker;
    ``interval <= 0`` turns streaming off."""

    def __init__(
        self,
        bus: Bus,
        interval: float,
        lag: Histogram | None = None,
        ceiling: float = DEFAULT_CEILING,
    ) -> None:
        """``interval``: the base tick (see ``batch_interval``); ``lag``:
        observes each delta's lag (its oldest text's age when published)."""
        self.interval = interval
        self.ceiling = ceiling
        self.lag = lag
        self.bus = bus
        self.streams: dict[int, _Stream] = {}  # open generations, by id()
        self.ticks = 0
        self._ticker: asyncio.Task[None] | None = None

    def open(self, job: InferenceJob, attempt: str) -> TokenSink:
        """``attempt``: unique per generation of a step (job message and delivery)."""
        if self.interval <= 0:
            return _Off()
        stream = _Stream(self, self.bus, job, attempt)
        self.streams[id(stream)] = stream
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())
        return stream

    def forget(self, stream: _Stream) -> None:
        self.streams.pop(id(stream), None)

    def current_interval(self) -> float:
        return batch_interval(self.interval, len(self.streams), self.ceiling)

    async def _tick(self) -> None:
        """Until no generation is open: sleep one interval, then start one
        delta for each open generation that has text waiting."""
        while self.streams:
            await asyncio.sleep(self.current_interval())
            self.ticks += 1
            for stream in list(self.streams.values()):
                if stream.due():
                    stream.start_flush()
