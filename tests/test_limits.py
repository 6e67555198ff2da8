"""Tenant limits and the fair-dispatch gate as pure decisions: no broker,
the clock passed in."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.orchestrator.fairness import FairGate
from services.orchestrator.limits import (
    WINDOW,
    InFlightCut,
    Limiter,
    TenantLimits,
    TokenBucket,
    TokenWindow,
)


def test_bucket_admits_its_burst_then_its_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # one token every 0.5 s
    assert b.take(100.25) == pytest.approx(0.25)  # a refusal takes nothing
    assert b.take(100.5) == 0.0
    assert b.take(110.0) == 0.0 and b.level == pytest.approx(2.0)  # capped at the burst


def test_bucket_ignores_time_running_backwards() -> None:
    b = TokenBucket(rate=1.0, burst=1)
    assert b.take(50.0) == 0.0
    assert b.take(49.0) == pytest.approx(1.0)  # an older timestamp refills nothing


def test_token_window_expires_and_tells_the_wait() -> None:
    w = TokenWindow()
    w.spend(600, 0.0)
    w.spend(300, 10.0)
    w.spend(300, 20.0)
    assert w.used(20.0) == 1200
    assert w.wait(1000, 20.0) == pytest.approx(WINDOW - 20.0)  # the first entry must go
    assert w.wait(1201, 20.0) == 0.0
    assert w.wait(600, 20.0) == pytest.approx(WINDOW + 10.0 - 20.0)  # two must go
    assert w.used(WINDOW + 0.5) == 600


def test_in_flight_cut_refuses_only_tasks_submitted_over_the_limit() -> None:
    cut = InFlightCut()
    # Seq 10 reaches intake with 3 runs active and 20 newer tasks queued behind
    # it, limit 8: seqs 10..14 had 3..7 older unfinished tasks, 15..30 had >= 8.
    cut.observe(seq=10, pending=20, active=3, limit=8)
    assert [s for s in range(5, 40) if cut.over(s)] == list(range(15, 31))
    # Later runs ended (active 0 at seq 12): what was true stays true for 15..30.
    cut.observe(seq=12, pending=18, active=0, limit=8)
    assert cut.over(15) and cut.over(30) and not cut.over(14)
    # Past the tail, a fresh view.
    cut.observe(seq=40, pending=2, active=8, limit=8)
    assert cut.over(40) and cut.over(42) and not cut.over(43)


def test_limiter_checks_in_order_and_counts_only_admitted_tasks() -> None:
    lim = Limiter(TenantLimits(), {"a": TenantLimits(max_in_flight=2, tasks_per_second=1,
                                                    burst=1)})  # fmt: skip
    kw = {"pending": 0, "submitted_at": 0.0, "now": 0.0}
    assert lim.check("a", seq=1, active=0, **kw) is None
    r = lim.check("a", seq=2, active=1, **kw)
    assert r is not None and r.limit == "tasks_per_second" and r.retry_after == 1.0
    r = lim.check("a", seq=3, active=2, **kw)
    assert r is not None and r.limit == "max_in_flight"
    # The refusal over max_in_flight took no token from the bucket.
    assert lim.check("a", seq=4, active=1, pending=0, submitted_at=1.0, now=1.0) is None
    # Other tenants have the default: unlimited.
    assert all(lim.check("b", seq=s, active=99, **kw) is None for s in range(50))


def test_limiter_tokens_per_minute_and_peek() -> None:
    lim = Limiter(TenantLimits(tokens_per_minute=1000), {})
    kw = {"seq": 1, "pending": 0, "active": 0, "submitted_at": 5.0}
    assert lim.check("a", now=5.0, **kw) is None
    lim.finished("a", tokens=1200, seconds=2.0, now=6.0)
    r = lim.check("a", now=7.0, **kw)
    assert r is not None and r.limit == "tokens_per_minute"
    assert r.retry_after == pytest.approx(WINDOW - 1.0)
    assert lim.peek("a", in_flight=0, now=7.0) == r
    assert lim.peek("a", in_flight=0, now=6.0 + WINDOW) is None


def test_peek_counts_nothing() -> None:
    lim = Limiter(TenantLimits(tasks_per_second=1, burst=1), {})
    assert all(lim.peek("a", in_flight=0, now=0.0) is None for _ in range(5))
    assert lim.check("a", seq=1, pending=0, active=0, submitted_at=0.0, now=0.0) is None
    assert lim.peek("a", in_flight=0, now=0.0) is not None


def test_limits_are_validated() -> None:
    with pytest.raises(ValidationError):
        TenantLimits(share=0)
    with pytest.raises(ValidationError):
        TenantLimits(tasks_per_second=float("nan"))
    with pytest.raises(ValidationError):
        TenantLimits.model_validate({"tasks_per_sec": 3})  # a typo is not ignored


def test_gate_caps_each_tenant_at_its_share() -> None:
    gate = FairGate({"big": 2, "small": 1}.__getitem__)
    gate.reserve("big", 1)
    gate.reserve("big", 2)
    assert gate.room("big") == 0 and gate.room("small") == 1
    gate.adopt("big", 1, "t1", now=0.0)
    gate.release("big", 2)  # refused: its slot is free again
    assert gate.room("big") == 1 and gate.active("big") == 1
    gate.finish("big", "t1")
    assert gate.room("big") == 2 and gate.active("big") == 0


def test_gate_run_ending_before_its_adoption_frees_the_slot() -> None:
    gate = FairGate(lambda t: 4)
    gate.reserve("a", 7)
    gate.finish("a", "t7")  # the answer came back before on_task returned
    gate.adopt("a", 7, "t7", now=0.0)
    assert gate.active("a") == 0 and gate.room("a") == 4


def test_gate_run_ending_within_its_own_delivery_leaves_no_note_behind() -> None:
    gate = FairGate(lambda t: 4)
    gate.reserve("a", 7)
    gate.finish("a", "t7")  # stored terminal during its on_task (a budget stop)
    gate.forget("a", "t7")  # so intake releases the delivery, not adopts it
    gate.release("a", 7)
    assert gate.room("a") == 4
    # A later run of that id (say, resubmitted after an erasure) holds its slot.
    gate.reserve("a", 9)
    gate.adopt("a", 9, "t7", now=1.0)
    assert gate.active("a") == 1 and gate.room("a") == 3


def test_gate_older_counts_active_and_reserved_ahead() -> None:
    gate = FairGate(lambda t: 10)
    gate.reserve("a", 1)
    gate.adopt("a", 1, "t1", now=0.0)
    for seq in (5, 6, 7):
        gate.reserve("a", seq)
    assert gate.older("a", 6) == 2  # t1 and the delivery at seq 5


def test_gate_stale_lists_runs_held_long_once_per_period() -> None:
    gate = FairGate(lambda t: 10)
    gate.reserve("a", 1)
    gate.adopt("a", 1, "t1", now=0.0)
    assert gate.stale(3.0, older_than=5.0) == []
    assert gate.stale(6.0, older_than=5.0) == [("a", "t1")]
    assert gate.stale(7.0, older_than=5.0) == []  # timed from 6.0 again


def test_gate_lends_out_the_slot_of_a_run_waiting_for_input() -> None:
    gate = FairGate(lambda t: 1)
    gate.reserve("a", 1)
    gate.adopt("a", 1, "t1", now=0.0)
    assert gate.room("a") == 0
    gate.park("a", "t1")  # an input step waits for a human
    assert gate.room("a") == 1
    gate.reserve("a", 2)
    gate.adopt("a", 2, "t2", now=1.0)
    gate.unpark("a", "t1", now=2.0)  # the answer came: both work, one over the share
    assert gate.room("a") == -1 and gate.active("a") == 2
    gate.finish("a", "t1")
    gate.finish("a", "t2")
    assert gate.room("a") == 1
    gate.unpark("a", "t1", now=3.0)  # a finished run is not revived
    assert gate.room("a") == 1
