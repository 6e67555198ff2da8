"""baton_steps_in_flight: each run's unanswered steps are counted by the one
replica that wrote its newest revision. (It used to be raised where a step
was dispatched and lowered wherever the run moved on: replica A +2, replica B
-2, and after B restarts the sum says 2 steps are in flight when none are.)
Two real conductors, on the bus twin and on a real nats-server."""

from __future__ import annotations

import pytest

from baton.bus import Bus, connect
from baton.dev.testing import uid
from baton.dev.twin import TwinBus
from proto import streams
from services.orchestrator import transitions as T
from services.orchestrator.conductor import Conductor
from services.orchestrator.erasure import tombstone
from services.orchestrator.inflight import InFlight
from services.orchestrator.runs import RunStore
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.state import RunState, StepState


def test_a_run_written_since_by_another_replica_leaves_the_count() -> None:
    f = InFlight()
    f.wrote("a.1", 10, 2)
    f.wrote("a.2", 11, 1)
    assert f.total() == 3
    f.check({"a.1": 12, "a.2": 11})  # a.1 moved on elsewhere; a.2 is still ours
    assert (f.total(), f.keys()) == (1, ["a.2"])
    f.check({"a.2": None})  # erased
    assert f.total() == 0


def test_a_write_of_its_own_after_the_read_is_kept() -> None:
    f = InFlight()
    f.wrote("a.1", 10, 1)
    f.wrote("a.1", 14, 2)  # written again while the check's read of revision 12 was out
    f.check({"a.1": 12})
    assert f.total() == 2


def test_a_run_that_ends_leaves_the_count() -> None:
    f = InFlight()
    f.wrote("a.1", 10, 2)
    f.wrote("a.1", 11, 0)
    assert (f.total(), f.keys()) == (0, [])


def _run(tenant: str, task_id: str, steps: int) -> RunState:
    return RunState(tenant=tenant, task_id=task_id, session=uid("s"), workflow="chat", task_seq=1,
                    steps={f"r1.s{i}": StepState(agent="a", pool="default", session="x")
                           for i in range(steps)})  # fmt: skip


@pytest.mark.parametrize("door", ["twin", "nats"])
async def test_two_replicas_count_each_run_once_through_cancel_and_erasure(
    door: str, request: pytest.FixtureRequest
) -> None:
    # The same body on the bus twin and on the session's nats-server (it had
    # a private server of its own: nothing here restarts or breaks it).
    bus: Bus = TwinBus()
    if door == "nats":
        bus = await connect(request.getfixturevalue("nats_url"), name="test-in-flight")
    try:
        await bus.provision(streams=[streams.EVENTS])
        kv = await bus.ensure_bucket(streams.RUNS)
        settings = OrchestratorSettings()
        # Two replicas: their own run caches, one bucket.
        a, b = (Conductor(bus, RunStore(kv), {}, settings) for _ in range(2))
        tenant, first, second = "acme", uid(), uid()
        for task_id in (first, second):
            run = _run(tenant, task_id, 2)
            await a._apply(tenant, task_id, lambda _r, _n, _c, run=run: T.Transition(run, True),
                           new=True)  # fmt: skip
        assert (a.in_flight.total(), b.in_flight.total()) == (4, 0)

        # Replica B cancels the first run; A's count of it is stale until its check.
        assert (await b.cancel(tenant, first)) is not None
        assert b.in_flight.total() == 0
        await a.recheck_in_flight()
        assert a.in_flight.total() == 2  # the second run, which A still wrote last
        # An erasure tombstones the second run without a transition.
        snap = await a.runs.read(tenant, second)
        assert snap is not None
        gone = snap.run()
        assert tombstone(gone)
        await RunStore(kv).write(gone, snap.revision)
        await a.recheck_in_flight()
        assert (a.in_flight.total(), b.in_flight.total()) == (0, 0)
    finally:
        await bus.close()
