"""Jobs routed to a worker that died are not lost: its peers rescue them.

Cache-aware routing sends a session's step to the worker whose prefix cache
holds it, on that worker's own subject ``baton.jobs.<pool>.<worker>`` and
durable consumer. If that worker dies (no heartbeat for ``stale_after``, or a
``leaving`` heartbeat), any peer of the pool pulls the dead consumer dry —
jobs it held come back after their ack wait — and then deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from baton.bus import Bus, Consumption
from proto.messages import Heartbeat
from proto.streams import JOBS, ConsumerSpec, direct_owner

# Start pulling ``spec`` (the worker's own loop).
Pull = Callable[[ConsumerSpec], Consumption]

log = structlog.get_logger("inference_worker.rescue")


class Peers:
    """The last heartbeat of every other worker of the pool."""

    def __init__(self, me: str, *, stale_after: float) -> None:
        self.me = me
        self.stale_after = stale_after
        self.seen: dict[str, float] = {}
        self.left: set[str] = set()
        self.started = time.time()

    async def on_heartbeat(self, hb: Heartbeat, _subject: str) -> None:
        if hb.worker == self.me:
            return
        self.seen[hb.worker] = time.time()
        if hb.leaving:
            self.left.add(hb.worker)
        else:
            self.left.discard(hb.worker)

    def dead(self, worker: str) -> bool:
        if worker == self.me:
            return False
        if worker in self.left:
            return True
        last = self.seen.get(worker, self.started)  # unknown: give it time to speak
        return time.time() - last > self.stale_after


class Rescuer:
    """Finds the own consumers of dead peers of ``pool`` and pulls them dry
    with ``pull`` (the worker's own pull loop, so rescued jobs share its
    admission budget), then deletes them."""

    def __init__(self, bus: Bus, pool: str, peers: Peers, pull: Pull, every: float = 2.0) -> None:
        self.bus = bus
        self.pool = pool
        self.peers = peers
        self.pull = pull
        self.every = every
        self.active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while not self.bus.stopping:
            with contextlib.suppress(Exception):
                await self._scan()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.bus.wait_stopped(), self.every)

    async def _scan(self) -> None:
        for info in await self.bus.consumers(JOBS.name):
            owner = direct_owner(info.description)
            if owner is None or owner[0] != self.pool or info.name in self.active:
                continue
            if not self.peers.dead(owner[1]):
                continue
            spec = ConsumerSpec(
                stream=JOBS.name,
                durable=info.name,
                filter_subject=info.filter_subject,
                ack_wait=info.ack_wait or 60.0,
                max_deliver=info.max_deliver or 5,
            )
            self.active.add(info.name)
            task = asyncio.create_task(self._drain(spec, owner[1]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, spec: ConsumerSpec, owner: str) -> None:
        log.info("rescuing_jobs", owner=owner, consumer=spec.durable)
        loop = self.pull(spec)
        try:
            # Dry: nothing waiting and nothing held (by this worker, or the dead one).
            while not self.bus.stopping and await self.bus.pending(spec) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.bus.wait_stopped(), self.every)
            loop.stop()
            await loop
            await self.delete_if_empty(spec)
        except Exception as exc:  # another peer deleted it first, most likely
            log.info("rescue_ended", owner=owner, reason=repr(exc))
        finally:
            loop.stop()
            self.active.discard(spec.durable)

    async def delete_if_empty(self, spec: ConsumerSpec) -> bool:
        """Delete a direct consumer with nothing pending or held."""
        if await self.bus.pending(spec) > 0:
            return False
        await self.bus.delete_consumer(spec)
        return True
