"""The run store against a real nats-server and the bus twin: its cache holds unfinished runs
only (so the orchestrator's memory does not grow with the runs it finished),
a stale cached revision still fails the write, and entries are sealed with
their task's key, so destroying the key erases every revision."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nacl.exceptions import CryptoError

from baton.bus import Bus, connect
from baton.dev.testing import uid
from baton.dev.twin import TwinBus
from baton.natsd import NatsServer
from proto import codec
from proto.streams import RUNS, BucketSpec
from services.orchestrator.runkeys import is_sealed, key_entry, new_key, seal, unseal
from services.orchestrator.runs import RunConflict, RunLocks, RunStore
from services.orchestrator.state import ERASED, RunState
from tests.ctx import raw_store_contains


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


async def test_a_run_is_held_by_one_transition_at_a_time_and_no_lock_outlives_use() -> None:
    """``RunLocks`` (the conductor's, #23): transitions of one run wait for
    each other, another run's do not, and a lock nobody holds or waits for
    is dropped (memory follows the runs being handled, not the runs seen)."""
    locks, order = RunLocks(), []

    async def transition(key: str, name: str, fail: bool = False) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            order.append(f"{name}-")
            if fail:
                raise RuntimeError(name)

    got = await asyncio.gather(
        transition("acme.a", "a1", fail=True), transition("acme.a", "a2"),
        transition("acme.b", "b1"), return_exceptions=True,
    )  # fmt: skip
    assert isinstance(got[0], RuntimeError) and got[1:] == [None, None]
    assert order.index("a2+") > order.index("a1-")  # after the first, though it failed
    assert order.index("b1+") < order.index("a1-")  # another run's is not held up
    assert len(locks) == 0


def test_a_sealed_entry_opens_only_with_its_key_as_its_run() -> None:
    key, data = new_key(), codec.encode(_run("t1"))
    box = seal(key, "acme.t1", data)
    assert is_sealed(box) and not is_sealed(data) and b"chat" not in box
    assert unseal(key, "acme.t1", box) == data
    assert seal(key, "acme.t1", data) != box  # a nonce per write
    for k, run_key, value in ((new_key(), "acme.t1", box), (key, "acme.t2", box),
                              (key, "acme.t1", box[:-1] + bytes([box[-1] ^ 1]))):  # fmt: skip
        with pytest.raises(CryptoError):
            unseal(k, run_key, value)


async def test_entries_are_sealed_and_a_destroyed_key_leaves_no_revision_readable(
    store: RunStore,
) -> None:
    run = _run(uid("t"))
    secret = uid("OUTPUT")
    snap = await store.write(run, None)
    run.output = secret
    snap = await store.write(run, snap.revision)
    stored = await store.bucket.get(run.key)
    assert stored is not None and is_sealed(stored.value) and secret.encode() not in stored.value
    other = RunStore(store.bucket)  # another replica: reads the key from the bucket
    got = await other.get("acme", run.task_id)
    assert got is not None and got.output == secret
    assert [r.output for r in await other.list("acme")].count(secret) == 1
    # Erased: the tombstone is stored in the clear, the key destroyed.
    run.status, run.output = ERASED, ""
    await store.write(run, snap.revision)
    assert await store.keys.destroy(run.key) == 1
    assert await store.bucket.get(key_entry(run.key)) is None
    assert await RunStore(store.bucket).keys.get(run.key) is None
    with pytest.raises(CryptoError):  # the revision with the output, its key gone
        unseal(new_key(), run.key, stored.value)
    # A replica that reads a sealed revision (a lagging one) sees the tombstone.
    gone = codec.decode(await RunStore(store.bucket).plain(run.key, stored.value), RunState)
    assert (gone.status, gone.output) == (ERASED, "")


async def test_no_revision_of_a_run_is_in_the_raw_store_in_the_clear(own_nats: NatsServer) -> None:
    bus = await connect(own_nats.url, name="test-runs-raw")
    try:
        store = RunStore(await bus.ensure_bucket(RUNS))
        run = _run(uid("t"))
        snap = await store.write(run, None)
        secrets = [uid(f"STEP{i}") for i in range(5)]
        for s in secrets:  # each update replaces a revision, none of them erased
            run.output = s
            snap = await store.write(run, snap.revision)
        await asyncio.sleep(0.2)
        for s in secrets:
            assert raw_store_contains(own_nats.store_dir, s.encode()) == [], s
        assert raw_store_contains(own_nats.store_dir, run.task_id.encode())  # the grep finds ids
    finally:
        await bus.close()
