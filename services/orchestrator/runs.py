"""Durable run state: one KV entry per task in bucket ``baton-runs``, key
``<tenant>.<task_id>``, updated step by step with compare-and-set so several
orchestrator replicas can advance the same run safely.

Each update erases the revision it replaced from the raw store (a revision
dropped by the bucket's history limit would only be unlinked, its bytes left
in the block file), so erasing a task later leaves no old revision behind.
An erased task's entry is a tombstone (status ``erased``, no content).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from typing import Literal

import msgspec

from baton.transport import Bucket, WrongLastSequence
from proto import codec
from proto.messages import Budget, ContextRef, ErrorInfo, PoolPrediction, Timing, Usage

# tools: waiting for its calls; waiting_input: an input step waiting for a human
StepStatus = Literal["dispatched", "tools", "waiting_input", "done", "failed"]
CallStatus = Literal["dispatched", "done"]
RunStatus = Literal["running", "completed", "failed", "cancelled", "erased"]
ERASED: RunStatus = "erased"  # a tombstone: the task was erased with its session
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", ERASED})


class CallState(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One tool call of a step: a recorded sub-step (``t<turn>c<i>``)."""

    tool: str
    arguments: str
    call_id: str  # the model's id of the call
    status: CallStatus = "dispatched"
    dispatched_at: float = 0.0
    outcome: str = ""
    preview: str = ""  # the start of its result, as the agent reads it
    cpu_seconds: float = 0.0
    seconds: float = 0.0
    ref: ContextRef | None = None  # the session with its result
    timing: Timing | None = None  # its waterfall, once answered


class StepState(msgspec.Struct, omit_defaults=True, kw_only=True):
    agent: str
    pool: str
    session: str
    status: StepStatus = "dispatched"
    max_tokens: int = 0
    context_budget: int = 0  # window tokens, set when the task has a token budget
    attempt: int = 1  # dispatches so far (a timeout dispatches again)
    dispatched_at: float = 0.0  # of the current turn or attempt
    deadline: float = 0.0  # when the current attempt times out
    finished_at: float = 0.0
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    output: str = ""
    worker: str = ""
    cached_tokens: int = 0
    ref: ContextRef | None = None  # the context the step reads; after it, its answer
    turn: int = 0  # model turns that called tools so far (each a job of its own)
    calls: dict[str, CallState] = {}  # its tool calls by ``t<turn>c<i>``
    input: bool = False  # an input step: it waits for a human (no agent, no job)
    answered_by: str = ""  # an input step's answer: "human" or "default" (its timeout)
    timing: Timing | None = None  # its waterfall so far (waterfall.py)
    # The run session's context the step was dispatched from (a parallel
    # branch: what its fork was made of): where a fork from this step starts.
    origin: ContextRef | None = None
    carried: bool = False  # done in the run this one was forked from, not run again
    # Its placement, decided once at dispatch and kept by retries and tool
    # turns: why ``pool`` (scheduling.Reason; "" = the agent's one pool, no
    # catalogue consulted) and what was predicted there.
    pool_reason: str = ""
    prediction: PoolPrediction | None = None
    moves: int = 0  # dispatches to a larger pool after prompt_too_long (not retries)


class RunState(msgspec.Struct, omit_defaults=True, kw_only=True):
    tenant: str
    task_id: str
    session: str
    workflow: str
    task_seq: int  # stream sequence of the task message that created the run
    status: RunStatus = "running"
    budget: Budget | None = None
    max_tokens: int | None = None  # the task's cap on each step's answer
    temperature: float | None = None  # the task's temperature, over the agents'
    metadata: dict[str, object] = {}
    steps: dict[str, StepState] = {}
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    output: str = ""
    error: ErrorInfo | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    # The W3C traceparent of the caller's span the task arrived in ("" when
    # none): every replica derives the task's spans from it (spans.py).
    trace: str = ""
    forked_from: str = ""  # a fork: the task it was forked from...
    forked_at: str = ""  # ...and the step it runs again
    # Tokens of the run's session as far as the run knows (the input's
    # estimate, then each finished step's prompt + answer as the worker
    # counted them): what the next step's window is predicted from.
    context_tokens: int = 0
    # ...and of its newest message, which a worker's window keeps whole.
    newest_tokens: int = 0

    @property
    def key(self) -> str:
        return run_key(self.tenant, self.task_id)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def run_key(tenant: str, task_id: str) -> str:
    return f"{tenant}.{task_id}"


class RunConflict(Exception):
    """The run changed under us too many times."""


class Snapshot:
    """A run as stored: its encoded state and the KV revision it has."""

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

    def __init__(self, kv: Bucket, *, cached: int = 4096) -> None:
        """An erasable ``kv`` has each revision a write replaces erased; in a
        bucket that forbids deletes they stay."""
        self.kv = kv
        self._cache: OrderedDict[str, Snapshot] = OrderedDict()
        self._cached = cached
        self._erasing: set[asyncio.Task[None]] = set()

    def _superseded(self, revision: int) -> None:
        """Erase a replaced revision, off the caller's path (the run already
        moved on; if this process dies first, a task erasure finds it)."""
        task = asyncio.create_task(self._erase(revision))
        self._erasing.add(task)
        task.add_done_callback(self._erasing.discard)

    async def _erase(self, revision: int) -> None:
        with contextlib.suppress(Exception):
            await self.kv.erase_revision(revision)

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
        entry = await self.kv.get(key, consistent=consistent)
        if entry is None:
            return self._remember(key, None)
        snap = Snapshot(entry.value, entry.revision)
        return self._remember(key, snap) if remember else snap

    async def revision(self, key: str) -> int | None:
        """The stored revision of run ``key`` (None: no such run); no decode."""
        entry = await self.kv.get(key)
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
        try:
            if revision is None:
                new = await self.kv.create(run.key, data)
            else:
                new = await self.kv.update(run.key, data, last=revision)
        except WrongLastSequence as exc:
            self._cache.pop(run.key, None)
            raise RunConflict(run.key) from exc
        if revision is not None:
            self._superseded(revision)
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
        entries = await self.kv.entries(f"{tenant}.*", limit=limit)
        return [codec.decode(e.value, RunState) for e in entries]
