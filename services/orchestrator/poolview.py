"""What the orchestrator knows of each model pool now: its catalogue entry
(``pools.py``) and what its workers' heartbeats and its queue say
(``scheduling.PoolNow``). The conductor hands ``PoolView.look`` to the pure
decisions (``transitions.Rules.pools``): a read of memory, no I/O; the
placement it leads to is frozen into the step, so a replay or a retry does
not look again. Drift and what only this replica knows (its placed steps, the
tasks to follow, the slowdown fit): docs/scheduling.md, "What workers report"
and "The prediction"."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

import structlog

from proto.messages import Heartbeat

from . import metrics as m
from .batching import JOINED_AFTER_S, PrefillFit, SlowdownFit, arrival_rate
from .fairness import PoolRoom
from .pools import Catalogue, PoolSpec, drifts
from .routing import HeartbeatTracker
from .scheduling import PoolNow
from .state import RunState, StepState

log = structlog.get_logger("orchestrator.pools")

DRIFT_TOLERANCE = 0.5
"""A measured figure within ±50% of the catalogue's is no drift: speeds
move with batch size and prompt length."""

BEHIND_FRESH_S = 10.0
"""A task stream's count of tasks behind its newest delivery is believed
this long: tasks not fetched by then are held back (the tenant's share) or
were taken by another replica."""


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
        overlap: bool = True,
        reconcile_counts: bool = True,
        speeds_from_steps: bool = True,
        prefill_by_tokens: bool = True,
        expect_arrivals: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalogue = catalogue
        self.heartbeats = heartbeats
        self.stale_after = stale_after
        # Predict a step's share of its engine from when the steps placed
        # there run (False: from their count, as if they ran all along).
        self.overlap = overlap
        self.clock = clock  # the clock the steps' dispatch times are stamped with
        # Reconcile the heartbeats' and the queue's counts with what this
        # replica saw since they were read (False: the counts as read).
        self.reconcile_counts = reconcile_counts
        # Prefill and decode speeds fitted from the steps seen finish, the
        # speed alone from the first steps that ran alone (False: decode
        # only, once steps spread over batch sizes; else the heartbeats').
        self.speeds_from_steps = speeds_from_steps
        # A prefill's cost by its prompt tokens (a fixed cost + per token,
        # from steps seen alone; the step pays its own prefill's work) rather
        # than at a speed slowed by the batch (False).
        self.prefill_by_tokens = prefill_by_tokens
        # Expect steps to join a step's batch while it runs at the rate they
        # joined running batches lately (False: only those known).
        self.expect_arrivals = expect_arrivals
        # When this replica's steps joined each pool's running batches.
        self._joins: dict[str, deque[float]] = {}
        self.backlog: dict[str, int] = {}  # jobs waiting on each pool's consumer
        self._polled: dict[str, float] = {}  # when each pool's backlog was read
        # When the generations of the steps answered here ended (the worker's
        # clock), per (pool, worker), the last ``stale_after`` seconds' worth.
        self._ended: dict[tuple[str, str], deque[float]] = {}
        # Steps this replica placed on each pool and has no answer for yet,
        # with when each was dispatched and is predicted to start and end: a
        # burst dispatched between two heartbeats is seen at once.
        self.placed: dict[str, dict[tuple[str, str, str], tuple[float, float, float]]] = {}
        # Tasks taken from their stream and not placed yet, by (tenant, stream
        # seq); and per tenant the newest task's count of tasks behind it.
        self._taken: set[tuple[str, int]] = set()
        self._stream: dict[str, tuple[int, int, float]] = {}  # tenant: seq, behind, when
        self._fits: dict[str, SlowdownFit] = {}  # decode
        self._prefill_fits: dict[str, SlowdownFit] = {}
        self._prefill_costs: dict[str, PrefillFit] = {}
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
        for pool, keys in (_active(old) if old is not None else {}).items():
            mine = self.placed.get(pool, {})
            for key in keys:
                mine.pop(key, None)
        for pool, keys in (_active(new) if new is not None else {}).items():
            mine = self.placed.setdefault(pool, {})
            for key, (dispatched, _, _) in keys.items():
                # Placed while a step placed before it had been running: it joined.
                if key not in mine and any(
                    b <= dispatched - JOINED_AFTER_S for _, b, _ in mine.values()
                ):
                    self._joins.setdefault(pool, deque(maxlen=64)).append(dispatched)
            mine.update(keys)
        if old is None and new is not None:  # a new run: its task is placed
            self._taken.discard((new.tenant, new.task_seq))

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

    def taken(self, tenant: str, seq: int, behind: int) -> None:
        """A task taken from its tenant's stream (``behind``: the tasks after it there)."""
        self._taken.add((tenant, seq))
        if seq >= self._stream.get(tenant, (0, 0, 0.0))[0]:
            self._stream[tenant] = (seq, behind, time.time())

    def handled(self, tenant: str, seq: int) -> None:
        self._taken.discard((tenant, seq))

    def polled(self, pool: str, pending: int, at: float | None = None) -> None:
        """The pool's queue read (pending + unacknowledged jobs), ``at`` then."""
        self.backlog[pool] = pending
        self._polled[pool] = self.clock() if at is None else at

    def _answered_since(self, pool: str, worker: str | None, since: float) -> int:
        """Generations on ``pool`` (on ``worker``; None: any) answered here
        that ended after ``since``: a reading made then still counted them."""
        return sum(
            sum(1 for t in ends if t > since)
            for (p, w), ends in self._ended.items()
            if p == pool and (worker is None or w == worker)
        )

    def finished(self, st: StepState) -> None:
        """A step answered: when its generation ended (out of the counts read
        before), how fast it decoded, and beside how many others (its run
        time over the GPU-seconds its worker charged it)."""
        t, u = st.timing, st.usage
        if t is not None and t.finished_at > 0 and st.worker:
            self._ended.setdefault((st.pool, st.worker), deque()).append(
                t.finished_at - t.phases.record  # the generation's end, before storing it
            )
            # Only readings younger than stale_after are used: older ends (and
            # workers gone) are forgotten.
            horizon = t.finished_at - max(self.stale_after, BEHIND_FRESH_S)
            for key, ends in list(self._ended.items()):
                while ends and ends[0] < horizon:
                    ends.popleft()
                if not ends:
                    del self._ended[key]
        if t is None or st.turn or u.gpu_seconds <= 0 or u.completion_tokens < 8:
            return  # tool turns add up several generations: no one batch size
        if t.phases.decode <= 0:
            return
        ran = t.phases.prefill + t.phases.decode
        alone = self.speeds_from_steps
        fit = self._fits.setdefault(st.pool, SlowdownFit(alone=alone))
        fit.observe(ran / u.gpu_seconds, (u.completion_tokens - 1) / t.phases.decode)
        prefilled = u.prompt_tokens - st.cached_tokens
        if alone and prefilled >= 16 and t.phases.prefill > 0:
            fit = self._prefill_fits.setdefault(st.pool, SlowdownFit())
            fit.observe(ran / u.gpu_seconds, prefilled / t.phases.prefill, tokens=prefilled)
            cost = self._prefill_costs.setdefault(st.pool, PrefillFit())
            cost.observe(ran / u.gpu_seconds, prefilled, t.phases.prefill)

    def looking_from(self, tenant: str, seq: int) -> Callable[[str], tuple[PoolSpec, PoolNow]]:
        """``look`` for placing the first steps of the task ``(tenant, seq)``:
        the tasks arriving besides it."""
        return lambda pool: self.look(pool, exclude=(tenant, seq))

    def look(self, pool: str, exclude: tuple[str, int] | None = None) -> tuple[PoolSpec, PoolNow]:
        """The pool's catalogue entry and its state now."""
        now = time.time()
        ready = starting = running = beating = 0
        prefill: list[float] = []
        decode: list[float] = []
        for (p, w), hb in self.heartbeats.last.items():
            if p != pool or hb.leaving or now - hb.ts > self.stale_after:
                continue
            if not hb.ready:
                starting += 1
                continue
            ready += 1
            # A heartbeat is up to an interval old: what ended since is gone.
            beating += hb.inflight
            running += max(0, hb.inflight - self._answered_since(pool, w, hb.ts))
            if hb.prefill_tps > 0:
                prefill.append(hb.prefill_tps)
            if hb.decode_tps > 0:
                decode.append(hb.decode_tps)
        spec = self.catalogue.spec(pool)
        # What the heartbeats and the queue say, or what this replica placed
        # since, whichever is more (slots filled first, the rest queued).
        placed = sorted(self.placed.get(pool, {}).values(), key=lambda span: span[2])
        mine = len(placed)
        at = self.clock()
        slots = max(1, ready) * spec.max_seqs
        # The queue's count (pending + unacknowledged) holds the jobs its
        # workers are running (acked when they end) and the steps this replica
        # placed before it was read: the rest are another replica's.
        polled = self.backlog.get(pool, 0)
        read_at = self._polled.get(pool)
        backlog = polled
        if read_at is not None:
            backlog = max(0, polled - self._answered_since(pool, None, read_at))
        stale = (beating - running, polled - backlog)  # answered since they were read
        if self.reconcile_counts:
            known = sum(1 for d, _, _ in placed if read_at is not None and d <= read_at)
            running = max(running, min(mine, slots))
            queued = max(0, mine + max(0, backlog - known) - running)
        else:  # as read, the queue's count holding this replica's steps besides
            running = max(beating, min(mine, slots))
            queued = max(0, polled - beating, mine - slots)
        behind = sum(b for _, b, at in self._stream.values() if now - at <= BEHIND_FRESH_S)
        arriving = len(self._taken - {exclude}) + behind
        fit = self._fits[pool].estimate() if pool in self._fits else None
        pfit = self._prefill_fits[pool].estimate() if pool in self._prefill_fits else None
        by_tokens = None
        if self.prefill_by_tokens and pool in self._prefill_costs:
            cost = self._prefill_costs[pool]
            got = cost.estimate()
            if got is not None:
                by_tokens = (*got, cost.typical_tokens * cost.batch_share())
        decode_tps = statistics.median(decode) if decode else None
        prefill_tps = statistics.median(prefill) if prefill else None
        state = PoolNow(
            ready=ready,
            starting=starting,
            running=running,
            backlog=queued,
            prefill_tps=pfit[0] if pfit is not None else prefill_tps,
            prefill_slowdown=pfit[1] if pfit is not None else 0.0,
            prefill_by_tokens=by_tokens,
            decode_tps=fit[0] if fit is not None else decode_tps,
            decode_slowdown=fit[1] if fit is not None else 0.0,
            arriving=arriving,
            frees_in=tuple(e - at for _, _, e in placed),
            spans=tuple((b - at, e - at) for _, b, e in placed) if self.overlap else (),
            arrival_rate=arrival_rate(self._joins.get(pool, ()), at)
            if self.overlap and self.expect_arrivals
            else 0.0,
        )
        # What the sequences ahead were made of (docs/scheduling.md, "The prediction").
        log.debug("pool_look", pool=pool, heartbeats=beating, polled=polled, stale=stale,
                  reconciled=self.reconcile_counts, queued=queued, placed=mine,
                  arriving=arriving, ahead=state.running + state.backlog)  # fmt: skip
        return spec, state


def _active(run: RunState) -> dict[str, dict[tuple[str, str, str], tuple[float, float, float]]]:
    """A run's model steps waiting for an answer, by pool: when each was
    dispatched and is predicted to start (dispatch + predicted wait) and end
    (+ predicted run)."""
    out: dict[str, dict[tuple[str, str, str], tuple[float, float, float]]] = {}
    if run.terminal:
        return out
    for step, st in run.steps.items():
        if st.status == "dispatched" and not st.input:
            p = st.prediction
            begin = st.dispatched_at + (p.wait_s if p is not None else 0.0)
            end = begin + (p.run_s if p is not None else 0.0)
            key = (run.tenant, run.task_id, step)
            out.setdefault(st.pool, {})[key] = (st.dispatched_at, begin, end)
    return out
