"""Routing decisions, unit by unit: warm while alive, ready and unloaded."""

from __future__ import annotations

import time

from proto.messages import Heartbeat
from services.orchestrator.routing import HeartbeatTracker, Router


def _hb(worker: str, *, ready: bool = True, load: float = 0.1, age: float = 0.0,
        warm: tuple[str, ...] = ()) -> Heartbeat:  # fmt: skip
    return Heartbeat(worker=worker, pool="p", ready=ready, engine="sim",
                     admitted_tokens=int(load * 1000), kv_capacity_tokens=1000,
                     warm_sessions=list(warm), ts=time.time() - age)  # fmt: skip


def _router(*beats: Heartbeat, enabled: bool = True) -> Router:
    tracker = HeartbeatTracker()
    for hb in beats:
        tracker.last[(hb.pool, hb.worker)] = hb
    return Router(tracker, enabled=enabled, stale_after=6.0, max_load=0.8)


def test_a_session_goes_back_to_the_worker_that_served_it() -> None:
    r = _router(_hb("a"), _hb("b"))
    assert r.choose("t", "s", "p") is None  # nobody is warm yet: the pool
    r.served("t", "s", "p", "b")
    assert r.choose("t", "s", "p") == "b"
    assert r.choose("other", "s", "p") is None  # sessions are per tenant


def test_heartbeat_warm_lists_route_sessions_another_replica_served() -> None:
    assert _router(_hb("a"), _hb("b", warm=("t.s",))).choose("t", "s", "p") == "b"


def test_a_stale_unready_or_loaded_warm_worker_is_passed_over() -> None:
    for hb in (_hb("b", age=10), _hb("b", ready=False), _hb("b", load=0.95)):
        r = _router(hb)
        r.served("t", "s", "p", "b")
        assert r.choose("t", "s", "p") is None


def test_routing_can_be_switched_off() -> None:
    r = _router(_hb("b"), enabled=False)
    r.served("t", "s", "p", "b")
    assert r.choose("t", "s", "p") is None
