"""The engine's lifecycle: start it, and on a fault (OOM, dead engine) abort
everything in flight, go not-ready, restart it and count it.

``epoch`` counts restarts: a generation that began in an older epoch ended
because of a fault (its job is naked and redelivered), not by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from baton.service import Health

from . import metrics as m
from .admission import Admission
from .engines.base import Engine, EngineOOM
from .settings import WorkerSettings

log = structlog.get_logger("inference_worker")


@dataclass
class Flight:
    """One admitted generation."""

    request_id: str
    tenant: str
    task_id: str
    epoch: int
    cancelled: bool = False


class EngineSupervisor:
    def __init__(
        self, settings: WorkerSettings, engine: Engine, health: Health, admission: Admission
    ) -> None:
        self.s = settings
        self.engine = engine
        self.health = health
        self.admission = admission
        self.labels = (settings.pool, settings.worker_id)
        self.flights: dict[str, Flight] = {}
        self.epoch = 0
        self.ok = asyncio.Event()
        self._restart_lock = asyncio.Lock()

    async def start(self, *, load: bool = True) -> None:
        t0 = time.monotonic()
        if load:
            await self.engine.start()
        cap = self.engine.capacity()
        self.admission.resize(cap.kv_tokens, cap.max_num_seqs, self.s.kv_headroom)
        m.KV_CAPACITY.labels(*self.labels).set(cap.kv_tokens)
        self.ok.set()
        self.health.ready, self.health.reason = True, "engine loaded"
        m.READY.labels(*self.labels).set(1)
        log.info(
            "engine_ready",
            engine=self.engine.name,
            kv_tokens=cap.kv_tokens,
            max_num_seqs=cap.max_num_seqs,
            seconds=round(time.monotonic() - t0, 2),
        )

    async def abort_all(self) -> None:
        for f in list(self.flights.values()):
            with contextlib.suppress(Exception):
                await self.engine.abort(f.request_id)

    async def fault(self, exc: BaseException, seen_epoch: int) -> None:
        """Abort everything in flight and restart the engine (once per fault)."""
        async with self._restart_lock:
            if seen_epoch != self.epoch:
                return  # another job already handled this fault
            self.epoch += 1
            self.ok.clear()
            pool = self.s.pool
            oom = isinstance(exc, EngineOOM)
            if oom:
                m.OOM.labels(pool).inc()
            m.JOBS.labels(pool, "oom" if oom else "engine_dead").inc()
            m.READY.labels(*self.labels).set(0)
            self.health.ready, self.health.reason = False, f"restarting engine after {exc!r}"
            log.error("engine_fault", error=repr(exc), inflight=len(self.flights))
            await self.abort_all()
            with contextlib.suppress(Exception):
                await self.engine.stop()
            await asyncio.sleep(self.s.engine_restart_delay)
            m.ENGINE_RESTARTS.labels(pool).inc()
            await self.start()
