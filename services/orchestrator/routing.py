"""Cache-aware routing: send a session's step to the worker that served it
last (its prefix cache holds the session) while that worker is alive, ready
and below a load threshold; otherwise to the pool's shared subject.

Liveness and load come from worker heartbeats; "served it last" from the
results this replica has seen, and from the warm sessions each heartbeat
lists (so another replica's routing is not lost). No warm worker, or a dead
one, never blocks a step: it goes to the pool, and a job routed to a worker
that dies afterwards is rescued by its peers (inference_worker/rescue.py).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

from proto.ids import is_valid_id
from proto.messages import Heartbeat

from . import metrics as m

MAX_TRACKED_WORKERS = 4096
"""Heartbeats of more distinct workers are dropped: a flood of made-up
worker names must not grow this map (or the age gauge's label set) forever."""


def usable_heartbeat(subject: str, hb: Heartbeat) -> bool:
    """A heartbeat to act on: ids valid and equal to its subject's tokens,
    a finite timestamp (NaN or inf would never go stale) and counts >= 0."""
    return (
        is_valid_id(hb.pool)
        and is_valid_id(hb.worker)
        and subject.endswith(f".{hb.pool}.{hb.worker}")
        and math.isfinite(hb.ts)
        and min(hb.inflight, hb.admitted_tokens, hb.kv_capacity_tokens) >= 0
    )


class HeartbeatTracker:
    def __init__(self, max_workers: int = MAX_TRACKED_WORKERS) -> None:
        self.last: dict[tuple[str, str], Heartbeat] = {}
        self.max_workers = max_workers
        self.dropped = 0
        # Called with each heartbeat kept (the pool view's drift check).
        self.listeners: list[Callable[[Heartbeat], None]] = []

    async def on_heartbeat(self, hb: Heartbeat, subject: str) -> None:
        key = (hb.pool, hb.worker)
        if not usable_heartbeat(subject, hb) or (
            key not in self.last and len(self.last) >= self.max_workers
        ):
            self.dropped += 1
            return
        if hb.leaving:  # scaled in on purpose: not a worker that went silent
            if self.last.pop(key, None) is not None:
                with contextlib.suppress(KeyError):
                    m.HEARTBEAT_AGE.remove(*key)
            return
        self.last[key] = hb
        for listener in self.listeners:
            listener(hb)

    def export(self) -> None:
        now = time.time()
        for (pool, worker), hb in list(self.last.items()):
            age = now - hb.ts
            if age > 3600:  # forget workers gone for an hour
                del self.last[(pool, worker)]
                m.HEARTBEAT_AGE.remove(pool, worker)
            else:
                m.HEARTBEAT_AGE.labels(pool, worker).set(age)


class Router:
    def __init__(
        self,
        heartbeats: HeartbeatTracker,
        *,
        enabled: bool = True,
        stale_after: float = 6.0,
        max_load: float = 0.8,
        remember: int = 100_000,
    ) -> None:
        self.heartbeats = heartbeats
        self.enabled = enabled
        self.stale_after = stale_after
        self.max_load = max_load
        self._cap = remember
        # One entry per session served: "<tenant>.<session>.<pool>" (ids hold
        # no dots) -> the worker's id, interned (a few workers, many sessions).
        # One string key instead of a tuple of three: 45% of the bytes, and
        # this map is what the orchestrator's memory grows with until the cap.
        self._served: OrderedDict[str, str] = OrderedDict()
        self._warmed: OrderedDict[str, tuple[str, str]] = OrderedDict()  # warm id -> (pool, worker)

    def served(self, tenant: str, session: str, pool: str, worker: str) -> None:
        key = f"{tenant}.{session}.{pool}"
        self._served[key] = sys.intern(worker)
        self._served.move_to_end(key)
        while len(self._served) > self._cap:
            self._served.popitem(last=False)

    def warmed(self, warm_id: str, pool: str, worker: str) -> None:
        """``worker`` of ``pool`` was sent the pre-warm ``warm_id``
        (``keys.warm``) of a step to come: that step goes there, before the
        worker that served its session last."""
        self._warmed[warm_id] = (pool, sys.intern(worker))
        while len(self._warmed) > self._cap:
            self._warmed.popitem(last=False)

    def _usable(self, pool: str, worker: str) -> bool:
        hb = self.heartbeats.last.get((pool, worker))
        if hb is None or not hb.ready or hb.leaving:
            return False
        if time.time() - hb.ts > self.stale_after:
            return False
        return hb.admitted_tokens < self.max_load * max(1, hb.kv_capacity_tokens)

    def choose(self, tenant: str, session: str, pool: str, warm_id: str = "") -> str | None:
        """The warm worker for this session, or None for the shared pool.
        ``warm_id``: the step's pre-warm id; the worker it was sent to, if any."""
        if not self.enabled:
            return None
        warmed = self._warmed.pop(warm_id, None)
        if warmed is not None and warmed[0] == pool and self._usable(pool, warmed[1]):
            return warmed[1]
        last = self._served.get(f"{tenant}.{session}.{pool}")
        if last is not None and self._usable(pool, last):
            return last
        warm = f"{tenant}.{session}"
        for (p, worker), hb in self.heartbeats.last.items():
            if (
                p == pool
                and worker != last
                and warm in hb.warm_sessions
                and self._usable(p, worker)
            ):
                return worker
        return None
