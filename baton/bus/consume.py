"""Consuming: the pull loop, handler settlement by outcome (ack / nak /
term / dead letter), keep-alive and erasure of handled messages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator
from typing import Any

import nats.errors
import structlog

from baton import tracing
from baton.metrics import DEAD_LETTERS, MESSAGES_HANDLED, register
from proto import keys, subjects
from proto.streams import ConsumerSpec

from .delivery import HDR_DLQ_REASON, HDR_DLQ_SUBJECT, Delivery, Gate, Handler, Puller, _KeepAlive
from .messaging import Messaging
from .outcomes import Outcome, settlement
from .pull import CHECK_EVERY, MAX_BATCH, PullStream

log = structlog.get_logger("baton.bus")


class Consumption:
    """One running pull loop, as ``Bus.consume`` returns it: ``stop()`` ends
    this loop alone; awaiting it waits until the loop has ended (with
    ``finish``, its handlers too) and raises what ended it."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Stop pulling: the open pull request is withdrawn and what arrived
        but was not handed over is naked (redelivered); handlers in flight
        go on (``finish``)."""
        self.stopping.set()

    def __await__(self) -> Generator[Any, None, None]:
        assert self.task is not None
        return self.task.__await__()


class Consuming(Messaging):
    """Pull loops and settlement (part of ``Bus``)."""

    async def puller(self, spec: ConsumerSpec) -> Puller:
        self._register(spec)
        sub = await self._js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        return Puller(spec=spec, sub=sub)

    @staticmethod
    def _register(spec: ConsumerSpec) -> None:
        # Series exist from the start, so the first dead letter is an increase.
        register(DEAD_LETTERS, MESSAGES_HANDLED)
        DEAD_LETTERS.labels(spec.durable)
        for outcome in ("ack", "nak", "term"):
            MESSAGES_HANDLED.labels(spec.durable, outcome)

    async def settle(self, spec: ConsumerSpec, delivery: Delivery, handler: Handler) -> None:
        """Run ``handler`` on one delivery and settle it by outcome."""
        with tracing.continued(delivery.headers):
            bound = {"consumer": spec.durable}
            if delivery.task_id:
                bound["task_id"] = delivery.task_id
            with structlog.contextvars.bound_contextvars(**bound):
                await self._settle(spec, delivery, handler)

    async def erase(self, delivery: Delivery) -> bool:
        """Overwrite ``delivery``'s message in the store (``STREAM.MSG.DELETE``
        with erase): a work queue's ack only unlinks it. True: this call
        removed it, which settles the delivery as an ack would (the server
        drops a deleted message from every consumer's pending list, pinned by
        tests/test_erase_handled.py). Best effort: a failure is logged and the
        caller settles the message itself."""
        try:
            return await self.erase_messages(delivery.stream, [delivery.stream_seq]) == 1
        except Exception as exc:
            log.warning("erase_handled_failed", error=repr(exc))
            return False

    async def _settle(self, spec: ConsumerSpec, delivery: Delivery, handler: Handler) -> None:
        keepalive = _KeepAlive(delivery, spec.ack_wait / 3)
        error: BaseException | None = None
        try:
            await handler(delivery)
        except asyncio.CancelledError:
            keepalive.cancel()
            MESSAGES_HANDLED.labels(spec.durable, "nak").inc()
            with contextlib.suppress(Exception):
                await asyncio.shield(delivery.nak(0.5))
            raise
        except Exception as exc:
            error = exc
        keepalive.cancel()
        s = settlement(error, delivery.num_delivered, spec.max_deliver)
        if error is not None and not isinstance(error, Outcome):
            if s.action == "dead_letter":
                log.error("handler_failed_last_delivery", error=repr(error))
            else:
                log.warning("handler_failed", error=repr(error), retry_in=s.delay)
        try:
            erased = False
            if s.action in ("ack", "term") and spec.erase_handled:
                erased = await self.erase(delivery)  # dead letters erase their own
            if s.action == "ack" and erased:
                delivery.settled_by_erasure()  # the delete was the ack: none sent
            elif s.action == "ack":
                await delivery.ack()
            elif s.action == "nak":
                await delivery.nak(s.delay)
            elif s.action == "term":
                await delivery.term()
            else:
                await self.dead_letter(spec, delivery, s.reason)
        finally:
            outcome = s.action if s.action in ("ack", "nak") else "term"
            MESSAGES_HANDLED.labels(spec.durable, outcome).inc()

    async def dead_letter(self, spec: ConsumerSpec, delivery: Delivery, reason: str) -> None:
        """Terminate ``delivery`` and keep a copy on ``baton.dlq.<consumer>``."""
        DEAD_LETTERS.labels(spec.durable).inc()
        log.warning("dead_lettered", reason=reason, subject=delivery.subject)
        if spec.erase_handled:
            await self.erase(delivery)
        await delivery.term()
        try:
            await self.publish(
                subjects.dead_letter(spec.durable),
                delivery.data,
                msg_id=keys.dead_letter(spec.durable, delivery.stream_seq),
                task_id=delivery.task_id,
                headers={HDR_DLQ_REASON: reason[:200], HDR_DLQ_SUBJECT: delivery.subject},
            )
        except Exception as exc:  # the DLQ copy is best effort; the term stands
            log.warning("dead_letter_copy_failed", error=repr(exc))

    def consume(
        self,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        concurrency: int = 64,
        gate: Gate | None = None,
        running: set[asyncio.Task[None]] | None = None,
        finish: bool = True,
    ) -> Consumption:
        """Start a loop that pulls and handles messages until its handle's
        ``stop()`` or the bus's; at most ``concurrency`` handlers run at once,
        and no more are taken than ``gate.room()`` allows (a shut gate is
        waited on). ``running``: the handler tasks, in a set the caller may share
        between loops. ``finish``: in-flight handlers finish before the loop
        ends (False: the caller drains them). One pull request stays open for
        the free room (``baton.bus.pull``)."""
        handle = Consumption()
        handle.task = asyncio.create_task(self._consume(
            spec, handler, concurrency, gate, set() if running is None else running, finish,
            handle.stopping))  # fmt: skip
        return handle

    def _start(self, spec: ConsumerSpec, d: Delivery, handler: Handler, gate: Gate | None,
               running: set[asyncio.Task[None]], done: Callable[[asyncio.Task[None]], None]
               ) -> None:  # fmt: skip
        if gate is not None:
            gate.took(d)
        task = asyncio.create_task(self.settle(spec, d, handler))
        running.add(task)
        task.add_done_callback(done)

    async def _consume(
        self, spec: ConsumerSpec, handler: Handler, concurrency: int, gate: Gate | None,
        running: set[asyncio.Task[None]], finish: bool, stopping: asyncio.Event,
    ) -> None:  # fmt: skip
        self._register(spec)
        wake = asyncio.Event()
        stream = PullStream(self._nc, self._api_prefix, spec, wake.set)
        stoppers = [asyncio.ensure_future(e.wait()) for e in (self._stopping, stopping)]
        for stopper in stoppers:
            stopper.add_done_callback(lambda _: wake.set())

        def stopped() -> bool:
            return self._stopping.is_set() or stopping.is_set()

        gating: list[asyncio.Task[None]] = []  # a gate.wait() in progress

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            wake.set()

        def gate_waited(task: asyncio.Task[None]) -> None:
            gating.clear()
            wake.set()

        try:
            while not stopped():
                try:
                    await stream.open()
                    break
                except nats.errors.ConnectionClosedError:
                    return
                except Exception as exc:
                    log.warning("fetch_failed", consumer=spec.durable, error=repr(exc))
                    await asyncio.sleep(0.5)
            while not stopped() and not self._nc.is_closed:
                wake.clear()
                reason = stream.lost()
                if reason:
                    log.info("pull_reissued", consumer=spec.durable, reason=reason)
                    if reason not in ("reconnected", "heartbeat_missed"):
                        await asyncio.sleep(0.5)  # e.g. 409 Consumer Deleted: not in a spin
                slots = concurrency - len(running)
                room = slots if gate is None else min(slots, gate.room())
                while stream.ready and room > 0:  # hand over what arrived
                    self._start(spec, stream.take(), handler, gate, running, done)
                    slots -= 1
                    room = slots if gate is None else min(slots, gate.room())
                for d in stream.ready:  # no room for these yet
                    stream.hold(d)
                if stream.ready and stream.outstanding:  # the room shrank under a request
                    with contextlib.suppress(Exception):
                        await stream.cancel()
                free = min(room, MAX_BATCH) - stream.outstanding - len(stream.ready)
                if free > 0 and free >= stream.outstanding:  # top up by half the room or more
                    try:
                        await stream.request(free)
                    except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                        break
                    except Exception as exc:  # reconnecting, buffer full: try again shortly
                        log.warning("fetch_failed", consumer=spec.durable, error=repr(exc))
                        await asyncio.sleep(0.5)
                        continue
                elif gate is not None and room <= 0 < slots and not gating:  # the gate is shut
                    gating.append(asyncio.create_task(gate.wait()))
                    gating[0].add_done_callback(gate_waited)
                with contextlib.suppress(TimeoutError):  # a local timer: look at reconnects
                    async with asyncio.timeout(CHECK_EVERY):
                        await wake.wait()
        finally:
            for task in (*stoppers, *gating):
                task.cancel()
            await stream.close()
            if finish and running:
                await asyncio.gather(*running, return_exceptions=True)
