"""Durable token streams: a generation's text as ``TokenDelta`` batches on
``baton.tokens.<tenant>.<task_id>`` (stream ``BATON_TOKENS``).

The worker hands every engine chunk to ``TokenSink.add`` (cheap: it only
buffers); one background task per generation publishes what accumulated,
then waits ``interval`` seconds, so a fast engine sends one message per
interval instead of one per token and a slow one sends each token as it
comes. Publishing never blocks the generation. Each delta's ``Nats-Msg-Id``
is ``<job_id>#<attempt>.<index>``: a publish retried after a lost ack is
stored once.

``close(final=True)`` flushes the rest with ``final`` set; the worker awaits
it together with the answer's append and before it publishes the result, so
the deltas of a step's attempt are in the stream before its ``step done``
event (which follows the result) and concatenate to the stored text.
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

log = structlog.get_logger("inference_worker.tokens")

_PUBLISH_ATTEMPTS = 3


class TokenSink(Protocol):
    def add(self, text: str) -> None: ...

    async def close(self, *, final: bool) -> None: ...


class _Off:
    """Streaming disabled: a sink that drops everything."""

    def add(self, text: str) -> None:
        pass

    async def close(self, *, final: bool) -> None:
        pass


class _Stream:
    """One generation's deltas."""

    def __init__(
        self, bus: Bus, job: InferenceJob, attempt: str, interval: float, lag: Histogram | None
    ) -> None:
        self.bus = bus
        self.lag = lag
        self.since = 0.0  # when the oldest pending text was generated
        self.job = job
        self.attempt = attempt
        self.interval = interval
        self.subject = subjects.tokens(job.tenant, job.task_id)
        self.pending: list[str] = []
        self.index = 0
        self.offset = 0
        self.failed = False
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run())

    def add(self, text: str) -> None:
        if text:
            if not self.pending:
                self.since = time.time()
            self.pending.append(text)
            self._wake.set()

    async def _run(self) -> None:
        while not self._closing.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._closing.is_set():
                return
            await self._flush(final=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval)

    async def _flush(self, *, final: bool) -> None:
        async with self._lock:
            if (not self.pending and not final) or self.failed:
                return
            text = "".join(self.pending)
            self.pending.clear()
            since = self.since
            delta = TokenDelta(
                task_id=self.job.task_id, tenant=self.job.tenant, step=self.job.step,
                agent=self.job.agent, attempt=self.attempt, index=self.index,
                offset=self.offset, text=text, final=final, ts=time.time(),
            )  # fmt: skip
            msg_id = keys.token_delta(self.job.job_id, self.attempt, self.index)
            for attempt in range(_PUBLISH_ATTEMPTS):
                try:
                    await self.bus.publish(self.subject, delta, msg_id=msg_id,
                                           task_id=self.job.task_id)  # fmt: skip
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
            if text and self.lag is not None:
                self.lag.observe(time.time() - since)

    async def close(self, *, final: bool) -> None:
        """Stop; with ``final``, publish what is left as the last delta."""
        self._closing.set()
        self._wake.set()
        await self._task
        if final:
            await self._flush(final=True)


class TokenPublisher:
    """Opens a sink per generation; ``interval <= 0`` turns streaming off."""

    def __init__(self, interval: float, lag: Histogram | None = None) -> None:
        """``lag``: observes each delta's lag (its oldest text's age when published)."""
        self.interval = interval
        self.lag = lag
        self.bus: Bus | None = None

    def open(self, job: InferenceJob, attempt: str) -> TokenSink:
        """``attempt``: unique per generation of a step (job message and delivery)."""
        if self.interval <= 0 or self.bus is None:
            return _Off()
        return _Stream(self.bus, job, attempt, self.interval, self.lag)
