"""The run store against a real nats-server and the bus twin: its cache holds unfinished runs
only (so the orchestrator's memory does not grow with the runs it finished),
and a stale cached revision still fails the write."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from baton.bus import Bus, connect
from baton.dev.testing import uid
from baton.dev.twin import TwinBus
from proto.streams import BucketSpec
from services.orchestrator.runs import RunConflict, RunStore
from services.orchestrator.state import RunState


@pytest.fixture(params=["twin", "nats"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RunStore]:
    bus: Bus = TwinBus()
    if request.param == "nats":
        bus = await connect(request.getfixturevalue("nats_url"), name="test-runs")
    spec = BucketSpec(name=uid("runs"), history=8, erasable=True)
    kv = await bus.ensure_bucket(spec)
    yield RunStore(kv)
    await bus.close()


def _run(task_id: str) -> RunState:
    return RunState(tenant="acme", task_id=task_id, session="s1", workflow="chat", task_seq=1)


async def test_finished_runs_leave_the_cache_and_running_ones_stay(store: RunStore) -> None:
    run = _run(uid("t"))
    snap = await store.write(run, None)
    assert store.cached("acme", run.task_id) == snap
    run.status = "completed"
    done = await store.write(run, snap.revision)
    assert store.cached("acme", run.task_id) is None
    # A reader (the API) sees the stored state without filling the cache.
    got = await store.get("acme", run.task_id)
    assert got is not None and got.status == "completed"
    assert store.cached("acme", run.task_id) is None
    # The conductor's read, about to decide, is remembered.
    assert await store.read("acme", run.task_id) == done
    assert store.cached("acme", run.task_id) == done


async def test_a_write_against_a_stale_revision_conflicts(store: RunStore) -> None:
    run = _run(uid("t"))
    snap = await store.write(run, None)
    await store.write(run, snap.revision)
    with pytest.raises(RunConflict):
        await store.write(run, snap.revision)
    assert store.cached("acme", run.task_id) is None
