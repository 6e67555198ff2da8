"""What a worker tells the others: heartbeats (load, readiness, the sessions
its prefix cache holds warm) and the engine's counters as metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from baton.bus import Bus
from proto import subjects
from proto.messages import Heartbeat

from . import metrics as m
from .gpu import GpuMonitor
from .supervisor import EngineSupervisor


class WarmSessions:
    """The sessions this worker served last (bounded, most recent last)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lru: OrderedDict[str, None] = OrderedDict()

    def touch(self, session: str) -> None:
        self._lru[session] = None
        self._lru.move_to_end(session)
        while len(self._lru) > self.limit:
            self._lru.popitem(last=False)

    def newest(self, n: int) -> list[str]:
        return list(self._lru)[-n:]


class Speeds:
    """Per-sequence prefill and decode speeds (tokens/s) of the recent
    generations: an exponential average, so a heartbeat reports what the
    engine does now (batching slows each sequence), not what it once did."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.prefill_tps = 0.0
        self.decode_tps = 0.0

    def _mix(self, old: float, new: float) -> float:
        return new if old <= 0 else old + self.weight * (new - old)

    def observe(self, prefilled: int, prefill_s: float, decoded: int, decode_s: float) -> None:
        """One generation: ``prefilled`` prompt tokens (the cached ones not
        counted) in ``prefill_s``, then ``decoded`` more tokens in ``decode_s``.
        Too short to time (a few milliseconds, a handful of tokens) is skipped."""
        if prefilled >= 16 and prefill_s > 0.002:
            self.prefill_tps = self._mix(self.prefill_tps, prefilled / prefill_s)
        if decoded >= 4 and decode_s > 0.002:
            self.decode_tps = self._mix(self.decode_tps, decoded / decode_s)


class Beacon:
    def __init__(
        self,
        sup: EngineSupervisor,
        warm: WarmSessions,
        gpu: GpuMonitor | None,
        speeds: Speeds | None = None,
    ) -> None:
        self.sup = sup
        self.warm = warm
        self.gpu = gpu
        self.speeds = speeds or Speeds()

    def heartbeat(self, leaving: bool = False) -> Heartbeat:
        s, adm = self.sup.s, self.sup.admission
        ready = self.sup.health.ready
        cap = self.sup.engine.capacity() if ready else None
        return Heartbeat(
            worker=s.worker_id,
            pool=s.pool,
            ready=ready and not leaving,
            engine=self.sup.engine.name,
            inflight=len(self.sup.flights),
            admitted_tokens=adm.tokens,
            kv_capacity_tokens=adm.kv_limit,
            warm_sessions=self.warm.newest(64),
            leaving=leaving,
            ts=time.time(),
            kv_tokens=cap.kv_tokens if cap else 0,
            max_seqs=cap.max_num_seqs if cap else 0,
            max_model_len=cap.max_model_len if cap else 0,
            prefill_tps=round(self.speeds.prefill_tps, 1),
            decode_tps=round(self.speeds.decode_tps, 2),
        )

    async def beat(self, bus: Bus, every_tenth: Callable[[], Awaitable[None]]) -> None:
        """Heartbeat forever; every tenth beat, ``every_tenth()`` runs too."""
        s = self.sup.s
        subject = subjects.heartbeat(s.pool, s.worker_id)
        beats = 0
        while True:
            with contextlib.suppress(Exception):
                await bus.notify(subject, self.heartbeat())
            beats += 1
            if beats % 10 == 0:
                with contextlib.suppress(Exception):
                    await every_tenth()
            await self._pause(s.heartbeat_interval)

    async def _pause(self, interval: float) -> None:
        """Until the next beat; a worker still loading beats again as soon
        as its engine is up, so the scheduler sees a woken pool at once."""
        if self.sup.ok.is_set():
            await asyncio.sleep(interval)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sup.ok.wait(), interval)

    async def leave(self, bus: Bus) -> None:
        s = self.sup.s
        await bus.notify(subjects.heartbeat(s.pool, s.worker_id), self.heartbeat(leaving=True))

    async def sample_metrics(self) -> None:
        labels, pool = self.sup.labels, self.sup.s.pool
        last_q = last_h = last_p = 0
        while True:
            st = self.sup.engine.stats()
            m.KV_USAGE.labels(*labels).set(st.kv_usage)
            # Engine counters restart with the engine: only count increases.
            if st.prefix_cache_queries >= last_q:
                m.PREFIX_QUERIES.labels(pool).inc(st.prefix_cache_queries - last_q)
            if st.prefix_cache_hits >= last_h:
                m.PREFIX_HITS.labels(pool).inc(st.prefix_cache_hits - last_h)
            if st.preemptions >= last_p:
                m.PREEMPTIONS.labels(pool).inc(st.preemptions - last_p)
            last_q, last_h, last_p = st.prefix_cache_queries, st.prefix_cache_hits, st.preemptions
            for gpu, mem in (self.gpu.memory() if self.gpu else {}).items():
                m.GPU_MEMORY_USED.labels(*labels, gpu).set(mem.used)
                m.GPU_MEMORY_FREE.labels(*labels, gpu).set(mem.free)
            await asyncio.sleep(1.0)
