"""What the orchestrator knows of each model pool now: its catalogue entry
(``pools.py``) and what its workers' heartbeats and its queue say
(``scheduling.PoolNow``). The conductor hands ``PoolView.look`` to the pure
decisions (``transitions.Rules.pools``): a read of memory, no I/O; the
placement it leads to is frozen into the step, so a replay or a retry does
not look again.

Drift: a worker measures its KV cache, sequence slots, context length and
speeds (``Heartbeat``); a catalogue figure more than ``DRIFT_TOLERANCE`` away
from a worker's measurement is logged once per worker and figure (again only
after it came back within tolerance) and counted in
``baton_pool_catalogue_drift_total{pool,figure}``.
"""

from __future__ import annotations

import statistics
import time

import structlog

from proto.messages import Heartbeat

from . import metrics as m
from .fairness import PoolRoom
from .pools import Catalogue, PoolSpec, drifts
from .routing import HeartbeatTracker
from .scheduling import PoolNow
from .state import RunState

log = structlog.get_logger("orchestrator.pools")

DRIFT_TOLERANCE = 0.5
"""A measured figure within ±50% of the catalogue's is no drift: speeds
move with batch size and prompt length."""


def measured(hb: Heartbeat) -> dict[str, float]:
    """A heartbeat's measurements by catalogue figure (the ones it has)."""
    figures = {
        "kv_tokens": hb.kv_tokens,
        "max_seqs": hb.max_seqs,
        "max_model_len": hb.max_model_len,
        "prefill_tps": hb.prefill_tps,
        "decode_tps": hb.decode_tps,
    }
    return {k: float(v) for k, v in figures.items() if v > 0}


class PoolView:
    def __init__(
        self,
        catalogue: Catalogue,
        heartbeats: HeartbeatTracker,
        *,
        stale_after: float = 6.0,
    ) -> None:
        self.catalogue = catalogue
        self.heartbeats = heartbeats
        self.stale_after = stale_after
        self.backlog: dict[str, int] = {}  # jobs waiting on each pool's consumer
        # Steps this replica placed on each pool and has no answer for yet: a
        # burst dispatched between two heartbeats is seen at once.
        self.placed: dict[str, int] = {}
        self._drifting: set[tuple[str, str, str]] = set()  # (pool, worker, figure)
        heartbeats.listeners.append(self.check_drift)

    def check_drift(self, hb: Heartbeat) -> None:
        if not self.catalogue.listed(hb.pool):
            return
        seen = measured(hb)
        now = {d.figure: d for d in drifts(self.catalogue.spec(hb.pool), seen, DRIFT_TOLERANCE)}
        for figure in seen:
            key = (hb.pool, hb.worker, figure)
            d = now.get(figure)
            if d is None:
                self._drifting.discard(key)
            elif key not in self._drifting:
                self._drifting.add(key)
                m.CATALOGUE_DRIFT.labels(hb.pool, figure).inc()
                log.warning("pool_catalogue_drift", pool=hb.pool, worker=hb.worker,
                            figure=figure, catalogue=d.catalogue, measured=d.measured,
                            engine=hb.engine)  # fmt: skip

    def changed(self, old: RunState | None, new: RunState | None) -> None:
        """A change of a run about to be stored (or, arguments swapped, one
        that was not): its steps placed and answered since."""
        for pool, n in (_active(new) if new is not None else {}).items():
            self.placed[pool] = self.placed.get(pool, 0) + n
        for pool, n in (_active(old) if old is not None else {}).items():
            self.placed[pool] = max(0, self.placed.get(pool, 0) - n)

    def room(self) -> PoolRoom:
        """What every pool's live, ready workers hold at once (the fair
        gate's bound on lending): each one's admission KV limit and sequence
        slots as its heartbeat states them (the catalogue's slots while it
        has not measured them)."""
        now = time.time()
        kv = seqs = 0
        for (pool, _), hb in self.heartbeats.last.items():
            if hb.leaving or not hb.ready or now - hb.ts > self.stale_after:
                continue
            kv += hb.kv_capacity_tokens
            seqs += hb.max_seqs or self.catalogue.spec(pool).max_seqs
        return PoolRoom(kv_tokens=kv, seqs=seqs)

    def look(self, pool: str) -> tuple[PoolSpec, PoolNow]:
        """The pool's catalogue entry and its state now."""
        now = time.time()
        ready = starting = running = 0
        prefill: list[float] = []
        decode: list[float] = []
        for (p, _), hb in self.heartbeats.last.items():
            if p != pool or hb.leaving or now - hb.ts > self.stale_after:
                continue
            if not hb.ready:
                starting += 1
                continue
            ready += 1
            running += hb.inflight
            if hb.prefill_tps > 0:
                prefill.append(hb.prefill_tps)
            if hb.decode_tps > 0:
                decode.append(hb.decode_tps)
        spec = self.catalogue.spec(pool)
        # What the heartbeats and the queue say, or what this replica placed
        # since, whichever is more (slots filled first, the rest queued).
        mine = self.placed.get(pool, 0)
        slots = max(1, ready) * spec.max_seqs
        state = PoolNow(
            ready=ready,
            starting=starting,
            running=max(running, min(mine, slots)),
            backlog=max(self.backlog.get(pool, 0), mine - slots),
            prefill_tps=statistics.median(prefill) if prefill else None,
            decode_tps=statistics.median(decode) if decode else None,
        )
        return spec, state


def _active(run: RunState) -> dict[str, int]:
    """A run's model steps waiting for an answer, by pool."""
    out: dict[str, int] = {}
    if run.terminal:
        return out
    for st in run.steps.values():
        if st.status == "dispatched" and not st.input:
            out[st.pool] = out.get(st.pool, 0) + 1
    return out
