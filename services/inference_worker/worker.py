"""The inference worker: pull jobs while there is KV-cache headroom, run them
concurrently on the engine, append each answer to the context store and
publish a small result.

In parts: ``jobs.py`` handles one job (window, admission, generation,
answer, result), ``supervisor.py`` the engine's lifecycle and faults,
``heartbeat.py`` what the worker tells its peers, ``rescue.py`` the jobs of
dead peers. This module is the intake — the pull loops, gated by the shared
admission budget — and the wiring.

SIGTERM drains: no new pulls, in-flight jobs finish within the grace period
or are naked.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import structlog

from baton.bus import Bus, Consumption, Delivery
from baton.service import Health
from proto import subjects
from proto.messages import Cancel, Heartbeat
from proto.streams import JOBS, RESULTS, TOKENS, ConsumerSpec, direct_consumer, worker_consumer

from . import metrics as m
from .admission import Admission
from .deltas import TokenPublisher
from .engines.base import Engine
from .gpu import GpuMonitor
from .gpuclock import GpuClock
from .heartbeat import Beacon, Speeds, WarmSessions
from .jobs import JobHandler
from .rescue import Peers, Rescuer
from .settings import WorkerSettings
from .supervisor import EngineSupervisor

log = structlog.get_logger("inference_worker")


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        health: Health,
        bus: Bus,
        *,
        manage_engine: bool = True,
    ) -> None:
        """``manage_engine=False``: the engine is already started and outlives
        the worker (tests share one vLLM engine this way); faults still restart it."""
        self.s = settings
        self.engine = engine
        self.manage_engine = manage_engine
        self.health = health
        self.pool = settings.pool
        self.consumer = worker_consumer(settings.pool)
        self.direct = direct_consumer(settings.pool, settings.worker_id)
        self.peers = Peers(settings.worker_id, stale_after=settings.peer_stale_after)
        order, queue = settings.admission_order, settings.admission_queue
        self.admission = Admission(1, 1, order=order, queue=queue)
        self.sup = EngineSupervisor(settings, engine, health, self.admission)
        self.warm = WarmSessions(settings.warm_sessions)
        self.speeds = Speeds()
        self.clock = GpuClock()
        self._tasks: set[asyncio.Task[None]] = set()  # one per delivery not yet settled
        self.waiting = 0  # of those, not yet admitted
        self.bus = bus
        lag = m.TOKEN_LAG.labels(settings.pool)
        self.tokens = TokenPublisher(bus, settings.token_interval, lag, settings.token_interval_max)
        self.jobs = JobHandler(self.sup, bus, self.warm, self.clock, self.tokens, self.speeds)
        self.rescue = Rescuer(bus, self.pool, self.peers, self.pull)

    @property
    def epoch(self) -> int:
        """Engine restarts so far."""
        return self.sup.epoch

    @property
    def flights(self) -> dict[str, object]:
        return dict(self.sup.flights)

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        bus = self.bus
        beacon = Beacon(self.sup, self.warm, GpuMonitor(), self.speeds)
        labels = self.sup.labels
        m.init_series(self.pool, self.s.model_name)
        await bus.provision(streams=[JOBS, RESULTS, TOKENS], consumers=[self.consumer, self.direct])
        await bus.subscribe(f"{subjects.CANCEL}.*.*", Cancel, self._on_cancel)
        await bus.subscribe(
            f"{subjects.HEARTBEATS}.{self.pool}.*", Heartbeat, self.peers.on_heartbeat
        )
        m.READY.labels(*labels).set(0)

        async def reprovision() -> None:  # a peer that wrongly took us for dead deleted it
            await bus.ensure_consumer(self.direct)

        # Heartbeats start before the engine loads (ready=False until then):
        # peers must not take a worker that is still loading for a dead one.
        background = [asyncio.create_task(beacon.beat(bus, reprovision))]
        await self.sup.start(load=self.manage_engine)
        background.append(asyncio.create_task(beacon.sample_metrics()))
        try:
            await asyncio.gather(
                self.pull(self.consumer),
                self.pull(self.direct),  # jobs routed here for this worker's warm cache
                self.rescue.run(),
            )
            await self._drain()
        finally:
            for t in background:
                t.cancel()
            with contextlib.suppress(Exception):
                await beacon.leave(bus)
            with contextlib.suppress(Exception):
                await self.rescue.delete_if_empty(self.direct)
            self.health.ready, self.health.reason = False, "stopped"
            m.READY.labels(*labels).set(0)
            if self.manage_engine:
                await self.engine.stop()

    # -- intake ------------------------------------------------------------

    def _admitted(self) -> None:
        self.waiting -= 1

    def pull(self, spec: ConsumerSpec) -> Consumption:
        """Fetch from ``spec`` while there is headroom, until the bus or the
        handle stops. Every pull loop of the worker shares one admission
        budget and one set of handler tasks (drained by ``_drain``)."""

        async def handle(d: Delivery) -> None:
            await self.jobs.handle(d, self._admitted)

        return self.bus.consume(spec, handle, concurrency=sys.maxsize, gate=_Headroom(self),
                                running=self._tasks, finish=False)  # fmt: skip

    async def _drain(self) -> None:
        """After SIGTERM: let in-flight jobs finish within the grace period,
        then abort the rest (they are naked and redelivered elsewhere)."""
        if not self._tasks:
            return
        log.info("draining", inflight=len(self._tasks), grace=self.s.drain_grace)
        _, late = await asyncio.wait(self._tasks, timeout=self.s.drain_grace)
        if late:
            self.sup.epoch += 1  # their generations end as faults -> nak
            await self.sup.abort_all()
            await asyncio.wait(late, timeout=10)

    async def _on_cancel(self, cancel: Cancel, _subject: str) -> None:
        await self.jobs.on_cancel(cancel)


class _Headroom:
    """The worker's admission budget as ``Bus.consume``'s gate: nothing is
    fetched while the engine is down, and no more than fits the KV cache."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker

    def room(self) -> int:
        if not self.w.sup.ok.is_set():
            return 0
        return min(self.w.s.max_fetch, self.w.admission.room_for(self.w.waiting))

    async def wait(self) -> None:
        await self.w.admission.wait_change(0.25)

    def took(self, delivery: Delivery) -> None:
        self.w.waiting += 1
