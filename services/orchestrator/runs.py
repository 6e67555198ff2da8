"""Durable run state: one entry per task in bucket ``baton-runs``, key
``<tenant>.<task_id>``, updated step by step with compare-and-set so several
orchestrator replicas can advance the same run safely.

Each entry is sealed with the task's own key (``runkeys.py``): the revisions
an update replaces are left as they are (ciphertext), and erasing the task
destroys its key. An erased task's entry is a tombstone (status ``erased``,
ids only), stored in the clear.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from baton.bus import Bucket, WrongLastSequence
from proto import codec

from .runkeys import RunKeys, is_sealed, seal, unseal
from .state import ERASED, RunState, run_key


class RunConflict(Exception):
    """The run changed under us too many times."""


class RunLocks:
    """One lock per run key, kept while a transition holds or waits for it
    (so memory follows the runs being handled now, not the runs seen)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders + waiters)

    def __len__(self) -> int:
        return len(self._held)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._held.get(key) or (asyncio.Lock(), 0)
        self._held[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._held[key][1] - 1
            if users:
                self._held[key] = (lock, users)
            else:
                del self._held[key]


class Snapshot:
    """A run as stored: its encoded state and the revision it has."""

    __slots__ = ("_state", "data", "revision")

    def __init__(self, data: bytes, revision: int, state: RunState | None = None) -> None:
        self.data = data
        self.revision = revision
        self._state = state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return (self.data, self.revision) == (other.data, other.revision)

    __hash__ = None  # type: ignore[assignment]

    def run(self) -> RunState:
        """A fresh, mutable copy of the state."""
        return codec.decode_own(self.data, RunState)

    def shared(self) -> RunState:
        """The state, decoded once and shared: never change it (the
        decisions in ``transitions`` copy a run before they change it). A
        snapshot this replica wrote holds the state it wrote, so the next
        transition of the run decodes nothing."""
        if self._state is None:
            self._state = self.run()
        return self._state


class RunStore:
    """Reads and compare-and-set writes of runs, with a bounded cache of the
    last snapshot each unfinished run was read or written at. The cache only
    saves reads: a write against a stale revision fails and the caller re-reads."""

    def __init__(self, bucket: Bucket, *, cached: int = 4096) -> None:
        self.bucket = bucket
        self.keys = RunKeys(bucket)
        self._cache: OrderedDict[str, Snapshot] = OrderedDict()
        self._cached = cached

    async def plain(self, key: str, value: bytes) -> bytes:
        """An entry's value as encoded state: unsealed with the run's key. A
        sealed entry whose key was destroyed (an erased task read from a
        lagging replica) reads as the task's tombstone."""
        if not is_sealed(value):
            return value  # a tombstone, or written before entries were sealed
        k = await self.keys.get(key)
        if k is None:
            tenant, task_id = key.split(".", 1)
            return codec.encode(RunState(tenant=tenant, task_id=task_id, session="",
                                         workflow="", task_seq=-1, status=ERASED))  # fmt: skip
        return unseal(k, key, value)

    def _remember(self, key: str, snap: Snapshot | None) -> Snapshot | None:
        if snap is None:
            self._cache.pop(key, None)
            return None
        self._cache[key] = snap
        self._cache.move_to_end(key)
        while len(self._cache) > self._cached:
            self._cache.popitem(last=False)
        return snap

    def cached(self, tenant: str, task_id: str) -> Snapshot | None:
        return self._cache.get(run_key(tenant, task_id))

    def forget(self, tenant: str, task_id: str) -> None:
        self._cache.pop(run_key(tenant, task_id), None)

    async def read(
        self, tenant: str, task_id: str, *, remember: bool = True, consistent: bool = False
    ) -> Snapshot | None:
        """The run as stored now (None: no such run). ``remember``: cache it
        (the conductor's reads, about to write; not the API's). ``consistent``:
        asked of the stream's leader, not whichever replica answers a direct get."""
        key = run_key(tenant, task_id)
        entry = await self.bucket.get(key, consistent=consistent)
        if entry is None:
            return self._remember(key, None)
        snap = Snapshot(await self.plain(key, entry.value), entry.revision)
        return self._remember(key, snap) if remember else snap

    async def revision(self, key: str) -> int | None:
        """The stored revision of run ``key`` (None: no such run); no decode."""
        entry = await self.bucket.get(key)
        return entry.revision if entry is not None else None

    async def get(self, tenant: str, task_id: str) -> RunState | None:
        """The run as stored now, for reading (not cached)."""
        snap = await self.read(tenant, task_id, remember=False)
        return snap.run() if snap is not None else None

    async def write(self, run: RunState, revision: int | None) -> Snapshot:
        """Store ``run`` if the stored revision is still ``revision`` (None:
        only if there is no such run yet). The snapshot returned (and cached)
        shares ``run``: the caller does not change it afterwards.

        Raises:
            RunConflict: someone else wrote first (read again and retry).
        """
        data = codec.encode(run)
        stored = data
        if run.status != ERASED:
            stored = seal(await self.keys.get_or_create(run.key), run.key, data)
        try:
            if revision is None:
                new = await self.bucket.create(run.key, stored)
            else:
                new = await self.bucket.update(run.key, stored, last=revision)
        except WrongLastSequence as exc:
            self._cache.pop(run.key, None)
            raise RunConflict(run.key) from exc
        snap = Snapshot(data, new, run)
        if run.terminal:
            # Nothing advances a finished run (a redelivery reads it afresh):
            # the cache holds the runs in flight, so memory stays flat.
            self._cache.pop(run.key, None)
        else:
            self._remember(run.key, snap)
        return snap

    async def list(self, tenant: str, *, limit: int = 10_000) -> list[RunState]:
        """The latest state of every run of ``tenant`` (at most ``limit``),
        read in one pass of a watcher over ``<tenant>.*``."""
        entries = await self.bucket.entries(f"{tenant}.*", limit=limit)
        if sum(map(is_sealed, (e.value for e in entries))) > 1:
            await self.keys.load(tenant)  # one listing, not a read per run
        return [codec.decode(await self.plain(e.key, e.value), RunState) for e in entries]
